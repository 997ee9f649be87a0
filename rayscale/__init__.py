"""rayscale: Ray Data into Ray Train DDP workers with exact micro-batching, and Ray Tune's ASHA over them.

From Python: `rayscale.train(config) -> Result`, `rayscale.tune(config) -> SearchResult`,
`rayscale.load_model(run_dir)` (rayscale/api.py, docs/guide/python.md)."""

from rayscale.api import Result, SearchResult, connect, evaluate, predict, train, tune
from rayscale.errors import NonFiniteError, SearchFailed, UserError, WorkersOutOfMemory


def load_model(run_dir, device: str = "cpu", model=None):
    """The trained model of a finished run directory, in eval mode (rayscale/models/export.py); `model`: the
    module or factory again, for a run trained from a Python object."""
    from rayscale.api import check_argument_types, check_code_objects
    from rayscale.models.export import load_model as load

    check_argument_types(paths={"run_dir": run_dir})
    check_code_objects(model, None, None)
    return load(run_dir, device, model)


__all__ = ["NonFiniteError", "Result", "SearchFailed", "SearchResult", "UserError", "WorkersOutOfMemory", "connect",
           "evaluate", "load_model", "predict", "train", "tune"]
