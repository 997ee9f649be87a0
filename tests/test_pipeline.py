"""End to end through Ray: 2 gloo workers on loopback, Ray Data input, checkpoints, resume.

Only what needs Ray itself: DDP under Train, Ray Data's order, start-up, local mode, kills and restarts. The
loop's own behaviours (OOM halving, adaptive batch, the rung pause, the NaN guard, the epoch-end line, the weight
average, accumulation) are tested without Ray in test_loop.py. One embedded Ray for the module (started the way
`rayscale train` starts it), so each test pays only for its TorchTrainer.
"""

import json
import os
import sys
import textwrap
import time
from pathlib import Path

import pytest
import torch
from committed import latest_state, registered_checkpoint

from rayscale import config
from rayscale.driver.outputs import print_summary, read_metrics
from rayscale.engine import checkpoint
from rayscale.files import GROUPS_FILE
from rayscale.launch import trainer
from rayscale.launch.connect import connect

pytestmark = pytest.mark.slow

SLOW_MODEL = textwrap.dedent('''
    """The built-in MLP, slowed down (numerics untouched) so a test can kill a worker mid-epoch; each worker
    process records its pid in $RAYSCALE_TEST_PID_DIR."""
    import os
    import sys
    import time
    from pathlib import Path

    import torch

    from rayscale.models import MLP


    class Slow(MLP):
        def forward(self, x):
            if not _on_the_driver():  # a killed pid must be a training worker's, never this test's
                Path(os.environ["RAYSCALE_TEST_PID_DIR"], str(os.getpid())).touch()
            time.sleep(0.01)
            return super().forward(x)


    def _on_the_driver():
        """The driver's try of the model on two rows before the run (rayscale/driver/prepare.py)."""
        frame = sys._getframe()
        while frame is not None and frame.f_code.co_name != "_try_user_code":
            frame = frame.f_back
        return frame is not None


    def make(**kwargs):
        return Slow(in_features=64, num_outputs=10, hidden_sizes=(256, 256))
''')


SLOW_UPLOAD = textwrap.dedent('''
    """A run.checkpoint_upload_fn that takes its time: each call sleeps UPLOAD_S, then copies the part file by
    file, and logs when it began and ended in uploads.jsonl beside the run's checkpoints. `copy_then_die_once`
    also stands for a kill in the middle of an upload: the first process to reach its third upload SIGKILLs itself
    after copying one file (once per run: a marker beside the log)."""
    import json
    import os
    import shutil
    import signal
    import time
    from pathlib import Path

    UPLOAD_S = 1.5
    uploads = 0


    def copy_then_die_once(local_dir, destination):
        global uploads
        uploads += 1
        began, target = time.time(), Path(destination)
        log = target.parent / "uploads.jsonl"
        time.sleep(UPLOAD_S)
        target.mkdir(parents=True, exist_ok=True)
        files = sorted(p for p in Path(local_dir).iterdir() if p.is_file())
        for index, path in enumerate(files):
            shutil.copyfile(path, target / path.name)
            if index == 0 and uploads == 3 and _first(target.parent / "killed"):
                with open(log, "a") as out:
                    out.write(json.dumps({"killed": str(target)}) + "\\n")
                os.kill(os.getpid(), signal.SIGKILL)
        with open(log, "a") as out:
            out.write(json.dumps({"pid": os.getpid(), "began": began, "ended": time.time()}) + "\\n")


    def _first(marker):
        try:
            os.close(os.open(marker, os.O_CREAT | os.O_EXCL))
            return True
        except FileExistsError:
            return False
''')


@pytest.fixture(scope="module")
def ray_session(tmp_path_factory):
    import ray

    plugin_dir = tmp_path_factory.mktemp("user_models")
    (plugin_dir / "slow_model.py").write_text(SLOW_MODEL)
    (plugin_dir / "slow_upload.py").write_text(SLOW_UPLOAD)
    os.environ["RAYSCALE_TEST_PID_DIR"] = str(plugin_dir / "pids")
    (plugin_dir / "pids").mkdir()
    # Workers inherit the driver's environment when the embedded Ray starts.
    os.environ["PYTHONPATH"] = os.pathsep.join([str(plugin_dir), os.environ.get("PYTHONPATH", "")])
    sys.path.insert(0, str(plugin_dir))
    ray.shutdown()
    # With its dashboard, as `rayscale train` starts it: its state API and its listening sockets are tested here.
    with pytest.MonkeyPatch.context() as env:
        env.setenv("RAYSCALE_DASHBOARD", "1")
        connect(None)
    yield plugin_dir
    ray.shutdown()


# The runs compared with the reference validate and export a weight average, so the fault tests also prove that
# its state is checkpointed and restored bit for bit.
AVERAGED = "train.ema_half_life_samples=200"


def run(tmp_path, name, *overrides):
    cfg = config.load(overrides=[f"run.output_dir={tmp_path}", f"run.name={name}", "train.epochs=2",
                                 "batch.global_batch_size=64", *overrides])
    summary = trainer.train(cfg)
    return summary, torch.load(tmp_path / name / "model.pt")


def test_local_mode_trains_and_writes_outputs_and_the_python_api_returns_the_run_and_its_model(ray_session,
                                                                                              tmp_path):
    """Through the Python API (rayscale.train): the outputs, the Result naming them, model.safetensors holding
    model.pt's weights, and rayscale.load_model rebuilding the model from the directory alone (it computes what
    the model built by hand with model.pt's weights computes)."""
    from safetensors.torch import load_file

    import rayscale
    from rayscale.data.sources import DataSpec
    from rayscale.models.factory import build_model

    result = rayscale.train({"train": {"epochs": 2}, "batch": {"global_batch_size": 64, "micro_batch_size": 16}},
                            overrides=[f"run.output_dir={tmp_path}", "run.name=local", "scaling.num_workers=0",
                                       "run.trackers=[mlflow, tensorboard, wandb]", "run.checkpoint_every_samples=512"])
    summary, run_dir = result.summary, tmp_path / "local"
    assert result.run_dir == run_dir
    # Every 512 samples and at both epoch ends: more checkpoints than the 3 kept, as under Ray Train.
    kept = list((run_dir / "checkpoints").glob("checkpoint-*"))
    assert len(kept) == 3 and checkpoint.latest_local(run_dir / "checkpoints") in kept
    for name in ("config.yaml", "metrics.jsonl", "summary.json", "model.pt", "model.safetensors", "curves.png"):
        assert (run_dir / name).stat().st_size > 0, name
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert result.metrics == records and result.final == summary["final"]
    losses = [r["train_loss"] for r in records if r["train_loss"] is not None]
    assert losses[-1] < losses[0] * 0.7  # it learned
    assert summary["samples_seen"] == 2 * summary["train_rows"]
    assert summary["rows_left_out"] == 0
    for key in ("step", "epoch", "samples_seen", "train_loss", "lr", "grad_norm", "samples_per_sec",
                "data_wait_fraction", "peak_memory_mb", "memory_mb"):
        assert key in records[0], key
    assert records[-1]["memory_mb"] > 0 and records[-1]["peak_memory_mb"] > 0
    assert 0 < summary["driver_peak_memory_mb"]
    assert records[-1]["val_accuracy"] > 0.5

    pickled = torch.load(run_dir / "model.pt")
    exported = load_file(str(run_dir / "model.safetensors"))
    assert exported.keys() == pickled.keys() and all(torch.equal(exported[k], pickled[k]) for k in pickled)
    spec = summary["data_spec"]
    by_hand = build_model(config.load().model, DataSpec(spec["task"], tuple(spec["input_shape"]), spec["num_outputs"]))
    by_hand.load_state_dict(pickled)
    loaded = result.load_model()
    x = torch.randn(5, *spec["input_shape"])
    assert torch.equal(loaded(x), by_hand.eval()(x)) and not loaded.training

    # run.trackers, followed on the driver while Ray Train ran (tests/test_tracking.py reads every field back).
    from mlflow import MlflowClient
    from tracker_records import expected_points, mlflow_points, tensorboard_points, wandb_run

    client = MlflowClient(f"sqlite:///{run_dir / 'mlflow.db'}")
    (tracked,) = client.search_runs([client.get_experiment_by_name("rayscale").experiment_id])
    assert tracked.info.status == "FINISHED" and tracked.info.run_name == "local"
    expected = expected_points(records)
    assert mlflow_points(client, tracked.info.run_id, "val_loss") == expected["val_loss"]
    assert {a.path for a in client.list_artifacts(tracked.info.run_id)} >= {"model.safetensors", "model.pt"}
    assert [step for step, _ in tensorboard_points(run_dir / "tensorboard")["train_loss"]] == \
        [step for step, _ in expected["train_loss"]]
    assert dict(wandb_run(run_dir)["points"]["val_accuracy"]) == dict(expected["val_accuracy"])


def test_local_mode_resumes_a_crashed_run_from_its_run_directory_and_a_finished_one_trains_nothing(ray_session,
                                                                                                  tmp_path):
    """Local mode keeps its checkpoints in the run directory, where Ray Train does not look: crashed in epoch 2
    and started again, the run resumes from epoch 1's checkpoint there and ends with the uninterrupted model, bit
    for bit; started once more, it trains nothing."""
    def local(name, crash_after):
        return run(tmp_path, name, "scaling.num_workers=0", "batch.micro_batch_size=16",
                   "run.checkpoint_every_seconds=0", "model.name=loop_models:crash_once",
                   f"model.kwargs={{after: {crash_after}, marker: {tmp_path / name}.marker}}")

    _, whole = local("whole", 10**9)
    with pytest.raises(RuntimeError, match="injected crash"):
        local("crashed", 92 + 40)  # 23 steps of 4 micro-batches an epoch: 40 forwards into epoch 2
    summary, resumed = local("crashed", 92 + 40)
    assert summary["restarts"] == 1 and summary["samples_seen"] == 2 * summary["train_rows"]
    # Resumed, not retrained from scratch (which gives the same model): the final checkpoint counts one restore.
    assert latest_state((tmp_path / "crashed" / "checkpoints").glob("checkpoint-*")).train_state.resumes == 1
    assert all(torch.equal(whole[k], resumed[k]) for k in whole)
    # Finished: started again it trains nothing, starts no worker and counts no restart (it counted one, a
    # fault's, and wrote over the summary's wall time): its summary is the one the run wrote.
    written = (tmp_path / "crashed" / "summary.json").read_text()
    again, model = local("crashed", 92 + 40)
    assert again == json.loads(written) and (tmp_path / "crashed" / "summary.json").read_text() == written
    assert all(torch.equal(whole[k], model[k]) for k in whole)


@pytest.fixture(scope="module")
def reference(ray_session, tmp_path_factory):
    """Two workers, micro-batch 8 of a global 64 (4 accumulation steps per worker). Through rayscale.train with
    two validation metrics handed in as objects no worker could import (a lambda defined here, a torchmetrics
    object): they travel pickled, and validating them changes nothing in training."""
    from torchmetrics.classification import MulticlassAccuracy

    import rayscale

    tmp = tmp_path_factory.mktemp("reference")
    result = rayscale.train(
        {"train": {"epochs": 2, "ema_half_life_samples": 200},
         "batch": {"global_batch_size": 64, "micro_batch_size": 8}},
        overrides={"run.output_dir": str(tmp), "run.name": "micro8", "run.checkpoint_every_samples": 320},
        metrics={"hit": lambda output, batch: (output.argmax(dim=-1) == batch["y"]).float(),
                 "micro_accuracy": MulticlassAccuracy(10, average="micro")})
    return tmp, result.summary, torch.load(result.run_dir / "model.pt")


def test_metric_objects_reach_both_workers_and_reduce_over_them(reference):
    _, summary, _ = reference
    final = summary["final"]
    assert final["val_hit"] == final["val_accuracy"]  # the same sums, all-reduced with val_loss
    assert final["val_micro_accuracy"] == pytest.approx(final["val_accuracy"], abs=1e-6)  # torchmetrics' sync
    assert set(summary["python_objects"]) == {"metrics.hit", "metrics.micro_accuracy"}


def test_two_workers_learn_and_count_every_row(reference):
    tmp, summary, _ = reference
    assert summary["world_size"] == 2
    assert summary["batch_plan"]["accumulation_steps"] == 4
    assert summary["samples_seen"] == 2 * summary["train_rows"]  # the partial last step is trained too
    assert summary["final"]["val_accuracy"] > 0.8
    # The noise scale's small batch is each worker's share (the DDP hook): measured from the first log line.
    logged = [r for r in read_metrics(Path(summary["run_dir"])) if not r.get("evaluation")]
    assert logged and all(r["gradient_noise_scale"] > 0 for r in logged)
    assert all(r["critical_batch_size"] == round(r["gradient_noise_scale"]) for r in logged)
    assert all(0 < r["batch_efficiency"] < 1 for r in logged)  # base batch: the micro-batch, 8 < 64


def test_two_workers_validate_their_own_shards_and_reduce_to_one_processs_metrics(reference):
    """Under Train each worker streams only its shard of the validation split (val_0, val_1 from Ray Data): the
    reduced accuracy is exactly the whole split's in one process, the loss equal within fp32 rounding."""
    from inprocess import whole_split_metrics

    _, summary, exported = reference
    whole = whole_split_metrics(Path(summary["run_dir"]), exported)  # the weight average: what was validated
    assert summary["final"]["val_accuracy"] == whole["val_accuracy"]
    assert summary["final"]["val_loss"] == pytest.approx(whole["val_loss"], rel=1e-6)


def test_start_up_splits_into_phases_that_add_up_to_it(reference, capsys):
    """Ray was already up (the session's): launch and worker setup are the rest, each measured."""
    _, summary, _ = reference
    phases = summary["startup_phases_s"]
    assert set(phases) == {"prepare", "connect", "launch", "worker_setup"}
    assert all(value is not None and value >= 0 for value in phases.values())
    assert phases["launch"] > 0 and phases["worker_setup"] > 0
    assert sum(phases.values()) == pytest.approx(summary["startup_time_s"], abs=0.01)
    assert json.loads((Path(summary["run_dir"]) / "summary.json").read_text())["startup_phases_s"] == phases
    print_summary(summary)
    assert f"worker setup {phases['worker_setup']:.1f}" in capsys.readouterr().out


def test_the_embedded_ray_starts_no_preemption_watcher_and_no_run_starts_unused_actors(reference):
    """One node has no drains to watch: the reference run's controller started no PreemptionWatcher actor
    (connect turns it off for the embedded Ray; ~7 CPU-seconds a run). No run starts Train's DatasetManager (it
    is given no datasets) or its PlacementGroupCleaner (rayscale removes the groups a run left itself); no fixed
    run on the embedded Ray, which has no autoscaler, starts the AutoscalingCoordinator it would ask for resources;
    and the embedded Ray's raylet starts no idle Python workers as the driver connects. Its job has no runtime
    environment."""
    import ray
    from ray.util.state import list_actors

    # This process's Ray by address: the other xdist worker's Ray runs on this machine too.
    address = ray.get_runtime_context().gcs_address
    classes = {actor.class_name for actor in list_actors(address=address, limit=10_000)}  # dead ones included
    assert "TrainController" in classes and "RayTrainWorker" in classes
    assert "PreemptionWatcher" not in classes
    assert not classes & {"DatasetManager", "PlacementGroupCleaner", "_AutoscalingCoordinatorActor"}
    raylet = ray._private.worker._global_node.all_processes["raylet"][0].process.pid
    environment = Path(f"/proc/{raylet}/environ").read_bytes().split(b"\0")
    assert b"RAY_prestart_worker_first_driver=0" in environment
    # Its workers get the Ray's own address from the raylet, not from a runtime environment (with which every
    # worker process would start through Ray's runtime-environment setup first).
    assert f"RAY_ADDRESS={address}".encode() in environment and not ray.get_runtime_context().runtime_env
    from ray.util.placement_group import placement_group_table

    _, summary, _ = reference
    groups = [json.loads(line)["placement_group"] for line in
              (Path(summary["run_dir"]) / GROUPS_FILE).read_text().splitlines()]
    table = placement_group_table()
    assert groups and all(table[group]["state"] == "REMOVED" for group in groups)


def test_a_run_that_diverged_ends_at_once_instead_of_being_retried(ray_session, tmp_path):
    """A run whose loss stays non-finite (train.max_nonfinite_steps) diverges again from its last checkpoint:
    it ends after its first worker group with the workers' own line, where Train's failure policy retried it
    run.max_failures times (4 groups, 230 lines of tracebacks)."""
    from rayscale.errors import NonFiniteError

    cfg = config.load(overrides=[f"run.output_dir={tmp_path}", "run.name=diverged", "train.epochs=1",
                                 "optim.lr=1e30", "scaling.num_workers=1", "run.max_failures=3"])
    with pytest.raises(NonFiniteError, match=r"^non-finite loss or gradients at step \d+: 5 steps in a row were "
                                             r"skipped \(train.max_nonfinite_steps=5\); lower optim.lr"):
        trainer.train(cfg)
    groups = (tmp_path / "diverged" / GROUPS_FILE).read_text().splitlines()
    assert [json.loads(line)["cause"] for line in groups] == ["start"]


def test_a_loss_that_breaks_its_contract_in_the_workers_ends_the_run_in_its_line(ray_session, tmp_path):
    """A loss that passed the driver's two-row check and returned three losses for a micro-batch of 32 in the
    workers: a UserError there ends the run after its first worker group, in one line naming train.loss, where
    Train retried it run.max_failures times and ended in its own traceback."""
    import torch

    import rayscale

    def first_three(output, batch):
        return torch.nn.functional.cross_entropy(output, batch["y"], reduction="none")[:3]

    with pytest.raises(rayscale.UserError, match=r"^train.loss: returned losses of shape \(3,\); expected one per "
                                                 r"sample \(32,\)"):
        rayscale.train(overrides=[f"run.output_dir={tmp_path}", "run.name=contract", "train.epochs=1",
                                  "scaling.num_workers=1", "batch.micro_batch_size=32"], loss=first_three)
    groups = (tmp_path / "contract" / GROUPS_FILE).read_text().splitlines()
    assert [json.loads(line)["cause"] for line in groups] == ["start"]


def test_embedded_ray_listens_on_loopback_only(ray_session):
    """Every server the embedded Ray started (GCS, raylet, object manager, dashboard, agents) is on 127.0.0.1."""
    listening = _listening_in_this_ray()
    assert len(listening) >= 3, listening  # at least the GCS, the raylet and the dashboard
    _assert_loopback_only(listening)


def _listening_in_this_ray() -> list[str]:
    """`ss` lines of the sockets listened on by the embedded Ray this process started (its descendants)."""
    import subprocess

    from test_cluster import _processes, _with_descendants

    mine = _with_descendants({os.getpid()}, _processes())
    sockets = subprocess.run(["ss", "-Htlnp"], capture_output=True, text=True, check=True).stdout.splitlines()
    return [line for line in sockets if any(f"pid={pid}," in line for pid in mine - {os.getpid()})]


def _assert_loopback_only(listening: list[str]) -> None:
    for line in listening:
        assert line.split()[3].startswith(("127.0.0.1:", "[::ffff:127.0.0.1]:")), line


def _train_until_first_checkpoint(tmp_path, name: str, *overrides: str):
    """Start `run` in a thread with the slow model; return once its first checkpoint exists and a few steps
    more (still inside epoch 1) have run: (thread, outcome dict, pid directory)."""
    import threading

    pid_dir = Path(os.environ["RAYSCALE_TEST_PID_DIR"])
    for stale in pid_dir.iterdir():
        stale.unlink()
    outcome = {}

    def train() -> None:
        try:
            outcome["result"] = run(tmp_path, name, "batch.micro_batch_size=8", "run.checkpoint_every_samples=320",
                                    "model.name=slow_model:make", AVERAGED, *overrides)
        except BaseException as exc:  # noqa: BLE001 - the test reports it
            outcome["error"] = exc

    thread = threading.Thread(target=train)
    thread.start()
    deadline = time.time() + 300
    while time.time() < deadline and not list((tmp_path / name / "checkpoints").glob("checkpoint_*")):
        assert thread.is_alive(), outcome
        time.sleep(0.05)
    time.sleep(0.3)  # a few steps past the checkpoint at 320 samples, still inside epoch 1 (~23 steps of 40+ ms)
    return thread, outcome, pid_dir


def test_killed_driver_rerun_resumes_from_storage_path_and_matches_bitwise(reference, ray_session, tmp_path):
    """SIGKILL to a `rayscale train` driver, by pid, mid-run. It joined this module's Ray (as a job on a cluster
    would), kept its checkpoints in run.storage_path, and its run directory's metrics.jsonl is deleted too (as
    when rank 0 ran on another node). Its Train controller and workers die with it, giving their CPUs back;
    running the same command again resumes from the latest checkpoint, brings the log back from it, and ends
    with the uninterrupted run's model, bit for bit.

    Its config differs from the reference's in what must not change the model: it also validates mid-epoch, and
    streams every epoch from Ray Data (the reference replays epochs 2+ from each worker's cache). So the same
    model also says that validation touches no training state and that the cache replays Ray Data's order; and
    the validations are reported where they fall, across the kill too."""
    import signal
    import subprocess

    import ray

    _, expected_summary, expected = reference
    store = tmp_path / "store"
    command = [sys.executable, "-m", "rayscale.cli", "train", "--address", ray.get_runtime_context().gcs_address,
               "--set", f"run.output_dir={tmp_path}", "--set", "run.name=driver", "--set", "train.epochs=2",
               "--set", "batch.global_batch_size=64", "--set", "batch.micro_batch_size=8",
               "--set", "run.checkpoint_every_samples=320", "--set", "model.name=slow_model:make",
               "--set", f"run.storage_path={store}", "--set", "train.log_every_samples=128", "--set", AVERAGED,
               "--set", "train.eval_every_samples=400", "--set", "data.cache_mb=0"]
    log = open(tmp_path / "first.log", "w")
    driver = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT)
    deadline = time.time() + 300
    while time.time() < deadline and not registered_checkpoint(store / "driver"):
        assert driver.poll() is None, (tmp_path / "first.log").read_text()[-3000:]
        time.sleep(0.05)
    os.kill(driver.pid, signal.SIGKILL)  # a committed checkpoint must survive this; one still uploading need not
    driver.wait(timeout=30)
    assert not (tmp_path / "driver" / "summary.json").exists()
    assert not (tmp_path / "driver" / "checkpoints").exists()  # they are in run.storage_path
    deadline = time.time() + 60  # the killed driver's actors are gone: every CPU is free again
    while time.time() < deadline and ray.available_resources().get("CPU", 0) < ray.cluster_resources()["CPU"]:
        time.sleep(0.5)
    assert ray.available_resources().get("CPU", 0) == ray.cluster_resources()["CPU"]
    (tmp_path / "driver" / "metrics.jsonl").unlink()

    again = subprocess.run(command, capture_output=True, text=True, timeout=600)
    assert again.returncode == 0, again.stdout[-3000:] + again.stderr[-3000:]
    # It resumed (not retrained from scratch, which would give the same model): the final checkpoint's progress
    # counts one restore. (The worker's "resuming at epoch" line can reach this driver's stdout after it exits.)

    assert latest_state(p for p in (store / "driver").glob("checkpoint_*") if p.is_dir()).train_state.resumes == 1
    summary = json.loads((tmp_path / "driver" / "summary.json").read_text())
    assert summary["samples_seen"] == expected_summary["samples_seen"]
    model = torch.load(tmp_path / "driver" / "model.pt")
    assert all(torch.equal(expected[k], model[k]) for k in expected)
    records = read_metrics(tmp_path / "driver")
    samples = [r["samples_seen"] for r in records]
    assert samples == sorted(samples)  # lines after the checkpoint were replaced, not duplicated
    assert samples[0] <= 128  # the lines from before the kill came back with the checkpoint

    # Validated after the first step at or past each multiple of 400, unless that step ends an epoch (the epoch
    # end validates anyway); each once, the ones before the kill included.
    mid = [r for r in records if r.get("evaluation") and not r.get("epoch_end")]
    rows = expected_summary["train_rows"]
    step_ends = [epoch * rows + min(k * 64, rows) for epoch in (0, 1) for k in range(1, -(-rows // 64) + 1)]
    crossings = [next(end for end in step_ends if end >= point) for point in range(400, 2 * rows, 400)]
    assert [r["samples_seen"] for r in mid] == [end for end in crossings if end % rows]
    assert all(0 < r["val_loss"] < 10 and 0 <= r["val_accuracy"] <= 1 for r in mid)
    assert sum(bool(r.get("epoch_end") and r.get("evaluation")) for r in records) == 2


def _new_pid(pid_dir: Path, seen: set[int], timeout: float) -> int | None:
    """The pid of a worker process that was not in `seen` once it runs a forward pass, or None on timeout."""
    deadline = time.time() + timeout
    while time.time() < deadline:
        fresh = {int(p.name) for p in pid_dir.iterdir()} - seen
        if fresh:
            return min(fresh)
        time.sleep(0.02)
    return None


def test_a_worker_killed_inside_a_slow_upload_then_one_frozen_restart_from_checkpoints_and_match_bitwise(
        reference, ray_session, tmp_path):
    """Checkpoints uploaded in the background (run.checkpoint_upload async, the default) by an upload function
    that sleeps 1.5 s per part: training steps on while each part uploads, and a checkpoint holds the ranks up
    only for its local write. Then two real faults in one run, mid-epoch:
    a worker SIGKILLs itself in the middle of its third upload (Ray never registers that checkpoint, and its
    half-copied part is never restored): the group restarts from the previous whole checkpoint by itself;
    then SIGSTOP to a worker of the new group: after run.hang_timeout_s its peer's collective fails and the group
    restarts again (the frozen process is killed with it).
    The run ends with the uninterrupted run's model, bit for bit: no sample lost or trained twice across either."""
    import signal

    from rayscale.engine import checkpoint

    _, expected_summary, expected = reference
    # 20 s: short for a test, long enough that a loaded 2-core machine does not time out a healthy step.
    thread, outcome, pid_dir = _train_until_first_checkpoint(
        tmp_path, "faults", "run.hang_timeout_s=20", "run.checkpoint_upload_fn=slow_upload:copy_then_die_once",
        "train.log_every_samples=64")
    # While the 2 workers train, their process group's store and gloo's connections listen on 127.0.0.1 too
    # (torch's own store, as Ray Train's backend set it up, listened on every interface of rank 0's node).
    listening = _listening_in_this_ray()
    assert any("RayTrainWo" in line for line in listening), listening
    _assert_loopback_only(listening)
    seen = {int(p.name) for p in pid_dir.iterdir()}
    uploads_log = tmp_path / "faults" / "checkpoints" / "uploads.jsonl"
    deadline = time.time() + 180
    while time.time() < deadline and '"killed"' not in (uploads_log.read_text() if uploads_log.exists() else ""):
        time.sleep(0.05)
    frozen = _new_pid(pid_dir, seen, timeout=180)  # the restarted group trains: freeze one of its workers
    assert frozen is not None and thread.is_alive(), outcome
    os.kill(frozen, signal.SIGSTOP)
    frozen_at = time.time()
    try:
        seen = {int(p.name) for p in pid_dir.iterdir()} | {frozen}
        recovered = _new_pid(pid_dir, seen, timeout=180)  # a worker of the third group trains
        recovered_after = time.time() - frozen_at
        thread.join(timeout=600)
    finally:
        if os.path.exists(f"/proc/{frozen}"):  # never leave a stopped process behind
            os.kill(frozen, signal.SIGKILL)
    assert "error" not in outcome, outcome.get("error")
    assert recovered is not None and recovered_after < 20 + 90, recovered_after  # the timeout, then a restart
    summary, model = outcome["result"]
    assert summary["fault_restarts"] >= 2
    assert summary["samples_seen"] == expected_summary["samples_seen"]
    assert all(torch.equal(expected[k], model[k]) for k in expected)
    lines = [r for r in read_metrics(tmp_path / "faults") if not r.get("evaluation")]
    assert [r["samples_seen"] for r in lines] == sorted(r["samples_seen"] for r in lines)

    log = [json.loads(line) for line in uploads_log.read_text().splitlines()]
    killed = [Path(entry["killed"]) for entry in log if "killed" in entry]
    assert len(killed) == 1
    if killed[0].exists():  # Ray deletes only the checkpoints it registered: this one it never did
        with pytest.raises(checkpoint.IncompleteCheckpoint):
            checkpoint.verify(killed[0])
    # Steps went on while parts uploaded: log lines of later steps were written inside upload windows.
    uploads = [entry for entry in log if "began" in entry]
    during = {line["step"] for line in lines for upload in uploads
              if upload["began"] < line["started_at"] + line["time"] < upload["ended"]}
    assert len(during) >= 3, (during, uploads)
    # A checkpoint held the ranks up for its local write (and the wait for the slower rank at its barrier), not
    # for the 1.5 s its upload slept: a synchronous upload would take at least that every time.
    held = sorted(line["checkpoint_s"] for line in lines if line["checkpoint_s"] > 0)
    assert held and held[len(held) // 2] < 0.5, held


def test_rayscale_tune_ranks_trials_by_a_metric_handed_in_as_an_object_on_a_ray_dataset(ray_session, tmp_path):
    """The digits as a Ray Dataset (run once by the search, read by every trial) and a metric as a lambda."""
    import numpy as np
    import pyarrow as pa
    import ray.data
    from sklearn.datasets import load_digits

    import rayscale

    digits = load_digits()
    pixels = pa.FixedSizeListArray.from_arrays(pa.array((digits.data / 16).astype(np.float32).ravel()), 64)
    table = pa.table({"pixels": pixels, "digit": digits.target.astype(np.int64)})
    search = rayscale.tune(
        {"tune": {"num_samples": 1, "max_concurrent_trials": 1, "metric": "val_hit", "mode": "max",
                  "space": {"optim.lr": {"grid": [0.0001, 0.3]}}, "grid_order": "listed"}},
        overrides={"run.output_dir": str(tmp_path), "run.name": "by_hit", "scaling.num_workers": 1,
                   "train.epochs": 1, "data.features": ["pixels"], "data.label": "digit",
                   "run.trackers": ["mlflow", "tensorboard", "wandb"]},
        metrics={"hit": lambda output, batch: (output.argmax(dim=-1) == batch["y"]).float()},
        train_data=ray.data.from_arrow(table))
    assert [float(trial["optim.lr"]) for trial in search.trials] == [0.3, 0.0001]  # best val_hit first
    assert float(search.best["best_val_hit"]) > 0.5 and search.best_config_path.is_file()

    # run.trackers: one tracker run per trial, grouped by the search. MLflow: one store and experiment for the
    # search, its own run with each trial's nested under it; TensorBoard: a directory per trial under the
    # search's; W&B: one group.
    from mlflow import MlflowClient
    from tracker_records import expected_points, mlflow_points, tensorboard_points, wandb_run

    search_dir = tmp_path / "by_hit"
    client = MlflowClient(f"sqlite:///{search_dir / 'mlflow.db'}")
    runs = client.search_runs([client.get_experiment_by_name("by_hit").experiment_id])
    (parent,) = [run for run in runs if run.info.run_name == "by_hit"]
    trials = {run.info.run_name: run for run in runs if run is not parent}
    assert trials.keys() == {trial["trial_id"] for trial in search.trials}
    assert parent.info.status == "FINISHED" and {a.path for a in client.list_artifacts(parent.info.run_id)} == {
        "trials.csv", "best_config.yaml"}
    for trial_id, run in trials.items():
        trial_dir = search_dir / "trials" / trial_id
        assert run.data.tags["mlflow.parentRunId"] == parent.info.run_id
        assert run.data.tags["rayscale.search"] == "by_hit" and run.info.status == "FINISHED"
        assert float(run.data.params["optim.lr"]) in (0.3, 0.0001)
        expected = expected_points(read_metrics(trial_dir))
        assert mlflow_points(client, run.info.run_id, "val_hit") == expected["val_hit"]
        assert len(tensorboard_points(trial_dir / "tensorboard")["val_hit"]) == len(expected["val_hit"])
        (wandb_meta,) = wandb_run(trial_dir)["runs"]
        assert wandb_meta.run_group == "by_hit" and wandb_meta.display_name == trial_id
    assert sorted(p.parent.parent.name for p in search_dir.glob("trials/*/tensorboard/events.*")) == sorted(trials)


def test_predict_writes_every_row_with_the_models_prediction_in_order_and_needs_no_label(ray_session, tmp_path,
                                                                                        monkeypatch):
    """rayscale predict over Ray Data: two actors holding the model, rows from three row groups written in
    their order, predictions equal to the model applied by hand; the label column is not needed. The data is
    named by a path relative to where predict was called (this Ray's processes started elsewhere)."""
    import numpy as np
    import pyarrow as pa
    import pyarrow.parquet as pq
    import ray
    from inprocess import train as train_in_process
    from parquet_fixtures import tabular, tabular_x, write

    import rayscale

    source = write(tmp_path / "train.parquet", tabular(0, 600), row_group_size=200)
    run = train_in_process(tmp_path, "p", "train.epochs=1", "batch.global_batch_size=64", f"data.source={source}",
                           "data.features=[a, b]", "model.kwargs={hidden_sizes: [16]}", "optim.lr=0.01")
    unlabelled = write(tmp_path / "new.parquet", tabular(1000, 300).drop_columns(["label"]), row_group_size=100)
    monkeypatch.chdir(tmp_path)
    out = rayscale.predict(run.run_dir, "new.parquet", "out", workers=2)
    assert out == tmp_path / "out"
    table = pa.concat_tables([pq.read_table(path) for path in sorted(out.glob("*.parquet"))])
    ids = np.arange(1000, 1300)
    assert table.column("a").to_pylist() == (ids * 0.5).tolist()  # every row, in order, its columns kept
    with torch.no_grad():
        logits = rayscale.load_model(run.run_dir)(torch.from_numpy(tabular_x(ids)))
    assert table.column("prediction").to_pylist() == logits.argmax(dim=1).tolist()
    probabilities = torch.tensor(table.column("probabilities").to_pylist())
    assert torch.allclose(probabilities, torch.softmax(logits, dim=1), atol=1e-6)
    # The same rows as a ray.data.Dataset (one made in this process, split in blocks its own way): the same file.
    from_dataset = rayscale.predict(run.run_dir, ray.data.from_arrow(pq.read_table(unlabelled)).repartition(3),
                                    tmp_path / "from_dataset", workers=2)
    assert pa.concat_tables([pq.read_table(path) for path in sorted(from_dataset.glob("*.parquet"))]).equals(table)
    with pytest.raises(rayscale.UserError, match=r"^data: column 'b' \(an input of the run\) not in the Dataset "
                                                 r"\(columns: a, w\)$"):
        rayscale.predict(run.run_dir, ray.data.from_items([{"a": 1.0, "w": 2.0}]), tmp_path / "narrow")
    with pytest.raises(rayscale.UserError, match="^data: the Dataset has no rows; nothing to predict$"):
        rayscale.predict(run.run_dir, ray.data.from_arrow(pq.read_table(unlabelled)).limit(0), tmp_path / "none")
    assert not (tmp_path / "narrow").exists() and not (tmp_path / "none").exists()
    with pytest.raises(rayscale.UserError, match="^output: .* already exists and is not an empty directory"):
        rayscale.predict(run.run_dir, unlabelled, out)
    with pytest.raises(rayscale.UserError, match="^output: .* is the working directory or holds it"):
        rayscale.predict(run.run_dir, unlabelled, ".")
    cpus = int(ray.cluster_resources()["CPU"])  # more model actors than CPUs would wait for one forever
    with pytest.raises(rayscale.UserError, match=f"^workers {cpus}: the cluster has {cpus} CPUs"):
        rayscale.predict(run.run_dir, unlabelled, tmp_path / "more", workers=cpus)
    assert not (tmp_path / "more").exists()
    assert not list(tmp_path.glob(".out.partial-*"))
