"""The worked examples in examples/, each run as a user runs it: `python examples/<name>.py --output-dir DIR`
in a subprocess, from an empty working directory that must stay empty, with small settings. Then what the
run wrote is checked against the data by hand: the loss fell, masked tokens counted nowhere, the user's
metrics were logged."""

from __future__ import annotations

import importlib.util
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pyarrow.parquet as pq
import pytest
import torch
import torch.nn.functional as F

import rayscale

ROOT = Path(__file__).resolve().parents[1]
EXAMPLES = ROOT / "examples"


def run_example(name: str, tmp_path: Path, *args: str) -> tuple[str, Path]:
    """(stdout, the output directory) of `python examples/<name> --output-dir <tmp>/out ARGS`."""
    output_dir, cwd = tmp_path / "out", tmp_path / "cwd"
    cwd.mkdir()
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))}
    done = subprocess.run([sys.executable, str(EXAMPLES / name), "--output-dir", str(output_dir), *args],
                          cwd=cwd, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, f"{name} failed:\n{done.stdout[-4000:]}\n{done.stderr[-4000:]}"
    assert not any(cwd.iterdir()), f"{name} wrote into the working directory: {sorted(cwd.iterdir())}"
    return done.stdout, output_dir


def evaluations(run_dir: Path) -> list[dict]:
    lines = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return [line for line in lines if "val_loss" in line]


def load_example(name: str):
    spec = importlib.util.spec_from_file_location(name, EXAMPLES / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.slow  # 45-75 s on 2 cores, most of it starting 2 Ray Train workers
def test_the_hugging_face_causal_lm_trains_on_two_workers_with_its_prompts_masked(tmp_path):
    stdout, output_dir = run_example("hf_causal_lm.py", tmp_path, "--rows", "1000", "--epochs", "3",
                                     "--max-length", "12", "--workers", "2")
    run_dir = output_dir / "hf_causal_lm"
    assert (run_dir / "model.safetensors").is_file() and (run_dir / "metrics.jsonl").is_file()
    assert f"run directory: {run_dir}" in stdout
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["world_size"] == 2  # DDP over the user's Hugging Face model
    vocab_size = summary["data_spec"]["vocab_size"]
    logged = evaluations(run_dir)
    final = logged[-1]
    assert final["val_loss"] < logged[0]["val_loss"] and final["val_loss"] < math.log(vocab_size) / 10

    # The logged validation again by hand, over the example's own validation file, with the loaded model:
    # every label -100 left out of the sum and of the count. Counting the masked prompt tokens, or the padding,
    # in either would move it far off (the prompt's tokens are random: a loss near log(12) each).
    example = load_example("hf_causal_lm")
    model = rayscale.load_model(run_dir, model=example.build_causal_lm)
    table = pq.read_table(output_dir / "data" / "val.parquet")
    loss_sum, hits, count, masked = 0.0, 0, 0, 0
    with torch.no_grad():
        for tokens, labels in zip(table["tokens"].to_pylist(), table["labels"].to_pylist(), strict=True):
            logits, target = model(input_ids=torch.tensor([tokens])).logits[0], torch.tensor(labels)
            loss_sum += F.cross_entropy(logits, target, ignore_index=-100, reduction="sum").item()
            labelled = target != -100
            hits += int((logits.argmax(-1)[labelled] == target[labelled]).sum())
            count, masked = count + int(labelled.sum()), masked + int((~labelled).sum())
    assert masked == 3 * table.num_rows  # the two prompt labels and the last of every sequence
    assert final["val_loss"] == pytest.approx(loss_sum / count, rel=1e-4, abs=1e-6)
    assert final["val_accuracy"] == pytest.approx(hits / count, abs=1e-9)
    assert final["val_accuracy"] > 0.95  # every unmasked token follows from the ones before it


@pytest.mark.slow  # starts Ray (local mode still runs Ray Data): 19 s on 2 cores, 68 s while they were shared
def test_a_user_loss_and_torchmetrics_and_function_metrics_from_a_plain_script(tmp_path):
    stdout, output_dir = run_example("custom_loss_and_metrics.py", tmp_path, "--epochs", "8", "--workers", "0")
    run_dir = output_dir / "custom_loss_and_metrics"
    assert (run_dir / "model.safetensors").is_file() and (run_dir / "metrics.jsonl").is_file()
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["python_objects"] == {
        "loss": "__main__.smoothed_weighted_cross_entropy", "metrics.top2": "__main__.top2_hit",
        "metrics.f1": "torchmetrics.classification.f_beta.MulticlassF1Score"}
    logged = evaluations(run_dir)
    assert logged and all(0 <= line[name] <= 1 for line in logged for name in ("val_f1", "val_top2"))
    # Top-2 holds top-1, over the same real rows: never below val_accuracy.
    assert all(line["val_top2"] >= line["val_accuracy"] for line in logged)
    # A label-smoothed loss cannot go below the smoothed target's entropy (0.4999 for 0.1 over 10 classes),
    # however good the model: val_loss was the user's loss, weighted, not the built-in cross-entropy.
    floor = -(0.91 * math.log(0.91) + 9 * 0.01 * math.log(0.01))
    final = summary["final"]
    assert all(line["val_loss"] > floor for line in logged)
    assert final["val_accuracy"] > 0.9 and final["val_f1"] > 0.9
    assert all(f"{name}: {final[name]:.4f}" in stdout for name in ("val_loss", "val_accuracy", "val_f1", "val_top2"))


@pytest.mark.slow  # 25-40 s on 2 cores, most of it starting 2 Ray Train workers
def test_a_resnet_trains_on_png_files_read_with_read_images_on_two_workers(tmp_path):
    """The example draws 3 classes of PNG images, reads them with ray.data.read_images, preprocesses them in a
    map_batches of its own and trains its ResNet factory on 2 workers from the Datasets; the accuracy it logs
    is the one the loaded model gets on the validation files read by hand."""
    stdout, output_dir = run_example("image_resnet.py", tmp_path, "--images-per-class", "40", "--epochs", "4")
    run_dir = output_dir / "image_resnet"
    summary = json.loads((run_dir / "summary.json").read_text())
    assert (summary["train_rows"], summary["val_rows"], summary["world_sizes"]) == (120, 30, [2])
    assert summary["python_objects"] == {"model": "__main__.resnet", "train_data": "ray.data.Dataset (120 rows)",
                                         "val_data": "ray.data.Dataset (30 rows)"}
    assert summary["samples_seen"] == 4 * 120  # every image once per epoch
    accuracy = summary["final"]["val_accuracy"]
    assert accuracy >= 0.8  # stripes across, stripes down and squares: easy once trained
    assert f"val_accuracy: {accuracy:.4f}" in stdout
    assert f"by hand over 30 validation files: accuracy {accuracy:.4f}" in stdout
    assert len(list((output_dir / "image_resnet_pngs").glob("*/*/*.png"))) == 150
