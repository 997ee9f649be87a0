"""GPU hardware limit: a GPT-style model in bf16 through `rayscale train` on one GPU, against the card's peak and
against a raw PyTorch loop on the same GPU (issue 7, item 4).

  (a) rayscale: `rayscale train`, 1 GPU worker, bf16 autocast, AdamW, the model `benchmarks.gpt:make`, reading
      fixed-length token sequences from a Parquet file this script writes (Ray Data). One epoch: its steady
      tokens/s run from the workers' first log line to the epoch's last, so start-up and the first steps are
      left out, and so is the epoch-end checkpoint (the model and AdamW's moments, ~5 GB at the full size),
      which the raw loop does not write.
  (b) raw: the same model, optimizer, batch and autocast in a plain loop over random tokens already on the GPU,
      timed with `torch.cuda.synchronize`.
  (c) rayscale's step alone: `rayscale.engine.step.train_step` (loss as a sum over the global token count, gradient
      norm and non-finite guard, fused AdamW) in the same plain loop as (b), without Ray or the data path. A gap
      between (a) and (b) splits into the step's share, (c)/(b), and Ray's and the data path's, (a)/(c).

Training FLOPs per step are counted by PyTorch's FlopCounterMode on one forward and backward of (b) (matmuls
and attention, causal attention counted whole as in PaLM's MFU). MFU = achieved FLOP/s / --peak-tflops
(default 989: H100 SXM, bf16, dense; the H200 has the same tensor cores). The script also times a large bf16
matrix product on the card, the rate a real GEMM reaches there, and reports MFU against that too.
Targets: MFU >= 40%, rayscale / raw >= 0.97.
With --compile, (a) runs with train.compile true and (c) with its compiled forward and loss (inductor), while
(b) stays the raw eager loop; the steady window of (a) starts after its first log line, so compilation is left
out of it as start-up is. Targets then (issue 30): MFU >= 55%, rayscale / raw eager >= 1.0.

    python -m benchmarks.gpu_mfu [--compile] [--peak-tflops 989] [--output-dir DIR] [--results-dir DIR]
    python -m benchmarks.gpu_mfu --smoke     # tiny, on the CPU when there is no GPU: proves the script runs

Writes benchmarks/results/gpu_mfu[.smoke].json and prints a Markdown table. Without a GPU (and without
--smoke) it says so and exits 2. On a lent GPU machine, benchmarks/gpu_check.sh runs it (benchmarks/README.md).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import time
from pathlib import Path

from benchmarks import RESULTS, scratch_or_none

REPO = Path(__file__).resolve().parents[1]

SIZES = {
    # ~440M parameters: d_model sets the matmuls' size (and so MFU); 8 layers keep the epoch-end checkpoint (the
    # weights and AdamW's two moments, ~5 GB, written twice: staged, then into the run's storage) small on a
    # lent machine's 64 GiB disk.
    "full": {"d_model": 2048, "n_layer": 8, "n_head": 16, "length": 1024, "vocab": 8192, "batch": 16,
             "rows": 2048, "timed_steps": 30, "matmul": 8192},
    "smoke": {"d_model": 32, "n_layer": 2, "n_head": 2, "length": 16, "vocab": 64, "batch": 8,
              "rows": 64, "timed_steps": 3, "matmul": 256},
}
H100_BF16_PEAK_TFLOPS = 989.0
TARGET_MFU, TARGET_RATIO = 0.40, 0.97
TARGET_MFU_COMPILED, TARGET_RATIO_COMPILED = 0.55, 1.0  # train.compile against the raw eager loop
LR = 1e-4


def write_sequences(path: Path, size: dict, seed: int = 0) -> None:
    """Fixed-length token sequences; the label of a token is the next one (a language model's target)."""
    import numpy as np
    import pyarrow as pa
    import pyarrow.parquet as pq

    rng = np.random.default_rng(seed)
    tokens = rng.integers(0, size["vocab"], size=(size["rows"], size["length"] + 1), dtype=np.int64)
    table = pa.table({"tokens": pa.array(list(tokens[:, :-1])), "labels": pa.array(list(tokens[:, 1:]))})
    pq.write_table(table, path, row_group_size=max(size["rows"] // 8, 1))


def model_kwargs(size: dict) -> dict:
    return {"vocab_size": size["vocab"], "max_length": size["length"], "num_outputs": size["vocab"],
            "d_model": size["d_model"], "n_layer": size["n_layer"], "n_head": size["n_head"]}


def _tokens(size: dict, device):
    import torch

    return torch.randint(0, size["vocab"], (size["batch"], size["length"]), device=device)


def step_flops(size: dict, device) -> float:
    import torch
    from torch.utils.flop_counter import FlopCounterMode

    from benchmarks.gpt import make

    model = make(**model_kwargs(size)).to(device)
    x = _tokens(size, device)
    with FlopCounterMode(display=False) as counter:
        with torch.autocast(device_type=device.type, dtype=torch.bfloat16):
            logits = model(x)
        torch.nn.functional.cross_entropy(logits.float().flatten(0, 1), x.flatten()).backward()
    return float(counter.get_total_flops())


def _synchronize(device) -> None:
    import torch

    if device.type == "cuda":
        torch.cuda.synchronize()


def _timed(step, size: dict, device) -> dict:
    """Tokens/s of `step` over size["timed_steps"] calls, after 3 untimed ones (kernel choice, allocator)."""
    for _ in range(3):
        step()
    _synchronize(device)
    began = time.perf_counter()
    for _ in range(size["timed_steps"]):
        step()
    _synchronize(device)
    seconds = time.perf_counter() - began
    return {"tokens_per_sec": size["timed_steps"] * size["batch"] * size["length"] / seconds,
            "steps_per_sec": size["timed_steps"] / seconds}


def matmul_tflops(size: dict, device) -> float:
    """What one large bf16 matrix product reaches on this device (random operands: zeros run faster)."""
    import torch

    n = size["matmul"]
    a, b = (torch.randn(n, n, device=device, dtype=torch.bfloat16) for _ in range(2))
    timed = _timed(lambda: a @ b, {"timed_steps": 10, "batch": 1, "length": 1}, device)
    return 2 * n**3 * timed["steps_per_sec"] / 1e12


def run_raw(size: dict, device) -> dict:
    import torch

    from benchmarks.gpt import make

    torch.manual_seed(0)
    model = make(**model_kwargs(size)).to(device)
    # rayscale's optim.weight_decay defaults to 0: the same update, in the same fused kernel on CUDA.
    optimizer = torch.optim.AdamW(model.parameters(), lr=LR, weight_decay=0.0, fused=device.type == "cuda")
    x, y = _tokens(size, device), _tokens(size, device)

    def step():
        optimizer.zero_grad(set_to_none=True)
        with torch.autocast(device_type=device.type, dtype=torch.bfloat16):
            logits = model(x)
        torch.nn.functional.cross_entropy(logits.float().flatten(0, 1), y.flatten()).backward()
        optimizer.step()

    return _timed(step, size, device)


def run_step_only(size: dict, device, compiled: bool = False) -> dict:
    """(c): rayscale's train_step, built as the worker builds it, over the same tensors as the raw loop."""
    import torch

    from benchmarks.gpt import make
    from rayscale.config import OptimConfig
    from rayscale.engine.components.compilation import Compilation
    from rayscale.engine.optimizers import build_optimizer
    from rayscale.engine.precision import make_precision
    from rayscale.engine.step import train_step

    forward_loss = Compilation(compiled).forward_loss
    torch.manual_seed(0)
    model = make(**model_kwargs(size)).to(device)
    optimizer = build_optimizer(OptimConfig(name="adamw", lr=LR), model, LR)
    precision = make_precision("bf16", device)
    x, y = _tokens(size, device), _tokens(size, device)
    batch = {"x": x, "y": y, "mask": torch.ones_like(x, dtype=torch.bool)}
    return _timed(lambda: train_step(model, [batch], optimizer, task="token_classification", lr=LR,
                                     precision=precision, forward_loss=forward_loss), size, device)


def log_every_samples(size: dict) -> int:
    """About a dozen log lines in the epoch: the steady window runs from the first to the last."""
    return size["batch"] * max(1, size["rows"] // size["batch"] // 12)


def run_rayscale(size: dict, output_dir: Path, use_gpu: bool, compiled: bool = False) -> dict:
    from benchmarks.scale import steady_samples_per_sec
    from rayscale import config
    from rayscale.driver.outputs import read_metrics
    from rayscale.launch import trainer

    data = output_dir / "sequences.parquet"
    write_sequences(data, size)
    kwargs = json.dumps(model_kwargs(size))
    cfg = config.load(overrides=[
        f"run.output_dir={output_dir}", "run.name=gpt", f"data.source={data}", "data.sequence=tokens",
        "data.label=labels", f"data.num_classes={size['vocab']}", "data.val_fraction=0", "data.shuffle=none",
        "model.name=benchmarks.gpt:make", f"model.kwargs={kwargs}", "scaling.num_workers=1",
        f"scaling.use_gpu={str(use_gpu).lower()}", "train.precision=bf16", "train.epochs=1",
        f"batch.global_batch_size={size['batch']}", f"batch.micro_batch_size={size['batch']}",
        f"train.log_every_samples={log_every_samples(size)}", "optim.name=adamw", f"optim.lr={LR}",
        "schedule.name=constant", "schedule.warmup_samples=0", f"train.compile={str(compiled).lower()}"])
    summary = trainer.train(cfg)
    records = read_metrics(Path(summary["run_dir"]))
    rate = steady_samples_per_sec(records)
    lines = [r for r in records if not r.get("evaluation")]
    # Each log interval's rate and time blocked on data, so a missed ratio shows whether it is steady or spiky and
    # whether the data path is in it.
    return {"tokens_per_sec": rate * size["length"] if rate else None, "startup_s": summary["startup_time_s"],
            "startup_phases_s": summary["startup_phases_s"], "wall_s": summary["wall_time_s"],
            "log_lines": len(records),
            "interval_tokens_per_sec": [round((r.get("samples_per_sec") or 0) * size["length"]) for r in lines],
            "data_wait_fraction": [r.get("data_wait_fraction") for r in lines],
            "peak_memory_mb": max((r.get("peak_memory_mb") or 0 for r in records), default=None)}


def run(size_name: str, output_dir: Path, peak_tflops: float = H100_BF16_PEAK_TFLOPS, compiled: bool = False) -> dict:
    """The benchmark, for `python -m benchmarks` and `main`. A full run without a GPU is reported as not run."""
    import torch

    use_gpu = torch.cuda.is_available()
    if not use_gpu and size_name != "smoke":
        return {"device": "cpu", "not_run": "no CUDA GPU on this machine", "targets": []}
    device = torch.device("cuda" if use_gpu else "cpu")
    size = SIZES[size_name]
    measured_peak = matmul_tflops(size, device)
    flops_per_token = step_flops(size, device) / (size["batch"] * size["length"])
    parts = {}
    for name, measure in (("raw", run_raw), ("step_only", lambda s, d: run_step_only(s, d, compiled))):
        parts[name] = measure(size, device)
        print(f"[gpu_mfu] {name}: {parts[name]['tokens_per_sec']:,.0f} tokens/s", flush=True)
        if use_gpu:
            torch.cuda.empty_cache()  # this loop's model and optimizer go before the next one starts
    parts["rayscale"] = run_rayscale(size, output_dir, use_gpu, compiled)
    target_mfu, target_ratio = (TARGET_MFU_COMPILED, TARGET_RATIO_COMPILED) if compiled else (TARGET_MFU, TARGET_RATIO)
    for part in parts.values():
        rate = part["tokens_per_sec"]
        part["tflops"] = rate * flops_per_token / 1e12 if rate else None
        part["mfu"] = part["tflops"] / peak_tflops if rate else None
        part["of_measured_matmul"] = part["tflops"] / measured_peak if rate else None
    raw, ours = parts["raw"]["tokens_per_sec"], parts["rayscale"]["tokens_per_sec"]
    ratio = ours / raw if ours else None
    return {
        "size": size, "compiled": compiled, "device": torch.cuda.get_device_name(0) if use_gpu else "cpu",
        "peak_tflops": peak_tflops,
        "measured_matmul_tflops": measured_peak, "flops_per_token": flops_per_token, **parts, "ratio": ratio,
        "step_only_ratio": parts["step_only"]["tokens_per_sec"] / raw,
        "targets": [  # verdicts only on a GPU: the CPU smoke proves the script, not the figures
            {"name": f"rayscale MFU (bf16{', compiled' if compiled else ''})",
             "value": parts["rayscale"]["mfu"] or 0.0, "target": f">= {target_mfu:.0%}",
             "pass": (parts["rayscale"]["mfu"] or 0.0) >= target_mfu if use_gpu else None},
            {"name": f"rayscale{' compiled' if compiled else ''} / raw eager PyTorch tokens/s", "value": ratio or 0.0,
             "target": f">= {target_ratio}", "pass": (ratio or 0.0) >= target_ratio if use_gpu else None},
        ],
    }


def table(result: dict) -> str:
    if "not_run" in result:
        return f"Not run: {result['not_run']}."
    size = result["size"]
    lines = [f"GPT-style model, d_model {size['d_model']}, {size['n_layer']} layers, {size['length']} tokens, "
             f"batch {size['batch']}, bf16{' (a, c: train.compile)' if result.get('compiled') else ''}, on {result['device']} (peak {result['peak_tflops']:g} TFLOP/s; a "
             f"{size['matmul']}-square bf16 matrix product measured {result['measured_matmul_tflops']:,.1f})", "",
             "| | tokens/s | TFLOP/s | MFU | of the measured matmul |", "|---|---|---|---|---|"]
    for label, key in (("(a) rayscale train", "rayscale"), ("(b) raw PyTorch loop", "raw"),
                       ("(c) rayscale's train_step in (b)'s loop", "step_only")):
        part = result[key]
        cells = [f"{part[f]:.1%}" if part[f] is not None else "-" for f in ("mfu", "of_measured_matmul")]
        tflops = f"{part['tflops']:,.1f}" if part["tflops"] is not None else "-"
        lines.append(f"| {label} | {part['tokens_per_sec'] or 0:,.0f} | {tflops} | {cells[0]} | {cells[1]} |")
    ratio = f"{result['ratio']:.3f}" if result["ratio"] else "-"
    lines.append(f"\nrayscale / raw: {ratio}; rayscale's step alone / raw: {result['step_only_ratio']:.3f}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--smoke", action="store_true", help="tiny sizes; on the CPU when there is no GPU")
    parser.add_argument("--compile", action="store_true", help="(a) and (c) with train.compile (inductor)")
    parser.add_argument("--peak-tflops", type=float, default=H100_BF16_PEAK_TFLOPS,
                        help="the card's dense bf16 peak (default 989, H100 SXM)")
    parser.add_argument("--output-dir", type=Path, default=None, help="scratch space, new or empty (default: a new temporary dir)")
    parser.add_argument("--results-dir", type=Path, default=RESULTS, help="where the JSON goes (default "
                                                                          "benchmarks/results)")
    args = parser.parse_args(argv)
    os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")  # before anything imports ray
    add_repository_to_worker_path()
    output_dir = scratch_or_none("gpu_mfu", args.output_dir)
    if output_dir is None:
        return 2
    try:
        result = run("smoke" if args.smoke else "full", output_dir, args.peak_tflops, args.compile)
    finally:
        if args.output_dir is None:  # our own scratch: the run's checkpoints are gigabytes at the full size
            shutil.rmtree(output_dir, ignore_errors=True)
    if "not_run" in result:
        print("benchmarks.gpu_mfu: no CUDA GPU here; run it on a GPU machine (or --smoke to check the script)",
              file=sys.stderr)
        return 2
    print(table(result))
    args.results_dir.mkdir(parents=True, exist_ok=True)
    path = args.results_dir / f"gpu_mfu{'.compiled' if args.compile else ''}{'.smoke' if args.smoke else ''}.json"
    path.write_text(json.dumps(result, indent=2) + "\n")
    print(f"[benchmark] wrote {path}")
    return 0


def add_repository_to_worker_path() -> None:
    """The workers import the model factory (benchmarks.gpt): they inherit PYTHONPATH when the embedded Ray
    starts, so this must run before it does."""
    os.environ["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")]))


if __name__ == "__main__":
    raise SystemExit(main())
