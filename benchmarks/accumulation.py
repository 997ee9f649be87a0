"""Gradient accumulation: one all-reduce per optimizer step, and what `no_sync` saves.

Two processes, gloo on 127.0.0.1, 1 thread each, 4 micro-batches per optimizer step, the engine's own
`train_step` (rayscale.engine.step) against the same step written the naive way (a synchronising backward for every
micro-batch). A DDP communication hook counts the gradient all-reduces (per bucket; DDP's bucketing is the same
in both), and a wrapper counts the other all-reduces: with sample weights or token losses the engine makes one
more per step, of one float64 (the step's count across ranks, which normalises the loss before the first
backward); for unweighted rows, as here, the worker passes the step's row count and makes none. Targets (issue 7):
gradient all-reduce rounds per optimizer step = 1, naive / rayscale step time >= 1.3.
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

from benchmarks import gloo

SIZES = {"full": {"features": 256, "hidden": [1024, 1024], "micro": 16, "steps": 30},
         "smoke": {"features": 16, "hidden": [32], "micro": 4, "steps": 3}}
MICRO_BATCHES = 4
WORKERS = 2


def _process(rank: int, port: int, size: dict, out: str) -> None:
    import torch
    import torch.distributed as dist
    from torch.distributed.algorithms.ddp_comm_hooks.default_hooks import allreduce_hook

    from rayscale.engine.distributed import join_process_group
    from rayscale.engine.precision import make_precision
    from rayscale.engine.step import train_step
    from rayscale.engine.strategies.ddp import prepare_model
    from rayscale.models import MLP

    torch.set_num_threads(1)
    join_process_group("gloo", "127.0.0.1", port, rank, WORKERS)
    torch.manual_seed(0)
    model = prepare_model(MLP(size["features"], 10, tuple(size["hidden"])), torch.device("cpu"), WORKERS)
    calls = {"n": 0, "other": 0}

    def counting_hook(state, bucket):
        calls["n"] += 1
        return allreduce_hook(state, bucket)

    model.register_comm_hook(dist.group.WORLD, counting_hook)
    plain_all_reduce = dist.all_reduce

    def counting_all_reduce(*args, **kwargs):  # every all-reduce, the hook's own included (subtracted below)
        calls["other"] += 1
        return plain_all_reduce(*args, **kwargs)

    dist.all_reduce = counting_all_reduce
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01)
    precision = make_precision("fp32", torch.device("cpu"))
    batches = [{"x": torch.randn(size["micro"], size["features"]), "y": torch.randint(0, 10, (size["micro"],))}
               for _ in range(MICRO_BATCHES)]
    loss_fn = torch.nn.CrossEntropyLoss(reduction="sum")

    def naive_step() -> None:  # every backward synchronises
        optimizer.zero_grad()
        for batch in batches:
            (loss_fn(model(batch["x"]), batch["y"]) / (size["micro"] * MICRO_BATCHES)).backward()
        optimizer.step()

    def engine_step() -> None:
        # As the worker calls it for unweighted rows: the step's row count is known, no normaliser all-reduce.
        train_step(model, batches, optimizer, task="classification", lr=0.01, precision=precision,
                   global_count=size["micro"] * MICRO_BATCHES * WORKERS)

    results = {}
    for name, step in (("naive", naive_step), ("rayscale", engine_step)):
        for _ in range(3):  # warm-up: DDP rebuilds its buckets after the first iterations
            step()
        dist.barrier()
        calls["n"] = calls["other"] = 0
        began = time.perf_counter()
        for _ in range(size["steps"]):
            step()
        elapsed = time.perf_counter() - began
        results[name] = {"step_s": elapsed / size["steps"], "hook_calls_per_step": calls["n"] / size["steps"],
                         "scalar_all_reduces_per_step": (calls["other"] - calls["n"]) / size["steps"]}
    # The naive step synchronises every micro-batch: its hook calls are MICRO_BATCHES x DDP's bucket count.
    buckets = results["naive"]["hook_calls_per_step"] / MICRO_BATCHES
    for name in results:
        results[name]["allreduce_rounds_per_step"] = results[name]["hook_calls_per_step"] / buckets
    results["buckets"] = buckets
    gloo.finish(rank, out, results)


def run(size_name: str, output_dir: Path) -> dict:
    measured = gloo.spawn(_process, (SIZES[size_name],), WORKERS, output_dir / "accumulation.json")
    result = {"size": SIZES[size_name], "micro_batches": MICRO_BATCHES, **measured}
    rounds = result["rayscale"]["allreduce_rounds_per_step"]
    speedup = result["naive"]["step_s"] / result["rayscale"]["step_s"]
    result["targets"] = [
        {"name": "gradient all-reduce rounds per optimizer step", "value": rounds, "target": "= 1",
         "pass": rounds == 1},
        {"name": f"no_sync speed-up at {MICRO_BATCHES} micro-batches", "value": speedup, "target": ">= 1.3",
         "pass": speedup >= 1.3},
    ]
    return result


def table(result: dict) -> str:
    lines = ["| step | ms per optimizer step | gradient all-reduce rounds per step | scalar all-reduces per step |",
             "|---|---|---|---|"]
    for key, label in (("rayscale", "rayscale `train_step` (no_sync on 3 of 4)"), ("naive", "sync every micro-batch")):
        r = result[key]
        lines.append(f"| {label} | {r['step_s'] * 1000:.1f} | {r['allreduce_rounds_per_step']:g} | "
                     f"{r['scalar_all_reduces_per_step']:g} |")
    return "\n".join(lines)


if __name__ == "__main__":  # pragma: no cover - python -m benchmarks runs it
    print(json.dumps(run("smoke", Path(os.environ.get("TMPDIR", "/tmp"))), indent=2))
