"""Everything a resumed run needs to continue exactly, saved atomically and checked whole before use.

A checkpoint's state file holds the model (unwrapped from DDP), the optimizer, the GradScaler, the training
state (`state.TrainState`: position, counters, every component's part) and every RNG state that training draws
from. Each file is written to a temporary file and renamed into place, so a kill mid-write leaves the previous
file untouched.

A checkpoint is one directory merged from every rank's files (Ray copies each rank's staging directory into
it). Each rank writes its manifest last, naming its files and their sizes, and `verify` checks every rank's
manifest before a restore, and each torch file's records against their CRC-32: a directory left by a kill
during Ray's copy (Ray #41700), or a file damaged after it, is refused by name, never loaded. (Ray Train V2 also
registers a checkpoint only after every rank reported it, so a restart picks the previous whole one; a fault
test kills a worker inside that copy.)
"""

from __future__ import annotations

import hashlib
import json
import os
import random
import shutil
import tempfile
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.nn.parallel import DistributedDataParallel

from rayscale.engine.state import TrainState

STATE_FILE = "state.pt"
MANIFEST = "manifest_rank{}.json"
RNG_FILE = "rng_rank{}.pt"


class IncompleteCheckpoint(RuntimeError):
    """A checkpoint directory that is missing a file or holds a truncated one."""


def write_manifest(directory: str | Path, rank: int, world_size: int) -> None:
    """Last file a rank writes into its part of a checkpoint: its files and their sizes."""
    directory = Path(directory)
    files = {p.name: p.stat().st_size for p in sorted(directory.iterdir())
             if p.is_file() and not p.name.startswith((".", "manifest_"))}
    write_bytes_atomic(directory / MANIFEST.format(rank),
                       json.dumps({"rank": rank, "world_size": world_size, "files": files}).encode())


def verify(directory: str | Path) -> None:
    """Raise IncompleteCheckpoint unless every rank's manifest is there and every file it names is whole."""
    directory = Path(directory)
    first = directory / MANIFEST.format(0)
    if not first.exists():
        raise IncompleteCheckpoint(f"checkpoint {directory}: no {first.name} (written last, so the checkpoint "
                                   f"was never completed)")
    world_size = _manifest(directory, first)["world_size"]
    for rank in range(world_size):
        manifest = directory / MANIFEST.format(rank)
        if not manifest.exists():
            raise IncompleteCheckpoint(f"checkpoint {directory}: rank {rank}'s part is missing ({manifest.name})")
        for name, size in _manifest(directory, manifest)["files"].items():
            found = (directory / name).stat().st_size if (directory / name).exists() else None
            if found != size:
                raise IncompleteCheckpoint(f"checkpoint {directory}: {name} has {found} of {size} bytes")
            if name.endswith(".pt"):
                _check_archive(directory, name)


def _check_archive(directory: Path, name: str) -> None:
    """A torch.save file is a zip archive with a CRC-32 per record: a copy of the right size whose bytes were
    overwritten (a second writer still copying into a file another had cut short left zeros in its place) fails
    that check here, not torch.load's on every restart. A file checked whole before, unchanged since (the same
    size and modification time), is not read again: a restore verifies, then reads the state. Records saved
    without their CRC (torch.serialization.set_crc32_options(False) writes 0) are not checked."""
    path = directory / name
    stat = path.stat()
    signature = (str(path.resolve()), stat.st_size, stat.st_mtime_ns)
    if signature in _WHOLE_ARCHIVES:
        return
    try:
        with zipfile.ZipFile(path) as archive:
            for record in archive.infolist():
                if record.CRC == 0 and record.file_size:
                    continue
                with archive.open(record) as data:  # zipfile compares the CRC-32 at the end of the record
                    while data.read(1 << 24):
                        pass
    except zipfile.BadZipFile as error:  # what zipfile raises on a CRC mismatch too
        raise IncompleteCheckpoint(f"checkpoint {directory}: {name} is damaged ({error})") from None
    except (NotImplementedError, RuntimeError, ValueError, OSError, EOFError) as error:  # damaged headers
        raise IncompleteCheckpoint(f"checkpoint {directory}: {name} is damaged ({type(error).__name__}: "
                                   f"{error})") from None
    _WHOLE_ARCHIVES.add(signature)


_WHOLE_ARCHIVES: set[tuple[str, int, int]] = set()  # this process's archives found whole (path, size, mtime)


def _manifest(directory: Path, manifest: Path) -> dict:
    try:
        return json.loads(manifest.read_text())
    except (ValueError, UnicodeDecodeError) as error:  # written atomically: only a copy made elsewhere can cut it
        raise IncompleteCheckpoint(f"checkpoint {directory}: {manifest.name} is not whole ({error})") from None


def latest_local(directory: str | Path) -> Path | None:
    """Checkpoints kept in a run directory (local mode, the in-process context; Ray Train does not restore
    them): the complete one furthest into training under `directory`, or None."""
    best, best_samples = None, -1
    for path in sorted(Path(directory).glob("checkpoint-*")):
        try:
            verify(path)
        except IncompleteCheckpoint:
            continue
        samples = read_state(path).train_state.samples_seen
        if samples > best_samples:
            best, best_samples = path, samples
    return best


def keep_latest(directory: str | Path, count: int) -> None:
    """Local mode's retention, as Ray Train's num_to_keep elsewhere: the `count` checkpoints completed last
    under `directory` (by their rank-0 manifest, written last) stay; older ones, and parts a crash left
    incomplete, go. Called by the one process writing there, after its save."""
    completed = []
    for path in Path(directory).glob("checkpoint-*"):
        manifest = path / MANIFEST.format(0)
        if manifest.exists():
            completed.append((manifest.stat().st_mtime_ns, path))
        else:
            shutil.rmtree(path, ignore_errors=True)
    for _, path in sorted(completed)[:-count]:
        shutil.rmtree(path, ignore_errors=True)


def staging_dir(run_dir: str | Path, rank: int) -> Path:
    """Where a rank writes a checkpoint before Ray copies it to storage: local disk, one per run and rank, so
    a new attempt can remove what a killed one left (see `fresh_staging_dir`)."""
    key = hashlib.sha1(str(Path(run_dir).resolve()).encode()).hexdigest()[:12]
    return Path(tempfile.gettempdir()) / "rayscale-staging" / f"{key}-rank{rank}"


def fresh_staging_dir(run_dir: str | Path, rank: int) -> Path:
    path = staging_dir(run_dir, rank)
    shutil.rmtree(path, ignore_errors=True)  # left by a killed attempt: no live writer uses it now
    path.mkdir(parents=True)
    return path


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


@dataclass
class SavedState:
    """A checkpoint's state file, read."""

    model: dict[str, torch.Tensor]
    optimizer: dict
    scaler: dict | None
    rng: dict[str, Any]  # rank 0's RNG states at the save (each rank's own are in rng_rank<r>.pt)
    train_state: TrainState


def capture(model: torch.nn.Module, optimizer: torch.optim.Optimizer, scaler: torch.amp.GradScaler | None,
            train_state: TrainState) -> dict[str, Any]:
    """What rank 0 writes to STATE_FILE."""
    return {
        "model": unwrap(model).state_dict(),
        "optimizer": optimizer.state_dict(),
        "scaler": scaler.state_dict() if scaler is not None else None,
        "train_state": train_state.to_checkpoint(),
        "rng": rng_states(),
    }


def read_state(directory: str | Path) -> SavedState:
    """The state file of the checkpoint in `directory`, any version this rayscale reads."""
    path = Path(directory) / STATE_FILE
    raw = load(path)
    if "train_state" in raw:
        train_state = TrainState.from_checkpoint(raw["train_state"], str(directory))
    else:  # version 1: a `progress` dict, and the weight average beside the model
        train_state = TrainState.from_checkpoint({"version": 1, **raw["progress"]}, str(directory))
        if raw.get("average") is not None:
            train_state.parts["weight_average"] = {"weights": raw["average"]}
    return SavedState(raw["model"], raw["optimizer"], raw.get("scaler"), raw["rng"], train_state)


def restore(saved: SavedState, model: torch.nn.Module, optimizer: torch.optim.Optimizer,
            scaler: torch.amp.GradScaler | None) -> None:
    """Load the weights, optimizer, scaler and (rank 0's) RNG states into the live objects."""
    unwrap(model).load_state_dict(saved.model)
    optimizer.load_state_dict(saved.optimizer)
    if scaler is not None and saved.scaler is not None:
        scaler.load_state_dict(saved.scaler)
    set_rng_states(saved.rng)


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
