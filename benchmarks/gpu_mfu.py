"""GPU hardware limit: a GPT-style model in bf16 through `rayscale train` on one GPU, against the card's peak and
against a raw PyTorch loop on the same GPU (issue 7, item 4).

  (a) rayscale: `rayscale train`, 1 GPU worker, bf16 autocast, AdamW, the model `benchmarks.gpt:make`, reading
      fixed-length token sequences from a Parquet file this script writes (Ray Data, the worker cache from
      epoch 2). Steady tokens/s from the workers' log lines after the first.
  (b) raw: the same model, optimizer, batch and autocast in a plain loop over random tokens already on the GPU,
      timed with `torch.cuda.synchronize`.

Training FLOPs per step are counted by PyTorch's FlopCounterMode on one forward and backward of (b) (matmuls
and attention, causal attention counted whole as in PaLM's MFU). MFU = achieved FLOP/s / --peak-tflops
(default 989: H100 SXM, bf16, dense). Targets: MFU >= 40%, rayscale / raw >= 0.97.

    python -m benchmarks.gpu_mfu [--peak-tflops 989] [--output-dir DIR] [--results-dir DIR]
    python -m benchmarks.gpu_mfu --smoke     # tiny, on the CPU when there is no GPU: proves the script runs

Writes benchmarks/results/gpu_mfu[.smoke].json and prints a Markdown table. Without a GPU (and without
--smoke) it says so and exits 2.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

from benchmarks import RESULTS

REPO = Path(__file__).resolve().parents[1]

SIZES = {
    "full": {"d_model": 2048, "n_layer": 16, "n_head": 16, "length": 1024, "vocab": 8192, "batch": 16,
             "rows": 2048, "epochs": 2, "raw_steps": 30},
    "smoke": {"d_model": 32, "n_layer": 2, "n_head": 2, "length": 16, "vocab": 64, "batch": 8,
              "rows": 64, "epochs": 2, "raw_steps": 3},
}
H100_BF16_PEAK_TFLOPS = 989.0
TARGET_MFU, TARGET_RATIO = 0.40, 0.97


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


def step_flops(size: dict, device) -> float:
    import torch
    from torch.utils.flop_counter import FlopCounterMode

    from benchmarks.gpt import make

    model = make(**model_kwargs(size)).to(device)
    x = torch.randint(0, size["vocab"], (size["batch"], size["length"]), device=device)
    with FlopCounterMode(display=False) as counter:
        with torch.autocast(device_type=device.type, dtype=torch.bfloat16):
            logits = model(x)
        torch.nn.functional.cross_entropy(logits.float().flatten(0, 1), x.flatten()).backward()
    return float(counter.get_total_flops())


def run_raw(size: dict, device) -> dict:
    import torch

    from benchmarks.gpt import make

    torch.manual_seed(0)
    model = make(**model_kwargs(size)).to(device)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4, fused=device.type == "cuda")
    x = torch.randint(0, size["vocab"], (size["batch"], size["length"]), device=device)
    y = torch.randint(0, size["vocab"], (size["batch"], size["length"]), device=device)

    def step():
        optimizer.zero_grad(set_to_none=True)
        with torch.autocast(device_type=device.type, dtype=torch.bfloat16):
            logits = model(x)
        torch.nn.functional.cross_entropy(logits.float().flatten(0, 1), y.flatten()).backward()
        optimizer.step()

    def synchronize():
        if device.type == "cuda":
            torch.cuda.synchronize()

    for _ in range(3):
        step()
    synchronize()
    began = time.perf_counter()
    for _ in range(size["raw_steps"]):
        step()
    synchronize()
    seconds = time.perf_counter() - began
    return {"tokens_per_sec": size["raw_steps"] * size["batch"] * size["length"] / seconds,
            "steps_per_sec": size["raw_steps"] / seconds}


def run_rayscale(size: dict, output_dir: Path, use_gpu: bool) -> dict:
    from benchmarks.scale import steady_samples_per_sec
    from rayscale import config, trainer

    data = output_dir / "sequences.parquet"
    write_sequences(data, size)
    kwargs = json.dumps(model_kwargs(size))
    cfg = config.load(overrides=[
        f"run.output_dir={output_dir}", "run.name=gpt", f"data.source={data}", "data.sequence=tokens",
        "data.label=labels", f"data.num_classes={size['vocab']}", "data.val_fraction=0", "data.shuffle=none",
        "model.name=benchmarks.gpt:make", f"model.kwargs={kwargs}", "scaling.num_workers=1",
        f"scaling.use_gpu={str(use_gpu).lower()}", "train.precision=bf16", f"train.epochs={size['epochs']}",
        f"batch.global_batch_size={size['batch']}", f"batch.micro_batch_size={size['batch']}",
        f"train.log_every_samples={size['batch'] * 10}", "optim.name=adamw", "optim.lr=1e-4",
        "schedule.name=constant", "schedule.warmup_samples=0"])
    summary = trainer.train(cfg)
    rate = steady_samples_per_sec(trainer.read_metrics(Path(summary["run_dir"])))
    return {"tokens_per_sec": rate * size["length"] if rate else None, "startup_s": summary["startup_time_s"],
            "wall_s": summary["wall_time_s"]}


def run(size_name: str, output_dir: Path, peak_tflops: float = H100_BF16_PEAK_TFLOPS) -> dict:
    """The benchmark, for `python -m benchmarks` and `main`. A full run without a GPU is reported as not run."""
    import torch

    use_gpu = torch.cuda.is_available()
    if not use_gpu and size_name != "smoke":
        return {"device": "cpu", "not_run": "no CUDA GPU on this machine", "targets": []}
    device = torch.device("cuda" if use_gpu else "cpu")
    size = SIZES[size_name]
    flops_per_token = step_flops(size, device) / (size["batch"] * size["length"])
    raw = run_raw(size, device)
    if use_gpu:
        torch.cuda.empty_cache()  # the raw loop's model and optimizer go before rayscale's worker starts
    ours = run_rayscale(size, output_dir, use_gpu)
    peak = peak_tflops * 1e12
    for part in (raw, ours):
        part["mfu"] = part["tokens_per_sec"] * flops_per_token / peak if part["tokens_per_sec"] else None
    ratio = ours["tokens_per_sec"] / raw["tokens_per_sec"] if ours["tokens_per_sec"] else None
    return {
        "size": size, "device": torch.cuda.get_device_name(0) if use_gpu else "cpu", "peak_tflops": peak_tflops,
        "flops_per_token": flops_per_token, "raw": raw, "rayscale": ours, "ratio": ratio,
        "targets": [  # verdicts only on a GPU: the CPU smoke proves the script, not the figures
            {"name": "rayscale MFU (bf16)", "value": ours["mfu"] or 0.0, "target": f">= {TARGET_MFU:.0%}",
             "pass": (ours["mfu"] is not None and ours["mfu"] >= TARGET_MFU) if use_gpu else None},
            {"name": "rayscale / raw PyTorch tokens/s", "value": ratio or 0.0, "target": f">= {TARGET_RATIO}",
             "pass": (ratio is not None and ratio >= TARGET_RATIO) if use_gpu else None},
        ],
    }


def table(result: dict) -> str:
    if "not_run" in result:
        return f"Not run: {result['not_run']}."
    size = result["size"]
    lines = [f"GPT-style model, d_model {size['d_model']}, {size['n_layer']} layers, {size['length']} tokens, "
             f"batch {size['batch']}, bf16, on {result['device']} (peak {result['peak_tflops']:g} TFLOP/s)", "",
             "| | tokens/s | MFU |", "|---|---|---|"]
    for label, part in (("(a) rayscale train", result["rayscale"]), ("(b) raw PyTorch loop", result["raw"])):
        mfu = f"{part['mfu']:.1%}" if part["mfu"] is not None else "-"
        lines.append(f"| {label} | {part['tokens_per_sec'] or 0:,.0f} | {mfu} |")
    lines.append(f"\nrayscale / raw: {result['ratio']:.3f}" if result["ratio"] else "\nrayscale / raw: -")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--smoke", action="store_true", help="tiny sizes; on the CPU when there is no GPU")
    parser.add_argument("--peak-tflops", type=float, default=H100_BF16_PEAK_TFLOPS,
                        help="the card's dense bf16 peak (default 989, H100 SXM)")
    parser.add_argument("--output-dir", type=Path, default=None, help="scratch space (default: a new temporary dir)")
    parser.add_argument("--results-dir", type=Path, default=RESULTS, help="where the JSON goes (default "
                                                                          "benchmarks/results)")
    args = parser.parse_args(argv)
    os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")  # before anything imports ray
    add_repository_to_worker_path()
    output_dir = args.output_dir or Path(tempfile.mkdtemp(prefix="rayscale-gpu-mfu-"))
    output_dir.mkdir(parents=True, exist_ok=True)
    result = run("smoke" if args.smoke else "full", output_dir, args.peak_tflops)
    if "not_run" in result:
        print("benchmarks.gpu_mfu: no CUDA GPU here; run it on a GPU machine (or --smoke to check the script)",
              file=sys.stderr)
        return 2
    print(table(result))
    args.results_dir.mkdir(parents=True, exist_ok=True)
    path = args.results_dir / f"gpu_mfu{'.smoke' if args.smoke else ''}.json"
    path.write_text(json.dumps(result, indent=2) + "\n")
    print(f"[benchmark] wrote {path}")
    return 0


def add_repository_to_worker_path() -> None:
    """The workers import the model factory (benchmarks.gpt): they inherit PYTHONPATH when the embedded Ray
    starts, so this must run before it does."""
    os.environ["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")]))


if __name__ == "__main__":
    raise SystemExit(main())
