"""Checkpoint integrity without Ray: a merged checkpoint is used only when every rank's part is whole."""

import pytest

from rayscale.engine import checkpoint


def _rank_part(directory, rank, world_size, files):
    directory.mkdir(exist_ok=True)
    for name, data in files.items():
        checkpoint.write_bytes_atomic(directory / name, data)
    checkpoint.write_manifest(directory, rank, world_size)


@pytest.fixture
def merged(tmp_path):
    """What Ray's copy of two ranks' staging directories into one checkpoint directory looks like."""
    parts = {0: {"state.pt": b"s" * 1000, "rng_rank0.pt": b"r" * 10}, 1: {"rng_rank1.pt": b"q" * 12}}
    merged = tmp_path / "checkpoint_000003"
    for rank, files in parts.items():
        staging = tmp_path / f"staging{rank}"
        _rank_part(staging, rank, 2, files)
        merged.mkdir(exist_ok=True)
        for path in staging.iterdir():
            (merged / path.name).write_bytes(path.read_bytes())
    return merged


def test_a_whole_checkpoint_verifies(merged):
    checkpoint.verify(merged)


def test_a_truncated_file_is_refused_by_name(merged):
    (merged / "state.pt").write_bytes(b"s" * 400)  # a copy cut short by a kill
    with pytest.raises(checkpoint.IncompleteCheckpoint, match="state.pt has 400 of 1000 bytes"):
        checkpoint.verify(merged)


def test_a_missing_file_is_refused(merged):
    (merged / "rng_rank0.pt").unlink()
    with pytest.raises(checkpoint.IncompleteCheckpoint, match="rng_rank0.pt has None of 10 bytes"):
        checkpoint.verify(merged)


def test_a_missing_rank_is_refused(merged):
    (merged / "manifest_rank1.json").unlink()
    with pytest.raises(checkpoint.IncompleteCheckpoint, match="rank 1's part is missing"):
        checkpoint.verify(merged)


def test_no_manifest_means_never_completed(tmp_path):
    (tmp_path / "state.pt").write_bytes(b"x")
    with pytest.raises(checkpoint.IncompleteCheckpoint, match="never completed"):
        checkpoint.verify(tmp_path)


def test_manifest_lists_only_the_ranks_own_finished_files(tmp_path):
    import json

    checkpoint.write_bytes_atomic(tmp_path / "state.pt", b"abc")
    (tmp_path / ".state.pt.tmp-123").write_bytes(b"partial")  # a temporary file is never listed
    checkpoint.write_manifest(tmp_path, 0, 1)

    assert json.loads((tmp_path / "manifest_rank0.json").read_text()) == {
        "rank": 0, "world_size": 1, "files": {"state.pt": 3}}


def test_a_fresh_staging_dir_drops_what_a_killed_attempt_left(tmp_path):
    stale = checkpoint.fresh_staging_dir(tmp_path / "run", 1) / "checkpoint-x"
    stale.mkdir()
    again = checkpoint.fresh_staging_dir(tmp_path / "run", 1)
    assert again == stale.parent and not any(again.iterdir())
    assert checkpoint.staging_dir(tmp_path / "run", 0) != again  # one per rank


def test_local_mode_keeps_the_checkpoints_completed_last_and_drops_a_crashs_leftover(tmp_path):
    import os

    for index in range(5):
        _rank_part(tmp_path / f"checkpoint-{index}", 0, 1, {"state.pt": b"s"})
        manifest = tmp_path / f"checkpoint-{index}" / checkpoint.MANIFEST.format(0)
        os.utime(manifest, ns=(10**18 + index, 10**18 + index))  # completed in index order, whatever the names
    (tmp_path / "checkpoint-half").mkdir()  # a part a crash left without its manifest
    (tmp_path / "other").mkdir()
    checkpoint.keep_latest(tmp_path, 3)
    assert sorted(path.name for path in tmp_path.iterdir()) == ["checkpoint-2", "checkpoint-3", "checkpoint-4",
                                                                "other"]
