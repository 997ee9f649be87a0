"""Training throughput, side by side in one run: the same model, the same rows, 2 workers, 1 thread each.

  (a) `rayscale train` (Ray Data streaming the synthetic source, each worker's cache from epoch 2, a checkpoint
      and a report at every epoch end);
  (b) a minimal Ray Train `TorchTrainer` loop in the style of Ray's docs: in-memory tensors, `prepare_model`,
      `prepare_data_loader`, a `ray.train.report` with a checkpoint at every epoch end;
  (c) a plain `torch.distributed` DDP script: two processes, gloo on 127.0.0.1, in-memory tensors, no Ray.

Steady state is measured from the end of epoch 1 to the end of the last epoch (so each includes the same
epoch-end reports); start-up (launch to the first optimizer step) is reported separately.
Targets (issue 7, CPU): a/b >= 1.0, a/c >= 0.90.

The three run in rounds, (c) without Ray and then (b) and (a) on one embedded Ray, in alternating order: a
2-core machine drifts by more than the few percent compared (one round's a/b ranged 0.93 to 1.08 over four runs
of the same code), so the ratios reported are the medians of each round's own ratios, with their spread.
"""

from __future__ import annotations

import os
import tempfile
import time
from pathlib import Path

import numpy as np

from benchmarks import gloo

SIZES = {
    "full": {"rows": 100_000, "features": 64, "hidden": [512, 512], "classes": 10, "global_batch": 256, "epochs": 3},
    "smoke": {"rows": 2_048, "features": 16, "hidden": [32], "classes": 10, "global_batch": 64, "epochs": 2},
}
WORKERS = 2
LR = 0.05
ROUNDS = {"full": 3, "smoke": 1}
SYSTEMS = (("rayscale", "(a) rayscale train"), ("ray_train", "(b) minimal Ray Train loop"),
           ("plain_ddp", "(c) plain torch DDP"))


def _config_overrides(size: dict, output_dir: Path, name: str) -> list[str]:
    return [f"run.output_dir={output_dir}", f"run.name={name}", "data.source=synthetic",
            f"data.synthetic.rows={size['rows']}", f"data.synthetic.num_features={size['features']}",
            f"data.synthetic.num_classes={size['classes']}", "data.val_fraction=0", "data.shuffle=none",
            f"model.kwargs={{hidden_sizes: {size['hidden']}}}", f"scaling.num_workers={WORKERS}",
            f"batch.global_batch_size={size['global_batch']}",
            f"batch.micro_batch_size={size['global_batch'] // WORKERS}", f"train.epochs={size['epochs']}",
            f"train.log_every_samples={size['rows']}", "optim.name=sgd", f"optim.lr={LR}",
            "optim.scaling_rule=none", "schedule.name=constant", "schedule.warmup_samples=0"]


def load_rows(size: dict) -> tuple[np.ndarray, np.ndarray]:
    """Every row of rayscale's synthetic source, read the way its Ray Data tasks read them."""
    from rayscale import config
    from rayscale.data import sources

    cfg = config.load(overrides=_config_overrides(size, Path("/tmp"), "rows"))
    info = sources.inspect_source("synthetic", cfg.data, cfg.seed)
    parts = [sources.read_chunk(info.kind, chunk, cfg.data, cfg.seed) for chunk in info.chunks]
    return np.concatenate([p["x"] for p in parts]).astype(np.float32), np.concatenate([p["y"] for p in parts])


def _model(size: dict):
    from rayscale.models import MLP

    return MLP(in_features=size["features"], num_outputs=size["classes"], hidden_sizes=tuple(size["hidden"]))


# ------------------------------------------------------------------------------------------ (a) rayscale

def run_rayscale(size: dict, output_dir: Path) -> dict:
    from rayscale import config
    from rayscale.driver.outputs import read_metrics
    from rayscale.launch import trainer

    cfg = config.load(overrides=_config_overrides(size, output_dir, "rayscale"))
    summary = trainer.train(cfg)
    ends = [r for r in read_metrics(Path(summary["run_dir"])) if r.get("epoch_end")]
    first, last = ends[0], ends[-1]
    return {"samples_per_sec": (last["samples_seen"] - first["samples_seen"]) / (last["time"] - first["time"]),
            "startup_s": summary["startup_time_s"], "wall_s": summary["wall_time_s"]}


# -------------------------------------------------------------------------------- (b) minimal Ray Train

def _ray_train_loop(config: dict) -> None:
    import ray.train
    import ray.train.torch
    import torch
    from torch.utils.data import DataLoader, TensorDataset

    size = config["size"]
    x, y = load_rows(size)
    per_worker = size["global_batch"] // WORKERS
    loader = ray.train.torch.prepare_data_loader(
        DataLoader(TensorDataset(torch.from_numpy(x), torch.from_numpy(y)), batch_size=per_worker))
    model = ray.train.torch.prepare_model(_model(size))
    optimizer = torch.optim.SGD(model.parameters(), lr=LR, momentum=0.9)
    loss_fn = torch.nn.CrossEntropyLoss()
    rank = ray.train.get_context().get_world_rank()
    first_step_at, epoch_ends = None, []
    for epoch in range(size["epochs"]):
        if ray.train.get_context().get_world_size() > 1:
            loader.sampler.set_epoch(epoch)
        for features, labels in loader:
            loss = loss_fn(model(features), labels)
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            first_step_at = first_step_at or time.time()
        epoch_ends.append(time.time())
        with tempfile.TemporaryDirectory() as directory:
            checkpoint = None
            if rank == 0:
                torch.save(model.module.state_dict() if hasattr(model, "module") else model.state_dict(),
                           os.path.join(directory, "model.pt"))
                checkpoint = ray.train.Checkpoint.from_directory(directory)
            ray.train.report({"epoch": epoch, "loss": loss.item(), "epoch_ends": epoch_ends,
                              "first_step_at": first_step_at}, checkpoint=checkpoint)


def run_ray_train(size: dict, output_dir: Path) -> dict:
    from ray.train import RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    launched = time.time()
    result = TorchTrainer(_ray_train_loop, train_loop_config={"size": size},
                          scaling_config=ScalingConfig(num_workers=WORKERS),
                          run_config=RunConfig(name="ray_train", storage_path=str(output_dir))).fit()
    ends = result.metrics["epoch_ends"]
    steady_samples = size["rows"] * (len(ends) - 1)
    return {"samples_per_sec": steady_samples / (ends[-1] - ends[0]),
            "startup_s": result.metrics["first_step_at"] - launched, "wall_s": time.time() - launched}


# ------------------------------------------------------------------------------------- (c) plain DDP

def _ddp_process(rank: int, port: int, size: dict, out: str) -> None:
    """The plain script's loop, written out in full as its users would (not shared with (b)'s on purpose: each
    baseline stands alone)."""
    import torch
    from torch.nn.parallel import DistributedDataParallel

    from rayscale.engine.distributed import join_process_group

    torch.set_num_threads(1)  # as a 1-CPU Ray worker gets
    # rayscale's join only so that its store listens on 127.0.0.1 alone; what is timed is torch's.
    join_process_group("gloo", "127.0.0.1", port, rank, WORKERS)
    x, y = (torch.from_numpy(a) for a in load_rows(size))
    torch.manual_seed(0)
    model = DistributedDataParallel(_model(size))
    optimizer = torch.optim.SGD(model.parameters(), lr=LR, momentum=0.9)
    loss_fn = torch.nn.CrossEntropyLoss()
    per_worker, global_batch = size["global_batch"] // WORKERS, size["global_batch"]
    first_step_at, epoch_ends = None, []
    for _ in range(size["epochs"]):
        for start in range(0, size["rows"], global_batch):
            low = start + rank * per_worker
            features, labels = x[low:low + per_worker], y[low:low + per_worker]
            loss = loss_fn(model(features), labels)
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            first_step_at = first_step_at or time.time()
        epoch_ends.append(time.time())
    gloo.finish(rank, out, {"epoch_ends": epoch_ends, "first_step_at": first_step_at})


def run_plain_ddp(size: dict, output_dir: Path) -> dict:
    launched = time.time()
    measured = gloo.spawn(_ddp_process, (size,), WORKERS, output_dir / "plain_ddp.json")
    ends = measured["epoch_ends"]
    return {"samples_per_sec": size["rows"] * (len(ends) - 1) / (ends[-1] - ends[0]),
            "startup_s": measured["first_step_at"] - launched, "wall_s": time.time() - launched}


def run(size_name: str, output_dir: Path) -> dict:
    """ROUNDS[size_name] rounds of all three; each system's figures and the ratios are medians over rounds."""
    import statistics

    import ray

    from rayscale.launch.connect import connect


    size = SIZES[size_name]
    rounds = []
    for index in range(ROUNDS[size_name]):
        directory = output_dir / f"round_{index + 1}"
        directory.mkdir(parents=True, exist_ok=True)
        if ray.is_initialized():
            ray.shutdown()  # (c) as its users run it: no Ray on the machine
        measured = {"plain_ddp": run_plain_ddp(size, directory)}
        connect(None)
        order = (("ray_train", run_ray_train), ("rayscale", run_rayscale))
        for key, runner in order if index % 2 == 0 else order[::-1]:
            measured[key] = runner(size, directory)
        a, b, c = (measured[k]["samples_per_sec"] for k in ("rayscale", "ray_train", "plain_ddp"))
        measured.update(a_over_b=a / b, a_over_c=a / c)
        rounds.append(measured)
        print(f"[throughput] round {index + 1}/{ROUNDS[size_name]}: samples/s a {a:,.0f}  b {b:,.0f}  c {c:,.0f}  "
              f"a/b {a / b:.3f}  a/c {a / c:.3f}", flush=True)
    result = {"size": size, "workers": WORKERS, "rounds": rounds}
    for key, _ in SYSTEMS:
        result[key] = {field: statistics.median(r[key][field] for r in rounds)
                       for field in ("samples_per_sec", "startup_s", "wall_s")}
    targets = []
    for field, name, limit in (("a_over_b", "rayscale / minimal Ray Train samples/s", 1.0),
                               ("a_over_c", "rayscale / plain DDP samples/s", 0.90)):
        values = [r[field] for r in rounds]
        value = statistics.median(values)
        targets.append({"name": f"{name} (median of {len(values)} rounds)", "value": value,
                        "target": f">= {limit}", "pass": value >= limit, "rounds": values})
    result["targets"] = targets
    return result


def table(result: dict) -> str:
    rounds = result["rounds"]
    lines = ["| | steady samples/s (median) | per round | start-up s | wall s |", "|---|---|---|---|---|"]
    for key, label in SYSTEMS:
        r = result[key]
        each = ", ".join(f"{one[key]['samples_per_sec']:,.0f}" for one in rounds)
        lines.append(f"| {label} | {r['samples_per_sec']:,.0f} | {each} | {r['startup_s']:.1f} | {r['wall_s']:.1f} |")
    for target, label in zip(result["targets"], ("a/b", "a/c"), strict=True):
        lines.append(f"| {label} | {target['value']:.3f} | {', '.join(f'{v:.3f}' for v in target['rounds'])} | | |")
    return "\n".join(lines)
