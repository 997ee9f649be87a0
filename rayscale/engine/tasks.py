"""What a batch looks like and how its loss is summed.

A batch is a dict of tensors:
  x       features: (B, F) tabular, (B, C, H, W) images, (B, L) int64 tokens
  y       labels: (B,) int64 classes, (B, K) float targets, (B, L) int64 per-token classes
  weight  (B,) float per-sample weight; 0 marks a padding row that must not count
  mask    (B, L) bool, True on real tokens (sequences only)

Losses are *sums* over real samples (or real tokens), never means: the training step divides by the real
count of the whole global batch, summed over micro-batches and workers. That is what makes k accumulated
micro-batches equal one big batch, a partial last window included.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from rayscale.data.sources import TASKS, DataSpec  # noqa: F401 - defined with the sources (no torch in Ray Data tasks)


def forward(model: torch.nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    if "mask" in batch:
        return model(batch["x"], batch["mask"])
    return model(batch["x"])


def sample_weights(batch: dict[str, torch.Tensor]) -> torch.Tensor:
    if "weight" in batch:
        return batch["weight"]
    return torch.ones(batch["x"].shape[0], dtype=torch.float32, device=batch["x"].device)


def count(task: str, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """The normaliser this batch contributes: summed sample weights, or weighted real tokens."""
    if "weight" not in batch and task != "token_classification":  # every weight 1: the row count
        return batch["x"].new_full((), batch["x"].shape[0], dtype=torch.float32)
    weights = sample_weights(batch)
    if task == "token_classification":
        return (batch["mask"].to(weights.dtype) * weights[:, None]).sum()
    return weights.sum()


def loss_sum(task: str, output: torch.Tensor, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """Sum of weighted per-sample (or per-token) losses, computed in float32 or wider."""
    output = output.float() if output.dtype in (torch.float16, torch.bfloat16) else output
    if task == "classification" and "weight" not in batch:  # every weight 1: no per-sample pass, forward or back
        return F.cross_entropy(output, batch["y"], reduction="sum")
    weights = sample_weights(batch).to(output.dtype)
    if task == "classification":
        per_sample = F.cross_entropy(output, batch["y"], reduction="none")
    elif task == "regression":
        target = batch["y"].to(output.dtype).reshape(output.shape)
        per_sample = F.mse_loss(output, target, reduction="none").reshape(output.shape[0], -1).mean(dim=1)
    elif task == "token_classification":
        per_token = F.cross_entropy(output.flatten(0, 1), batch["y"].flatten(), reduction="none")
        per_token = per_token.view(batch["y"].shape) * batch["mask"].to(output.dtype)
        per_sample = per_token.sum(dim=1)
    else:
        raise ValueError(f"unknown task {task!r}")
    return (per_sample * weights).sum()


def correct(task: str, output: torch.Tensor, batch: dict[str, torch.Tensor]) -> torch.Tensor | None:
    """Weighted count of correct predictions (samples or tokens); None for regression."""
    if task == "classification":
        return ((output.argmax(dim=-1) == batch["y"]).to(torch.float32) * sample_weights(batch)).sum()
    if task == "token_classification":
        hits = (output.argmax(dim=-1) == batch["y"]) & batch["mask"]
        return (hits.to(torch.float32) * sample_weights(batch)[:, None]).sum()
    return None
