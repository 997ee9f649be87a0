"""The built-in models: an MLP, a CNN and a Transformer encoder, sized by the data (factory.py)."""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

from rayscale.errors import UserError


def _run_block(block: nn.Module, *args: torch.Tensor, checkpointed: bool, **kwargs: torch.Tensor) -> torch.Tensor:
    """Run one hidden block, recomputing its activations in backward when `checkpointed` (training only).

    The recomputation replays the block's forward, so a BatchNorm inside would fold the same batch into its
    running statistics twice. Buffers are therefore put back after the replay; the replay may stop early
    (PyTorch stops once it has what backward needs), hence the `finally`.
    """
    if not (checkpointed and block.training):
        return block(*args, **kwargs)
    first_pass = True

    def run(*inner_args: torch.Tensor, **inner_kwargs: torch.Tensor) -> torch.Tensor:
        nonlocal first_pass
        if first_pass:
            first_pass = False
            return block(*inner_args, **inner_kwargs)
        saved = [buffer.clone() for buffer in block.buffers()]
        try:
            return block(*inner_args, **inner_kwargs)
        finally:
            with torch.no_grad():
                for buffer, value in zip(block.buffers(), saved, strict=True):
                    buffer.copy_(value)

    return checkpoint(run, *args, use_reentrant=False, **kwargs)


def _at_least(key: str, value, low: int = 1) -> None:
    """A built-in model's size (or list of sizes) is at least `low`: torch builds a layer of width 0, which
    passes nothing on, and one of a negative width fails with its tensor's shape, not the key. (Other types are
    left to the model's own error, which names the key too.)"""
    listed = isinstance(value, (list, tuple))
    if any(isinstance(size, int) and size < low for size in (value if listed else [value])):
        raise UserError(f"model.kwargs.{key}: expected {'entries' if listed else 'a number'} of at least {low}, "
                        f"got {value!r}")


def _a_probability(key: str, value) -> None:
    """A dropout probability in [0, 1): the MLP skipped its dropout layer for a negative or NaN one (`dropout > 0`
    is false for both), so the run trained without the dropout asked for, and said nothing."""
    if isinstance(value, (int, float)) and not isinstance(value, bool) and not 0 <= value < 1:
        raise UserError(f"model.kwargs.{key}: expected a probability in [0, 1), got {value!r}")


class MLP(nn.Module):
    """Linear-ReLU(-Dropout) blocks and a linear head; any input shape is flattened per sample."""

    def __init__(self, in_features: int, num_outputs: int, hidden_sizes: Sequence[int] = (256, 256),
                 dropout: float = 0.0, activation_checkpointing: bool = False):
        super().__init__()
        self.activation_checkpointing = activation_checkpointing
        _at_least("hidden_sizes", hidden_sizes)
        _a_probability("dropout", dropout)
        self.blocks = nn.ModuleList()
        width = in_features
        for hidden in hidden_sizes:
            layers = [nn.Linear(width, hidden), nn.ReLU()]
            if dropout > 0:
                layers.append(nn.Dropout(dropout))
            self.blocks.append(nn.Sequential(*layers))
            width = hidden
        self.head = nn.Linear(width, num_outputs)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = x.flatten(1)
        for block in self.blocks:
            h = _run_block(block, h, checkpointed=self.activation_checkpointing)
        return self.head(h)


class CNN(nn.Module):
    """Conv3x3-BatchNorm-ReLU-MaxPool blocks, global average pooling and a linear head.

    BatchNorm is deliberate: on GPU the DDP worker converts it to SyncBatchNorm, so statistics span all
    workers (PyTorch supports SyncBatchNorm on CUDA only; on CPU each rank uses its own statistics).
    """

    def __init__(self, in_channels: int, image_size: int, num_outputs: int, channels: Sequence[int] = (16, 32),
                 activation_checkpointing: bool = False):
        super().__init__()
        _at_least("channels", channels)
        # Each block halves the image (rounding down); past 1 pixel MaxPool2d fails at the first forward.
        if image_size < 2 ** len(channels):
            raise UserError(f"model.kwargs.channels: {len(channels)} blocks halve a {image_size}-pixel image "
                            f"below 1 pixel; use at most {int(math.log2(image_size))} entries")
        self.activation_checkpointing = activation_checkpointing
        self.blocks = nn.ModuleList()
        width = in_channels
        for out_channels in channels:
            self.blocks.append(nn.Sequential(
                nn.Conv2d(width, out_channels, kernel_size=3, padding=1),
                nn.BatchNorm2d(out_channels),
                nn.ReLU(),
                nn.MaxPool2d(2),
            ))
            width = out_channels
        self.head = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(width, num_outputs))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = x
        for block in self.blocks:
            h = _run_block(block, h, checkpointed=self.activation_checkpointing)
        return self.head(h)


class Transformer(nn.Module):
    """Pre-norm Transformer encoder over int64 tokens with a per-token head: (B, L) -> (B, L, num_outputs), or
    with `pooled` (one label per sequence) the mean over each sequence's real tokens: (B, L) -> (B, num_outputs).

    The layers sit in a plain ModuleList rather than nn.TransformerEncoder: its nested-tensor fast path
    makes results depend on how much padding a batch carries, and a list lets checkpointing wrap each layer.
    """

    def __init__(self, vocab_size: int, max_length: int, num_outputs: int, d_model: int = 64, nhead: int = 4,
                 num_layers: int = 2, dim_feedforward: int = 128, dropout: float = 0.0,
                 activation_checkpointing: bool = False, pooled: bool = False):
        super().__init__()
        for name, value in (("d_model", d_model), ("nhead", nhead), ("dim_feedforward", dim_feedforward)):
            _at_least(name, value)
        _at_least("num_layers", num_layers, low=0)  # 0: embeddings and the head, a baseline
        _a_probability("dropout", dropout)
        if d_model % nhead:
            raise UserError(f"model.kwargs.d_model: must be divisible by nhead ({nhead}), got {d_model}")
        self.max_length, self.pooled = max_length, pooled
        self.activation_checkpointing = activation_checkpointing
        self.token_embedding = nn.Embedding(vocab_size, d_model)
        self.position_embedding = nn.Embedding(max_length, d_model)
        self.layers = nn.ModuleList(
            nn.TransformerEncoderLayer(d_model, nhead, dim_feedforward, dropout, batch_first=True,
                                       norm_first=True)
            for _ in range(num_layers)
        )
        self.norm = nn.LayerNorm(d_model)
        self.head = nn.Linear(d_model, num_outputs)

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        length = x.shape[1]
        if length > self.max_length:
            raise ValueError(f"sequence length {length} exceeds max_length {self.max_length}")
        positions = torch.arange(length, device=x.device)
        h = self.token_embedding(x) + self.position_embedding(positions)
        padding = None
        if mask is not None:
            # A row with no real token (a padding row, weight 0) would attend to nothing and turn NaN, and
            # NaN * 0 in the loss is still NaN; letting such rows attend everywhere keeps them finite.
            padding = ~mask & mask.any(dim=1, keepdim=True)
        for layer in self.layers:
            h = _run_block(layer, h, checkpointed=self.activation_checkpointing, src_key_padding_mask=padding)
        h = self.norm(h)
        if self.pooled:
            real = (mask if mask is not None else torch.ones(x.shape, dtype=torch.bool, device=x.device))[..., None]
            h = (h * real).sum(dim=1) / real.sum(dim=1).clamp_min(1)
        return self.head(h)
