"""What a batch looks like and how its loss is summed.

A batch is a dict of tensors:
  x       features: (B, F) tabular, (B, C, H, W) images, (B, L) int64 tokens
  y       labels: (B,) int64 classes (per row or per sequence), (B, K) float targets, (B, L) int64 per-token
          classes (IGNORE_INDEX: a masked token, which counts nowhere)
  weight  (B,) float per-sample weight; 0 marks a padding row that must not count
  mask    (B, L) bool, True on real tokens (sequences only)

Losses are *sums* over real samples (or real tokens), never means: the training step divides by the real
count of the whole global batch, summed over micro-batches and workers. That is what makes k accumulated
micro-batches equal one big batch, a partial last window included.
"""

from __future__ import annotations

import functools
import inspect
from collections.abc import Callable, Mapping
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch.nn.parallel import DistributedDataParallel

from rayscale.data.sources import (  # noqa: F401 - defined with the sources (no torch in Ray Data tasks)
    IGNORE_INDEX,
    TASKS,
    DataSpec,
)
from rayscale.errors import UserCodeError

# The least count a summed loss or metric is divided by. Rows that all weigh 0 sum to 0 and stay 0 whatever it is;
# rows of tiny positive weights (data.weight takes a largest weight down to 1e-20) are divided by their own count,
# which a floor of 1e-12 replaced, scaling their loss down. world_size / COUNT_FLOOR stays a finite float32.
COUNT_FLOOR = 1e-30


def forward(model: torch.nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """The model's logits (or regression outputs) for a batch: `model(x, mask)` for sequences, else `model(x)`.
    A model whose forward names an `attention_mask` parameter gets the mask by that name, wherever that
    parameter stands: Hugging Face's models do, and some put it third (GPT-2's second is its key-value cache)."""
    if "mask" in batch:
        if takes_attention_mask(model):
            return logits_of(model(batch["x"], attention_mask=batch["mask"]))
        return logits_of(model(batch["x"], batch["mask"]))
    return logits_of(model(batch["x"]))


# A property of the model's class: train.compile marks it a constant (components/compilation.py), so Dynamo reads
# it once while tracing instead of tracing the signature's inspection at every compile. Marked there, not with a
# decorator here: torch.compiler's decorator imports Dynamo (~0.8 s) in every process that imports this module.
def takes_attention_mask(model: torch.nn.Module) -> bool:
    """Whether the model (inside DDP's wrapper, which passes keywords on) names `attention_mask` in its forward."""
    inner = model.module if isinstance(model, DistributedDataParallel) else model
    return _names_attention_mask(type(inner))


@functools.cache
def _names_attention_mask(model_class: type) -> bool:
    try:
        return "attention_mask" in inspect.signature(model_class.forward).parameters
    except (TypeError, ValueError):  # a forward without a signature Python can read
        return False


def logits_of(output) -> torch.Tensor:
    """What a model returned, as the one tensor the loss reads: a tensor as it is, a mapping's or an object's
    `logits` (Hugging Face's ModelOutput is both), or a tuple's first element (return_dict=False)."""
    if isinstance(output, torch.Tensor):
        return output
    logits = output.get("logits") if isinstance(output, Mapping) else getattr(output, "logits", None)
    if logits is None and isinstance(output, tuple) and output:
        logits = output[0]
    if not isinstance(logits, torch.Tensor):
        keys = f" (keys: {', '.join(map(str, output))})" if isinstance(output, Mapping) else ""
        raise TypeError(f"the model returned {type(output).__name__}{keys}; expected a tensor, a mapping with "
                        f"'logits', an object with .logits or a tuple whose first element is the logits")
    return logits


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
        return (labelled_tokens(batch).to(weights.dtype) * weights[:, None]).sum()
    return weights.sum()


def labelled_tokens(batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """(B, L) True on the tokens that count: real (not padding) and not masked with IGNORE_INDEX."""
    return batch["mask"] & (batch["y"] != IGNORE_INDEX)


def loss_sum(task: str, output: torch.Tensor, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """Sum of weighted per-sample (or per-token) losses, computed in float32 or wider."""
    output = output.float() if output.dtype in (torch.float16, torch.bfloat16) else output
    per_row = task in ("classification", "sequence_classification")
    if per_row and "weight" not in batch:  # every weight 1: no per-sample pass, forward or back
        return F.cross_entropy(output, batch["y"], reduction="sum")
    weights = sample_weights(batch).to(output.dtype)
    if per_row:
        per_sample = F.cross_entropy(output, batch["y"], reduction="none")
    elif task == "regression":
        target = batch["y"].to(output.dtype).reshape(output.shape)
        per_sample = F.mse_loss(output, target, reduction="none").reshape(output.shape[0], -1).mean(dim=1)
    elif task == "token_classification":
        # (a masked token's loss is 0: cross_entropy's ignore_index is IGNORE_INDEX)
        per_token = F.cross_entropy(output.flatten(0, 1), batch["y"].flatten(), reduction="none")
        per_token = per_token.view(batch["y"].shape) * batch["mask"].to(output.dtype)
        per_sample = per_token.sum(dim=1)
    else:
        raise ValueError(f"unknown task {task!r}")
    return (per_sample * weights).sum()


def correct(task: str, output: torch.Tensor, batch: dict[str, torch.Tensor]) -> torch.Tensor | None:
    """Weighted count of correct predictions (samples or tokens); None for regression."""
    if task in ("classification", "sequence_classification"):
        return ((output.argmax(dim=-1) == batch["y"]).to(torch.float32) * sample_weights(batch)).sum()
    if task == "token_classification":
        hits = (output.argmax(dim=-1) == batch["y"]) & labelled_tokens(batch)
        return (hits.to(torch.float32) * sample_weights(batch)[:, None]).sum()
    return None


# train.loss (or rayscale.train's `loss=`): (output, batch) -> per-sample (B,) or per-token (B, L) losses, or
# (losses, weights) of the same shape.
UserLoss = Callable[[torch.Tensor, dict[str, torch.Tensor]], "torch.Tensor | tuple[torch.Tensor, torch.Tensor]"]


@dataclass(frozen=True)
class Objective:
    """What a batch's loss is: the task's own, or a user loss whose per-sample (or per-token) values rayscale
    weighs and sums, so that accumulation stays exact (the sum over the global count, as for the built-ins).

    A user loss's weights are multiplied by what already decides whether a row or token counts: the sample
    weights (0 on padding rows) and, for per-token losses, the real and unmasked tokens. Without weights its
    count is the task's count, known before the forward; with weights the count is only known after it, so the
    training step corrects the gradients by the ratio once every rank has summed them (step.py)."""

    task: str
    user_loss: UserLoss | None = None

    def count(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        """The normaliser known before the forward (the task's)."""
        return count(self.task, batch)

    def loss(self, output: torch.Tensor, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor | None]:
        """(summed weighted loss in float32 or wider, its count when the loss chose its own weights, else None)."""
        if self.user_loss is None:
            return loss_sum(self.task, output, batch), None
        returned = self.user_loss(output, batch)
        losses, weights = returned if isinstance(returned, tuple) else (returned, None)
        if not isinstance(losses, torch.Tensor) or losses.dim() not in (1, 2) or losses.shape[0] != output.shape[0]:
            shape = tuple(losses.shape) if isinstance(losses, torch.Tensor) else type(losses).__name__
            raise UserCodeError(f"train.loss: returned losses of shape {shape}; expected one per sample "
                                f"({output.shape[0]},) or one per token (batch, length), not a reduced loss")
        losses = losses.float() if losses.dtype in (torch.float16, torch.bfloat16) else losses
        counted = sample_weights(batch).to(losses.dtype)
        if losses.dim() == 2:
            if "mask" not in batch or batch["mask"].shape != losses.shape:
                raise UserCodeError(f"train.loss: returned per-token losses {tuple(losses.shape)} for a batch "
                                    f"without tokens of that shape")
            real = labelled_tokens(batch) if batch["y"].shape == losses.shape else batch["mask"]
            counted = counted[:, None] * real.to(losses.dtype)
        if weights is None:
            return (losses * counted).sum(), None
        if not isinstance(weights, torch.Tensor) or weights.shape != losses.shape:
            raise UserCodeError(f"train.loss: returned weights of shape {getattr(weights, 'shape', None)}; expected "
                                f"the losses' shape {tuple(losses.shape)}")
        weights = weights.to(losses.dtype) * counted
        return (losses * weights).sum(), weights.sum().detach()
