"""What an epoch end costs: a 30-epoch digits run against a plain DDP loop over the whole run (issue 30).

    RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0 .venv/bin/python -m benchmarks.epoch_end [--rounds 2] [--epochs 30]
        [--set KEY=VALUE ...] [--output-dir DIR]

Side by side, in alternating order each round, on the same machine:
  rayscale  `rayscale train` as a new user runs it: the embedded default (the real 8x8 digits, 1,450 training
            and 347 validation rows, MLP 64-256-256-10), 2 workers, global batch 128 = micro-batch 64 x 2
            workers, `train.epochs` 30; `--set` adds overrides (e.g. run.checkpoint_every_seconds=0: a
            checkpoint at every epoch end);
  plain     a plain 2-process gloo DDP loop on the same model, rows and batch (each epoch reshuffled, the last
            step short), no validation, no checkpoint, no Ray.
Both are timed from their first step (start-up excluded: rayscale's ends when rank 0 is about to train) to the
end of their last epoch, and rayscale's also less its first wait for data (Ray Data's first execution, read
tasks in new processes: a start-up cost the first epoch pays). Printed per round: samples/s over the whole run, the median epoch (end to end), the
fixed cost of an epoch end = rayscale's median epoch - plain's (its validation of 347 rows included), and
rayscale's start-up phases and what follows its last epoch (final checkpoint, Ray's shutdown, outputs).
Target: rayscale >= 0.7x plain's samples/s over the whole run; an epoch end costs < 50 ms beyond its validation.
"""

from __future__ import annotations

import argparse
import os
import statistics
import time
from pathlib import Path

from benchmarks import gloo, scratch_or_none

WORKERS, GLOBAL_BATCH, MICRO_BATCH, LR = 2, 128, 64, 0.1
TARGET_RATIO, TARGET_EPOCH_END_MS = 0.7, 50.0


def digits_rows() -> tuple:
    """The digits training split rayscale trains on (its default source, split and scaling)."""
    from rayscale import config
    from rayscale.data.local_feed import read_shard
    from rayscale.data.splits import shard_reads, split_chunk_rows
    from rayscale.driver.prepare import prepare

    prepared = prepare(config.load(overrides=["run.output_dir=/tmp"]))
    blocks = list(read_shard(prepared.train, shard_reads(split_chunk_rows(prepared.train), 1)[0]))
    import numpy as np

    x = np.concatenate([b["x"] for b in blocks]).astype(np.float32)
    y = np.concatenate([b["y"] for b in blocks])
    return x, y


def _plain_process(rank: int, port: int, epochs: int, out: str) -> None:
    """The plain loop, as its users would write it."""
    import torch
    from torch.nn.parallel import DistributedDataParallel

    from rayscale.engine.distributed import join_process_group
    from rayscale.models import MLP

    torch.set_num_threads(1)  # as a 1-CPU Ray worker gets
    join_process_group("gloo", "127.0.0.1", port, rank, WORKERS)
    x, y = (torch.from_numpy(a) for a in digits_rows())
    x = x.flatten(1)
    torch.manual_seed(0)
    model = DistributedDataParallel(MLP(x.shape[1], 10))
    optimizer = torch.optim.SGD(model.parameters(), lr=LR, momentum=0.9)
    loss_fn = torch.nn.CrossEntropyLoss()
    generator = torch.Generator().manual_seed(0)
    began, epoch_ends = None, []
    for _ in range(epochs):
        order = torch.randperm(len(x), generator=generator)
        for start in range(0, len(x), GLOBAL_BATCH):
            rows = order[start:start + GLOBAL_BATCH][rank::WORKERS]
            began = began or time.perf_counter()
            loss = loss_fn(model(x[rows]), y[rows])
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
        epoch_ends.append(time.perf_counter() - began)
    gloo.finish(rank, out, {"epoch_ends": epoch_ends, "rows": len(x)})


def run_plain(epochs: int, directory: Path) -> dict:
    measured = gloo.spawn(_plain_process, (epochs,), WORKERS, directory / "plain.json")
    ends, rows = measured["epoch_ends"], measured["rows"]
    return {"samples_per_sec": rows * epochs / ends[-1], "median_epoch_s": _median_epoch(ends),
            "train_s": ends[-1]}


def run_rayscale(epochs: int, overrides: list[str], directory: Path, name: str) -> dict:
    from rayscale import config
    from rayscale.driver.outputs import read_metrics
    from rayscale.launch import trainer

    cfg = config.load(overrides=[f"run.output_dir={directory}", f"run.name={name}", "run.progress=lines",
                                 f"scaling.num_workers={WORKERS}", f"batch.global_batch_size={GLOBAL_BATCH}",
                                 f"batch.micro_batch_size={MICRO_BATCH}", f"train.epochs={epochs}", *overrides])
    summary = trainer.train(cfg)
    ends = [r for r in read_metrics(Path(summary["run_dir"])) if r.get("epoch_end")]
    times = [r["time"] for r in ends]  # seconds since rank 0 was about to take its first step
    train_s = times[-1]
    # The first line's wait for data is Ray Data's first execution (read tasks in new processes): start-up.
    first = read_metrics(Path(summary["run_dir"]))[0]
    first_wait_s = first["data_wait_fraction"] * first["samples_seen"] / first["samples_per_sec"]
    checkpoints = checkpoints_kept(Path(summary["run_dir"]))
    return {"samples_per_sec": ends[-1]["samples_seen"] / train_s, "median_epoch_s": _median_epoch(times),
            "train_s": train_s, "first_epoch_s": times[0], "startup_s": summary["startup_time_s"],
            "startup_phases_s": summary["startup_phases_s"], "wall_s": summary["wall_time_s"],
            "after_last_epoch_s": summary["wall_time_s"] - summary["startup_time_s"] - train_s,
            "checkpoints_kept": checkpoints, "first_data_wait_s": first_wait_s,
            "samples_per_sec_after_first_read": ends[-1]["samples_seen"] / (train_s - first_wait_s)}


def checkpoints_kept(run_dir: Path) -> int:
    """How many checkpoints the run's directory holds: rank 0 writes one manifest into each."""
    from rayscale.engine.checkpoint import MANIFEST
    from rayscale.files import CHECKPOINTS_DIR

    return len(list((run_dir / CHECKPOINTS_DIR).glob(f"**/{MANIFEST.format(0)}")))


def _median_epoch(ends: list[float]) -> float:
    return statistics.median(b - a for a, b in zip(ends[:-1], ends[1:], strict=True))


def load() -> str:
    return " ".join(f"{value:.2f}" for value in os.getloadavg())


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--epochs", type=int, default=30)
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                        help="a config override for the rayscale run (repeatable)")
    parser.add_argument("--output-dir", type=Path, help="scratch space, new or empty (default: a new temporary directory)")
    args = parser.parse_args(argv)
    os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
    from rayscale.launch.connect import connect

    scratch = scratch_or_none("epoch_end", args.output_dir)
    if scratch is None:
        return 2
    ratios, after_read, costs = [], [], []
    print("| round | load (1, 5, 15 min) | system | samples/s, whole run | median epoch ms | train s | "
          "first epoch s (of it waiting for Ray Data's first blocks) | start-up s (prepare, Ray, launch, worker setup) | after last epoch s |")
    print("|---|---|---|---|---|---|---|---|---|")
    for index in range(args.rounds):
        directory = scratch / f"round_{index + 1}"
        directory.mkdir(parents=True, exist_ok=True)
        results = {}
        order = ("plain", "rayscale") if index % 2 == 0 else ("rayscale", "plain")
        for system in order:
            if system == "plain":
                results[system] = run_plain(args.epochs, directory)
            else:
                connect(None)
                results[system] = run_rayscale(args.epochs, args.overrides, directory, f"rayscale_{index + 1}")
            r = results[system]
            phases = ", ".join(f"{v:.1f}" for v in r.get("startup_phases_s", {}).values() if v is not None)
            print(f"| {index + 1} | {load()} | {system} | {r['samples_per_sec']:,.0f} | "
                  f"{r['median_epoch_s'] * 1e3:.1f} | {r['train_s']:.2f} | "
                  + (f"{r['first_epoch_s']:.2f} ({r['first_data_wait_s']:.2f}) | {r['startup_s']:.1f} ({phases}) | {r['after_last_epoch_s']:.1f} |"
                     if system == "rayscale" else "| | |"), flush=True)
        ratios.append(results["rayscale"]["samples_per_sec"] / results["plain"]["samples_per_sec"])
        after_read.append(results["rayscale"]["samples_per_sec_after_first_read"] / results["plain"]["samples_per_sec"])
        costs.append((results["rayscale"]["median_epoch_s"] - results["plain"]["median_epoch_s"]) * 1e3)
    ratio, cost = statistics.median(ratios), statistics.median(costs)
    print(f"rayscale / plain samples/s over the whole run: {ratio:.3f} (rounds: "
          f"{', '.join(f'{v:.3f}' for v in ratios)}) {'PASS' if ratio >= TARGET_RATIO else 'FAIL'} (>= {TARGET_RATIO})")
    print(f"the same, Ray Data's first blocks counted as start-up: {statistics.median(after_read):.3f} (rounds: "
          f"{', '.join(f'{v:.3f}' for v in after_read)})")
    print(f"epoch end beyond the plain loop's epoch: {cost:.1f} ms (rounds: {', '.join(f'{v:.1f}' for v in costs)}) "
          f"{'PASS' if cost < TARGET_EPOCH_END_MS else 'FAIL'} (< {TARGET_EPOCH_END_MS:g} ms, validation included)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
