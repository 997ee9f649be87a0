"""[3] `rayscale tune`: Ray Tune over the driver's own trainer (launch/trainer.py), ASHA on samples seen.

Each trial is a Tune function trainable that builds its TorchTrainer with `trainer.train` — the same driver
code as `rayscale train`, never a second training loop — and forwards its validation reports to Tune (Train V2
interop: a callback on the trainer's RunConfig). ASHA's clock is `samples_seen`, so trials with different
batch sizes are compared after the same amount of data, not after the same number of reports.
"""

from __future__ import annotations

import csv
import dataclasses
import math
import os
from collections.abc import Mapping
from pathlib import Path

import yaml

from rayscale import config as config_module
from rayscale.config import Config
from rayscale.data.sources import SourceInfo
from rayscale.driver.outputs import finished_run, read_metrics
from rayscale.driver.prepare import (
    NO_CODE,
    NO_DATA,
    PreparedRun,
    absolute_paths,
    check_model,
    check_output_dir,
    check_training_rows,
    first_change,
    prepare,
    run_directory,
)
from rayscale.driver.trackers import Destinations
from rayscale.driver.tracking import Tracking, destinations, end_cut_off
from rayscale.errors import UserError, argument
from rayscale.files import (
    BEST_CONFIG_FILE,
    CONFIG_FILE,
    PROMOTION_FILE,
    RUNGS_FILE,
    SEARCH_FILE,
    TRIALS_DIR,
    TRIALS_TABLE,
    TUNE_CURVES_FILE,
    TUNE_DIR,
)
from rayscale.launch import trainer
from rayscale.launch.callbacks import remove_placement_groups_left
from rayscale.launch.connect import connect, loopback_unless_joining
from rayscale.launch.fit import check_cluster_fits, check_fits_before_start
from rayscale.math.batching import plan_batches
from rayscale.plugins import UserCode, first_line
from rayscale.tuning import space
from rayscale.tuning.promotion import RUNG_PAUSE

TIME_ATTR = "samples_seen"


def _tune_domain(domain: space.Domain):
    """A sampled domain as Tune's (grid domains: param_space)."""
    from ray import tune

    low_high = domain.values
    return {
        "choice": lambda: tune.choice(list(domain.values)),
        "uniform": lambda: tune.uniform(*low_high),
        "loguniform": lambda: tune.loguniform(*low_high),
        "randint": lambda: tune.randint(int(low_high[0]), int(low_high[1]) + 1),  # inclusive high
    }[domain.kind]()


GRID_KEY = "grid"  # Tune's one grid domain: the space's grid combinations, in tune.grid_order


def param_space(domains: list[space.Domain], cfg: Config) -> dict:
    """Tune's search space. Tune enumerates several grid domains in a fixed nested order, so the grid
    combinations are given to it as one grid domain whose values are already in the order to run them."""
    from ray import tune

    points = space.grid_points(domains, cfg.tune.grid_order, cfg.seed)
    grid = {GRID_KEY: tune.grid_search(points)} if points else {}
    return {**grid, **{d.key: _tune_domain(d) for d in domains if d.kind != "grid"}}


def sampled_values(trial_config: dict) -> dict:
    """A trial's dotted keys and values, its grid combination included."""
    values = {k: v for k, v in trial_config.items() if k != GRID_KEY}
    return {**trial_config.get(GRID_KEY, {}), **values}


STOP_MARKER = ".tune_stopped"
THREAD_TIMEOUT_ENV = "TUNE_FUNCTION_THREAD_TIMEOUT_S"  # read in the trial's actor when Tune reuses it
THREAD_TIMEOUT_S = 30
CONTROLLER_EXIT_WAIT_S = 30.0  # at the search's end, for the last trials' controllers to exit (about 0.2 s)
TRIAL_CPUS = 0.01  # a trial's own actor only waits on its TorchTrainer; Tune refuses zero ("empty head")


_REPORTS: list = []  # the queue this trial actor's runs report through, kept for the actor's next trial


def _reports_queue():
    """The Ray queue a trial's TrainController puts its reports in for Tune, one per trial actor.

    Train's Tune callback makes a new queue (a new actor process, ~1.3 CPU-seconds) for every trial's session;
    Tune reuses the trial actor for the next trial, and now the queue as well. Emptied first: the last trial's
    controller may have put a report that Tune no longer read, once it had stopped that trial (the controller
    has ended by the time the trial function returns, so nothing arrives from it afterwards). A queue whose
    actor is gone (its node lost) is replaced."""
    from ray.exceptions import RayActorError
    from ray.train._internal.session import get_session
    from ray.util.queue import Queue

    try:
        while _REPORTS and not _REPORTS[0].empty():
            _REPORTS[0].get_nowait()
    except RayActorError:
        _REPORTS.clear()
    if not _REPORTS:  # a new queue is empty: not asked, as its actor still starts (the first put waits for it)
        _REPORTS.append(Queue(1, actor_options={"num_cpus": 0}))
    get_session()._inter_actor_queue = _REPORTS[0]
    return _REPORTS[0]


def _trial_callbacks(metric: str, stop_marker: Path) -> list:
    """Run in the trial's TrainController (placed on the trial driver's node, so both see the marker file)."""
    from ray.train.v2._internal.execution.callback import WorkerGroupCallback
    from ray.tune.integration.ray_train import TuneReportCallback

    _reports_queue()  # before the callback below, which takes the session's queue

    class EvaluationReport(TuneReportCallback):
        """Forward only the reports that measured the metric at that point (epoch ends and Tune's rung
        milestones): interval reports carry the last validation, which would be stale at their sample count."""

        def after_report(self, run_context, metrics, checkpoint):
            if metrics and metrics[0].get("evaluation") and metric in metrics[0] and not stop_marker.exists():
                super().after_report(run_context, metrics, checkpoint)

    class AbortWhenStopped(WorkerGroupCallback):
        """When ASHA stops a trial, Tune ends the trial's session but its TorchTrainer's controller and workers
        keep training and holding their CPUs (Ray #54305, seen here: later trials then time out waiting for
        workers). The controller polls its workers every run.poll_interval_s (0.25 s): abort on the
        first poll after the trial driver marked the trial stopped."""

        def after_worker_group_poll_status(self, worker_group_status):
            if stop_marker.exists():
                import ray

                ray.get_runtime_context().current_actor.abort.remote()

    return [EvaluationReport(), AbortWhenStopped()]


def check_metric_name(metric: str, metric_names: list[str], task: str) -> None:
    """tune.metric must be one the trials report: val_loss, val_accuracy (not for regression), val_<name> of a
    train.metrics entry, or a key of the log line (train_loss, a component's such as gradient_noise_scale). A
    misspelt one was found only after every trial had trained, in Tune's traceback."""
    import difflib

    from rayscale.engine.loop import line_keys

    known = ["val_loss", *(["val_accuracy"] if task != "regression" else []),
             *(f"val_{name}" for name in metric_names)]
    logged = [key for key in line_keys() if key not in ("started_at", "entered_at")]  # stamps, not measures
    if metric in known or metric in logged:  # no logged key starts with val_
        return
    close = difflib.get_close_matches(metric, known if metric.startswith("val_") else [*known, *logged], n=1)
    hint = f" (did you mean {close[0]}?)" if close else ""
    raise UserError(f"tune.metric {metric}: no trial reports it; expected one of {', '.join(known)}, or a "
                    f"training metric such as train_loss{hint}")


def default_grace(grace_samples: int | None, max_t: int, reduction_factor: float, warmup: int) -> int:
    """ASHA's grace period: tune.grace_samples, else max_t / reduction_factor**3 (four rungs: 1/27, 1/9, 1/3
    of the budget and the end at the default factor 3), and never inside the warmup, where every trial's
    loss still says more about the warmup than about its settings."""
    return max(grace_samples or int(max_t / reduction_factor ** 3), warmup, 1)


def rung_milestones(grace: int, max_t: int, reduction_factor: float) -> list[int]:
    """Where ASHA decides: the samples of its rungs below max_t (Ray's `_Bracket` rule, bracket 0). The
    workers validate at exactly these points, so a rung compares every trial on the same amount of data."""
    rungs = int(math.log(max_t / grace) / math.log(reduction_factor) + 1)
    return sorted({math.ceil(grace * reduction_factor ** k) for k in range(rungs)} - {max_t})


def _watch_for_stop(stop_marker: Path) -> None:
    """Mark the trial stopped as soon as Tune stops it, for the controller-side callback to see."""
    import threading

    from ray.train._internal.session import get_session

    session = get_session()
    if session is None:
        return

    def watch() -> None:
        session.stop_event.wait()
        stop_marker.touch()

    threading.Thread(target=watch, name="rayscale-stop-watch", daemon=True).start()


def _finished_records(cfg: Config) -> list[dict] | None:
    """A trial that already finished (found again on --resume) is reported from its files, not re-run."""
    run_dir = run_directory(cfg)
    if finished_run(cfg, run_dir) is None:
        return None
    return [r for r in read_metrics(run_dir) if r.get("evaluation")]


def _trial(sampled: dict, base: dict, search_dir: str, metric: str, eval_at_samples: list[int],
           promotion: bool = False, code: UserCode = NO_CODE, given: Mapping[str, SourceInfo] = NO_DATA,
           track_to: Destinations | None = None) -> None:
    from ray import tune

    from rayscale.tuning.asha import read_promotion_state

    cfg = space.apply(base, sampled_values(sampled))
    cfg.run.output_dir = str(Path(search_dir) / TRIALS_DIR)
    cfg.run.progress = "lines"  # a trial's output is its actor's log; Tune's own table shows the search
    trial_id = cfg.run.name = tune.get_context().get_trial_id()
    finished = _finished_records(cfg)
    if finished:
        for record in finished:
            tune.report(record)
        return
    if promotion:
        # Waiting at a rung, not promoted: restored so by --resume. Pause again before training anything.
        rungs = read_promotion_state(Path(search_dir) / PROMOTION_FILE)
        if rungs is not None and rungs.waiting_at(trial_id) is not None:
            tune.report({**_last_evaluation(cfg), RUNG_PAUSE: True})
            return
    # When ASHA stops this trial, Tune reuses this actor for the next one only once this function has returned
    # (the controller aborts at its next poll), and waits for that 2 s by default; an actor it gives up on is
    # ended with the abort half done (see launch/callbacks.py).
    os.environ[THREAD_TIMEOUT_ENV] = str(THREAD_TIMEOUT_S)
    stop_marker = run_directory(cfg) / STOP_MARKER
    stop_marker.parent.mkdir(parents=True, exist_ok=True)
    stop_marker.unlink(missing_ok=True)  # a resumed trial runs again
    _watch_for_stop(stop_marker)
    summary = trainer.train(cfg, callbacks=_trial_callbacks(metric, stop_marker), eval_at_samples=eval_at_samples,
                            pause_at_samples=eval_at_samples if promotion else (), code=code, given=given,
                            track_to=track_to, report_evaluations=True)
    if promotion and summary["epochs"] < cfg.train.epochs:
        # The run stopped at a rung, its workers gone and its checkpoint there: now PromotingASHA pauses the
        # trial (this report blocks until it does), never while the run still holds its workers.
        tune.report({**_last_evaluation(cfg), RUNG_PAUSE: True})


def _last_evaluation(cfg: Config) -> dict:
    """The run's latest validation record: what a paused trial repeats with its pause signal."""
    return next((r for r in reversed(read_metrics(run_directory(cfg))) if r.get("evaluation")), {})


def trial_share(concurrency: int) -> float:
    """The share of the driver node's `node:<ip>` resource (1.0 in all) each trial holds under promotion, so
    that Ray itself runs at most `concurrency` trials at once and a paused trial holds none of it. Ray counts
    resources in 1/10,000ths: rounded down, `concurrency` shares always fit and one more never does."""
    return math.floor(10_000 / concurrency) / 10_000


def max_concurrent(cfg: Config) -> int:
    """Trials that fit the cluster at once, keeping one CPU for Ray Data's read tasks."""
    import ray

    if cfg.tune.max_concurrent_trials:
        return cfg.tune.max_concurrent_trials
    total = ray.cluster_resources()
    workers = max(cfg.scaling.num_workers, 1)
    if cfg.scaling.use_gpu:
        return max(1, int(total.get("GPU", 0) // workers))
    return max(1, int((total.get("CPU", 1) - 1) // (workers * cfg.scaling.cpus_per_worker)))


def _search_alg(cfg: Config):
    if cfg.tune.search == "random":
        return None  # Tune's BasicVariantGenerator: random samples, grid domains enumerated
    if cfg.tune.search == "optuna":
        try:
            from ray.tune.search.optuna import OptunaSearch

            return OptunaSearch()
        except (ImportError, AssertionError):
            raise UserError("tune.search optuna: the optuna package is not installed "
                            "(pip install 'rayscale[optuna]')") from None
    try:
        from ray.tune.search.hyperopt import HyperOptSearch

        return HyperOptSearch()
    except (ImportError, AssertionError):
        raise UserError("tune.search hyperopt: the hyperopt package is not installed "
                        "(pip install 'rayscale[hyperopt]')") from None


def _this_node_resource() -> str:
    """The `node:<ip>` resource of the node this driver runs on (as the cluster knows it)."""
    import ray

    node_id = ray.get_runtime_context().get_node_id()
    node = next(n for n in ray.nodes() if n["NodeID"] == node_id)
    return next(k for k in node["Resources"] if k.startswith("node:") and k != "node:__internal_head__")


# What a resumed search may change: where it writes and on how much hardware it runs, and how many trials run at
# once. Anything else would rank trials trained under two configs as one search.
RESUMABLE = ("run", "scaling", "tune.max_concurrent_trials")


def check_same_search(base: dict, search_dir: Path) -> None:
    """Refuse a resume whose config differs from the search's own (search.yaml) in anything but RESUMABLE:
    Tune kept the finished trials, and the rest would train and be ranked under the new config."""
    saved = search_dir / SEARCH_FILE
    try:
        started = yaml.safe_load(saved.read_text())
    except (OSError, yaml.YAMLError) as exc:
        started = exc
    if not isinstance(started, dict):
        why = type(started).__name__ if isinstance(started, Exception) else "not a mapping of keys"
        raise UserError(f"{argument('resume')}: {saved} cannot be read ({why}), so the search's config is unknown; "
                        f"start a new search with another run.name")
    # The search space counts as one key: its own keys are config keys, not sections.
    if (changed := first_change(started, base, skip=RESUMABLE, whole=("tune.space",))) is not None:
        key, was, now = changed
        raise UserError(f"{argument('resume')}: {key} is {now!r}, but {was!r} in the search's own config ({saved}); "
                        f"resume with the config it started with, or start a new search with another run.name")


def check_before_data(cfg: Config, *, address: str | None = None, resume: bool = False
                      ) -> tuple[dict, list[space.Domain]]:
    """What a search can refuse before its data are read (rayscale.tune calls it before it runs a Dataset): the
    space, the address, and a resume with nothing to resume or under another config, or a new search where one
    is. Makes cfg's paths absolute; returns the config as a dict and the space's domains."""
    absolute_paths(cfg)  # before the trials' configs are made from it: each trial runs in a directory of its own
    check_output_dir(cfg)
    base = config_module.to_dict(cfg)
    domains = space.parse_space(cfg.tune.space)
    space.validate(base, domains)
    search_dir = run_directory(cfg)
    tuner_dir = search_dir / TUNE_DIR
    loopback_unless_joining(address)
    if resume:
        from ray.tune import Tuner

        if not Tuner.can_restore(str(tuner_dir)):
            raise UserError(f"{argument('resume')}: no search to resume in {search_dir} (run.output_dir / "
                            f"run.name)")
        check_same_search(base, search_dir)
    if (search_dir / CONFIG_FILE).exists() and not (search_dir / SEARCH_FILE).exists():
        raise UserError(f"run.name {cfg.run.name}: {search_dir} holds a training run ({CONFIG_FILE}); pick another "
                        f"run.name for the search")
    if not resume and tuner_dir.exists():
        add_resume = "add --resume" if argument("resume") == "--resume" else "pass resume=True"
        raise UserError(f"run.name {cfg.run.name}: {search_dir} already holds a search; {add_resume} to "
                        f"continue it or pick another run.name")
    return base, domains


def check_space_builds(base: dict, domains: list[space.Domain], spec, code: UserCode) -> None:
    """The model and optimizer every value of a model.* or optim.* key in the space gives, built once here as its
    trial's workers would build them: a value only the build refuses (a layer width of -3, AdamW betas above 1)
    passed the config's checks and failed in every trial, after Ray started."""
    for domain in domains:
        if domain.key.startswith(("model.", "optim.")):
            for value in domain.check_values():
                try:
                    check_model(space.apply(base, {domain.key: value}), spec, code)
                except UserError as exc:
                    raise UserError(f"tune.space.{domain.key}: {domain.key}={value!r} is not usable: "
                                    f"{first_line(exc)}") from None


def check_space_data(base: dict, domains: list[space.Domain], prepared: PreparedRun, code: UserCode,
                     given: Mapping[str, SourceInfo]) -> None:
    """Every trial's config against the data it would train on, checked as `rayscale train` checks a run's: a
    global batch above the training rows, more lanes than rows, or a data.* value whose data cannot be read
    passed the space's config checks, then failed in each of its trials after Ray started (exit 0, the trials
    marked error). A data.* value is prepared once, as its trials' drivers would prepare it."""
    data_keys = [domain.key for domain in domains if domain.key.startswith("data.")]
    rows_of: dict[tuple, int] = {(): prepared.train_rows}
    for sampled in space.check_points(domains):
        shown = ", ".join(f"{key}={value!r}" for key, value in sampled.items())
        try:
            data_values = tuple((key, sampled[key]) for key in data_keys if key in sampled)
            if data_values not in rows_of:
                rows_of[data_values] = prepare(space.apply(base, dict(data_values)), scope="search", code=code,
                                               given=given).train_rows
            trial = space.apply(base, sampled)
            check_training_rows(trial, plan_batches(trial.batch.global_batch_size, trial.batch.micro_batch_size,
                                                    trial.scaling.num_workers), rows_of[data_values])
        except UserError as exc:
            raise UserError(f"tune.space.{' + '.join(sampled)}: {shown} is not usable: {first_line(exc)}") from None


def search(cfg: Config, *, address: str | None = None, resume: bool = False, code: UserCode = NO_CODE,
           given: Mapping[str, SourceInfo] = NO_DATA) -> list[dict]:
    """Validate everything, run (or resume) the search, write its outputs; returns trial rows, best first.
    `code`: rayscale.tune's model=, loss=, metrics= objects, handed to every trial; `given`: its Ray Datasets'
    sources, run once here and read by every trial from the object store this process owns."""
    base, domains = check_before_data(cfg, address=address, resume=resume)
    search_dir = run_directory(cfg)
    prepared = prepare(cfg, scope="search", code=code, given=given)
    check_space_builds(base, domains, prepared.spec, code)
    check_space_data(base, domains, prepared, code, given)
    max_t = cfg.train.epochs * prepared.train_rows
    check_metric_name(cfg.tune.metric, [*cfg.train.metrics, *(name for name, _ in code.metrics)], prepared.spec.task)
    if cfg.tune.metric.startswith("val_") and prepared.val_rows == 0:
        raise UserError(f"tune.metric {cfg.tune.metric}: there is no validation data (data.val_fraction is 0 and "
                        f"data.val_source is not set)")
    warmup = space.max_value(domains, "schedule.warmup_samples", cfg.schedule.warmup_samples)
    grace = default_grace(cfg.tune.grace_samples, max_t, cfg.tune.reduction_factor, int(warmup))
    if grace > max_t:
        raise UserError(f"tune.grace_samples: {grace} (at least the longest warmup) exceeds a trial's "
                        f"{max_t} samples (train.epochs x {prepared.train_rows} rows)")
    search_alg = _search_alg(cfg)  # a missing optional package is known before any resource is claimed
    check_fits_before_start(address, cfg, prepared.parameters)
    connect(address)
    check_cluster_fits(cfg, beside=TRIAL_CPUS)  # a trial's own actor holds a sliver too
    concurrency = max_concurrent(cfg)
    search_dir.mkdir(parents=True, exist_ok=True)
    if not resume:
        (search_dir / SEARCH_FILE).write_text(yaml.safe_dump(base, sort_keys=False))
    print(f"[rayscale] search in {search_dir}: {len(domains)} keys, {cfg.tune.num_samples} samples, ASHA by "
          f"{cfg.tune.asha_variant} on "
          f"{TIME_ATTR} (max {max_t:,}, grace {grace:,}, reduction {cfg.tune.reduction_factor:g}), "
          f"{concurrency} trials at once"
          + (f", grid {cfg.tune.grid_order}" if space.grid_size(domains) > 1 else ""), flush=True)

    # run.trackers: every trial logs to the search's destinations; MLflow also gets a run for the search itself,
    # which the trials' runs nest under (its trials.csv and best_config.yaml logged at the end).
    track_to = destinations(search_dir, search=cfg.run.name)
    search_run = Tracking.start(cfg, search_dir, track_to, names=[n for n in cfg.run.trackers if n == "mlflow"])
    if search_run is not None:
        track_to = dataclasses.replace(track_to, parent_run_id=search_run.run_id("mlflow"))
    try:
        tuner = _tuner(cfg, domains, base, search_dir, grace, max_t, concurrency, search_alg, resume, code,
                       given, track_to if cfg.run.trackers else None)
        results = tuner.fit()
        # The last trials' actors are ended as the search finishes, possibly in the middle of their abort: their
        # controllers may still be dying, and able to create a group.
        for trial_dir in sorted((search_dir / TRIALS_DIR).glob("*")):
            remove_placement_groups_left(trial_dir, wait_s=CONTROLLER_EXIT_WAIT_S)
        rows = summarize(results, cfg, domains, max_t)
        write_outputs(rows, cfg, search_dir)
    except BaseException as exc:
        if search_run is not None:
            search_run.finish([], [], "KILLED" if isinstance(exc, KeyboardInterrupt) else "FAILED")
        raise
    if cfg.run.trackers:  # a trial Tune ended before its trackers: what they missed, and their end
        for row in rows:
            if row["status"] != "completed" and (search_dir / TRIALS_DIR / row["trial_id"] / CONFIG_FILE).exists():
                trial_dir = search_dir / TRIALS_DIR / row["trial_id"]
                end_cut_off(config_module.load(trial_dir / CONFIG_FILE), trial_dir, track_to,
                            "KILLED" if row["status"] == "stopped early" else "FAILED")
    if search_run is not None:
        search_run.finish([], [path for path in (search_dir / TRIALS_TABLE, search_dir / BEST_CONFIG_FILE)
                               if path.exists()])
    print_ranking(rows, cfg, domains)
    return rows


def _tuner(cfg: Config, domains: list[space.Domain], base: dict, search_dir: Path, grace: int, max_t: int,
           concurrency: int, search_alg, resume: bool, code: UserCode, given: Mapping[str, SourceInfo],
           track_to: Destinations | None):
    """The Tuner of a new search, or the one `--resume` restores from `search_dir`."""
    from ray import tune
    from ray.tune import Tuner

    from rayscale.tuning.asha import PromotingASHA, ResumableASHA
    from rayscale.tuning.release import LeftGroups

    # A trial's driver only waits on its TorchTrainer: it holds almost no CPU. It runs on this node (Ray's
    # built-in node:<ip> resource), and so does its Train controller (Train places it beside the driver): the
    # trial directories, the stop markers and the search's outputs are then all on one filesystem, on a
    # multi-node cluster too; only the workers spread out (their checkpoints go to run.storage_path).
    here = _this_node_resource()
    milestones = rung_milestones(grace, max_t, cfg.tune.reduction_factor)
    promotion = cfg.tune.asha_variant == "promotion"
    trainable = tune.with_resources(
        tune.with_parameters(_trial, base=base, search_dir=str(search_dir), metric=cfg.tune.metric,
                             eval_at_samples=milestones, promotion=promotion, code=code, given=given,
                             track_to=track_to),
        {"CPU": TRIAL_CPUS, here: trial_share(concurrency) if promotion else 0.001})
    if resume:
        return Tuner.restore(str(search_dir / TUNE_DIR), trainable, resume_unfinished=True, restart_errored=True)
    # stop_last_trials=False: a trial that reaches max_t finishes by itself and writes its outputs
    # (summary.json, model.pt), which is also how --resume recognises it as finished.
    left_groups = LeftGroups(search_dir / TRIALS_DIR)
    scheduler = PromotingASHA(time_attr=TIME_ATTR, milestones=milestones,
                              reduction_factor=cfg.tune.reduction_factor,
                              state_file=search_dir / PROMOTION_FILE, left_groups=left_groups) if promotion else \
        ResumableASHA(time_attr=TIME_ATTR, max_t=max_t, grace_period=grace,
                      reduction_factor=cfg.tune.reduction_factor, stop_last_trials=False,
                      state_file=search_dir / RUNGS_FILE, left_groups=left_groups)
    return Tuner(
        trainable,
        param_space=param_space(domains, cfg),
        tune_config=tune.TuneConfig(metric=cfg.tune.metric, mode=cfg.tune.mode, scheduler=scheduler,
                                    num_samples=cfg.tune.num_samples,
                                    # Tune counts paused trials against its limit: promotion would
                                    # deadlock once every slot waits at a rung (trial_share instead).
                                    max_concurrent_trials=None if promotion else concurrency,
                                    search_alg=search_alg,
                                    # A new trial takes the last one's actor, its imports done: 4-6 s less
                                    # between trials (benchmarks/trial_gaps.py). Nothing of a trial is
                                    # kept in it: each trial's run is its own Train run and directory.
                                    reuse_actors=True),
        # No Tune callbacks (tuning/release.py says why).
        run_config=tune.RunConfig(name=TUNE_DIR, storage_path=str(search_dir), verbose=1),
    )


def summarize(results, cfg: Config, domains: list[space.Domain], max_t: int) -> list[dict]:
    sign = 1 if cfg.tune.mode == "min" else -1
    rows = []
    for result in results:
        frame = result.metrics_dataframe
        history, samples = [], 0
        if frame is not None and TIME_ATTR in frame and len(frame):
            samples = int(frame[TIME_ATTR].max())  # how far it trained, whatever its metric did
            if RUNG_PAUSE in frame:  # PromotingASHA's pause signal repeats the rung's result
                frame = frame[frame[RUNG_PAUSE] != True]  # noqa: E712 - NaN where absent
            if cfg.tune.metric in frame:
                history = [(int(s), float(m)) for s, m in zip(frame[TIME_ATTR], frame[cfg.tune.metric],
                                                              strict=True) if m == m]  # drop NaN
        status = "error" if result.error else ("completed" if samples >= max_t else "stopped early")
        best = min((m for _, m in history), key=lambda m: sign * m) if history else None
        rows.append({
            "trial_id": (result.metrics or {}).get("trial_id") or Path(result.path).name,
            "status": status,
            **{d.key: sampled_values(result.config or {}).get(d.key) for d in domains},
            TIME_ATTR: samples,
            f"best_{cfg.tune.metric}": best,
            f"last_{cfg.tune.metric}": history[-1][1] if history else None,
            "history": history,
        })
    rows.sort(key=lambda r: (r[f"best_{cfg.tune.metric}"] is None, sign * (r[f"best_{cfg.tune.metric}"] or 0)))
    return rows


def write_outputs(rows: list[dict], cfg: Config, search_dir: Path) -> None:
    from rayscale.tools.plots import plot_tune_curves

    fields = [k for k in rows[0] if k != "history"] if rows else ["trial_id"]
    with open(search_dir / TRIALS_TABLE, "w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=fields, extrasaction="ignore")
        writer.writeheader()
        writer.writerows(rows)
    best = next((r for r in rows if r[f"best_{cfg.tune.metric}"] is not None), None)
    if best is not None:
        trial_config = yaml.safe_load((search_dir / TRIALS_DIR / best["trial_id"] / CONFIG_FILE).read_text())
        trial_config["run"].update(output_dir=cfg.run.output_dir, name=f"{cfg.run.name}-best")
        trial_config.pop("tune", None)
        (search_dir / BEST_CONFIG_FILE).write_text(
            f"# Best trial {best['trial_id']} of search {cfg.run.name}: "
            f"best {cfg.tune.metric} {best[f'best_{cfg.tune.metric}']:.4f}\n"
            f"# Train it with: rayscale train -c {search_dir / 'best_config.yaml'}\n"
            + yaml.safe_dump(trial_config, sort_keys=False))
    plot_tune_curves(rows, cfg.tune.metric, search_dir / TUNE_CURVES_FILE, title=cfg.run.name)


def print_ranking(rows: list[dict], cfg: Config, domains: list[space.Domain]) -> None:
    metric = cfg.tune.metric
    headers = ["rank", "trial", *[d.key for d in domains], f"best {metric}", "samples", "status"]
    table = [[str(i + 1), r["trial_id"], *[_short(r[d.key]) for d in domains], _short(r[f"best_{metric}"]),
              f"{r[TIME_ATTR]:,}", r["status"]] for i, r in enumerate(rows)]
    widths = [max(len(h), *(len(row[i]) for row in table)) if table else len(h) for i, h in enumerate(headers)]
    print("  ".join(h.ljust(w) for h, w in zip(headers, widths, strict=True)))
    for row in table:
        print("  ".join(c.ljust(w) for c, w in zip(row, widths, strict=True)))


def _short(value) -> str:
    if isinstance(value, float):
        return f"{value:.4g}" if math.isfinite(value) else str(value)
    return "-" if value is None else str(value)
