"""The layers the folders show: pure math (no torch, no Ray), the engine (torch, no Ray), the Ray layer. A lint
rule (ruff's banned-api, one ruff.toml per folder) refuses a Ray import where it does not belong, and the engine
really loads and trains without Ray."""

import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
RUFF = Path(sys.executable).parent / "ruff"


@pytest.mark.parametrize("path, source, refused", [
    ("rayscale/engine/loop.py", "import ray\n", True),
    ("rayscale/engine/components/new_feature.py", "def f():\n    from ray import train\n    return train\n", True),
    ("rayscale/engine/loop.py", "import torch\n", False),
    ("rayscale/math/schedules.py", "def f():\n    import torch.nn\n    return torch.nn\n", True),
    ("rayscale/math/schedules.py", "import ray.data\n", True),
    ("rayscale/data/splits.py", "import ray\n", True),
    ("rayscale/data/datasets.py", "import ray\n", False),  # the data layer's Ray code
    ("rayscale/driver/prepare.py", "import ray\n", True),
    ("rayscale/launch/trainer.py", "import ray\n", False),  # the Ray layer
])
def test_the_lint_rule_keeps_ray_and_torch_in_their_layers(path, source, refused):
    found = subprocess.run([str(RUFF), "check", "--select", "TID251", "--stdin-filename", path, "-"], input=source,
                           capture_output=True, text=True, cwd=REPO)
    assert (found.returncode != 0) == refused, found.stdout
    if refused:
        assert "TID251" in found.stdout


def test_the_engine_trains_without_ray_in_the_process(tmp_path):
    """The whole loop through the in-process context, in a fresh interpreter: Ray is never imported."""
    code = f"""
import sys
sys.path.insert(0, {str(REPO / "tests")!r})
from inprocess import train
run = train({str(tmp_path)!r}, "no_ray", "train.epochs=1", "data.source=synthetic", "data.synthetic.rows=256",
            "batch.global_batch_size=64")
assert run.summary["samples_seen"] == run.summary["train_rows"]
print("ray" in sys.modules, any(name.startswith("ray.") for name in sys.modules))
"""
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    assert out.stdout.strip().splitlines()[-1] == "False False"


def test_importing_the_engine_and_the_driver_imports_no_compiler():
    """torch.compile's Dynamo (~0.8 s of imports) loads only when something needs it (an optimizer, train.compile),
    never because a rayscale module was imported."""
    code = "import sys, rayscale.engine.loop, rayscale.launch.trainer, rayscale.cli; print('torch._dynamo' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    assert out.stdout.strip() == "False"

@pytest.mark.parametrize("command", ["train", "tune", "find-batch-size"])
def test_a_bad_config_is_refused_before_torch_or_ray_is_imported(command):
    """`rayscale train --set train.epochs=nan` (and tune, find-batch-size): the one-line error comes from the config
    alone, in a fraction of a second, not after ~1.5 s of importing torch and Ray."""
    code = f"""
import sys
from rayscale import cli
code = cli.main([{command!r}, "--set", "train.epochs=nan"])
print(code, "torch" in sys.modules, "ray" in sys.modules)
"""
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    assert out.stdout.strip() == "2 False False"
    assert out.stderr.strip() == "rayscale: error: train.epochs: expected an integer, got 'nan'"


def test_the_drivers_checks_before_ray_starts_load_no_compiler_and_leave_the_optimizer_class_as_it_was(tmp_path):
    """prepare builds the model and the optimizer to check them (~1.6 s more with Dynamo's imports); it still
    refuses what the workers could not build."""
    code = """
import sys, torch
from rayscale import config
from rayscale.driver.prepare import prepare
from rayscale.errors import UserError
decorated = torch.optim.Optimizer.add_param_group
prepare(config.load(overrides=["run.output_dir=%s/ok", "optim.name=adamw"]))
print("torch._dynamo" in sys.modules, torch.optim.Optimizer.add_param_group is decorated)
try:
    prepare(config.load(overrides=["run.output_dir=%s/frozen", "model.name=loop_models:frozen"]))
except UserError as error:
    print(error)
print("torch._dynamo" in sys.modules, torch.optim.Optimizer.add_param_group is decorated)
"""
    out = subprocess.run([sys.executable, "-c", code.replace("%s", str(tmp_path))], capture_output=True, text=True,
                         cwd=REPO, timeout=300, env={**os.environ, "PYTHONPATH": str(REPO / "tests")})
    assert out.returncode == 0, out.stderr[-3000:]
    assert out.stdout.strip().splitlines() == [
        "False True", "model: has no trainable parameters (every parameter has requires_grad=False)", "False True"]
