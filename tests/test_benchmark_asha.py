"""The ASHA-against-grid benchmark at its smoke size, which is also the end-to-end test of ASHA by promotion
(`tune.asha_variant: promotion`): a trial paused at its rung, stopped there or resumed from its checkpoint."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from rayscale.files import GROUPS_FILE

pytestmark = pytest.mark.slow

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def smoke(tmp_path_factory):
    out = tmp_path_factory.mktemp("asha_vs_grid")
    env = {**os.environ, "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0"}
    done = subprocess.run([sys.executable, "-m", "benchmarks.tune_asha_vs_grid", "--smoke",
                           "--output-dir", str(out / "work"), "--results-dir", str(out / "results")],
                          env=env, cwd=REPO, capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    return json.loads((out / "results" / "tune_asha_vs_grid.smoke.json").read_text()), done.stdout


def test_the_benchmark_compares_the_two_searches_and_prints_its_targets(smoke):
    result, stdout = smoke
    assert result["settings"]["asha_variant"] == "promotion"
    assert result["grid"]["completed"] == result["grid"]["trials"] == 2
    assert 0 < result["comparison"]["sample_fraction"] < 1
    assert "asha samples <= 35% of grid" in "".join(result["comparison"]["targets"])
    assert "PASS" in stdout or "FAIL" in stdout


def test_promotion_trains_nothing_past_a_rung_and_stops_the_other_trial_there(smoke):
    result, _ = smoke
    asha, grace = result["asha"], result["asha"]["grace_samples"]
    assert (asha["completed"], asha["stopped_early"], asha["errors"]) == (1, 1, 0)
    # What Tune saw is what the workers trained: the stopped trial's run ended at the rung, not after it.
    assert asha["samples"] == asha["samples_trained_per_logs"]
    stopped = next(r for r in asha["rows"] if r["status"] == "stopped early")
    assert stopped["samples_seen"] == grace == result["settings"]["train_rows"]  # the one-epoch rung


def test_a_promoted_trial_resumes_from_its_rung_and_trains_exactly_as_without_the_pause(smoke):
    result, _ = smoke
    asha = result["asha"]
    completed = next(r for r in asha["rows"] if r["status"] == "completed")
    groups = (Path(asha["search_dir"]) / "trials" / completed["trial_id"] / GROUPS_FILE)
    assert len(groups.read_text().splitlines()) == 2  # to the rung, then from it to the end
    summary = json.loads((groups.parent / "summary.json").read_text())
    assert (summary["rung_resumes"], summary["restarts"]) == (1, 0)  # a planned resume, not a fault
    # Same configuration, same seed: the paused and resumed curve is the grid's, value for value.
    assert result["comparison"]["largest_history_difference"] < 1e-9
