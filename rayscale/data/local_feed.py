"""The driver's datasets without Ray: the same chunks, read in the same order, in this process. What an
`engine.context.InProcessContext` streams, so the training loop runs (and is tested) without a cluster.

For data.shuffle none and local, and for validation, the blocks are exactly what Ray Data streams with
`preserve_order` (the order is a function of the chunk order, never of Ray's blocks), so a run fed from here
trains the model a Ray run trains, bit for bit. A curriculum epoch is sorted here in memory by the same key.
data.shuffle full is Ray Data's `random_shuffle`, which nothing outside Ray reproduces: here it is a seeded
permutation of the whole split, a different order of the same rows.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np

from rayscale.data.splits import (
    CURRICULUM_KEY,
    CurriculumOrder,
    SplitSpec,
    add_curriculum_keys,
    chunk_order,
    concat_columns,
    curriculum_order,
    epoch_shuffle,
    read_split_chunks,
    read_split_pieces,
    shard_reads,
)
from rayscale.math.lanes import ChunkRead


@dataclass
class LocalFeed:
    train: SplitSpec
    val: SplitSpec | None
    epochs: int
    train_rows: int
    world_size: int = 1  # the validation split is cut into one shard per rank

    def __call__(self, name: str) -> Iterator[dict[str, np.ndarray]]:
        """The blocks of "train_<epoch>" or "val_<rank>"."""
        if name.startswith("val_"):
            if self.val is None:
                raise ValueError("no validation split")
            return read_shard(self.val, shard_reads(self.val, self.world_size)[int(name.removeprefix("val_"))])
        epoch = int(name.removeprefix("train_"))
        return read_split(self.train, epoch, curriculum_order(self.train, epoch, self.epochs, self.train_rows))


def read_shard(spec: SplitSpec, reads: list[ChunkRead]) -> Iterator[dict[str, np.ndarray]]:
    """What datasets.build_shard streams: each chunk piece's rows, one block a piece."""
    for read in reads:
        yield read_split_pieces({"chunk": [read.chunk], "skip": [read.skip], "take": [read.take]}, spec)


def read_split(spec: SplitSpec, epoch: int | None = None, order: CurriculumOrder | None = None
               ) -> Iterator[dict[str, np.ndarray]]:
    shuffle = epoch_shuffle(spec, order)
    chunks = (read_split_chunks({"chunk": [int(i)]}, spec)
              for i in chunk_order(len(spec.info.chunks), shuffle, spec.seed, epoch))
    if order is None and not (shuffle == "full" and epoch is not None):
        yield from chunks
        return
    rows = [block for block in chunks if len(block["row_id"])]
    if not rows:
        return
    whole = {key: concat_columns([block[key] for block in rows]) for key in rows[0]}
    if order is not None:
        keyed = add_curriculum_keys(whole, order)
        arranged = np.lexsort((keyed["row_id"], keyed[CURRICULUM_KEY]))
    else:
        arranged = np.random.default_rng([spec.seed, epoch, 1000]).permutation(len(whole["row_id"]))
    yield {key: value[arranged] for key, value in whole.items()}
