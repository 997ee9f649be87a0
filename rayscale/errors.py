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


class SearchFailed(RuntimeError):
    """A search that ran, but in which not one trial trained to a result: nothing to rank (`rayscale tune` exits
    1 with this line). `search_dir` and `trials` are what the search left, as a SearchResult would hold them."""

    def __init__(self, search_dir, trials: list[dict]):
        super().__init__(f"every trial of the search failed ({len(trials)} of {len(trials)}); Tune's table above "
                         f"names each one's error.txt, and {search_dir / 'trials.csv'} lists them")
        self.search_dir, self.trials = search_dir, trials
