"""The Ray Datasets a worker streams: the chunk pieces of its own lanes of a training epoch, or of its shard of the
validation split (math/lanes.py), read by Ray Data tasks on the cluster's CPUs, on the worker's own node where
it has a CPU free.

Each worker builds its own reads instead of taking a `streaming_split` shard: Ray assigns blocks to split
shards dynamically, so which rows a rank sees changes from run to run, shards are uneven (ranks take different
step counts and hang, Ray #66085) and `equal=True` silently drops rows (#63285). A lane plan cut from the row
counts alone says which rows each rank reads, so each row is read once per epoch across the cluster and every
rank takes the same steps.
"""

from __future__ import annotations

import warnings

from rayscale.config import DataConfig
from rayscale.data import sources
from rayscale.data.splits import SplitSpec, read_split_pieces
from rayscale.errors import UserError
from rayscale.math.lanes import ChunkRead
from rayscale.plugins import first_line

READ_CPUS = 0.25
DATASET_CHUNK_BYTES = 16 << 20  # a Ray Dataset's chunk (one read's unit) holds about this much converted data
DATASET_CHUNK_ROWS = 8192  # and at most this many rows (a synthetic source's generated block)


def read_tasks_at_once(chunks: int) -> int:
    """The most read tasks a split runs at once: as many as the cluster has CPUs (or, autoscaling, can have).

    A fraction of a CPU per read task: Ray Data's budget excludes every running trainer's CPUs, so with
    concurrent Tune trials less than one whole CPU may be left, and a 1-CPU task would never start. But no
    more tasks at once than CPUs: each new task process pays ~4 s of CPU to start (Ray Data's imports, the
    source's), and 4 per core made a digits run's first pass 25 s instead of 8-10 (measured). On an autoscaling
    cluster the dataset is built before the training nodes exist, so the bound is the configured maximum (what
    Ray Data's own shuffle sizes itself by), not the head node alone; Ray Data's budget still limits the tasks
    to the CPUs there are at each moment."""
    import ray

    cpus = most_resources().get("CPU") or ray.cluster_resources().get("CPU", 1)
    return max(1, min(chunks, int(cpus)))


def most_resources() -> dict[str, float]:
    """What an autoscaling cluster's config lets it grow to ({} for a fixed cluster, and for a Ray client
    connection, which has no local view of the cluster's config)."""
    import ray

    try:
        return ray._private.state.state.get_max_resources_from_cluster_config() or {}
    except ray.exceptions.RaySystemError:  # ray:// client mode: Ray's state API is not set up in this process
        return {}


def node_read_slots(node_id: str | None) -> int:
    """Read tasks the node can run at once now (its free CPUs, in read tasks), so that a rank's reads fit on its
    own node instead of spilling to others; no bound where that is unknown or nothing is free right now."""
    import ray

    if node_id is None:
        return 1 << 30
    try:
        free = ray._private.state.available_resources_per_node().get(node_id, {}).get("CPU", 0.0)
    except ray.exceptions.RaySystemError:  # a Ray client process: no state API
        return 1 << 30
    slots = int(free / READ_CPUS + 1e-9)
    return slots if slots >= 1 else 1 << 30


def build_reads(spec: SplitSpec, reads: list[ChunkRead], node_id: str | None = None):
    """A lazy Ray Dataset of chunk pieces of the split, in the order given: one read task per piece, placed on
    `node_id` where that node has a CPU free (soft affinity: elsewhere rather than never), so a worker's rows
    cross the network at most once."""
    import ray.data
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    items = [{"chunk": read.chunk, "skip": read.skip, "take": read.take} for read in reads] or \
        [{"chunk": 0, "skip": 0, "take": 0}]  # nothing to read (fewer rows than ranks): one empty block
    place = {"scheduling_strategy": NodeAffinitySchedulingStrategy(node_id, soft=True)} if node_id else {}
    tasks_at_once = ray.data.TaskPoolStrategy(size=min(read_tasks_at_once(len(items)), node_read_slots(node_id)))
    with warnings.catch_warnings():
        # Soft node affinity has no named parameter in Ray 2.60 (its `label_selector` is hard: a read would wait
        # for a node whose CPUs the training worker holds), so it goes in the deprecated **ray_remote_args.
        warnings.filterwarnings("ignore", message=".*ray_remote_args. is deprecated", category=DeprecationWarning)
        return ray.data.from_items(items, override_num_blocks=len(items)).map_batches(
            read_split_pieces, fn_kwargs={"spec": spec}, batch_size=1, batch_format="numpy", num_cpus=READ_CPUS,
            compute=tasks_at_once, **place)


def quiet_ray_data() -> None:
    """Ray Data and Train log every dataset execution and report at INFO, drowning the progress lines."""
    import logging

    import ray.data

    logging.getLogger("ray.data").setLevel(logging.WARNING)
    logging.getLogger("ray.train").setLevel(logging.WARNING)
    # "Reporting training result ..." comes from a logger named after its file, outside the ray.train tree.
    from ray.train.v2._internal.execution import context as train_context

    logging.getLogger(train_context.__file__).setLevel(logging.WARNING)
    ray.data.DataContext.get_current().enable_progress_bars = False
    # Blocks in the order of the reads, always, in every process that streams (each worker builds its own reads).
    ray.data.DataContext.get_current().execution_options.preserve_order = True


# ------------------------------------------------------------------------------ a Ray Dataset handed in

def inspect_dataset(dataset, data: DataConfig, argument: str) -> sources.SourceInfo:
    """A `ray.data.Dataset` as a source: run once to the end, its blocks held in the object store for the whole
    run, every row converted and checked once by tasks on the cluster's CPUs, then numbered in the Dataset's
    own order (its execution keeps the order: preserve_order) and cut into chunks like any source's, so lanes,
    splits, shuffles and resume treat it as they treat Parquet. `argument`: train_data or val_data."""
    import ray
    import ray.data

    if not isinstance(dataset, ray.data.Dataset):
        raise UserError(f"{argument}: expected a ray.data.Dataset, got {type(dataset).__name__}")
    if data.curriculum_column is not None:
        raise UserError(f"data.curriculum_column: a curriculum needs its difficulty histogram from Parquet "
                        f"footers; not available with {argument}= (write the Dataset with write_parquet and "
                        f"set data.source to it)")
    options = dataset.context.execution_options  # the Dataset's own context, restored after
    kept_order, options.preserve_order = options.preserve_order, True
    try:
        bundles = list(dataset.materialize().iter_internal_ref_bundles())
    except Exception as exc:  # the user's own reads and map_batches run here
        raise UserError(f"{argument}: the Dataset failed to run ({users_error(exc)})") from exc
    finally:
        options.preserve_order = kept_order
    pieces = [sources.BlockPiece(entry.ref, part.start_offset if part else 0,
                                 part.end_offset - part.start_offset if part else entry.metadata.num_rows)
              for bundle in bundles for entry, part in zip(bundle.blocks, bundle.slices, strict=True)]
    pieces = [piece for piece in pieces if piece.rows]
    if not pieces:
        raise UserError(f"{argument}: the Dataset has no rows")
    starts = [0]
    for piece in pieces:
        starts.append(starts[-1] + piece.rows)
    check = ray.remote(_check_block).options(num_cpus=READ_CPUS, max_retries=0)
    refs = [check.remote(piece, data, argument, start) for piece, start in zip(pieces, starts, strict=False)]
    try:
        checked = [ray.get(ref) for ref in refs]  # in order: the error names the first bad row
    except ray.exceptions.RayTaskError as exc:
        _settle(refs)
        cause = getattr(exc, "cause", None)
        if isinstance(cause, UserError):
            raise UserError(str(cause)) from None
        raise
    schema = checked[0][1]
    spec = sources.dataset_spec(schema, data, argument, [stats for stats, _ in checked])
    return sources.SourceInfo("ray_dataset", spec, _chunks(pieces, starts, spec, argument), starts[-1])


def users_error(exc: BaseException) -> str:
    """`Type: message` of the user's own exception inside Ray's wrappers: a map_batches function's error reaches
    the driver as a RayTaskError whose text holds the task's traceback, the user's exception first ("... the
    direct cause of the following exception: ... UserCodeException")."""
    text = str(exc)
    if "direct cause of the following exception" in text:
        lines = [line.strip() for line in text.split("direct cause of the following exception")[0].splitlines()]
        found = [line for line in lines if line and not line.startswith(("File ", "The above", "\x1b", "ray::"))]
        if found:
            return found[-1]
    return f"{type(exc).__name__}: {first_line(exc)}"


def _settle(refs: list) -> None:
    """Fetch every check's outcome once one has failed: Ray prints each error no one fetched as an "Unhandled
    error" traceback (a bad column: one per block, ~80 lines after the one-line error). Each check is one
    block's, so waiting for the rest is short; ray.cancel is not used: on checks that had just finished it
    aborted this process (Ray 2.60: "Tried to complete task that was not pending")."""
    import ray

    for ref in refs:
        try:
            ray.get(ref)
        except Exception:  # noqa: BLE001, S110 - the same error as the one reported, or another block's
            pass


def _check_block(piece: sources.BlockPiece, data: DataConfig, argument: str, first_row: int):
    """Ray task: one block's rows converted and checked (sources.table_stats), and its schema."""
    table = _piece_table(piece)
    return sources.table_stats(table, data, argument, first_row), table.schema


def _chunks(pieces: list[sources.BlockPiece], starts: list[int], spec: sources.DataSpec, argument: str
            ) -> tuple[sources.Chunk, ...]:
    """Chunks of one size in rows, set by a row's size alone (not by Ray's block sizes, which vary between
    executions): the same Dataset gives the same chunks, so a resumed run finds its lanes as they were."""
    size = max(1, min(DATASET_CHUNK_ROWS, DATASET_CHUNK_BYTES // sources.row_bytes(spec)))
    chunks = []
    for start in range(0, starts[-1], size):
        stop = min(start + size, starts[-1])
        parts = tuple(sources.BlockPiece(piece.ref, piece.offset + max(start, first) - first,
                                         min(stop, first + piece.rows) - max(start, first))
                      for piece, first in zip(pieces, starts, strict=False)
                      if first < stop and first + piece.rows > start)
        chunks.append(sources.Chunk(start, stop, argument, None, parts))
    return tuple(chunks)


def _piece_table(piece: sources.BlockPiece):
    return fetch_pieces((piece,))[0]


def fetch_blocks(chunk: sources.Chunk) -> list:
    """The Arrow tables of a Ray Dataset chunk's block pieces, in order (from the object store)."""
    return fetch_pieces(chunk.blocks)


def fetch_pieces(pieces: tuple[sources.BlockPiece, ...]) -> list:
    """Each piece's rows of its block (an Arrow table or a pandas DataFrame) as an Arrow table."""
    import ray
    from ray.data.block import BlockAccessor

    blocks = ray.get([piece.ref for piece in pieces])
    return [BlockAccessor.for_block(block).to_arrow().slice(piece.offset, piece.rows)
            for piece, block in zip(pieces, blocks, strict=True)]
