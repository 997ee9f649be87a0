"""rayscale's TorchTrainer (launch/torch_trainer.py): which scaling policy its controller gets, without Ray.

Without autoscaler requests (the embedded Ray, which has no autoscaler), a fixed-size run's policy sends none, so
no AutoscalingCoordinator actor is started for it; an elastic run keeps Train's policy, which asks the coordinator
what the cluster holds. The end-to-end check that the embedded Ray's runs start no such actor is in
tests/test_pipeline.py.
"""

from __future__ import annotations

import pytest
from ray.train import ScalingConfig
from ray.train.v2._internal.execution.scaling_policy import create_scaling_policy
from ray.train.v2._internal.execution.scaling_policy.elastic import ElasticScalingPolicy
from ray.train.v2._internal.execution.scaling_policy.fixed import FixedScalingPolicy
from ray.train.v2.api.data_parallel_trainer import DataParallelTrainer

from rayscale.launch.torch_trainer import trainer_class


def _policy_the_controller_gets(monkeypatch, workers, autoscaler_requests: bool):
    given = {}
    monkeypatch.setattr(DataParallelTrainer, "_initialize_and_run_controller",
                        lambda self, **kwargs: given.update(kwargs))
    trainer = trainer_class()(lambda config: None, scaling_config=ScalingConfig(num_workers=workers),
                              autoscaler_requests=autoscaler_requests)
    trainer._initialize_and_run_controller(scaling_policy=create_scaling_policy(trainer.scaling_config),
                                           callbacks=["kept"])
    assert given["callbacks"] == ["kept"]  # the other arguments reach Train unchanged
    return given["scaling_policy"]


def test_without_autoscaler_requests_a_fixed_runs_policy_never_makes_the_coordinator(monkeypatch):
    policy = _policy_the_controller_gets(monkeypatch, 2, autoscaler_requests=False)
    assert isinstance(policy, FixedScalingPolicy) and type(policy) is not FixedScalingPolicy
    assert policy.scaling_config.num_workers == 2
    # What the controller calls: at its start, then before each decision. Train's own would make the coordinator's
    # client here and ask the actor (which needs a Ray).
    policy.after_controller_start(train_run_context=None)
    decision = policy.make_decision_for_non_running_worker_group()
    assert decision.num_workers == 2
    assert policy._coordinator_client is None


@pytest.mark.parametrize("workers, autoscaler_requests, kind", [
    pytest.param(2, True, FixedScalingPolicy, id="fixed-on-a-cluster"),
    pytest.param((1, 2), False, ElasticScalingPolicy, id="elastic"),
])
def test_trains_own_policy_otherwise(monkeypatch, workers, autoscaler_requests, kind):
    assert type(_policy_the_controller_gets(monkeypatch, workers, autoscaler_requests)) is kind
