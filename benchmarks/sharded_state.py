"""Optimizer-state memory per worker: `optim.shard_state` against replicated state (AdamW, 2 workers).

Two processes, gloo on 127.0.0.1, 1 thread each; the engine's DDP model (`prepare_model`), `build_optimizer`
(AdamW, fused) and `train_step`, as a worker runs them. The same steps on the same rows twice: replicated (every
rank holds both moments of every tensor) and sharded (each rank those of its own whole tensors, then broadcasts
what it stepped), both models built side by side. Per worker: the bytes of optimizer state it holds (every tensor
in `optimizer.state`), and the ms per optimizer step: blocks of steps between barriers, the two modes alternating
(first one, then the other), the median block per mode (rank 0's clock). Both see the same rows in the same
order, so their weights are compared at the end. Target: the most loaded worker's state <= 0.55 of the replicated state (1/N = 0.5 for 2
workers; whole tensors balanced by size cannot always split exactly).
"""

from __future__ import annotations

import json
import os
import statistics
import time
from pathlib import Path

from benchmarks import gloo

SIZES = {"full": {"features": 1024, "hidden": [1024, 1024], "micro": 64, "steps": 10, "blocks": 6},
         "smoke": {"features": 16, "hidden": [32, 32], "micro": 4, "steps": 2, "blocks": 1}}
MODES = ("replicated", "sharded")
WORKERS = 2
TARGET_RATIO = 0.55


def _process(rank: int, port: int, size: dict, out: str) -> None:
    import torch
    import torch.distributed as dist

    from rayscale.config import OptimConfig
    from rayscale.engine.distributed import join_process_group
    from rayscale.engine.optimizers import build_optimizer
    from rayscale.engine.precision import make_precision
    from rayscale.engine.step import train_step
    from rayscale.engine.strategies.ddp import prepare_model
    from rayscale.engine.strategies.sharded_state import OptimizerShards, state_bytes
    from rayscale.models import MLP

    torch.set_num_threads(1)
    join_process_group("gloo", "127.0.0.1", port, rank, WORKERS)
    precision = make_precision("fp32", torch.device("cpu"))
    generator = torch.Generator().manual_seed(rank)
    batches = [{"x": torch.randn(size["micro"], size["features"], generator=generator),
                "y": torch.randint(0, 10, (size["micro"],), generator=generator)} for _ in range(4)]
    runs = {}
    for mode in MODES:
        torch.manual_seed(0)
        model = prepare_model(MLP(size["features"], 10, tuple(size["hidden"])), torch.device("cpu"), WORKERS)
        shards = OptimizerShards(rank, WORKERS) if mode == "sharded" else None
        runs[mode] = (model, build_optimizer(OptimConfig(name="adamw", lr=1e-3), model, 1e-3, shards))

    def step(mode: str, index: int) -> None:
        model, optimizer = runs[mode]
        train_step(model, [batches[index % len(batches)]], optimizer, task="classification", lr=1e-3,
                   precision=precision, grad_clip=1.0, global_count=size["micro"] * WORKERS)

    block_ms: dict[str, list[float]] = {mode: [] for mode in MODES}
    for block in range(size["blocks"] + 1):  # block 0 warms up (the state is made, DDP settles its buckets)
        for mode in MODES if block % 2 else MODES[::-1]:
            dist.barrier()
            began = time.perf_counter()
            for index in range(size["steps"]):
                step(mode, block * size["steps"] + index)
            dist.barrier()
            if block:
                block_ms[mode].append(1000 * (time.perf_counter() - began) / size["steps"])
    results = {}
    for mode, (_model, optimizer) in runs.items():
        held = torch.tensor([float(state_bytes(optimizer))], dtype=torch.float64)
        every = [torch.zeros_like(held) for _ in range(WORKERS)]
        dist.all_gather(every, held)
        results[mode] = {"state_bytes_per_worker": [int(t.item()) for t in every],
                         "step_ms": statistics.median(block_ms[mode]), "block_step_ms": block_ms[mode]}
    weights = {mode: torch.cat([p.detach().flatten() for p in model.parameters()]) for mode, (model, _) in runs.items()}
    results["parameters"] = weights["sharded"].numel()
    results["max_abs_weight_difference"] = float((weights["sharded"] - weights["replicated"]).abs().max())
    results["bitwise_equal"] = bool(torch.equal(weights["sharded"], weights["replicated"]))
    gloo.finish(rank, out, results)


def run(size_name: str, output_dir: Path) -> dict:
    measured = gloo.spawn(_process, (SIZES[size_name],), WORKERS, output_dir / "sharded_state.json")
    result = {"size": SIZES[size_name], "workers": WORKERS, "optimizer": "adamw", **measured}
    replicated = max(result["replicated"]["state_bytes_per_worker"])
    ratio = max(result["sharded"]["state_bytes_per_worker"]) / replicated
    result["targets"] = [{"name": "optimizer state of the most loaded worker, sharded / replicated", "value": ratio,
                          "target": f"<= {TARGET_RATIO}", "pass": ratio <= TARGET_RATIO}]
    return result


def table(result: dict) -> str:
    lines = ["| optimizer state | MiB per worker (rank 0, rank 1) | ms per optimizer step |", "|---|---|---|"]
    for mode in ("replicated", "sharded"):
        held = ", ".join(f"{b / 2**20:.2f}" for b in result[mode]["state_bytes_per_worker"])
        lines.append(f"| {mode} | {held} | {result[mode]['step_ms']:.1f} |")
    lines.append(f"\n{result['parameters']:,} parameters; largest weight difference sharded - replicated: "
                 f"{result['max_abs_weight_difference']:.3g} (bitwise equal: {result['bitwise_equal']})")
    return "\n".join(lines)


if __name__ == "__main__":  # pragma: no cover - python -m benchmarks runs it
    print(json.dumps(run("smoke", Path(os.environ.get("TMPDIR", "/tmp"))), indent=2))
