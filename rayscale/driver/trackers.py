"""run.trackers: one class per tracking library, each with the same three calls that driver/tracking.py makes on
the driver: start (a new run, or the one an earlier attempt of this run directory started), `log(metrics, step)`
for each metrics.jsonl line, and `finish(files, ending)` with the run's final files. Each imports its library
only when started: they are optional extras.

Why our own classes rather than Ray Tune's MLflowLoggerCallback and WandbLoggerCallback: those see only what a
trial reports to Tune (the validations, not every metrics line), exist only under Tune (`rayscale train` would
need a second path), and the W&B one logs from an actor of its own. Three small classes over the same metrics
lines serve a lone run and a search's trials alike, and keep everything in the run directory by default.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import yaml

from rayscale.files import TENSORBOARD_DIR

MLFLOW_PARAMS_PER_CALL = 100  # MLflow's limit on the params of one log_batch


@dataclass(frozen=True)
class Destinations:
    """Where a run's trackers write, decided once on the driver (for a search, by its driver for every trial:
    plain data that travels to the trials)."""

    mlflow_uri: str  # MLFLOW_TRACKING_URI, else sqlite:///<run or search dir>/mlflow.db
    mlflow_artifacts: str | None  # a new experiment's artifact location (None: the tracking server's choice)
    experiment: str  # the MLflow experiment: MLFLOW_EXPERIMENT_NAME, else rayscale (a search: its name)
    wandb_project: str  # WANDB_PROJECT, else rayscale
    wandb_mode: str  # WANDB_MODE, else offline
    search: str | None = None  # the search a trial belongs to: its W&B group, its MLflow tag
    parent_run_id: str | None = None  # the search's MLflow run, which its trials' runs nest under


class Tracker(Protocol):
    run_id: str | None  # what a later attempt of the run continues (None: nothing to continue)

    def log(self, metrics: dict[str, float], step: int) -> None: ...

    def finish(self, files: list[Path], ending: str) -> None: ...  # ending: FINISHED, FAILED or KILLED


def flat(config: dict, prefix: str = "") -> dict[str, Any]:
    """{"optim": {"lr": 0.1}} -> {"optim.lr": 0.1}; an empty mapping stays one value."""
    out: dict[str, Any] = {}
    for name, value in config.items():
        if isinstance(value, dict) and value:
            out.update(flat(value, f"{prefix}{name}."))
        else:
            out[f"{prefix}{name}"] = value
    return out


def mlflow_experiment(client, where: Destinations) -> str:
    """The experiment's id, created at `where.mlflow_artifacts` if it is new (another process may create it at
    the same moment: a search's trials)."""
    from mlflow.exceptions import MlflowException

    found = client.get_experiment_by_name(where.experiment)
    if found is not None:
        return found.experiment_id
    try:
        return client.create_experiment(where.experiment, artifact_location=where.mlflow_artifacts)
    except MlflowException:
        found = client.get_experiment_by_name(where.experiment)
        if found is None:
            raise
        return found.experiment_id


def mlflow_client(uri: str):
    from mlflow import MlflowClient

    # A new sqlite store announces its table creation and migrations at INFO: not the run's business.
    for name in ("mlflow.store.db.utils", "alembic.runtime.migration"):
        logging.getLogger(name).setLevel(logging.WARNING)
    return MlflowClient(uri)


class MlflowTracker:
    """An MLflow run: the config as params, every line's numbers as metrics at their step, the final files as
    artifacts. A search's trial is tagged with the search and nested under the search's run."""

    def __init__(self, config: dict, run_dir: Path, run_name: str, where: Destinations, run_id: str | None):
        from mlflow.entities import Param
        from mlflow.exceptions import MlflowException

        self.client = mlflow_client(where.mlflow_uri)
        if run_id is not None:
            try:
                self.client.update_run(run_id, status="RUNNING")  # a resumed run goes on in its own MLflow run
                self.run_id = run_id
                return
            except MlflowException:  # gone from the store (deleted, or another store now): start a new one
                pass
        tags = {"rayscale.run_dir": str(run_dir)}
        if where.search is not None:
            tags["rayscale.search"] = where.search
        if where.parent_run_id is not None:
            tags["mlflow.parentRunId"] = where.parent_run_id
        self.run_id = self.client.create_run(mlflow_experiment(self.client, where), run_name=run_name,
                                             tags=tags).info.run_id
        params = [Param(name, str(value)) for name, value in flat(config).items()]
        for first in range(0, len(params), MLFLOW_PARAMS_PER_CALL):
            self.client.log_batch(self.run_id, params=params[first:first + MLFLOW_PARAMS_PER_CALL])

    def log(self, metrics: dict[str, float], step: int) -> None:
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        self.client.log_batch(self.run_id, metrics=[Metric(name, value, now, step)
                                                    for name, value in metrics.items()])

    def lines_held(self) -> int:
        """How many lines this run holds: every line logs `step`, in one batch with its other numbers."""
        return len(self.client.get_metric_history(self.run_id, "step"))

    def finish(self, files: list[Path], ending: str) -> None:
        for path in files:
            self.client.log_artifact(self.run_id, str(path))
        self.client.set_terminated(self.run_id, ending)  # MLflow's own statuses


class TensorBoardTracker:
    """Event files in <run dir>/tensorboard: every line's numbers as scalars at their step, the config as text
    (TensorBoard keeps no files: the model stays in the run directory)."""

    run_id = None  # a resumed run adds an event file to the same directory

    def __init__(self, config: dict, run_dir: Path):
        from torch.utils.tensorboard import SummaryWriter

        new = not (run_dir / TENSORBOARD_DIR).exists()
        self.writer = SummaryWriter(str(run_dir / TENSORBOARD_DIR))
        if new:  # indented: TensorBoard shows text as Markdown, where that is a code block
            text = yaml.safe_dump(config, sort_keys=False)
            self.writer.add_text("config", "".join(f"    {line}\n" for line in text.splitlines()))
            self.writer.flush()

    def log(self, metrics: dict[str, float], step: int) -> None:
        for name, value in metrics.items():
            self.writer.add_scalar(name, value, step)
        self.writer.flush()  # lines are seconds apart: a TensorBoard watching the run sees each at once

    def lines_held(self) -> int:
        """How many lines the directory's event files hold, this run's earlier attempts' included: every line
        writes `step`."""
        from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

        self.writer.flush()
        events = EventAccumulator(self.writer.log_dir, size_guidance={"scalars": 0}, purge_orphaned_data=False)
        events.Reload()
        return len(events.Scalars("step")) if "step" in events.Tags()["scalars"] else 0

    def finish(self, files: list[Path], ending: str) -> None:
        self.writer.close()


class WandbTracker:
    """A W&B run in <run dir>/wandb (offline unless WANDB_MODE says otherwise: `wandb sync` uploads it): the
    config, every line's numbers at their step, the final files saved with the run; a search's trials are
    grouped by the search's name."""

    def __init__(self, config: dict, run_dir: Path, run_name: str, where: Destinations, run_id: str | None):
        import wandb

        # console off: W&B would otherwise wrap this process's stdout (the progress bar, the summary); no system
        # metrics: they would measure the driver, which only waits, not the workers that train.
        settings = wandb.Settings(console="off", silent=True, x_disable_stats=True)
        self.run = wandb.init(dir=str(run_dir), mode=where.wandb_mode, project=where.wandb_project,
                              group=where.search, name=run_name, id=run_id, resume="allow" if run_id else None,
                              config=config, reinit="create_new", settings=settings)
        self.run_id = self.run.id

    def log(self, metrics: dict[str, float], step: int) -> None:
        self.run.log(metrics, step=step)

    def finish(self, files: list[Path], ending: str) -> None:
        for path in files:
            self.run.save(str(path), base_path=str(path.parent), policy="now")
        self.run.finish(exit_code=0 if ending == "FINISHED" else 1)
