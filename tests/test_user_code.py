"""Your own model, loss and metrics: factories sized by the data, outputs as tensors, dicts or `.logits`,
activation checkpointing on user models, per-sample losses with their own weights (accumulation exact),
masked tokens, one label per sequence, metrics (functions and torchmetrics) reduced over ranks exactly, and
the Python API's check that an object can reach the workers."""

from __future__ import annotations

import copy
import threading
from dataclasses import dataclass

import numpy as np
import parquet_fixtures
import pyarrow as pa
import pytest
import torch
import torch.nn.functional as F
import user_code
from inprocess import train
from parquet_fixtures import write
from torch import nn
from torchmetrics.classification import MulticlassF1Score

import rayscale
from rayscale import cli, config
from rayscale.api import with_code
from rayscale.config import ModelConfig
from rayscale.data import sources
from rayscale.data.collate import collate
from rayscale.data.splits import is_validation
from rayscale.engine.precision import Precision
from rayscale.engine.step import train_step
from rayscale.engine.tasks import IGNORE_INDEX, DataSpec, Objective, correct, count, forward, logits_of
from rayscale.errors import UserError
from rayscale.models import build_model
from rayscale.plugins import UserCode, import_path

FP32 = Precision("fp32", "cpu")
LOCK = threading.Lock()  # what no pickle can take


class Digits(nn.Module):
    """A linear model of the digits, with what its subclasses get wrong."""

    def __init__(self):
        super().__init__()
        self.linear = nn.Linear(64, 10)

    def forward(self, x):
        return self.linear(x.flatten(1))


class HoldsALock(Digits):
    def __init__(self):
        super().__init__()
        self.lock = threading.Lock()


class FailsInEvalMode(Digits):
    def forward(self, x):
        if not self.training:
            raise RuntimeError("no forward in eval mode")
        return super().forward(x)


class GivesNaN(Digits):
    def forward(self, x):
        return super().forward(x) * float("nan")
TABULAR = DataSpec("classification", (6,), num_outputs=3)
BASE = ("train.epochs=1", "batch.global_batch_size=64", "data.lanes=2")


# ------------------------------------------------------------------------------------------------ models

def test_a_user_factory_gets_the_data_sizes_its_signature_names_and_kwargs_win():
    model = build_model(ModelConfig(name="user_code:sized_mlp"), TABULAR)
    assert (model.blocks[0][0].in_features, model.head.out_features) == (6, 3)
    wider = build_model(ModelConfig(name="user_code:sized_mlp", kwargs={"num_classes": 7, "hidden": 4}), TABULAR)
    assert (wider.blocks[0][0].out_features, wider.head.out_features) == (4, 7)


@dataclass
class HuggingFaceStyle:
    logits: torch.Tensor
    loss: None = None


@pytest.mark.parametrize("wrap", [
    pytest.param(lambda t: t, id="tensor"),
    pytest.param(lambda t: {"logits": t, "hidden_states": None}, id="dict"),
    pytest.param(lambda t: HuggingFaceStyle(t), id="object-with-logits"),
    pytest.param(lambda t: (t, "past"), id="tuple"),
])
def test_a_models_output_may_be_a_tensor_a_dict_an_object_with_logits_or_a_tuple(wrap):
    logits = torch.randn(4, 3)
    assert logits_of(wrap(logits)) is logits


def test_an_output_without_logits_is_refused_naming_what_came():
    with pytest.raises(TypeError, match=r"returned dict \(keys: scores\); expected a tensor"):
        logits_of({"scores": torch.zeros(1)})
    model = build_model(ModelConfig(name="user_code:DictOutput"), TABULAR)
    assert forward(model, {"x": torch.randn(5, 6)}).shape == (5, 3)


class Recomputes(nn.Module):
    """Counts forwards of its hidden block: checkpointing runs it again in backward. Switched on by an
    `activation_checkpointing` attribute it reads itself."""

    def __init__(self):
        super().__init__()
        self.hidden, self.head = nn.Linear(6, 8), nn.Linear(8, 3)
        self.calls = 0
        self.activation_checkpointing = False

    def checkpointed(self) -> bool:
        return self.activation_checkpointing

    def block(self, x):
        self.calls += 1
        return torch.tanh(self.hidden(x))

    def forward(self, x):
        if self.checkpointed():
            return self.head(torch.utils.checkpoint.checkpoint(self.block, x, use_reentrant=False))
        return self.head(self.block(x))


class HuggingFaceStyleRecomputes(Recomputes):
    """Switched on as a Hugging Face model is, by a method (and no attribute of that name)."""

    def __init__(self):
        super().__init__()
        del self.activation_checkpointing
        self.gradient_checkpointing = False

    def gradient_checkpointing_enable(self):
        self.gradient_checkpointing = True

    def checkpointed(self) -> bool:
        return self.gradient_checkpointing


@pytest.mark.parametrize("model_class", [Recomputes, HuggingFaceStyleRecomputes])
def test_activation_checkpointing_reaches_a_user_model_and_leaves_the_gradients_alone(model_class):
    torch.manual_seed(0)
    original = model_class()
    plain = build_model(ModelConfig(name="mlp"), TABULAR, original)
    checkpointed = build_model(ModelConfig(name="mlp", activation_checkpointing=True), TABULAR, original)
    x = torch.randn(4, 6)
    grads = []
    for model in (plain, checkpointed):
        model(x).square().sum().backward()
        grads.append([p.grad.clone() for p in model.parameters()])
    assert (plain.calls, checkpointed.calls, original.calls) == (1, 2, 0)  # recomputed in backward; copies
    assert all(torch.allclose(a, b) for a, b in zip(*grads, strict=True))


def test_activation_checkpointing_on_a_model_that_cannot_is_one_clear_error():
    with pytest.raises(UserError, match=r"model.activation_checkpointing: model's Linear supports none of"):
        build_model(ModelConfig(name="mlp", activation_checkpointing=True), TABULAR, nn.Linear(6, 3))


def test_a_factory_that_takes_the_switch_gets_it():
    seen = []

    def factory(input_shape, num_classes, activation_checkpointing=False):
        seen.append(activation_checkpointing)
        return nn.Linear(input_shape[0], num_classes)

    build_model(ModelConfig(name="mlp", activation_checkpointing=True), TABULAR, factory)
    assert seen == [True]


# -------------------------------------------------------------------------------------------------- losses

def _params(model):
    return torch.cat([p.detach().flatten() for p in model.parameters()])


def _step(loss, sizes, x, y):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 16), nn.Tanh(), nn.Linear(16, 3)).double()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.5)
    bounds = np.cumsum([0, *sizes])
    micro = [{"x": x[a:b], "y": y[a:b]} for a, b in zip(bounds[:-1], bounds[1:], strict=True)]
    result = train_step(model, micro, optimizer, task=Objective("classification", loss), lr=0.5, precision=FP32)
    return _params(model), result


def _data(rows=10):
    generator = torch.Generator().manual_seed(1)
    return torch.randn(rows, 6, generator=generator, dtype=torch.float64), torch.randint(0, 3, (rows,),
                                                                                         generator=generator)


def test_a_per_sample_user_loss_trains_exactly_as_the_builtin_one():
    x, y = _data()
    builtin, _ = _step(None, [10], x, y)
    user, result = _step(user_code.per_sample_cross_entropy, [4, 4, 2], x, y)
    assert torch.allclose(user, builtin, rtol=1e-12, atol=1e-14) and result.global_count.item() == 10


def test_a_user_loss_with_its_own_weights_is_normalised_by_their_global_sum_across_micro_batches():
    x, y = _data()
    whole, result = _step(user_code.class_zero_counts_double, [10], x, y)
    accumulated, _ = _step(user_code.class_zero_counts_double, [4, 4, 2], x, y)
    assert result.global_count.item() == 10 + (y == 0).sum().item()
    assert torch.allclose(accumulated, whole, rtol=1e-12, atol=1e-14)
    # By hand: the weighted mean of the per-sample losses, one SGD step.
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 16), nn.Tanh(), nn.Linear(16, 3)).double()
    weights = 1.0 + (y == 0).double()
    (F.cross_entropy(model(x), y, reduction="none") * weights).sum().div(weights.sum()).backward()
    with torch.no_grad():
        for p in model.parameters():
            p -= 0.5 * p.grad
    assert torch.allclose(whole, _params(model), rtol=1e-12, atol=1e-14)


def test_a_user_loss_that_reduces_is_refused_with_the_shape_it_returned():
    x, y = _data()
    with pytest.raises(ValueError, match=r"train.loss: returned losses of shape \(\); expected one per sample"):
        _step(lambda output, batch: F.cross_entropy(output, batch["y"]), [10], x, y)


# ------------------------------------------------------------------------------------ tokens and sequences

def test_masked_tokens_count_nowhere_and_accumulation_stays_exact():
    generator = torch.Generator().manual_seed(0)
    x = torch.randint(0, 11, (6, 5), generator=generator)
    y = torch.randint(0, 4, (6, 5), generator=generator)
    y[0, :3] = IGNORE_INDEX
    y[3, 1] = IGNORE_INDEX
    lengths = torch.tensor([5, 1, 3, 2, 5, 4])
    mask = torch.arange(5)[None, :] < lengths[:, None]
    batch = {"x": x, "y": y, "mask": mask}
    real = int(lengths.sum()) - 3 - 1
    assert count("token_classification", batch).item() == real
    output = torch.randn(6, 5, 4)
    # The masked tokens' labels are not classes: accuracy over the others only.
    hits = ((output.argmax(-1) == y) & mask & (y != IGNORE_INDEX)).sum()
    assert correct("token_classification", output, batch).item() == hits.item()

    class Tokens(nn.Module):
        def __init__(self):
            super().__init__()
            torch.manual_seed(0)
            self.embedding, self.head = nn.Embedding(11, 8), nn.Linear(8, 4)

        def forward(self, tokens, mask):
            return self.head(self.embedding(tokens))

    def run(sizes):
        model = Tokens().double()
        optimizer = torch.optim.SGD(model.parameters(), lr=1.0)
        bounds = np.cumsum([0, *sizes])
        micro = [{k: v[a:b] for k, v in batch.items()} for a, b in zip(bounds[:-1], bounds[1:], strict=True)]
        result = train_step(model, micro, optimizer, task="token_classification", lr=1.0, precision=FP32)
        return _params(model), result

    whole, result = run([6])
    accumulated, _ = run([2, 3, 1])
    assert result.global_count.item() == real
    assert torch.allclose(accumulated, whole, rtol=1e-12, atol=1e-14)


def test_a_model_whose_forward_names_attention_mask_gets_the_mask_by_that_name(tmp_path):
    # GPT-2's forward in transformers 5 is (input_ids, cache, attention_mask, ...): positionally, the mask would
    # land in the cache's place.
    spec = DataSpec("token_classification", (5,), num_outputs=3, vocab_size=11)
    model = build_model(ModelConfig(name="user_code:CacheBeforeMask"), spec)
    mask = torch.arange(5)[None, :] < torch.tensor([5, 2])[:, None]
    batch = {"x": torch.randint(0, 11, (2, 5)), "y": torch.zeros(2, 5, dtype=torch.int64), "mask": mask}
    assert forward(model, batch).shape == (2, 5, 3)
    assert model.masks_seen[-1] is mask
    # Through DDP's wrapper (2 gloo ranks), which passes keywords on to the model.
    source = write(tmp_path / "tokens.parquet", _token_rows(200, per_sequence=False))
    run = train(tmp_path, "named_mask", *BASE, f"data.source={source}", "data.sequence=tokens", workers=2,
                code=UserCode(model=user_code.CacheBeforeMask))
    assert run.summary["data_spec"]["task"] == "token_classification"


def _token_rows(rows: int, *, per_sequence: bool, masked: bool = True) -> pa.Table:
    rng = np.random.default_rng(0)
    tokens = [rng.integers(1, 12, size=rng.integers(2, 9)).tolist() for _ in range(rows)]
    if per_sequence:
        labels = [seq[0] % 3 for seq in tokens]  # the class is in the first token
    else:
        labels = [[t % 3 for t in seq] for seq in tokens]
        if masked:
            for seq in labels:
                seq[0] = IGNORE_INDEX  # as a causal LM masks the first position
    return pa.table({"tokens": pa.array(tokens, pa.list_(pa.int64())), "label": labels})


def test_a_token_column_with_masked_labels_is_read_and_other_negatives_are_refused(tmp_path):
    data = config.load(overrides=["data.sequence=tokens", "data.num_classes=3"]).data
    info = sources.inspect_source(write(tmp_path / "ok.parquet", _token_rows(40, per_sequence=False)), data, 0)
    assert info.spec.task == "token_classification"
    rows = sources.read_chunk("parquet", info.chunks[0], data, 0)
    assert all(labels[0] == IGNORE_INDEX for labels in rows["y"])
    bad = _token_rows(40, per_sequence=False)
    labels = bad.column("label").to_pylist()
    labels[7][1] = -5
    bad = bad.set_column(1, "label", pa.array(labels))
    with pytest.raises(UserError, match=r"has label -5 \(row 7\); expected classes 0 to 2 .* or -100"):
        sources.inspect_source(write(tmp_path / "bad.parquet", bad), data, 0)


def test_one_label_per_sequence_reads_collates_and_trains_the_pooled_transformer(tmp_path):
    source = write(tmp_path / "seq.parquet", _token_rows(600, per_sequence=True), row_group_size=150)
    data = config.load(overrides=["data.sequence=tokens"]).data
    info = sources.inspect_source(source, data, 0)
    assert info.spec.task == "sequence_classification" and info.spec.num_outputs == 3
    batch = collate(sources.read_chunk("parquet", info.chunks[0], data, 0), torch.device("cpu"))
    assert batch["y"].shape == (150,) and batch["mask"].shape == batch["x"].shape
    model = build_model(ModelConfig(name="transformer"), info.spec)
    assert forward(model, batch).shape == (150, 3)
    run = train(tmp_path, "seq", f"data.source={source}", "data.sequence=tokens", "model.name=transformer",
                "train.epochs=6", "batch.global_batch_size=32", "optim.name=adamw", "optim.lr=0.003",
                "schedule.warmup_samples=0", "train.noise_scale=false")
    assert run.summary["data_spec"]["task"] == "sequence_classification"
    assert run.summary["final"]["val_accuracy"] > 0.8  # chance is 1/3


# ------------------------------------------------------------------------------------------------- metrics

def test_metrics_and_a_weighted_user_loss_on_two_ranks_reduce_exactly(tmp_path):
    from torchmetrics.classification import MulticlassAccuracy

    code = UserCode(loss=user_code.cross_entropy_weighted_by_one,
                    metrics=(("hit", user_code.hit), ("micro_accuracy", MulticlassAccuracy(10, average="micro"))))
    builtin = train(tmp_path, "builtin", *BASE, workers=2)
    user = train(tmp_path, "user", *BASE, workers=2, code=code)
    # Weights of 1 from the loss: the count the step corrects to is the one it scaled by, so nothing moves.
    assert all(torch.equal(user.model[k], builtin.model[k]) for k in builtin.model)
    final = user.summary["final"]
    # (float32 sums in another order: the built-in one sums inside cross_entropy)
    assert final["val_loss"] == pytest.approx(builtin.summary["final"]["val_loss"], rel=1e-6)
    assert final["val_hit"] == final["val_accuracy"]  # the same sums, all-reduced with val_loss
    assert final["val_micro_accuracy"] == pytest.approx(final["val_accuracy"], abs=1e-6)  # torchmetrics' sync
    assert user.summary["python_objects"] == {"loss": "user_code.cross_entropy_weighted_by_one",
                                              "metrics.hit": "user_code.hit",
                                              "metrics.micro_accuracy": "torchmetrics.classification."
                                                                        "accuracy.MulticlassAccuracy"}
    evaluations = [line for line in user.lines if line.get("evaluation")]
    assert evaluations and all("val_hit" in line and "val_micro_accuracy" in line for line in evaluations)


def test_val_accuracy_counts_rows_by_their_sample_weights_not_by_a_user_losss_weights(tmp_path):
    # The loss counts class 0 double: val_loss is normalised by those weights, but accuracy stays the share of
    # rows predicted right (it was divided by the loss's weight sum, 0.71 beside a macro F1 of 0.95 on digits).
    code = UserCode(loss=user_code.class_zero_counts_double, metrics=(("hit", user_code.hit),))
    final = train(tmp_path, "class_zero_double", *BASE, code=code).summary["final"]
    assert final["val_accuracy"] == final["val_hit"]  # a function metric: per-sample hits over the real rows


def _weightless(output, batch):
    losses = F.cross_entropy(output, batch["y"], reduction="none")
    return losses, torch.zeros_like(losses)


def test_a_loss_whose_weights_are_all_0_ends_the_run_at_the_epoch_end_in_one_line(tmp_path, capsys):
    """Its log lines say `loss -` (the line's loss was formatted as a number: a TypeError ended the worker),
    and the epoch end stops the run: it trained on nothing and saved the initial model as trained."""
    with pytest.raises(UserError, match=r"^train.loss \(the weights it returns\): every row of epoch 1 weighed 0 on "
                                        r"every worker, so the epoch trained on nothing"):
        # No validation rows: they would be refused first (the next test), at the epoch end's validation.
        train(tmp_path, "weightless", *BASE, "train.log_every_samples=256", "data.val_fraction=0",
              code=UserCode(loss=_weightless))
    assert " loss - lr " in capsys.readouterr().out
    assert not (tmp_path / "weightless" / "model.pt").exists()


def test_rows_that_weigh_0_for_a_while_log_no_loss_and_a_file_where_all_do_is_refused_at_the_epoch_end(tmp_path):
    table = parquet_fixtures.tabular(0, 600)
    weights = np.ones(600, dtype=np.float32)
    weights[:256] = 0  # the first 4 steps of 64, in file order
    early = write(tmp_path / "early.parquet", table.set_column(2, "w", pa.array(weights)))
    options = ("train.epochs=1", "batch.global_batch_size=64", "data.shuffle=none", "data.val_fraction=0",
               "data.weight=w", "train.log_every_samples=128")
    lines = train(tmp_path, "early", *options, f"data.source={early}").lines
    losses = [line["train_loss"] for line in lines if not line.get("epoch_end")]
    assert losses[:2] == [None, None] and all(loss is not None for loss in losses[2:]), losses
    assert lines[-1]["train_loss"] is not None
    # A file whose rows all weigh 0 is refused up front (tests/test_bad_input.py); here only the training split's
    # do, so the run starts and the epoch end finds it.
    val_only = is_validation(np.arange(600), 0.2).astype(np.float32)
    none = write(tmp_path / "none.parquet", table.set_column(2, "w", pa.array(val_only)))
    with pytest.raises(UserError, match=r"^data.weight \(column 'w'\): every row of epoch 1 weighed 0"):
        train(tmp_path, "none", *options, f"data.source={none}", "data.val_fraction=0.2")


def test_validation_rows_that_all_weigh_0_are_refused_where_their_val_loss_read_0(tmp_path):
    """A val_loss of 0 whatever the model: the best a search could rank. Refused at the first validation, and
    by `rayscale evaluate` on such a file."""
    table = parquet_fixtures.tabular(0, 600)
    train_file = write(tmp_path / "train.parquet", table)
    val_file = write(tmp_path / "val.parquet", table.set_column(2, "w", pa.array(np.zeros(600, dtype=np.float32))))
    options = ("train.epochs=1", "batch.global_batch_size=64", "data.weight=w", f"data.source={train_file}")
    with pytest.raises(UserError, match=r"^data.weight: every weight in column 'w' of data.val_source .*val.parquet "
                                        r"is 0, so no row would count"):  # up front, before anything trains
        train(tmp_path, "weightless_val", *options, f"data.val_source={val_file}")
    # Only the held-out split's rows weigh 0: the run starts, and its first validation finds it.
    train_only = (~is_validation(np.arange(600), 0.2)).astype(np.float32)
    split_file = write(tmp_path / "split.parquet", table.set_column(2, "w", pa.array(train_only)))
    with pytest.raises(UserError, match=r"^data.weight \(column 'w'\): every row evaluated weighed 0 on every "
                                        r"worker, so val_loss would be 0 whatever the model"):
        train(tmp_path, "weightless_split", *options[:-1], f"data.source={split_file}", "data.val_fraction=0.2")
    trained = train(tmp_path, "weighted_val", *options, "data.val_fraction=0.2")
    assert trained.summary["final"]["val_loss"] > 0
    with pytest.raises(UserError, match=r"^data.weight: every weight in column 'w' of .*val.parquet is 0"):
        rayscale.evaluate(trained.run_dir, data=val_file)


def test_metrics_named_in_the_config_are_imported_and_a_bad_name_fails_before_training(tmp_path):
    run = train(tmp_path, "named", *BASE, "train.metrics={hit: user_code:hit}", "train.loss=user_code:per_sample_cross_entropy")
    assert run.summary["final"]["val_hit"] == run.summary["final"]["val_accuracy"]
    with pytest.raises(UserError, match="train.metrics.f1: user_code has no attribute f1"):
        train(tmp_path, "bad", *BASE, "train.metrics={f1: user_code:f1}")
    assert not (tmp_path / "bad").exists()


# ---------------------------------------------------------------------------------------- the Python API

def test_importable_objects_are_named_in_the_config_and_the_rest_travel_as_objects():
    cfg, code = with_code(config.load(), user_code.sized_mlp, lambda output, batch: output.sum(dim=1),
                          {"hit": user_code.hit, "local": lambda output, batch: output[:, 0]})
    assert cfg.model.name == "user_code:sized_mlp" and cfg.train.metrics == {"hit": "user_code:hit"}
    assert cfg.train.loss is None and code.loss is not None and [n for n, _ in code.metrics] == ["local"]
    assert import_path(copy.deepcopy) == "copy:deepcopy" and import_path(nn.Linear(1, 1)) is None


@pytest.mark.parametrize("kwargs, message", [
    ({"loss": lambda output, batch, lock=LOCK: output}, r"loss: cannot be sent to the workers \(TypeError"),
    ({"model": 3}, "model: expected a torch.nn.Module or a factory returning one, got int"),
    ({"metrics": {"f 1": user_code.hit}}, r"metrics\['f 1'\]: expected an identifier"),
    ({"model": lambda: nn.Linear(2, 3), "overrides": {"model.kwargs": {"width": 3}}},
     r"model.kwargs: <lambda>\(\) does not accept them"),
    # Tried on two rows of the data on the driver: these failed in every worker, once per allowed restart.
    ({"loss": lambda output, batch: F.cross_entropy(output, batch["y"])},
     r"loss=: failed on 2 rows of digits \(UserCodeError: train.loss: returned losses of shape \(\); expected one"),
    ({"loss": lambda output: output}, r"loss=: failed on 2 rows of digits \(TypeError: .*positional argument"),
    ({"metrics": {"f1": MulticlassF1Score(num_classes=4)}},
     r"metrics\['f1'\]: failed on 2 rows of digits \(ValueError: .*number of classes"),
    ({"overrides": {"train.metrics": {"ce": "torch.nn.functional:cross_entropy"}}},
     r"train.metrics.ce: failed on 2 rows of digits \(TypeError: cross_entropy_loss\(\): argument 'target'"),
    # On CPU workers whatever fails on the driver's CPU would fail in every worker, at its first step.
    ({"loss": lambda output, batch: F.cross_entropy(output, batch["label"], reduction="none")},
     r"loss=: failed on 2 rows of digits \(KeyError: 'label'\)"),
    ({"model": lambda: nn.Linear(64, 3)},
     r"model=: the model gives 3 values per row, but the data has 10 classes; expected 10 logits"),
    ({"model": lambda: nn.Linear(32, 10)},
     r"model=: failed on 2 rows of digits \(RuntimeError: mat1 and mat2 shapes cannot be multiplied"),
    ({"metrics": {"f1": MulticlassF1Score(num_classes=10, average=None)}},
     r"metrics\['f1'\]: failed on 2 rows of digits \(UserCodeError: train.metrics.f1: compute\(\) gave Tensor"),
    ({"loss": lambda output, batch: (F.cross_entropy(output, batch["y"], reduction="none"),
                                     torch.tensor([1.0, -1.0]))},
     r"loss=: failed on 2 rows of digits \(UserCodeError: train.loss: returned weights from -1 to 1; expected finite"),
    # A loss no gradient flows back through: every worker's first backward failed, once per allowed restart.
    ({"loss": lambda output, batch: torch.ones(output.shape[0])},
     r"loss=: failed on 2 rows of digits \(UserCodeError: train.loss: returned losses that do not depend on the model"),
    ({"loss": lambda output, batch: (F.cross_entropy(output, batch["y"], reduction="none").detach(),
                                     torch.ones(output.shape[0]))}, r"train.loss: returned losses that do not depend"),
    # val_loss and val_accuracy are rayscale's: a metric of that name replaced them (and a search ranked by it).
    ({"metrics": {"loss": lambda output, batch: output[:, 0]}}, r"metrics\['loss'\]: val_loss is rayscale's own validation metric"),
    ({"overrides": {"train.metrics": {"accuracy": "user_code:hit"}}},
     r"train.metrics.accuracy: val_accuracy is rayscale's own validation metric, which this one would replace"),
    # A module holding a lock: copying it for the build raised a bare TypeError before the pickle check ran.
    ({"model": HoldsALock()}, r"^model: cannot be sent to the workers \(TypeError: cannot pickle '_thread.lock'"),
    # The model's eval mode, where the run validates (it was tried only with metrics): every worker's first
    # validation failed, once per allowed restart.
    ({"model": FailsInEvalMode()}, r"^model=: failed on 2 rows of digits \(RuntimeError: no forward in eval mode\)"),
    # Non-finite before any step: every step was skipped, and the run stopped blaming optim.lr.
    ({"model": GivesNaN()}, r"^model=: gave non-finite outputs \(nan or inf\) on 2 rows of digits before any"),
    ({"loss": lambda output, batch: F.cross_entropy(output, batch["y"], reduction="none") * float("inf")},
     r"^loss=: failed on 2 rows of digits \(UserCodeError: train.loss: returned non-finite losses \(inf\)"),
    # An object beside a config naming another for the same part: the object won, config.yaml said the other.
    ({"loss": lambda output, batch: output[:, 0], "overrides": {"train.loss": "no_such.module:loss"}},
     r"^loss: given with train.loss no_such.module:loss in the config; give one of them$"),
    ({"model": Digits(), "overrides": {"model.name": "cnn"}}, r"^model: given with model.name cnn in the config"),
    ({"metrics": {"hit": lambda output, batch: output[:, 0]}, "overrides": {"train.metrics": {"hit": "a.b:c"}}},
     r"^metrics\['hit'\]: given with train.metrics.hit a.b:c in the config"),
    ({"metrics": {"hit": 0.5}}, r"^metrics\['hit'\]: expected a function \(output, batch\) -> values or a "
                                r"torchmetrics Metric, got float$"),
    # An empty address was taken for none: the run started the embedded Ray (the CLI refused it).
    ({"address": ""}, r"^address: expected host:port, ray://host:port, auto or local, got an empty value"),
])
def test_objects_that_cannot_reach_the_workers_or_be_used_fail_before_anything_runs(tmp_path, kwargs, message):
    overrides = {"run.output_dir": str(tmp_path), **kwargs.pop("overrides", {})}
    with pytest.raises(UserError, match=message):
        rayscale.train(overrides=overrides, **kwargs)
    assert list(tmp_path.iterdir()) == []


def test_load_model_and_predict_check_the_model_they_are_given(tmp_path):
    """An int or a name where the module or factory goes: "model() raised TypeError: 'int' object is not
    callable" (train and evaluate checked it)."""
    for call in (lambda: rayscale.load_model(tmp_path, model=3),
                 lambda: rayscale.predict(tmp_path, str(tmp_path / "x.parquet"), tmp_path / "out", model="mlp")):
        with pytest.raises(UserError, match=r"^model: expected a torch.nn.Module or a factory returning one, got "):
            call()


def test_yaml_text_where_a_configs_path_goes_is_refused_in_one_line():
    with pytest.raises(UserError, match=r"^config file: expected a YAML file's path, got text of several lines") as no:
        rayscale.train("optim:\n  lr: 0.1\n")
    assert "\n" not in str(no.value)
    with pytest.raises(UserError, match=r"^address: expected host:port"):
        rayscale.connect("")


def test_a_module_handed_in_is_trained_as_a_copy_recorded_and_loaded_again_with_it(tmp_path):
    from rayscale.models import MLP

    torch.manual_seed(3)
    model = MLP(in_features=64, num_outputs=10, hidden_sizes=(32,))
    before = copy.deepcopy(model.state_dict())
    run = train(tmp_path, "module", *BASE, code=UserCode(model=model))
    assert run.summary["python_objects"] == {"model": "rayscale.models.builtin.MLP"}
    assert run.summary["final"]["val_accuracy"] > 0.5
    assert all(torch.equal(model.state_dict()[k], before[k]) for k in before)  # the caller's module untouched
    with pytest.raises(UserError, match="pass it again: rayscale.load_model"):
        rayscale.load_model(run.run_dir)
    loaded = rayscale.load_model(run.run_dir, model=model)
    assert all(torch.equal(loaded.state_dict()[k], run.model[k]) for k in run.model)
    evaluated = rayscale.evaluate(run.run_dir, model=model)  # the module handed in, not model.name's MLP
    assert evaluated["val_accuracy"] == run.summary["final"]["val_accuracy"]


def test_eval_of_a_run_whose_loss_and_metrics_were_objects_needs_the_loss_again_and_says_what_it_leaves_out(
        tmp_path, capsys):
    """Without the loss, val_loss would have been the task's cross-entropy under the same name (half the run's
    doubled loss, silently); a metric not given again is left out, in a line saying so."""
    doubled = lambda output, batch: 2 * F.cross_entropy(output, batch["y"], reduction="none")  # noqa: E731
    hit = lambda output, batch: (output.argmax(dim=1) == batch["y"]).float()  # noqa: E731
    run = train(tmp_path, "objects", *BASE, code=UserCode(loss=doubled, metrics=(("hit", hit),)))
    assert set(run.summary["python_objects"]) == {"loss", "metrics.hit"}
    capsys.readouterr()
    assert cli.main(["eval", str(run.run_dir)]) == 2
    error = capsys.readouterr().err
    assert "the run's loss was handed to rayscale.train as a Python object" in error and error.count("\n") == 1
    assert not (run.run_dir / "eval.json").exists()
    again = rayscale.evaluate(run.run_dir, loss=doubled)
    assert again["val_loss"] == pytest.approx(run.summary["final"]["val_loss"]) and "val_hit" not in again
    assert "val_hit left out: the run's metrics hit were Python objects" in capsys.readouterr().err
    both = rayscale.evaluate(run.run_dir, loss=doubled, metrics={"hit": hit})
    assert both["val_hit"] == pytest.approx(run.summary["final"]["val_hit"])
    assert "left out" not in capsys.readouterr().err


def test_on_gpu_workers_only_failures_no_device_changes_are_refused_on_the_drivers_cpu():
    """A GPU run's model may do on CUDA what the driver's CPU cannot: its forward's RuntimeErrors are left to the
    workers; a key the batch lacks, a bad signature or an index past the outputs fail on any device."""
    from rayscale.driver.prepare import _misfit, _needs_a_worker

    assert _misfit(KeyError("label")) and _misfit(IndexError("Target 9 is out of bounds."))
    assert _misfit(TypeError("loss() takes 1 positional argument but 2 were given"))
    assert not _misfit(RuntimeError("mat1 and mat2 shapes cannot be multiplied (2x64 and 32x10)"))
    assert not _misfit(NotImplementedError("Could not run 'aten::_flash_attention_forward' on the 'CPU' backend"))
    assert not _misfit(TypeError("expected a tensor on device cuda:0"))
    assert _needs_a_worker(RuntimeError("Default process group has not been initialized, please make sure to call "
                                        "init_process_group.")) and _needs_a_worker(AssertionError("Torch not compiled with CUDA enabled"))
