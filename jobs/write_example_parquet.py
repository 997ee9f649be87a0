"""Write a small classification dataset as a directory of Parquet files, for configs/parquet_example.yaml.

    python jobs/write_example_parquet.py data/example.parquet [--rows 4000] [--files 3] [--seed 0]

Columns: f0 .. f15 (float32 features), label (int64 class, 0 .. 3) and weight (float32 per-sample weight).
The label is the argmax of a fixed linear teacher plus noise, so a model can learn it, but not perfectly.
The same arguments always give the same files.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

NUM_FEATURES = 16
NUM_CLASSES = 4
LABEL_NOISE = 0.5  # std of the noise added to the teacher's logits (which have std ~2)


def example_table(rows: int, seed: int) -> pa.Table:
    """The whole dataset as one table, a function of `rows` and `seed` only."""
    rng = np.random.default_rng(seed)
    teacher = rng.standard_normal((NUM_FEATURES, NUM_CLASSES)) * 2 / np.sqrt(NUM_FEATURES)
    features = rng.standard_normal((rows, NUM_FEATURES)).astype(np.float32)
    logits = features @ teacher + LABEL_NOISE * rng.standard_normal((rows, NUM_CLASSES))
    labels = logits.argmax(axis=1).astype(np.int64)
    # Weights in [0.5, 1.5]: unequal enough that a bug ignoring them would change the loss, never zero.
    weights = rng.uniform(0.5, 1.5, size=rows).astype(np.float32)
    columns = {f"f{i}": features[:, i] for i in range(NUM_FEATURES)}
    return pa.table({**columns, "label": labels, "weight": weights})


# Left in a directory this script wrote, so that it may write there again (and only there, of what is not empty).
MARKER = ".written-by-write_example_parquet"


class BadArguments(ValueError):
    """What main reports in one line, exit 2."""


def write_example_parquet(path: str | Path, rows: int = 4000, files: int = 3, seed: int = 0) -> list[Path]:
    """Write `rows` rows split over `files` Parquet files under the directory `path`; returns the files.

    `path` must be new, empty, or a directory this script wrote before (its MARKER file says so): there the
    files part-00000.parquet ... are replaced, and part files left by an earlier run with more files are
    removed, so the directory always holds exactly this dataset (a reader takes every .parquet below it). A
    directory holding anything else is refused, as nothing of the user's may be overwritten. Each file is
    written under a temporary name and renamed, so an interrupted run leaves no partial Parquet file.
    """
    if files < 1 or rows < files:
        raise BadArguments(f"--rows {rows}, --files {files}: expected at least 1 file and a row per file")
    directory = Path(path)
    if directory.exists() and not directory.is_dir():
        raise BadArguments(f"{path}: is a file; expected a directory to write the Parquet files into")
    if directory.is_dir() and any(directory.iterdir()) and not (directory / MARKER).exists():
        raise BadArguments(f"{path}: is not empty and was not written by this script; expected a new or empty "
                           f"directory")
    try:
        directory.mkdir(parents=True, exist_ok=True)
        (directory / MARKER).touch()
    except OSError as error:
        raise BadArguments(f"{path}: cannot be created ({error.strerror or error})") from None
    table = example_table(rows, seed)
    bounds = np.linspace(0, rows, files + 1).astype(int)
    written = []
    for index, (start, stop) in enumerate(zip(bounds[:-1], bounds[1:], strict=True)):
        target = directory / f"part-{index:05d}.parquet"
        partial = directory / f".{target.name}.partial"  # not a .parquet file: no reader takes it
        pq.write_table(table.slice(start, stop - start), partial)
        partial.replace(target)
        written.append(target)
    for stale in sorted(set(directory.glob("part-*.parquet")) - set(written)):
        stale.unlink()
    return written


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("path", help="a new or empty directory (or one this script wrote) for the Parquet files")
    parser.add_argument("--rows", type=int, default=4000, help="rows in all files together")
    parser.add_argument("--files", type=int, default=3, help="number of Parquet files")
    parser.add_argument("--seed", type=int, default=0, help="seeds the features, teacher, labels and weights")
    args = parser.parse_args(argv)
    try:
        written = write_example_parquet(args.path, rows=args.rows, files=args.files, seed=args.seed)
    except BadArguments as error:
        print(f"write_example_parquet: error: {error}", file=sys.stderr)
        return 2
    print(f"wrote {args.rows} rows in {len(written)} files under {args.path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
