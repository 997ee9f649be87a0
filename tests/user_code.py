"""User code for tests/test_user_code.py, importable by name (`user_code:<name>`) in spawned and Ray processes."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from rayscale.models import MLP


def per_sample_cross_entropy(output, batch):
    return F.cross_entropy(output, batch["y"], reduction="none")


def cross_entropy_weighted_by_one(output, batch):
    """The built-in loss with its own weights, all 1: the count comes from the loss (the corrected path)."""
    losses = F.cross_entropy(output, batch["y"], reduction="none")
    return losses, torch.ones_like(losses)


def class_zero_counts_double(output, batch):
    losses = F.cross_entropy(output, batch["y"], reduction="none")
    return losses, 1.0 + (batch["y"] == 0).to(losses.dtype)


def hit(output, batch):
    return (output.argmax(dim=-1) == batch["y"]).float()


def sized_mlp(input_shape, num_classes, hidden=16):
    """A user factory that takes its sizes from the data."""
    return MLP(in_features=input_shape[0], num_outputs=num_classes, hidden_sizes=(hidden,))


class DictOutput(nn.Module):
    """Returns its logits in a dict (as many model libraries do)."""

    def __init__(self, input_shape, num_classes):
        super().__init__()
        self.inner = nn.Linear(input_shape[0], num_classes)

    def forward(self, x):
        return {"logits": self.inner(x), "hidden": x}


class CacheBeforeMask(nn.Module):
    """Shaped like Hugging Face's GPT-2 in transformers 5: forward(input_ids, cache, attention_mask, ...). A mask
    handed in the cache's place fails as GPT-2 fails ('Tensor' object has no attribute 'get_seq_length')."""

    def __init__(self, vocab_size, num_classes):
        super().__init__()
        self.embedding, self.head = nn.Embedding(vocab_size, 8), nn.Linear(8, num_classes)
        self.masks_seen = []

    def forward(self, input_ids, cache=None, attention_mask=None, position_ids=None):
        if cache is not None:
            cache.get_seq_length()
        self.masks_seen.append(attention_mask)
        return {"logits": self.head(self.embedding(input_ids))}
