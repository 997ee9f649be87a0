"""Hardware limit on CPU: the train step's achieved FLOP/s against this machine's measured matmul peak (MFU).

One process, 1 thread (what a 1-CPU Ray worker gets): the peak is the best of several large fp32 matmuls; the
step is the engine's `train_step` on the throughput benchmark's MLP, its FLOPs counted by PyTorch's
FlopCounterMode (forward and backward). On a GPU machine the same question is asked by a bf16 GPT-style model
(issue 7, item 4): benchmarks/gpu_mfu.py.
"""

from __future__ import annotations

import time
from pathlib import Path

SIZES = {"full": {"features": 64, "hidden": [512, 512], "batch": 128, "steps": 40, "matmul": 1024},
         "smoke": {"features": 16, "hidden": [32], "batch": 16, "steps": 3, "matmul": 128}}


def matmul_peak(n: int, repeats: int = 5) -> float:
    import torch

    a, b = torch.randn(n, n), torch.randn(n, n)
    torch.mm(a, b)
    best = float("inf")
    for _ in range(repeats):
        began = time.perf_counter()
        torch.mm(a, b)
        best = min(best, time.perf_counter() - began)
    return 2 * n**3 / best


def run(size_name: str, output_dir: Path) -> dict:
    import torch
    from torch.utils.flop_counter import FlopCounterMode

    from rayscale.engine.precision import make_precision
    from rayscale.engine.step import train_step
    from rayscale.models import MLP

    size = SIZES[size_name]
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        peak = matmul_peak(size["matmul"])
        torch.manual_seed(0)
        model = MLP(size["features"], 10, tuple(size["hidden"]))
        optimizer = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
        precision = make_precision("fp32", torch.device("cpu"))
        batch = [{"x": torch.randn(size["batch"], size["features"]), "y": torch.randint(0, 10, (size["batch"],))}]

        def step():
            train_step(model, batch, optimizer, task="classification", lr=0.01, precision=precision)

        with FlopCounterMode(display=False) as counter:
            step()
        flops = counter.get_total_flops()
        for _ in range(3):
            step()
        began = time.perf_counter()
        for _ in range(size["steps"]):
            step()
        achieved = flops * size["steps"] / (time.perf_counter() - began)
    finally:
        torch.set_num_threads(threads)
    mfu = achieved / peak
    return {"size": size, "threads": 1, "matmul_peak_flops": peak, "step_flops": flops,
            "achieved_flops": achieved, "mfu": mfu,
            "targets": [{"name": "CPU MFU of the train step (1 thread)", "value": mfu, "target": "report",
                         "pass": None}]}


def table(result: dict) -> str:
    return "\n".join([
        "| matmul peak GFLOP/s | train step GFLOP/s | MFU |", "|---|---|---|",
        f"| {result['matmul_peak_flops'] / 1e9:.1f} | {result['achieved_flops'] / 1e9:.1f} | {result['mfu']:.1%} |"])
