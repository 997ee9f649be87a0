"""numpy rows to tensors on the device: a worker's rows of a step cut into micro-batches, sequences padded per
micro-batch with a mask. The only module of the data layer that imports torch (lazily: every Ray Data read task
imports the data package)."""

from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np

from rayscale.data.assembly import StepRows, take
from rayscale.math.batching import micro_batch_bounds

if TYPE_CHECKING:
    import torch


def _owned(array: np.ndarray) -> np.ndarray:
    """`array` where the tensor may share it (contiguous and writable), else a contiguous copy. Read-only
    arrays are Arrow's memory or the worker's cache, which a model writing to its input must not change."""
    return array if array.flags.c_contiguous and array.flags.writeable else np.array(array, order="C")


def to_device(array: np.ndarray, device: torch.device) -> torch.Tensor:
    """On CPU a tensor sharing `array` where it may (`_owned`). On a GPU one copy into page-locked host memory,
    then an asynchronous copy: from ordinary (pageable) memory CUDA first waits for every kernel already queued
    on the stream, so the host would stall at each batch until the previous step had finished instead of
    preparing the next batch while the GPU works. PyTorch's caching host allocator keeps the page-locked block
    until the copy has run, and reuses it."""
    import torch

    if device.type != "cuda":
        return torch.from_numpy(_owned(array))
    dtype = torch.from_numpy(np.empty(0, dtype=array.dtype)).dtype
    staged = torch.empty(array.shape, dtype=dtype, pin_memory=True)
    staged.numpy()[...] = array
    return staged.to(device, non_blocking=True)


def collate(rows: dict[str, np.ndarray], device: torch.device) -> dict[str, torch.Tensor]:
    """numpy rows -> tensors on `device`; sequences are padded to the longest in this batch, with a mask."""
    x, y = rows["x"], rows["y"]
    if x.dtype == object:  # variable-length token sequences
        lengths = np.fromiter((len(seq) for seq in x), dtype=np.int64, count=len(x))
        width = int(lengths.max()) if len(lengths) else 1
        tokens = np.zeros((len(x), width), dtype=np.int64)
        for i, seq in enumerate(x):
            tokens[i, :len(seq)] = seq
        if y.dtype == object:  # one label per token
            labels = np.zeros((len(x), width), dtype=np.int64)
            for i, lab in enumerate(y):
                labels[i, :len(lab)] = lab
        else:  # one label per sequence
            labels = y
        arrays = {"x": tokens, "y": labels, "mask": np.arange(width)[None, :] < lengths[:, None]}
    else:
        arrays = {"x": x, "y": y}
        if x.ndim == 2 and np.issubdtype(x.dtype, np.integer):
            # Token sequences that all have the same length arrive from Arrow as a 2-D array, not as objects:
            # every position is a real token.
            arrays["mask"] = np.ones(x.shape, dtype=bool)
    if "weight" in rows:
        arrays["weight"] = rows["weight"].astype(np.float32, copy=False)
    # Imported in to_device, not at the top: every Ray Data read task imports this module (read_split_chunks),
    # and torch's import (~2.7 s of CPU) in each of those processes delayed a digits run's first batch by ~30 s.
    return {key: to_device(value, device) for key, value in arrays.items()}


def micro_batches(step: StepRows, micro_batch_size: int, device: torch.device) -> list[dict[str, torch.Tensor]]:
    rows = len(step.rows["row_id"])
    return [collate(take(step.rows, slice(a, b)), device) for a, b in micro_batch_bounds(rows, micro_batch_size)]
