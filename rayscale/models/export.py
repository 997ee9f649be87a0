"""A finished run's model outside rayscale: `model.safetensors` beside `model.pt`, and the model rebuilt from a run
directory (its config.yaml, the data's sizes in summary.json, the weights) by `rayscale.load_model`."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

import torch
from torch import nn

from rayscale import config as config_module
from rayscale.data.sources import DataSpec
from rayscale.errors import UserError
from rayscale.files import CONFIG_FILE, MODEL_FILE, MODEL_SAFETENSORS_FILE, SUMMARY_FILE
from rayscale.models.factory import build_model
from rayscale.plugins import first_line


def safetensors_bytes(weights: dict[str, torch.Tensor]) -> bytes:
    """`weights` as a safetensors file. Safetensors refuses tensors that share memory (tied weights): each one
    after the first gets its own copy, so loading gives the same values under every name."""
    from safetensors.torch import save

    seen: set[int] = set()
    own = {}
    for name, tensor in weights.items():
        tensor = tensor.detach().cpu().contiguous()
        storage = tensor.untyped_storage().data_ptr()
        own[name] = tensor.clone() if storage in seen and tensor.numel() else tensor
        seen.add(storage)
    return save(own, metadata={"format": "pt", "written_by": "rayscale"})


def load_model(run_dir: str | Path, device: str | torch.device = "cpu", model: nn.Module | Callable | None = None
               ) -> nn.Module:
    """The model a finished run trained, rebuilt from its directory: the class from config.yaml's `model`
    section (a user factory must be importable here too), sized by the data the run saw, with the weights of
    model.safetensors (model.pt where a run has no safetensors file). In eval mode, on `device`. `model`: for a
    run whose model was handed to rayscale.train as an object, the same module or factory again."""
    run_dir, device = Path(run_dir), usable_device(device)
    for name in (CONFIG_FILE, SUMMARY_FILE):
        if not (run_dir / name).is_file():
            raise UserError(f"{run_dir}: no {name}; expected the directory of a finished rayscale run")
    cfg = config_module.read_yaml(run_dir / CONFIG_FILE)
    summary = run_summary(run_dir)
    given = summary.get("python_objects", {}).get("model")
    if given is not None and model is None:
        raise UserError(f"{run_dir}: the run's model was handed to rayscale.train as a Python object ({given}); "
                        f"pass it again: rayscale.load_model(run_dir, model=...)")
    built = build_model(config_module.from_dict(cfg).model, run_spec(summary), model)
    load_fitting(built, read_weights(run_dir), f"{run_dir}: the run's weights do not fit "
                 + ("the model= given" if model is not None else "the model its config.yaml builds"))
    return built.to(device).eval()


def usable_device(name: str | torch.device, key: str = "device") -> torch.device:
    """`name` as a torch device, refused in one line (naming `key`) where torch cannot use it here."""
    if isinstance(name, bool) or not isinstance(name, str | torch.device):  # torch takes an int for an accelerator
        raise UserError(f"{key}: expected a device name such as cpu or cuda:0, got {type(name).__name__}")
    try:
        device = torch.device(name)
    except (RuntimeError, ValueError, TypeError) as exc:
        raise UserError(f"{key} {name}: {str(exc).splitlines()[0]}; expected cpu or cuda[:N]") from None
    if device.type == "mps" and not torch.backends.mps.is_available():
        raise UserError(f"{key} {name}: this machine has no MPS device; expected cpu or cuda[:N]")
    if device.type not in ("cpu", "cuda", "mps"):  # meta, xla...: no weights, or a device rayscale never runs on
        raise UserError(f"{key} {name}: expected cpu, cuda[:N] or mps")
    if device.type == "cuda" and (not torch.cuda.is_available() or (device.index or 0) >= torch.cuda.device_count()):
        raise UserError(f"{key} {name}: this machine has {torch.cuda.device_count()} CUDA device(s)")
    return device


def run_spec(summary: dict) -> DataSpec:
    """The data a finished run's model was sized for (summary.json's data_spec)."""
    spec = summary["data_spec"]
    return DataSpec(**{**spec, "input_shape": tuple(spec["input_shape"])})


def trained_features(run_dir: Path) -> tuple[str, ...]:
    """The Parquet feature columns a run's model read, by name, from its summary.json; () where it names none
    (a built-in source, sequences, a run written before summaries named them)."""
    try:
        names = json.loads((Path(run_dir) / SUMMARY_FILE).read_text()).get("feature_columns")
    except (ValueError, OSError, AttributeError):
        return ()
    return tuple(names) if isinstance(names, list) and all(isinstance(name, str) for name in names) else ()


def run_summary(run_dir: Path) -> dict:
    """A finished run's summary.json, with the data_spec its model was sized for; one line if it cannot be read."""
    try:
        summary = json.loads((run_dir / SUMMARY_FILE).read_text())
    except (ValueError, OSError) as exc:  # cut short (a run killed while writing it) or unreadable
        raise UserError(f"{run_dir / SUMMARY_FILE}: not readable JSON ({first_line(exc)}); expected the summary of "
                        f"a finished rayscale run") from None
    if not isinstance(summary, dict) or "data_spec" not in summary:
        raise UserError(f"{run_dir / SUMMARY_FILE}: no data_spec; the run was written by an older rayscale")
    return summary


def initial_weights(path: str | Path) -> dict[str, torch.Tensor]:
    """model.init_from's weights: a run directory's model, a checkpoint's, or a safetensors or torch file."""
    from rayscale.engine.checkpoint import STATE_FILE, read_state

    where = Path(path).expanduser()
    if where.is_dir():
        if (where / STATE_FILE).is_file():
            return read_state(where).model
        if (where / MODEL_SAFETENSORS_FILE).is_file() or (where / MODEL_FILE).is_file():
            return read_weights(where)
        raise UserError(f"model.init_from: {path} holds no {MODEL_SAFETENSORS_FILE}, {MODEL_FILE} or checkpoint "
                        f"({STATE_FILE}); expected a run directory, a checkpoint or a weights file")
    if not where.is_file():
        what = "is not a regular file" if where.exists() else "does not exist"  # /dev/zero, a socket
        raise UserError(f"model.init_from: {path} {what}; expected a run directory, a checkpoint or a weights file")
    try:
        if where.suffix == ".safetensors":
            from safetensors.torch import load_file

            return load_file(str(where))
        weights = torch.load(where, map_location="cpu", weights_only=True)
    except Exception as exc:
        raise UserError(f"model.init_from: cannot read {path} ({type(exc).__name__}: {first_line(exc)})") from None
    if not (isinstance(weights, dict) and all(isinstance(v, torch.Tensor) for v in weights.values())):
        raise UserError(f"model.init_from: {path} is not a state_dict (a mapping of names to tensors)")
    return weights


def start_from(model: nn.Module, path: str | Path) -> None:
    """Load model.init_from's weights into `model`."""
    load_fitting(model, initial_weights(path), f"model.init_from: {path} does not fit the model")


def load_fitting(model: nn.Module, weights: dict[str, torch.Tensor], misfit: str) -> None:
    """Load `weights` into `model`, every name and shape matching; else one line, `misfit` and which names and
    shapes differ (torch's own error is several lines, headed by the class's name only)."""
    own = model.state_dict()
    missing, unexpected = sorted(set(own) - set(weights)), sorted(set(weights) - set(own))
    wrong = [f"{name} {tuple(weights[name].shape)} vs {tuple(own[name].shape)}" for name in own
             if name in weights and weights[name].shape != own[name].shape]
    if missing or unexpected or wrong:
        said = [f"missing {', '.join(missing[:3])}" if missing else "",
                f"unexpected {', '.join(unexpected[:3])}" if unexpected else "",
                f"shapes {', '.join(wrong[:3])}" if wrong else ""]
        raise UserError(f"{misfit} ({'; '.join(s for s in said if s)})")
    model.load_state_dict(weights)


def read_weights(run_dir: Path) -> dict[str, torch.Tensor]:
    safetensors, pickled = run_dir / MODEL_SAFETENSORS_FILE, run_dir / MODEL_FILE
    for path in (safetensors, pickled):
        if not path.is_file():
            continue
        try:
            if path == safetensors:
                from safetensors.torch import load_file

                return load_file(str(path))
            return torch.load(path, map_location="cpu", weights_only=True)
        except Exception as exc:  # empty or cut short: a run killed while writing it
            raise UserError(f"{path}: cannot read the model's weights ({type(exc).__name__}: {first_line(exc)})"
                            ) from None
    raise UserError(f"{run_dir}: neither {MODEL_SAFETENSORS_FILE} nor {MODEL_FILE}; did the run finish?")
