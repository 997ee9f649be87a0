"""Config: types, defaults, overrides with coercion, and one-line errors with suggestions."""

import itertools
import re

import pytest
import yaml

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
    pytest.param("seed=-1", "seed: expected a value of at least 0, got -1", id="negative-seed"),
    pytest.param("seed=4294967296", "seed: expected a value of at most 4294967295, got 4294967296", id="huge-seed"),
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


# a: 10 ones, b: 10 a's, ... f: 10 e's.
NESTED_ALIASES = ["a: &a [1, 1, 1, 1, 1, 1, 1, 1, 1, 1]"] + [
    f"{name}: &{name} [{', '.join([f'*{previous}'] * 10)}]" for previous, name in itertools.pairwise("abcdef")]


@pytest.mark.parametrize("text, message", [
    pytest.param("optim: [lr: 1\n", "malformed YAML at line", id="malformed"),
    pytest.param("- 1\n- 2\n", "expected a mapping of keys at the top", id="list-at-top"),
    pytest.param("optim:\n  lr: 0.1\n  moment: 0.9\n", "unknown config key optim.moment (did you mean "
                                                       "optim.momentum?)", id="unknown-in-file"),
    pytest.param("optim: 3\n", "optim: expected a mapping", id="section-not-mapping"),
    # Plain YAML keeps the last of two equal keys: the first value, or a whole first section, would be lost.
    pytest.param("train:\n  epochs: 1\n  epochs: 5\n", "at line 3, column 3: key 'epochs' appears twice",
                 id="key-twice"),
    pytest.param("train: {epochs: 1}\noptim: {lr: 1}\ntrain: {log_every_samples: 10}\n",
                 "at line 3, column 1: key 'train' appears twice", id="section-twice"),
    pytest.param(b"\xff\xfe\x00garbage", "cannot read it: not UTF-8 text", id="not-text"),
    # Aliases nested 6 deep, each 10 wide: a million values once copied out (8 deep took minutes and gigabytes).
    pytest.param("model:\n  kwargs:\n" + "".join(f"    {line}\n" for line in NESTED_ALIASES),
                 "its YAML aliases expand to more than 100,000 values", id="aliases-expanding"),
    pytest.param("model:\n  kwargs: &k\n    x: [*k]\n", "a YAML alias refers to the value that holds it",
                 id="alias-inside-itself"),
])
def test_yaml_errors(tmp_path, text, message):
    path = tmp_path / "bad.yaml"
    path.write_bytes(text if isinstance(text, bytes) else text.encode())
    with pytest.raises(ConfigError, match=re.escape(message)):
        config.load(path)


def test_a_large_config_without_aliases_is_not_taken_for_an_expanding_one():
    config.check_expansion({"data": {"features": [f"f{i}" for i in range(200_000)]}}, "config file big.yaml")


def test_an_override_whose_aliases_expand_too_far_is_refused_naming_the_key():
    wide = "{" + ", ".join(NESTED_ALIASES) + "}"
    with pytest.raises(ConfigError, match=r"^overrides: 'model.kwargs': its YAML aliases expand to more than "):
        config.parse_override(f"model.kwargs={wide}")
    assert config.parse_override("model.kwargs={a: &a [1, 2], b: [*a, *a]}")[1] == {"a": [1, 2], "b": [[1, 2]] * 2}


@pytest.mark.parametrize("path", ["", "  "])
def test_an_empty_config_path_is_refused_not_taken_for_the_defaults(path):
    with pytest.raises(ConfigError, match="^config file: expected a YAML file's path, got an empty one$"):
        config.load(path)


def test_a_config_path_that_is_a_directory_is_one_line(tmp_path):
    with pytest.raises(ConfigError, match=re.escape(f"config file {tmp_path}: cannot read it: Is a directory")):
        config.load(tmp_path)


def test_yaml_anchors_and_one_key_per_mapping_still_load(tmp_path):
    path = tmp_path / "anchors.yaml"
    path.write_text("optim: &o {lr: 0.5}\nschedule: {name: constant}\n"
                    "tune:\n  space:\n    optim.lr: &domain {grid: [0.1, 0.2]}\n"
                    "    optim.momentum: {<<: *domain, grid: [0.8, 0.9]}\n")
    cfg = config.load(path)
    assert cfg.optim.lr == 0.5  # an anchor, and a merge key (<<) overridden by the key beside it
    assert cfg.tune.space["optim.momentum"] == {"grid": [0.8, 0.9]}


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
    types = {row[0]: row[1] for row in rows}  # a closed set of values is named, member by member
    assert types["optim.name"] == "one of sgd, adamw, lars, lamb"
    assert types["train.compile"] == "one of false, true, inductor, aot_eager"
    assert types["run.trackers"] == "a list, each one of mlflow, tensorboard, wandb"
    assert types["optim.lr"] == "a number"


def _keys_of_type(wanted: type) -> list[str]:
    """Every dotted key whose declared type takes `wanted` (alone, in a union, or as a list's items)."""
    import dataclasses
    import typing

    found = []

    def walk(cls: type, prefix: str) -> None:
        for name, tp in typing.get_type_hints(cls).items():
            if dataclasses.is_dataclass(tp):
                walk(tp, f"{prefix}{name}.")
            elif wanted in {tp, *typing.get_args(tp), *(a for t in typing.get_args(tp) for a in typing.get_args(t))}:
                found.append(f"{prefix}{name}")

    walk(config.Config, "")
    return found


FLOAT_KEYS = _keys_of_type(float)


def test_the_float_keys_are_found():
    assert {"optim.lr", "data.val_fraction", "train.grad_clip", "optim.betas", "scaling.cpus_per_worker"} \
        <= set(FLOAT_KEYS)


# Every way a non-finite number reaches a key: YAML's own spellings, and nan/inf read as strings and coerced.
@pytest.mark.parametrize("written", ["nan", ".nan", "inf", ".inf", "-inf", "-.inf", "1e999"])
@pytest.mark.parametrize("dotted", FLOAT_KEYS)
def test_every_float_key_refuses_non_finite_numbers(dotted, written):
    value = f"[{written}, 0.9]" if dotted == "optim.betas" else written
    with pytest.raises(ConfigError, match=rf"^{re.escape(dotted)}: expected a finite number, got "):
        config.load(overrides=[f"{dotted}={value}"])


@pytest.mark.parametrize("written", ["nan", ".nan", ".inf", "-.inf"])
def test_non_finite_numbers_in_a_yaml_file_are_refused(tmp_path, written):
    path = tmp_path / "c.yaml"
    path.write_text(f"optim:\n  lr: {written}\ntrain:\n  grad_clip: 1.0\n")
    with pytest.raises(ConfigError, match=r"^optim.lr: expected a finite number, got -?(nan|inf)$"):
        config.load(path)


@pytest.mark.parametrize("dotted", _keys_of_type(int))
def test_integer_keys_refuse_non_finite_numbers(dotted):
    with pytest.raises(ConfigError, match=rf"^{re.escape(dotted)}: expected "):
        config.load(overrides=[f"{dotted}=.inf"])


@pytest.mark.parametrize("name", [
    pytest.param("", id="empty"),
    pytest.param(".", id="the-output-dir-itself"),
    pytest.param("..", id="its-parent"),
    pytest.param("../x", id="a-sibling"),
    pytest.param("/abs", id="absolute"),
    pytest.param("a/../../b", id="down-then-out"),
    pytest.param("a/b", id="nested"),  # inside, but a name is one entry: the run dir is output_dir/name
    pytest.param("a" * 256, id="longer-than-a-file-system-takes"),  # it failed at mkdir with a traceback
    pytest.param("é" * 128, id="256-bytes-in-utf-8"),
])
def test_run_name_is_one_name_inside_the_output_dir(name):
    with pytest.raises(ConfigError, match=r"^run.name: expected a name inside run.output_dir \(not empty, '.' or "
                                          r"'..', no '/', at most 255 bytes\), got ") as raised:
        config.load(overrides=[f"run.name={name}"])
    assert len(str(raised.value)) < 200  # one readable line, whatever the name's length


@pytest.mark.parametrize("name", ["exp 1", "lr-0.1_b128", "..x", "x..", ".hidden", "~user", "a" * 255])
def test_plain_names_are_kept(name):
    assert config.load(overrides=[f"run.name={name}"]).run.name == name


def test_run_name_is_the_one_key_joined_to_a_directory():
    """run.name is joined to run.output_dir (and run.storage_path); the schema says so, so it is confined."""
    import dataclasses

    sections = {f.name: getattr(config.load(), f.name) for f in dataclasses.fields(config.Config)}
    confined = {f"{name}.{f.name}": f.metadata["name_in"] for name, section in sections.items()
                if dataclasses.is_dataclass(section) for f in dataclasses.fields(section) if f.metadata.get("name_in")}
    assert confined == {"run.name": "run.output_dir"}


def test_zero_cpus_per_worker_is_refused():
    with pytest.raises(ConfigError, match=r"^scaling.cpus_per_worker: expected a value greater than 0, got 0"):
        config.load(overrides=["scaling.cpus_per_worker=0"])


@pytest.mark.parametrize("overrides, counts", [
    (("scaling.num_workers=[1, 3]",), (1, 3)),
    (("scaling.num_workers=4", "scaling.min_workers=2"), (2, 4)),
    (("scaling.num_workers=2",), (2, 2)),
    (("scaling.num_workers=0",), (1, 1)),  # local mode: the one process
])
def test_an_elastic_worker_count_is_a_range_or_min_workers(overrides, counts):
    cfg = config.load(overrides=list(overrides))
    assert (cfg.scaling.worker_counts()[0], cfg.scaling.worker_counts()[-1]) == counts
    assert cfg.scaling.elastic == (counts[0] != counts[1])
    # config.yaml holds the two keys, and reads back the same
    assert config.from_dict(config.to_dict(cfg)) == cfg


@pytest.mark.parametrize("override", ["scaling.num_workers=[1, 2, 3]", "scaling.num_workers=[1]"])
def test_a_worker_range_is_two_numbers(override):
    with pytest.raises(ConfigError, match=r"^scaling.num_workers: expected an integer or \[min, max\]"):
        config.load(overrides=[override])


def test_a_range_and_min_workers_together_are_refused():
    with pytest.raises(ConfigError, match=r"^scaling.num_workers: expected an integer or \[min, max\] \(and then "
                                          r"no scaling.min_workers\)"):
        config.load(overrides=["scaling.num_workers=[1, 2]", "scaling.min_workers=1"])


def test_set_takes_several_pairs_after_one_flag_and_repeats(capsys):
    from rayscale import cli

    assert cli.main(["config", "show", "--set", "optim.lr=0.2", "train.epochs=3", "--set", "seed=7"]) == 0
    shown = yaml.safe_load(capsys.readouterr().out)
    assert (shown["optim"]["lr"], shown["train"]["epochs"], shown["seed"]) == (0.2, 3, 7)


def test_an_override_without_a_value_is_named_as_the_user_gave_it():
    from rayscale.errors import on_the_command_line

    with on_the_command_line(), pytest.raises(ConfigError, match=r"^--set optim\.lr: expected KEY=VALUE, e\.g\. "
                                                                   r"--set optim\.lr=0\.1$"):
        config.load(overrides=["optim.lr"])
    with pytest.raises(ConfigError, match=r"^overrides: 'optim\.lr': expected KEY=VALUE, e\.g\. 'optim\.lr=0\.1' "
                                          r"\(or a mapping\)$"):
        config.load(overrides=["optim.lr"])  # rayscale.train(overrides=[...])


@pytest.mark.parametrize("overrides, refusal", [
    (["scaling.num_workers=[2, 4]"], "batch.global_batch_size 128 does not split over 3 workers"),
    (["train.precision=fp16"], "train.precision fp16 needs a GPU"),
    (["train.strategy=parameter_server", "optim.shard_state=true"], "optim.shard_state"),
])
def test_config_show_refuses_what_train_would_refuse_with_the_same_line(overrides, refusal, capsys):
    """`rayscale config show` is where a config is checked before a run: a combination of keys that `rayscale
    train` refuses (the rules in rayscale/rules.py) is refused here too, and nothing is printed on stdout."""
    from rayscale import cli
    from rayscale.driver.prepare import prepare

    assert cli.main(["config", "show", "--set", *overrides]) == 2
    shown = capsys.readouterr()
    assert shown.out == "" and shown.err.count("\n") == 1 and refusal in shown.err, shown
    with pytest.raises(ConfigError) as raised:
        prepare(config.load(overrides=overrides))
    assert shown.err == f"rayscale: error: {raised.value}\n"


@pytest.mark.parametrize("override, key, value", [
    ("run.name=2024-01-05", "run.name", "2024-01-05"),  # YAML 1.1: a date, refused as not a string
    ("run.name=010", "run.name", "010"),  # a key that takes only text takes what was written
    ("run.name=true", "run.name", "true"),
    ("data.label=no", "data.label", "no"),  # YAML 1.1: False
    ("train.epochs=010", "train.epochs", 10),  # YAML 1.1: octal, 8
    ("seed=0o17", "seed", 15),  # octal and hexadecimal only when written so
    ("seed=0x10", "seed", 16),
    ("optim.lr=.5", "optim.lr", 0.5),
    ("scaling.use_gpu=False", "scaling.use_gpu", False),
])
def test_values_read_as_yaml_12s_plain_scalars(override, key, value):
    cfg = config.load(overrides=[override])
    section, name = key.split(".") if "." in key else (None, key)
    got = getattr(getattr(cfg, section), name) if section else getattr(cfg, name)
    assert got == value and type(got) is type(value)


def test_a_config_file_reads_yaml_12s_plain_scalars(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("run:\n  name: 2024-01-05\ndata:\n  label: off\ntrain:\n  epochs: 010\n")
    cfg = config.load(path)
    assert (cfg.run.name, cfg.data.label, cfg.train.epochs) == ("2024-01-05", "off", 10)
    with pytest.raises(ConfigError, match=r"^train.epochs: expected an integer, got '1:30'$"):  # YAML 1.1: 90
        config.load(overrides=["train.epochs=1:30"])
