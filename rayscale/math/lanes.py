"""The lane plan: which training rows of an epoch each rank reads, and which of them each global step holds.

Pure arithmetic on row counts (what the metadata says: rows per Parquet row group or generated block, less the
validation rows the row-id hash holds out), no data, no torch, no Ray.

An epoch's training rows form one ordered sequence: the chunks in the epoch's chunk order, each chunk's
training rows in row-id order. That sequence is cut into `lanes` contiguous ranges of sizes differing by at most
one row. Global position p of the epoch (0 <= p < rows) is row `p // lanes` of lane `p % lanes`, and global step
s holds positions [s x global_batch, (s + 1) x global_batch). So:

- the rows of every step depend on the lanes, never on the worker count: any worker count that divides the
  lanes trains the same row ids in the same steps;
- rank r of W owns lanes r, r + W, r + 2W, ... and so holds exactly the positions p = r (mod W): a full step
  gives each rank global_batch / W rows, and the partial last one differs by at most one row between ranks
  (a rank with none trains a zero-weight row);
- each lane is consumed front to back, about global_batch / lanes rows a step, so a rank streams its lanes
  from its own reads and a resumed rank starts each lane where the committed steps left it;
- a rank reads only the chunks its lanes overlap: a chunk cut by a lane boundary is read by both lanes, so all
  ranks together read at most rows + (lanes - 1) x the largest chunk.

Mosaic Streaming's "canonical nodes" are the precedent: a fixed partition of the sample space, set once, that
physical ranks then own whole.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np


def lane_sizes(rows: int, lanes: int) -> list[int]:
    """Rows in each lane: lane l holds the positions p < rows with p % lanes == l."""
    return [max(0, -(-(rows - lane) // lanes)) for lane in range(lanes)]


def lane_ranges(rows: int, lanes: int) -> list[tuple[int, int]]:
    """[start, stop) of each lane in the epoch's ordered sequence of training rows: contiguous, in lane order."""
    bounds = np.concatenate([[0], np.cumsum(lane_sizes(rows, lanes))]).astype(int).tolist()
    return list(zip(bounds[:-1], bounds[1:], strict=True))


def owned_lanes(rank: int, world_size: int, lanes: int) -> list[int]:
    """The lanes `rank` reads: every world_size-th one, so that it holds every world_size-th position."""
    check_lanes(lanes, world_size)
    return list(range(rank, lanes, world_size))


def check_lanes(lanes: int, world_size: int) -> None:
    if lanes < 1 or world_size < 1 or lanes % world_size:
        raise ValueError(f"data.lanes {lanes} is not a multiple of {world_size} workers: each worker owns whole "
                         f"lanes (set data.lanes to a multiple of scaling.num_workers)")


def consumed(lane: int, positions: int, lanes: int) -> int:
    """Rows of `lane` among the first `positions` positions of the epoch: where the lane stands after them."""
    return max(0, -(-(positions - lane) // lanes))


@dataclass(frozen=True)
class ChunkRead:
    """Part of one chunk that a lane needs: read the chunk, keep `take` of its training rows after `skip`."""

    chunk: int  # index into the source's chunks
    skip: int  # training rows of the chunk (in row-id order) before the lane's part
    take: int


def lane_reads(chunk_rows: Sequence[int], chunk_order: Sequence[int], start: int, stop: int) -> list[ChunkRead]:
    """What to read for the sequence range [start, stop): the chunks it overlaps, in the epoch's order.

    `chunk_rows[c]` is chunk c's training rows; `chunk_order` the order the epoch takes the chunks in."""
    reads, offset = [], 0
    for chunk in chunk_order:
        size = int(chunk_rows[chunk])
        low, high = max(start, offset), min(stop, offset + size)
        if high > low:
            reads.append(ChunkRead(int(chunk), low - offset, high - low))
        offset += size
        if offset >= stop:
            break
    return reads


def rows_read(chunk_rows: Sequence[int], chunk_order: Sequence[int], rows: int, lanes: int) -> int:
    """Training rows read by all lanes together in one epoch: whole chunks, each as often as lanes overlap it."""
    return sum(int(chunk_rows[read.chunk]) for start, stop in lane_ranges(rows, lanes)
               for read in lane_reads(chunk_rows, chunk_order, start, stop))


@dataclass(frozen=True)
class RankStep:
    """Which rows of its lanes a rank trains on in one global step."""

    rows_in_step: int  # the step's rows, all ranks together
    takes: tuple[tuple[int, int], ...]  # per owned lane (in owned_lanes order): rows taken from its front
    order: np.ndarray  # the rank's rows in global-position order, as indices into the lanes' takes concatenated


@functools.lru_cache(maxsize=4096)
def rank_step(step: int, rows: int, global_batch: int, lanes: int, rank: int, world_size: int) -> RankStep:
    """Rank `rank`'s part of global step `step`: how many rows it takes from each of its lanes, and the order
    that interleaves them by global position (so the rows, and their order, do not depend on the lane streams'
    block boundaries). Cached: every epoch asks the same steps again (and a step again while its rows arrive),
    so short epochs would otherwise spend a good part of their lane assembly here; `order` is read-only."""
    first, last = step * global_batch, min((step + 1) * global_batch, rows)
    mine = owned_lanes(rank, world_size, lanes)
    positions = np.arange(first + (rank - first) % world_size, last, world_size)
    lane_of = positions % lanes
    takes = tuple((lane, int(np.count_nonzero(lane_of == lane))) for lane in mine)
    # Concatenating the lanes' takes in owned order puts lane k's rows at offset sum(takes before k); a position
    # is the (index within its lane's take)-th row there.
    offsets = dict(zip(mine, np.cumsum([0] + [take for _, take in takes[:-1]]).tolist(), strict=True))
    within = positions // lanes - np.maximum(0, -((lane_of - first) // lanes))  # consumed(lane, first), at once
    order = np.array([offsets[lane] for lane in lane_of], dtype=np.int64) + within
    order.flags.writeable = False
    return RankStep(max(0, last - first), takes, order)


def resume_points(steps_done: int, rows: int, global_batch: int, lanes: int) -> list[int]:
    """Where each lane stands after `steps_done` committed steps of an epoch: the rows of it already trained."""
    positions = min(steps_done * global_batch, rows)
    return [consumed(lane, positions, lanes) for lane in range(lanes)]


@dataclass(frozen=True)
class Piece:
    """A ChunkRead for one lane, with where its rows sit in the lane's canonical sequence (its rows in row-id
    order): what a worker's cache of its lanes is indexed by."""

    lane: int
    offset: int  # the piece's first row in the lane's canonical sequence
    read: ChunkRead


def canonical_pieces(chunk_rows: Sequence[int], lanes: int, lane: int) -> list[Piece]:
    """The lane's rows in row-id order, as pieces of chunks: lanes are cut from the training rows in row-id
    order, so which rows a lane holds never changes from epoch to epoch (only their order does)."""
    start, stop = lane_ranges(int(sum(chunk_rows)), lanes)[lane]
    pieces, offset = [], 0
    for read in lane_reads(chunk_rows, range(len(chunk_rows)), start, stop):
        pieces.append(Piece(lane, offset, read))
        offset += read.take
    return pieces


def epoch_reads(chunk_rows: Sequence[int], lanes: int, starts: dict[int, int],
                order: Callable[[int, int], Sequence[int]]) -> list[Piece]:
    """What a rank reads in an epoch: each of its lanes' pieces in that epoch's order (`order(lane, pieces)`
    permutes the lane's canonical pieces), from row `starts[lane]` of the lane's epoch sequence on; the lanes
    interleaved by how far into their lane the pieces start, so all lanes advance together (a step takes from
    every lane)."""
    tagged = []
    for lane, start in starts.items():
        canonical = canonical_pieces(chunk_rows, lanes, lane)
        at = 0
        for index in order(lane, len(canonical)):
            piece = canonical[index]
            size = piece.read.take
            if at + size > start:
                cut = max(0, start - at)
                read = ChunkRead(piece.read.chunk, piece.read.skip + cut, size - cut)
                tagged.append((at + cut, lane, Piece(lane, piece.offset + cut, read)))
            at += size
    return [piece for _, _, piece in sorted(tagged, key=lambda item: item[:2])]


def stream_starts(rows: int, lanes: int, owned: Sequence[int], window: int, positions: int) -> dict[int, int]:
    """Where each owned lane's stream starts after `positions` trained positions of the epoch: at the window
    holding its first untrained row (a window is arranged whole, so it is read whole), never further back."""
    sizes = lane_sizes(rows, lanes)
    starts = {lane: consumed(lane, positions, lanes) // window * window for lane in owned}
    if positions < rows and all(consumed(lane, positions, lanes) == sizes[lane] for lane in owned):
        # Only a partial last step is left and this rank has no rows in it: it still needs one row to shape
        # its zero-weight stand-in, so its first lane re-reads the window holding its last row.
        first = owned[0]
        starts[first] = max(0, sizes[first] - 1) // window * window
    return starts
