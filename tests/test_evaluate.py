"""`rayscale eval` / rayscale.evaluate and model.init_from, without Ray (tests/inprocess.py trains the runs)."""

from __future__ import annotations

import json
import os
import re
import shutil
import sys

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from inprocess import train
from parquet_fixtures import tabular, tabular_x, write

import rayscale
from rayscale import cli
from rayscale.errors import UserError

BASE = ("train.epochs=2", "batch.global_batch_size=64", "model.kwargs={hidden_sizes: [16]}")


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("eval")
    source = write(tmp / "train.parquet", tabular(0, 900), row_group_size=300)
    run = train(tmp, "a", *BASE, f"data.source={source}", "data.features=[a, b]", "optim.lr=0.02")
    return tmp, run


def test_eval_on_the_runs_validation_split_gives_what_the_run_logged_and_writes_it(trained, capsys):
    _, run = trained
    assert cli.main(["eval", str(run.run_dir)]) == 0
    printed = capsys.readouterr().out
    written = json.loads((run.run_dir / "eval.json").read_text())
    assert written["data"] == "validation split" and written["rows"] == run.summary["val_rows"]
    assert written["val_accuracy"] == run.summary["final"]["val_accuracy"]
    assert written["val_loss"] == pytest.approx(run.summary["final"]["val_loss"], rel=1e-6)
    assert f"val_accuracy {written['val_accuracy']:.4f}" in printed


def test_eval_on_other_data_equals_the_model_applied_by_hand(trained):
    tmp, run = trained
    other = write(tmp / "other.parquet", tabular(5000, 250))
    found = rayscale.evaluate(run.run_dir, other, output=tmp / "other.json")
    model = rayscale.load_model(run.run_dir)
    ids = np.arange(5000, 5250)
    with torch.no_grad():
        logits = model(torch.from_numpy(tabular_x(ids)))
    labels = torch.from_numpy(ids % 3)
    assert found["rows"] == 250
    assert found["val_accuracy"] == pytest.approx((logits.argmax(1) == labels).double().mean().item(), abs=1e-12)
    assert found["val_loss"] == pytest.approx(torch.nn.functional.cross_entropy(logits, labels).item(), rel=1e-5)
    assert json.loads((tmp / "other.json").read_text()) == found


def test_a_run_trained_on_a_dataset_evaluates_data_smaller_than_its_batch(trained, tmp_path):
    """The data given stands for the run's Dataset, which is gone; it is evaluated, not trained on, so the
    training checks (a full global batch of 64 per epoch) do not apply to its 50 rows."""
    import shutil

    import yaml

    tmp, run = trained
    copy = tmp_path / "on_a_dataset"
    shutil.copytree(run.run_dir, copy)
    saved = yaml.safe_load((copy / "config.yaml").read_text())
    saved["data"]["source"] = "ray_dataset:train_data"  # as rayscale.train(train_data=...) saves it
    (copy / "config.yaml").write_text(yaml.safe_dump(saved))
    small = write(tmp_path / "small.parquet", tabular(1, 50))
    assert rayscale.evaluate(copy, small)["rows"] == 50
    assert rayscale.evaluate(copy, small) == rayscale.evaluate(run.run_dir, small)


def test_classes_the_model_has_no_output_for_are_refused_up_front_in_validation_and_eval_data(trained, tmp_path):
    """The run trained on labels 0..2 (3 outputs); label 3 in a validation source or eval data ended a run's
    first validation (after an epoch of training) or an eval in an IndexError from the loss."""
    import pyarrow.compute as pc

    tmp, run = trained
    table = tabular(0, 60)
    more = write(tmp_path / "more.parquet", table.set_column(3, "label", pc.add(table["label"], 1)))
    with pytest.raises(UserError, match=r"^data: .*more.parquet has class labels up to 3, but the model was "
                                        r"sized for 3 classes \(0 to 2\) by the training data"):
        rayscale.evaluate(run.run_dir, more)
    with pytest.raises(UserError, match=r"^data.val_source: .*more.parquet has class labels up to 3, but the model"):
        train(tmp_path, "val", *BASE, f"data.source={tmp / 'train.parquet'}", "data.features=[a, b]",
              f"data.val_source={more}")
    assert not (tmp_path / "val").exists()


def test_eval_refuses_what_is_not_a_run_and_data_without_the_runs_columns(trained, tmp_path, capsys):
    tmp, run = trained
    assert cli.main(["eval", str(tmp_path)]) == 2
    assert "no config.yaml; expected the directory of a finished rayscale run" in capsys.readouterr().err
    narrow = write(tmp_path / "narrow.parquet", tabular(0, 50).drop_columns(["b"]))
    with pytest.raises(UserError, match="data.features: column 'b' not in .*narrow.parquet"):
        rayscale.evaluate(run.run_dir, narrow)
    with pytest.raises(UserError, match="^data: no Parquet file at .*missing.parquet"):  # the parameter's name
        rayscale.evaluate(run.run_dir, str(tmp_path / "missing.parquet"))
    (tmp_path / "a_dir").mkdir()
    for argv, message in [  # each refused before anything is evaluated, in one line
        (["--output", ""], "--output: expected a file path for the metrics' JSON, got an empty one"),
        (["--output", str(tmp_path / "a_dir")], "--output: .*a_dir is a directory"),
        (["--output", str(tmp_path / "no" / "e.json")], "--output: .*no does not exist"),
        (["--output", "/proc/eval.json"], "--output: cannot write in /proc; expected a file in a directory"),
        # The run's own files: eval.json over model.safetensors left a run no command could load again.
        *((["--output", str(run.run_dir / name)], f"--output: .* would replace the run's {name}; expected another")
          for name in ("model.safetensors", "config.yaml", "summary.json")),
        (["--output", str(run.run_dir / "checkpoints" / "e.json")], "would replace the run's checkpoints"),
        (["--device", "foo"], "--device foo: .*expected cpu or cuda"),
        (["--device", "meta"], "--device meta: expected cpu, cuda\\[:N\\] or mps"),  # torch knows it, rayscale does not
        (["--device", "cuda:7"], "--device cuda:7: this machine has"),
    ]:
        if argv[-1] == "cuda:7" and torch.cuda.device_count() > 7:
            continue
        assert cli.main(["eval", str(run.run_dir), *argv]) == 2
        error = capsys.readouterr().err
        assert re.search(message, error) and error.count("\n") == 1, (argv, error)
    # The same mistakes from Python name the parameters, not the flags.
    for given, message in [({"output": ""}, "^output: expected a file path for the metrics' JSON"),
                           ({"output": tmp_path / "a_dir"}, "^output: .*a_dir is a directory"),
                           ({"device": "foo"}, "^device foo: .*expected cpu or cuda")]:
        with pytest.raises(UserError, match=message):
            rayscale.evaluate(run.run_dir, **given)
    assert not list(tmp_path.glob("**/*.json"))


def test_eval_whose_default_output_is_a_directory_is_refused_before_evaluating(trained, tmp_path, monkeypatch,
                                                                              capsys):
    from rayscale.models import export

    _, run = trained
    monkeypatch.setattr(export, "usable_device", lambda *a: pytest.fail("evaluated before the output was checked"))
    run_dir = shutil.copytree(run.run_dir, tmp_path / "run", ignore=shutil.ignore_patterns("eval.json"))
    (run_dir / "eval.json").mkdir()
    assert cli.main(["eval", str(run_dir)]) == 2
    assert capsys.readouterr().err == (f"rayscale: error: {run_dir / 'eval.json'} is a directory; give --output a "
                                       f"file path to write\n")


def test_eval_into_a_run_directory_it_cannot_write_asks_for_output_before_evaluating(trained, monkeypatch, capsys):
    from rayscale.models import export
    from rayscale.tools import evaluate

    _, run = trained
    tried = []
    monkeypatch.setattr(evaluate, "can_write_in", lambda directory: tried.append(directory) or False)
    monkeypatch.setattr(export, "usable_device", lambda *a: pytest.fail("evaluated before the output was checked"))
    assert cli.main(["eval", str(run.run_dir)]) == 2
    assert tried == [run.run_dir]
    error = capsys.readouterr().err
    assert f"{run.run_dir}: cannot write eval.json there; give --output" in error and error.count("\n") == 1
    with pytest.raises(UserError, match="cannot write eval.json there; pass output= a file path to write"):
        rayscale.evaluate(run.run_dir)


def test_eval_and_predict_refuse_a_run_whose_summary_or_weights_were_cut_short(trained, tmp_path, capsys):
    """A run killed while writing its outputs: one line naming the file, not a traceback."""
    import shutil

    tmp, run = trained
    for name, cut, message in [("summary.json", 100, "summary.json: not readable JSON"),
                               ("model.safetensors", 0, "model.safetensors: cannot read the model's weights")]:
        copy = tmp_path / name
        shutil.copytree(run.run_dir, copy)
        with open(copy / name, "r+b") as handle:
            handle.truncate(cut)
        for argv in (["eval", str(copy)],
                     ["predict", str(copy), "--data", str(tmp / "train.parquet"), "--output", str(tmp_path / "o")]):
            assert cli.main(argv) == 2
            error = capsys.readouterr().err
            assert message in error and error.count("\n") == 1, (argv, error)


@pytest.mark.parametrize("start", ["run directory", "checkpoint", "safetensors"])
def test_init_from_starts_a_new_run_from_the_weights(trained, tmp_path, start):
    tmp, run = trained
    where = {"run directory": run.run_dir, "safetensors": run.run_dir / "model.safetensors",
             "checkpoint": sorted((run.run_dir / "checkpoints").glob("checkpoint-*"))[-1]}[start]
    source = tmp / "train.parquet"
    # A learning rate too small to move anything: the new run ends where it started.
    again = train(tmp_path, "b", *BASE, f"data.source={source}", "data.features=[a, b]", "optim.lr=1e-12",
                  "schedule.warmup_samples=0", "train.epochs=1", f"model.init_from={where}")
    started = rayscale.load_model(run.run_dir).state_dict() if start != "checkpoint" else \
        torch.load(where / "state.pt", weights_only=False)["model"]
    assert all(torch.allclose(again.model[k], started[k], atol=1e-8) for k in started)
    fresh = train(tmp_path, "c", *BASE, f"data.source={source}", "data.features=[a, b]", "optim.lr=1e-12",
                  "schedule.warmup_samples=0", "train.epochs=1")
    assert not torch.allclose(fresh.model["head.weight"], started["head.weight"])


def test_init_from_a_misfit_or_a_missing_file_fails_before_the_run_naming_the_key(trained, tmp_path):
    tmp, run = trained
    source = tmp / "train.parquet"
    with pytest.raises(UserError, match=r"model.init_from: .* does not fit the model \(.*shapes blocks.0.0.weight "
                                        r"\(16, 2\) vs \(8, 2\)"):
        train(tmp_path, "misfit", *BASE, f"data.source={source}", "data.features=[a, b]",
              "model.kwargs={hidden_sizes: [8]}", f"model.init_from={run.run_dir}")
    with pytest.raises(UserError, match="model.init_from: .*nothing.pt does not exist"):
        train(tmp_path, "missing", *BASE, f"model.init_from={tmp_path / 'nothing.pt'}")
    assert not (tmp_path / "misfit").exists() and not (tmp_path / "missing").exists()


def test_predict_refuses_bad_input_before_ray_starts(trained, tmp_path, capsys):
    tmp, run = trained
    source = str(tmp / "train.parquet")

    def files_with(directory, second) -> str:
        """A directory of two files: a good one first, then `second` (a Parquet file's path, or raw bytes)."""
        directory.mkdir()
        shutil.copy(source, directory / "part-0.parquet")
        if isinstance(second, bytes):
            (directory / "part-1.parquet").write_bytes(second)
        else:
            shutil.copy(second, directory / "part-1.parquet")
        return str(directory)

    taken = tmp_path / "taken"
    taken.mkdir()
    (taken / "old.parquet").write_bytes(b"")
    narrow = write(tmp_path / "narrow.parquet", tabular(0, 50).drop_columns(["b"]))
    text = write(tmp_path / "text.parquet", tabular(0, 50).set_column(0, "a", pa.array(["x"] * 50)))
    numeric_text = write(tmp_path / "numeric_text.parquet", tabular(0, 50).set_column(0, "a", pa.array(["0.5"] * 50)))
    for argv, message in [
        (["predict", str(tmp_path), "--data", source, "--output", str(tmp_path / "o")], "no config.yaml"),
        (["predict", str(run.run_dir), "--data", source, "--output", str(taken)],
         "--output: .* already exists and is not an empty directory"),
        (["predict", str(run.run_dir), "--data", narrow, "--output", str(tmp_path / "o")],
         "--data: column 'b' \\(an input of the run\\) not in"),
        (["predict", str(run.run_dir), "--data", str(tmp_path / "none"), "--output", str(tmp_path / "o")],
         "--data: no Parquet file at"),
        (["predict", str(run.run_dir), "--data", text, "--output", str(tmp_path / "o")],
         "--data: column 'a' in .*text.parquet is string, expected numbers"),
        # Numbers written as text were cast and predicted (train and eval refuse the column).
        (["predict", str(run.run_dir), "--data", numeric_text, "--output", str(tmp_path / "o")],
         "--data: column 'a' in .*numeric_text.parquet is string, expected numbers"),
        (["predict", str(run.run_dir), "--data", source, "--output", ""], "--output: expected a new .* empty path"),
        (["predict", str(run.run_dir), "--data", write(tmp_path / "empty.parquet", tabular(0, 0)), "--output",
          str(tmp_path / "o")], "--data: .*empty.parquet has no rows; nothing to predict"),
        (["predict", str(run.run_dir), "--data", source, "--output", "/proc/rayscale/o"],
         "--output: cannot create /proc/rayscale/o \\(no writing in /proc\\)"),
        # Every file of a directory is checked, not only the first (Ray Data's read of a bad one failed with a
        # traceback after the actors started; one without the inputs gave null predictions).
        (["predict", str(run.run_dir), "--data", files_with(tmp_path / "csv", b"a,b,w\n1,2,3\n"), "--output",
          str(tmp_path / "o")], "--data: .*csv/part-1.parquet is not a readable Parquet file \\("),
        (["predict", str(run.run_dir), "--data", files_with(tmp_path / "narrow_second", narrow), "--output",
          str(tmp_path / "o")], "--data: column 'b' \\(an input of the run\\) not in .*narrow_second/part-1"),
        (["predict", str(run.run_dir), "--data", files_with(tmp_path / "text_second", text), "--output",
          str(tmp_path / "o")], "--data: column 'a' is double in .*part-0.parquet but string in .*part-1.parquet"),
    ]:
        assert cli.main(argv) == 2
        assert re.search(message, capsys.readouterr().err), message
    # From Python the messages name the parameters.
    with pytest.raises(UserError, match=r"^data: expected Parquet \(a file, a directory, a glob or a URI\) or a "
                                        r"ray.data.Dataset, got dict$"):
        rayscale.predict(run.run_dir, {"a": [1.0]}, tmp_path / "o")  # a Dataset's repr was taken for a path
    with pytest.raises(UserError, match="^output: .* already exists and is not an empty directory"):
        rayscale.predict(run.run_dir, source, taken)
    with pytest.raises(UserError, match="^workers 0: expected at least 1"):
        rayscale.predict(run.run_dir, source, tmp_path / "o", workers=0)
    # More model holders than the embedded Ray would have: refused before it starts, not after.
    room = torch.cuda.device_count() or os.cpu_count()
    with pytest.raises(UserError, match=f"^workers {room + 1}: this machine's embedded Ray has .*expected at most "
                                        f"{room}$"):
        rayscale.predict(run.run_dir, source, tmp_path / "o", workers=room + 1)
    assert not (tmp_path / "o").exists()
    assert "ray" not in sys.modules or not sys.modules["ray"].is_initialized()  # refused before Ray started
    from rayscale.launch.predict import _check_first_rows

    with pytest.raises(UserError, match=r"^data: .*narrow.parquet: the columns a, w make inputs of shape \(2,\), but "
                                        r"the run's model takes \(3,\)"):
        _check_first_rows(pq.read_table(narrow), str(narrow), ["a", "w"], False, [3])  # a run sized by 3 features


def test_a_run_on_unnamed_features_reads_other_files_by_its_column_names_in_validation_eval_and_predict(tmp_path):
    """data.features null takes every column but the label, in the file's order. A validation, eval or predict
    file with the same columns in another order was read by position: a silently wrong val_loss (which a search
    ranks) and wrong predictions. It is read by the training data's column names now, and a file without them
    is refused in one line, before Ray."""
    from rayscale.config import load_run
    from rayscale.data.sources import by_name
    from rayscale.launch.predict import input_columns
    from rayscale.models.export import trained_features

    source = write(tmp_path / "train.parquet", tabular(0, 900))
    val = write(tmp_path / "val.parquet", tabular(2000, 300))
    shuffled = write(tmp_path / "shuffled.parquet", tabular(2000, 300).select(["w", "label", "b", "a"]))
    renamed = write(tmp_path / "renamed.parquet", tabular(2000, 300).rename_columns(["q", "b", "w", "label"]))
    run = train(tmp_path, "in_order", *BASE, f"data.source={source}", f"data.val_source={val}")
    assert run.summary["feature_columns"] == ["a", "b", "w"]
    again = train(tmp_path, "shuffled", *BASE, f"data.source={source}", f"data.val_source={shuffled}")
    assert again.summary["final"]["val_loss"] == run.summary["final"]["val_loss"]  # the same model, the same rows
    in_order = rayscale.evaluate(run.run_dir, val, output=tmp_path / "in_order.json")
    assert rayscale.evaluate(run.run_dir, shuffled, output=tmp_path / "shuffled.json") == {**in_order,
                                                                                          "data": shuffled}
    refused = r"column 'a' not in .*renamed.parquet .*; expected the training data's feature columns by name \(a, b, w\)$"
    with pytest.raises(UserError, match=r"^data.val_source: " + refused):
        train(tmp_path, "renamed", *BASE, f"data.source={source}", f"data.val_source={renamed}")
    with pytest.raises(UserError, match=r"^data: " + refused):
        rayscale.evaluate(run.run_dir, renamed, output=tmp_path / "renamed.json")
    # predict takes the columns by the same names (its rows are checked, then read, with these), and refuses
    # the renamed file before Ray starts: taken by position, its columns q, b, w made inputs of the right shape.
    names = pq.read_schema(shuffled).names
    assert input_columns(load_run(run.run_dir).data, names) == ["w", "b", "a"]  # by position: data.features null
    assert input_columns(by_name(load_run(run.run_dir).data, trained_features(run.run_dir)), names) == ["a", "b", "w"]
    with pytest.raises(UserError, match=r"^data: column 'a' \(an input of the run\) not in .*renamed.parquet"):
        rayscale.predict(run.run_dir, renamed, tmp_path / "predicted")
    assert "ray" not in sys.modules or not sys.modules["ray"].is_initialized()
    assert not (tmp_path / "renamed.json").exists() and not (tmp_path / "predicted").exists()


def test_eval_suggest_and_predict_refuse_to_write_over_any_runs_own_files(trained, tmp_path, capsys):
    """Their outputs were checked against the run they read only: `eval --output` and `suggest --plot` wrote
    over another run's model.pt, and predict wrote Parquet into a run's checkpoints/ or tensorboard/."""
    tmp, run = trained
    other = tmp_path / "other"
    shutil.copytree(run.run_dir, other)
    kept = (other / "model.pt").read_bytes()
    with pytest.raises(UserError, match=rf"^output: .*other/model.pt would replace the model.pt of the run in "
                                        rf"{other}; expected another file path$"):
        rayscale.evaluate(run.run_dir, output=other / "model.pt")
    assert cli.main(["suggest", str(run.run_dir), "--plot", str(other / "model.pt")]) == 2
    assert re.search(r"^rayscale: error: --plot: .* would replace the model.pt of the run in ", capsys.readouterr().err)
    source = str(tmp / "train.parquet")
    with pytest.raises(UserError, match=r"^output: .* would write into the tensorboard of the run in .*other; "):
        rayscale.predict(run.run_dir, source, other / "tensorboard" / "predicted")
    with pytest.raises(UserError, match=r"^output: .* would write into the run's checkpoints; expected a new "):
        rayscale.predict(run.run_dir, source, run.run_dir / "checkpoints" / "predicted")
    assert (other / "model.pt").read_bytes() == kept and not (other / "tensorboard").exists()
    assert not (run.run_dir / "checkpoints" / "predicted").exists()
    assert "ray" not in sys.modules or not sys.modules["ray"].is_initialized()


def test_a_row_the_model_cannot_read_gets_a_null_prediction_and_the_others_their_own(trained):
    """A prediction actor, in this process: a NaN and a missing feature gave prediction 0 (the argmax of NaN)
    and NaN probabilities, silently; now those rows' prediction is null, and every other row's is the model's."""
    from rayscale.launch.predict import Predictor

    tmp, run = trained
    table = tabular(1000, 8)
    a, b = table["a"].to_pylist(), table["b"].to_pylist()
    a[2], b[5] = float("nan"), None
    table = table.set_column(0, "a", pa.array(a)).set_column(1, "b", pa.array(b, pa.int32()))
    predicted = Predictor(str(run.run_dir), ["a", "b"], False, "classification", "cpu")(table)
    readable = [i for i in range(8) if i not in (2, 5)]
    with torch.no_grad():
        logits = rayscale.load_model(run.run_dir)(torch.from_numpy(tabular_x(np.arange(1000, 1008)[readable])))
    classes, probabilities = predicted["prediction"].to_pylist(), predicted["probabilities"].to_pylist()
    assert [classes[i] for i in (2, 5)] == [None, None] and [probabilities[i] for i in (2, 5)] == [None, None]
    assert [classes[i] for i in readable] == logits.argmax(dim=1).tolist()
    assert predicted["prediction"].type == pa.int64()
    assert predicted.slice(2, 1)["prediction"].to_pylist() == [None]
    nothing = Predictor(str(run.run_dir), ["a", "b"], False, "classification", "cpu")(table.slice(2, 1))
    assert nothing["prediction"].type == pa.int64() and nothing["prediction"].to_pylist() == [None]


def test_a_token_outside_the_vocabulary_or_a_sequence_past_max_length_gets_a_null_prediction(tmp_path):
    from parquet_fixtures import VOCAB, sequences

    from rayscale.launch.predict import Predictor

    source = write(tmp_path / "seq.parquet", sequences(0, 256))
    run = train(tmp_path, "seq", "train.epochs=1", "batch.global_batch_size=64", f"data.source={source}",
                "data.sequence=tokens", "data.label=tags", "model.name=transformer")
    longest = run.summary["data_spec"]["input_shape"][0]
    rows = pa.table({"tokens": pa.array([[1, 2], [1, VOCAB + 3], list(range(longest + 1)), [3, 4, 5]],
                                        pa.list_(pa.int64()))})
    predictor = Predictor(str(run.run_dir), ["tokens"], True, "token_classification", "cpu",
                          vocab_size=run.summary["data_spec"]["vocab_size"])
    found = predictor(rows)["prediction"].to_pylist()
    assert found[1] is None and found[2] is None
    assert len(found[0]) == 2 and len(found[3]) == 3 and all(isinstance(c, int) for c in found[0] + found[3])
