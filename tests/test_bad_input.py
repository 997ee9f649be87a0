"""The bad-input catalogue: each case through the real CLI entry point, in process.

Every case must: exit with code 2; print exactly one line on stderr, `rayscale: error: <key or file>: ...`,
naming what was expected; print no traceback; start no Ray (nothing is claimed on a cluster when the error is
knowable up front); and leave an existing run directory exactly as it was.
"""

from __future__ import annotations

import hashlib
import sys
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from rayscale import cli
from rayscale.errors import UserError
from rayscale.launch import trainer
from rayscale.launch.fit import check_cluster_fits
from rayscale.launch.trainer import user_error_inside


def _parquet(path: Path, rows: int = 64, row_group_size: int | None = None, **columns) -> str:
    rng = np.random.default_rng(0)
    table = {"f0": rng.standard_normal(rows), "f1": rng.standard_normal(rows), "label": np.arange(rows) % 2}
    table.update(columns)
    pq.write_table(pa.table(table), path, row_group_size=row_group_size)
    return str(path)


def _files(tmp: Path) -> dict[str, str]:
    """Inputs the cases point at, made once per test."""
    nan = np.random.default_rng(1).standard_normal(64)
    nan[5] = np.nan
    weights = np.ones(400)
    weights[7] = -0.5
    labels = np.arange(400) % 2
    labels[9] = 2
    (tmp / "corrupt.parquet").write_bytes(b"PAR1 this is not a parquet file")
    (tmp / "malformed.yaml").write_text("train:\n  epochs: [1, 2\n")
    (tmp / "notadir").write_text("a file where a directory is needed (root may write anywhere else)\n")
    return {
        "good": _parquet(tmp / "good.parquet", rows=400),
        "graded": _parquet(tmp / "graded.parquet", rows=400, hardness=np.arange(400) % 7,
                           note=np.array(["easy", "hard"] * 200)),
        "empty": _parquet(tmp / "empty.parquet", rows=0),
        "small": _parquet(tmp / "small.parquet", rows=40),
        "nan": _parquet(tmp / "nan.parquet", f0=nan),
        "negative_weight": _parquet(tmp / "negative_weight.parquet", rows=400, w=weights),
        "huge_weight": _parquet(tmp / "huge_weight.parquet", rows=400, w=np.where(np.arange(400) == 3, 1e38, 1.0)),
        "tiny_weights": _parquet(tmp / "tiny_weights.parquet", rows=400, w=np.full(400, 1e-40)),
        "zero_weights": _parquet(tmp / "zero_weights.parquet", rows=400, w=np.zeros(400)),
        "nan_weight": _parquet(tmp / "nan_weight.parquet", rows=400, w=np.where(np.arange(400) == 11, np.nan, 1.0)),
        "late_negative_weight": _parquet(tmp / "late.parquet", rows=400, row_group_size=100,
                                         w=np.where(np.arange(400) == 350, -2.0, 1.0)),
        "label_2": _parquet(tmp / "label_2.parquet", rows=400, label=labels),
        "negative_label": _parquet(tmp / "negative_label.parquet", rows=400, label=labels - 3 * (labels == 2)),
        "float_label": _parquet(tmp / "float_label.parquet", rows=400, label=np.arange(400) / 4),
        "huge_label": _parquet(tmp / "huge_label.parquet", rows=400, label=np.where(labels == 2, 10**12, labels)),
        "corrupt": str(tmp / "corrupt.parquet"),
        "same_name_twice": _same_name_twice(tmp / "same_name_twice.parquet"),
        "empty_sequence": _sequences(tmp / "empty_sequence.parquet", empty_at=30),
        "malformed": str(tmp / "malformed.yaml"),
        "notadir": str(tmp / "notadir"),
        "nan_yaml": str(_write(tmp / "nan.yaml", "optim:\n  momentum: nan\n")),
        "deep_yaml": str(_write(tmp / "deep.yaml", "a: " + "[" * 1000 + "]" * 1000 + "\n")),
        "models": str(_write(tmp / "bad_input_models.py", USER_MODELS)),  # importable: tmp is on sys.path
        "shipped": str(Path(__file__).resolve().parents[1] / "configs"),
    }


USER_MODELS = """
import torch

def strict(width=1):
    if width < 1:
        raise ValueError(f"width must be at least 1, got {width}")
    return torch.nn.Linear(64, 10)

def broken(**kwargs):
    return torch.nn.Linear(64, undefined_width)

def exits(**kwargs):
    raise SystemExit(0)

def gives_up(**kwargs):
    raise SystemExit("factory gave up")

def loss_exits(output, target):
    raise SystemExit(3)

def parses_its_own_arguments(**kwargs):
    import argparse

    parser = argparse.ArgumentParser(prog="factory")
    parser.add_argument("--width", required=True)
    parser.parse_args([])
"""


def _sequences(path: Path, empty_at: int) -> str:
    tokens = [[] if row == empty_at else [1, 2, 3][: 1 + row % 3] for row in range(64)]
    pq.write_table(pa.table({"tokens": pa.array(tokens, pa.list_(pa.int64())), "label": np.arange(64) % 2}), path)
    return str(path)


def _same_name_twice(path: Path) -> str:
    columns = [pa.array(np.arange(64.0)), pa.array(np.ones(64)), pa.array(np.arange(64) % 2)]
    pq.write_table(pa.Table.from_arrays(columns, names=["f0", "f0", "label"]), path)
    return str(path)


def _write(path: Path, text: str) -> Path:
    path.write_text(text)
    return path


# (id, command line with {placeholders}, fragments the error line must contain)
CASES = [
    ("malformed-yaml", ["train", "-c", "{malformed}"], ["malformed.yaml", "line"]),
    ("missing-config-file", ["train", "-c", "{tmp}/nope.yaml"], ["nope.yaml"]),
    ("unknown-key", ["train", "--set", "optim.lrr=0.1"], ["optim.lrr", "did you mean optim.lr?"]),
    # Each ended in a 3,000-line RecursionError, or named an empty key.
    ("config-nested-a-thousand-deep", ["train", "-c", "{deep_yaml}"], ["deep.yaml: values nested too deeply to read"]),
    ("set-without-a-key", ["train", "--set", "=3"], ["--set =3: expected a dotted key before '=', e.g. optim.lr=0.1"]),
    ("set-with-an-empty-part", ["train", "--set", "optim..lr=3"], ["--set optim..lr=3: expected a dotted key"]),
    ("init-from-a-device", ["train", "--set", "model.init_from=/dev/zero"],
     ["model.init_from: /dev/zero is not a regular file"]),
    ("wrong-type", ["train", "--set", "train.epochs=many"], ["train.epochs", "integer"]),
    ("zero-batch", ["train", "--set", "batch.global_batch_size=0"], ["batch.global_batch_size", "at least 1"]),
    ("negative-lr", ["train", "--set", "optim.lr=-1"], ["optim.lr", "greater than 0", "-1"]),
    ("zero-epochs", ["train", "--set", "train.epochs=0"], ["train.epochs", "at least 1"]),
    # Non-finite numbers: nan passes every range comparison, so each spelling is refused by name.
    ("nan-lr", ["train", "--set", "optim.lr=nan"], ["optim.lr: expected a finite number, got nan"]),
    ("yaml-nan-lr", ["train", "--set", "optim.lr=.nan"], ["optim.lr: expected a finite number, got nan"]),
    ("infinite-lr", ["train", "--set", "optim.lr=inf"], ["optim.lr: expected a finite number, got inf"]),
    ("nan-val-fraction", ["train", "--set", "data.val_fraction=nan"],
     ["data.val_fraction: expected a finite number, got nan"]),
    ("infinite-grad-clip", ["train", "--set", "train.grad_clip=inf"],
     ["train.grad_clip: expected a finite number, got inf"]),
    ("nan-in-a-yaml-file", ["train", "-c", "{nan_yaml}"], ["optim.momentum: expected a finite number, got nan"]),
    ("infinite-search-bound", ["tune", "--set", "tune.space={optim.lr: {loguniform: [0.01, .inf]}}"],
     ["tune.space.optim.lr: loguniform expects finite [low, high], got [0.01, inf]"]),
    ("infinite-epochs", ["train", "--set", "train.epochs=.inf"], ["train.epochs: expected an integer, got inf"]),
    ("nan-memory-budget", ["find-batch-size", "--memory-mb", "nan"], ["--memory-mb nan: expected a positive number"]),
    ("infinite-memory-budget", ["find-batch-size", "--memory-mb", "inf"], ["--memory-mb inf: expected a positive"]),
    # A controller that polls once in 30 years: a run that never reaches its next report.
    ("poll-interval-beyond-a-minute", ["train", "--set", "run.poll_interval_s=1e9"],
     ["run.poll_interval_s: expected a value of at most 60.0, got 1000000000.0"]),
    ("momentum-over-one", ["train", "--set", "optim.momentum=2"], ["optim.momentum: expected a value of at most 1.0"]),
    # A worker that reserves nothing is a bundle Ray refuses.
    ("zero-cpus-per-worker", ["train", "--set", "scaling.cpus_per_worker=0"],
     ["scaling.cpus_per_worker: expected a value greater than 0, got 0"]),
    # run.name is one directory inside run.output_dir, never a path out of it.
    *((f"run-name-{case}", ["train", "--set", f"run.name={name}"],
       ["run.name: expected a name inside run.output_dir", shown])
      for case, name, shown in (("empty", "", "got ''"), ("parent", "..", "got '..'"), ("sibling", "../x", "'../x'"),
                                ("absolute", "{tmp}/abs", "/abs'"), ("down-then-out", "a/../../b", "'a/../../b'"))),
    ("tune-run-name-outside", ["tune", "--set", "run.name=../search"], ["run.name: expected a name inside"]),
    ("empty-output-dir", ["train", "--set", "run.output_dir="],
     ["run.output_dir: expected a directory path, got an empty one"]),
    # Made absolute, an empty path was the working directory: every Parquet file under it was read (and a
    # storage path there written to).
    *((f"{command}-empty-{key.replace('.', '-').replace('_', '-')}", [command, "--set", f"{key}="],
       [f"{key}: expected {what}, got an empty value"])
      for command, key, what in (("train", "data.source", "a built-in source, a path or a URI"),
                                 ("train", "data.val_source", "a built-in source, a path or a URI"),
                                 ("train", "model.init_from", "a path or a URI"),
                                 ("train", "run.storage_path", "a path or a URI"),
                                 ("tune", "data.source", "a built-in source, a path or a URI"))),
    ("tune-empty-source-in-the-space", ["tune", "--set", "tune.space={data.source: {choice: [digits, '']}}"],
     ["data.source: expected a built-in source, a path or a URI, got an empty value"]),
    ("micro-batch-word", ["train", "--set", "batch.micro_batch_size=autoo"],
     ["batch.micro_batch_size", "expected a number, null or auto", "autoo"]),
    ("adaptive-step-without-milestones", ["train", "--set", "batch.adaptive=step"],
     ["batch.growth_every_samples", "batch.adaptive step needs it"]),
    ("adaptive-limit-below-the-batch", ["train", "--set", "batch.adaptive=step", "--set",
                                        "batch.growth_every_samples=1000", "--set", "batch.max_global_batch_size=64"],
     ["batch.max_global_batch_size 64", "at least batch.global_batch_size 128"]),
    ("unknown-strategy", ["train", "--set", "train.strategy=allreduce"], ["train.strategy", "parameter_server"]),
    ("unknown-ps-mode", ["train", "--set", "ps.mode=hogwild"], ["ps.mode", "sync, async"]),
    ("ps-without-workers", ["train", "--set", "train.strategy=parameter_server", "--set",
                            "scaling.num_workers=0"], ["scaling.num_workers", "parameter_server"]),
    ("ps-fp16", ["train", "--set", "train.strategy=parameter_server", "--set", "train.precision=fp16", "--set",
                 "scaling.use_gpu=true"], ["train.precision fp16", "parameter_server"]),
    ("ps-zero-servers", ["train", "--set", "ps.num_servers=0"], ["ps.num_servers", "at least 1"]),
    ("batch-not-micro-x-workers", ["train", "--set", "batch.global_batch_size=100", "--set",
                                   "batch.micro_batch_size=32"],
     ["batch.global_batch_size 100 is not micro_batch_size 32 x accumulation x 2 workers",
      "per-worker batch 50 is not a multiple of 32"]),
    ("batch-not-divisible-by-workers", ["train", "--set", "batch.global_batch_size=101"],
     ["batch.global_batch_size 101", "2 workers"]),
    ("micro-over-per-worker", ["train", "--set", "batch.micro_batch_size=128"],
     ["batch.micro_batch_size 128", "per-worker batch 64"]),
    ("more-workers-than-cpus", ["train", "--set", "scaling.num_workers=512", "--set", "batch.global_batch_size=512",
                                "--set", "batch.micro_batch_size=1", "--set", "run.name=wide"],
     ["scaling.num_workers: 512 workers", "CPUs need 512", "this machine has"]),
    ("gpus-not-there", ["train", "--set", "scaling.use_gpu=true"], ["scaling.use_gpu: 2 workers need 2 GPUs"]),
    ("data-path-missing", ["train", "--set", "data.source={tmp}/absent.parquet"],
     ["data.source: no Parquet file at", "absent.parquet"]),
    ("missing-feature-column", ["train", "--set", "data.source={good}", "--set", "data.features=[f0, f9]"],
     ["data.features: column 'f9' not in", "good.parquet"]),
    ("missing-label-column", ["train", "--set", "data.source={good}", "--set", "data.label=target"],
     ["data.label: column 'target' not in", "good.parquet"]),
    ("features-do-not-fit-model", ["train", "--set", "model.name=cnn"],
     ["model.name 'cnn': expects image input (C, H, W), got input shape (64,)"]),
    ("empty-dataset", ["train", "--set", "data.source={empty}"], ["data.source:", "empty.parquet has no rows"]),
    ("smaller-than-one-batch", ["train", "--set", "data.source={small}"],
     ["batch.global_batch_size: 128 is more than the", "training rows", "small.parquet"]),
    ("nan-features", ["train", "--set", "data.source={nan}"],
     ["data.features: column", "nan.parquet has NaN or infinite values (row 5)"]),
    # Per-row values no model should train on: the file, the column and the row (as the file counts it).
    ("negative-sample-weight", ["train", "--set", "data.source={negative_weight}", "--set", "data.weight=w"],
     ["data.weight: column 'w' in", "negative_weight.parquet has weight -0.5 (row 7); expected weights from 0 "
                                    "to below 1e+20"]),
    ("negative-weight-in-a-later-row-group", ["train", "--set", "data.source={late_negative_weight}", "--set",
                                              "data.weight=w"], ["late.parquet has weight -2 (row 350)"]),
    # Weights far from 1 overflowed the step's float32 weighted sum (NaN losses, exit 0) or underflowed it.
    ("huge-sample-weight", ["train", "--set", "data.source={huge_weight}", "--set", "data.weight=w"],
     ["data.weight: column 'w' in", "huge_weight.parquet has weight 1e+38 (row 3); expected weights from 0 to below "
                                    "1e+20 (a weighted loss is the same with every weight divided by one number: "
                                    "divide the column by its largest)"]),
    ("tiny-sample-weights", ["train", "--set", "data.source={tiny_weights}", "--set", "data.weight=w"],
     ["data.weight: the largest weight in column 'w' of data.source", "tiny_weights.parquet is 1e-40; expected it "
                                                                      "at least 1e-20"]),
    ("all-zero-sample-weights", ["train", "--set", "data.source={zero_weights}", "--set", "data.weight=w"],
     ["data.weight: every weight in column 'w' of data.source", "zero_weights.parquet is 0, so no row would count"]),
    ("nan-sample-weight", ["train", "--set", "data.source={nan_weight}", "--set", "data.weight=w"],
     ["data.weight: column 'w' in", "nan_weight.parquet has NaN or infinite values (row 11)"]),
    ("label-beyond-num-classes", ["train", "--set", "data.source={label_2}", "--set", "data.num_classes=2"],
     ["data.label: column 'label' in", "label_2.parquet has label 2 (row 9); expected classes 0 to 1 "
                                       "(data.num_classes 2)"]),
    ("negative-label", ["train", "--set", "data.source={negative_label}"],
     ["data.label: column 'label' in", "negative_label.parquet has label -1 (row 9); expected classes 0, 1, 2"]),
    ("num-classes-for-regression-targets", ["train", "--set", "data.source={float_label}", "--set",
                                            "data.num_classes=4"],
     ["data.num_classes: column 'label' in", "float_label.parquet is double, which holds regression targets"]),
    ("corrupt-parquet", ["train", "--set", "data.source={corrupt}"],
     ["data.source:", "corrupt.parquet is not a readable Parquet file"]),
    ("unknown-model", ["train", "--set", "model.name=resnet"], ["model.name:", "resnet"]),
    ("unknown-optimizer", ["train", "--set", "optim.name=adagrad"], ["optim.name", "adagrad", "sgd"]),
    ("unknown-schedule", ["train", "--set", "schedule.name=cyclic"], ["schedule.name", "cyclic", "cosine"]),
    ("model-import-fails", ["train", "--set", "model.name=no_such_package.models:build"],
     ["model.name 'no_such_package.models:build': cannot import no_such_package.models"]),
    ("upload-fn-import-fails", ["train", "--set", "run.checkpoint_upload_fn=no_such_package.upload:copy"],
     ["run.checkpoint_upload_fn: cannot import no_such_package.upload"]),
    # The model code's own error while it builds, on the driver: the key and the exception's message.
    ("builtin-kwarg-value", ["train", "--set", "model.kwargs.hidden_sizes=[-3]"],
     ["model.kwargs.hidden_sizes: expected entries of at least 1, got [-3]"]),
    # A layer of width 0 is one torch builds: it passes nothing on, and the model trains its head's bias alone.
    ("builtin-zero-width", ["train", "--set", "model.kwargs.hidden_sizes=[8, 0]"],
     ["model.kwargs.hidden_sizes: expected entries of at least 1, got [8, 0]"]),
    ("builtin-zero-feed-forward", ["train", "-c", "{shipped}/transformer_sequences.yaml", "--set",
                                   "model.kwargs.dim_feedforward=0"],
     ["model.kwargs.dim_feedforward: expected a number of at least 1, got 0"]),
    ("builtin-dropout-over-one", ["train", "--set", "model.kwargs.dropout=2"],
     ["model.kwargs.dropout: expected a probability in [0, 1), got 2"]),
    # Both trained without dropout, silently: the MLP adds its dropout layer where dropout > 0.
    ("builtin-negative-dropout", ["train", "--set", "model.kwargs.dropout=-0.5"],
     ["model.kwargs.dropout: expected a probability in [0, 1), got -0.5"]),
    ("builtin-nan-dropout", ["train", "--set", "model.kwargs.dropout=.nan"],
     ["model.kwargs.dropout: expected a probability in [0, 1), got nan"]),
    ("transformer-dropout-of-one", ["train", "-c", "{shipped}/transformer_sequences.yaml", "--set",
                                    "model.kwargs.dropout=1"], ["model.kwargs.dropout: expected a probability"]),
    ("builtin-unexpected-kwarg", ["train", "--set", "model.kwargs.hidden=-3"],
     ["model.kwargs.hidden: mlp does not take hidden (it takes hidden_sizes, dropout)"]),
    ("user-factory-refuses-its-kwargs", ["train", "--set", "model.name=bad_input_models:strict", "--set",
                                         "model.kwargs.width=-3"],
     ["model.kwargs: bad_input_models:strict(width=-3) raised ValueError: width must be at least 1, got -3"]),
    ("user-factory-unexpected-kwarg", ["train", "--set", "model.name=bad_input_models:strict", "--set",
                                       "model.kwargs.depth=2"],
     ["model.kwargs: strict(width=1) does not accept them"]),
    ("user-factory-bug", ["train", "--set", "model.name=bad_input_models:broken"],
     ["model.name 'bad_input_models:broken': bad_input_models:broken() raised NameError:", "undefined_width"]),
    # Code that exits: rayscale ended with its code (0, with no output at all) instead of naming the key.
    ("user-factory-exits", ["train", "--set", "model.name=bad_input_models:exits"],
     ["model.name 'bad_input_models:exits': bad_input_models:exits() raised SystemExit: 0"]),
    ("user-factory-exits-with-a-message", ["train", "--set", "model.name=bad_input_models:gives_up"],
     ["bad_input_models:gives_up() raised SystemExit: factory gave up"]),
    ("user-factory-parses-arguments", ["train", "--set", "model.name=bad_input_models:parses_its_own_arguments"],
     ["parses_its_own_arguments() raised SystemExit: 2 (it printed: factory: error: the following arguments are "
      "required: --width)"]),
    ("user-loss-exits", ["train", "--set", "train.loss=bad_input_models:loss_exits"],
     ["train.loss: failed on 2 rows of digits (SystemExit: 3)"]),
    ("unwritable-output-dir", ["train", "--set", "run.output_dir={notadir}/runs"],
     ["run.output_dir: cannot write to", "notadir"]),
    # Permission bits pass /proc for root (whom CI may run as); creating a directory there fails for everyone.
    ("output-dir-in-proc", ["train", "--set", "run.output_dir=/proc/rayscale-runs"],
     ["run.output_dir: cannot write to /proc (needed for /proc/rayscale-runs/"]),
    ("storage-path-in-proc", ["train", "--set", "run.storage_path=/proc/rayscale-storage"],
     ["run.storage_path: cannot write to /proc (needed for /proc/rayscale-storage)"]),
    # A decay schedule that ends above its peak: the lr grew over the run.
    ("final-lr-above-the-peak", ["train", "--set", "schedule.final_lr_ratio=2"],
     ["schedule.final_lr_ratio: expected a value of at most 1.0, got 2.0"]),
    ("invalid-tune-space", ["tune", "--set", "tune.space={optim.lr: {uniform: [1]}}"],
     ["tune.space.optim.lr: uniform expects [low, high]"]),
    # Values only building the model or the optimizer refuses: every trial failed with them, after Ray started.
    ("tune-space-betas-over-one", ["tune", "--set", "optim.name=adamw", "--set",
                                   "tune.space={optim.betas: {choice: [[0.9, 0.999], [1.5, 2.0]]}}"],
     ["tune.space.optim.betas: optim.betas=[1.5, 2.0] is not usable: optim.betas: expected two numbers in [0, 1)"]),
    ("tune-space-negative-width", ["tune", "--set", "tune.space={model.kwargs.hidden_sizes: {choice: [[64], [-3]]}}"],
     ["tune.space.model.kwargs.hidden_sizes: model.kwargs.hidden_sizes=[-3] is not usable: "
      "model.kwargs.hidden_sizes: expected entries of at least 1, got [-3]"]),
    # Values only the data refuse (a trial's own driver prepares them): every trial failed with them, after Ray
    # started, and the search ended with exit 0.
    ("tune-space-batch-above-the-rows", ["tune", "--set", "tune.space={batch.global_batch_size: {grid: [32, 4096]}}"],
     ["tune.space.batch.global_batch_size: batch.global_batch_size=4096 is not usable: batch.global_batch_size: "
      "4096 is more than the 1450 training rows of digits"]),
    ("tune-space-missing-source", ["tune", "--set", "tune.space={data.source: {choice: [digits, {tmp}/no.parquet]}}"],
     ["tune.space.data.source: data.source='", "/no.parquet' is not usable: data.source: no Parquet file at"]),
    ("tune-space-rows-a-combination-leaves", ["tune", "--set", "tune.space={data.val_fraction: {choice: [0.2, 0.9]}, "
                                              "batch.global_batch_size: {choice: [32, 256]}}"],
     ["tune.space.data.val_fraction + batch.global_batch_size: data.val_fraction=0.9, batch.global_batch_size=256 is "
      "not usable: batch.global_batch_size: 256 is more than the 176 training rows of digits"]),
    ("resume-nothing", ["tune", "--resume", "--set", "run.name=never-searched"], ["--resume: no search to resume"]),
    ("curriculum-on-digits", ["train", "--set", "data.curriculum_column=hardness"],
     ["data.curriculum_column: data.source digits has no columns"]),
    ("weight-column-on-digits", ["train", "--set", "data.weight=w"],
     ["data.weight: data.source digits has no columns; data.weight is for Parquet data"]),
    ("num-classes-on-synthetic", ["train", "--set", "data.source=synthetic", "--set", "data.num_classes=3"],
     ["data.num_classes: data.source synthetic has no columns"]),
    # A stray class id sized a head of a trillion outputs; the allocation's error blamed model.name.
    ("a-class-id-of-a-trillion", ["train", "--set", "data.source={huge_label}"],
     ["data.label: the largest class id in", "huge_label.parquet is 1,000,000,000,000", "(or set data.num_classes)"]),
    ("an-empty-sequence", ["train", "--set", "data.source={empty_sequence}", "--set", "data.sequence=tokens",
                           "--set", "model.name=transformer"],
     ["data.sequence: column 'tokens' in", "empty_sequence.parquet has an empty sequence (row 30); expected at least"]),
    ("a-column-name-twice", ["train", "--set", "data.source={same_name_twice}"],
     ["same_name_twice.parquet: more than one column named 'f0'; expected distinct column names"]),
    ("label-as-a-feature", ["train", "--set", "data.source={good}", "--set", "data.features=[f0, label]"],
     ["data.features: column 'label' is data.label; the label must not be an input"]),
    ("label-as-the-weight", ["train", "--set", "data.source={good}", "--set", "data.weight=label"],
     ["data.weight: column 'label' is also the label or a feature"]),
    ("no-features", ["train", "--set", "data.source={good}", "--set", "data.features=[]"],
     ["data.features: expected distinct column names, at least one", "got []"]),
    ("curriculum-column-missing", ["train", "--set", "data.source={good}", "--set", "data.curriculum_column=hardness"],
     ["data.curriculum_column: column 'hardness' not in", "good.parquet"]),
    ("curriculum-column-not-numeric", ["train", "--set", "data.source={graded}", "--set",
                                       "data.curriculum_column=note"],
     ["data.curriculum_column: column 'note' in", "graded.parquet is string, expected numbers"]),
    ("curriculum-column-as-feature", ["train", "--set", "data.source={graded}", "--set",
                                      "data.curriculum_column=hardness", "--set", "data.features=[f0, hardness]"],
     ["data.curriculum_column: column 'hardness' is also used as a feature"]),
    ("curriculum-fraction-over-one", ["train", "--set", "data.source={graded}", "--set",
                                      "data.curriculum_column=hardness", "--set", "data.curriculum_fraction=1.5"],
     ["data.curriculum_fraction: expected a share in (0, 1], got 1.5"]),
    ("online-source-not-a-directory", ["train", "--set", "data.source={good}", "--set", "data.online=true"],
     ["data.online: data.source must be a local directory", "good.parquet"]),
    ("online-with-a-decaying-schedule", ["train", "--set", "data.source={tmp}", "--set", "data.online=true"],
     ["schedule.name: cosine decays over the run's length", "set schedule.name=constant"]),
    ("fp16-on-cpu", ["train", "--set", "train.precision=fp16"], ["train.precision fp16 needs a GPU"]),
    ("other-config-in-run-dir", ["train", "--set", "run.name=existing", "--set", "optim.lr=0.5"],
     ["run.name existing:", "different 'optim' config"]),
    # A search written into a training run's directory, beside its model (and a run into a search's).
    ("search-in-a-run-dir", ["tune", "--set", "run.name=existing"],
     ["run.name existing:", "holds a training run (config.yaml); pick another run.name for the search"]),
]


def _snapshot(directory: Path) -> dict[str, str]:
    return {str(p.relative_to(directory)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(directory.rglob("*")) if p.is_file()}


@pytest.fixture
def existing_run(tmp_path) -> Path:
    """A finished run's directory that every case is pointed at (run.output_dir/run.name)."""
    from rayscale import config

    run_dir = tmp_path / "runs" / "existing"
    (run_dir / "checkpoints" / "checkpoint_0").mkdir(parents=True)
    cfg = config.load()
    cfg.run.output_dir, cfg.run.name = str(tmp_path / "runs"), "existing"
    (run_dir / "config.yaml").write_text(__import__("yaml").safe_dump(config.to_dict(cfg), sort_keys=False))
    (run_dir / "metrics.jsonl").write_text('{"samples_seen": 128, "train_loss": 2.1}\n')
    (run_dir / "summary.json").write_text('{"samples_seen": 17400}\n')
    (run_dir / "model.pt").write_bytes(b"\x00weights")
    (run_dir / "checkpoints" / "checkpoint_0" / "state.pt").write_bytes(b"\x00state")
    return run_dir


@pytest.mark.parametrize("args, fragments", [pytest.param(a, f, id=i) for i, a, f in CASES])
def test_bad_input_is_one_line_exit_2_nothing_claimed_nothing_written(args, fragments, tmp_path, existing_run,
                                                                    capsys, monkeypatch):
    monkeypatch.setattr(trainer, "connect", _no_cluster)
    _assert_refused(args, fragments, tmp_path, existing_run, capsys, monkeypatch)


# Known only by trying the cluster, and still refused before anything is claimed or written. Loopback only: a
# port that was free a moment ago has nothing listening.
UNREACHABLE = [
    ("train-address", ["train", "--address", "127.0.0.1:{port}"], {},
     ["--address 127.0.0.1:{port}: nothing answers at 127.0.0.1:{port} (Connection refused)"]),
    ("tune-address", ["tune", "--address", "127.0.0.1:{port}"], {}, ["--address 127.0.0.1:{port}: nothing answers"]),
    ("ray-address-variable", ["train"], {"RAY_ADDRESS": "127.0.0.1:{port}"},
     ["RAY_ADDRESS 127.0.0.1:{port}: nothing answers"]),
    ("client-address", ["train", "--address", "ray://127.0.0.1:{port}"], {},
     ["--address ray://127.0.0.1:{port}: nothing answers at 127.0.0.1:{port}"]),
    ("address-without-a-port-number", ["train", "--address", "127.0.0.1:head"], {},
     ["--address 127.0.0.1:head: expected host:port"]),
    ("address-without-a-port", ["train", "--address", "garbage!!"], {}, ["--address garbage!!: expected host:port"]),
    ("empty-address", ["tune", "--address", ""], {}, ["--address: expected host:port", "got an empty value"]),
    # MLflow's client retried for minutes, silent, after the run's first line.
    ("mlflow-server", ["train", "--set", "run.trackers=[mlflow]"], {"MLFLOW_TRACKING_URI": "http://127.0.0.1:{port}"},
     ["run.trackers: mlflow's MLFLOW_TRACKING_URI http://127.0.0.1:{port}: nothing answers (Connection refused)"]),
]


@pytest.mark.parametrize("args, env, fragments", [pytest.param(a, e, f, id=i) for i, a, e, f in UNREACHABLE])
def test_an_unreachable_cluster_is_one_line_exit_2_nothing_written(args, env, fragments, tmp_path, existing_run,
                                                                   capsys, monkeypatch):
    import ray

    from rayscale.launch.connect import free_loopback_port

    port = str(free_loopback_port())
    for name, value in env.items():
        monkeypatch.setenv(name, value.replace("{port}", port))
    # ray.init would retry an absent head for minutes, blocked inside Ray's C++ client where no Python timeout
    # reaches it: the refusal must come before it is called.
    monkeypatch.setattr(ray, "init", _no_ray_init)
    _assert_refused([a.replace("{port}", port) for a in args], [f.replace("{port}", port) for f in fragments],
                    tmp_path, existing_run, capsys, monkeypatch)


def _no_ray_init(*args, **kwargs):
    raise AssertionError("ray.init was called with an address where nothing listens")


def _assert_refused(args, fragments, tmp_path, existing_run, capsys, monkeypatch):
    import ray

    ray.shutdown()
    files = {**_files(tmp_path), "tmp": str(tmp_path)}
    argv = []
    for arg in args:
        for name, value in files.items():
            arg = arg.replace("{" + name + "}", value)
        argv.append(arg)
    if "run.output_dir" not in " ".join(argv):
        argv += ["--set", f"run.output_dir={tmp_path / 'runs'}"]
    if "run.name" not in " ".join(argv):  # a search is refused a training run's directory: it gets a new one
        argv += ["--set", "run.name=existing" if argv[0] != "tune" else "run.name=new-search"]
    monkeypatch.syspath_prepend(str(tmp_path))
    # Importing the user's module from tmp_path makes Python cache its bytecode there: the interpreter's write,
    # not rayscale's, kept out of what the test compares.
    monkeypatch.setattr(sys, "dont_write_bytecode", True)
    before, around = _snapshot(existing_run), sorted(tmp_path.iterdir())

    code = cli.main(argv)

    captured = capsys.readouterr()
    lines = captured.err.strip().splitlines()
    assert code == 2, captured.err
    assert len(lines) == 1 and lines[0].startswith("rayscale: error: "), captured.err
    assert "Traceback" not in captured.err + captured.out
    for fragment in fragments:
        assert fragment in lines[0], (fragment, lines[0])
    assert not ray.is_initialized()
    assert _snapshot(existing_run) == before
    assert sorted(p.name for p in (tmp_path / "runs").iterdir()) == ["existing"]  # no new run directory
    assert sorted(tmp_path.iterdir()) == around  # nor anything beside it


@pytest.mark.parametrize("command, key", [("train", "run.output_dir"), ("tune", "run.output_dir"),
                                          ("train", "run.storage_path")])
def test_a_run_name_that_is_a_symbolic_link_is_refused_and_nothing_is_written_where_it_points(
        command, key, tmp_path, capsys, monkeypatch):
    """A run writes only inside run.output_dir (and run.storage_path): a link there named as the run led the whole
    run (config.yaml, model.pt, checkpoints) to wherever it pointed, with exit 0."""
    import os

    import ray

    monkeypatch.setattr(trainer, "connect", _no_cluster)
    outside = tmp_path / "outside"
    outside.mkdir()
    parent = tmp_path / ("runs" if key == "run.output_dir" else "storage")
    parent.mkdir()
    os.symlink(outside, parent / "linked")
    argv = [command, "--set", f"run.output_dir={tmp_path / 'runs'}", "--set", "run.name=linked",
            *(["--set", f"run.storage_path={parent}"] if key == "run.storage_path" else [])]
    ray.shutdown()

    code = cli.main(argv)

    error = capsys.readouterr().err
    assert code == 2 and error.count("\n") == 1, error
    assert error.startswith(f"rayscale: error: run.name linked: {parent / 'linked'} is a symbolic link (to "
                            f"{outside}), and a run writes only inside {key}"), error
    assert not any(outside.iterdir()) and not ray.is_initialized()


def _no_cluster(*args, **kwargs):
    raise AssertionError("a cluster was asked for although the error was knowable up front")


def test_cluster_bigger_than_asked_is_checked_with_the_numbers(monkeypatch):
    """Joining a cluster: its resources are only known once connected; the check names both numbers."""
    import ray

    from rayscale import config

    monkeypatch.setattr(ray, "cluster_resources", lambda: {"CPU": 8.0, "GPU": 2.0})
    monkeypatch.setattr(ray._private.state.state, "get_max_resources_from_cluster_config", lambda: None)  # fixed
    cfg = config.load(overrides=["scaling.num_workers=4", "scaling.use_gpu=true", "batch.micro_batch_size=32"])
    with pytest.raises(UserError, match=r"scaling.use_gpu: 4 workers need 4 GPUs, the cluster has 2"):
        check_cluster_fits(cfg)
    cfg = config.load(overrides=["scaling.num_workers=16", "batch.global_batch_size=256",
                                 "batch.micro_batch_size=16"])
    with pytest.raises(UserError, match=r"16 workers x 1 CPUs need 16 CPUs, the cluster has 8"):
        check_cluster_fits(cfg)


def test_user_error_raised_inside_a_worker_is_found_through_rays_wrappers():
    from ray.exceptions import RayTaskError
    from ray.train.v2.api.exceptions import WorkerGroupError

    original = UserError("data.features: column 'f0' in x.parquet has NaN or infinite values (row 70000)")
    wrapped = RayTaskError("read", "Traceback ...", original).as_instanceof_cause()
    failure = WorkerGroupError("Training failed", worker_failures={0: RuntimeError("other"), 1: wrapped})
    assert user_error_inside(failure) is original
    assert user_error_inside(WorkerGroupError("x", worker_failures={0: RuntimeError("no")})) is None


def test_a_run_that_diverged_in_its_workers_ends_in_its_one_line_with_exit_1(monkeypatch, capsys):
    """A run whose loss stayed non-finite (train.max_nonfinite_steps) ended in Train's WorkerGroupError, an
    18-line traceback; the workers' own line says what to change. It is not bad input: exit 1, not 2."""
    from ray.train.v2.api.exceptions import WorkerGroupError

    from rayscale import api
    from rayscale.errors import NonFiniteError

    diverged = NonFiniteError("non-finite loss or gradients at step 5: 5 steps in a row were skipped")
    failure = WorkerGroupError("Training failed", worker_failures={0: diverged, 1: RuntimeError("peer gone")})
    assert user_error_inside(failure) is None
    assert user_error_inside(failure, NonFiniteError) is diverged

    def train(*args, **kwargs):
        raise NonFiniteError(str(diverged)) from failure  # as launch/trainer.py re-raises it

    monkeypatch.setattr(api, "train", train)
    assert cli.main(["train"]) == 1
    assert capsys.readouterr().err == f"rayscale: error: {diverged}\n"


@pytest.mark.parametrize("command", ["train", "tune"])
def test_a_model_the_machines_memory_cannot_hold_is_refused_before_ray_starts(command, tmp_path, existing_run, capsys,
                                                                              monkeypatch):
    from rayscale.launch import fit

    monkeypatch.setattr(fit, "available_memory", lambda: 1_500_000)  # the default MLP: 1.02 MB each at least
    _assert_refused([command], ["scaling.num_workers: 2 workers of a model of 85,002 parameters need at least "],
                    tmp_path, existing_run, capsys, monkeypatch)


# What Ray's memory monitor said when it killed a worker of a 1-billion-parameter MLP on 2 CPU workers (24 GiB).
RAY_MEMORY_KILL = ("1 worker(s) were killed due to the node running low on memory. Memory on the node (IP: "
                   "127.0.0.1, ID: 71d5024ba138f12fed0f96e36b1a09f15d1e2a751e290bac2833775e) was 22.74GB used / "
                   "23.54GB limit (0.9659)\nOOM kill reason: ...\nTop 10 memory users: PID\tMEM(GB)\tCOMMAND")


@pytest.mark.parametrize("how", ["controller", "worker"])
def test_a_run_whose_worker_ray_killed_for_memory_ends_in_one_line_naming_the_node_and_the_model(how, tmp_path,
                                                                                                 monkeypatch):
    """Ray's memory monitor killed a worker (a model too big for the node's memory): the driver ended in a
    traceback of Train's ControllerError carrying ~40 lines of Ray's process tables, and nothing of rayscale's.
    Killed as the group starts it is the controller's failure; killed in training, a worker's."""
    from types import SimpleNamespace

    from ray.exceptions import OutOfMemoryError
    from ray.train.v2.api.exceptions import ControllerError, WorkerGroupError

    from rayscale import config
    from rayscale.driver.prepare import prepare
    from rayscale.errors import WorkersOutOfMemory
    from rayscale.launch import trainer

    killed = OutOfMemoryError(RAY_MEMORY_KILL)
    failure = (ControllerError(killed) if how == "controller" else
               WorkerGroupError("Training failed", worker_failures={0: killed, 1: RuntimeError("peer gone")}))

    def fit():
        raise failure

    monkeypatch.setattr(trainer, "build_trainer", lambda *args, **kwargs: SimpleNamespace(fit=fit))
    prepared = prepare(config.load(overrides=[f"run.output_dir={tmp_path}", "model.kwargs.hidden_sizes=[100]"]))
    with pytest.raises(WorkersOutOfMemory) as raised:
        trainer._fit(prepared, tmp_path / "groups.jsonl", None, (), (), False, None, (0.0, 0.0, 0.0))
    assert str(raised.value) == (
        "the run failed: Ray killed one of its workers on node 127.0.0.1 (22.74GB used / 23.54GB limit), the node's "
        "memory nearly full; the model has 7,510 parameters (0.02865 MiB in float32; each worker also holds their "
        "gradients, the optimizer's state and a micro-batch's activations); expected a smaller model.*, "
        "batch.micro_batch_size (rayscale find-batch-size measures what fits) or fewer workers per node")
    assert raised.value.__cause__ is failure  # --debug shows Ray's own error


def test_another_failure_of_the_workers_keeps_its_traceback(tmp_path, monkeypatch):
    from types import SimpleNamespace

    from ray.train.v2.api.exceptions import WorkerGroupError

    from rayscale import config
    from rayscale.driver.prepare import prepare
    from rayscale.launch import trainer

    failure = WorkerGroupError("Training failed", worker_failures={0: RuntimeError("a bug of ours")})
    monkeypatch.setattr(trainer, "build_trainer",
                        lambda *args, **kwargs: SimpleNamespace(fit=lambda: (_ for _ in ()).throw(failure)))
    prepared = prepare(config.load(overrides=[f"run.output_dir={tmp_path}"]))
    with pytest.raises(WorkerGroupError) as raised:
        trainer._fit(prepared, tmp_path / "groups.jsonl", None, (), (), False, None, (0.0, 0.0, 0.0))
    assert raised.value is failure


def test_the_command_prints_the_memory_line_and_exits_1(monkeypatch, capsys):
    from rayscale import api
    from rayscale.errors import WorkersOutOfMemory

    def train(*args, **kwargs):
        raise WorkersOutOfMemory("the run failed: Ray killed one of its workers")

    monkeypatch.setattr(api, "train", train)
    assert cli.main(["train"]) == 1
    assert capsys.readouterr().err == "rayscale: error: the run failed: Ray killed one of its workers\n"


@pytest.mark.parametrize("job", ["train", "tune"])
def test_a_jobs_script_takes_debug_anywhere_and_shows_the_traceback(job):
    """jobs/<job>.py puts the command first, so --debug (the command line's flag, before the command) was an
    unknown argument of the command's."""
    import subprocess

    script = Path(__file__).resolve().parents[1] / "jobs" / f"{job}.py"
    plain = subprocess.run([sys.executable, str(script), "--set", "train.epochs=nan"], capture_output=True,
                           text=True, timeout=120)
    assert plain.returncode == 2 and plain.stderr == "rayscale: error: train.epochs: expected an integer, got 'nan'\n"
    debugged = subprocess.run([sys.executable, str(script), "--set", "train.epochs=nan", "--debug"],
                              capture_output=True, text=True, timeout=120)
    assert debugged.returncode == 1 and "Traceback (most recent call last)" in debugged.stderr
    assert debugged.stderr.rstrip().endswith("ConfigError: train.epochs: expected an integer, got 'nan'")


def test_output_read_by_a_reader_that_has_gone_ends_quietly():
    """`rayscale config keys | head`: once the reader has closed the pipe, the rest is dropped without a traceback."""
    import subprocess

    command = [str(Path(sys.executable).parent / "rayscale"), "config", "keys"]
    process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    process.stdout.close()  # before the command writes anything
    error = process.stderr.read().decode()
    assert process.wait(timeout=60) == 0 and "Traceback" not in error and "BrokenPipe" not in error, error


@pytest.mark.parametrize("argv, message", [
    (["suggest", "runs/x", "--max-batch", "nan"],
     "rayscale: error: suggest: argument --max-batch: invalid int value: 'nan' (see rayscale suggest --help)"),
    (["predict", "runs/x", "--data", "d", "--output", "o", "--workers", "x"],
     "rayscale: error: predict: argument --workers: invalid int value: 'x' (see rayscale predict --help)"),
    (["config", "show", "--set"], "rayscale: error: config show: argument --set: expected at least one argument "
                                  "(see rayscale config show --help)"),
    (["trian"], "rayscale: error: argument command: invalid choice: 'trian'"),
    ([], "rayscale: error: the following arguments are required: command (see rayscale --help)"),
])
def test_a_mistake_in_the_flags_is_one_line_exit_2_naming_the_command(argv, message, capsys):
    """argparse's own error printed the usage block before its message: several lines where every other bad
    input gets one."""
    with pytest.raises(SystemExit) as exited:
        cli.main(argv)
    assert exited.value.code == 2
    captured = capsys.readouterr()
    assert captured.out == ""
    assert captured.err.count("\n") == 1 and captured.err.startswith(message), captured.err
