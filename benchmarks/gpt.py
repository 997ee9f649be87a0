"""A GPT-style decoder for the GPU benchmark, as a rayscale user model (`model.name: benchmarks.gpt:make`).

Pre-norm blocks, causal self-attention through `scaled_dot_product_attention` (flash attention on a recent
GPU), a 4x GELU MLP. rayscale calls `model(x, mask)`: the benchmark's sequences all have the same length, so
the mask is all True and causal attention needs no padding mask (which would turn flash attention off).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class Block(nn.Module):
    def __init__(self, d_model: int, n_head: int):
        super().__init__()
        self.n_head = n_head
        self.norm1 = nn.LayerNorm(d_model)
        self.qkv = nn.Linear(d_model, 3 * d_model)
        self.proj = nn.Linear(d_model, d_model)
        self.norm2 = nn.LayerNorm(d_model)
        self.mlp = nn.Sequential(nn.Linear(d_model, 4 * d_model), nn.GELU(approximate="tanh"),
                                 nn.Linear(4 * d_model, d_model))

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        batch, length, width = h.shape
        q, k, v = self.qkv(self.norm1(h)).split(width, dim=2)
        q, k, v = (t.view(batch, length, self.n_head, width // self.n_head).transpose(1, 2) for t in (q, k, v))
        attended = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        h = h + self.proj(attended.transpose(1, 2).reshape(batch, length, width))
        return h + self.mlp(self.norm2(h))


class GPT(nn.Module):
    def __init__(self, vocab_size: int, max_length: int, num_outputs: int, d_model: int, n_layer: int,
                 n_head: int):
        super().__init__()
        self.token_embedding = nn.Embedding(vocab_size, d_model)
        self.position_embedding = nn.Embedding(max_length, d_model)
        self.blocks = nn.ModuleList(Block(d_model, n_head) for _ in range(n_layer))
        self.norm = nn.LayerNorm(d_model)
        self.head = nn.Linear(d_model, num_outputs, bias=False)

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        h = self.token_embedding(x) + self.position_embedding(torch.arange(x.shape[1], device=x.device))
        for block in self.blocks:
            h = block(h)
        return self.head(self.norm(h))


def make(vocab_size: int, max_length: int, num_outputs: int, d_model: int = 1024, n_layer: int = 12,
         n_head: int = 16) -> GPT:
    return GPT(vocab_size, max_length, num_outputs, d_model, n_layer, n_head)
