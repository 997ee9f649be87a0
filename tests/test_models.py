"""Model building: shapes per data kind, checkpointing equivalence, padding invariance, user factories, errors."""

from __future__ import annotations

import re
import sys
import textwrap

import pytest
import torch

from rayscale.config import ModelConfig
from rayscale.engine.tasks import DataSpec, forward, loss_sum
from rayscale.errors import UserError
from rayscale.models import build_model, builtin

TABULAR = DataSpec("classification", (6,), num_outputs=3)
REGRESSION = DataSpec("regression", (6,), num_outputs=2)
IMAGE = DataSpec("classification", (1, 8, 8), num_outputs=4)
SEQUENCE = DataSpec("token_classification", (8,), num_outputs=5, vocab_size=11)


def make_batch(spec: DataSpec, batch_size: int = 4, lengths: list[int] | None = None) -> dict[str, torch.Tensor]:
    """A batch in the engine's format; `lengths` sets the real tokens per sequence (the rest is padding)."""
    generator = torch.Generator().manual_seed(1)
    if spec.vocab_size is None:
        x = torch.randn(batch_size, *spec.input_shape, generator=generator)
        if spec.task == "regression":
            y = torch.randn(batch_size, spec.num_outputs, generator=generator)
        else:
            y = torch.randint(spec.num_outputs, (batch_size,), generator=generator)
        return {"x": x, "y": y}
    length = spec.input_shape[0]
    lengths = lengths or [length] * batch_size
    mask = torch.arange(length)[None, :] < torch.tensor(lengths)[:, None]
    x = torch.randint(spec.vocab_size, (len(lengths), length), generator=generator)
    y = torch.randint(spec.num_outputs, (len(lengths), length), generator=generator)
    return {"x": x, "y": y, "mask": mask}


@pytest.mark.parametrize("name, spec, expected_shape", [
    pytest.param("mlp", TABULAR, (4, 3), id="mlp-tabular"),
    pytest.param("mlp", REGRESSION, (4, 2), id="mlp-regression"),
    pytest.param("mlp", IMAGE, (4, 4), id="mlp-flattens-images"),
    pytest.param("cnn", IMAGE, (4, 4), id="cnn-image"),
    pytest.param("transformer", SEQUENCE, (4, 8, 5), id="transformer-per-token"),
])
def test_builtin_output_shape(name, spec, expected_shape):
    model = build_model(ModelConfig(name=name), spec)
    assert forward(model, make_batch(spec)).shape == expected_shape


def test_kwargs_reach_the_builtin():
    model = build_model(ModelConfig(name="mlp", kwargs={"hidden_sizes": [7], "dropout": 0.5}), TABULAR)
    assert [block[0].out_features for block in model.blocks] == [7]
    assert model.blocks[0][2].p == 0.5


def loss_and_grads(model, spec, batch):
    torch.manual_seed(2)  # same dropout masks in both runs
    model.train()
    loss = loss_sum(spec.task, forward(model, batch), batch)
    loss.backward()
    return loss.detach(), {name: p.grad.clone() for name, p in model.named_parameters()}


@pytest.mark.parametrize("name, spec, kwargs, blocks", [
    pytest.param("mlp", TABULAR, {"hidden_sizes": [8, 8], "dropout": 0.2}, 2, id="mlp-with-dropout"),
    # BatchNorm: batch statistics must match, and the recompute must not update running stats again.
    pytest.param("cnn", IMAGE, {"channels": [4, 8]}, 2, id="cnn-batchnorm"),
    pytest.param("transformer", SEQUENCE, {"d_model": 16, "nhead": 2, "num_layers": 3, "dropout": 0.1}, 3,
                 id="transformer-with-padding"),
])
def test_activation_checkpointing_matches_plain(name, spec, kwargs, blocks, monkeypatch):
    torch.manual_seed(0)
    plain = build_model(ModelConfig(name=name, kwargs=kwargs), spec)
    checkpointed = build_model(ModelConfig(name=name, kwargs=kwargs, activation_checkpointing=True), spec)
    checkpointed.load_state_dict(plain.state_dict())
    calls = []
    real_checkpoint = builtin.checkpoint
    monkeypatch.setattr(builtin, "checkpoint", lambda *a, **kw: calls.append(1) or real_checkpoint(*a, **kw))
    batch = make_batch(spec, lengths=[8, 5, 1, 3] if spec.vocab_size else None)

    plain_loss, plain_grads = loss_and_grads(plain, spec, batch)
    assert calls == []
    checkpointed_loss, checkpointed_grads = loss_and_grads(checkpointed, spec, batch)

    assert len(calls) == blocks  # every hidden block ran under checkpoint
    torch.testing.assert_close(checkpointed_loss, plain_loss)
    for param_name, grad in plain_grads.items():
        torch.testing.assert_close(checkpointed_grads[param_name], grad, msg=param_name)
    for buffer_name, buffer in plain.state_dict().items():  # BatchNorm running stats, counters
        torch.testing.assert_close(checkpointed.state_dict()[buffer_name], buffer, msg=buffer_name)


def test_checkpointing_is_off_in_eval(monkeypatch):
    model = build_model(ModelConfig(name="mlp", activation_checkpointing=True), TABULAR).eval()
    monkeypatch.setattr(builtin, "checkpoint", lambda *a, **kw: pytest.fail("checkpoint used in eval"))
    forward(model, make_batch(TABULAR))


@pytest.mark.parametrize("training", [
    pytest.param(True, id="train"),
    pytest.param(False, id="eval-no-grad"),  # eval without grad takes PyTorch's fused encoder fast path
])
def test_transformer_real_positions_ignore_padding(training):
    """A sequence's real-token outputs must not change with how much padding its batch carries."""
    torch.manual_seed(0)
    model = build_model(ModelConfig(name="transformer", kwargs={"d_model": 16, "nhead": 2}), SEQUENCE)
    model.train(training)
    tokens = torch.tensor([[3, 1, 4, 1, 5, 9, 2, 6], [2, 7, 1, 8, 2, 8, 1, 8]])
    # Same two sequences (lengths 5 and 3) padded to 5 tokens, then to 8 with junk token ids in the padding.
    short_mask = torch.tensor([[True] * 5, [True] * 3 + [False] * 2])
    long_mask = torch.cat([short_mask, torch.zeros(2, 3, dtype=torch.bool)], dim=1)
    with torch.set_grad_enabled(training):
        short = model(tokens[:, :5], short_mask)
        long = model(tokens, long_mask)
        alone = model(tokens[1:, :3], torch.ones(1, 3, dtype=torch.bool))  # no padding at all

    torch.testing.assert_close(long[:, :5][short_mask], short[short_mask], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(short[1, :3], alone[0], atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("training", [pytest.param(True, id="train"), pytest.param(False, id="eval-no-grad")])
def test_transformer_all_padding_row_stays_finite(training):
    """A weight-0 padding row has no real token; NaN there would survive the loss's multiply by zero."""
    model = build_model(ModelConfig(name="transformer", kwargs={"d_model": 16, "nhead": 2}), SEQUENCE)
    model.train(training)
    batch = make_batch(SEQUENCE, lengths=[4, 8])
    batch["mask"][1] = False
    with torch.set_grad_enabled(training):
        output = forward(model, batch)
    assert torch.isfinite(output).all()
    assert torch.isfinite(loss_sum(SEQUENCE.task, output, batch))


@pytest.fixture
def user_module(tmp_path, monkeypatch):
    """A user's model file on sys.path, as a job's working_dir would provide it."""
    (tmp_path / "user_model_example.py").write_text(textwrap.dedent("""
        import torch

        def make(in_features=6, num_outputs=3, bias=True):
            return torch.nn.Linear(in_features, num_outputs, bias=bias)

        def not_a_model():
            return 3

        def strict(width=1):
            if width < 1:
                raise ValueError(f"width must be at least 1, got {width}")
            return torch.nn.Linear(6, 3)

        def broken(**kwargs):
            return torch.nn.Linear(6, undefined_width)  # noqa: F821

        value = 3
    """))
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.delitem(sys.modules, "user_model_example", raising=False)
    yield "user_model_example"
    sys.modules.pop("user_model_example", None)


def test_user_factory_gets_kwargs(user_module):
    cfg = ModelConfig(name=f"{user_module}:make", kwargs={"in_features": 6, "num_outputs": 2, "bias": False})
    model = build_model(cfg, TABULAR)
    assert isinstance(model, torch.nn.Linear)
    assert (model.in_features, model.out_features, model.bias) == (6, 2, None)
    assert forward(model, make_batch(TABULAR)).shape == (4, 2)


@pytest.mark.parametrize("cfg, spec, message", [
    # Built-in kwargs: the data-derived sizes and the checkpointing switch are not user kwargs.
    pytest.param(ModelConfig(name="mlp", kwargs={"foo": 1}), TABULAR,
                 "model.kwargs.foo: mlp does not take foo (it takes hidden_sizes, dropout)", id="unknown-kwarg"),
    pytest.param(ModelConfig(name="cnn", kwargs={"num_outputs": 9}), IMAGE,
                 "model.kwargs.num_outputs: cnn does not take num_outputs (it takes channels)",
                 id="derived-size-as-kwarg"),
    # Built-ins against data they cannot read.
    pytest.param(ModelConfig(name="cnn"), TABULAR,
                 "model.name 'cnn': expects image input (C, H, W), got input shape (6,)", id="cnn-on-tabular"),
    pytest.param(ModelConfig(name="transformer"), TABULAR,
                 "model.name 'transformer': expects token sequences", id="transformer-without-vocab"),
    pytest.param(ModelConfig(name="mlp"), SEQUENCE,
                 "model.name 'mlp': token sequences need transformer or a user model", id="mlp-on-tokens"),
    pytest.param(ModelConfig(name="cnn", kwargs={"channels": [4, 4, 4, 4]}), IMAGE,
                 "model.kwargs.channels: 4 blocks halve a 8-pixel image below 1 pixel; use at most 3 entries",
                 id="cnn-pools-too-often"),
    pytest.param(ModelConfig(name="transformer", kwargs={"d_model": 10, "nhead": 4}), SEQUENCE,
                 "model.kwargs.d_model: must be divisible by nhead (4), got 10", id="heads-do-not-divide"),
    # Names.
    pytest.param(ModelConfig(name="mpl"), TABULAR,
                 "model.name: expected mlp, cnn, transformer or package.module:factory, got 'mpl' "
                 "(did you mean mlp?)", id="typo-gets-hint"),
    pytest.param(ModelConfig(name="resnet"), TABULAR, "package.module:factory, got 'resnet'", id="no-hint"),
    pytest.param(ModelConfig(name=":make"), TABULAR,
                 "model.name ':make': expected package.module:factory", id="no-module"),
    # User factories.
    pytest.param(ModelConfig(name="nopkg.mod:make"), TABULAR,
                 "model.name 'nopkg.mod:make': cannot import nopkg.mod (No module named 'nopkg')",
                 id="missing-module"),
    pytest.param(ModelConfig(name="user_model_example:missing"), TABULAR,
                 "model.name 'user_model_example:missing': user_model_example has no attribute missing",
                 id="missing-attribute"),
    pytest.param(ModelConfig(name="user_model_example:value"), TABULAR,
                 "user_model_example.value is not callable", id="not-callable"),
    pytest.param(ModelConfig(name="user_model_example:not_a_model"), TABULAR,
                 "model.name 'user_model_example:not_a_model': factory returned int, expected a "
                 "torch.nn.Module", id="returns-non-module"),
    pytest.param(ModelConfig(name="user_model_example:make", kwargs={"width": 3}), TABULAR,
                 "model.kwargs: make(in_features=6, num_outputs=3, bias=True) does not accept them",
                 id="factory-rejects-kwargs"),
    # The model code's own errors, raised while it builds: one line naming the key and the message.
    pytest.param(ModelConfig(name="user_model_example:strict", kwargs={"width": -3}), TABULAR,
                 "model.kwargs: user_model_example:strict(width=-3) raised ValueError: width must be at least 1, "
                 "got -3", id="factory-refuses-a-value"),
    pytest.param(ModelConfig(name="user_model_example:broken"), TABULAR,
                 "model.name 'user_model_example:broken': user_model_example:broken() raised NameError: name "
                 "'undefined_width' is not defined", id="factory-bug-without-kwargs"),
    pytest.param(ModelConfig(name="user_model_example:broken", kwargs={"anything": 1}), TABULAR,
                 "model.kwargs: user_model_example:broken(anything=1) raised NameError", id="factory-takes-any-kwarg"),
    pytest.param(ModelConfig(name="mlp", kwargs={"hidden_sizes": [-3]}), TABULAR,
                 "model.kwargs.hidden_sizes: expected entries of at least 1, got [-3]", id="builtin-negative-width"),
    pytest.param(ModelConfig(name="mlp", kwargs={"hidden_sizes": [8, 0]}), TABULAR,  # torch builds a dead layer
                 "model.kwargs.hidden_sizes: expected entries of at least 1, got [8, 0]", id="builtin-zero-width"),
    pytest.param(ModelConfig(name="cnn", kwargs={"channels": [0]}), IMAGE,
                 "model.kwargs.channels: expected entries of at least 1, got [0]", id="builtin-zero-channels"),
    pytest.param(ModelConfig(name="mlp", kwargs={"hidden_sizes": 3}), TABULAR,
                 "model.kwargs: mlp(hidden_sizes=3) raised TypeError: 'int' object is not iterable",
                 id="builtin-wrong-type"),
    pytest.param(ModelConfig(name="transformer", kwargs={"nhead": 0}), SEQUENCE,
                 "model.kwargs.nhead: expected a number of at least 1, got 0", id="builtin-zero-heads"),
    pytest.param(ModelConfig(name="transformer", kwargs={"dim_feedforward": 0}), SEQUENCE,
                 "model.kwargs.dim_feedforward: expected a number of at least 1, got 0", id="builtin-zero-ff"),
    pytest.param(ModelConfig(name="transformer", kwargs={"num_layers": -1}), SEQUENCE,
                 "model.kwargs.num_layers: expected a number of at least 0, got -1", id="builtin-negative-layers"),
])
def test_build_errors(cfg, spec, message, user_module):
    with pytest.raises(UserError, match=re.escape(message)) as info:
        build_model(cfg, spec)
    assert "\n" not in str(info.value)


def test_a_module_failing_on_import_is_one_line(tmp_path, monkeypatch):
    (tmp_path / "user_model_raises_on_import.py").write_text("raise RuntimeError('needs a GPU at import')\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    with pytest.raises(UserError, match=re.escape("model.name 'user_model_raises_on_import:make': cannot import "
                                                  "user_model_raises_on_import (needs a GPU at import)")):
        build_model(ModelConfig(name="user_model_raises_on_import:make"), TABULAR)
