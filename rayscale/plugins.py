"""User code named in the config as `package.module:name` (a model factory, a checkpoint upload function)."""

from __future__ import annotations

import importlib
from collections.abc import Callable

from rayscale.errors import UserError


def import_callable(dotted: str, where: str, kind: str = "function") -> Callable:
    """The callable `dotted` names; a one-line UserError starting with `where` otherwise."""
    module_name, _, attribute = dotted.partition(":")
    if not module_name or not attribute:
        raise UserError(f"{where}: expected package.module:{kind}")
    try:
        module = importlib.import_module(module_name)
    except Exception as exc:  # not only ImportError: the module's own code runs on import
        raise UserError(f"{where}: cannot import {module_name} ({first_line(exc)})") from exc
    found = getattr(module, attribute, None)
    if found is None:
        raise UserError(f"{where}: {module_name} has no attribute {attribute}")
    if not callable(found):
        raise UserError(f"{where}: {module_name}.{attribute} is not callable")
    return found


def first_line(exc: BaseException) -> str:
    return (str(exc).strip().splitlines() or ["(no message)"])[0]
