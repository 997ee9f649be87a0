"""The one exception type users see.

Anything wrong with what the user gave us (config, data, paths, cluster size) raises `UserError` with a
single sentence that names the key or file and what was expected. The CLI prints it on one line and exits 2;
everything else is a bug and keeps its traceback.
"""


class UserError(Exception):
    """Bad input: printed as one line, exit code 2."""


class ConfigError(UserError):
    """A config key has a value we cannot use."""


class NonFiniteError(RuntimeError):
    """Training produced non-finite loss or gradients too many steps in a row."""
