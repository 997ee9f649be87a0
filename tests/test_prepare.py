"""The driver's preparation of a run, without Ray: local paths made absolute where the user gave them (Ray Train
runs every worker, and Tune every trial, in a directory of its own), and the resume check that reads them."""

import os
from pathlib import Path

import pytest
import yaml
from parquet_fixtures import tabular, write

from rayscale import config
from rayscale.data.sources import absolute_source
from rayscale.driver.prepare import check_same_config, prepare, worker_payload
from rayscale.errors import UserError
from rayscale.files import CONFIG_FILE


@pytest.mark.parametrize("given, kept", [
    ("digits", True), ("synthetic", True), ("ray_dataset:train_data", True), ("s3://bucket/rows/", True),
    ("gs://bucket/rows/*.parquet", True), ("/data/rows.parquet", True),
    ("rows.parquet", False), ("data/../rows/*.parquet", False), ("~/rows.parquet", False),
])
def test_a_local_source_is_made_absolute_and_anything_else_is_kept(given, kept, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    made = absolute_source(given)
    if kept:
        assert made == given
    else:
        assert made == os.path.normpath(os.path.join(tmp_path, os.path.expanduser(given)))
        assert absolute_source(made) == made  # again: unchanged


def test_a_run_prepared_from_relative_paths_hands_its_workers_absolute_ones(tmp_path, monkeypatch):
    (tmp_path / "data").mkdir()
    write(tmp_path / "data" / "train.parquet", tabular(0, 300), row_group_size=100)
    write(tmp_path / "data" / "val.parquet", tabular(300, 100))
    monkeypatch.chdir(tmp_path)
    cfg = config.load(overrides=["data.source=data/train.parquet", "data.val_source=./data/val.parquet",
                                 "run.output_dir=runs", "run.storage_path=store", "batch.global_batch_size=32",
                                 "batch.micro_batch_size=null"])
    prepared = prepare(cfg)
    monkeypatch.chdir("/")  # where a worker runs: nothing relative may be left
    payload = worker_payload(prepared)
    assert payload.config["data"]["source"] == str(tmp_path / "data" / "train.parquet")
    assert payload.config["data"]["val_source"] == str(tmp_path / "data" / "val.parquet")
    assert payload.config["run"]["storage_path"] == str(tmp_path / "store")
    chunks = [*prepared.train.info.chunks, *prepared.val.info.chunks]
    assert chunks and all(os.path.isabs(chunk.path) and os.path.isfile(chunk.path) for chunk in chunks)


def test_a_run_saved_with_a_relative_source_still_resumes_and_one_saved_absolute_is_its_own_files(tmp_path,
                                                                                                monkeypatch):
    """A run in local mode saved data.source as given (relative) before the path was made absolute: resumed from
    where it ran, it is the same run. A run saved now names its files absolutely: the same relative name, given
    from another directory, is other files and another run."""
    for place in ("here", "there"):
        (tmp_path / place / "data").mkdir(parents=True)
        write(tmp_path / place / "data" / "train.parquet", tabular(0, 300))
    overrides = ["data.source=data/train.parquet", f"run.output_dir={tmp_path / 'runs'}", "run.name=old"]
    run_dir = tmp_path / "runs" / "old"
    (run_dir / "checkpoints" / "checkpoint-1").mkdir(parents=True)  # something to resume
    (run_dir / CONFIG_FILE).write_text(yaml.safe_dump(config.to_dict(config.load(overrides=overrides))))
    monkeypatch.chdir(tmp_path / "here")
    cfg = config.load(overrides=overrides)
    prepare(cfg)
    check_same_config(cfg, run_dir)  # the old run, resumed from where it ran

    (run_dir / CONFIG_FILE).write_text(yaml.safe_dump(config.to_dict(cfg)))  # as this version saves it
    assert yaml.safe_load((run_dir / CONFIG_FILE).read_text())["data"]["source"] == str(
        tmp_path / "here" / "data" / "train.parquet")
    check_same_config(cfg, run_dir)
    monkeypatch.chdir(tmp_path / "there")
    cfg = config.load(overrides=overrides)
    prepare(cfg)
    with pytest.raises(UserError, match="holds a run with a different 'data' config"):
        check_same_config(cfg, run_dir)


@pytest.mark.parametrize("saved", ["optim: [\n", "", "[1, 2]\n", "\udcff"])
def test_checkpoints_beside_a_config_that_cannot_be_read_are_not_resumed_under_another(saved, tmp_path):
    """A run directory whose config.yaml was damaged (cut short, emptied, not a mapping, not text): the run
    resumed its checkpoints under whatever config it was given, and wrote over the file."""
    cfg = config.load(overrides=[f"run.output_dir={tmp_path}", "run.name=damaged"])
    run_dir = tmp_path / "damaged"
    (run_dir / "checkpoints" / "checkpoint-1").mkdir(parents=True)
    (run_dir / CONFIG_FILE).write_bytes(saved.encode("utf-8", "surrogateescape"))
    with pytest.raises(UserError, match=f"^run.name damaged: {run_dir / CONFIG_FILE} is not a config rayscale can "
                                        f"read, so the checkpoints there cannot be matched"):
        check_same_config(cfg, run_dir)
    (run_dir / "checkpoints" / "checkpoint-1").rmdir()
    check_same_config(cfg, run_dir)  # no checkpoint: nothing to resume, the run starts over


def test_a_run_is_not_written_into_a_searchs_directory(tmp_path):
    cfg = config.load(overrides=[f"run.output_dir={tmp_path}", "run.name=search"])
    (tmp_path / "search").mkdir()
    (tmp_path / "search" / "search.yaml").write_text("{}\n")
    with pytest.raises(UserError, match=f"^run.name search: {tmp_path / 'search'} holds a search \\(search.yaml\\)"):
        check_same_config(cfg, tmp_path / "search")


def test_a_validation_source_with_other_feature_columns_is_refused_before_the_run(tmp_path):
    """Two features where training has three: the model's first layer could not read them (it failed in every
    worker, after Ray started)."""
    write(tmp_path / "train.parquet", tabular(0, 300))
    write(tmp_path / "val.parquet", tabular(300, 100).drop_columns(["b"]))
    cfg = config.load(overrides=[f"data.source={tmp_path / 'train.parquet'}", f"run.output_dir={tmp_path / 'runs'}",
                                 f"data.val_source={tmp_path / 'val.parquet'}", "batch.global_batch_size=32",
                                 "batch.micro_batch_size=null"])
    # Its columns are taken by the training data's names (data.features null): the one missing is named.
    with pytest.raises(UserError, match=r"^data.val_source: column 'b' not in .*val.parquet \(columns: a, w, label\); "
                                        r"expected the training data's feature columns by name \(a, b, w\)$"):
        prepare(cfg)
    assert not (tmp_path / "runs").exists()
    named = config.load(overrides=[f"data.source={tmp_path / 'train.parquet'}", f"run.output_dir={tmp_path / 'runs'}",
                                   f"data.val_source={tmp_path / 'val.parquet'}", "batch.global_batch_size=32",
                                   "batch.micro_batch_size=null", "data.features=[a, b, w]"])
    with pytest.raises(UserError, match=r"^data.features: column 'b' not in .*val.parquet"):
        prepare(named)


def test_a_storage_path_that_is_a_file_is_refused_before_the_run(tmp_path):
    (tmp_path / "a_file").write_text("")
    cfg = config.load(overrides=[f"run.output_dir={tmp_path / 'runs'}", f"run.storage_path={tmp_path / 'a_file'}"])
    with pytest.raises(UserError, match="run.storage_path: .*a_file is a file; expected a directory"):
        prepare(cfg)
    assert not (tmp_path / "runs").exists()


def _needs_a_gpu(output, batch):
    import torch.nn.functional as F

    return F.cross_entropy(output.cuda(), batch["y"].cuda(), reduction="none")  # a GPU worker's loss


def _needs_a_process_group(output, batch):
    import torch.distributed as dist

    return (output.argmax(dim=1) == batch["y"]).float() * dist.get_world_size()


def test_user_code_that_needs_the_workers_gpu_or_process_group_is_left_to_them(tmp_path):
    """The driver tries a user loss and metrics on two rows, but refuses only misfits the workers would meet too:
    what fails here for want of CUDA or a process group is not refused."""
    from rayscale.plugins import UserCode

    cfg = config.load(overrides=[f"run.output_dir={tmp_path}"])
    prepare(cfg, code=UserCode(loss=_needs_a_gpu, metrics=(("world", _needs_a_process_group),)))
    with pytest.raises(UserError, match=r"metrics\['bad'\]: failed on 2 rows of digits \(TypeError"):
        prepare(cfg, code=UserCode(metrics=(("bad", lambda output: output),)))


def test_where_a_run_can_write_is_tried_not_read_off_permission_bits(tmp_path):
    """/proc's bits let root (whom CI may run as) write; making a directory there fails for everyone. The probe
    leaves nothing behind."""
    from rayscale.files import can_write_in, nearest_existing

    assert can_write_in(tmp_path) and not any(tmp_path.iterdir())
    assert not can_write_in(tmp_path / "missing")
    (tmp_path / "a_file").write_text("")
    assert not can_write_in(tmp_path / "a_file")
    assert os.access("/proc", os.W_OK) == (os.geteuid() == 0) and not can_write_in(Path("/proc"))
    assert nearest_existing(tmp_path / "a" / "b") == tmp_path and nearest_existing(tmp_path) == tmp_path


def test_a_saved_attempt_is_a_checkpoint_where_ray_train_or_local_mode_keeps_them(tmp_path):
    from rayscale.driver.prepare import saved_attempt

    run_dir = tmp_path / "runs" / "a"
    plain = config.load(overrides=["run.name=a"])
    stored = config.load(overrides=["run.name=a", f"run.storage_path={tmp_path / 'store'}"])
    assert not saved_attempt(plain, run_dir) and not saved_attempt(stored, run_dir)
    (tmp_path / "store" / "a").mkdir(parents=True)
    (tmp_path / "store" / "a" / "checkpoint_manager_snapshot.json").write_text("{}")  # Ray's, with no checkpoint
    assert not saved_attempt(stored, run_dir)
    (tmp_path / "store" / "a" / "checkpoint_2026-12-07_07-00-00.000000").mkdir()
    assert saved_attempt(stored, run_dir) and not saved_attempt(plain, run_dir)
    (run_dir / "checkpoints" / "checkpoint-x1y2").mkdir(parents=True)  # local mode's
    assert saved_attempt(plain, run_dir)
    assert saved_attempt(config.load(overrides=["run.storage_path=s3://bucket/runs"]), tmp_path / "new")  # unseen


def test_an_elastic_batch_that_does_not_split_is_refused_with_the_multiple_every_count_splits(tmp_path):
    """[1, 3] workers: 100 does not split over 3. The batch plan at 3 workers said "use a multiple of 3", and
    99 was then refused for 2: the elastic rule, checked first, names 6."""
    cfg = config.load(overrides=["scaling.num_workers=[1, 3]", "batch.global_batch_size=100",
                                 "batch.micro_batch_size=null", f"run.output_dir={tmp_path}"])
    with pytest.raises(UserError, match=r"100 does not split over 3 workers, .*use a multiple of 6$"):
        prepare(cfg)


def test_a_run_given_a_tuple_in_model_kwargs_from_python_resumes_as_the_same_config(tmp_path):
    """config.yaml holds a list where the resumed config holds the tuple rayscale.train was given: the same run."""
    import dataclasses

    run_dir = tmp_path / "runs" / "tupled"
    (run_dir / "checkpoints" / "checkpoint-1").mkdir(parents=True)  # something to resume
    cfg = config.load(overrides=[f"run.output_dir={tmp_path / 'runs'}", "run.name=tupled"])
    cfg = dataclasses.replace(cfg, model=dataclasses.replace(cfg.model, kwargs={"hidden_sizes": (32, 16)}))
    (run_dir / CONFIG_FILE).write_text(yaml.safe_dump(config.to_dict(cfg)))
    check_same_config(cfg, run_dir)
