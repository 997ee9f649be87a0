"""The compatibility rules (rayscale/rules.py): every rule's example is refused with that rule's message, through
the library and through the CLI (exit 2, one line, no Ray), and nothing else in the table stands in its way."""

from __future__ import annotations

import pytest

from rayscale import cli, config, rules
from rayscale.errors import ConfigError
from rayscale.launch import trainer
from rayscale.rules import RULES
from rayscale.tuning import search

PARAMS = [pytest.param(index, rule, id=f"{index}-{'+'.join(rule.keys)}") for index, rule in enumerate(RULES)]


def _example(rule: rules.Rule) -> config.Config:
    return config.load(None, rule.example)


@pytest.mark.parametrize("scope", ["run", "search"])
def test_the_default_config_breaks_no_rule(scope):
    rules.check(config.load(), scope)


@pytest.mark.parametrize("index, rule", PARAMS)
def test_the_example_is_refused_with_its_rules_message(index, rule):
    cfg = _example(rule)
    assert rule.refuses(cfg)
    with pytest.raises(ConfigError) as info:
        rules.check(cfg, rule.scope)
    assert str(info.value) == rule.message(cfg)


@pytest.mark.parametrize("index, rule", PARAMS)
def test_no_earlier_rule_breaks_first(index, rule):
    """check() reports the first rule broken: an example that broke an earlier rule would hide this message."""
    cfg = _example(rule)
    assert [r.keys for r in RULES[:index] if r.refuses(cfg) and r.scope in ("run", rule.scope)] == []


@pytest.mark.parametrize("index, rule", PARAMS)
def test_the_message_is_one_line_starting_with_the_first_key(index, rule):
    message = rule.message(_example(rule))
    assert message.startswith(rule.keys[0]) and message[len(rule.keys[0])] in ": ", message
    assert "\n" not in message


@pytest.mark.parametrize("index, rule", PARAMS)
def test_the_keys_a_rule_names_exist(index, rule):
    known = {row[0] for row in config.describe()}
    assert set(rule.keys) <= known, set(rule.keys) - known
    assert rule.scope in ("run", "search")


def test_every_rule_says_something_of_its_own():
    messages = [rule.message(_example(rule)) for rule in RULES]
    assert len(set(messages)) == len(messages)


@pytest.mark.parametrize("rule", [r for r in RULES if r.scope == "search"], ids=lambda r: "+".join(r.keys))
def test_a_search_rule_is_not_a_runs(rule):
    """tune.search optuna with grid domains, an elastic worker count: refused by rayscale tune, fine for
    rayscale train."""
    rules.check(_example(rule), "run")


def _no_cluster(*args, **kwargs):
    raise AssertionError("a cluster was asked for although a rule was broken")


@pytest.mark.parametrize("index, rule", PARAMS)
def test_through_the_cli_exit_2_one_line_no_ray_nothing_written(index, rule, tmp_path, capsys, monkeypatch):
    import ray

    ray.shutdown()
    monkeypatch.setattr(trainer, "connect", _no_cluster)
    monkeypatch.setattr(search, "connect", _no_cluster)
    monkeypatch.chdir(tmp_path)  # data.source=. in the online examples: a directory, never read
    command = "train" if rule.scope == "run" else "tune"
    sets = [arg for override in rule.example for arg in ("--set", override)]
    outputs = ["--set", f"run.output_dir={tmp_path / 'runs'}", "--set", "run.name=rules"]

    code = cli.main([command, *sets, *outputs])

    err = capsys.readouterr().err
    assert code == 2, err
    assert err.splitlines() == [f"rayscale: error: {rule.message(_example(rule))}"]
    assert not ray.is_initialized()
    assert not (tmp_path / "runs").exists()


@pytest.mark.parametrize("micro, gpu, refused", [("auto", False, True), ("auto", True, False), (16, False, False),
                                                 (None, True, True)])
def test_goodput_on_one_worker_needs_micro_batches_that_a_cpu_run_under_auto_never_gets(micro, gpu, refused):
    """auto starts at the whole share and halves only when a GPU runs out of memory: on CPUs a one-worker run
    kept one micro-batch per step, measured no noise scale, and goodput never moved the batch, silently."""
    cfg = config.load(overrides=["batch.adaptive=goodput", "scaling.num_workers=1", "batch.global_batch_size=64",
                                 f"batch.micro_batch_size={'null' if micro is None else micro}",
                                 f"scaling.use_gpu={str(gpu).lower()}"])
    if refused:
        with pytest.raises(ConfigError, match="one worker measures only with 2\\+ micro-batches per step"):
            rules.check(cfg)
    else:
        rules.check(cfg)
