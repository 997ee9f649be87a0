"""train.compile on CPU: rayscale's training step compiled (inductor) against eager, side by side in one process.

    .venv/bin/python -m benchmarks.compile [--blocks 8] [--steps 10] [--threads 1] [--backend inductor] [--smoke]

Three configs, each run twice from the same initial weights with the same rows, the step the worker runs
(`engine.step.train_step` with the optimizer `build_optimizer` makes), eager and with train.compile's
compiled forward and loss (`Compilation("inductor")`, or `--backend`):
  throughput   the throughput benchmark's model: MLP 64-512-512-10, 128 rows a step, SGD with momentum;
  transformer  benchmarks.gpt's decoder, small: d_model 128, 2 layers, 4 heads, 64 tokens, vocabulary 256,
               16 sequences a step, AdamW, a token-classification (next-token-style) loss;
  transformer_sequences  configs/transformer_sequences.yaml as shipped: the built-in Transformer (d_model 64,
               2 layers, 4 heads, feed-forward 128) on its synthetic sequences, micro-batches of 32 sequences
               cut from one length-bucketed window (lengths 2..32, each padded to its longest, as the worker
               collates them), AdamW, grad_clip 1.0.
The first steps (compilation) are timed apart; then the two alternate in blocks of steps, each block's order
reversed from the last, so that the drift of a shared machine falls on both. Reported: samples/s of each (median
over blocks) and the median over blocks of compiled / eager. Target (issue 30): >= 1.2 on a transformer config.
No Ray: what compile changes is the step, and a worker's step is this one.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

CONFIGS = {
    "throughput": {"kind": "mlp", "rows": 128, "features": 64, "hidden": [512, 512], "classes": 10,
                   "optimizer": "sgd", "lr": 0.05},
    "transformer": {"kind": "gpt", "rows": 16, "length": 64, "vocab": 256, "d_model": 128, "n_layer": 2,
                    "n_head": 4, "optimizer": "adamw", "lr": 3e-4},
    "transformer_sequences": {"kind": "shipped", "file": "configs/transformer_sequences.yaml", "rows": 32},
}
SMOKE = {"throughput": {"hidden": [32]}, "transformer": {"d_model": 32, "n_layer": 1, "length": 16},
         "transformer_sequences": {"overrides": ["model.kwargs.d_model=16", "model.kwargs.num_layers=1"]}}
TARGET = 1.2  # compiled / eager on a transformer config
ROOT = Path(__file__).resolve().parent.parent


def _shipped(config: dict):
    """A shipped config's model, optimizer, micro-batches (as its worker collates them) and task."""
    import numpy as np
    import torch

    from rayscale import config as configs
    from rayscale.data import sources
    from rayscale.data.assembly import take
    from rayscale.data.collate import collate
    from rayscale.engine.optimizers import build_optimizer
    from rayscale.models.factory import build_model

    cfg = configs.load(ROOT / config["file"], overrides=config.get("overrides", []))
    info = sources.inspect_source(cfg.data.source, cfg.data, cfg.seed)
    rows = sources.read_chunk(info.kind, info.chunks[0], cfg.data, cfg.seed)
    # One lane's shuffle window sorted by length (bucket_by_length) and cut into micro-batches; 16 of them, evenly
    # spaced over the window, so their lengths spread over 2..max_length as an epoch's do. Two make a step.
    window = cfg.data.shuffle_buffer_rows // 2
    by_length = np.argsort([len(tokens) for tokens in rows["x"][:window]], kind="stable")
    groups = len(by_length) // config["rows"]
    batches = [collate(take(rows, by_length[g * config["rows"]:(g + 1) * config["rows"]]), torch.device("cpu"))
               for g in np.linspace(0, groups - 1, 16).astype(int)]
    torch.manual_seed(cfg.seed)
    model = build_model(cfg.model, info.spec)
    steps = [batches[i:i + 2] for i in range(0, len(batches), 2)]
    return (model, lambda m: build_optimizer(cfg.optim, m, cfg.optim.lr), steps, info.spec.task, cfg.optim.lr,
            cfg.train.grad_clip)


def _setup(config: dict, seed: int = 0):
    """(model, optimizer-making function, the steps' micro-batches, the task, lr, grad_clip)."""
    import torch

    if config["kind"] == "shipped":
        return _shipped(config)

    from rayscale.config import OptimConfig
    from rayscale.engine.optimizers import build_optimizer
    from rayscale.models import MLP

    torch.manual_seed(seed)
    generator = torch.Generator().manual_seed(seed + 1)
    if config["kind"] == "mlp":
        model = MLP(config["features"], config["classes"], tuple(config["hidden"]))
        batches = [{"x": torch.randn(config["rows"], config["features"], generator=generator),
                    "y": torch.randint(0, config["classes"], (config["rows"],), generator=generator)}
                   for _ in range(8)]
        task = "classification"
    else:
        from benchmarks.gpt import make

        model = make(config["vocab"], config["length"], config["vocab"], config["d_model"], config["n_layer"],
                     config["n_head"])
        shape = (config["rows"], config["length"])
        batches = [{"x": torch.randint(0, config["vocab"], shape, generator=generator),
                    "y": torch.randint(0, config["vocab"], shape, generator=generator),
                    "mask": torch.ones(shape, dtype=torch.bool)} for _ in range(8)]
        task = "token_classification"
    optim = OptimConfig(name=config["optimizer"], lr=config["lr"], momentum=0.9, weight_decay=0.0)
    return model, lambda m: build_optimizer(optim, m, config["lr"]), [[b] for b in batches], task, config["lr"], None


def measure(config: dict, blocks: int, steps: int, backend: str = "inductor") -> dict:
    import torch

    from rayscale.engine.components.compilation import Compilation
    from rayscale.engine.precision import make_precision
    from rayscale.engine.step import forward_and_loss, train_step

    precision = make_precision("fp32", torch.device("cpu"))
    compiled = Compilation(backend)
    loops = {}
    for name, forward_loss in (("eager", forward_and_loss), ("compiled", compiled.forward_loss)):
        model, make_optimizer, steps_of, task, lr, grad_clip = _setup(config)
        loops[name] = (model, make_optimizer(model), steps_of, task, forward_loss)

    def run(name: str, count: int) -> float:
        model, optimizer, steps_of, task, forward_loss = loops[name]
        began = time.perf_counter()
        for index in range(count):
            result = train_step(model, steps_of[index % len(steps_of)], optimizer, task=task, lr=lr,
                                precision=precision, grad_clip=grad_clip, global_count=None,
                                forward_loss=forward_loss)
        result.loss_sum.item()
        return time.perf_counter() - began

    # Compilation (every shape the steps have), and the optimizer's lazy state.
    first = {name: run(name, len(steps_of)) for name in loops}
    seconds = {name: [] for name in loops}
    for block in range(blocks):
        for name in (("eager", "compiled") if block % 2 == 0 else ("compiled", "eager")):
            seconds[name].append(run(name, steps))
    rows = config["rows"] * sum(len(steps_of[index % len(steps_of)]) for index in range(steps))
    ratios = [eager / compiled_s for eager, compiled_s in zip(seconds["eager"], seconds["compiled"], strict=True)]
    return {"config": config, "first_steps_s": first, "graphs": compiled.graphs,
            "samples_per_sec": {name: rows / statistics.median(times) for name, times in seconds.items()},
            "compiled_over_eager": statistics.median(ratios), "per_block": ratios}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--blocks", type=int, default=8)
    parser.add_argument("--steps", type=int, default=10, help="steps per block")
    parser.add_argument("--threads", type=int, default=1, help="torch threads (a throughput worker has 1)")
    parser.add_argument("--smoke", action="store_true", help="tiny models: proves the script works")
    parser.add_argument("--backend", default="inductor", help="train.compile's backend (aot_eager: no C++ compiler)")
    parser.add_argument("--json", type=Path, help="also write the figures here")
    args = parser.parse_args(argv)
    import torch

    torch.set_num_threads(args.threads)
    results = {}
    for name, config in CONFIGS.items():
        config = {**config, **(SMOKE[name] if args.smoke else {})}
        results[name] = measure(config, args.blocks, args.steps, args.backend)
    print(f"torch {torch.__version__}, {args.backend}, {args.threads} thread(s), {args.blocks} blocks of "
          f"{args.steps} steps")
    print("| config | eager samples/s | compiled samples/s | compiled / eager (median over blocks) | graphs | "
          "first cycle of steps eager / compiled s (compiles) |")
    print("|---|---|---|---|---|---|")
    for name, result in results.items():
        rate, first = result["samples_per_sec"], result["first_steps_s"]
        print(f"| {name} | {rate['eager']:,.0f} | {rate['compiled']:,.0f} | {result['compiled_over_eager']:.3f} | "
              f"{result['graphs']} | {first['eager']:.2f} / {first['compiled']:.2f} |")
    for name in ("transformer", "transformer_sequences"):
        ratio = results[name]["compiled_over_eager"]
        print(f"target: {name} compiled / eager >= {TARGET}: {'PASS' if ratio >= TARGET else 'FAIL'} ({ratio:.3f})")
    if args.json:
        args.json.write_text(json.dumps(results, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
