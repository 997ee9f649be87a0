"""End to end through Ray: 2 gloo workers on loopback, Ray Data input, checkpoints, resume.

One embedded Ray for the module (started the way `rayscale train` starts it), so each test pays only for
its TorchTrainer.
"""

import json
import os
import sys
import textwrap
import time

import pytest
import torch

from rayscale import config, trainer

pytestmark = pytest.mark.slow

FAULTY_MODEL = textwrap.dedent('''
    """A built-in MLP whose forward raises once, the first time a marker file exists at a given call."""
    import os

    from rayscale.models import MLP


    class FailOnce(MLP):
        calls = 0

        def forward(self, x):
            FailOnce.calls += 1
            marker = os.environ["RAYSCALE_TEST_FAIL_MARKER"]
            if FailOnce.calls == int(os.environ["RAYSCALE_TEST_FAIL_AT_CALL"]) and os.path.exists(marker):
                os.remove(marker)
                raise RuntimeError("injected failure")
            return super().forward(x)


    def make(**kwargs):
        return FailOnce(in_features=64, num_outputs=10, hidden_sizes=(256, 256))
''')


SLOW_MODEL = textwrap.dedent('''
    """The built-in MLP, slowed down (numerics untouched) so a test can kill a worker mid-epoch; each worker
    process records its pid in $RAYSCALE_TEST_PID_DIR."""
    import os
    import time
    from pathlib import Path

    from rayscale.models import MLP


    class Slow(MLP):
        def forward(self, x):
            Path(os.environ["RAYSCALE_TEST_PID_DIR"], str(os.getpid())).touch()
            time.sleep(0.02)
            return super().forward(x)


    def make(**kwargs):
        return Slow(in_features=64, num_outputs=10, hidden_sizes=(256, 256))
''')


@pytest.fixture(scope="module")
def ray_session(tmp_path_factory):
    import ray

    plugin_dir = tmp_path_factory.mktemp("user_models")
    (plugin_dir / "faulty_model.py").write_text(FAULTY_MODEL)
    (plugin_dir / "slow_model.py").write_text(SLOW_MODEL)
    os.environ["RAYSCALE_TEST_PID_DIR"] = str(plugin_dir / "pids")
    (plugin_dir / "pids").mkdir()
    marker = plugin_dir / "fail.marker"
    # Workers inherit the driver's environment when the embedded Ray starts.
    os.environ["PYTHONPATH"] = os.pathsep.join([str(plugin_dir), os.environ.get("PYTHONPATH", "")])
    os.environ["RAYSCALE_TEST_FAIL_MARKER"] = str(marker)
    # Micro-batch 8 of 32 rows per worker: 4 forwards a step, so call 32 is step 8 of epoch 1, after the
    # checkpoint at 320 samples (step 5): the restart must resume mid-epoch, not from scratch.
    os.environ["RAYSCALE_TEST_FAIL_AT_CALL"] = "32"
    sys.path.insert(0, str(plugin_dir))
    ray.shutdown()
    trainer.connect(None, config.load())
    yield marker
    ray.shutdown()


def run(tmp_path, name, *overrides):
    cfg = config.load(overrides=[f"run.output_dir={tmp_path}", f"run.name={name}", "train.epochs=2",
                                 "batch.global_batch_size=64", *overrides])
    summary = trainer.train(cfg)
    return summary, torch.load(tmp_path / name / "model.pt")


def test_local_mode_trains_and_writes_outputs(ray_session, tmp_path):
    summary, _ = run(tmp_path, "local", "scaling.num_workers=0", "batch.micro_batch_size=16")
    run_dir = tmp_path / "local"
    for name in ("config.yaml", "metrics.jsonl", "summary.json", "model.pt", "curves.png"):
        assert (run_dir / name).stat().st_size > 0, name
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    losses = [r["train_loss"] for r in records if r["train_loss"] is not None]
    assert losses[-1] < losses[0] * 0.7  # it learned
    assert summary["samples_seen"] == 2 * summary["train_rows"]
    assert summary["rows_left_out"] == 0
    for key in ("step", "epoch", "samples_seen", "train_loss", "lr", "grad_norm", "samples_per_sec",
                "data_wait_fraction", "peak_memory_mb"):
        assert key in records[0], key
    assert records[-1]["val_accuracy"] > 0.5


@pytest.fixture(scope="module")
def reference(ray_session, tmp_path_factory):
    """Two workers, micro-batch 8 of a global 64 (4 accumulation steps per worker)."""
    tmp = tmp_path_factory.mktemp("reference")
    summary, model = run(tmp, "micro8", "batch.micro_batch_size=8", "run.checkpoint_every_samples=320")
    return tmp, summary, model


def test_two_workers_learn_and_count_every_row(reference):
    tmp, summary, _ = reference
    assert summary["world_size"] == 2
    assert summary["batch_plan"]["accumulation_steps"] == 4
    assert summary["samples_seen"] == 2 * summary["train_rows"]  # the partial last step is trained too
    assert summary["final"]["val_accuracy"] > 0.8


def test_same_config_and_seed_give_a_bitwise_identical_model(reference, tmp_path):
    _, _, model = reference
    _, again = run(tmp_path, "again", "batch.micro_batch_size=8", "run.checkpoint_every_samples=320")
    assert all(torch.equal(model[k], again[k]) for k in model)


def test_mid_epoch_validation_is_reported_and_leaves_training_unchanged(reference, tmp_path):
    _, summary, model = reference
    _, evaluated = run(tmp_path, "evaluated", "batch.micro_batch_size=8", "run.checkpoint_every_samples=320",
                       "train.eval_every_samples=400")
    assert all(torch.equal(model[k], evaluated[k]) for k in model)  # validation touches no training state
    records = trainer.read_metrics(tmp_path / "evaluated")
    mid = [r for r in records if r.get("evaluation") and not r.get("epoch_end")]
    rows = summary["train_rows"]
    # Validated after the first step at or past each multiple of 400, unless that step ends an epoch (the
    # epoch end validates anyway).
    step_ends = [epoch * rows + min(k * 64, rows) for epoch in (0, 1) for k in range(1, -(-rows // 64) + 1)]
    crossings = [next(end for end in step_ends if end >= point) for point in range(400, 2 * rows, 400)]
    assert [r["samples_seen"] for r in mid] == [end for end in crossings if end % rows]
    assert all(0 < r["val_loss"] < 10 and 0 <= r["val_accuracy"] <= 1 for r in mid)
    assert sum(bool(r.get("epoch_end") and r.get("evaluation")) for r in records) == 2


def test_two_workers_micro_batch_size_does_not_change_the_model(reference, tmp_path):
    _, _, micro8 = reference
    _, micro32 = run(tmp_path, "micro32", "batch.micro_batch_size=32")  # no accumulation at 2 workers
    for key in micro8:
        assert torch.allclose(micro8[key], micro32[key], rtol=1e-4, atol=1e-5), key
    assert any(not torch.equal(micro8[k], micro32[k]) for k in micro8)  # different sums, same maths


def test_one_worker_micro_64_vs_8_at_global_64_and_bitwise_repeat(ray_session, tmp_path):
    _, full = run(tmp_path, "w1_micro64", "scaling.num_workers=1", "batch.micro_batch_size=64")
    _, accumulated = run(tmp_path, "w1_micro8", "scaling.num_workers=1", "batch.micro_batch_size=8")
    for key in full:
        assert torch.allclose(full[key], accumulated[key], rtol=1e-4, atol=1e-5), key
    _, repeat = run(tmp_path, "w1_micro8_again", "scaling.num_workers=1", "batch.micro_batch_size=8")
    assert all(torch.equal(accumulated[k], repeat[k]) for k in accumulated)


def test_failed_worker_restarts_from_checkpoint_and_matches(reference, ray_session, tmp_path):
    """A worker raises mid-epoch; FailureConfig restarts the group from the mid-epoch checkpoint."""
    _, _, expected = reference
    ray_session.write_text("fail once")
    summary, model = run(tmp_path, "retried", "batch.micro_batch_size=8", "run.checkpoint_every_samples=320",
                         "model.name=faulty_model:make", "run.max_failures=1")
    assert not ray_session.exists()  # the failure really happened
    assert summary["restarts"] == 1
    assert all(torch.equal(expected[k], model[k]) for k in expected)


def test_rerunning_the_same_command_resumes_from_storage_path(reference, ray_session, tmp_path):
    """Re-run resume, with checkpoints in run.storage_path (as on a multi-node cluster) and the run directory's
    metrics.jsonl gone (as when rank 0 ran on another node): the log comes back from the checkpoint."""
    _, _, expected = reference
    ray_session.write_text("fail once")
    store = tmp_path / "store"
    args = ["batch.micro_batch_size=8", "run.checkpoint_every_samples=320", "model.name=faulty_model:make",
            "run.max_failures=0", f"run.storage_path={store}", "train.log_every_samples=128"]
    with pytest.raises(Exception, match="injected failure"):
        run(tmp_path, "rerun", *args)
    assert list((store / "rerun").glob("checkpoint_*")), "no checkpoint in run.storage_path"
    assert not (tmp_path / "rerun" / "checkpoints").exists()
    (tmp_path / "rerun" / "metrics.jsonl").unlink()
    summary, model = run(tmp_path, "rerun", *args)
    assert summary["restarts"] == 1
    assert all(torch.equal(expected[k], model[k]) for k in expected)
    samples = [json.loads(x)["samples_seen"] for x in (tmp_path / "rerun" / "metrics.jsonl").read_text().splitlines()]
    assert samples == sorted(samples)  # lines logged after the checkpoint were replaced, not duplicated
    assert samples[0] < 320  # the lines from before the failure came back with the checkpoint


def test_embedded_ray_listens_on_loopback_only(ray_session):
    """Every server the embedded Ray started (GCS, raylet, object manager, dashboard, agents) is on 127.0.0.1."""
    import subprocess

    from test_cluster import _processes

    processes = _processes()
    mine, grew = {os.getpid()}, True
    while grew:  # this process's descendants: the embedded Ray's processes
        children = {pid for pid, (parent, _) in processes.items() if parent in mine} - mine
        mine |= children
        grew = bool(children)
    sockets = subprocess.run(["ss", "-Htlnp"], capture_output=True, text=True, check=True).stdout.splitlines()
    listening = [line for line in sockets if any(f"pid={pid}," in line for pid in mine - {os.getpid()})]
    assert len(listening) >= 3, sockets  # at least the GCS, the raylet and the dashboard
    for line in listening:
        assert line.split()[3].startswith(("127.0.0.1:", "[::ffff:127.0.0.1]:")), line


def test_sigkilled_worker_restarts_from_checkpoint_and_matches_bitwise(reference, ray_session, tmp_path):
    """SIGKILL to a real Train worker process, by pid, mid-epoch: the run restarts from its last checkpoint by
    itself and ends with the same model, bit for bit, as the uninterrupted run: no sample lost or trained
    twice across the failure."""
    import signal
    import threading

    _, expected_summary, expected = reference
    pid_dir = ray_session.parent / "pids"
    for stale in pid_dir.iterdir():
        stale.unlink()
    outcome = {}

    def train() -> None:
        try:
            outcome["result"] = run(tmp_path, "killed", "batch.micro_batch_size=8", "run.checkpoint_every_samples=320",
                                    "model.name=slow_model:make")
        except BaseException as exc:  # noqa: BLE001 - reported below
            outcome["error"] = exc

    thread = threading.Thread(target=train)
    thread.start()
    checkpoints = tmp_path / "killed" / "checkpoints"
    deadline = time.time() + 300
    while time.time() < deadline and not list(checkpoints.glob("checkpoint_*")):  # the first one, 320 samples
        assert thread.is_alive(), outcome
        time.sleep(0.05)
    time.sleep(0.5)  # a few steps past it, still inside epoch 1 (about 23 steps of 80+ ms)
    victim = max(int(p.name) for p in pid_dir.iterdir())
    os.kill(victim, signal.SIGKILL)
    thread.join(timeout=600)
    assert "error" not in outcome, outcome.get("error")
    summary, model = outcome["result"]
    assert summary["restarts"] == 1
    assert summary["samples_seen"] == expected_summary["samples_seen"]
    assert all(torch.equal(expected[k], model[k]) for k in expected)
    records = trainer.read_metrics(tmp_path / "killed")
    assert [r["samples_seen"] for r in records] == sorted(r["samples_seen"] for r in records)


def test_killed_driver_rerun_resumes_and_matches_bitwise(reference, ray_session, tmp_path):
    """SIGKILL to the `rayscale train` driver, by pid, mid-run: running the same command again resumes from the
    latest checkpoint and ends with the uninterrupted run's model, bit for bit."""
    import signal
    import subprocess

    from test_cluster import _processes

    _, expected_summary, expected = reference
    command = [sys.executable, "-m", "rayscale.cli", "train", "--set", f"run.output_dir={tmp_path}",
               "--set", "run.name=driver", "--set", "train.epochs=2", "--set", "batch.global_batch_size=64",
               "--set", "batch.micro_batch_size=8", "--set", "run.checkpoint_every_samples=320",
               "--set", "model.name=slow_model:make"]
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}  # its own embedded Ray, like a user's
    log = open(tmp_path / "first.log", "w")
    driver = subprocess.Popen(command, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    checkpoints = tmp_path / "driver" / "checkpoints"
    deadline = time.time() + 300
    while time.time() < deadline and not list(checkpoints.glob("checkpoint_*")):
        assert driver.poll() is None, (tmp_path / "first.log").read_text()[-3000:]
        time.sleep(0.05)
    time.sleep(0.5)
    processes = _processes()
    family, grew = {driver.pid}, True
    while grew:  # the driver and the embedded Ray it started
        children = {pid for pid, (parent, _) in processes.items() if parent in family} - family
        family |= children
        grew = bool(children)
    os.kill(driver.pid, signal.SIGKILL)
    driver.wait(timeout=30)
    # Whatever the killed driver's embedded Ray left behind is stopped by pid, as killing its group would.
    for pid in family:
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    assert not (tmp_path / "driver" / "summary.json").exists()

    again = subprocess.run(command, env=env, capture_output=True, text=True, timeout=600)
    assert again.returncode == 0, again.stdout[-3000:] + again.stderr[-3000:]
    assert "resuming at epoch" in again.stdout
    summary = json.loads((tmp_path / "driver" / "summary.json").read_text())
    assert summary["samples_seen"] == expected_summary["samples_seen"]
    model = torch.load(tmp_path / "driver" / "model.pt")
    assert all(torch.equal(expected[k], model[k]) for k in expected)
