"""The Python API's config handling and the exported model file, without Ray (the end-to-end run:
tests/test_pipeline.py::test_local_mode_trains_and_writes_outputs_and_the_python_api_returns_the_run_and_its_model)."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import rayscale
from rayscale import config
from rayscale.api import resolve_config
from rayscale.models.export import safetensors_bytes


def test_a_config_is_a_path_a_mapping_or_a_config_and_overrides_are_a_mapping_or_set_pairs(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("optim: {lr: 0.2}\ntrain: {epochs: 4}\n")
    assert resolve_config(path).optim.lr == 0.2
    assert resolve_config(str(path), overrides={"optim.lr": 0.3}).optim.lr == 0.3
    mapping = {"optim": {"lr": 0.2}}
    cfg = resolve_config(mapping, overrides={"train.epochs": 5, "model.kwargs": {"hidden_sizes": [8]}})
    assert (cfg.optim.lr, cfg.train.epochs, cfg.model.kwargs) == (0.2, 5, {"hidden_sizes": [8]})
    assert mapping == {"optim": {"lr": 0.2}}  # the caller's mapping is left as it was
    assert resolve_config(cfg, overrides=["seed=9", "data.source=synthetic"]).seed == 9
    assert resolve_config(overrides={"run.name": "a b"}).run.name == "a b"  # strings stay strings
    assert resolve_config().optim.lr == config.load().optim.lr
    assert resolve_config(overrides=None).optim.lr == config.load().optim.lr
    import numpy as np  # values from a notebook's sweep: numpy's scalars are numbers too

    swept = resolve_config(overrides={"train.epochs": np.int64(3), "optim.lr": np.float32(0.25)})
    assert (swept.train.epochs, swept.optim.lr) == (3, 0.25) and type(swept.train.epochs) is int


@pytest.mark.parametrize("kwargs, message", [
    ({"config": {"optim": {"lrr": 0.1}}}, "optim.lrr"),
    ({"overrides": {"train.epochs": "many"}}, "train.epochs"),
    ({"overrides": "optim.lr=0.1"}, "overrides: expected a mapping or a list"),
    ({"config": "no/such.yaml"}, "config file no/such.yaml does not exist"),
    ({"config": 123}, "config: expected a YAML file's path, a mapping of keys or a rayscale.config.Config, got int"),
    ({"config": ["optim.lr=0.1"]}, "config: expected a YAML file's path, a mapping of keys or a rayscale.config"),
    ({"overrides": [("optim.lr", 0.1)]}, "overrides: expected KEY=VALUE strings in the list"),
    ({"overrides": ["optim.lr"]}, "overrides: 'optim.lr': expected KEY=VALUE, e.g. 'optim.lr=0.1'"),
    ({"overrides": 5}, "overrides: expected a mapping or a list of KEY=VALUE strings, got int"),
    ({"metrics": ["hit"]}, "metrics: expected a mapping of name to function or torchmetrics Metric, got list"),
    # Before Ray starts (it was refused once the embedded Ray had started, ~7 s later):
    ({"train_data": "rows.parquet"}, "train_data: expected a ray.data.Dataset, got a path; name files with data.source"),
    ({"val_data": [1, 2]}, "val_data: expected a ray.data.Dataset, got list"),
    # A TypeError from deep inside before:
    ({"address": 6379}, "address: expected a string such as 127.0.0.1:6379, ray://host:10001 or auto, got int"),
    ({"overrides": {1: 2}}, "overrides: expected dotted key strings such as 'optim.lr' as the mapping's keys, got 1"),
])
def test_bad_input_raises_the_clis_one_line_error_before_anything_runs(kwargs, message):
    import sys

    with pytest.raises(rayscale.UserError, match=message.replace(".", r"\.")):
        rayscale.train(**kwargs)
    assert "ray" not in sys.modules or not sys.modules["ray"].is_initialized()


def test_an_object_of_ray_data_that_is_no_dataset_is_refused_before_ray_starts():
    """A DataContext passed the check (its module is ray.data's), started Ray, and was refused 3.6 s later."""
    import ray
    import ray.data

    with pytest.raises(rayscale.UserError, match="^train_data: expected a ray.data.Dataset, got DataContext"):
        rayscale.train(train_data=ray.data.DataContext.get_current())
    assert not ray.is_initialized()


def test_a_run_that_cannot_start_is_refused_before_a_given_dataset_runs(tmp_path, monkeypatch):
    """rayscale.train(train_data=<Dataset>): the Dataset runs once before training, which can take long; a run
    directory holding a run of another config (or an empty run.output_dir) is refused before that."""
    import yaml

    from rayscale import api
    from rayscale.launch import user_data

    def ran(*args, **kwargs):
        raise AssertionError("the Dataset ran before the run directory was checked")

    monkeypatch.setattr(api, "with_data", lambda cfg, train_data, val_data: (cfg, {"train_data": train_data}))
    monkeypatch.setattr(user_data, "dataset_sources", ran)
    overrides = {"run.output_dir": str(tmp_path), "run.name": "old"}
    (tmp_path / "old" / "checkpoints" / "checkpoint-1").mkdir(parents=True)  # something to resume
    (tmp_path / "old" / "config.yaml").write_text(yaml.safe_dump(config.to_dict(resolve_config(overrides=overrides))))
    with pytest.raises(rayscale.UserError, match="holds a run with a different 'optim' config"):
        rayscale.train(overrides={**overrides, "optim.lr": 0.5}, train_data=object())
    with pytest.raises(rayscale.UserError, match="^run.output_dir: expected a directory path, got an empty one"):
        rayscale.train(overrides={"run.output_dir": ""}, train_data=object())


def test_the_safetensors_export_holds_every_weight_tied_ones_included():
    from safetensors.torch import load

    model = nn.Sequential(nn.Embedding(10, 4), nn.Linear(4, 10, bias=False))
    model[1].weight = model[0].weight  # tied, as a language model's head often is
    state = model.state_dict()
    loaded = load(safetensors_bytes(state))
    assert loaded.keys() == state.keys()
    assert all(torch.equal(loaded[name], state[name]) for name in state)
    fresh = nn.Sequential(nn.Embedding(10, 4), nn.Linear(4, 10, bias=False))
    fresh.load_state_dict(loaded)
    assert torch.equal(fresh[1].weight, model[0].weight)


def test_loading_a_directory_that_is_not_a_finished_run_says_so(tmp_path):
    with pytest.raises(rayscale.UserError, match="no config.yaml; expected the directory of a finished rayscale run"):
        rayscale.load_model(tmp_path)
    if not torch.cuda.is_available():  # an AssertionError from torch's CUDA stub, after the model was built
        with pytest.raises(rayscale.UserError, match="^device cuda: this machine has 0 CUDA device"):
            rayscale.load_model(tmp_path, device="cuda")
    with pytest.raises(rayscale.UserError, match="^device gpu0: .*; expected cpu or cuda"):
        rayscale.load_model(tmp_path, device="gpu0")
    with pytest.raises(rayscale.UserError, match="^metrics: expected a mapping"):
        rayscale.evaluate(tmp_path, metrics=["hit"])


@pytest.mark.parametrize("call, message", [
    (lambda d: rayscale.connect(12), "^address: expected a string"),
    (lambda d: rayscale.tune(resume="yes"), r"^resume: expected True or False, got 'yes'"),
    (lambda d: rayscale.evaluate(5), r"^run_dir: expected a path \(a str or a pathlib.Path\), got int"),
    (lambda d: rayscale.evaluate(d, output=7), "^output: expected a path"),
    (lambda d: rayscale.evaluate(d, data=5), r"^data: expected a path \(a source as data.source names one\) or a "
                                             r"ray.data.Dataset, got int"),
    (lambda d: rayscale.load_model(5), "^run_dir: expected a path"),
    (lambda d: rayscale.load_model(d, device=3), "^device: expected a device name such as cpu or cuda:0, got int"),
    (lambda d: rayscale.predict(d, d, 9), "^output: expected a path"),
    (lambda d: rayscale.predict(d, d, d / "out", workers=1.5), "^workers: expected a whole number of actors, got 1.5"),
    (lambda d: rayscale.predict(d, d, d / "out", workers=True), "^workers: expected a whole number of actors, got True"),
    (lambda d: rayscale.predict(d, d, d / "out", address=3), "^address: expected a string"),
])
def test_arguments_of_the_wrong_type_are_refused_in_one_line_before_anything_runs(call, message, tmp_path):
    """Each was a TypeError from deep inside (workers=1.5 from Ray Data once Ray had started; workers=True was
    taken for 1 actor)."""
    import sys

    with pytest.raises(rayscale.UserError, match=message):
        call(tmp_path)
    assert "ray" not in sys.modules or not sys.modules["ray"].is_initialized()
    assert list(tmp_path.iterdir()) == []


def test_weights_that_do_not_fit_the_model_given_are_named_in_one_line(tmp_path):
    """rayscale.load_model(run, model=<another module>): torch's error was several lines, headed by the
    class's name only."""
    import json

    import yaml

    from rayscale.files import CONFIG_FILE, MODEL_FILE, SUMMARY_FILE
    from rayscale.models import MLP

    torch.save(MLP(in_features=4, num_outputs=3, hidden_sizes=(8,)).state_dict(), tmp_path / MODEL_FILE)
    (tmp_path / CONFIG_FILE).write_text(yaml.safe_dump(config.to_dict(config.load())))
    spec = {"task": "classification", "input_shape": [4], "num_outputs": 3}
    (tmp_path / SUMMARY_FILE).write_text(json.dumps({"data_spec": spec, "python_objects": {"model": "x.Net"}}))
    with pytest.raises(rayscale.UserError, match=r"the run's weights do not fit the model= given \(missing bias, "
                                                 r"weight; unexpected blocks.0.0.bias"):
        rayscale.load_model(tmp_path, model=nn.Linear(4, 3))


def test_rayscale_tune_stays_the_function_once_the_search_package_is_imported():
    import rayscale.tuning.search  # noqa: F401 - importing a subpackage sets an attribute on its parent

    assert rayscale.tune.__module__ == "rayscale.api" and callable(rayscale.train)
