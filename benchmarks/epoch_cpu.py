"""CPU time per short epoch: the engine's loop in process (no Ray) against a plain loop on the same rows (issue 30).

    .venv/bin/python -m benchmarks.epoch_cpu [--ranks 1|2] [--rounds 3] [--epochs 30] [--set KEY=VALUE ...]

The 30-epoch digits run of benchmarks/epoch_end.py (1,450 training and 347 validation rows, MLP 64-256-256-10,
global batch 128, micro-batch 64) trained by `engine.loop.TrainLoop` through the in-process context (the rows
read in this process, gloo between `--ranks` spawned processes, no Ray), and a plain loop on the same rows, model
and micro-batches (accumulated under `no_sync`), alternating each round. What is counted is CPU time
(`time.process_time`, every thread of the process), not wall time: on a shared machine it moves far less with
the load. Printed per round, the median over epochs 2..N of each rank's CPU ms per epoch (max over ranks),
rayscale's share of it spent in the epoch end (validation, the epoch-end line, the components' ends; a checkpoint
where one is due), and the same medians in wall ms (for reference only: they move with the load); then the
medians over rounds.
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

from benchmarks import gloo
from benchmarks.epoch_end import digits_rows, load

GLOBAL_BATCH, MICRO_BATCH, LR = 128, 64, 0.1


def _epochs_from(marks: list[float]) -> list[float]:
    """Per-epoch durations from the cumulative marks at each epoch's end (the first epoch left out)."""
    return [b - a for a, b in zip(marks[:-1], marks[1:], strict=True)]


def _rayscale_rank(rank: int, port: int, ranks: int, payload, reads, out: str) -> None:
    from rayscale.engine.context import InProcessContext
    from rayscale.engine.loop import TrainLoop

    _join(rank, port, ranks)
    loop = TrainLoop(payload, InProcessContext(payload.run_dir, reads, rank=rank, world_size=ranks))
    ends, end_cpu, walls = [], [], []
    end_segment = loop.feed.end_segment

    def timed_end(loop_, segment):
        began = time.process_time()
        paused = end_segment(loop_, segment)
        end_cpu.append(time.process_time() - began)
        ends.append(time.process_time())
        walls.append(time.perf_counter())
        return paused

    loop.feed.end_segment = timed_end
    ends.append(time.process_time())
    walls.append(time.perf_counter())
    loop.train()
    _finish(rank, ranks, out, {"epoch_cpu": _epochs_from(ends)[1:], "end_cpu": end_cpu[1:-1],
                               "epoch_wall": _epochs_from(walls)[1:]})


def _plain_rank(rank: int, port: int, ranks: int, epochs: int, out: str) -> None:
    """The plain loop as its users would write it: each rank's rows of a step in micro-batches of MICRO_BATCH,
    all but the last under DDP's no_sync, each loss a sum over the step's rows."""
    import contextlib

    import torch
    from torch.nn.parallel import DistributedDataParallel

    from rayscale.models import MLP

    _join(rank, port, ranks)
    x, y = (torch.from_numpy(a) for a in digits_rows())
    x = x.flatten(1)
    torch.manual_seed(0)
    model = MLP(x.shape[1], 10)
    model = DistributedDataParallel(model) if ranks > 1 else model
    optimizer = torch.optim.SGD(model.parameters(), lr=LR, momentum=0.9)
    loss_fn = torch.nn.CrossEntropyLoss(reduction="sum")
    generator = torch.Generator().manual_seed(0)
    ends, walls = [time.process_time()], [time.perf_counter()]
    for _ in range(epochs):
        order = torch.randperm(len(x), generator=generator)
        for start in range(0, len(x), GLOBAL_BATCH):
            rows = order[start:start + GLOBAL_BATCH]
            mine = rows[rank::ranks]
            optimizer.zero_grad()
            parts = mine.split(MICRO_BATCH)
            for index, part in enumerate(parts):
                last = index == len(parts) - 1
                with contextlib.nullcontext() if last or ranks == 1 else model.no_sync():
                    (loss_fn(model(x[part]), y[part]) * ranks / len(rows)).backward()
            optimizer.step()
        ends.append(time.process_time())
        walls.append(time.perf_counter())
    _finish(rank, ranks, out, {"epoch_cpu": _epochs_from(ends)[1:], "epoch_wall": _epochs_from(walls)[1:]})


def _join(rank: int, port: int, ranks: int) -> None:
    import torch

    from rayscale.engine.distributed import join_process_group

    torch.set_num_threads(1)  # as a 1-CPU Ray worker gets
    if ranks > 1:
        join_process_group("gloo", "127.0.0.1", port, rank, ranks)


def _finish(rank: int, ranks: int, out: str, result: dict) -> None:
    """Every rank's result to its own file; rank 0's is what gloo.spawn returns."""
    import json

    Path(f"{out}.{rank}").write_text(json.dumps(result))
    if ranks > 1:
        gloo.finish(rank, out, result)
    Path(out).write_text(json.dumps(result))


def _per_rank(out: Path, ranks: int) -> list[dict]:
    import json

    return [json.loads(Path(f"{out}.{rank}").read_text()) for rank in range(ranks)]


def run_rayscale(ranks: int, epochs: int, overrides: list[str], directory: Path, name: str) -> dict:
    from rayscale import config
    from rayscale.data.local_feed import LocalReads
    from rayscale.driver.prepare import prepare, worker_payload

    cfg = config.load(overrides=[f"run.output_dir={directory}", f"run.name={name}", f"scaling.num_workers={ranks}",
                                 f"batch.global_batch_size={GLOBAL_BATCH}", f"batch.micro_batch_size={MICRO_BATCH}",
                                 f"train.epochs={epochs}", "run.progress=lines", *overrides])
    prepared = prepare(cfg)
    prepared.run_dir.mkdir(parents=True, exist_ok=True)
    payload, reads = worker_payload(prepared), LocalReads(prepared.train, prepared.val)
    out = directory / f"{name}.json"
    gloo.spawn(_rayscale_rank, (ranks, payload, reads), ranks, out)
    per_rank = _per_rank(out, ranks)
    return {**_medians(per_rank), "end_ms": max(statistics.median(r["end_cpu"]) for r in per_rank) * 1e3}


def _medians(per_rank: list[dict]) -> dict:
    """Each rank's median epoch (CPU and wall ms), the slowest rank's."""
    return {"epoch_ms": max(statistics.median(r["epoch_cpu"]) for r in per_rank) * 1e3,
            "wall_ms": max(statistics.median(r["epoch_wall"]) for r in per_rank) * 1e3}


def run_plain(ranks: int, epochs: int, directory: Path, name: str) -> dict:
    out = directory / f"{name}.json"
    gloo.spawn(_plain_rank, (ranks, epochs), ranks, out)
    return _medians(_per_rank(out, ranks))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--ranks", type=int, default=2, choices=(1, 2))
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--epochs", type=int, default=30)
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                        help="a config override for the rayscale run (repeatable)")
    args = parser.parse_args(argv)
    scratch = Path(tempfile.mkdtemp(prefix="epoch_cpu-"))
    rayscale_ms, plain_ms, end_ms, walls = [], [], [], []
    print(f"CPU ms per epoch (median of epochs 2..{args.epochs}, max over {args.ranks} rank(s))")
    print("| round | load (1, 5, 15 min) | rayscale | of it the epoch end | plain | rayscale / plain | "
          "wall ms: rayscale, plain |")
    print("|---|---|---|---|---|---|---|")
    for index in range(args.rounds):
        order = ("plain", "rayscale") if index % 2 == 0 else ("rayscale", "plain")
        results = {}
        for system in order:
            results[system] = run_plain(args.ranks, args.epochs, scratch, f"plain_{index}") if system == "plain" \
                else run_rayscale(args.ranks, args.epochs, args.overrides, scratch, f"rayscale_{index}")
        rayscale_ms.append(results["rayscale"]["epoch_ms"])
        end_ms.append(results["rayscale"]["end_ms"])
        plain_ms.append(results["plain"]["epoch_ms"])
        walls.append((results["rayscale"]["wall_ms"], results["plain"]["wall_ms"]))
        print(f"| {index + 1} | {load()} | {rayscale_ms[-1]:.1f} | {end_ms[-1]:.1f} | {plain_ms[-1]:.1f} | "
              f"{rayscale_ms[-1] / plain_ms[-1]:.2f} | {walls[-1][0]:.1f}, {walls[-1][1]:.1f} |", flush=True)
    ratio = statistics.median(r / p for r, p in zip(rayscale_ms, plain_ms, strict=True))
    print(f"medians: rayscale {statistics.median(rayscale_ms):.1f} ms (epoch end {statistics.median(end_ms):.1f}), "
          f"plain {statistics.median(plain_ms):.1f} ms, rayscale / plain {ratio:.2f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
