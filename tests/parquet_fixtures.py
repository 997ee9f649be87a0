"""Small Parquet datasets for tests, written with pyarrow. Every value is a function of the global row id, so a
test can check any row it reads (and that rows come in order) without keeping the tables around."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

VOCAB = 7  # tokens of `sequences` are 0..6
TAG_CLASSES = 3  # per-token tags of `sequences` are token % 3


def tabular(first_row: int, rows: int, *, label: str = "int") -> pa.Table:
    """Columns a (float64), b (int32), w (float32), label (int64 id % 3, or float64 id / 4)."""
    ids = np.arange(first_row, first_row + rows)
    labels = ids % 3 if label == "int" else ids / 4
    return pa.table({"a": ids * 0.5, "b": (ids % 5).astype(np.int32), "w": (1 + ids % 2).astype(np.float32),
                     "label": labels})


def tabular_x(row_ids: np.ndarray) -> np.ndarray:
    """What `tabular` holds in (a, b), as the float32 features a reader should return."""
    return np.stack([row_ids * 0.5, row_ids % 5], axis=1).astype(np.float32)


def embedded(first_row: int, rows: int, *, fixed: bool = True) -> pa.Table:
    """One list feature column emb = [id, id + 1, id + 2] (fixed-size or variable list) and label id % 4."""
    ids = np.arange(first_row, first_row + rows)
    values = [[float(i), i + 1.0, i + 2.0] for i in ids]
    emb = pa.array(values, type=pa.list_(pa.float32(), 3) if fixed else pa.list_(pa.float64()))
    return pa.table({"emb": emb, "label": ids % 4})


def embedded_x(row_ids: np.ndarray) -> np.ndarray:
    return (row_ids[:, None] + np.arange(3)[None, :]).astype(np.float32)


def sequence_tokens(row_id: int) -> np.ndarray:
    """Row i holds 2 + i % 4 tokens, (i + t) % VOCAB."""
    return (row_id + np.arange(2 + row_id % 4)) % VOCAB


def sequences(first_row: int, rows: int) -> pa.Table:
    """tokens: list<int64>; tags: list<int64>, one per token (token % TAG_CLASSES)."""
    ids = range(first_row, first_row + rows)
    tokens = [sequence_tokens(i).tolist() for i in ids]
    tags = [[t % TAG_CLASSES for t in seq] for seq in tokens]
    return pa.table({"tokens": pa.array(tokens, pa.list_(pa.int64())), "tags": pa.array(tags, pa.list_(pa.int64()))})


def write(path: Path, table: pa.Table, **options) -> str:
    """Write `table` (pyarrow options such as row_group_size pass through) and return the path as a string."""
    path.parent.mkdir(parents=True, exist_ok=True)
    pq.write_table(table, path, **options)
    return str(path)
