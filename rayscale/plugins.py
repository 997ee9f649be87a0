"""User code: named in the config as `package.module:name` (a model factory, a loss, metrics, a checkpoint upload
function), or handed to rayscale.train as Python objects (UserCode)."""

from __future__ import annotations

import importlib
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from rayscale.errors import UserError


def import_callable(dotted: str, where: str, kind: str = "function") -> Callable:
    """The callable `dotted` names; a one-line UserError starting with `where` otherwise."""
    module_name, _, attribute = dotted.partition(":")
    if not module_name or not attribute:
        raise UserError(f"{where}: expected package.module:{kind}")
    try:
        module = importlib.import_module(module_name)
    except (Exception, SystemExit) as exc:  # not only ImportError: the module's own code runs on import
        raise UserError(f"{where}: cannot import {module_name} ({first_line(exc)})") from exc
    found = getattr(module, attribute, None)
    if found is None:
        raise UserError(f"{where}: {module_name} has no attribute {attribute}")
    if not callable(found):
        raise UserError(f"{where}: {module_name}.{attribute} is not callable")
    return found


def first_line(exc: BaseException) -> str:
    return (str(exc).strip().splitlines() or ["(no message)"])[0]


OWN_METRICS = ("loss", "accuracy")  # validation writes val_loss and val_accuracy; a user metric is val_<name>


@dataclass(frozen=True)
class UserCode:
    """What rayscale.train was handed as Python objects rather than named in the config (model=, loss=,
    metrics=); the workers get them pickled with the payload. Names in the config (model.name, train.loss,
    train.metrics) are imported on each worker instead."""

    model: Any = None  # a torch.nn.Module, or a factory called like model.name's
    loss: Callable | None = None
    metrics: tuple[tuple[str, Any], ...] = ()  # (name, function or torchmetrics Metric), in the order given

    def described(self) -> dict[str, str]:
        """What summary.json records of them (the objects themselves live only in the caller's process)."""
        found = {"model": self.model, "loss": self.loss, **{f"metrics.{n}": m for n, m in self.metrics}}
        return {key: _describe(value) for key, value in found.items() if value is not None}

    def loss_fn(self, named: str | None) -> Callable | None:
        """The loss to train with: the object given, else train.loss imported, else None (the task's own)."""
        if self.loss is not None or named is None:
            return self.loss
        return import_callable(named, "train.loss")

    def metric_fns(self, named: dict[str, str]) -> dict[str, Any]:
        """Every validation metric by name: train.metrics' imported, then the objects given (those win)."""
        for name, path in named.items():
            if not isinstance(path, str):
                raise UserError(f"train.metrics.{name}: expected package.module:name, got {path!r}")
        for name in (*named, *dict(self.metrics)):
            if name in OWN_METRICS:
                key = f"train.metrics.{name}" if name in named else f"metrics[{name!r}]"
                raise UserError(f"{key}: val_{name} is rayscale's own validation metric, which this one would "
                                f"replace; give it another name")
        found = {name: import_callable(path, f"train.metrics.{name}") for name, path in named.items()}
        return {**found, **dict(self.metrics)}


def _describe(value: Any) -> str:
    named = getattr(value, "__qualname__", None) or type(value).__qualname__
    return f"{getattr(value, '__module__', None) or type(value).__module__}.{named}"


def import_path(value: Any) -> str | None:
    """`package.module:name` for a module-level function or class that imports back to `value` itself (so the
    config can name it, and config.yaml records it); None for a lambda, a nested function, an instance or
    anything defined in `__main__` (a script's or a notebook's), which travel pickled instead."""
    module, qualname = getattr(value, "__module__", None), getattr(value, "__qualname__", None)
    if not module or not qualname or module == "__main__" or "<" in qualname or "." in qualname:
        return None
    try:
        found = getattr(importlib.import_module(module), qualname, None)
    except Exception:
        return None
    return f"{module}:{qualname}" if found is value else None


def check_shippable(value: Any, argument: str) -> None:
    """A Python object handed to rayscale.train must reach the workers: pickled (by value where its module is
    `__main__`, a notebook's), or refused here with one line naming the argument."""
    import cloudpickle

    try:
        cloudpickle.dumps(value)
    except Exception as exc:
        raise UserError(f"{argument}: cannot be sent to the workers ({type(exc).__name__}: {first_line(exc)}); "
                        f"define it at module level without open files, locks or live connections, or name it "
                        f"in the config as package.module:name") from None
