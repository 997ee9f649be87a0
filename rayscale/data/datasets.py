"""The driver's Ray Datasets: one lazy dataset per training epoch (ordered, or shuffled, for that epoch) and one
for validation, read by Ray Data tasks on the cluster's CPUs.

Every worker streams the whole training dataset of an epoch and keeps only its slice of each global step
(data/assembly.py), instead of a `streaming_split` shard: Ray assigns blocks to split shards dynamically, so
which rows a rank sees changes from run to run, shards are uneven (ranks take different step counts and hang,
Ray #66085) and `equal=True` silently drops rows (#63285). Reading every training row on every worker is the
price. Validation has no steps to keep in line: each rank gets its own shard (`build_shard`), a fixed
contiguous share of the split's rows cut from the row counts alone (splits.shard_reads), so every validation
row is read and evaluated once across the cluster.
"""

from __future__ import annotations

from rayscale.data.splits import (
    CURRICULUM_KEY,
    CurriculumOrder,
    SplitSpec,
    add_curriculum_keys,
    chunk_order,
    epoch_shuffle,
    read_split_chunks,
    read_split_pieces,
)
from rayscale.math.lanes import ChunkRead

READ_CPUS = 0.25


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


def build_shard(spec: SplitSpec, reads: list[ChunkRead]):
    """A lazy Ray Dataset of one shard of the split (split.shard_reads): its chunk pieces, in order."""
    import ray.data

    items = [{"chunk": read.chunk, "skip": read.skip, "take": read.take} for read in reads] or \
        [{"chunk": 0, "skip": 0, "take": 0}]  # an empty shard (fewer rows than ranks): no rows, one empty block
    tasks_at_once = ray.data.TaskPoolStrategy(size=read_tasks_at_once(len(items)))
    return ray.data.from_items(items, override_num_blocks=len(items)).map_batches(
        read_split_pieces, fn_kwargs={"spec": spec}, batch_size=1, batch_format="numpy", num_cpus=READ_CPUS,
        compute=tasks_at_once)


def build_dataset(spec: SplitSpec, epoch: int | None = None, order: CurriculumOrder | None = None):
    """A lazy Ray Dataset of the split; for training, ordered (or shuffled) for `epoch`.

    With a curriculum `order` the epoch's rows are sorted by their curriculum key in Ray Data (a distributed
    sort, spilled by Ray's object store, never gathered on the driver), ties broken by row id: one total order,
    so every rank and every run (and a resumed one) streams the same rows in the same order.
    """
    import ray.data

    shuffle = epoch_shuffle(spec, order)
    items = [{"chunk": int(i)} for i in chunk_order(len(spec.info.chunks), shuffle, spec.seed, epoch)]
    tasks_at_once = ray.data.TaskPoolStrategy(size=read_tasks_at_once(len(items)))
    dataset = ray.data.from_items(items, override_num_blocks=len(items)).map_batches(
        read_split_chunks, fn_kwargs={"spec": spec}, batch_size=1, batch_format="numpy", num_cpus=READ_CPUS,
        compute=tasks_at_once)
    if shuffle == "full" and epoch is not None:
        dataset = dataset.random_shuffle(seed=spec.seed * 1000 + epoch, num_cpus=READ_CPUS)
    if order is not None:
        dataset = dataset.map_batches(add_curriculum_keys, fn_kwargs={"order": order}, batch_format="numpy",
                                      num_cpus=READ_CPUS)
        dataset = dataset.sort([CURRICULUM_KEY, "row_id"]).drop_columns([CURRICULUM_KEY])
    return dataset


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
    # Blocks in chunk order, always. Train passes DataConfig's execution options to its workers' shards, but a
    # local-mode run (the loop in the driver) gets none: without this, two identical local runs differed.
    ray.data.DataContext.get_current().execution_options.preserve_order = True
