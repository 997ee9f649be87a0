"""A Ray Dataset handed to rayscale.train (`train_data=`, `val_data=`) on a simulated two-node cluster (one
training worker per node; every rank logs the rows of each step it trains, tests/step_log.py): run once, its rows
numbered in its own order, every row trained once per epoch with the same steps on every rank, bad rows refused
in one line before training starts, and image files read with `ray.data.read_images` reaching the CNN."""

from __future__ import annotations

import collections
import math
from pathlib import Path

import numpy as np
import pyarrow as pa
import pytest

import rayscale
from rayscale import config
from rayscale.data import sources

BLOCKS = (600, 397, 4)  # an uneven last block: 4 rows, fewer than a global step
FEATURES = 6


def _table(start: int, stop: int) -> pa.Table:
    return pa.table({"id": np.arange(start, stop, dtype=np.int64)})


def _preprocess(batch: dict) -> dict:
    """The user's map_batches: features and a label computed from the row's id (so each row's content is
    known from its id), the id column dropped."""
    ids = batch["id"].astype(np.float32)
    x = np.stack([np.sin(ids * (k + 1) * 0.01) for k in range(FEATURES)], axis=1).astype(np.float32)
    return {"x": x, "y": (batch["id"] % 3).astype(np.int64), "id_copy": batch["id"]}


def _dataset():
    import ray.data

    starts = np.cumsum((0, *BLOCKS))
    return ray.data.from_arrow([_table(a, b) for a, b in zip(starts[:-1], starts[1:], strict=True)]) \
        .map_batches(_preprocess)


DATA = config.DataConfig(features=("x",), label="y")


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    from benchmarks import preemption

    log = tmp_path_factory.mktemp("steps")
    with preemption.simulated_cluster(log, watch_preemption=False) as (ray_cluster, _):
        yield ray_cluster, log


@pytest.mark.slow
def test_two_workers_on_two_nodes_train_every_row_of_a_dataset_once_per_epoch_with_equal_steps(cluster, tmp_path):
    import step_log
    import torch

    ray_cluster, log = cluster
    result = rayscale.train(
        {"data": {"features": ["x"], "label": "y", "val_fraction": 0.1}, "train": {"epochs": 2},
         "batch": {"global_batch_size": 64, "micro_batch_size": None},
         "scaling": {"num_workers": 2, "cpus_per_worker": 1.5},
         "run": {"output_dir": str(tmp_path), "name": "ds", "hang_timeout_s": 30}},
        address=ray_cluster.address, train_data=_dataset())
    summary = result.summary
    rows = sum(BLOCKS)
    assert summary["train_rows"] + summary["val_rows"] == rows and summary["val_rows"] > 0
    assert summary["samples_seen"] == 2 * summary["train_rows"] and summary["world_sizes"] == [2]
    kept, redone = step_log.kept_steps(step_log.records(log))
    assert not redone
    for epoch in range(2):
        assert step_log.every_row_once(kept, epoch, summary["train_rows"])
    steps = collections.Counter((r["rank"], r["epoch"]) for r in step_log.records(log))
    assert steps[(0, 0)] == steps[(1, 0)] == steps[(0, 1)] == steps[(1, 1)] == math.ceil(summary["train_rows"] / 64)
    assert summary["python_objects"] == {"train_data": "ray.data.Dataset (1,001 rows)"}
    # Evaluated over a Dataset (the run keeps none of its own): every row, the metrics a validation logs.
    evaluated = rayscale.evaluate(result.run_dir, data=_dataset())
    assert evaluated["rows"] == rows and evaluated["data"] == "ray.data.Dataset"
    every = _preprocess({"id": np.arange(rows)})
    with torch.no_grad():
        logits = result.load_model()(torch.from_numpy(every["x"]))
    by_hand = torch.nn.functional.cross_entropy(logits, torch.from_numpy(every["y"])).item()
    assert evaluated["val_loss"] == pytest.approx(by_hand, rel=1e-5)
    with pytest.raises(rayscale.UserError, match="trained on a ray.data.Dataset .* give data"):
        rayscale.evaluate(result.run_dir)
    # The config records what stood for the Dataset; a rerun from it alone says what is missing.
    recorded = config.load(result.run_dir / "config.yaml")
    assert recorded.data.source == "ray_dataset:train_data"
    with pytest.raises(rayscale.UserError, match=r"^data.source: ray_dataset:train_data stands for a "
                                                 r"ray.data.Dataset handed to rayscale.train\(train_data=...\)"):
        rayscale.train(result.run_dir / "config.yaml", address=ray_cluster.address)


def test_rows_are_numbered_in_the_datasets_order_and_read_back_the_same_from_every_chunk(cluster):
    """Run twice, the same Dataset gives the same chunks and every row id holds the row of that position (the
    chunks cut across Ray's blocks, whose sizes do not set them)."""
    from rayscale.data.datasets import inspect_dataset

    first, again = (inspect_dataset(_dataset(), DATA, "train_data") for _ in range(2))
    assert first.num_rows == sum(BLOCKS) and first.spec == sources.DataSpec("classification", (FEATURES,), 3)
    assert [(c.start, c.stop) for c in first.chunks] == [(c.start, c.stop) for c in again.chunks]
    for chunk in first.chunks:
        rows = sources.read_chunk("ray_dataset", chunk, DATA, seed=0)
        ids = rows["row_id"]
        np.testing.assert_array_equal(ids, np.arange(chunk.start, chunk.stop))
        expected = _preprocess({"id": ids})
        np.testing.assert_array_equal(rows["x"], expected["x"])
        np.testing.assert_array_equal(rows["y"], expected["y"])


def _with_nan(batch: dict) -> dict:
    out = _preprocess(batch)
    out["x"][batch["id"] == 700] = np.nan
    return out


def _fails(batch: dict) -> dict:
    raise ValueError("cannot parse row")


def _ragged(batch: dict) -> dict:
    width = 3 if batch["id"][0] < 600 else 4
    return {"x": np.ones((len(batch["id"]), 1, width), np.float32), "y": batch["id"] % 2}


@pytest.mark.parametrize("make, data, message", [
    (lambda ds: ds.map_batches(_with_nan), DATA,
     r"^data.features: column 'x' in train_data has NaN or infinite values \(row 700\); expected finite numbers$"),
    (lambda ds: ds.map_batches(_fails), DATA,
     r"^train_data: the Dataset failed to run \(ValueError: cannot parse row\)$"),
    (lambda ds: ds.map_batches(_ragged), DATA,
     r"^data.features: rows of train_data have shapes \(1, 3\) and \(1, 4\); expected one shape for every row$"),
    (lambda ds: ds.map_batches(_preprocess), config.DataConfig(label="y"),
     r"^data.features: column 'x' in train_data is a tensor column, which must be the only feature column "
     r"\(features: x, id_copy\)$"),
    (lambda ds: ds.map_batches(_preprocess), config.DataConfig(features=("x",), label="y", num_classes=2),
     r"^data.label: column 'y' in train_data has label 2 \(row 2\); expected classes 0 to 1"),
    (lambda ds: ds.filter(lambda row: False).map_batches(_preprocess), DATA, r"^train_data: the Dataset has no rows$"),
    (lambda ds: [1, 2], DATA, r"^train_data: expected a ray.data.Dataset, got list$"),
])
def test_a_bad_dataset_is_refused_in_one_line_naming_the_argument(cluster, make, data, message):
    import ray.data

    from rayscale.data.datasets import inspect_dataset

    base = ray.data.from_arrow([_table(0, 600), _table(600, 1000)])
    with pytest.raises(rayscale.UserError, match=message) as raised:
        inspect_dataset(make(base), data, "train_data")
    assert "\n" not in str(raised.value)


def test_a_bad_dataset_leaves_no_unfetched_error_for_ray_to_print(cluster, monkeypatch):
    """Every block of a Dataset without the label column fails its check; the first is reported. Ray printed each
    other block's error, one it says no one fetched ("Unhandled error", ~10 lines each), after the one line."""
    import gc
    import time

    import ray._private.worker
    import ray.data

    from rayscale.data.datasets import inspect_dataset

    printed = []
    monkeypatch.setattr(ray._private.worker, "_unhandled_error_handler", printed.append)
    blocks = ray.data.from_arrow([_table(start, start + 100) for start in range(0, 600, 100)])
    with pytest.raises(rayscale.UserError, match="^data.label: column 'y' not in train_data"):
        inspect_dataset(blocks, DATA, "train_data")
    gc.collect()  # the checks' refs, freed: Ray reports an error no one fetched as the ref goes
    time.sleep(2)
    assert printed == []


def test_a_loss_that_cannot_take_a_datasets_rows_is_refused_before_training(cluster, tmp_path):
    """Tried on the Dataset's first two rows on the driver, as for a Parquet source (it was skipped for Datasets,
    and a reduced loss failed in every worker, retried run.max_failures times)."""
    import torch

    ray_cluster, _ = cluster
    with pytest.raises(rayscale.UserError, match=r"^loss=: failed on 2 rows of ray_dataset:train_data \(UserCodeError: "
                                                 r"train.loss: returned losses of shape \(\); expected one per sample"):
        rayscale.train({"data": {"features": ["x"], "label": "y"}, "run": {"output_dir": str(tmp_path)}},
                       address=ray_cluster.address, train_data=_dataset(),
                       loss=lambda output, batch: torch.nn.functional.cross_entropy(output, batch["y"]))
    assert not any(tmp_path.iterdir())


def test_a_mixed_feature_set_keeps_every_unclaimed_column_as_a_feature(cluster):
    """Without data.features every column but the label is a feature: the id copy is a number, so it counts."""
    import ray.data

    from rayscale.data.datasets import inspect_dataset

    info = inspect_dataset(ray.data.from_arrow(_table(0, 50)).map_batches(
        lambda b: {"a": b["id"] * 0.5, "b": b["id"] % 7, "y": b["id"] % 2}), config.DataConfig(label="y"),
        "train_data")
    assert info.spec.input_shape == (2,)
    rows = sources.read_chunk("ray_dataset", info.chunks[0], config.DataConfig(label="y"), seed=0)
    np.testing.assert_array_equal(rows["x"][:, 0], np.arange(50) * 0.5)


def test_png_files_read_with_read_images_train_the_cnn_with_a_separate_validation_dataset(cluster, tmp_path):
    """Image files written here, read by ray.data.read_images (resized, grey), the label taken from the file's
    name by the user's map_batches into a channels-first float tensor: the CNN trains on them (local mode) and
    validates on a second Dataset."""
    import ray.data
    from PIL import Image

    rng = np.random.default_rng(0)
    for split, count in (("train", 48), ("val", 16)):
        (tmp_path / split).mkdir()
        for i in range(count):
            label = i % 2  # bright images are class 1
            pixels = rng.integers(150, 255, (12, 12)) if label else rng.integers(0, 100, (12, 12))
            Image.fromarray(pixels.astype(np.uint8), mode="L").save(tmp_path / split / f"{i:03d}_class{label}.png")

    def to_tensors(batch: dict) -> dict:
        labels = [int(Path(path).stem.rsplit("class", 1)[1]) for path in batch["path"]]
        images = batch["image"].astype(np.float32)[:, None] / 255.0  # (n, 1, 8, 8)
        return {"image": images, "label": np.array(labels, dtype=np.int64)}

    def images(split: str):
        return ray.data.read_images(str(tmp_path / split), size=(8, 8), mode="L", include_paths=True) \
            .map_batches(to_tensors)

    ray_cluster, _ = cluster
    result = rayscale.train(
        {"model": {"name": "cnn"}, "data": {"features": ["image"], "label": "label"}, "train": {"epochs": 3},
         "batch": {"global_batch_size": 16, "micro_batch_size": None}, "schedule": {"warmup_samples": 0}, "scaling": {"num_workers": 0},
         "run": {"output_dir": str(tmp_path), "name": "images"}},
        address=ray_cluster.address, train_data=images("train"), val_data=images("val"))
    assert result.summary["train_rows"] == 48 and result.summary["val_rows"] == 16
    assert result.final["val_accuracy"] == 1.0  # bright against dark: separable
    import torch

    assert result.load_model()(torch.zeros(2, 1, 8, 8)).shape == (2, 2)  # built for (1, 8, 8) images, 2 classes


def test_csv_and_json_files_read_by_ray_data_are_sources_too(cluster, tmp_path):
    """read_csv and read_json of the same rows give the same source: columns typed by the reader, numbered in
    the files' order."""
    import ray.data

    ids = np.arange(30)
    (tmp_path / "rows.csv").write_text("a,b,label\n" + "".join(f"{i * 0.5},{i % 5},{i % 3}\n" for i in ids))
    (tmp_path / "rows.jsonl").write_text("".join(f'{{"a": {i * 0.5}, "b": {i % 5}, "label": {i % 3}}}\n'
                                                 for i in ids))
    data = config.DataConfig(features=("a", "b"), label="label")
    from rayscale.data.datasets import inspect_dataset

    for dataset in (ray.data.read_csv(str(tmp_path / "rows.csv")), ray.data.read_json(str(tmp_path / "rows.jsonl"))):
        info = inspect_dataset(dataset, data, "train_data")
        assert info.num_rows == 30 and info.spec == sources.DataSpec("classification", (2,), 3)
        rows = sources.read_chunk("ray_dataset", info.chunks[0], data, seed=0)
        np.testing.assert_array_equal(rows["x"], np.stack([ids * 0.5, ids % 5], axis=1).astype(np.float32))
        np.testing.assert_array_equal(rows["y"], ids % 3)
