"""run.trackers on the driver: the trackers of one run (driver/trackers.py), fed the metrics.jsonl lines while it
trains (driver/progress.py's MetricsFollower), finished with its final files.

What each gets: the config (flattened: optim.lr), each line's numeric fields as metrics at the line's
`samples_seen` (the x axis of every rayscale curve: runs and trials with different batches line up at the same
data; `step` is logged as a metric of its own; the wall-clock stamps started_at and entered_at are not), and at
the end model.safetensors, model.pt, config.yaml and summary.json. A search's trials log to one MLflow store and
experiment, each nested under the search's own MLflow run, and form one W&B group (tuning/search.py).

Attempts: tracking.json in the run directory keeps each tracker's run id and the last line it logged. A resumed
run (or one Train restarted from a checkpoint) writes the lines after its checkpoint again; each tracker skips the
lines up to the last one it logged, so every point is logged once, in the one tracker run of the run directory.

Failures: a tracker that cannot start refuses the run before it trains (a one-line UserError: nothing trained,
nothing lost). One that fails later (a store that goes away) prints a one-line warning and is dropped for the
rest of the run: training and the run directory's own outputs go on as without it.
"""

from __future__ import annotations

import dataclasses
import importlib.util
import json
import os
import sys
from dataclasses import dataclass
from pathlib import Path

from rayscale import config as config_module
from rayscale.config import Config
from rayscale.driver.trackers import Destinations, MlflowTracker, TensorBoardTracker, Tracker, WandbTracker
from rayscale.engine import checkpoint
from rayscale.errors import UserError
from rayscale.files import (
    CONFIG_FILE,
    MLFLOW_ARTIFACTS_DIR,
    MLFLOW_DB,
    MODEL_FILE,
    MODEL_SAFETENSORS_FILE,
    SUMMARY_FILE,
    TRACKING_FILE,
)
from rayscale.plugins import first_line

# The modules each tracker needs, all installed by the pip extra of the same name (pyproject.toml).
NEEDS = {"mlflow": ("mlflow", "sqlalchemy", "alembic"), "tensorboard": ("tensorboard",), "wandb": ("wandb",)}
NOT_METRICS = ("samples_seen", "started_at", "entered_at")  # the step itself, and wall-clock stamps
FINAL_FILES = (MODEL_SAFETENSORS_FILE, MODEL_FILE, CONFIG_FILE, SUMMARY_FILE)
STATE_VERSION = 1


def check_installed(names: list[str]) -> None:
    """Each tracker's library is there (looked up, not imported), and an MLflow tracking server named by
    MLFLOW_TRACKING_URI answers: checked with the config, before Ray."""
    for name in names:
        missing = next((module for module in NEEDS[name] if importlib.util.find_spec(module) is None), None)
        if missing is not None:
            raise UserError(f"run.trackers: {name} needs the {missing} package, which is not installed "
                            f"(pip install 'rayscale[{name}]')")
    if "mlflow" in names:
        check_server_answers(os.environ.get("MLFLOW_TRACKING_URI") or "")


SERVER_TIMEOUT_S = 5.0


def check_server_answers(uri: str) -> None:
    """An http(s) MLFLOW_TRACKING_URI whose server does not answer: MLflow's client retries each request with
    back-off for minutes, so the run sat silent after its first line (and its driver would have done so again
    at every log line)."""
    import socket
    from urllib.parse import urlsplit

    parts = urlsplit(uri)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        return
    try:
        port = parts.port or (443 if parts.scheme == "https" else 80)
        socket.create_connection((parts.hostname, port), timeout=SERVER_TIMEOUT_S).close()
    except (OSError, ValueError) as exc:
        reason = getattr(exc, "strerror", None) or str(exc) or type(exc).__name__
        raise UserError(f"run.trackers: mlflow's MLFLOW_TRACKING_URI {uri}: nothing answers ({reason}); start "
                        f"the tracking server, or unset the variable for a store in the run directory") from None


def destinations(store_dir: Path, search: str | None = None) -> Destinations:
    """The libraries' own environment variables, else everything in `store_dir` (the run's directory, or the
    search's for all its trials) and W&B offline."""
    uri = os.environ.get("MLFLOW_TRACKING_URI")
    return Destinations(
        mlflow_uri=uri or f"sqlite:///{store_dir / MLFLOW_DB}",
        mlflow_artifacts=None if uri else (store_dir / MLFLOW_ARTIFACTS_DIR).as_uri(),
        experiment=os.environ.get("MLFLOW_EXPERIMENT_NAME") or search or "rayscale",
        wandb_project=os.environ.get("WANDB_PROJECT") or "rayscale",
        wandb_mode=os.environ.get("WANDB_MODE") or "offline",
        search=search)


@dataclass
class TrackerState:
    """What tracking.json keeps per tracker."""

    run_id: str | None = None  # the tracker's run, continued by the next attempt
    # The last line logged: (samples_seen, 1 if it validated or ended an epoch): a mid-epoch validation line shares
    # its samples_seen with the periodic line before it, and comes after it.
    logged_through: tuple[int, int] | None = None
    ended: bool = False  # the tracker's run was ended (by this attempt, or by a search for a trial cut off)


def line_position(line: dict) -> tuple[int, int]:
    return line["samples_seen"], int(bool(line.get("evaluation") or line.get("epoch_end")))


def read_state(run_dir: Path) -> dict[str, TrackerState]:
    path = run_dir / TRACKING_FILE
    saved = json.loads(path.read_text()) if path.exists() else {}
    if saved.get("version") != STATE_VERSION:
        return {}
    return {name: TrackerState(entry.get("run_id"), tuple(entry["logged_through"])
                               if entry.get("logged_through") is not None else None, entry.get("ended", False))
            for name, entry in saved["trackers"].items()}


def write_state(run_dir: Path, states: dict[str, TrackerState]) -> None:
    saved = {"version": STATE_VERSION, "trackers": {name: dataclasses.asdict(state) for name, state in states.items()}}
    checkpoint.write_bytes_atomic(run_dir / TRACKING_FILE, (json.dumps(saved, indent=2) + "\n").encode())


def metric_values(line: dict) -> dict[str, float]:
    """A line's numbers (non-numeric fields, flags and nulls are not metrics)."""
    return {name: float(value) for name, value in line.items()
            if name not in NOT_METRICS and isinstance(value, int | float) and not isinstance(value, bool)}


def _open(name: str, config: dict, run_dir: Path, run_name: str, where: Destinations, run_id: str | None
          ) -> Tracker:
    if name == "mlflow":
        return MlflowTracker(config, run_dir, run_name, where, run_id)
    if name == "tensorboard":
        return TensorBoardTracker(config, run_dir)
    return WandbTracker(config, run_dir, run_name, where, run_id)


class Tracking:
    """A run's started trackers and their state; `log_line` is a MetricsFollower reader."""

    def __init__(self, run_dir: Path, trackers: dict[str, Tracker], states: dict[str, TrackerState]):
        self.run_dir, self.trackers, self.states = run_dir, trackers, states

    @classmethod
    def start(cls, cfg: Config, run_dir: Path, where: Destinations, names: list[str] | None = None
              ) -> Tracking | None:
        """Start (or continue) a tracker run for each of `names` (default: run.trackers); None: none asked for.
        Raises UserError, having closed the others, if one cannot start."""
        names = list(dict.fromkeys(cfg.run.trackers if names is None else names))
        if not names:
            return None
        states = read_state(run_dir)
        tracking = cls(run_dir, {}, states)
        config = config_module.to_dict(cfg)
        for name in names:
            state = states.setdefault(name, TrackerState())
            try:
                tracking.trackers[name] = _open(name, config, run_dir, cfg.run.name, where, state.run_id)
            except Exception as exc:
                tracking.finish([], [], "FAILED")
                raise UserError(f"run.trackers: {name} could not start: {first_line(exc)}") from exc
            state.run_id, state.ended = tracking.trackers[name].run_id, False
        write_state(run_dir, states)
        return tracking

    def run_id(self, name: str) -> str | None:
        return self.states[name].run_id if name in self.trackers else None

    def log_line(self, line: dict) -> None:
        """One metrics.jsonl line, to each tracker that has not logged it yet."""
        at, metrics = line_position(line), metric_values(line)
        logged = False
        for name, tracker in list(self.trackers.items()):
            state = self.states[name]
            if state.logged_through is not None and at <= state.logged_through:
                continue
            if self._safely(name, tracker.log, metrics, line["samples_seen"]):
                state.logged_through, logged = at, True
        if logged:
            write_state(self.run_dir, self.states)

    def recount(self, lines: list[dict]) -> None:
        """A process ended between logging a line and recording it in tracking.json (a trial's actor, ended by
        Tune the moment ASHA stopped it): a tracker that can count what it holds then holds exactly one line
        more than `lines` (the run's final log) has up to the recorded position, and that next line is marked
        logged, so it is not logged twice. Any other count (a resize moved the lines' positions) leaves the
        record as it is."""
        for name, tracker in self.trackers.items():
            counting = getattr(tracker, "lines_held", None)  # W&B's offline files cannot say
            try:
                held = counting() if counting is not None else None
            except Exception:  # noqa: BLE001 - then what tracking.json says stands
                held = None
            through = self.states[name].logged_through
            known = sum(1 for line in lines if through is not None and line_position(line) <= through)
            if held == known + 1 and held <= len(lines):
                self.states[name].logged_through = line_position(lines[known])
        write_state(self.run_dir, self.states)

    def finish(self, lines: list[dict], files: list[Path], ending: str = "FINISHED") -> None:
        """The lines no follower saw (a multi-node run's log arrives with its final checkpoint), `files`, and the
        end of each tracker's run: FINISHED, FAILED or KILLED (MLflow's statuses; W&B: exit code 0 or 1)."""
        for line in lines:
            self.log_line(line)
        for name, tracker in list(self.trackers.items()):
            self.states[name].ended = self._safely(name, tracker.finish, files, ending)
        self.trackers.clear()
        write_state(self.run_dir, self.states)

    def _safely(self, name: str, call, *args) -> bool:
        try:
            call(*args)
            return True
        except Exception as exc:  # noqa: BLE001 - tracking never stops training; the warning says what broke
            print(f"[rayscale] warning: run.trackers {name} failed and is dropped for the rest of this run: "
                  f"{type(exc).__name__}: {first_line(exc)}", file=sys.stderr, flush=True)
            del self.trackers[name]
            return False


def final_files(run_dir: Path) -> list[Path]:
    return [run_dir / name for name in FINAL_FILES if (run_dir / name).exists()]


def end_cut_off(cfg: Config, run_dir: Path, where: Destinations, ending: str) -> None:
    """A run whose process was ended before its trackers were (a trial ASHA stopped: Tune ends its actor without
    waiting for it): the lines they did not log, and their end, from its files. Only the trackers that need it are
    started again."""
    from rayscale.driver.outputs import read_metrics  # which imports prepare, which imports this module

    states, lines = read_state(run_dir), read_metrics(run_dir)
    last = line_position(lines[-1]) if lines else None
    names = [name for name, state in states.items() if not state.ended or (
        last is not None and (state.logged_through is None or state.logged_through < last))]
    tracking = Tracking.start(cfg, run_dir, where, names=names) if names else None
    if tracking is not None:
        tracking.recount(lines)
        tracking.finish(lines, [], ending)
