"""The shipped configs: each one loads and `rayscale config show` prints it; the CNN, Transformer and Parquet
configs train end to end (local mode, small data); the GPU config fails cleanly on a machine without GPUs."""

import importlib.util
import json
import re
from pathlib import Path

import pytest
import yaml

from rayscale import cli, config
from rayscale.data import sources
from rayscale.math.batching import plan_batches

REPO = Path(__file__).resolve().parents[1]
CONFIG_DIR = REPO / "configs"
CONFIGS = sorted(CONFIG_DIR.glob("*.yaml"))
OUTPUT_FILES = ("config.yaml", "metrics.jsonl", "summary.json", "model.pt", "curves.png")


def _load_job(name: str):
    """Import jobs/<name>.py (jobs/ is a folder of scripts, not a package)."""
    spec = importlib.util.spec_from_file_location(name, REPO / "jobs" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def ray_cluster():
    """One embedded Ray for the slow tests of this module, started as `rayscale train` starts it (which then finds
    it running), and shut down afterwards so later modules start clean."""
    import ray

    from rayscale.launch.connect import connect

    if ray.is_initialized():  # left over from an earlier module
        ray.shutdown()
    connect(None)
    yield ray
    ray.shutdown()


# ------------------------------------------------------------------------------------------- fast checks

def test_the_expected_configs_are_shipped():
    names = {path.name for path in CONFIGS}
    assert {"digits_mlp.yaml", "cnn_synthetic_images.yaml", "transformer_sequences.yaml",
            "parquet_example.yaml", "gpu_bf16.yaml"} <= names


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.name)
def test_config_loads_and_shows_its_derived_values(path, capsys):
    cfg = config.load(path)
    assert cli.main(["config", "show", "-c", str(path)]) == 0
    shown = yaml.safe_load(capsys.readouterr().out)
    derived = shown.pop("derived")
    assert config.from_dict(shown) == cfg  # what is printed is what was loaded
    plan = plan_batches(cfg.batch.global_batch_size, cfg.batch.micro_batch_size, cfg.scaling.num_workers)
    assert derived["accumulation_steps"] == plan.accumulation_steps
    assert derived["micro_batch_size"] == plan.micro_batch_size


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.name)
def test_every_value_in_a_config_carries_a_comment(path):
    # `key: value` lines must explain the choice; bare section headers (`data:`) need not.
    for number, line in enumerate(path.read_text().splitlines(), start=1):
        if re.match(r"^\s*[A-Za-z_]\w*:\s*[^\s#]", line):
            assert " # " in line, f"{path.name}:{number} has no comment: {line.strip()}"


def test_digits_mlp_is_the_embedded_default_with_every_key_written_out():
    path = CONFIG_DIR / "digits_mlp.yaml"
    assert config.load(path) == config.load()

    every_key = {name: type_name for name, type_name, _, _ in config.describe()}

    def written(node: dict, prefix: str = "") -> set[str]:
        keys = set()
        for name, value in node.items():
            dotted = f"{prefix}{name}"
            is_section = isinstance(value, dict) and every_key.get(dotted) != "a mapping"  # not model.kwargs
            keys |= written(value, f"{dotted}.") if is_section else {dotted}
        return keys

    assert written(config.read_yaml(path)) == set(every_key)


def test_example_parquet_is_deterministic_and_split_over_files(tmp_path):
    import pyarrow.parquet as pq

    job = _load_job("write_example_parquet")
    job.main([str(tmp_path / "a"), "--rows", "100", "--files", "3", "--seed", "1"])
    written = job.write_example_parquet(tmp_path / "b", rows=100, files=3, seed=1)
    assert [p.name for p in written] == ["part-00000.parquet", "part-00001.parquet", "part-00002.parquet"]
    first, second = pq.read_table(tmp_path / "a"), pq.read_table(tmp_path / "b")
    assert first.equals(second)
    assert first.num_rows == 100
    assert first.column_names == [f"f{i}" for i in range(16)] + ["label", "weight"]
    assert str(first.schema.field("label").type) == "int64"
    assert not pq.read_table(job.write_example_parquet(tmp_path / "c", rows=100, seed=2)[0]).equals(
        pq.read_table(written[0]))  # another seed, other rows
    job.write_example_parquet(tmp_path / "b", rows=100, files=2, seed=1)  # fewer files: stale ones go
    assert sorted(p.name for p in (tmp_path / "b").iterdir()) == [job.MARKER, "part-00000.parquet",
                                                                  "part-00001.parquet"]  # no partial file left


@pytest.mark.parametrize("case, argv, message", [
    ("not-ours", ["{tmp}/mine"], "{tmp}/mine: is not empty and was not written by this script"),
    ("a-file", ["{tmp}/mine/notes.txt"], "{tmp}/mine/notes.txt: is a file; expected a directory"),
    ("under-a-file", ["{tmp}/mine/notes.txt/sub"], "{tmp}/mine/notes.txt/sub: cannot be created"),
    ("no-rows", ["{tmp}/new", "--rows", "0"], "--rows 0, --files 3: expected at least 1 file and a row per file"),
    ("no-files", ["{tmp}/new", "--files", "0"], "--rows 4000, --files 0: expected at least 1 file"),
])
def test_the_example_writer_refuses_in_one_line_and_leaves_the_users_files(case, argv, message, tmp_path, capsys):
    """A directory holding a user's part-00003.parquet lost it: the writer replaced and removed part files it had
    not written. Now it writes only into a new or empty directory, or one it wrote (its marker file)."""
    job = _load_job("write_example_parquet")
    mine = tmp_path / "mine"
    mine.mkdir()
    for name in ("part-00003.parquet", "notes.txt"):
        (mine / name).write_text(name)
    assert job.main([arg.format(tmp=tmp_path) for arg in argv]) == 2
    out, err = capsys.readouterr()
    assert err.startswith(f"write_example_parquet: error: {message.format(tmp=tmp_path)}")
    assert err.count("\n") == 1 and out == ""
    assert {p.name: p.read_text() for p in mine.iterdir()} == {n: n for n in ("part-00003.parquet", "notes.txt")}
    assert not (tmp_path / "new").exists()


# ------------------------------------------------------------------------------------------- end to end

def _train_locally(config_file: Path, output_dir: Path, *overrides: str) -> Path:
    """`rayscale train` in local mode (num_workers=0: the loop runs in this process) for one epoch."""
    argv = ["train", "-c", str(config_file), "--set", "scaling.num_workers=0", "--set", "train.epochs=1",
            "--set", f"run.output_dir={output_dir}"]
    for override in overrides:
        argv += ["--set", override]
    assert cli.main(argv) == 0
    cfg = config.load(config_file, overrides)
    return output_dir / cfg.run.name


def _check_run(run_dir: Path, total_rows: int) -> dict:
    import torch

    from rayscale.models import build_model

    for name in OUTPUT_FILES:
        assert (run_dir / name).is_file(), name
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["train_rows"] + summary["val_rows"] == total_rows
    assert summary["samples_seen"] == summary["train_rows"]  # one epoch, every training row exactly once
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert records and records[-1]["epoch_end"]
    saved = config.from_dict(yaml.safe_load((run_dir / "config.yaml").read_text()))
    spec = sources.inspect_source(saved.data.source, saved.data, saved.seed).spec
    model = build_model(saved.model, spec)
    model.load_state_dict(torch.load(run_dir / "model.pt", weights_only=True))  # strict: every key matches
    return summary


@pytest.mark.slow
@pytest.mark.parametrize("name, rows", [
    pytest.param("cnn_synthetic_images", 2048, id="cnn"),  # 16x16 images, 10 classes
    pytest.param("transformer_sequences", 1024, id="transformer"),  # sequences of 2..32 tokens, 4 tags
])
def test_synthetic_config_trains_end_to_end(name, rows, tmp_path, ray_cluster):
    run_dir = _train_locally(CONFIG_DIR / f"{name}.yaml", tmp_path, f"data.synthetic.rows={rows}")
    _check_run(run_dir, rows)


@pytest.mark.slow
def test_parquet_config_trains_end_to_end_on_its_two_workers_from_the_relative_path_it_names(
        tmp_path, ray_cluster, monkeypatch):
    """As the config's own comment says to run it: the example data written to data/example.parquet, then
    `rayscale train -c configs/parquet_example.yaml` from that directory. The config names its data by a relative
    path, and Ray Train runs each worker in a directory of its own: the path is made absolute where it was given."""
    job = _load_job("write_example_parquet")
    monkeypatch.chdir(tmp_path)
    job.write_example_parquet(Path("data/example.parquet"), rows=4000, files=3, seed=0)  # 25 steps an epoch
    assert config.load(CONFIG_DIR / "parquet_example.yaml").data.source == "data/example.parquet"
    assert cli.main(["train", "-c", str(CONFIG_DIR / "parquet_example.yaml"), "--set", "train.epochs=1",
                     "--set", "run.output_dir=runs", "--set", "run.max_failures=0"]) == 0
    run_dir = tmp_path / "runs" / "parquet_example"
    summary = _check_run(run_dir, 4000)
    assert summary["world_sizes"] == [2]
    assert summary["final"]["val_accuracy"] > 0.4  # four classes: well above chance after one epoch
    saved = yaml.safe_load((run_dir / "config.yaml").read_text())["data"]["source"]
    assert saved == str(tmp_path / "data" / "example.parquet")  # a resume from elsewhere reads the same files


@pytest.mark.slow
def test_gpu_config_fails_cleanly_without_a_gpu(tmp_path, capsys, ray_cluster):
    if ray_cluster.cluster_resources().get("GPU", 0):
        pytest.skip("this machine has a GPU")
    code = cli.main(["train", "-c", str(CONFIG_DIR / "gpu_bf16.yaml"), "--set", f"run.output_dir={tmp_path}"])
    assert code == cli.EXIT_BAD_INPUT
    (message,) = capsys.readouterr().err.strip().splitlines()  # one line, no traceback
    assert message.startswith("rayscale: error: scaling.use_gpu: ")
    assert "need 1 GPU" in message and "has 0" in message  # e.g. "1 workers need 1 GPUs, the cluster has 0"
    assert list(tmp_path.iterdir()) == []  # checked before anything is written
