"""`ray job submit` of jobs/train.py to a head started with `ray start --head`, all on 127.0.0.1."""

import json
import os
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow

REPO = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _env() -> dict:
    env = dict(os.environ)
    env.update(RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER="0", RAY_AUTH_MODE="token",
               PATH=f"{BIN}{os.pathsep}{env['PATH']}")  # the job's `python` is this venv's
    env.pop("RAY_ADDRESS", None)
    return env


@pytest.fixture(scope="module")
def head(tmp_path_factory):
    """A real head node, in the foreground (--block) so that stopping it stops everything it started."""
    import ray

    ray.shutdown()  # no embedded Ray from an earlier module may linger beside the head
    # Free ports for everything with a fixed default (agent 52365, client server 10001), so another Ray on
    # the machine cannot keep this head's job agent from starting ("No available agent to submit job").
    gcs_port, dashboard_port, agent_port, client_port = _free_port(), _free_port(), _free_port(), _free_port()
    log = tmp_path_factory.mktemp("head") / "head.log"
    with open(log, "w") as out:
        process = subprocess.Popen(
            [str(BIN / "ray"), "start", "--head", "--block", f"--port={gcs_port}", "--num-cpus=3",
             "--node-ip-address=127.0.0.1", "--dashboard-host=127.0.0.1", f"--dashboard-port={dashboard_port}",
             f"--dashboard-agent-listen-port={agent_port}", f"--ray-client-server-port={client_port}",
             "--disable-usage-stats"], env=_env(), stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
    address = f"http://127.0.0.1:{dashboard_port}"
    deadline = time.time() + 120
    while time.time() < deadline:
        probe = subprocess.run([str(BIN / "ray"), "job", "list", "--address", address], env=_env(),
                               capture_output=True, text=True)
        if probe.returncode == 0:
            break
        assert process.poll() is None, log.read_text()[-3000:]
        time.sleep(2)
    else:
        pytest.fail(f"head did not come up: {log.read_text()[-3000:]}")
    yield address
    process.terminate()
    try:
        process.wait(timeout=60)
    except subprocess.TimeoutExpired:
        os.killpg(process.pid, 9)
        process.wait()
    # `ray start` records the head in /tmp/ray/ray_current_cluster; a stopped head must not leave it behind.
    current = Path("/tmp/ray/ray_current_cluster")
    if current.exists() and current.read_text().strip().endswith(f":{gcs_port}"):
        current.unlink()


def submit(address: str, *args: str, timeout: int = 400) -> subprocess.CompletedProcess:
    # The dashboard answers `ray job list` before its job agent is up; Ray then says to try again later.
    deadline = time.time() + 120
    while True:
        result = subprocess.run(
            [str(BIN / "ray"), "job", "submit", "--address", address, "--working-dir", str(REPO), "--", *args],
            env=_env(), capture_output=True, text=True, timeout=timeout, cwd=REPO)
        if "No available agent to submit job" not in result.stderr + result.stdout or time.time() > deadline:
            return result
        time.sleep(5)


def test_train_job_succeeds_and_writes_outputs(head, tmp_path):
    result = submit(head, "python", "jobs/train.py", "-c", "configs/digits_mlp.yaml",
                    "--set", "train.epochs=2", "--set", f"run.output_dir={tmp_path}", "--set", "run.name=job")
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert "succeeded" in result.stdout
    assert "[rayscale] epoch 2/2 done" in result.stdout  # the job's log shows progress
    run_dir = tmp_path / "job"
    for name in ("config.yaml", "metrics.jsonl", "summary.json", "model.pt", "curves.png"):
        assert (run_dir / name).exists(), name
    assert json.loads((run_dir / "summary.json").read_text())["world_size"] == 2


def test_tune_job_succeeds_and_writes_outputs(head, tmp_path):
    result = submit(head, "python", "jobs/tune.py", "-c", "configs/digits_mlp.yaml",
                    "--set", "train.epochs=1", "--set", "scaling.num_workers=1", "--set", "tune.num_samples=1",
                    "--set", "tune.space={optim.lr: {grid: [0.05, 0.2]}}",
                    "--set", f"run.output_dir={tmp_path}", "--set", "run.name=search", timeout=600)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert "succeeded" in result.stdout
    search_dir = tmp_path / "search"
    assert len((search_dir / "trials.csv").read_text().splitlines()) == 3  # header + 2 trials
    assert (search_dir / "best_config.yaml").exists() and (search_dir / "tune_curves.png").exists()


def test_bad_config_job_fails_with_the_one_line_error(head, tmp_path):
    result = submit(head, "python", "jobs/train.py", "--set", "optim.lr=-1", "--set", f"run.output_dir={tmp_path}",
                    timeout=120)
    assert result.returncode != 0
    assert "rayscale: error: optim.lr: expected a value greater than 0, got -1" in result.stdout + result.stderr
    assert not any(tmp_path.iterdir())


@pytest.fixture(autouse=True)
def _no_stray_runs():
    yield
    shutil.rmtree(REPO / "runs" / "job", ignore_errors=True)
