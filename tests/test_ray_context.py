"""What a restarted Ray Train rank resumes from (rayscale/launch/ray_context.py), on checkpoint directories laid
out as Ray keeps them in a run's storage, without starting Ray."""

from __future__ import annotations

import pytest
import ray.train
from test_checkpoint import saved

from rayscale.engine import checkpoint
from rayscale.errors import UserError
from rayscale.launch.ray_context import whole_checkpoint

NAMES = ("checkpoint_2026-12-07_10-00-01.000001", "checkpoint_2026-12-07_10-00-09.500000",
         "checkpoint_2026-12-07_10-01-30.250000")


def _whole(directory, samples: int):
    """Two ranks' parts merged in one directory, as Ray's copies leave them."""
    directory.mkdir()
    for rank in (0, 1):
        (directory / f"rng_rank{rank}.pt").write_bytes(saved([rank]))
        if rank == 0:
            (directory / "state.pt").write_bytes(saved({"samples_seen": samples}))
        staging = directory.parent / f".staging{rank}"
        staging.mkdir()
        for name in [f"rng_rank{rank}.pt", *(["state.pt"] if rank == 0 else [])]:
            (staging / name).write_bytes((directory / name).read_bytes())
        checkpoint.write_manifest(staging, rank, 2)
        (directory / f"manifest_rank{rank}.json").write_bytes((staging / f"manifest_rank{rank}.json").read_bytes())
        for path in staging.iterdir():
            path.unlink()
        staging.rmdir()
    return directory


@pytest.fixture
def storage(tmp_path):
    """A run's storage: three whole checkpoints (Ray keeps the latest 3), its marker and snapshot files."""
    (tmp_path / ".validate_storage_marker").touch()
    (tmp_path / "checkpoint_manager_snapshot.json").write_text("{}")
    return [_whole(tmp_path / name, samples) for name, samples in zip(NAMES, (640, 1280, 1920), strict=True)]


def _resumed(latest, said: list[str]):
    with whole_checkpoint(ray.train.Checkpoint(str(latest)), say=said.append) as directory:
        return directory


def test_the_latest_checkpoint_when_it_is_whole_and_nothing_said(storage):
    said = []
    assert _resumed(storage[2], said) == storage[2]
    assert said == []


def test_a_latest_checkpoint_damaged_after_ray_registered_it_gives_way_to_the_whole_one_before_it(storage):
    (storage[2] / "state.pt").write_bytes(b"cut")  # an upload function that copied part of it, or a lost file
    said = []
    assert _resumed(storage[2], said) == storage[1]
    (line,) = said
    assert "state.pt has 3 of " in line and line.endswith(f"resuming from the whole checkpoint before "
                                                                    f"it, {NAMES[1]}")


def test_only_checkpoints_made_before_the_registered_one_are_candidates(storage, tmp_path):
    """One newer than Ray's latest was never registered (its upload was cut, or its report never arrived): a
    resume never takes it, whole or not; nor a directory that is not Ray's checkpoint."""
    _whole(tmp_path / "checkpoint_2026-12-07_10-02-00.000000", 2560)
    _whole(tmp_path / "not_a_checkpoint", 9999)
    (storage[1] / "manifest_rank1.json").unlink()
    (storage[2] / "rng_rank0.pt").unlink()
    said = []
    assert _resumed(storage[2], said) == storage[0]
    assert "rng_rank0.pt has None of " in said[0] and "rank 1's part is missing" in said[0]


def test_no_whole_checkpoint_left_is_one_error_naming_each_damage_and_the_way_out(storage):
    for directory in storage:
        (directory / "manifest_rank0.json").unlink()
    with pytest.raises(UserError) as raised:
        _resumed(storage[2], [])
    message = str(raised.value)
    assert message.startswith("no whole checkpoint to resume from: ") and message.count("never completed") == 3
    assert message.endswith("remove its run directory or pick another run.name")
