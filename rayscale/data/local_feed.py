"""Chunk pieces read in this process, without Ray: what an `engine.context.InProcessContext` reads, so the
training loop runs (and is tested) without a cluster.

The blocks are exactly what a Ray worker's reads stream (one block per piece, in the order asked; Ray Data
keeps that order), and every ordering (shuffles, stratification, bucketing, the curriculum) happens after the
read, in the engine: a run fed from here trains the model a Ray run trains, bit for bit.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np

from rayscale.data.splits import SplitSpec, read_split_pieces
from rayscale.math.lanes import ChunkRead


@dataclass
class LocalReads:
    train: SplitSpec
    val: SplitSpec | None

    def __call__(self, split: str, reads: list[ChunkRead]) -> Iterator[dict[str, np.ndarray]]:
        spec = self.train if split == "train" else self.val
        if spec is None:
            raise ValueError("no validation split")
        return read_shard(spec, reads)


def read_shard(spec: SplitSpec, reads: list[ChunkRead]) -> Iterator[dict[str, np.ndarray]]:
    """What a Ray read of `reads` streams: each chunk piece's rows, one block a piece."""
    for read in reads:
        yield read_split_pieces({"chunk": [read.chunk], "skip": [read.skip], "take": [read.take]}, spec)
