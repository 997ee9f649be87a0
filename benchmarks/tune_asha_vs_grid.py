"""ASHA against the exhaustive grid it prunes: how much training does it save, and does it keep the winner?

Both searches run `rayscale.tune.search` over the same grid-only space on the bundled digits, so they see
exactly the same configurations, with the same seed, trained by the same code:

  (a) grid: `tune.grace_samples` is a whole trial's budget, so ASHA has a single rung at max_t and stops
      nothing early — every configuration trains all its epochs;
  (b) ASHA: a grace of one epoch of samples and reduction factor 3. At the default 9 epochs that is exactly
      `tune.grace_samples`' default (a ninth of the budget), and ASHA's rungs fall at 1, 3 and 9 epochs;
      `--epochs 27` gives the same grace a 27 times longer budget, so a fourth rung (1, 3, 9, 27 epochs).

Targets (from the issue): ASHA trains at most 35% of the grid's samples, and its best val_loss is within 2% of
the grid's best. PASS/FAIL is printed per target; the script always exits 0 (a benchmark, not a test).

    python -m benchmarks.tune_asha_vs_grid [--smoke] [--epochs N] [--output-dir DIR]

Writes benchmarks/results/tune_asha_vs_grid.json (`--smoke`, `--epochs N` add .smoke, .epochsN to the name).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import tempfile
import time
from pathlib import Path

RESULTS_DIR = Path(__file__).resolve().parent / "results"
METRIC = "val_loss"
MAX_SAMPLE_FRACTION = 0.35  # target: ASHA's samples / the grid's samples
MAX_RELATIVE_GAP = 0.02  # target: (asha_best - grid_best) / grid_best

FULL = {
    "space": {
        "batch.global_batch_size": {"grid": [64, 128]},
        "optim.lr": {"grid": [0.03, 0.1, 0.3]},
        "schedule.name": {"grid": ["cosine", "step"]},
    },  # 12 configurations
    "epochs": 9,  # a trial's budget (--epochs): 9 epochs of ~1,450 rows
}
SMOKE = {
    "space": {
        "batch.global_batch_size": {"grid": [64, 128]},
        "optim.lr": {"grid": [0.1]},
        "schedule.name": {"grid": ["cosine"]},
    },
    "epochs": 2,
}
# One trial at a time: ASHA's decisions then depend only on the metrics, not on which of two concurrent trials
# reaches a rung first, so the sample counts repeat from run to run (tests/test_tune.py does the same).
MAX_CONCURRENT_TRIALS = 1
REDUCTION_FACTOR = 3.0


def start_ray() -> None:
    """Start the embedded Ray that both searches reuse, as `trainer.connect` would, plus one setting: every Ray
    process is told its own dashboard's address (RAY_API_SERVER_ADDRESS, read by Ray's state API).

    Why: Ray Train V2 frees a finished trial's CPUs from a placement-group cleaner that asks the state API
    about the controller without naming a cluster. With a second Ray instance on the machine (someone's tests),
    that call raises "Found multiple active Ray instances", the cleaner dies, the CPU stays reserved, and a later
    trial waits for a worker until its start-up times out. Seen on the shared 2-core machine.
    """
    import socket

    with socket.socket() as probe:  # a free loopback port for this instance's dashboard
        probe.bind(("127.0.0.1", 0))
        dashboard_port = probe.getsockname()[1]
    os.environ["RAY_API_SERVER_ADDRESS"] = f"http://127.0.0.1:{dashboard_port}"  # inherited by Ray's processes
    import ray

    # trainer.connect's sizing for 1 worker per trial: the cores, plus one logical CPU for Ray Data's reads.
    ray.init(address="local", num_cpus=(os.cpu_count() or 1) + 1, dashboard_host="127.0.0.1",
             dashboard_port=dashboard_port, logging_level="WARNING")


def build_config(settings: dict, output_dir: Path, name: str, grace_samples: int | None):
    from rayscale import config as config_module

    return config_module.from_dict({
        "scaling": {"num_workers": 1},  # one Ray Train worker per trial
        "train": {"epochs": settings["epochs"]},
        "run": {"output_dir": str(output_dir), "name": name},
        "tune": {"space": settings["space"], "num_samples": 1,  # num_samples repeats the whole grid
                 "metric": METRIC, "mode": "min", "grace_samples": grace_samples,
                 "reduction_factor": REDUCTION_FACTOR, "max_concurrent_trials": MAX_CONCURRENT_TRIALS},
    })


def trained_samples(search_dir: Path, trial_id: str) -> int:
    """Samples the trial's worker actually trained (its metrics.jsonl), which can run a little past the last
    result Tune saw: a stopped trial's TorchTrainer is aborted at its next report, not at once."""
    from rayscale.trainer import read_metrics

    return max((r.get("samples_seen", 0) for r in read_metrics(search_dir / "trials" / trial_id)), default=0)


def effective_grace(cfg, budget: int) -> int:
    """The grace period `tune.search` uses (and prints): tune.grace_samples, else a ninth of the budget, never
    less than the warmup."""
    return max(cfg.tune.grace_samples or budget // 9, cfg.schedule.warmup_samples, 1)


def run_search(cfg, keys: list[str], budget: int) -> dict:
    from rayscale import tune

    started = time.perf_counter()
    rows = tune.search(cfg)
    wall = time.perf_counter() - started
    search_dir = Path(cfg.run.output_dir).resolve() / cfg.run.name
    best = next(r for r in rows if r[f"best_{METRIC}"] is not None)
    return {
        "search_dir": str(search_dir),
        "grace_samples": effective_grace(cfg, budget),
        "trials": len(rows),
        "completed": sum(r["status"] == "completed" for r in rows),
        "stopped_early": sum(r["status"] == "stopped early" for r in rows),
        "errors": sum(r["status"] == "error" for r in rows),
        "samples": sum(r["samples_seen"] for r in rows),
        "samples_trained_per_logs": sum(trained_samples(search_dir, r["trial_id"]) for r in rows),
        "best": best[f"best_{METRIC}"],
        "best_config": {k: best[k] for k in keys},
        "wall_time_s": round(wall, 1),
        "rows": rows,
    }


def config_key(row: dict, keys: list[str]) -> tuple:
    return tuple(row[k] for k in keys)


def largest_history_difference(grid: dict, asha: dict, keys: list[str]) -> float | None:
    """Same configuration, same seed: ASHA's curve must be a prefix of the grid's (a fairness check)."""
    grid_curves = {config_key(r, keys): dict(r["history"]) for r in grid["rows"]}
    differences = [abs(value - grid_curves[config_key(r, keys)][samples])
                   for r in asha["rows"] for samples, value in r["history"]
                   if samples in grid_curves.get(config_key(r, keys), {})]
    return max(differences, default=None)


def compare(grid: dict, asha: dict, keys: list[str]) -> dict:
    sample_fraction = asha["samples"] / grid["samples"]
    relative_gap = (asha["best"] - grid["best"]) / grid["best"]
    grid_ranking = [config_key(r, keys) for r in grid["rows"]]
    return {
        "sample_fraction": sample_fraction,
        "relative_gap": relative_gap,
        "same_best_config": asha["best_config"] == grid["best_config"],
        "asha_best_config_rank_in_grid": grid_ranking.index(config_key(asha["best_config"], keys)) + 1,
        "largest_history_difference": largest_history_difference(grid, asha, keys),
        "targets": {
            f"asha samples <= {MAX_SAMPLE_FRACTION:.0%} of grid": sample_fraction <= MAX_SAMPLE_FRACTION,
            f"asha best {METRIC} within {MAX_RELATIVE_GAP:.0%} of grid": relative_gap <= MAX_RELATIVE_GAP,
        },
    }


def markdown(grid: dict, asha: dict, comparison: dict, keys: list[str]) -> str:
    def config_text(best_config: dict) -> str:
        return ", ".join(f"{k.split('.')[-1]}={best_config[k]}" for k in keys)

    lines = [
        "| | grid | ASHA |",
        "|---|---|---|",
        f"| trials (completed / stopped early / errors) | {grid['trials']} ({grid['completed']} / "
        f"{grid['stopped_early']} / {grid['errors']}) | {asha['trials']} ({asha['completed']} / "
        f"{asha['stopped_early']} / {asha['errors']}) |",
        f"| ASHA grace (samples) | {grid['grace_samples']:,} (= budget) | {asha['grace_samples']:,} |",
        f"| samples trained (sum of samples_seen) | {grid['samples']:,} | {asha['samples']:,} |",
        f"| samples trained (trial logs) | {grid['samples_trained_per_logs']:,} | "
        f"{asha['samples_trained_per_logs']:,} |",
        f"| best {METRIC} | {grid['best']:.4f} | {asha['best']:.4f} |",
        f"| best config | {config_text(grid['best_config'])} | {config_text(asha['best_config'])} |",
        f"| wall time (s) | {grid['wall_time_s']:.0f} | {asha['wall_time_s']:.0f} |",
        "",
        f"- ASHA samples / grid samples: {comparison['sample_fraction']:.1%}",
        f"- relative gap (asha_best - grid_best) / grid_best: {comparison['relative_gap']:+.2%}",
        f"- same best config: {'yes' if comparison['same_best_config'] else 'no'} (ASHA's best is "
        f"#{comparison['asha_best_config_rank_in_grid']} in the grid's ranking)",
        f"- largest |{METRIC} difference| between the two searches on the same config and epoch: "
        f"{_number(comparison['largest_history_difference'])}",
    ]
    lines += [f"- {'PASS' if ok else 'FAIL'}: {target}" for target, ok in comparison["targets"].items()]
    return "\n".join(lines)


def _number(value: float | None) -> str:
    return "-" if value is None else f"{value:.2g}"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--smoke", action="store_true", help="2x1x1 grid, 2 epochs: proves the script runs")
    parser.add_argument("--epochs", type=int, default=None,
                        help="a trial's budget in epochs (default: 9, --smoke: 2); ASHA's grace stays one epoch")
    parser.add_argument("--output-dir", type=Path, default=None,
                        help="where the two searches are written (default: a new temporary directory)")
    args = parser.parse_args(argv)

    # Before anything imports ray: loopback only, no usage stats, patience for worker start-up on a loaded machine.
    os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    os.environ.setdefault("RAY_TRAIN_WORKER_GROUP_START_TIMEOUT_S", "180")
    from rayscale import space, trainer

    settings = dict(SMOKE if args.smoke else FULL)
    settings["epochs"] = args.epochs or settings["epochs"]
    output_dir = args.output_dir or Path(tempfile.mkdtemp(prefix="rayscale-asha-vs-grid-"))
    keys = [d.key for d in space.parse_space(settings["space"])]
    train_rows = trainer.prepare(build_config(settings, output_dir, "grid", None)).train_rows
    budget = settings["epochs"] * train_rows  # a trial's samples: max_t of both searches
    print(f"[benchmark] {space.grid_size(space.parse_space(settings['space']))} configurations x "
          f"{settings['epochs']} epochs x {train_rows:,} rows = {budget:,} samples per trial; "
          f"output in {output_dir}", flush=True)
    start_ray()  # tune.search finds it running and reuses it for both searches

    grid = run_search(build_config(settings, output_dir, "grid", grace_samples=budget), keys, budget)
    asha = run_search(build_config(settings, output_dir, "asha", grace_samples=train_rows), keys, budget)
    comparison = compare(grid, asha, keys)
    table = markdown(grid, asha, comparison, keys)
    print("\n" + table, flush=True)

    import ray
    import torch

    RESULTS_DIR.mkdir(parents=True, exist_ok=True)
    suffix = (".smoke" if args.smoke else "") + (f".epochs{args.epochs}" if args.epochs else "")
    result_path = RESULTS_DIR / f"tune_asha_vs_grid{suffix}.json"
    result_path.write_text(json.dumps({
        "settings": {**settings, "train_rows": train_rows, "samples_per_trial": budget,
                     "reduction_factor": REDUCTION_FACTOR, "max_concurrent_trials": MAX_CONCURRENT_TRIALS,
                     "metric": METRIC},
        "machine": {"cpus": os.cpu_count(), "platform": platform.platform(), "python": platform.python_version(),
                    "ray": ray.__version__, "torch": torch.__version__},
        "grid": grid, "asha": asha, "comparison": comparison, "table": table,
    }, indent=2, default=str) + "\n")
    print(f"[benchmark] wrote {result_path}", flush=True)
    ray.shutdown()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
