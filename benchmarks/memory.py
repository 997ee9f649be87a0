"""Memory per worker: against the micro-batch size at a fixed global batch, and over epochs.

  (a) micro-batch sweep: `rayscale train`, 2 workers, one global batch size, micro-batches from the whole
      per-worker batch down to an eighth of it. Each run's `peak_memory_mb` (max over workers: the peak resident
      set of a CPU worker, `torch.cuda.max_memory_allocated` on a GPU) is compared with the activation memory
      the micro-batch needs, estimated as micro-batch x (sum of hidden widths x 2: a Linear's output and its
      ReLU's) x 4 bytes; the weights, gradients and momentum are the same in every run.
      Target: the peak falls with the micro-batch, by at least half the estimated activation difference
      between the largest and smallest micro-batch (micro-batching bounds activation memory).
  (b) epochs: one run of several epochs; `memory_mb` (memory held now, max over workers) at every epoch end.
      Epoch 1 fills each worker's data cache, so growth is measured from the end of epoch 2 to the last.
      Target: under 5% (no leak).

On CPU a worker's resident set also holds Ray, torch and Ray Data (several hundred MiB), the same in every run,
so the sweep compares differences, not totals.
"""

from __future__ import annotations

from pathlib import Path

SIZES = {
    "full": {"workers": 2, "features": 256, "hidden": [2048, 2048, 2048], "global_batch": 4096, "steps": 4,
             "micro": [2048, 1024, 512, 256], "epoch_rows": 16_384, "epochs": 6, "epoch_hidden": [512, 512],
             "epoch_batch": 256},
    # Local mode (the loop in the driver): a smoke run proves the script, not the figures, so it skips
    # the worker start-up.
    "smoke": {"workers": 0, "features": 16, "hidden": [64], "global_batch": 128, "steps": 2, "micro": [64, 16],
              "epoch_rows": 512, "epochs": 3, "epoch_hidden": [32], "epoch_batch": 64},
}
MAX_EPOCH_GROWTH = 0.05


def _overrides(output_dir: Path, name: str, workers: int, rows: int, features: int, hidden: list[int],
               global_batch: int, micro: int, epochs: int) -> list[str]:
    return [f"run.output_dir={output_dir}", f"run.name={name}", "data.source=synthetic",
            f"data.synthetic.rows={rows}", f"data.synthetic.num_features={features}", "data.val_fraction=0",
            f"model.kwargs={{hidden_sizes: {hidden}}}", f"scaling.num_workers={workers}",
            f"batch.global_batch_size={global_batch}", f"batch.micro_batch_size={micro}",
            f"train.epochs={epochs}", f"train.log_every_samples={global_batch}", "optim.lr=0.01"]


def activation_mb(micro: int, hidden: list[int]) -> float:
    return micro * sum(hidden) * 2 * 4 / 2**20


def micro_sweep(size: dict, output_dir: Path) -> list[dict]:
    from rayscale import config
    from rayscale.driver.outputs import read_metrics
    from rayscale.launch import trainer

    rows = size["global_batch"] * size["steps"]
    points = []
    for micro in size["micro"]:
        cfg = config.load(overrides=_overrides(output_dir, f"micro{micro}", size["workers"], rows, size["features"],
                                               size["hidden"], size["global_batch"], micro, 1))
        summary = trainer.train(cfg)
        records = read_metrics(Path(summary["run_dir"]))
        points.append({"micro_batch_size": micro, "accumulation_steps": summary["batch_plan"]["accumulation_steps"],
                       "peak_memory_mb": max(r["peak_memory_mb"] for r in records),
                       "activation_estimate_mb": activation_mb(micro, size["hidden"])})
        print(f"memory: micro-batch {micro}: peak {points[-1]['peak_memory_mb']:.0f} MiB per worker", flush=True)
    return points


def over_epochs(size: dict, output_dir: Path) -> list[dict]:
    from rayscale import config
    from rayscale.driver.outputs import read_metrics
    from rayscale.launch import trainer

    cfg = config.load(overrides=_overrides(output_dir, "epochs", size["workers"], size["epoch_rows"],
                                           size["features"], size["epoch_hidden"], size["epoch_batch"], 32,
                                           size["epochs"]))
    summary = trainer.train(cfg)
    ends = [r for r in read_metrics(Path(summary["run_dir"])) if r.get("epoch_end")]
    return [{"epoch": r["epoch"] + 1, "memory_mb": r["memory_mb"], "peak_memory_mb": r["peak_memory_mb"]}
            for r in ends]


def run(size_name: str, output_dir: Path) -> dict:
    from rayscale.launch.connect import connect

    size = SIZES[size_name]
    connect(None)
    sweep = micro_sweep(size, output_dir)
    epochs = over_epochs(size, output_dir)
    largest, smallest = sweep[0], sweep[-1]
    saved = largest["peak_memory_mb"] - smallest["peak_memory_mb"]
    estimated = largest["activation_estimate_mb"] - smallest["activation_estimate_mb"]
    growth = (epochs[-1]["memory_mb"] - epochs[1]["memory_mb"]) / epochs[1]["memory_mb"]
    return {
        "size": size, "workers": size["workers"], "micro_sweep": sweep, "epochs": epochs,
        "targets": [
            {"name": "peak saved by the smallest micro-batch / estimated activation difference",
             "value": saved / estimated, "target": ">= 0.5", "pass": saved / estimated >= 0.5},
            {"name": f"memory growth, end of epoch 2 to epoch {len(epochs)}", "value": growth,
             "target": f"< {MAX_EPOCH_GROWTH:.0%}", "pass": growth < MAX_EPOCH_GROWTH},
        ],
    }


def table(result: dict) -> str:
    lines = ["| micro-batch | accumulation steps | peak per worker (MiB) | activations, estimated (MiB) |",
             "|---|---|---|---|"]
    for p in result["micro_sweep"]:
        lines.append(f"| {p['micro_batch_size']} | {p['accumulation_steps']} | {p['peak_memory_mb']:,.0f} | "
                     f"{p['activation_estimate_mb']:,.0f} |")
    lines += ["", "| epoch | memory held at its end (MiB, max over workers) |", "|---|---|"]
    lines += [f"| {e['epoch']} | {e['memory_mb']:,.1f} |" for e in result["epochs"]]
    return "\n".join(lines)
