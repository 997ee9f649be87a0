"""What Tune adds per trial: the same runs one after another, then as one search, on one warm embedded Ray.

    RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0 .venv/bin/python -m benchmarks.trial_gaps [--trials 3] [--output-dir DIR]

The embedded default (digits, 1 worker, 1 epoch, noise scale off), at `--trials` learning rates: first one
warm-up run (the first Train run in a new Ray starts colder than any later one, and is left out), then each
configuration as its own `trainer.train` in this process, then the same configurations as one `rayscale tune`
grid, one trial at a time. Printed: each trial's gap before its run starts (after the previous one's outputs, or
after the search began), its run's wall time and launch phase, and the overhead per trial =
(the search's wall time - the single runs' total) / trials. Target (issue 30): under 3 s per trial.
"""

from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path

from benchmarks import scratch_or_none

TARGET_S = 3.0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--trials", type=int, default=3)
    parser.add_argument("--output-dir", type=Path, help="scratch space, new or empty (default: a new temporary directory)")
    args = parser.parse_args(argv)
    os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
    from rayscale import config
    from rayscale.launch import trainer
    from rayscale.launch.connect import connect
    from rayscale.tuning import search as tune

    out = scratch_or_none("trial_gaps", args.output_dir)
    if out is None:
        return 2
    lrs = [round(0.3 / 3 ** i, 4) for i in range(args.trials)]
    base = [f"run.output_dir={out}", "scaling.num_workers=1", "train.epochs=1", "train.noise_scale=false"]
    connect(None)
    trainer.train(config.load(overrides=[*base, "run.name=warm_up"]))
    singles = []
    for lr in lrs:
        began = time.perf_counter()
        trainer.train(config.load(overrides=[*base, f"run.name=single_{lr}", f"optim.lr={lr}"]))
        singles.append(time.perf_counter() - began)
    budget = trainer.prepare(config.load(overrides=base)).train_rows
    cfg = config.load(overrides=[*base, "run.name=search", "tune.num_samples=1", "tune.max_concurrent_trials=1",
                                 f"tune.space={{optim.lr: {{grid: {lrs}}}}}", f"tune.grace_samples={budget}",
                                 "tune.grid_order=listed"])
    began = time.time()
    tune.search(cfg)
    ended = time.time()
    trials = []
    for path in (out / "search" / "trials").glob("*/summary.json"):
        summary = json.loads(path.read_text())
        finished = path.stat().st_mtime
        trials.append((finished - summary["wall_time_s"], finished, summary))
    previous = began
    print(f"load average {os.getloadavg()[0]:.2f}; single runs {', '.join(f'{s:.1f}' for s in singles)} s")
    for start, finished, summary in sorted(trials, key=lambda trial: trial[0]):
        print(f"gap before the trial's run {start - previous:5.1f} s; run {summary['wall_time_s']:5.1f} s "
              f"(launch {summary['startup_phases_s'].get('launch') or 0:.1f} s)")
        previous = finished
    overhead = (ended - began - sum(singles)) / len(lrs)
    print(f"after the last trial {ended - previous:.1f} s; search {ended - began:.1f} s against "
          f"{sum(singles):.1f} s of single runs: overhead per trial {overhead:.1f} s "
          f"({'PASS' if overhead < TARGET_S else 'FAIL'}: target < {TARGET_S:.0f} s)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
