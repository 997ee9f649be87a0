"""PNG figures of a run: loss and accuracy against samples seen (headless, matplotlib's Agg backend)."""

from __future__ import annotations

import os
import sys
import threading
from pathlib import Path

_LOADING: list[threading.Thread] = []  # the thread importing matplotlib ahead, if one was started


def load_in_background() -> None:
    """Import matplotlib in a thread, while the driver only waits for its workers: the curves drawn at the run's
    end then do not wait for its import (~0.8 s on the 2-core machine), nor does a search's next trial."""
    if not _LOADING and "matplotlib.pyplot" not in sys.modules:
        _LOADING.append(threading.Thread(target=_pyplot, name="rayscale-import-matplotlib", daemon=True))
        _LOADING[0].start()


def _pyplot():
    if _LOADING and _LOADING[0] is not threading.current_thread():
        _LOADING[0].join()  # never two threads importing it at once
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def plot_curves(records: list[dict], path: Path, title: str = "") -> None:
    """curves.png: train and val loss (left), val accuracy (right) against samples seen."""
    plt = _pyplot()
    fig, (loss_ax, acc_ax) = plt.subplots(1, 2, figsize=(10, 4))
    train = [(r["samples_seen"], r["train_loss"]) for r in records if r.get("train_loss") is not None]
    val = [(r["samples_seen"], r["val_loss"]) for r in records if r.get("val_loss") is not None]
    acc = [(r["samples_seen"], r["val_accuracy"]) for r in records if r.get("val_accuracy") is not None]
    if train:
        loss_ax.plot(*zip(*train, strict=True), label="train loss")
    if val:
        loss_ax.plot(*zip(*val, strict=True), "o-", label="val loss")
    loss_ax.set(xlabel="samples seen", ylabel="loss", title=f"{title} loss".strip())
    loss_ax.legend(loc="upper right")
    if acc:
        acc_ax.plot(*zip(*acc, strict=True), "o-", color="tab:green", label="val accuracy")
        acc_ax.set_ylim(0, 1)
        acc_ax.legend(loc="lower right")
    acc_ax.set(xlabel="samples seen", ylabel="accuracy", title=f"{title} accuracy".strip())
    for ax in (loss_ax, acc_ax):
        ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def plot_tune_curves(rows: list[dict], metric: str, path: Path, title: str = "") -> None:
    """tune_curves.png: the metric against samples seen for every trial; an x marks an early stop."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(8, 5))
    for row in rows:
        if not row["history"]:
            continue
        samples, values = zip(*row["history"], strict=True)
        (line,) = ax.plot(samples, values, "-", alpha=0.8, label=row["trial_id"])
        marker = "x" if row["status"] == "stopped early" else "o"
        ax.plot(samples[-1], values[-1], marker, color=line.get_color(), markersize=8)
    ax.set(xlabel="samples seen", ylabel=metric, title=f"{title}: {metric} per trial (x = stopped early)".strip(": "))
    ax.grid(alpha=0.3)
    if len(rows) <= 12:
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def plot_goodput(rows: list, current: int, recommended: int, path: Path, title: str = "") -> None:
    """suggest.png: predicted samples/s and goodput against the global batch (log x), the run's own batch and
    the recommended one marked. `rows` are goodput.Prediction. Written to a temporary file, then renamed."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(8, 5))
    batches = [row.global_batch_size for row in rows]
    ax.plot(batches, [row.samples_per_sec for row in rows], "o-", label="throughput (samples/s)")
    ax.plot(batches, [row.goodput for row in rows], "s-", label="goodput (samples/s x efficiency)")
    ax.axvline(current, color="grey", linestyle="--", label=f"this run ({current})")
    ax.axvline(recommended, color="tab:red", linestyle=":", label=f"recommended ({recommended})")
    ax.set_xscale("log", base=2)
    ax.set_xticks(batches, [str(batch) for batch in batches])
    ax.set_ylim(bottom=0)
    ax.set(xlabel="global batch size", ylabel="samples/s",
           title=f"{title}: predicted throughput and goodput".strip(": "))
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        fig.savefig(tmp, dpi=100, format="png")
        os.replace(tmp, path)
    finally:
        plt.close(fig)
        tmp.unlink(missing_ok=True)
