"""DDP against the parameter server (train.strategy), side by side in one run: the same synthetic rows, model,
batch, lr and samples, 2 workers, 1 CPU each, through `rayscale train` (trainer.train).

For each of ddp, parameter_server sync and parameter_server async (ps.max_staleness 2) it reports the steady
throughput (epoch 1's end to the last epoch's end), the bytes each worker moves per optimizer step, and the
final validation loss and accuracy. DDP's bytes are computed, not measured: gloo's ring all-reduce sends (and
receives) 2 (N - 1) / N times the gradient's bytes per worker; the parameter server's are counted by its client
(every parameter pulled, every gradient pushed). Target (issue 9): sync's val_loss equals DDP's (the same model
within fp32 rounding); the rest are findings.
"""

from __future__ import annotations

from pathlib import Path

SIZES = {
    "full": {"rows": 40_000, "features": 64, "hidden": [256, 256], "global_batch": 256, "epochs": 3},
    "smoke": {"rows": 1_024, "features": 16, "hidden": [32], "global_batch": 128, "epochs": 2},
}
WORKERS = 2
STRATEGIES = {"ddp": ["train.strategy=ddp"],
              "ps_sync": ["train.strategy=parameter_server", "ps.mode=sync", "ps.num_servers=2"],
              "ps_async": ["train.strategy=parameter_server", "ps.mode=async", "ps.num_servers=2",
                           "ps.max_staleness=2"]}


def _overrides(size: dict, output_dir: Path, name: str) -> list[str]:
    return [f"run.output_dir={output_dir}", f"run.name={name}", "data.source=synthetic",
            f"data.synthetic.rows={size['rows']}", f"data.synthetic.num_features={size['features']}",
            "data.val_fraction=0.1", f"model.kwargs={{hidden_sizes: {size['hidden']}}}",
            f"scaling.num_workers={WORKERS}", f"batch.global_batch_size={size['global_batch']}",
            f"batch.micro_batch_size={size['global_batch'] // WORKERS}", f"train.epochs={size['epochs']}",
            f"train.log_every_samples={size['rows']}", "train.noise_scale=false", "optim.name=sgd", "optim.lr=0.05",
            "schedule.name=constant", "schedule.warmup_samples=0"]


def _one(size: dict, output_dir: Path, name: str) -> dict:
    from rayscale import config
    from rayscale.driver.outputs import read_metrics
    from rayscale.launch import trainer

    cfg = config.load(overrides=[*_overrides(size, output_dir, name), *STRATEGIES[name]])
    summary = trainer.train(cfg)
    records = read_metrics(Path(summary["run_dir"]))
    ends = [r for r in records if r.get("epoch_end")]
    first, last = ends[0], ends[-1]
    steps = [r for r in records if not r.get("evaluation") and r.get("bytes_pulled_per_step") is not None]
    if name == "ddp":
        from rayscale.data import sources
        from rayscale.models import build_model

        spec = sources.inspect_source(cfg.data.source, cfg.data, cfg.seed).spec
        gradient_bytes = sum(p.numel() * p.element_size() for p in build_model(cfg.model, spec).parameters())
        moved = 2 * (WORKERS - 1) / WORKERS * gradient_bytes * 2  # sent + received
    else:
        moved = (steps[-1]["bytes_pulled_per_step"] + steps[-1]["bytes_pushed_per_step"]) if steps else None
    staleness = [r["staleness_mean"] for r in records if r.get("staleness_mean") is not None]
    return {"samples_per_sec": (last["samples_seen"] - first["samples_seen"]) / max(last["time"] - first["time"],
                                                                                    1e-9),
            "bytes_per_step": moved, "samples_seen": summary["samples_seen"],
            "val_loss": summary["final"].get("val_loss"), "val_accuracy": summary["final"].get("val_accuracy"),
            "staleness_mean": sum(staleness) / len(staleness) if staleness else None,
            "staleness_max": max((r.get("staleness_max") or 0 for r in records), default=None)
            if name == "ps_async" else None,
            "wall_s": summary["wall_time_s"]}


def run(size_name: str, work: Path) -> dict:
    size = SIZES[size_name]
    result = {"size": size, "workers": WORKERS}
    for name in STRATEGIES:
        result[name] = _one(size, work, name)
    ddp, sync = result["ddp"]["val_loss"], result["ps_sync"]["val_loss"]
    result["targets"] = [{"name": "|val_loss sync PS - DDP|", "value": abs(sync - ddp), "target": "< 1e-4",
                          "pass": abs(sync - ddp) < 1e-4}]
    return result


def table(result: dict) -> str:
    lines = ["| strategy | steady samples/s | bytes moved per worker per step | val_loss | val_accuracy | "
             "staleness mean / max | wall s |", "|---|---|---|---|---|---|---|"]
    for key, label in (("ddp", "DDP (gloo all-reduce)"), ("ps_sync", "parameter server, sync, 2 servers"),
                       ("ps_async", "parameter server, async, 2 servers, max_staleness 2")):
        r = result[key]
        stale = f"{r['staleness_mean']:.2f} / {r['staleness_max']}" if r["staleness_mean"] is not None else "-"
        moved = f"{r['bytes_per_step'] / 2**10:,.0f} KiB" if r["bytes_per_step"] is not None else "-"
        lines.append(f"| {label} | {r['samples_per_sec']:,.0f} | {moved} | {r['val_loss']:.4f} | "
                     f"{r['val_accuracy']:.4f} | {stale} | {r['wall_s']:.1f} |")
    return "\n".join(lines)
