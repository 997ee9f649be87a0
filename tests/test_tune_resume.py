"""`rayscale tune --resume` after the search's driver is killed (its own file, so that it runs beside
tests/test_tune.py on the other test worker)."""

import os
import signal
import subprocess
import time

import pytest
from test_tune import RAYSCALE, SMALL, args, rows

pytestmark = pytest.mark.slow


def test_killed_driver_resumes_without_rerunning_finished_trials(tmp_path):
    search_args = [RAYSCALE, "tune", *args(*SMALL, f"run.output_dir={tmp_path}", "run.name=killed", "train.epochs=1",
                                           "tune.num_samples=1", "tune.space={optim.lr: {grid: [0.1, 0.3]}}")]
    env = {**os.environ, "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0"}
    trials = tmp_path / "killed" / "trials"
    with open(tmp_path / "first.log", "w") as log:
        first = subprocess.Popen(search_args, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        deadline = time.time() + 400
        while time.time() < deadline:  # wait for one finished trial and the next one under way
            finished = list(trials.glob("*/summary.json"))
            started = list(trials.glob("*/config.yaml"))
            if finished and len(started) >= 2:
                break
            assert first.poll() is None, (tmp_path / "first.log").read_text()[-3000:]
            time.sleep(1)
        else:
            pytest.fail("no trial finished in time")
        os.killpg(first.pid, signal.SIGKILL)  # the driver and the embedded Ray with it
        first.wait()
    finished_summary = finished[0]
    stamp = finished_summary.stat().st_mtime_ns
    time.sleep(2)  # let the killed Ray's sockets close

    resumed = subprocess.run([*search_args, "--resume"], env=env, capture_output=True, text=True, timeout=600)
    assert resumed.returncode == 0, resumed.stdout[-3000:] + resumed.stderr[-3000:]
    table = rows(tmp_path / "killed")
    assert len(table) == 2 and all(r["status"] == "completed" for r in table)
    assert finished_summary.stat().st_mtime_ns == stamp  # the finished trial was not trained again
