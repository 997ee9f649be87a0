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
    run_dir = Path(run_dir)
    for name in (CONFIG_FILE, SUMMARY_FILE):
        if not (run_dir / name).is_file():
            raise UserError(f"{run_dir}: no {name}; expected the directory of a finished rayscale run")
    cfg = config_module.read_yaml(run_dir / CONFIG_FILE)
    summary = json.loads((run_dir / SUMMARY_FILE).read_text())
    if "data_spec" not in summary:
        raise UserError(f"{run_dir / SUMMARY_FILE}: no data_spec; the run was written by an older rayscale")
    given = summary.get("python_objects", {}).get("model")
    if given is not None and model is None:
        raise UserError(f"{run_dir}: the run's model was handed to rayscale.train as a Python object ({given}); "
                        f"pass it again: rayscale.load_model(run_dir, model=...)")
    spec = summary["data_spec"]
    built = build_model(config_module.from_dict(cfg).model, DataSpec(**{**spec, "input_shape": tuple(spec["input_shape"])}),
                        model)
    built.load_state_dict(read_weights(run_dir))
    return built.to(device).eval()


def read_weights(run_dir: Path) -> dict[str, torch.Tensor]:
    safetensors, pickled = run_dir / MODEL_SAFETENSORS_FILE, run_dir / MODEL_FILE
    if safetensors.is_file():
        from safetensors.torch import load_file

        return load_file(str(safetensors))
    if pickled.is_file():
        return torch.load(pickled, map_location="cpu", weights_only=True)
    raise UserError(f"{run_dir}: neither {MODEL_SAFETENSORS_FILE} nor {MODEL_FILE}; did the run finish?")
