"""Patch a module once a process imports it, not before. A Ray `worker_process_setup_hook` runs in every process
of the job (task workers, Ray Data's, Train's controller); importing what it patches there, torch and Ray Train
among it, cost ~2.6 CPU-seconds per process and held up every one of them (2-core machine)."""

from __future__ import annotations

import importlib.abc
import importlib.util
import sys
from collections.abc import Callable
from types import ModuleType


class _PatchOnImport(importlib.abc.MetaPathFinder):
    def __init__(self, name: str, patch: Callable[[ModuleType], None]):
        self.name, self.patch = name, patch

    def find_spec(self, fullname, path, target=None):
        if fullname != self.name:
            return None
        sys.meta_path.remove(self)  # the other finders find it, as they would have without this one
        spec = importlib.util.find_spec(fullname)
        if spec is None or spec.loader is None:
            return spec
        exec_module = spec.loader.exec_module

        def exec_then_patch(module: ModuleType) -> None:
            exec_module(module)
            self.patch(module)

        spec.loader.exec_module = exec_then_patch  # this spec's own loader instance
        return spec


def on_import(name: str, patch: Callable[[ModuleType], None]) -> None:
    """Call `patch(module)` right after module `name` is first imported, or now if it already is."""
    if name in sys.modules:
        patch(sys.modules[name])
    else:
        sys.meta_path.insert(0, _PatchOnImport(name, patch))
