"""The one exception type users see.

Anything wrong with what the user gave us (config, data, paths, cluster size) raises `UserError` with a
single sentence that names the key or file and what was expected. The CLI prints it on one line and exits 2;
everything else is a bug and keeps its traceback. A message names an argument as the user gave it: a flag on
the command line, a parameter from Python (`argument`).
"""

from __future__ import annotations

import contextlib
import contextvars
from collections.abc import Iterator

from rayscale.files import TRIALS_TABLE

_ON_THE_COMMAND_LINE = contextvars.ContextVar("rayscale_on_the_command_line", default=False)


@contextlib.contextmanager
def on_the_command_line() -> Iterator[None]:
    """Messages name arguments as flags (`--data`) while this lasts: the `rayscale` command sets it."""
    token = _ON_THE_COMMAND_LINE.set(True)
    try:
        yield
    finally:
        _ON_THE_COMMAND_LINE.reset(token)


def argument(name: str) -> str:
    """An argument as the user gave it, for a message: `--output` on the command line, `output` from Python."""
    return f"--{name.replace('_', '-')}" if _ON_THE_COMMAND_LINE.get() else name


def give(name: str) -> str:
    """How to hand an argument in, for a message: `give --output` on the command line, `pass output=` from
    Python."""
    return f"give {argument(name)}" if _ON_THE_COMMAND_LINE.get() else f"pass {name}="


class UserError(Exception):
    """Bad input: printed as one line, exit code 2."""


class ConfigError(UserError):
    """A config key has a value we cannot use."""


class UserCodeError(UserError, ValueError):
    """The user's loss or metric broke its contract with rayscale (a reduced loss, a value per batch instead of
    per sample): the same code fails the same way on every retry, so a worker that raises it ends the run."""


class NonFiniteError(RuntimeError):
    """Training produced non-finite loss or gradients too many steps in a row."""


class WorkersOutOfMemory(RuntimeError):
    """The run failed because Ray's memory monitor killed one of its workers (the node's memory nearly full), and
    Train gave up on it: not bad input, but one line saying so, not Ray's tables of processes."""


class SearchFailed(RuntimeError):
    """A search that ran, but in which not one trial trained to a result: nothing to rank (`rayscale tune` exits
    1 with this line). `search_dir` and `trials` are what the search left, as a SearchResult would hold them."""

    def __init__(self, search_dir, trials: list[dict]):
        super().__init__(f"every trial of the search failed ({len(trials)} of {len(trials)}); Tune's table above "
                         f"names each one's error.txt, and {search_dir / TRIALS_TABLE} lists them")
        self.search_dir, self.trials = search_dir, trials


def user_error_inside(exc: BaseException, kind: type[Exception] | tuple[type[Exception], ...] = UserError
                      ) -> Exception | None:
    """The UserError (or other `kind`, or one of several) a training failure carries, itself and not one of
    Ray's wrappers of it."""
    return next((error for error in errors_inside(exc)
                 if isinstance(error, kind) and not isinstance(getattr(error, "cause", None), BaseException)), None)


def errors_inside(exc: BaseException) -> Iterator[BaseException]:
    """`exc` and every exception it carries: Ray wraps a worker's (or a Ray Data task's) exception in
    RayTaskError (`.cause`), Train in WorkerGroupError (`.worker_failures`) or ControllerError."""
    stack, seen = [exc], set()
    while stack:
        error = stack.pop()
        if error is None or id(error) in seen:
            continue
        seen.add(id(error))
        yield error
        cause = getattr(error, "cause", None)
        stack += [cause if isinstance(cause, BaseException) else None, error.__cause__, error.__context__,
                  getattr(error, "controller_failure", None),
                  *(getattr(error, "worker_failures", None) or {}).values()]
