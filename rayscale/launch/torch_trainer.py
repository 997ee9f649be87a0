"""Ray Train's TorchTrainer less the actors that every run started and no rayscale run uses.

Each run's controller starts, besides its workers and its synchronisation actor:
- a DatasetManager actor, even with no datasets: rayscale passes none (each worker builds the reads of its own
  lanes, launch/ray_context.py), so nothing ever asks it for a shard;
- a detached PlacementGroupCleaner actor, which asks the dashboard's state API every second whether the
  controller still lives, to remove the worker group's placement group if it died first. rayscale removes
  the groups a run left itself, after every run and every trial (launch/callbacks.py,
  remove_placement_groups_left), and a group dies with its job anyway.
Each is a new Python process importing Ray Train: together ~2-3 CPU-seconds a run on the 2-core machine, paid
again for every Tune trial and every restart. The DataContext still reaches the workers as before.

Without `autoscaler_requests`, a fixed-size run also leaves out Ray Data's AutoscalingCoordinator, a detached actor
through which Train's scaling policy asks the cluster's autoscaler for the group's resources. The embedded Ray has
no autoscaler to ask, yet the controller started the actor and waited for its answer before it placed the workers:
~2 CPU-seconds, and the first step ~1.4 s later, in every run on a fresh embedded Ray (the 2-core machine). An
elastic run keeps it: its policy asks the coordinator what the cluster holds.
"""

from __future__ import annotations

from functools import cache


class NoDatasets:
    """What a worker's ray.train.get_dataset_shard asks when the trainer was given no datasets."""

    def get_dataset_shard(self, dataset_info):
        raise KeyError(f"Dataset shard for '{dataset_info.dataset_name}' not found: rayscale passes no datasets "
                       f"to Ray Train (each worker reads its own lanes)")


@cache
def trainer_class():
    """The TorchTrainer subclass, built on first use (nothing imports Ray at import time)."""
    from ray.train.torch import TorchTrainer
    from ray.train.v2._internal.callbacks.datasets import DatasetsCallback
    from ray.train.v2._internal.callbacks.placement_group_callback import PlacementGroupCleanerCallback
    from ray.train.v2._internal.execution.scaling_policy.fixed import FixedScalingPolicy

    class FixedWithoutAutoscaler(FixedScalingPolicy):
        """Train's fixed-size policy, less its resource requests to the autoscaler (and so the coordinator)."""

        def after_controller_start(self, train_run_context):
            pass

        def _maybe_send_resource_request(self):
            pass

    class DataContextOnly(DatasetsCallback):
        """Train's datasets callback without its DatasetManager actor: only the DataContext propagation."""

        def before_init_train_context(self, workers):
            return {"dataset_shard_provider": [NoDatasets()] * len(workers)}

    class RayscaleTorchTrainer(TorchTrainer):
        def __init__(self, *args, autoscaler_requests: bool = True, **kwargs):
            if kwargs.get("datasets"):
                raise ValueError("rayscale's trainer takes no datasets: each worker reads its own lanes")
            super().__init__(*args, **kwargs)
            self.autoscaler_requests = autoscaler_requests

        def _initialize_and_run_controller(self, **controller_init_kwargs):
            if not self.autoscaler_requests and type(controller_init_kwargs["scaling_policy"]) is FixedScalingPolicy:
                controller_init_kwargs["scaling_policy"] = FixedWithoutAutoscaler(self.scaling_config)
            return super()._initialize_and_run_controller(**controller_init_kwargs)

        def _create_default_callbacks(self):
            return [DataContextOnly(self.train_run_context, datasets={}) if isinstance(callback, DatasetsCallback)
                    else callback for callback in super()._create_default_callbacks()
                    if not isinstance(callback, PlacementGroupCleanerCallback)]

    return RayscaleTorchTrainer
