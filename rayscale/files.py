"""The name of every file a run directory holds: one constant each (the reference: docs/reference/outputs.md)."""

CONFIG_FILE = "config.yaml"  # the resolved config; a re-run resumes only with the same training sections
METRICS_FILE = "metrics.jsonl"  # one line per log interval and per epoch end (engine/metrics.py)
SUMMARY_FILE = "summary.json"  # final metrics, times, counts (driver/outputs.py)
MODEL_FILE = "model.pt"  # the final state_dict (the weight average where the run kept one)
MODEL_SAFETENSORS_FILE = "model.safetensors"  # the same weights as safetensors (models/export.py)
CURVES_FILE = "curves.png"
GROUPS_FILE = "worker_groups.jsonl"  # one line per worker group started (launch/callbacks.py)
CHECKPOINTS_DIR = "checkpoints"
TRACKING_FILE = "tracking.json"  # run.trackers: each tracker's run id and the last line it logged (driver/tracking.py)
TENSORBOARD_DIR = "tensorboard"  # run.trackers tensorboard: the event files
WANDB_DIR = "wandb"  # run.trackers wandb: W&B's own directory (offline-run-*/ by default)
MLFLOW_DB = "mlflow.db"  # run.trackers mlflow: the default store (a search's, for all its trials)
MLFLOW_ARTIFACTS_DIR = "mlflow-artifacts"  # and its artifacts, one directory per MLflow run
SUGGEST_JSON = "suggest.json"  # rayscale suggest RUN_DIR writes these two
SUGGEST_PLOT = "suggest.png"
