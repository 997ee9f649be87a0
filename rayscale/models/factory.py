"""The model is built from `model.name`: a built-in sized by the data, or a user factory by import path.

Built-ins take their data-derived sizes (input width, classes, vocabulary) from the `DataSpec`, so users
only ever set the knobs in `model.kwargs`. A user factory gets `model.kwargs` plus the data sizes its signature
names (DATA_SIZE_NAMES). Either way the engine calls `model(x, mask)` for sequences
(`model(x, attention_mask=mask)` when the model's forward names that parameter, as Hugging Face's do) and
`model(x)` otherwise, and reads a tensor, a dict's or an object's `logits`, or a tuple's first element
(engine/tasks.py).
"""

from __future__ import annotations

import contextlib
import copy
import difflib
import inspect
import io
import math
import sys
from collections.abc import Callable
from typing import Any

from torch import nn

from rayscale.config import ModelConfig
from rayscale.data.sources import DataSpec
from rayscale.errors import UserError
from rayscale.models.builtin import CNN, MLP, Transformer
from rayscale.plugins import first_line, import_callable

BUILTIN_MODELS = ("mlp", "cnn", "transformer")


def _data_sizes(name: str, spec: DataSpec) -> dict:
    """The constructor arguments a built-in takes from the data rather than from model.kwargs."""
    shape = tuple(spec.input_shape)
    if name == "transformer":
        if spec.vocab_size is None or len(shape) != 1:
            raise UserError(f"model.name 'transformer': expects token sequences (data with a vocabulary), "
                            f"got input shape {shape}")
        return {"vocab_size": spec.vocab_size, "max_length": shape[0], "num_outputs": spec.num_outputs,
                "pooled": spec.task == "sequence_classification"}
    if spec.vocab_size is not None:
        raise UserError(f"model.name '{name}': token sequences need transformer or a user model")
    if name == "cnn":
        if len(shape) != 3:
            raise UserError(f"model.name 'cnn': expects image input (C, H, W), got input shape {shape}")
        channels, height, width = shape
        return {"in_channels": channels, "image_size": min(height, width), "num_outputs": spec.num_outputs}
    return {"in_features": math.prod(shape), "num_outputs": spec.num_outputs}


def _build_builtin(cfg: ModelConfig, spec: DataSpec) -> nn.Module:
    model_class = {"mlp": MLP, "cnn": CNN, "transformer": Transformer}[cfg.name]
    sizes = _data_sizes(cfg.name, spec)
    # Sizes come from the data and checkpointing from its own key, so neither is a user kwarg.
    tunable = [p for p in inspect.signature(model_class).parameters
               if p not in sizes and p != "activation_checkpointing"]
    for kwarg in cfg.kwargs:
        if kwarg not in tunable:
            raise UserError(f"model.kwargs.{kwarg}: {cfg.name} does not take {kwarg} "
                            f"(it takes {', '.join(tunable)})")
    return _call(cfg, model_class,
                 {**sizes, **cfg.kwargs, "activation_checkpointing": cfg.activation_checkpointing})


# What a user factory may take from the data, by parameter name: it gets those its signature names (and
# model.kwargs does not set), so a factory written for fixed sizes keeps working.
DATA_SIZE_NAMES = ("input_shape", "in_features", "num_outputs", "num_classes", "vocab_size", "max_length",
                   "task", "spec")


def data_sizes(spec: DataSpec) -> dict[str, Any]:
    """Everything a user factory may ask for by name (DATA_SIZE_NAMES)."""
    shape = tuple(spec.input_shape)
    sequences = spec.vocab_size is not None
    return {"input_shape": shape, "in_features": None if sequences else math.prod(shape),
            "num_outputs": spec.num_outputs, "num_classes": spec.num_outputs if spec.task != "regression" else None,
            "vocab_size": spec.vocab_size, "max_length": shape[0] if sequences else None, "task": spec.task,
            "spec": spec}


def _build_user(cfg: ModelConfig, spec: DataSpec, factory: Callable | None = None) -> nn.Module:
    """A user factory named by model.name, or passed to rayscale.train(model=...): called with model.kwargs and
    the data sizes its signature asks for."""
    where = f"model.name {cfg.name!r}" if factory is None else "model"
    factory = factory or import_callable(cfg.name, where, kind="factory")
    shown_name = cfg.name.partition(":")[2] if ":" in cfg.name else getattr(factory, "__qualname__", "factory")
    # Checked against the signature first, so that the message can show what the factory takes.
    try:
        signature = inspect.signature(factory)
    except (TypeError, ValueError):  # some C callables have no signature; let the call itself decide
        signature = None
    named = set(signature.parameters) if signature is not None else set()
    sizes = {name: value for name, value in data_sizes(spec).items() if name in named and name not in cfg.kwargs}
    checkpointed = cfg.activation_checkpointing and "activation_checkpointing" in named
    arguments = {**sizes, **cfg.kwargs, **({"activation_checkpointing": True} if checkpointed else {})}
    if signature is not None:
        try:
            signature.bind(**arguments)
        except TypeError as exc:
            raise UserError(f"model.kwargs: {shown_name}{signature} does not accept them ({exc})") from None
    model = _call(cfg, factory, arguments, where)
    if not isinstance(model, nn.Module):
        raise UserError(f"{where}: factory returned {type(model).__name__}, expected a torch.nn.Module")
    if cfg.activation_checkpointing and not checkpointed:
        _enable_checkpointing(model, where)
    return model


def _enable_checkpointing(model: nn.Module, where: str) -> None:
    """model.activation_checkpointing for a user model whose factory does not take the switch: Hugging Face's
    `gradient_checkpointing_enable`, or an `activation_checkpointing` attribute the model reads itself."""
    if callable(getattr(model, "gradient_checkpointing_enable", None)):
        model.gradient_checkpointing_enable()
    elif isinstance(getattr(model, "activation_checkpointing", None), bool):
        model.activation_checkpointing = True
    else:
        raise UserError(f"model.activation_checkpointing: {where}'s {type(model).__name__} supports none of an "
                        f"activation_checkpointing factory argument or attribute, or gradient_checkpointing_enable()")


def _call(cfg: ModelConfig, factory: Callable[..., Any], arguments: dict, where: str | None = None) -> Any:
    """Run the model code the config chose (a built-in's constructor, a user's factory) on the config's kwargs.

    Whatever it raises is reported while the driver checks the run, before any cluster is claimed, as one line
    naming the key (`--debug` shows the traceback): the kwargs are the usual cause, the factory's own bug the
    other one, and either way the user is the one who can act on it."""
    said = io.StringIO()
    try:
        with contextlib.redirect_stderr(said):
            built = factory(**arguments)
    except UserError:
        raise
    except (Exception, SystemExit) as exc:  # SystemExit: a factory that exits (sys.exit, its own argparse)
        # ended rayscale with its code, 0 included, and no word of which key it was
        key = "model.kwargs" if cfg.kwargs else where or f"model.name {cfg.name!r}"
        shown = ", ".join(f"{name}={value!r}" for name, value in cfg.kwargs.items())
        called = cfg.name if where is None or where.startswith("model.name") else "model"
        last = (said.getvalue().strip().splitlines() or [""])[-1]  # argparse's usage line, then its error
        why = f" (it printed: {last})" if isinstance(exc, SystemExit) and last else ""
        raise UserError(f"{key}: {called}({shown}) raised {type(exc).__name__}: {first_line(exc)}{why}") from exc
    sys.stderr.write(said.getvalue())  # what a factory that built its model said is the user's to see
    return built


def build_model(cfg: ModelConfig, spec: DataSpec, supplied: nn.Module | Callable | None = None) -> nn.Module:
    """A fresh model for this data; seed torch first if the initial weights must be reproducible. `supplied` is
    rayscale.train's `model=`: a module (copied, so every build starts from its weights) or a factory."""
    if isinstance(supplied, nn.Module):
        if cfg.activation_checkpointing:
            model = copy.deepcopy(supplied)
            _enable_checkpointing(model, "model")
            return model
        return copy.deepcopy(supplied)
    if supplied is not None:
        return _build_user(cfg, spec, supplied)
    if cfg.name in BUILTIN_MODELS:
        return _build_builtin(cfg, spec)
    if ":" in cfg.name:
        return _build_user(cfg, spec)
    close = difflib.get_close_matches(cfg.name, BUILTIN_MODELS, n=1)
    hint = f" (did you mean {close[0]}?)" if close else ""
    raise UserError(f"model.name: expected mlp, cnn, transformer or package.module:factory, "
                    f"got {cfg.name!r}{hint}")
