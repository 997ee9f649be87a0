"""Checkpoint integrity without Ray: a merged checkpoint is used only when every rank's part is whole."""

import io

import pytest
import torch

from rayscale.engine import checkpoint


def saved(value) -> bytes:
    """What torch.save writes (a zip archive, a CRC-32 per record)."""
    buffer = io.BytesIO()
    torch.save(value, buffer)
    return buffer.getvalue()


def _rank_part(directory, rank, world_size, files):
    directory.mkdir(exist_ok=True)
    for name, data in files.items():
        checkpoint.write_bytes_atomic(directory / name, data)
    checkpoint.write_manifest(directory, rank, world_size)


@pytest.fixture
def merged(tmp_path):
    """What Ray's copy of two ranks' staging directories into one checkpoint directory looks like."""
    parts = {0: {"state.pt": saved(torch.arange(1000.0)), "rng_rank0.pt": saved([1, 2])},
             1: {"rng_rank1.pt": saved([3, 4, 5])}}
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
    whole = (merged / "state.pt").read_bytes()
    (merged / "state.pt").write_bytes(whole[:400])  # a copy cut short by a kill
    with pytest.raises(checkpoint.IncompleteCheckpoint, match=f"state.pt has 400 of {len(whole)} bytes"):
        checkpoint.verify(merged)


def test_a_file_of_the_right_size_with_damaged_bytes_is_refused_by_its_crc(merged):
    """A second writer still copying into a file another had cut short leaves zeros where the start was."""
    whole = (merged / "state.pt").read_bytes()
    middle = len(whole) // 2
    (merged / "state.pt").write_bytes(whole[:middle] + bytes(100) + whole[middle + 100:])
    with pytest.raises(checkpoint.IncompleteCheckpoint, match=r"state.pt is damaged \(Bad CRC-32 for file "):
        checkpoint.verify(merged)
    (merged / "state.pt").write_bytes(whole)
    (merged / "rng_rank1.pt").write_bytes(bytes((merged / "rng_rank1.pt").stat().st_size))
    with pytest.raises(checkpoint.IncompleteCheckpoint, match=r"rng_rank1.pt is damaged \(File is not a zip file\)"):
        checkpoint.verify(merged)


def test_a_damaged_record_header_is_refused_and_records_saved_without_a_crc_are_not_checked(merged, monkeypatch):
    import zipfile

    whole = (merged / "state.pt").read_bytes()
    at = whole.index(b"PK\x01\x02")  # the first central directory entry: its compression method at +10
    (merged / "state.pt").write_bytes(whole[:at + 10] + b"\x63\x00" + whole[at + 12:])
    with pytest.raises(checkpoint.IncompleteCheckpoint, match=r"state.pt is damaged \(NotImplementedError: "):
        checkpoint.verify(merged)
    # torch.serialization.set_crc32_options(False): every record's CRC is 0, and the file is whole.
    torch.serialization.set_crc32_options(False)
    try:
        (merged / "state.pt").write_bytes(saved(torch.arange(1000.0)))
    finally:
        torch.serialization.set_crc32_options(True)
    manifest = merged / "manifest_rank0.json"
    manifest.write_text(manifest.read_text().replace(str(len(whole)), str((merged / "state.pt").stat().st_size)))
    assert all(record.CRC == 0 for record in zipfile.ZipFile(merged / "state.pt").infolist() if record.file_size)
    checkpoint.verify(merged)


def test_an_archive_found_whole_is_not_read_again_until_it_changes(merged, monkeypatch):
    import zipfile

    checkpoint.verify(merged)
    opened = []
    real = zipfile.ZipFile
    monkeypatch.setattr(zipfile, "ZipFile", lambda *a, **k: opened.append(a[0]) or real(*a, **k))
    checkpoint.verify(merged)  # a restore verifies, then reads: the second look reads nothing
    assert opened == []
    whole = (merged / "state.pt").read_bytes()
    (merged / "state.pt").write_bytes(whole[:len(whole) // 2] + bytes(50) + whole[len(whole) // 2 + 50:])
    with pytest.raises(checkpoint.IncompleteCheckpoint, match="state.pt is damaged"):
        checkpoint.verify(merged)


def test_a_missing_file_is_refused(merged):
    (merged / "rng_rank0.pt").unlink()
    with pytest.raises(checkpoint.IncompleteCheckpoint, match="rng_rank0.pt has None of [0-9]+ bytes"):
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


def test_a_cut_manifest_is_refused_by_name(merged):
    (merged / "manifest_rank1.json").write_text('{"rank": 1, "world_si')  # copied in part by an upload function
    with pytest.raises(checkpoint.IncompleteCheckpoint, match="manifest_rank1.json is not whole"):
        checkpoint.verify(merged)


def test_a_final_checkpoint_damaged_before_the_outputs_are_written_is_one_line_and_writes_nothing(tmp_path):
    """The driver writes model.pt and summary.json from the run's last checkpoint. Damaged after Ray registered
    it, the outputs stop in one line; running the command again trains on from the last whole one."""
    from inprocess import train

    from rayscale import config
    from rayscale.driver.outputs import write_outputs
    from rayscale.driver.prepare import prepare
    from rayscale.errors import UserError
    from rayscale.files import CHECKPOINTS_DIR, MODEL_FILE, SUMMARY_FILE

    run_dir = train(tmp_path, "run", "train.epochs=1", "data.source=synthetic", "data.synthetic.rows=512").run_dir
    final = checkpoint.latest_local(run_dir / CHECKPOINTS_DIR)
    for name in (MODEL_FILE, SUMMARY_FILE):
        (run_dir / name).unlink()
    whole = (final / "state.pt").read_bytes()
    (final / "state.pt").write_bytes(whole[:100] + bytes(100) + whole[200:])
    cfg = config.load(overrides=[f"run.output_dir={tmp_path}", "run.name=run", "train.epochs=1",
                                 "data.source=synthetic", "data.synthetic.rows=512"])
    with pytest.raises(UserError, match=r"state.pt is damaged .*: the run's last checkpoint is not whole, so no "
                                        r"output was written; run the same command again"):
        write_outputs(prepare(cfg), final, 0.0, first_step_at=None)
    assert not (run_dir / MODEL_FILE).exists() and not (run_dir / SUMMARY_FILE).exists()
