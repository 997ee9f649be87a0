"""The name of every file a run or search directory holds: one constant each (the reference:
docs/reference/outputs.md); and whether a directory can take them. The files inside one checkpoint are named in
engine/checkpoint.py."""

import tempfile
from pathlib import Path

CONFIG_FILE = "config.yaml"  # the resolved config; a re-run resumes only with the same training sections
DATA_RECORD_FILE = "data.json"  # the data the checkpoints were made on: a resume must find it again (driver/data_record.py)
METRICS_FILE = "metrics.jsonl"  # one line per log interval and per epoch end (engine/metrics.py)
SUMMARY_FILE = "summary.json"  # final metrics, times, counts (driver/outputs.py)
MODEL_FILE = "model.pt"  # the final state_dict (the weight average where the run kept one)
MODEL_SAFETENSORS_FILE = "model.safetensors"  # the same weights as safetensors (models/export.py)
CURVES_FILE = "curves.png"
GROUPS_FILE = "worker_groups.jsonl"  # one line per worker group started (launch/callbacks.py)
CHECKPOINTS_DIR = "checkpoints"
CHECKPOINTS_KEPT = 3  # the latest checkpoints a run keeps (Ray Train's num_to_keep; local mode prunes to it too)
TRACKING_FILE = "tracking.json"  # run.trackers: each tracker's run id and the last line it logged (driver/tracking.py)
TENSORBOARD_DIR = "tensorboard"  # run.trackers tensorboard: the event files
WANDB_DIR = "wandb"  # run.trackers wandb: W&B's own directory (offline-run-*/ by default)
MLFLOW_DB = "mlflow.db"  # run.trackers mlflow: the default store (a search's, for all its trials)
MLFLOW_ARTIFACTS_DIR = "mlflow-artifacts"  # and its artifacts, one directory per MLflow run
SUGGEST_JSON = "suggest.json"  # rayscale suggest RUN_DIR writes these two
SUGGEST_PLOT = "suggest.png"
EVAL_FILE = "eval.json"  # rayscale eval RUN_DIR writes it (or to --output)
SEARCH_FILE = "search.yaml"  # a search's config as it started: what a resumed search must match (tuning/search.py)
TRIALS_DIR = "trials"  # a search's trials: one run directory each, named by trial id
TRIALS_TABLE = "trials.csv"  # one row per trial: its config, status and metric
BEST_CONFIG_FILE = "best_config.yaml"  # the best trial's config, trainable as it is with rayscale train
TUNE_CURVES_FILE = "tune_curves.png"  # every trial's metric against samples seen
TUNE_DIR = "tune"  # Ray Tune's own experiment directory (what --resume restores)
RUNGS_FILE = "asha_rungs.json"  # ASHA's recorded rungs, for --resume (tuning/asha.py)
PROMOTION_FILE = "asha_promotions.json"  # tune.asha_variant promotion: rungs and promotions (tuning/promotion.py)


# What `rayscale train` writes into a run directory, and the later commands read: no other command writes over them.
RUN_FILES = (CONFIG_FILE, DATA_RECORD_FILE, METRICS_FILE, SUMMARY_FILE, MODEL_FILE, MODEL_SAFETENSORS_FILE,
             CURVES_FILE, GROUPS_FILE, TRACKING_FILE, MLFLOW_DB)
RUN_DIRS = (CHECKPOINTS_DIR, TENSORBOARD_DIR, WANDB_DIR, MLFLOW_ARTIFACTS_DIR)


def a_runs_own(path: Path, run_dir: Path) -> str | None:
    """The run's own file or directory that writing `path` would replace (None: it replaces none of them)."""
    target, run = path.expanduser().resolve(), run_dir.expanduser().resolve()
    if target.parent == run and target.name in RUN_FILES:
        return target.name
    return next((name for name in RUN_DIRS if target.is_relative_to(run / name)), None)


def runs_own_named(path: Path, run_dir: Path) -> str | None:
    """What writing `path` would replace of a run's own files, in words: of `run_dir` ("the run's model.pt"), or
    of any other rayscale run above `path`, a directory holding a config.yaml and a metrics.jsonl ("the model.pt
    of the run in DIR"); None if nothing."""
    if (own := a_runs_own(path, run_dir)) is not None:
        return f"the run's {own}"
    target = path.expanduser().resolve()
    for directory in target.parents:
        if (directory / CONFIG_FILE).is_file() and (directory / METRICS_FILE).is_file():
            if (own := a_runs_own(target, directory)) is not None:
                return f"the {own} of the run in {directory}"
    return None


def nearest_existing(path: Path) -> Path:
    """`path` if it exists, else the nearest of its parents that does: where making it would start."""
    while not path.exists():
        path = path.parent
    return path


def can_write_in(directory: Path) -> bool:
    """Whether this process can create files in `directory`, an existing directory: tried (a directory made and
    removed at once), not read off its permission bits, which root passes everywhere (/proc included) and
    which say nothing of a full disk."""
    try:
        tempfile.TemporaryDirectory(dir=directory, prefix=".rayscale-write-check-").cleanup()
    except OSError:
        return False
    return True
