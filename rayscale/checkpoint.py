"""Everything a resumed run needs to continue exactly, saved atomically.

A checkpoint holds the model (unwrapped from DDP), optimizer, GradScaler, the training position (samples
seen, step, epoch, step within the epoch) and every RNG state that training draws from. It is written to a
temporary file and renamed into place, so a kill mid-write leaves the previous file untouched, never a
half-written one that a restore would pick.
"""

from __future__ import annotations

import os
import random
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.nn.parallel import DistributedDataParallel

STATE_FILE = "state.pt"


def unwrap(model: torch.nn.Module) -> torch.nn.Module:
    return model.module if isinstance(model, DistributedDataParallel) else model


def rng_states() -> dict[str, Any]:
    states = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        states["cuda"] = torch.cuda.get_rng_state_all()
    return states


def set_rng_states(states: dict[str, Any]) -> None:
    random.setstate(states["python"])
    np.random.set_state(states["numpy"])
    torch.set_rng_state(states["torch"])
    if "cuda" in states and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(states["cuda"])


def capture(model: torch.nn.Module, optimizer: torch.optim.Optimizer,
            scaler: torch.amp.GradScaler | None, progress: dict[str, Any]) -> dict[str, Any]:
    return {
        "model": unwrap(model).state_dict(),
        "optimizer": optimizer.state_dict(),
        "scaler": scaler.state_dict() if scaler is not None else None,
        "progress": dict(progress),
        "rng": rng_states(),
    }


def restore(state: dict[str, Any], model: torch.nn.Module, optimizer: torch.optim.Optimizer,
            scaler: torch.amp.GradScaler | None) -> dict[str, Any]:
    """Load `state` into the live objects; returns the training position."""
    unwrap(model).load_state_dict(state["model"])
    optimizer.load_state_dict(state["optimizer"])
    if scaler is not None and state.get("scaler") is not None:
        scaler.load_state_dict(state["scaler"])
    set_rng_states(state["rng"])
    return dict(state["progress"])


def save_atomic(obj: Any, path: str | Path) -> None:
    """torch.save to `path` via a temporary file, fsync and rename: readers see the old file or the new one."""
    _write_atomic(path, lambda handle: torch.save(obj, handle))


def write_bytes_atomic(path: str | Path, data: bytes) -> None:
    """`data` to `path` the same way: never a half-written file."""
    _write_atomic(path, lambda handle: handle.write(data))


def _write_atomic(path: str | Path, write) -> None:
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    with open(tmp, "wb") as handle:
        write(handle)
        handle.flush()
        os.fsync(handle.fileno())
    os.replace(tmp, path)


def load(path: str | Path) -> dict[str, Any]:
    # weights_only=False: the state holds RNG tuples and numpy arrays, and it is our own file.
    return torch.load(Path(path), map_location="cpu", weights_only=False)
