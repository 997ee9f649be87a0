"""Test-wide set-up: Ray must bind loopback only (see docs/guide/failures.md, Security), before anything imports ray."""

import os

os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
# A loaded 2-core CI machine can take longer than Train's 60 s default to start a worker group.
os.environ.setdefault("RAY_TRAIN_WORKER_GROUP_START_TIMEOUT_S", "180")

# run.trackers: W&B never goes online from a test (whatever this shell says), and MLflow keeps to each run's store.
os.environ["WANDB_MODE"] = "offline"
os.environ["WANDB_SILENT"] = "true"
for name in ("MLFLOW_TRACKING_URI", "MLFLOW_EXPERIMENT_NAME", "WANDB_PROJECT", "WANDB_API_KEY", "WANDB_BASE_URL"):
    os.environ.pop(name, None)

# The clusters tests start themselves (ray.cluster_utils) skip Ray's idle prestarted workers too, as the embedded
# Ray does (launch/connect.py): nothing here uses them.
os.environ.setdefault("RAY_prestart_worker_first_driver", "0")
