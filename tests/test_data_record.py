"""A run resumes only on the data its checkpoints were made on (driver/data_record.py): the same data.source path
giving other rows, classes or files is refused in one line before anything trains; the data restored, it resumes."""

from __future__ import annotations

import json

import pytest
from inprocess import train
from parquet_fixtures import tabular, write

from rayscale import cli
from rayscale.data.sources import DataSpec
from rayscale.driver.data_record import DataRecord, _first_difference
from rayscale.errors import UserError
from rayscale.launch import trainer

OPTIONS = ("train.epochs=2", "batch.global_batch_size=32", "data.label=label", "data.features=[a, b]")


def _source(tmp_path):
    source = tmp_path / "data"
    write(source / "part-0.parquet", tabular(0, 400), row_group_size=100)
    return source


def _paused(tmp_path, source, name):
    """A run ended at a checkpoint part-way through its first epoch (as ASHA's rung pause ends one)."""
    paused = train(tmp_path / "runs", name, f"data.source={source}", *OPTIONS, eval_at_samples=[160],
                   pause_at_samples=[160])
    assert paused.summary["samples_seen"] == 160
    return paused


def _resume(tmp_path, source, name):
    return train(tmp_path / "runs", name, f"data.source={source}", *OPTIONS)


def test_a_resume_on_more_rows_or_other_classes_is_refused_in_one_line_and_resumes_once_the_data_is_back(tmp_path):
    source = _source(tmp_path)
    paused = _paused(tmp_path, source, "grown")
    record = json.loads((paused.run_dir / "data.json").read_text())
    assert record["train_rows"] == paused.summary["train_rows"] and record["spec"]["num_outputs"] == 3

    write(source / "part-1.parquet", tabular(400, 100))  # rows appended: the epoch's order is another one
    with pytest.raises(UserError, match=rf"^data.source: now leaves \d+ training rows \(was {record['train_rows']}\), "
                                        r"but the checkpoints in .*grown were made on other data; expected the data"):
        _resume(tmp_path, source, "grown")
    (source / "part-1.parquet").unlink()

    relabelled = tabular(0, 400).set_column(3, "label", tabular(0, 400)["b"].cast("int64"))  # ids 0-4: 5 classes
    write(source / "part-0.parquet", relabelled, row_group_size=100)
    with pytest.raises(UserError, match=r"now gives classification data with inputs \(2,\), 5 classes \(was "
                                        r"classification data with inputs \(2,\), 3 classes\)"):
        _resume(tmp_path, source, "grown")

    write(source / "part-0.parquet", tabular(0, 400), row_group_size=50)  # the same rows in other row groups
    with pytest.raises(UserError, match="now has other files or row groups"):
        _resume(tmp_path, source, "grown")

    write(source / "part-0.parquet", tabular(0, 400), row_group_size=100)
    resumed = _resume(tmp_path, source, "grown")
    assert resumed.summary["samples_seen"] == 2 * resumed.summary["train_rows"]
    assert resumed.summary["rung_resumes"] == 1


def test_rayscale_train_refuses_it_before_it_asks_for_a_cluster_and_writes_nothing(tmp_path, capsys, monkeypatch):
    source = _source(tmp_path)
    paused = _paused(tmp_path, source, "grown")
    write(source / "part-1.parquet", tabular(400, 100))
    before = {path: path.read_bytes() for path in sorted(paused.run_dir.rglob("*")) if path.is_file()}

    def no_cluster(*args, **kwargs):
        raise AssertionError("a cluster was asked for although the error was knowable up front")

    monkeypatch.setattr(trainer, "connect", no_cluster)
    settings = [f"run.output_dir={tmp_path / 'runs'}", "run.name=grown", "scaling.num_workers=1",
                f"data.source={source}", *OPTIONS]
    code = cli.main(["train", *[arg for setting in settings for arg in ("--set", setting)]])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and err[0].startswith("rayscale: error: data.source: now leaves "), err
    assert {path: path.read_bytes() for path in sorted(paused.run_dir.rglob("*")) if path.is_file()} == before


def test_a_new_run_or_one_that_saved_no_checkpoint_takes_the_data_as_it_is_now(tmp_path):
    """Nothing was trained on the old data, so nothing mixes: the record is written again for the new data."""
    source = _source(tmp_path)
    run_dir = tmp_path / "runs" / "fresh"
    run_dir.mkdir(parents=True)
    (run_dir / "data.json").write_text(json.dumps({"version": 1, "train_rows": 1}))  # no checkpoint beside it
    trained = _resume(tmp_path, source, "fresh")
    assert json.loads((run_dir / "data.json").read_text())["train_rows"] == trained.summary["train_rows"]


def test_a_data_record_that_cannot_be_read_beside_checkpoints_is_refused(tmp_path):
    source = _source(tmp_path)
    paused = _paused(tmp_path, source, "damaged")
    (paused.run_dir / "data.json").write_text("{not json")
    with pytest.raises(UserError, match=r"data.json is not a data record this rayscale reads.*pick another run.name"):
        _resume(tmp_path, source, "damaged")


SPEC = DataSpec("classification", (2,), 3)


def _record(**changes) -> DataRecord:
    fields = {"spec": SPEC, "train_rows": 360, "val_rows": 40, "feature_columns": ("a", "b"),
              "train_layout": "t", "val_layout": ""}
    return DataRecord(**{**fields, **changes})


@pytest.mark.parametrize(("changes", "found"), [
    ({"spec": DataSpec("regression", (2,), 1)}, ("data.source", "now gives regression data with inputs (2,), "
                                                 "1 targets (was classification data with inputs (2,), 3 classes)")),
    ({"feature_columns": ("b", "a")}, ("data.source", "now has the feature columns b, a (was a, b)")),
    ({"train_rows": 400}, ("data.source", "now leaves 400 training rows (was 360)")),
    ({"train_layout": "u"}, ("data.source", "now has other files or row groups (the same number of rows)")),
    ({"val_rows": 50}, ("data.val_source", "now leaves 50 validation rows (was 40)")),
    ({"val_layout": "v"}, ("data.val_source", "now has other files or row groups (the same number of rows)")),
    ({}, None),
])
def test_the_first_difference_names_the_key_and_both_values(changes, found):
    assert _first_difference(_record(), _record(**changes), False, "data.val_source") == found


def test_an_online_run_may_grow_but_not_change_what_sizes_its_model():
    grown = _record(train_rows=720, train_layout="u")
    assert _first_difference(_record(), grown, True, "data.source") is None
    assert _first_difference(_record(), _record(spec=DataSpec("classification", (2,), 4)), True, "data.source")[1] \
        == "now gives classification data with inputs (2,), 4 classes (was classification data with inputs (2,), " \
           "3 classes)"


def test_a_record_reads_back_as_it_was_written():
    record = _record(spec=DataSpec("sequence_classification", (12,), 3, vocab_size=7))
    assert DataRecord.from_dict(json.loads(json.dumps(record.to_dict()))) == record
