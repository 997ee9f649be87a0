"""Where rows come from: the bundled digits, seeded synthetic generators, Parquet (local or on a URI), and a
Ray Dataset handed to rayscale.train (`train_data=`, `val_data=`).

Every source is a list of *chunks*: contiguous ranges of global row ids that can be read on their own (a
Parquet row group, a slice of digits, a block of generated rows, a run of a materialized Ray Dataset's blocks).
The driver calls `inspect_source` once, which looks at metadata only, and ships the chunks; Ray Data tasks call
`read_chunk` to turn one chunk into numpy columns:

  row_id  int64 (n,)   global row id, chunk.start .. chunk.stop - 1
  x       float32 (n, F) tabular | float32 (n, *shape) a tensor column (images: (n, 1, H, W) digits, or
          whatever shape a Ray Dataset's tensor column has) | object (n,) of int64 token arrays
  y       int64 (n,) classes (one per row, or per sequence) | float32 (n, K) regression targets
          | object (n,) of int64 per-token classes (IGNORE_INDEX: a masked token)
  weight  float32 (n,), only when data.weight is set

This module imports neither Ray nor torch and never downloads anything; a Ray Dataset's chunks are fetched by
data/datasets.py (the data layer's Ray code) and converted here, by the same code as Parquet's row groups.
"""

from __future__ import annotations

import dataclasses
import difflib
import functools
import glob
import math
import os
from dataclasses import dataclass
from fnmatch import fnmatch
from pathlib import Path
from urllib.parse import urlsplit

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.fs as pafs
import pyarrow.parquet as pq

from rayscale.config import DataConfig, SyntheticConfig
from rayscale.errors import UserError

TASKS = ("classification", "regression", "token_classification", "sequence_classification")
IGNORE_INDEX = -100  # a per-token label equal to this counts nowhere (PyTorch's and Hugging Face's convention)


@dataclass(frozen=True)
class DataSpec:
    """What the model must accept and produce; derived from the data, handed to the model factory.
    (Here, not in tasks.py: Ray Data's read tasks unpickle it, and tasks.py imports torch.)"""

    task: str  # one of TASKS
    input_shape: tuple[int, ...]  # per-sample shape of x: (F,), (C, H, W) or (L,) for sequences
    num_outputs: int  # classes for classification tasks, targets for regression
    vocab_size: int | None = None  # sequences only

    def takes_inputs_of(self, other: DataSpec) -> bool:
        """Whether a model sized for this data reads `other`'s rows: the same task and per-sample shape (any
        sequence length: sequences are padded per micro-batch)."""
        if self.task != other.task or (self.vocab_size is None) != (other.vocab_size is None):
            return False
        return self.vocab_size is not None or self.input_shape == other.input_shape

    def beyond(self, model: DataSpec) -> str | None:
        """What of this data (its labels, its tokens) a model sized for `model`'s data cannot take, in words; None
        if nothing. A model built for 6 classes meets label 6 as an IndexError in the middle of a validation."""
        if self.task != "regression" and self.num_outputs > model.num_outputs:
            return (f"class labels up to {self.num_outputs - 1}, but the model was sized for {model.num_outputs} "
                    f"classes (0 to {model.num_outputs - 1}) by the training data; set data.num_classes to cover both")
        if self.vocab_size is not None and model.vocab_size is not None and self.vocab_size > model.vocab_size:
            return (f"token ids up to {self.vocab_size - 1}, but the model's vocabulary was sized for "
                    f"{model.vocab_size} tokens by the training data")
        return None


def row_bytes(spec: DataSpec) -> int:
    """A row's size in memory, estimated from its shape alone: float32 features (or int64 tokens and per-token
    labels, up to the longest sequence), plus a label, a row id and a weight."""
    if spec.vocab_size is not None:
        return 24 + 16 * spec.input_shape[0]
    return 24 + 4 * math.prod(size for size in spec.input_shape if size is not None)


BUILTIN = ("digits", "synthetic")
DIGITS_CHUNKS = 8  # ~225 rows each, so that shuffling the block order has something to shuffle
GENERATION_BLOCK_ROWS = 8192  # synthetic rows are generated per block of this many rows, keyed by block index
TEACHER_HIDDEN = 16  # width of the regression teacher's hidden layer


# data.weight: a step's loss is sum(weight * loss) / sum(weight) in float32, and its gradients are computed
# through that sum. Weights of 1e38 overflowed it (NaN losses, an untrained model saved) and a column whose largest
# weight is 1e-40 underflowed it (every gradient 0). A weighted mean is the same with every weight divided by one
# number, so weights far from 1 are refused with that advice rather than trained on silently.
WEIGHT_LIMIT = 1e20  # every weight is below it, and a source's largest weight is at least its inverse
RESCALE = "a weighted loss is the same with every weight divided by one number: divide the column by its largest"
DATASET_PREFIX = "ray_dataset:"  # data.source / data.val_source of a Ray Dataset handed in: ray_dataset:train_data


def is_dataset(value) -> bool:
    """A ray.data.Dataset, known without importing Ray Data: one exists only where ray.data was imported."""
    import sys

    module = sys.modules.get("ray.data")
    return module is not None and isinstance(value, module.Dataset)


@dataclass(frozen=True)
class BlockPiece:
    """Rows [offset, offset + rows) of one block of a materialized Ray Dataset (`ref`: its ObjectRef)."""

    ref: object
    offset: int
    rows: int


@dataclass(frozen=True)
class Chunk:
    """One unit of lazy reading: global row ids [start, stop)."""

    start: int  # global row id of the chunk's first row
    stop: int  # one past the last row id
    path: str | None = None  # Parquet file (local path or URI) for Parquet sources; the argument for a Dataset
    row_group: int | None = None  # row group inside `path`
    blocks: tuple[BlockPiece, ...] = ()  # a Ray Dataset's rows, in order


@dataclass(frozen=True)
class SourceInfo:
    """What the driver knows about a source without reading its rows."""

    kind: str  # "digits" | "synthetic" | "parquet" | "ray_dataset"
    spec: DataSpec  # task, input_shape, num_outputs, vocab_size
    chunks: tuple[Chunk, ...]  # in row-id order, covering [0, num_rows) without gaps
    num_rows: int
    # data.curriculum_column of the training source: histogram bin edges and counts (curriculum.quantiles)
    difficulty_histogram: tuple[tuple[float, ...], tuple[int, ...]] | None = None
    features: tuple[str, ...] = ()  # Parquet: the feature columns, by name and in the order the model reads them


def inspect_source(source: str, data: DataConfig, seed: int, *, key: str = "data.source") -> SourceInfo:
    """Driver side, cheap: no rows are read or generated. For Parquet: every footer and schema, plus the label
    column's range when the class count is inferred (footer statistics where the writer stored them) and, for
    sequences, the token column (longest sequence, vocabulary).

    `key` names the config key `source` came from (data.source or data.val_source) in error messages.
    """
    if source == "digits":
        return _inspect_digits()
    if source == "synthetic":
        return _inspect_synthetic(data.synthetic)
    if source.startswith(DATASET_PREFIX):  # its SourceInfo comes from data/datasets.py, made where it was given
        argument = source[len(DATASET_PREFIX):]
        raise UserError(f"{key}: {source} stands for a ray.data.Dataset handed to rayscale.train({argument}=...) "
                        f"or rayscale.tune; pass the Dataset again (a config file or the CLI cannot carry it)")
    return _inspect_parquet(source, data, key)


def read_chunk(info_kind: str, chunk: Chunk, data: DataConfig, seed: int) -> dict[str, np.ndarray]:
    """Worker side: the rows of one chunk as numpy columns (see the module docstring)."""
    if info_kind == "digits":
        x, y = _digits()
        rows = slice(chunk.start, chunk.stop)  # copies, so that no caller can change the cached arrays
        return {"row_id": np.arange(chunk.start, chunk.stop, dtype=np.int64), "x": x[rows].copy(),
                "y": y[rows].copy()}
    if info_kind == "synthetic":
        return _read_synthetic(chunk, data.synthetic, seed)
    if info_kind == "parquet":
        return _read_parquet(chunk, data)
    if info_kind == "ray_dataset":
        from rayscale.data.datasets import fetch_blocks  # the block fetch is Ray's; the conversion is below

        parts, start = [], chunk.start
        for table in fetch_blocks(chunk):
            parts.append(table_rows(table, data, chunk.path or "train_data", start, start))
            start += table.num_rows
        return {key: concat_columns([part[key] for part in parts]) for key in parts[0]}
    raise ValueError(f"unknown source kind {info_kind!r}")


def concat_columns(parts: list[np.ndarray]) -> np.ndarray:
    if parts[0].dtype == object:
        out = np.empty(sum(len(p) for p in parts), dtype=object)
        out[:] = [item for part in parts for item in part]
        return out
    return np.concatenate(parts)


# ------------------------------------------------------------------------------------------------ digits

@functools.lru_cache(maxsize=1)
def _digits() -> tuple[np.ndarray, np.ndarray]:
    """The 8x8 digits that ship inside the scikit-learn wheel, read as its `load_digits` reads them, without
    importing scikit-learn (most of a second in every process that reads them)."""
    import gzip
    import importlib.util

    package = importlib.util.find_spec("sklearn")
    path = Path(package.submodule_search_locations[0]) / "datasets" / "data" / "digits.csv.gz" if package else None
    if path is None or not path.is_file():  # another layout: let scikit-learn find it
        from sklearn.datasets import load_digits

        digits = load_digits()
        return (digits.data / 16.0).astype(np.float32), digits.target.astype(np.int64)
    with gzip.open(path, mode="rt", encoding="utf-8") as rows:
        table = np.loadtxt(rows, delimiter=",")
    return (table[:, :-1] / 16.0).astype(np.float32), table[:, -1].astype(np.int64)


def _inspect_digits() -> SourceInfo:
    num_rows = 1797
    bounds = np.linspace(0, num_rows, DIGITS_CHUNKS + 1).astype(int)
    chunks = tuple(Chunk(int(a), int(b)) for a, b in zip(bounds[:-1], bounds[1:], strict=True))
    return SourceInfo("digits", DataSpec("classification", (64,), 10), chunks, num_rows)


# --------------------------------------------------------------------------------------------- synthetic
#
# Determinism: the teacher (weights, image templates) comes from the seed alone; the rows of generation block b
# (row ids b * GENERATION_BLOCK_ROWS ...) come from an RNG keyed by (seed, b), and a whole block is always
# generated and then sliced. So a row id maps to the same row whatever chunks are read, whatever `rows` is.

def _inspect_synthetic(synthetic: SyntheticConfig) -> SourceInfo:
    s = synthetic
    spec = {
        "classification": DataSpec("classification", (s.num_features,), s.num_classes),
        "regression": DataSpec("regression", (s.num_features,), 1),
        "image": DataSpec("classification", (1, s.image_size, s.image_size), s.num_classes),
        "sequence": DataSpec("token_classification", (s.max_length,), s.num_classes, s.vocab_size),
    }[s.kind]
    chunks = tuple(Chunk(start, min(start + GENERATION_BLOCK_ROWS, s.rows))
                   for start in range(0, s.rows, GENERATION_BLOCK_ROWS))
    return SourceInfo("synthetic", spec, chunks, s.rows)


def _rng(seed: int, *stream: int) -> np.random.Generator:
    # spawn_key keeps the teacher's stream and every block's stream apart, whatever the values.
    return np.random.default_rng(np.random.SeedSequence(seed % 2**64, spawn_key=stream))


def _teacher(s: SyntheticConfig, seed: int) -> dict[str, np.ndarray]:
    rng = _rng(seed, 0)
    if s.kind == "classification":  # logits with std ~2: noise 0.5 leaves ~80% of labels on the argmax
        return {"w": rng.standard_normal((s.num_features, s.num_classes)) * 2 / np.sqrt(s.num_features),
                "b": rng.standard_normal(s.num_classes) * 0.1}
    if s.kind == "regression":
        return {"w1": rng.standard_normal((s.num_features, TEACHER_HIDDEN)) * 2 / np.sqrt(s.num_features),
                "w2": rng.standard_normal(TEACHER_HIDDEN) / np.sqrt(TEACHER_HIDDEN)}
    if s.kind == "image":  # white noise blurred by a Gaussian along both axes, scaled to unit std
        side = np.arange(s.image_size)
        blur = np.exp(-0.5 * ((side[:, None] - side[None, :]) / (s.image_size / 6)) ** 2)
        templates = blur @ rng.standard_normal((s.num_classes, s.image_size, s.image_size)) @ blur.T
        templates -= templates.mean(axis=(1, 2), keepdims=True)
        return {"templates": templates / templates.std(axis=(1, 2), keepdims=True)}
    return {}  # sequence labels are a fixed function of the tokens


def _generate_block(s: SyntheticConfig, teacher: dict[str, np.ndarray], seed: int,
                    block: int) -> tuple[np.ndarray, np.ndarray]:
    rng, n = _rng(seed, 1, block), GENERATION_BLOCK_ROWS
    if s.kind in ("classification", "regression"):
        x = rng.standard_normal((n, s.num_features))
        if s.kind == "classification":
            logits = x @ teacher["w"] + teacher["b"] + s.noise * rng.standard_normal((n, s.num_classes))
            return x.astype(np.float32), logits.argmax(axis=1).astype(np.int64)
        y = np.tanh(x @ teacher["w1"]) @ teacher["w2"] + s.noise * rng.standard_normal(n)
        return x.astype(np.float32), y.astype(np.float32)[:, None]
    if s.kind == "image":
        y = rng.integers(0, s.num_classes, size=n)
        x = teacher["templates"][y] + s.noise * rng.standard_normal((n, s.image_size, s.image_size))
        return x.astype(np.float32)[:, None], y.astype(np.int64)
    # sequence: the label of token t is (token_t + token_{t-1}) % num_classes, so it needs context
    lengths = rng.integers(2, s.max_length + 1, size=n)
    tokens = rng.integers(0, s.vocab_size, size=int(lengths.sum()), dtype=np.int64)
    starts = np.cumsum(lengths)[:-1]
    previous = np.concatenate(([0], tokens[:-1]))
    previous[starts] = 0  # token_{-1} = 0 at the start of every sequence
    labels = (tokens + previous) % s.num_classes
    x, y = np.empty(n, dtype=object), np.empty(n, dtype=object)
    for i, (seq, seq_labels) in enumerate(zip(np.split(tokens, starts), np.split(labels, starts), strict=True)):
        x[i], y[i] = seq, seq_labels
    return x, y


def _read_synthetic(chunk: Chunk, s: SyntheticConfig, seed: int) -> dict[str, np.ndarray]:
    teacher = _teacher(s, seed)
    first, last = chunk.start // GENERATION_BLOCK_ROWS, (chunk.stop - 1) // GENERATION_BLOCK_ROWS
    blocks = [_generate_block(s, teacher, seed, b) for b in range(first, last + 1)]
    offset = first * GENERATION_BLOCK_ROWS
    rows = slice(chunk.start - offset, chunk.stop - offset)
    x = blocks[0][0] if len(blocks) == 1 else np.concatenate([b[0] for b in blocks])
    y = blocks[0][1] if len(blocks) == 1 else np.concatenate([b[1] for b in blocks])
    # copy: a slice would keep the whole generated block alive
    return {"row_id": np.arange(chunk.start, chunk.stop, dtype=np.int64), "x": x[rows].copy(), "y": y[rows].copy()}


# ----------------------------------------------------------------------------------------------- Parquet

def _is_uri(path: str) -> bool:
    return "://" in path


def absolute_source(source: str) -> str:
    """A local path (file, directory or glob) made absolute against this process's working directory: Ray Train
    runs every worker in a directory of its own, where a relative path names nothing. Built-in sources, the
    stand-ins for Ray Datasets and URIs are returned as they are."""
    if source in BUILTIN or source.startswith(DATASET_PREFIX) or _is_uri(source):
        return source
    return os.path.abspath(os.path.expanduser(source))


def _open(path: str) -> pq.ParquetFile:
    """Open one Parquet file, a local path or a URI; raises pyarrow's errors unchanged."""
    if _is_uri(path):
        filesystem, inner = pafs.FileSystem.from_uri(path)
        return pq.ParquetFile(inner, filesystem=filesystem)
    return pq.ParquetFile(path)


def parquet_files(source: str, key: str) -> list[str]:
    """The Parquet files `source` names, sorted (a file, a directory, a glob or a URI); `key` names it in errors."""
    return _list_files(source, key)


def first_rows(path: str, columns: list[str] | None, rows: int) -> pa.Table:
    """Up to `rows` rows of one Parquet file's `columns` (None: all; a local path or a URI), from its start."""
    with _open(path) as parquet:
        for batch in parquet.iter_batches(batch_size=rows, columns=columns):
            return pa.Table.from_batches([batch])
        return parquet.schema_arrow.empty_table() if columns is None else \
            parquet.schema_arrow.empty_table().select(columns)


def footer(path: str) -> tuple[pa.Schema, int]:
    """One Parquet file's schema and row count (a local path or a URI), from its footer; pyarrow's errors
    unchanged."""
    with _open(path) as parquet:
        return parquet.schema_arrow, parquet.metadata.num_rows


def _list_files(source: str, key: str) -> list[str]:
    """Sorted Parquet files named by `source`: a file, a directory (every *.parquet below), a glob or a URI."""
    has_glob = any(c in source for c in "*?[")
    if not _is_uri(source):
        local = os.path.expanduser(source)
        matches = sorted(glob.glob(local, recursive=True)) if has_glob else [local]
        files = []
        for match in matches:
            if os.path.isdir(match):
                files += sorted(glob.glob(os.path.join(match, "**", "*.parquet"), recursive=True))
            elif os.path.isfile(match):
                files.append(match)
        return files
    try:
        filesystem, inner = pafs.FileSystem.from_uri(source)
        split = urlsplit(source)
        # s3://bucket/key gives the path "bucket/key", hdfs://host/path gives "/path": rebuild URIs to match
        prefix = f"{split.scheme}://" + ("" if inner.startswith(split.netloc) else split.netloc)
        suffix = f"?{split.query}" if split.query else ""
        if has_glob:  # list below the part of the path before the first wildcard, then match
            base = inner[:min(inner.find(c) for c in "*?[" if c in inner)].rsplit("/", 1)[0]
            infos = filesystem.get_file_info(pafs.FileSelector(base, recursive=True, allow_not_found=True))
            paths = [i.path for i in infos if i.type == pafs.FileType.File and fnmatch(i.path, inner)]
        else:
            info = filesystem.get_file_info(inner)
            if info.type == pafs.FileType.Directory:
                infos = filesystem.get_file_info(pafs.FileSelector(inner, recursive=True))
                paths = [i.path for i in infos if i.type == pafs.FileType.File and i.path.endswith(".parquet")]
            else:
                paths = [inner] if info.type == pafs.FileType.File else []
    except (pa.ArrowException, OSError, ValueError) as exc:
        raise UserError(f"{key}: cannot open {source!r} ({_first_line(exc)})") from None
    return [prefix + p + suffix for p in sorted(paths)]


def _first_line(exc: BaseException) -> str:
    return (str(exc).strip().splitlines() or [type(exc).__name__])[0]


def _is_number(tp: pa.DataType) -> bool:
    return pa.types.is_integer(tp) or pa.types.is_floating(tp) or pa.types.is_boolean(tp)


def tensor_shape(tp: pa.DataType) -> tuple[int, ...] | None:
    """The per-row shape of a fixed-shape tensor column (Ray Data's tensor extension type, which numpy columns
    of more than one dimension become, or Arrow's fixed_shape_tensor); None for any other type."""
    shape = getattr(tp, "shape", None) if isinstance(tp, pa.ExtensionType) else None
    return tuple(int(size) for size in shape) if shape is not None and None not in shape else None


def _tensor_value_type(tp: pa.ExtensionType) -> pa.DataType:
    storage = tp.storage_type
    return storage.value_type if _is_list(storage) else storage


def _is_list(tp: pa.DataType) -> bool:
    return pa.types.is_list(tp) or pa.types.is_large_list(tp) or pa.types.is_fixed_size_list(tp)


def holds_numbers(tp: pa.DataType) -> bool:
    """A column a model can read: numbers, a list of numbers (features, tokens) or a tensor of numbers."""
    if isinstance(tp, pa.ExtensionType):
        tp = _tensor_value_type(tp)
    return _is_number(tp.value_type if _is_list(tp) else tp)


@dataclass(frozen=True)
class _Columns:
    """Which Parquet columns play which part, resolved from the config and one file's schema."""

    features: tuple[str, ...]  # empty for sequence data
    label: str
    weight: str | None
    sequence: str | None
    difficulty: str | None = None  # data.curriculum_column where the file has it (required in data.source)


def unclaimed_columns(names: list[str], data: DataConfig) -> list[str]:
    """The feature columns when data.features is null: every column not the label, the weight or the difficulty
    (which is never a feature), nor pandas' index."""
    taken = {data.label, data.weight, data.curriculum_column}
    return [name for name in names if name not in taken and not name.startswith("__index_level_")]


def resolve_columns(schema: pa.Schema, data: DataConfig, path: str) -> _Columns:
    names = schema.names
    if twice := sorted({name for name in names if names.count(name) > 1}):  # pyarrow finds neither by name
        raise UserError(f"{path}: more than one column named {', '.join(map(repr, twice))}; expected distinct "
                        f"column names")

    def need(name: str, config_key: str) -> pa.DataType:
        if name not in names:
            raise UserError(f"{config_key}: column {name!r} not in {path} (columns: {', '.join(names)})")
        return schema.field(name).type

    label_type = need(data.label, "data.label")
    difficulty = data.curriculum_column if data.curriculum_column in names else None
    if difficulty is not None:  # (the difficulty as an input too: refused by rules.py)
        tp = schema.field(difficulty).type
        if not (pa.types.is_integer(tp) or pa.types.is_floating(tp)):
            raise UserError(f"data.curriculum_column: column {difficulty!r} in {path} is {tp}, expected numbers "
                            f"(lower = easier)")
    if data.weight is not None and not _is_number(need(data.weight, "data.weight")):
        raise UserError(f"data.weight: column {data.weight!r} in {path} is {schema.field(data.weight).type}, "
                        f"expected numbers")
    if data.sequence is not None:  # (data.features with it: refused by rules.py)
        tp = need(data.sequence, "data.sequence")
        if not (_is_list(tp) and pa.types.is_integer(tp.value_type)):
            raise UserError(f"data.sequence: column {data.sequence!r} in {path} is {tp}, expected a list of integers")
        per_token = _is_list(label_type) and pa.types.is_integer(label_type.value_type)
        if not (pa.types.is_integer(label_type) or per_token):
            raise UserError(f"data.label: column {data.label!r} in {path} is {label_type}, expected a list of "
                            f"integers (one label per token) or an integer (one label per sequence), because "
                            f"data.sequence is set")
        return _Columns((), data.label, data.weight, data.sequence, difficulty)

    if not (_is_number(label_type) or (_is_list(label_type) and pa.types.is_floating(label_type.value_type))):
        raise UserError(f"data.label: column {data.label!r} in {path} is {label_type}, expected integers "
                        f"(classes) or floats (regression targets); per-token labels need data.sequence")
    if data.num_classes is not None and not (pa.types.is_integer(label_type) or pa.types.is_boolean(label_type)):
        raise UserError(f"data.num_classes: column {data.label!r} in {path} is {label_type}, which holds "
                        f"regression targets; classes are integers (set data.num_classes null, or store the "
                        f"classes as integers)")
    if data.features is not None:
        features = list(data.features)
        for name in features:
            need(name, "data.features")
    else:
        features = unclaimed_columns(names, data)
        if not features:
            raise UserError(f"data.features: no feature columns left in {path} (columns: {', '.join(names)})")
    for name in features:
        tp = schema.field(name).type
        if isinstance(tp, pa.ExtensionType):
            if tensor_shape(tp) is None:
                raise UserError(f"data.features: column {name!r} in {path} holds tensors of varying shapes "
                                f"({tp}); expected one shape for every row (images: read_images(size=...))")
            if len(features) > 1:
                raise UserError(f"data.features: column {name!r} in {path} is a tensor column, which must be "
                                f"the only feature column (features: {', '.join(features)})")
            tp = _tensor_value_type(tp)
        elif _is_list(tp):
            if len(features) > 1:
                raise UserError(f"data.features: column {name!r} in {path} is a list column, which must be the "
                                f"only feature column (features: {', '.join(features)})")
            tp = tp.value_type
        if not _is_number(tp):
            raise UserError(f"data.features: column {name!r} in {path} is {schema.field(name).type}, "
                            f"expected numbers")
    return _Columns(tuple(features), data.label, data.weight, None, difficulty)


def _inspect_parquet(source: str, data: DataConfig, key: str) -> SourceInfo:
    paths = _list_files(source, key)
    if not paths:
        close = difflib.get_close_matches(source, BUILTIN, n=1, cutoff=0.6)
        hint = f" (did you mean {close[0]}?)" if close else ""
        raise UserError(f"{key}: no Parquet file at {source!r} (expected a file, a directory of .parquet files, "
                        f"a glob or a URI){hint}")
    chunks: list[Chunk] = []
    columns: _Columns | None = None
    types: dict[str, pa.DataType] = {}
    first_path = paths[0]
    stats = _Stats()
    for path in paths:
        try:
            parquet = _open(path)
            schema = parquet.schema_arrow
        except (pa.ArrowException, OSError) as exc:
            raise UserError(f"{key}: {path} is not a readable Parquet file ({_first_line(exc)})") from None
        with parquet:
            resolved = resolve_columns(schema, data, path)
            if key == "data.source" and data.curriculum_column is not None and resolved.difficulty is None:
                raise UserError(f"data.curriculum_column: column {data.curriculum_column!r} not in {path} "
                                f"(columns: {', '.join(schema.names)})")
            if columns is None:
                columns, first_path = resolved, path
                types = {name: schema.field(name).type for name in _used(columns)}
            elif resolved != columns:
                raise UserError(f"data.features: {first_path} and {path} have different feature columns "
                                f"({', '.join(columns.features)} vs {', '.join(resolved.features)}); "
                                f"set data.features")
            for name, config_key in _roles(columns):
                if schema.field(name).type != types[name]:
                    raise UserError(f"{config_key}: column {name!r} is {types[name]} in {first_path} but "
                                    f"{schema.field(name).type} in {path}")
            file_chunks = len(chunks)
            for group in range(parquet.metadata.num_row_groups):
                rows = parquet.metadata.row_group(group).num_rows
                if rows:
                    start = chunks[-1].stop if chunks else 0
                    chunks.append(Chunk(start, start + rows, path, group))
            stats.update(parquet, columns, data)
            _refuse_out_of_range(parquet, chunks[file_chunks:], columns, data)
    if not chunks:
        raise UserError(f"{key}: {source} has no rows")
    assert columns is not None
    if columns.weight:
        _refuse_weightless(stats.weight_max, columns.weight, key, source)
    # Bad values in the first row group are found now, before any cluster resource is claimed (and classes,
    # tokens and weights out of range in any row group, from the footers above); the rest are checked as every
    # chunk is read (a full scan up front would read the whole dataset twice).
    _read_parquet(chunks[0], data)
    spec = _parquet_spec(columns, types, stats, data, source)
    histogram = _histogram(paths, columns.difficulty) if key == "data.source" and columns.difficulty else None
    return SourceInfo("parquet", spec, tuple(chunks), chunks[-1].stop, histogram, columns.features)


def by_name(data: DataConfig, features: tuple[str, ...]) -> DataConfig:
    """`data` with its feature columns named: the training data's `features` where data.features is null (it
    takes every column but the label and the weight, in the file's order, and another file's order differs)."""
    return dataclasses.replace(data, features=list(features)) if data.features is None and features else data


def inspect_by_name(source: str, data: DataConfig, seed: int, features: tuple[str, ...], *, key: str) -> SourceInfo:
    """inspect_source for rows a model trained on `features` will read (validation, eval, predict): their
    columns are taken by those names, so a file with its columns in another order is read right, and one
    without them is refused, where taken by position they gave silently wrong losses and predictions."""
    named = by_name(data, features)
    if named is data:
        return inspect_source(source, data, seed, key=key)
    try:
        return inspect_source(source, named, seed, key=key)
    except UserError as exc:
        said = str(exc)
        if not said.startswith("data.features: "):
            raise
        raise UserError(f"{key}: {said.removeprefix('data.features: ')}; expected the training data's feature "
                        f"columns by name ({', '.join(features)})") from None


def _histogram(paths: list[str], name: str) -> tuple[tuple[float, ...], tuple[int, ...]]:
    """The difficulty column's histogram (curriculum.HISTOGRAM_BINS equal bins from its min to its max), read
    one row group's column at a time: the driver never holds the column whole."""
    from rayscale.math.curriculum import HISTOGRAM_BINS

    def groups():
        for path in paths:
            with _open(path) as parquet:
                for group in range(parquet.metadata.num_row_groups):
                    values = parquet.read_row_group(group, columns=[name]).column(0)
                    if values.null_count:
                        raise UserError(f"data.curriculum_column: column {name!r} in {path} has missing values")
                    values = values.to_numpy().astype(np.float64)
                    if len(values) and not np.isfinite(values).all():
                        raise UserError(f"data.curriculum_column: column {name!r} in {path} has NaN or infinite "
                                        f"values; expected finite numbers")
                    yield values

    low, high = np.inf, -np.inf
    for values in groups():
        if len(values):
            low, high = min(low, values.min()), max(high, values.max())
    edges = np.linspace(low, high if high > low else low + 1.0, HISTOGRAM_BINS + 1)
    counts = np.zeros(HISTOGRAM_BINS, dtype=np.int64)
    for values in groups():
        counts += np.histogram(values, bins=edges)[0]
    return tuple(edges.tolist()), tuple(counts.tolist())


def _used(columns: _Columns) -> list[str]:
    return [name for name, _ in _roles(columns)]


def _roles(columns: _Columns) -> list[tuple[str, str]]:
    roles = [(name, "data.features") for name in columns.features] + [(columns.label, "data.label")]
    roles += [(columns.weight, "data.weight")] if columns.weight else []
    roles += [(columns.difficulty, "data.curriculum_column")] if columns.difficulty else []
    return roles + ([(columns.sequence, "data.sequence")] if columns.sequence else [])


class _Stats:
    """What inspection scans: the largest label (when the class count is inferred) and, for sequences, the
    largest token and the longest sequence. Footer statistics answer min/max where the writer stored them."""

    def __init__(self) -> None:
        self.label_max: int | None = None
        self.token_max: int | None = None
        self.longest = 0
        self.widths: dict[str, int] = {}  # values per row of variable-length list columns, from a first row
        self.weight_max: float | None = None  # data.weight's largest

    def update(self, parquet: pq.ParquetFile, columns: _Columns, data: DataConfig) -> None:
        schema = parquet.schema_arrow
        if columns.weight:
            self.weight_max = _merge(max, self.weight_max, _min_max(parquet, columns.weight)[1])
        if data.num_classes is None and (pa.types.is_integer(schema.field(columns.label).type) or columns.sequence):
            self.label_max = _merge(max, self.label_max, _min_max(parquet, columns.label)[1])
        if columns.sequence:
            for group in range(parquet.metadata.num_row_groups):
                tokens = parquet.read_row_group(group, columns=[columns.sequence]).column(0)
                if len(tokens):
                    self.longest = max(self.longest, pc.max(pc.list_value_length(tokens)).as_py() or 0)
                    self.token_max = _merge(max, self.token_max, pc.max(pc.list_flatten(tokens)).as_py())
            return
        for name in (*columns.features, columns.label):  # every row must match (checked when read)
            if _is_list(schema.field(name).type) and name not in self.widths:
                width = _first_row_length(parquet, name)
                if width is not None:
                    self.widths[name] = width


@dataclass(frozen=True)
class TableStats:
    """What inspecting a Ray Dataset learns from each block (its rows converted and checked by `table_rows`):
    merged over the blocks into the _Stats a DataSpec is derived from."""

    rows: int
    label_max: int | None
    token_max: int | None
    longest: int
    shapes: tuple[tuple[str, tuple[int, ...]], ...]  # per-row shape of the inputs and the targets (not sequences)


def table_stats(table: pa.Table, data: DataConfig, path: str, first_row: int) -> TableStats:
    """Every row of `table` converted and checked (finite, in range, same-length lists), and its sizes."""
    rows = table_rows(table, data, path, first_row, first_row)
    columns = resolve_columns(table.schema, data, path)
    labels, _ = _per_value(rows["y"]) if rows["y"].dtype.kind in "iuO" else (np.zeros(0, np.int64), None)
    tokens = _per_value(rows["x"])[0] if columns.sequence else np.zeros(0, np.int64)
    labels = labels[labels != IGNORE_INDEX] if columns.sequence else labels
    shapes = () if columns.sequence else (("data.features", rows["x"].shape[1:]), ("data.label", rows["y"].shape[1:]))
    return TableStats(table.num_rows, int(labels.max()) if len(labels) else None,
                      int(tokens.max()) if len(tokens) else None,
                      max((len(t) for t in rows["x"]), default=0) if columns.sequence else 0,
                      tuple((key, tuple(int(size) for size in shape)) for key, shape in shapes))


def dataset_spec(schema: pa.Schema, data: DataConfig, path: str, blocks: list[TableStats]) -> DataSpec:
    """A Ray Dataset's DataSpec, as a Parquet source's, from its schema and every block's stats; list columns
    must have one length across blocks as within them."""
    columns, stats, shapes = resolve_columns(schema, data, path), _Stats(), {}
    for block in blocks:
        stats.label_max = _merge(max, stats.label_max, block.label_max)
        stats.token_max = _merge(max, stats.token_max, block.token_max)
        stats.longest = max(stats.longest, block.longest)
        for key, shape in block.shapes:
            if shapes.setdefault(key, shape) != shape:
                raise UserError(f"{key}: rows of {path} have shapes {shapes[key]} and {shape}; expected one "
                                f"shape for every row")
    for key, name in (("data.features", columns.features[0] if columns.features else None),
                      ("data.label", columns.label)):
        if key in shapes and len(shapes[key]) == 1:
            stats.widths[name] = shapes[key][0]  # a list column's length, as a Parquet footer gives it
    return _parquet_spec(columns, {name: schema.field(name).type for name in _used(columns)}, stats, data, path)


def _merge(pick, current, new):
    if new is None:
        return current
    return new if current is None else pick(current, new)


def _min_max(parquet: pq.ParquetFile, name: str) -> tuple[int | None, int | None]:
    """Min and max of a numeric column (scalar or list), from footer statistics or else by reading it."""
    metadata, low, high = parquet.metadata, None, None
    leaves = [j for j in range(metadata.num_columns)
              if metadata.schema.column(j).path == name or metadata.schema.column(j).path.startswith(name + ".")]
    for group in range(metadata.num_row_groups):
        statistics = metadata.row_group(group).column(leaves[0]).statistics if len(leaves) == 1 else None
        if statistics is not None and statistics.has_min_max:
            group_low, group_high = statistics.min, statistics.max
        else:
            values = parquet.read_row_group(group, columns=[name]).column(0)
            if pa.types.is_list(values.type) or pa.types.is_large_list(values.type) \
                    or pa.types.is_fixed_size_list(values.type):
                values = pc.list_flatten(values)
            found = pc.min_max(values)
            group_low, group_high = found["min"].as_py(), found["max"].as_py()
        low, high = _merge(min, low, group_low), _merge(max, high, group_high)
    return low, high


def _first_row_length(parquet: pq.ParquetFile, name: str) -> int | None:
    for batch in parquet.iter_batches(batch_size=1, columns=[name]):
        if batch.num_rows:
            return pc.list_value_length(batch.column(0))[0].as_py()
    return None


def _list_width(tp: pa.DataType, name: str, stats: _Stats) -> int:
    return tp.list_size if pa.types.is_fixed_size_list(tp) else stats.widths.get(name, 0)


MAX_INFERRED_IDS = 10_000_000  # classes or tokens counted from the largest id found: past it, a typo's id


def _parquet_spec(columns: _Columns, types: dict[str, pa.DataType], stats: _Stats, data: DataConfig,
                  where: str) -> DataSpec:
    def counted(largest: int | None, key: str, name: str) -> int:
        """Ids 0..largest: the model's outputs (classes) or its embedding's rows (tokens). A stray id of 10**12
        sized a head of a trillion outputs, and the allocation's error was blamed on model.name."""
        if (largest or 0) >= MAX_INFERRED_IDS:
            raise UserError(f"{key}: the largest {name} id in {where} is {largest:,}, which would give the model "
                            f"{largest + 1:,} of them; expected ids counted from 0, at most {MAX_INFERRED_IDS:,}"
                            + (" (or set data.num_classes)" if key == "data.label" else ""))
        return (largest or 0) + 1

    def classes() -> int:
        if data.num_classes is not None:
            return data.num_classes
        return max(2, counted(stats.label_max, "data.label", "class"))  # two at least: a label always 0 trains

    if columns.sequence:
        task = "token_classification" if _is_list(types[columns.label]) else "sequence_classification"
        return DataSpec(task, (max(stats.longest, 1),), classes(), counted(stats.token_max, "data.sequence", "token"))
    first = columns.features[0]
    list_feature = len(columns.features) == 1 and _is_list(types[first])
    width = _list_width(types[first], first, stats) if list_feature else len(columns.features)
    shape = tensor_shape(types[first]) or (width,)
    label_type = types[columns.label]
    if pa.types.is_integer(label_type):
        return DataSpec("classification", shape, classes())
    if pa.types.is_boolean(label_type):
        return DataSpec("classification", shape, 2)
    if _is_list(label_type):  # a list of floats per row: several regression targets
        return DataSpec("regression", shape, _list_width(label_type, columns.label, stats))
    return DataSpec("regression", shape, 1)


@dataclass(frozen=True)
class _Range:
    """A column whose values must lie in [0, stop): its part in the rows `_read_parquet` returns, and words."""

    part: str  # "y", "x" (tokens) or "weight"
    config_key: str
    column: str
    stop: float | None  # values must be below it (None: no upper bound)
    noun: str
    expected: str
    allowed: int | None = None  # a value allowed outside the range (IGNORE_INDEX in per-token labels)


def _ranges(columns: _Columns, schema: pa.Schema, num_classes: int | None) -> list[_Range]:
    classes = f"0 to {num_classes - 1} (data.num_classes {num_classes})" if num_classes else "0, 1, 2, ..."
    ranges = [_Range("weight", "data.weight", columns.weight, WEIGHT_LIMIT, "weight",
                     f"weights from 0 to below {WEIGHT_LIMIT:g} ({RESCALE})")] if columns.weight else []
    if _is_list(schema.field(columns.label).type) and columns.sequence:  # classes per token, some masked
        ranges.append(_Range("y", "data.label", columns.label, num_classes, "label",
                             f"classes {classes} or {IGNORE_INDEX} (a masked token)", IGNORE_INDEX))
    elif pa.types.is_integer(schema.field(columns.label).type):  # classes per row or per sequence
        ranges.append(_Range("y", "data.label", columns.label, num_classes, "label", f"classes {classes}"))
    if columns.sequence:
        ranges.append(_Range("x", "data.sequence", columns.sequence, None, "token", "token ids 0, 1, 2, ..."))
    return ranges


def _refuse_out_of_range(parquet: pq.ParquetFile, chunks: list[Chunk], columns: _Columns, data: DataConfig) -> None:
    """A class, token or weight out of range anywhere in this file, refused before any cluster resource is
    claimed: the footer statistics (or, without them, a read of that column) give each column's range, and only
    when one is out are the file's row groups read, one at a time, for `_check_in_range` to name the row."""
    for bounds in _ranges(columns, parquet.schema_arrow, data.num_classes):
        low, high = _min_max(parquet, bounds.column)
        if low is not None and low == bounds.allowed:
            low = None  # masked tokens: other negatives between them and 0 are found as each chunk is read
        if (low is not None and low < 0) or (bounds.stop is not None and high is not None and high >= bounds.stop):
            for chunk in chunks:
                _read_parquet(chunk, data)
            raise UserError(f"{bounds.config_key}: column {bounds.column!r} in {chunks[0].path} has values from "
                            f"{low} to {high} (its footer statistics); expected {bounds.expected}")


def _refuse_weightless(largest: float | None, column: str, key: str, source: str) -> None:
    """A source whose rows all weigh 0 (or next to it) would train on nothing: refused before any cluster."""
    if not largest:
        raise UserError(f"data.weight: every weight in column {column!r} of {key} {source} is 0, so no row would "
                        f"count; expected some rows with a positive weight")
    if largest < 1 / WEIGHT_LIMIT:
        raise UserError(f"data.weight: the largest weight in column {column!r} of {key} {source} is {largest:g}; "
                        f"expected it at least {1 / WEIGHT_LIMIT:g} ({RESCALE})")


def _check_in_range(rows: dict[str, np.ndarray], ranges: list[_Range], path: str, first_row: int) -> None:
    """A negative weight, a class outside 0 .. num_classes - 1 or a negative token: refused naming the row."""
    for bounds in ranges:
        values, row_of = _per_value(rows[bounds.part])
        bad = (values < 0) | (values >= bounds.stop) if bounds.stop is not None else values < 0
        if bounds.allowed is not None:
            bad &= values != bounds.allowed
        if bad.any():
            at = int(np.argmax(bad))
            value = values[at].item()
            shown = f"{value:g}" if isinstance(value, float) else value
            raise UserError(f"{bounds.config_key}: column {bounds.column!r} in {path} has {bounds.noun} "
                            f"{shown} (row {first_row + row_of[at]}); expected {bounds.expected}")


def _per_value(values: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(every value, the row it is in): one value per row, or one per token of a sequence column."""
    if values.dtype != object:
        return values, np.arange(len(values))
    lengths = np.array([len(v) for v in values], dtype=np.int64)
    flat = np.concatenate(list(values)) if lengths.sum() else np.zeros(0, dtype=np.int64)
    return flat, np.repeat(np.arange(len(values)), lengths)


# --------------------------------------------------------------------------------------- Parquet reading

def _read_parquet(chunk: Chunk, data: DataConfig) -> dict[str, np.ndarray]:
    path = chunk.path
    assert path is not None and chunk.row_group is not None, chunk
    with _open(path) as parquet:
        columns = resolve_columns(parquet.schema_arrow, data, path)
        table = parquet.read_row_group(chunk.row_group, columns=_used(columns))
        # Errors name rows as the file counts them (a chunk's row ids run on across files and online batches).
        first_row = sum(parquet.metadata.row_group(group).num_rows for group in range(chunk.row_group))
    if table.num_rows != chunk.stop - chunk.start:
        raise UserError(f"data.source: {path} row group {chunk.row_group} has {table.num_rows} rows, "
                        f"expected {chunk.stop - chunk.start} (did the file change since the run started?)")
    return table_rows(table, data, path, chunk.start, first_row)


def table_rows(table: pa.Table, data: DataConfig, path: str, row_start: int, first_row: int
               ) -> dict[str, np.ndarray]:
    """The rows of an Arrow table (a Parquet row group, a Ray Dataset's rows) as numpy columns, every value
    checked; row ids from `row_start`, and errors naming rows from `first_row` as `path` counts them."""
    columns = resolve_columns(table.schema, data, path)
    ranges = _ranges(columns, table.schema, data.num_classes)
    for name, config_key in _roles(columns):
        if table.column(name).null_count:
            row = first_row + int(np.argmax(table.column(name).is_null().to_numpy(zero_copy_only=False)))
            raise UserError(f"{config_key}: column {name!r} in {path} has missing values (row {row})")
    rows = {"row_id": np.arange(row_start, row_start + table.num_rows, dtype=np.int64)}
    if columns.sequence:
        rows["x"] = _sequences(table.column(columns.sequence), f"data.sequence: column {columns.sequence!r} in "
                                                                f"{path}")
        label = table.column(columns.label)
        if not _is_list(label.type):  # one label per sequence
            rows["y"] = label.to_numpy().astype(np.int64)
        else:
            rows["y"] = _sequences(label, f"data.label: column {columns.label!r} in {path}")
            for i, (tokens, labels) in enumerate(zip(rows["x"], rows["y"], strict=True)):
                if len(tokens) != len(labels):
                    raise UserError(f"data.label: row {first_row + i} of {path} has {len(labels)} labels for "
                                    f"{len(tokens)} tokens (expected one label per token)")
        if (empty := next((i for i, tokens in enumerate(rows["x"]) if len(tokens) == 0), None)) is not None:
            raise UserError(f"data.sequence: column {columns.sequence!r} in {path} has an empty sequence (row "
                            f"{first_row + empty}); expected at least one token")
    else:
        shape = tensor_shape(table.column(columns.features[0]).type)
        if shape is not None:
            rows["x"] = _tensors(table.column(columns.features[0]), shape)
        elif len(columns.features) == 1 and _is_list(table.column(columns.features[0]).type):
            rows["x"] = _matrix(table.column(columns.features[0]), f"data.features: column "
                                                                   f"{columns.features[0]!r} in {path}")
        else:
            rows["x"] = np.stack([_numbers(table.column(name)) for name in columns.features], axis=1)
        label = table.column(columns.label)
        if _is_list(label.type):
            rows["y"] = _matrix(label, f"data.label: column {columns.label!r} in {path}")
        elif pa.types.is_floating(label.type):
            rows["y"] = _numbers(label)[:, None]
        else:
            rows["y"] = label.to_numpy().astype(np.int64)
    if columns.weight:
        rows["weight"] = _numbers(table.column(columns.weight))
    if columns.difficulty:
        rows["difficulty"] = table.column(columns.difficulty).to_numpy().astype(np.float64)
    _check_finite(rows, columns, path, first_row)
    _check_in_range(rows, ranges, path, first_row)
    return rows


def _check_finite(rows: dict[str, np.ndarray], columns: _Columns, path: str, first_row: int) -> None:
    """NaN or infinity in the inputs would train on silently (or poison every step): refuse, naming the row."""
    features = list(columns.features) if columns.features else [columns.sequence]
    keys = {"x": ("data.features", features), "y": ("data.label", [columns.label]),
            "weight": ("data.weight", [columns.weight]), "difficulty": ("data.curriculum_column", [columns.difficulty])}
    for name, (config_key, names) in keys.items():
        values = rows.get(name)
        if values is None or values.dtype.kind != "f":
            continue
        finite = np.isfinite(values.reshape(len(values), -1))
        bad = ~finite.all(axis=1)
        if bad.any():
            at = int(np.argmax(bad))
            # One feature column per value of x (scalar columns side by side), else the one column holds them all.
            column = names[int(np.argmax(~finite[at]))] if len(names) == finite.shape[1] else names[0]
            raise UserError(f"{config_key}: column {column!r} in {path} has NaN or infinite values (row "
                            f"{first_row + at}); expected finite numbers")


def _numbers(column: pa.ChunkedArray) -> np.ndarray:
    return column.to_numpy().astype(np.float32)


def _matrix(column: pa.ChunkedArray, what: str) -> np.ndarray:
    """A list column with the same length in every row -> float32 (n, width)."""
    array = column.combine_chunks()
    lengths = pc.list_value_length(array).to_numpy(zero_copy_only=False)
    if len(lengths) and lengths.min() != lengths.max():
        raise UserError(f"{what} has lists of lengths {lengths.min()} to {lengths.max()}, expected the same "
                        f"length in every row")
    values = pc.list_flatten(array)
    if values.null_count:
        raise UserError(f"{what} has missing values inside its lists")
    width = int(lengths[0]) if len(lengths) else 0
    return values.to_numpy(zero_copy_only=False).astype(np.float32).reshape(len(lengths), width)


def _tensors(column: pa.ChunkedArray, shape: tuple[int, ...]) -> np.ndarray:
    """A fixed-shape tensor column -> float32 (n, *shape), from its storage (row-major values per row), so that
    no extension type's own converter (Ray's) needs importing."""
    storage = column.combine_chunks().storage
    values = pc.list_flatten(storage) if _is_list(storage.type) else storage
    return values.to_numpy(zero_copy_only=False).astype(np.float32).reshape(len(storage), *shape)


def _sequences(column: pa.ChunkedArray, what: str) -> np.ndarray:
    """A list<int> column -> object array of int64 arrays, one per row."""
    array = column.combine_chunks()
    values = pc.list_flatten(array)
    if values.null_count:
        raise UserError(f"{what} has missing values inside its lists")
    lengths = pc.list_value_length(array).to_numpy(zero_copy_only=False)
    flat = values.to_numpy(zero_copy_only=False).astype(np.int64)
    out = np.empty(len(lengths), dtype=object)
    for i, seq in enumerate(np.split(flat, np.cumsum(lengths)[:-1])):
        out[i] = seq.copy()  # own memory: a view would keep the whole chunk's tokens alive
    return out
