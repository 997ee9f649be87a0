"""`rayscale predict RUN_DIR --data SRC --output OUT`: batch inference with Ray Data over the cluster.
(`rayscale.predict` also takes a `ray.data.Dataset` as SRC.)

SRC's rows stream through a pool of actors that each hold the run's model (one GPU each where the cluster has
GPUs, else one CPU each); each batch comes back with the model's predictions beside every column it had, and the
whole is written to OUT as Parquet files (part-00000.parquet, ... of a million rows each), rows in SRC's
order. SRC needs the run's input columns only (`data.features`, or every column but the label, weight and
difficulty ones, or `data.sequence`): the label may be missing.

Output columns, besides SRC's own: `prediction` (the class for classification, one class per real token for
token sequences, the target or targets for regression) and, for classification, `probabilities` (the softmax).
"""

from __future__ import annotations

import shutil
import uuid
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from rayscale import config as config_module
from rayscale.data.sources import (
    absolute_source,
    by_name,
    footer,
    holds_numbers,
    is_dataset,
    parquet_files,
    unclaimed_columns,
)
from rayscale.errors import UserError, argument
from rayscale.files import CONFIG_FILE, SUMMARY_FILE, can_write_in, nearest_existing, runs_own_named
from rayscale.plugins import first_line

BATCH_ROWS = 1024
ROWS_PER_FILE = 1_000_000


def input_columns(data: config_module.DataConfig, names: list[str]) -> list[str]:
    """The columns the model reads, as the run's data config resolves them (sources._resolve_columns)."""
    if data.sequence is not None:
        return [data.sequence]
    if data.features is not None:
        return list(data.features)
    return unclaimed_columns(names, data)


class Predictor:
    """One actor of the pool: the run's model on its device, applied to Arrow batches (their columns kept). A row
    the model cannot read (a missing or non-finite feature, a token outside the vocabulary, a sequence longer than
    the model's max_length) gets a null prediction instead of a number made from garbage; the driver counts them."""

    def __init__(self, run_dir: str, columns: list[str], sequence: bool, task: str, device: str, model: Any = None,
                 vocab_size: int | None = None, outputs: int = 1):
        import torch

        from rayscale.models.export import load_model

        torch.set_num_threads(1)
        self.device = torch.device(device)
        self.model = load_model(run_dir, self.device, model)
        self.columns, self.sequence, self.task = columns, sequence, task
        self.vocab_size, self.outputs = vocab_size, outputs

    def __call__(self, table: pa.Table) -> pa.Table:
        import torch

        from rayscale.engine.tasks import forward

        inputs = model_inputs(table, self.columns, self.sequence)
        readable = self._readable(inputs)
        kept = {key: value[readable] for key, value in inputs.items()}
        if self.sequence:  # padded to the longest readable sequence, not to one left out
            width = max(int(kept["mask"].sum(axis=1).max(initial=1)), 1)
            kept = {key: value[:, :width] for key, value in kept.items()}
        with torch.no_grad():
            output = forward(self.model, {k: torch.from_numpy(v).to(self.device) for k, v in kept.items()}) \
                if readable.any() else None
        output = output.float().cpu() if output is not None else None
        if self.task == "regression":
            values = output.numpy() if output is not None else np.zeros((0, 1), np.float32)
            single = values.shape[1] == 1 if output is not None else self.outputs == 1
            column = values[:, 0] if single else values.tolist()
            return table.append_column("prediction", _with_nulls(column, readable, pa.float32() if single
                                                                 else pa.list_(pa.float64())))
        if self.task == "token_classification":
            classes = output.argmax(dim=-1).numpy() if output is not None else None
            lengths = kept["mask"].sum(axis=1)
            return table.append_column("prediction", _with_nulls([classes[i, :n].tolist()
                                                                  for i, n in enumerate(lengths)], readable,
                                                                 pa.list_(pa.int64())))
        classes = output.argmax(dim=-1).numpy() if output is not None else np.zeros(0, np.int64)
        probabilities = torch.softmax(output, dim=-1).numpy().tolist() if output is not None else []
        table = table.append_column("prediction", _with_nulls(classes, readable, pa.int64()))
        return table.append_column("probabilities", _with_nulls(probabilities, readable, pa.list_(pa.float32())))

    def _readable(self, inputs: dict[str, np.ndarray]) -> np.ndarray:
        x = inputs["x"]
        if not self.sequence:
            return np.isfinite(x.reshape(len(x), -1)).all(axis=1)
        real = inputs["mask"]
        ok = ~(real & ((x < 0) | (x >= (self.vocab_size or np.iinfo(np.int64).max)))).any(axis=1)
        longest = getattr(self.model, "max_length", None)
        return ok & (real.sum(axis=1) <= longest) if isinstance(longest, int) else ok


def _with_nulls(values, readable: np.ndarray, type_: pa.DataType) -> pa.Array:
    """`values` for the readable rows, in place, and null for the others."""
    if readable.all():
        return pa.array(values, type_)
    spread: list = [None] * len(readable)
    for index, value in zip(np.flatnonzero(readable), list(values), strict=True):
        spread[index] = value.item() if isinstance(value, np.generic) else value
    return pa.array(spread, type_)


def model_inputs(table: pa.Table, columns: list[str], sequence: bool) -> dict[str, np.ndarray]:
    """The model's input tensors (as numpy) from a batch's input columns."""
    if sequence:
        tokens = table.column(columns[0]).to_pylist()
        lengths = np.array([len(seq) for seq in tokens], dtype=np.int64)
        x = np.zeros((len(tokens), max(int(lengths.max(initial=1)), 1)), dtype=np.int64)
        for i, seq in enumerate(tokens):
            x[i, :len(seq)] = seq
        return {"x": x, "mask": np.arange(x.shape[1])[None, :] < lengths[:, None]}
    first = table.column(columns[0])
    if len(columns) == 1 and not (pa.types.is_integer(first.type) or pa.types.is_floating(first.type)
                                  or pa.types.is_boolean(first.type)):  # one list column
        return {"x": np.asarray(first.to_pylist(), dtype=np.float32)}
    return {"x": np.stack([table.column(name).to_numpy(zero_copy_only=False).astype(np.float32)
                           for name in columns], axis=1)}


def _check_first_rows(rows: pa.Table, where: str, columns: list[str], sequence: bool, input_shape: list[int]
                      ) -> None:
    """SRC's first rows (from `where`) made into the model's inputs, here before the actors start, as they make
    them: columns that are not numbers, or that give another number of features than the model was sized for,
    fail in one line, not in the actors. (The model itself is not run here: it may need the actors' GPU.)"""
    if rows.num_rows == 0:
        return
    columns_named, given = ", ".join(columns), f"{argument('data')}: {where}"
    try:
        x = model_inputs(rows.select(columns), columns, sequence)["x"]
    except (ValueError, TypeError, pa.ArrowException) as exc:
        raise UserError(f"{given}: the columns {columns_named} do not make the model's inputs "
                        f"({type(exc).__name__}: {first_line(exc)})") from None
    if not sequence and tuple(x.shape[1:]) != tuple(input_shape):
        raise UserError(f"{given}: the columns {columns_named} make inputs of shape {tuple(x.shape[1:])}, but the "
                        f"run's model takes {tuple(input_shape)}")


def _head(data: Any) -> tuple[pa.Table, str, list | None]:
    """SRC's first rows (every column), how to name it in a message, and its Parquet files (None: a Dataset)."""
    from rayscale.data.sources import first_rows

    if is_dataset(data):
        from rayscale.data.datasets import users_error

        try:  # the first batch of rows, past any empty blocks
            rows = next(iter(data.limit(4).iter_batches(batch_size=4, batch_format="pyarrow", prefetch_batches=0)),
                        None)
        except Exception as exc:  # the user's own reads and map_batches run here
            raise UserError(f"{argument('data')}: the Dataset failed to run ({users_error(exc)})") from None
        if rows is None or rows.num_rows == 0:  # nor would it have columns to check
            raise UserError(f"{argument('data')}: the Dataset has no rows; nothing to predict")
        return rows, "the Dataset", None
    files = parquet_files(absolute_source(str(data)), argument("data"))  # read by Ray Data's tasks, wherever they run
    if not files:
        raise UserError(f"{argument('data')}: no Parquet file at {data!r} (expected a file, a directory of .parquet "
                        f"files, a glob or a URI)")
    try:
        return first_rows(files[0], None, 4), files[0], files
    except (pa.ArrowException, OSError) as exc:
        raise UserError(f"{argument('data')}: {files[0]} is not a readable Parquet file ({first_line(exc)})") from None


def _check_every_file(files: list[str], columns: list[str]) -> int:
    """Every file's footer: readable Parquet holding the run's input columns, each of the type it has in the first
    file. Returns the rows of all. (Ray Data's read failed at the first bad file with a traceback, its actors
    started and part of the output written; a file without the columns gave null predictions.)"""
    types: dict[str, pa.DataType] = {}
    rows = 0
    for path in files:
        try:
            schema, count = footer(path)
        except (pa.ArrowException, OSError) as exc:
            raise UserError(f"{argument('data')}: {path} is not a readable Parquet file ({first_line(exc)})") \
                from None
        for name in columns:
            if name not in schema.names:
                raise UserError(f"{argument('data')}: column {name!r} (an input of the run) not in {path} "
                                f"(columns: {', '.join(schema.names)})")
            if types.setdefault(name, schema.field(name).type) != schema.field(name).type:
                raise UserError(f"{argument('data')}: column {name!r} is {types[name]} in {files[0]} but "
                                f"{schema.field(name).type} in {path}")
            if not holds_numbers(types[name]):  # text like "0.5" was cast and predicted; train refuses it
                raise UserError(f"{argument('data')}: column {name!r} in {path} is {types[name]}, expected numbers")
        rows += count
    return rows


def _write_in_order(predicted, directory: Path) -> int:
    """The batches as they come (in SRC's order: preserve_order), into part-00000.parquet, part-00001.parquet, ...
    of ROWS_PER_FILE rows. Written here, not by Ray Data's parallel writers, whose files' names do not follow
    the dataset's order; the model's work stays on the actor pool, only the writing passes through this process.
    Returns the rows the model could not read (their prediction null)."""
    directory.mkdir(parents=True)
    writer, part, rows_in_part, unreadable = None, 0, 0, 0
    try:
        for batch in predicted.iter_batches(batch_format="pyarrow", batch_size=None):
            if writer is None or rows_in_part >= ROWS_PER_FILE:
                if writer is not None:
                    writer.close()
                writer = pq.ParquetWriter(directory / f"part-{part:05d}.parquet", batch.schema)
                part, rows_in_part = part + 1, 0
            writer.write_table(batch.cast(writer.schema))
            rows_in_part += batch.num_rows
            unreadable += batch.column("prediction").null_count
    finally:
        if writer is not None:
            writer.close()
    return unreadable


def _check_arguments(run_dir: str | Path, data: Any, output: str | Path, workers: int | None) -> tuple[Path, Path]:
    """The run directory and OUT, absolute, once every argument that needs no data is usable."""
    if not isinstance(data, str | Path) and not is_dataset(data):
        raise UserError(f"{argument('data')}: expected Parquet (a file, a directory, a glob or a URI) or a "
                        f"ray.data.Dataset, got {type(data).__name__}")
    if not str(output).strip():  # Path("") is the working directory, which the output would replace
        raise UserError(f"{argument('output')}: expected a new (or empty) directory for the Parquet output, got an "
                        f"empty path")
    run_dir, output = Path(run_dir).resolve(), Path(output).expanduser().resolve()
    if output == Path.cwd().resolve() or output in Path.cwd().resolve().parents:
        raise UserError(f"{argument('output')}: {output} is the working directory or holds it; expected a new "
                        f"directory")
    for name in (CONFIG_FILE, SUMMARY_FILE):
        if not (run_dir / name).is_file():
            raise UserError(f"{run_dir}: no {name}; expected the directory of a finished rayscale run")
    if output.exists() and (not output.is_dir() or any(output.iterdir())):
        raise UserError(f"{argument('output')}: {output} already exists and is not an empty directory; pick a new "
                        f"one")
    if (own := runs_own_named(output, run_dir)) is not None:
        raise UserError(f"{argument('output')}: {output} would write into {own}; expected a new directory outside it")
    if not can_write_in(nearest_existing(output.parent)):  # its parents are made as needed
        raise UserError(f"{argument('output')}: cannot create {output} (no writing in "
                        f"{nearest_existing(output.parent)}); expected a new directory where you can write")
    if workers is not None and workers < 1:
        raise UserError(f"{argument('workers')} {workers}: expected at least 1")
    return run_dir, output


def _check_pool(workers: int | None, gpus: int, cpus: int, has: str) -> None:
    """A pool of `workers` model holders fits `gpus` GPUs, or `cpus` CPUs with one left for reading the data:
    the rest would wait for a GPU or CPU forever."""
    room = gpus or max(cpus - 1, 1)
    if workers is not None and workers > room:
        given = f"{argument('workers')} {workers}"
        raise UserError(f"{given}: {has} {gpus} GPUs; expected at most {room}" if gpus else
                        f"{given}: {has} {cpus} CPUs, of which {room} can hold a model (one reads the data); "
                        f"expected at most {room}")


def predict(run_dir: str | Path, data: Any, output: str | Path, *, address: str | None = None,
            workers: int | None = None, model: Any = None) -> int:
    """Run the prediction; returns the rows written. Bad input is refused before Ray starts."""
    from rayscale.launch.connect import connect, embedded_cpus, will_embed
    from rayscale.models.export import run_summary, trained_features

    run_dir, output = _check_arguments(run_dir, data, output, workers)
    if is_dataset(data):  # looking at its rows runs it: on the cluster asked for, not a Ray it would start
        connect(address)
    cfg = config_module.load_run(run_dir)
    spec = run_summary(run_dir)["data_spec"]
    cfg.data = by_name(cfg.data, trained_features(run_dir))  # SRC's columns taken by the names it trained on
    head, where, files = _head(data)
    names = head.column_names
    columns = input_columns(cfg.data, names)
    if files is None:  # a Dataset: its first rows are all there is to check up front
        for name in columns:
            if name not in names:
                raise UserError(f"{argument('data')}: column {name!r} (an input of the run) not in {where} "
                                f"(columns: {', '.join(names)})")
    elif _check_every_file(files, columns) == 0:  # Ray Data would run no batch: OUT an empty directory
        raise UserError(f"{argument('data')}: {data} has no rows; nothing to predict")
    _check_first_rows(head, where, columns, cfg.data.sequence is not None, spec["input_shape"])
    from rayscale.models.export import load_model

    load_model(run_dir, "cpu", model)  # the model rebuilds here first (a user factory must import)
    if workers is not None and will_embed(address):
        import torch  # the embedded Ray's size is known before it starts: refused without starting it

        _check_pool(workers, torch.cuda.device_count(), embedded_cpus(), "this machine's embedded Ray has")

    connect(address)
    import ray
    from ray.data import DataContext

    from rayscale.data.datasets import most_resources

    now, most = ray.cluster_resources(), most_resources()  # most: what an autoscaling cluster can grow to
    gpus, cpus = int(now.get("GPU", 0)), int(now.get("CPU", 1))
    pool = workers or (gpus or max(1, min(4, cpus - 1)))
    top_gpus, top_cpus = max(gpus, int(most.get("GPU", 0))), max(cpus, int(most.get("CPU", 0)))
    _check_pool(workers, top_gpus, top_cpus, "the cluster can grow to" if most else "the cluster has")
    # Rows written in SRC's order: a Dataset's own context, or this process's for the Dataset read here.
    context = data.context if files is None else DataContext.get_current()
    kept_order = context.execution_options.preserve_order
    context.execution_options.preserve_order = True
    # Written beside OUT and renamed into place once whole: a failed run leaves no half-written OUT.
    staging = output.parent / f".{output.name}.partial-{uuid.uuid4().hex[:8]}"
    try:
        dataset = data if files is None else ray.data.read_parquet(files)
        predicted = dataset.map_batches(
            Predictor, batch_size=BATCH_ROWS, batch_format="pyarrow", concurrency=pool,
            num_gpus=1 if gpus else 0, num_cpus=0 if gpus else 1,
            fn_constructor_kwargs={"run_dir": str(run_dir), "columns": columns, "task": spec["task"],
                                   "sequence": cfg.data.sequence is not None, "device": "cuda" if gpus else "cpu",
                                   "model": model, "vocab_size": spec.get("vocab_size"),
                                   "outputs": spec["num_outputs"]})
        named = where if files is None else f"{data} ({len(files)} files)"
        print(f"[rayscale] predict with {run_dir.name}'s model on {named}: {pool} {'GPU' if gpus else 'CPU'} "
              f"actors, writing {output}", flush=True)
        unreadable = _write_in_order(predicted, staging)
        if output.exists():
            output.rmdir()  # the empty directory checked above
        staging.rename(output)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
        context.execution_options.preserve_order = kept_order
    rows = sum(pq.ParquetFile(path).metadata.num_rows for path in output.glob("*.parquet"))
    print(f"[rayscale] wrote {rows:,} rows to {output}", flush=True)
    if unreadable:
        print(f"[rayscale] {unreadable:,} of them have a null prediction: a feature missing or not finite, or a "
              f"token outside the model's vocabulary, or a sequence longer than its max_length", flush=True)
    return rows
