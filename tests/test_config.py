"""Config: types, defaults, overrides with coercion, and one-line errors with suggestions."""

import re

import pytest

from rayscale import config
from rayscale.errors import ConfigError


def test_defaults_round_trip_through_a_plain_dict():
    cfg = config.load()
    assert config.from_dict(config.to_dict(cfg)) == cfg


@pytest.mark.parametrize("override, path, expected", [
    pytest.param("optim.lr=0.05", ("optim", "lr"), 0.05, id="float"),
    pytest.param("optim.lr=1", ("optim", "lr"), 1.0, id="int-to-float"),
    pytest.param("batch.global_batch_size=1e3", ("batch", "global_batch_size"), 1000, id="yaml-float-to-int"),
    pytest.param("batch.micro_batch_size=null", ("batch", "micro_batch_size"), None, id="null"),
    pytest.param("scaling.use_gpu=true", ("scaling", "use_gpu"), True, id="bool"),
    pytest.param("optim.betas=[0.8, 0.9]", ("optim", "betas"), [0.8, 0.9], id="list"),
    pytest.param("model.kwargs.hidden_sizes=[32]", ("model", "kwargs"), {"hidden_sizes": [32]}, id="free-dict"),
    pytest.param("run.name=exp 1", ("run", "name"), "exp 1", id="string"),
])
def test_overrides_are_coerced(override, path, expected):
    cfg = config.load(overrides=[override])
    section, name = path
    assert getattr(getattr(cfg, section), name) == expected


@pytest.mark.parametrize("override, message", [
    pytest.param("optim.lrr=1", "unknown config key optim.lrr (did you mean optim.lr?)", id="typo"),
    pytest.param("optimm.lr=1", "unknown config key optimm (did you mean optim?)", id="section-typo"),
    pytest.param("optim.lr=fast", "optim.lr: expected a number, got 'fast'", id="wrong-type"),
    pytest.param("optim.lr=0", "optim.lr: expected a value greater than 0", id="zero-lr"),
    pytest.param("train.epochs=-1", "train.epochs: expected a value of at least 1", id="negative-epochs"),
    pytest.param("batch.global_batch_size=0", "batch.global_batch_size: expected a value of at least 1",
                 id="zero-batch"),
    pytest.param("optim.name=lasr", "optim.name: expected one of sgd, adamw, lars, lamb, got 'lasr' "
                                    "(did you mean lars?)", id="unknown-optimizer"),
    pytest.param("schedule.name=cos", "schedule.name: expected one of", id="unknown-schedule"),
    pytest.param("scaling.use_gpu=maybe", "scaling.use_gpu: expected true/false", id="bool"),
    pytest.param("optim=1", "optim is a section", id="section-as-value"),
    pytest.param("optim.lr", "expected KEY=VALUE", id="no-equals"),
])
def test_override_errors(override, message):
    with pytest.raises(ConfigError) as info:
        config.load(overrides=[override])
    assert message in str(info.value)
    assert "\n" not in str(info.value)


def test_yaml_file_and_overrides(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("optim:\n  lr: 0.3\n  name: adamw\nbatch:\n  global_batch_size: 64\n")
    cfg = config.load(path, ["optim.lr=0.01"])
    assert (cfg.optim.name, cfg.optim.lr, cfg.batch.global_batch_size) == ("adamw", 0.01, 64)


@pytest.mark.parametrize("text, message", [
    pytest.param("optim: [lr: 1\n", "malformed YAML at line", id="malformed"),
    pytest.param("- 1\n- 2\n", "expected a mapping of keys at the top", id="list-at-top"),
    pytest.param("optim:\n  lr: 0.1\n  moment: 0.9\n", "unknown config key optim.moment (did you mean "
                                                       "optim.momentum?)", id="unknown-in-file"),
    pytest.param("optim: 3\n", "optim: expected a mapping", id="section-not-mapping"),
])
def test_yaml_errors(tmp_path, text, message):
    path = tmp_path / "bad.yaml"
    path.write_text(text)
    with pytest.raises(ConfigError, match=re.escape(message)):
        config.load(path)


def test_missing_file():
    with pytest.raises(ConfigError, match="config file nope.yaml does not exist"):
        config.load("nope.yaml")


def test_every_key_is_documented():
    rows = config.describe()
    names = {row[0] for row in rows}
    for required in ["seed", "data.source", "model.name", "batch.global_batch_size", "batch.micro_batch_size",
                     "scaling.num_workers", "scaling.use_gpu", "train.epochs", "train.precision",
                     "train.grad_clip", "optim.name", "optim.lr", "optim.momentum", "optim.weight_decay",
                     "optim.base_batch_size", "optim.scaling_rule", "schedule.name", "schedule.warmup_samples",
                     "run.output_dir", "run.name"]:
        assert required in names
    assert all(row[3] for row in rows)
