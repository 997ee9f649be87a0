"""Data ordering: the curriculum (data.curriculum_column), its pure math and the whole path in local mode."""

from __future__ import annotations

import json
import os
import sys
import threading
import time
from pathlib import Path

import numpy as np
import parquet_fixtures
import pyarrow as pa
import pytest
import torch

from rayscale import cli
from rayscale.config import DataConfig
from rayscale.data import online, sources
from rayscale.data.lane_steps import LaneSteps, epoch_pieces, lane_order, piece_rows
from rayscale.data.local_feed import LocalReads
from rayscale.data.splits import (
    SplitSpec,
    add_curriculum_keys,
    curriculum_order,
    split_chunk_rows,
    uniform_per_row,
)
from rayscale.launch.connect import connect
from rayscale.math import curriculum
from rayscale.math.batching import plan_batches

# ------------------------------------------------------------------------------------------- pure math


@pytest.mark.parametrize("fraction, epochs, rows, expected", [
    (0.3, 10, 1000, [0, 1, 2]),  # span 3000 samples: epochs 0-2 start inside it
    (0.3, 1, 1000, [0]),  # a span inside the only epoch
    (0.25, 4, 1000, [0]),  # exactly one epoch: epoch 1 starts where the span ends
    (1.0, 3, 1000, [0, 1, 2]),  # the whole run
])
def test_curriculum_epochs_are_those_starting_inside_the_span(fraction, epochs, rows, expected):
    assert curriculum.curriculum_epochs(fraction, epochs, rows) == expected


def test_available_at_inverts_the_competence():
    span, start = 5000, 0.2
    quantile = np.linspace(0.0, 1.0, 101)
    at = curriculum.available_at(quantile, span, start)
    assert np.all(at[quantile <= start] == 0)  # the easiest share is there from the first step
    admitted = quantile > start
    assert np.allclose(curriculum.competence(at[admitted], span, start), quantile[admitted])
    assert curriculum.competence(0, span, start) == pytest.approx(start)
    assert curriculum.competence(span, span, start) == 1.0 and curriculum.competence(9 * span, span, start) == 1.0


def order_of(rows: int, *, epoch: int, fraction: float, epochs: int, start: float = 0.1, seed: int = 0):
    """(row ids in curriculum order, their difficulty quantiles) for rows whose quantile is a shuffled ramp."""
    row_ids = np.arange(rows)
    quantile = np.random.default_rng(1).permutation(rows) / (rows - 1)
    keys = curriculum.sort_keys(quantile, uniform_per_row(row_ids, seed, epoch), epoch=epoch, train_rows=rows,
                                span=curriculum.span_samples(fraction, epochs, rows), start=start)
    order = np.lexsort((row_ids, keys))  # what Ray Data's sort on (key, row_id) gives
    return row_ids[order], quantile[order]


def test_one_epoch_span_admits_rows_by_competence_then_shuffles():
    rows, fraction = 20_000, 0.3
    row_ids, quantile = order_of(rows, epoch=0, fraction=fraction, epochs=1)
    assert np.array_equal(np.sort(row_ids), np.arange(rows))  # every row once
    position = np.arange(rows)
    allowed = curriculum.competence(position, curriculum.span_samples(fraction, 1, rows), 0.1)
    # No row comes before the competence admits it (up to the sampling noise of the random positions).
    assert np.mean(quantile > allowed + 0.02) < 0.01
    tenths = quantile[: rows * 3 // 10].reshape(3, -1).mean(axis=1)
    assert tenths[0] < tenths[1] < tenths[2]  # harder and harder inside the span
    assert tenths[0] < 0.35  # sqrt pacing: the competence is already 0.58 a third into the span
    after = quantile[rows * 4 // 10:]  # past the span: every difficulty equally likely anywhere
    for part in np.array_split(after, 4):
        assert abs(part.mean() - after.mean()) < 0.02


def test_span_longer_than_an_epoch_leaves_rows_not_yet_admitted_to_the_end_easiest_first():
    rows = 10_000
    row_ids, quantile = order_of(rows, epoch=0, fraction=1.0, epochs=3)  # competence 0.6 at the epoch's end
    end_competence = float(curriculum.competence(rows, 3 * rows, 0.1))
    late = quantile > end_competence
    first_late = int(np.argmax(late))
    assert np.all(late[first_late:])  # the rows not admitted this epoch come last ...
    assert np.all(np.diff(quantile[first_late:]) >= 0)  # ... easiest first
    assert np.array_equal(np.sort(row_ids), np.arange(rows))
    # The next epoch admits more: its first tenth is harder than epoch 0's.
    _, next_quantile = order_of(rows, epoch=1, fraction=1.0, epochs=3)
    assert next_quantile[: rows // 10].mean() > quantile[: rows // 10].mean()


def test_order_is_a_function_of_seed_and_epoch():
    same = [order_of(2000, epoch=0, fraction=0.5, epochs=2, seed=3)[0] for _ in range(2)]
    assert np.array_equal(*same)
    assert not np.array_equal(same[0], order_of(2000, epoch=0, fraction=0.5, epochs=2, seed=4)[0])
    assert not np.array_equal(same[0], order_of(2000, epoch=1, fraction=0.5, epochs=2, seed=3)[0])


def test_quantiles_are_the_share_of_easier_rows():
    values = np.repeat([1.0, 2.0, 3.0, 4.0], 25)  # four equal groups
    counts, edges = np.histogram(values, bins=curriculum.HISTOGRAM_BINS)
    q = curriculum.quantiles(np.array([1.0, 2.0, 3.0, 4.0, 1.5, 0.0, 9.0]), edges, counts)
    assert q.tolist()[:5] == [0.0, 0.25, 0.5, 0.75, 0.25]  # equal values, equal quantiles
    assert q[5] == 0.0 and q[6] == 0.75  # outside the histogram: its first and last bin


# ------------------------------------------------------------------------------------------- end to end

ROWS = 1200


def graded(first_row: int, rows: int) -> pa.Table:
    """parquet_fixtures.tabular plus `hardness`, a scrambled function of the row id (not of its position)."""
    table = parquet_fixtures.tabular(first_row, rows)
    ids = np.arange(first_row, first_row + rows)
    return table.append_column("hardness", pa.array((ids * 7919) % 1000 / 10.0))


def hardness(row_ids: np.ndarray) -> np.ndarray:
    return (row_ids * 7919) % 1000 / 10.0


@pytest.fixture(scope="module")
def graded_file(tmp_path_factory) -> str:
    path = tmp_path_factory.mktemp("graded") / "graded.parquet"
    return parquet_fixtures.write(path, graded(0, ROWS), row_group_size=300)


@pytest.fixture(scope="module")
def local_ray(tmp_path_factory):
    """One Ray for the module's end-to-end tests. Its workers can import this module (the recording model)."""
    import ray

    os.environ[SEEN_DIR_ENV] = str(tmp_path_factory.mktemp("seen"))
    os.environ["PYTHONPATH"] = os.pathsep.join([str(Path(__file__).parent), os.environ.get("PYTHONPATH", "")])
    ray.shutdown()
    connect(None)  # as `rayscale train` starts it
    yield
    ray.shutdown()


def test_the_difficulty_is_read_and_never_a_feature(graded_file):
    data = DataConfig(source=graded_file, curriculum_column="hardness")
    info = sources.inspect_source(graded_file, data, seed=0)
    assert info.spec.input_shape == (3,)  # a, b, w: not hardness
    rows = sources.read_chunk("parquet", info.chunks[1], data, seed=0)
    assert np.array_equal(rows["difficulty"], hardness(rows["row_id"]))
    edges, counts = info.difficulty_histogram
    assert sum(counts) == ROWS and edges[0] == 0.0 and edges[-1] == pytest.approx(99.9)


def test_a_curriculum_epoch_reads_every_row_once_and_each_rank_trains_its_lane_in_key_order(graded_file):
    """The file's rows in 2 lanes on 2 ranks: each rank reads its lane's pieces and trains them sorted by their
    curriculum key (ties by row id), so the same order every time; the epoch after the span is not sorted."""
    data = DataConfig(source=graded_file, curriculum_column="hardness", curriculum_fraction=0.5)
    spec = SplitSpec(sources.inspect_source(graded_file, data, seed=0), "all", 0.0, data, seed=0)
    order = curriculum_order(spec, 0, epochs=2, train_rows=ROWS)
    assert order is not None and curriculum_order(spec, 1, epochs=2, train_rows=ROWS) is None
    plan, reads = plan_batches(50, None, 2), LocalReads(spec, None)

    def rank_rows(rank: int) -> np.ndarray:
        lanes = lane_order(data, 0, 0, 2, ROWS, 50, order)
        steps = LaneSteps(plan, rank, 2, 2, ROWS, lanes)
        pieces = epoch_pieces(split_chunk_rows(spec), 2, steps.starts, lanes)
        cut = steps.steps(piece_rows(reads("train", [piece.read for piece in pieces]), pieces))
        return np.concatenate([step.rows["row_id"] for step in cut if not step.padding])

    trained = [rank_rows(rank) for rank in range(2)]
    assert np.array_equal(np.sort(np.concatenate(trained)), np.arange(ROWS))
    for ids in trained:
        keys = add_curriculum_keys({"row_id": ids, "difficulty": hardness(ids)}, order)["curriculum_key"]
        assert np.all(np.diff(keys) >= 0)
    assert np.array_equal(rank_rows(0), trained[0])


@pytest.mark.slow
def test_curriculum_trains_easy_rows_first_end_to_end(graded_file, tmp_path, local_ray):
    argv = ["train", "--set", f"data.source={graded_file}", "--set", "data.curriculum_column=hardness",
            "--set", "data.curriculum_fraction=0.5", "--set", "data.val_fraction=0.1",
            "--set", "scaling.num_workers=0", "--set", "train.epochs=2", "--set", "batch.global_batch_size=50",
            "--set", "batch.micro_batch_size=null", "--set", "train.log_every_samples=50",
            "--set", f"run.output_dir={tmp_path}", "--set", "run.name=graded"]
    assert cli.main(argv) == 0
    run_dir = Path(tmp_path) / "graded"
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["samples_seen"] == 2 * summary["train_rows"] and summary["rows_left_out"] == 0
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    steps = [r for r in records if not r.get("evaluation")]
    first_epoch = [r["curriculum_difficulty"] for r in steps if r["epoch"] == 0]
    second_epoch = [r["curriculum_difficulty"] for r in steps if r["epoch"] == 1]
    # hardness is uniform on 0..99.9 (mean ~50): the span (epoch 0) starts easy and ends hard, epoch 1 is mixed.
    assert np.mean(first_epoch[:3]) < 20 and np.mean(first_epoch[-3:]) > 60
    assert 40 < np.mean(second_epoch) < 60
    assert abs(np.mean(second_epoch[:5]) - np.mean(second_epoch[-5:])) < 20
    assert records[-1]["val_accuracy"] is not None


# ----------------------------------------------------------------------------------------------- online

SEEN_DIR_ENV = "RAYSCALE_TEST_SEEN_DIR"


class Recording(torch.nn.Module):
    """A linear model that appends the row id of every training row it sees (`a` = id / 2, see tabular) to a
    file per process in $RAYSCALE_TEST_SEEN_DIR (local mode: this process; Ray workers: theirs)."""

    def __init__(self):
        super().__init__()
        self.linear = torch.nn.Linear(3, 3)

    def forward(self, x):
        if self.training and not _in_the_drivers_trial():
            # Named by rank (Ray Train sets RANK in its workers) so that seen_rows lists rank 0 first: process
            # ids need not sort in rank order (seen failing in CI).
            name = f"rank{os.environ.get('RANK', '0')}-{os.getpid()}.txt"
            with open(Path(os.environ[SEEN_DIR_ENV]) / name, "a") as seen:
                seen.write("".join(f"{i}\n" for i in (x[:, 0] * 2).round().long().tolist()))
        return self.linear(x * 0.01)


def _in_the_drivers_trial() -> bool:
    """Whether this forward is the driver's try of the model on two rows before the run (driver/prepare.py),
    which trains nothing."""
    frame = sys._getframe()
    while frame is not None:
        if frame.f_code.co_name == "_try_user_code":
            return True
        frame = frame.f_back
    return False


def recording_model(**kwargs):
    return Recording()


def seen_rows(directory: Path) -> list[list[int]]:
    """Row ids each process trained on, in order (by rank, then process id), and the files emptied for the next
    run."""
    out = []
    for path in sorted(directory.glob("*.txt")):
        out.append([int(line) for line in path.read_text().split()])
        path.unlink()
    return out


@pytest.mark.parametrize("present, consumed, idle_for, expected", [
    (["a.parquet", "b.parquet"], [], 0.0, online.Next(file="a.parquet")),  # the first in name order
    (["a.parquet", "b.parquet"], ["a.parquet"], 0.0, online.Next(file="b.parquet")),
    (["a.parquet"], ["a.parquet"], 1.0, online.Next()),  # nothing new yet: wait
    (["a.parquet"], ["a.parquet"], 5.0, online.Next(stop=True)),  # idle for the whole timeout: stop
])
def test_rank_0_decides_the_next_file(tmp_path, present, consumed, expected, idle_for):
    for name in present:
        (tmp_path / name).touch()
    assert online.decide(str(tmp_path), consumed, idle_for, idle_timeout=5.0) == expected


def test_a_file_that_sorts_before_a_trained_one_is_refused(tmp_path):
    for name in ("b.parquet", "a2.parquet"):
        (tmp_path / name).touch()
    decision = online.decide(str(tmp_path), ["b.parquet"], 0.0, 5.0)
    assert decision.error.startswith("data.source: a2.parquet arrived after b.parquet was trained")


def _write_part(directory: Path, name: str, first_row: int, rows: int) -> None:
    """As a producer should: under a name the reader ignores, then renamed into place."""
    parquet_fixtures.write(directory / (name + ".tmp"), parquet_fixtures.tabular(first_row, rows), row_group_size=40)
    os.replace(directory / (name + ".tmp"), directory / name)


@pytest.mark.slow
def test_online_trains_every_file_once_including_one_that_arrives_mid_run(tmp_path, local_ray, seen_dir):
    stream = tmp_path / "stream"
    stream.mkdir()
    _write_part(stream, "part-000.parquet", 0, 100)
    _write_part(stream, "part-001.parquet", 100, 70)
    run_dir = tmp_path / "runs" / "online"
    argv = ["train", "--set", f"data.source={stream}", "--set", "data.online=true", "--set", "data.online_poll_s=0.2",
            "--set", "data.online_idle_timeout_s=3", "--set", "schedule.name=constant",
            "--set", "model.name=test_ordering:recording_model", "--set", "scaling.num_workers=0",
            "--set", "batch.global_batch_size=32", "--set", "batch.micro_batch_size=null",
            "--set", "train.log_every_samples=64", "--set", f"run.output_dir={tmp_path / 'runs'}",
            "--set", "run.name=online"]
    added_at = {}

    def add_third_file() -> None:  # once the first file is trained (its checkpoint exists), a third arrives
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline and not list((run_dir / "checkpoints").glob("checkpoint*")):
            time.sleep(0.05)
        _write_part(stream, "part-002.parquet", 170, 45)
        added_at["time"] = time.monotonic()

    producer = threading.Thread(target=add_third_file)
    producer.start()
    assert cli.main(argv) == 0
    ended = time.monotonic()
    producer.join()
    (seen,) = seen_rows(seen_dir)
    assert sorted(seen) == list(range(215))  # every row of the three files, each once
    assert seen[:100] == list(range(100))  # in file (name) order, no shuffle
    assert ended - added_at["time"] >= 3  # it waited the idle timeout after the last file
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["online_files"] == 3 and summary["online_rows"] == 215 == summary["samples_seen"]
    assert summary["steps"] == 4 + 3 + 2  # each file's partial last step is trained at once: 100, 70, 45 rows



@pytest.mark.slow
def test_online_rerun_resumes_from_its_checkpoint_and_trains_only_new_files(tmp_path, seen_dir):
    stream = tmp_path / "stream"
    stream.mkdir()
    _write_part(stream, "part-000.parquet", 0, 100)
    argv = ["train", "--set", f"data.source={stream}", "--set", "data.online=true", "--set", "data.online_poll_s=0.2",
            "--set", "data.online_idle_timeout_s=0.5", "--set", "schedule.name=constant",
            "--set", "model.name=test_ordering:recording_model", "--set", "scaling.num_workers=0",
            "--set", "batch.global_batch_size=32", "--set", f"run.output_dir={tmp_path / 'runs'}",
            "--set", "run.name=online"]
    assert cli.main(argv) == 0
    assert seen_rows(seen_dir) == [list(range(100))]
    _write_part(stream, "part-001.parquet", 100, 33)
    _write_part(stream, "part-002.parquet", 133, 40)
    assert cli.main(argv) == 0  # the same command: resumes from the last checkpoint, trains the new files only
    assert seen_rows(seen_dir) == [list(range(100, 173))]
    summary = json.loads((tmp_path / "runs" / "online" / "summary.json").read_text())
    assert summary["online_files"] == 3 and summary["samples_seen"] == 173 and summary["steps"] == 4 + 2 + 2
    records = [json.loads(line) for line in (tmp_path / "runs" / "online" / "metrics.jsonl").read_text().splitlines()]
    assert [r["online_rows"] for r in records if r.get("epoch_end")] == [100, 173]  # one log, cut and continued


@pytest.fixture
def seen_dir(local_ray) -> Path:
    seen_rows(Path(os.environ[SEEN_DIR_ENV]))
    return Path(os.environ[SEEN_DIR_ENV])


def test_online_two_workers_agree_on_files_and_steps(tmp_path, seen_dir):
    """Two ranks (gloo processes, the engine's in-process context): rank 0 decides each next file and both train
    its rows as the same steps. What Ray Train adds to a run (a worker group) is the same for online data and is
    tested in tests/test_pipeline.py."""
    from inprocess import train as train_in_process

    stream = tmp_path / "stream"
    stream.mkdir()
    _write_part(stream, "part-000.parquet", 0, 90)  # shares of 16 rows; last steps of 26 and 28 rows: no padding
    _write_part(stream, "part-001.parquet", 90, 60)
    trained = train_in_process(
        tmp_path / "runs", "online2", f"data.source={stream}", "data.online=true", "data.online_poll_s=0.2",
        "data.online_idle_timeout_s=1", "schedule.name=constant", "model.name=test_ordering:recording_model",
        "batch.global_batch_size=32", "batch.micro_batch_size=null", workers=2)
    ranks = seen_rows(seen_dir)
    assert len(ranks) == 2 and sorted(ranks[0] + ranks[1]) == list(range(150))  # each row once, on one rank
    assert ranks[0][:16] == list(range(16)) and ranks[1][:16] == list(range(16, 32))  # the same steps, split
    summary = trained.summary
    assert summary["world_size"] == 2
    assert summary["online_files"] == 2 and summary["samples_seen"] == 150 and summary["steps"] == 3 + 2


def test_an_online_file_of_no_rows_is_skipped_not_refused(tmp_path, seen_dir, capsys):
    """A producer's window in which nothing happened: the file is passed over (counted among the files), where
    its inspection's "has no rows" stopped the run inside its worker."""
    from inprocess import train as train_in_process

    stream = tmp_path / "stream"
    stream.mkdir()
    _write_part(stream, "part-000.parquet", 0, 50)
    _write_part(stream, "part-001.parquet", 50, 0)
    _write_part(stream, "part-002.parquet", 50, 40)
    trained = train_in_process(
        tmp_path / "runs", "sparse", f"data.source={stream}", "data.online=true", "data.online_poll_s=0.2",
        "data.online_idle_timeout_s=0.5", "schedule.name=constant", "model.name=test_ordering:recording_model",
        "batch.global_batch_size=32")
    assert seen_rows(seen_dir) == [list(range(90))]
    assert trained.summary["online_files"] == 3 and trained.summary["online_rows"] == 90
    assert "[rayscale] online: part-001.parquet has no rows; skipped" in capsys.readouterr().out


def test_an_online_file_whose_rows_all_weigh_0_is_skipped_not_refused(tmp_path, seen_dir, capsys):
    """A window of masked rows (data.weight 0 throughout): passed over like an empty file, where its inspection's
    "every weight ... is 0" (right for a source that starts so) stopped the run inside its worker."""
    from inprocess import train as train_in_process

    stream = tmp_path / "stream"
    stream.mkdir()
    for name, first_row, rows, weight in (("part-000", 0, 50, 1.0), ("part-001", 50, 30, 0.0),
                                          ("part-002", 80, 40, 1.0)):
        table = parquet_fixtures.tabular(first_row, rows)  # features a, b, w as recording_model reads them
        table = table.append_column("keep", pa.array(np.full(rows, weight, np.float32)))
        parquet_fixtures.write(stream / f"{name}.parquet", table, row_group_size=40)
    trained = train_in_process(
        tmp_path / "runs", "masked", f"data.source={stream}", "data.online=true", "data.online_poll_s=0.2",
        "data.online_idle_timeout_s=0.5", "schedule.name=constant", "model.name=test_ordering:recording_model",
        "batch.global_batch_size=32", "data.weight=keep")
    assert seen_rows(seen_dir) == [list(range(50)) + list(range(80, 120))]
    assert trained.summary["online_files"] == 3 and trained.summary["online_rows"] == 90
    assert "[rayscale] online: part-001.parquet has no row of positive weight (every 'keep' is 0); skipped" in \
        capsys.readouterr().out
