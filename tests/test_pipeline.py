"""End to end through Ray: 2 gloo workers on loopback, Ray Data input, checkpoints, resume.

One embedded Ray for the module (started the way `rayscale train` starts it), so each test pays only for
its TorchTrainer.
"""

import json
import os
import sys
import textwrap

import pytest
import torch

from rayscale import config, trainer

pytestmark = pytest.mark.slow

FAULTY_MODEL = textwrap.dedent('''
    """A built-in MLP whose forward raises once, the first time a marker file exists at a given call."""
    import os

    from rayscale.models import MLP


    class FailOnce(MLP):
        calls = 0

        def forward(self, x):
            FailOnce.calls += 1
            marker = os.environ["RAYSCALE_TEST_FAIL_MARKER"]
            if FailOnce.calls == int(os.environ["RAYSCALE_TEST_FAIL_AT_CALL"]) and os.path.exists(marker):
                os.remove(marker)
                raise RuntimeError("injected failure")
            return super().forward(x)


    def make(**kwargs):
        return FailOnce(in_features=64, num_outputs=10, hidden_sizes=(256, 256))
''')


@pytest.fixture(scope="module")
def ray_session(tmp_path_factory):
    import ray

    plugin_dir = tmp_path_factory.mktemp("user_models")
    (plugin_dir / "faulty_model.py").write_text(FAULTY_MODEL)
    marker = plugin_dir / "fail.marker"
    # Workers inherit the driver's environment when the embedded Ray starts.
    os.environ["PYTHONPATH"] = os.pathsep.join([str(plugin_dir), os.environ.get("PYTHONPATH", "")])
    os.environ["RAYSCALE_TEST_FAIL_MARKER"] = str(marker)
    # Micro-batch 8 of 32 rows per worker: 4 forwards a step, so call 32 is step 8 of epoch 1, after the
    # checkpoint at 320 samples (step 5): the restart must resume mid-epoch, not from scratch.
    os.environ["RAYSCALE_TEST_FAIL_AT_CALL"] = "32"
    sys.path.insert(0, str(plugin_dir))
    ray.shutdown()
    trainer.connect(None, config.load())
    yield marker
    ray.shutdown()


def run(tmp_path, name, *overrides):
    cfg = config.load(overrides=[f"run.output_dir={tmp_path}", f"run.name={name}", "train.epochs=2",
                                 "batch.global_batch_size=64", *overrides])
    summary = trainer.train(cfg)
    return summary, torch.load(tmp_path / name / "model.pt")


def test_local_mode_trains_and_writes_outputs(ray_session, tmp_path):
    summary, _ = run(tmp_path, "local", "scaling.num_workers=0", "batch.micro_batch_size=16")
    run_dir = tmp_path / "local"
    for name in ("config.yaml", "metrics.jsonl", "summary.json", "model.pt", "curves.png"):
        assert (run_dir / name).stat().st_size > 0, name
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    losses = [r["train_loss"] for r in records if r["train_loss"] is not None]
    assert losses[-1] < losses[0] * 0.7  # it learned
    assert summary["samples_seen"] == 2 * summary["train_rows"]
    assert summary["rows_left_out"] == 0
    for key in ("step", "epoch", "samples_seen", "train_loss", "lr", "grad_norm", "samples_per_sec",
                "data_wait_fraction", "peak_memory_mb"):
        assert key in records[0], key
    assert records[-1]["val_accuracy"] > 0.5


@pytest.fixture(scope="module")
def reference(ray_session, tmp_path_factory):
    """Two workers, micro-batch 8 of a global 64 (4 accumulation steps per worker)."""
    tmp = tmp_path_factory.mktemp("reference")
    summary, model = run(tmp, "micro8", "batch.micro_batch_size=8", "run.checkpoint_every_samples=320")
    return tmp, summary, model


def test_two_workers_learn_and_count_every_row(reference):
    tmp, summary, _ = reference
    assert summary["world_size"] == 2
    assert summary["batch_plan"]["accumulation_steps"] == 4
    assert summary["samples_seen"] == 2 * summary["train_rows"]  # the partial last step is trained too
    assert summary["final"]["val_accuracy"] > 0.8


def test_same_config_and_seed_give_a_bitwise_identical_model(reference, tmp_path):
    _, _, model = reference
    _, again = run(tmp_path, "again", "batch.micro_batch_size=8", "run.checkpoint_every_samples=320")
    assert all(torch.equal(model[k], again[k]) for k in model)


def test_two_workers_micro_batch_size_does_not_change_the_model(reference, tmp_path):
    _, _, micro8 = reference
    _, micro32 = run(tmp_path, "micro32", "batch.micro_batch_size=32")  # no accumulation at 2 workers
    for key in micro8:
        assert torch.allclose(micro8[key], micro32[key], rtol=1e-4, atol=1e-5), key
    assert any(not torch.equal(micro8[k], micro32[k]) for k in micro8)  # different sums, same maths


def test_one_worker_micro_64_vs_8_at_global_64_and_bitwise_repeat(ray_session, tmp_path):
    _, full = run(tmp_path, "w1_micro64", "scaling.num_workers=1", "batch.micro_batch_size=64")
    _, accumulated = run(tmp_path, "w1_micro8", "scaling.num_workers=1", "batch.micro_batch_size=8")
    for key in full:
        assert torch.allclose(full[key], accumulated[key], rtol=1e-4, atol=1e-5), key
    _, repeat = run(tmp_path, "w1_micro8_again", "scaling.num_workers=1", "batch.micro_batch_size=8")
    assert all(torch.equal(accumulated[k], repeat[k]) for k in accumulated)


def test_failed_worker_restarts_from_checkpoint_and_matches(reference, ray_session, tmp_path):
    """A worker raises mid-epoch; FailureConfig restarts the group from the mid-epoch checkpoint."""
    _, _, expected = reference
    ray_session.write_text("fail once")
    summary, model = run(tmp_path, "retried", "batch.micro_batch_size=8", "run.checkpoint_every_samples=320",
                         "model.name=faulty_model:make", "run.max_failures=1")
    assert not ray_session.exists()  # the failure really happened
    assert summary["restarts"] == 1
    assert all(torch.equal(expected[k], model[k]) for k in expected)


def test_rerunning_the_same_command_resumes(reference, ray_session, tmp_path):
    _, _, expected = reference
    ray_session.write_text("fail once")
    args = ["batch.micro_batch_size=8", "run.checkpoint_every_samples=320", "model.name=faulty_model:make",
            "run.max_failures=0"]
    with pytest.raises(Exception, match="injected failure"):
        run(tmp_path, "rerun", *args)
    summary, model = run(tmp_path, "rerun", *args)
    assert summary["restarts"] == 1
    assert all(torch.equal(expected[k], model[k]) for k in expected)
    samples = [json.loads(x)["samples_seen"] for x in (tmp_path / "rerun" / "metrics.jsonl").read_text().splitlines()]
    assert samples == sorted(samples)  # lines logged after the checkpoint were replaced, not duplicated
