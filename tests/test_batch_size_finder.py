"""`rayscale find-batch-size`: the search, the memory it counts, and the command (no Ray: the rows come straight
from the source). An out-of-memory error is injected by a model that refuses more than `limit` rows."""

import sys
import textwrap

import pytest
import torch

from rayscale import cli, config
from rayscale.tools import batch_size_finder
from rayscale.tools.batch_size_finder import Probe, largest_fitting, memory_per_sample

CRAMPED = textwrap.dedent('''
    import torch

    from rayscale.models import MLP


    class Cramped(MLP):
        def __init__(self, limit):
            super().__init__(in_features=64, num_outputs=10, hidden_sizes=(32,))
            self.limit = limit

        def forward(self, x):
            if len(x) > self.limit:
                raise torch.OutOfMemoryError(f"CUDA out of memory. Tried to allocate {len(x)} rows")
            return super().forward(x)


    def make(limit):
        return Cramped(limit)
''')


@pytest.fixture
def cramped(tmp_path, monkeypatch):
    (tmp_path / "finder_cramped.py").write_text(CRAMPED)
    monkeypatch.syspath_prepend(str(tmp_path))
    yield lambda limit: ["--set", "model.name=finder_cramped:make", "--set", f"model.kwargs={{limit: {limit}}}"]
    sys.modules.pop("finder_cramped", None)


def test_doubling_then_bisection_finds_the_exact_largest():
    tried = []

    def fits(size):
        tried.append(size)
        return size <= 37

    assert largest_fitting(fits, limit=1000) == 37
    assert tried == [1, 2, 4, 8, 16, 32, 64, 48, 40, 36, 38, 37]
    assert largest_fitting(lambda size: True, limit=100) == 100  # the cap, reached by a last partial doubling
    assert largest_fitting(lambda size: size <= 1, limit=1) == 1
    assert largest_fitting(lambda size: False, limit=100) is None


def test_memory_per_sample_is_the_slope_between_the_two_largest_that_fit():
    probes = [Probe(8, True, 10.0, 0), Probe(16, True, 12.0, 0), Probe(32, True, 16.0, 0), Probe(64, False, None, 0)]
    assert memory_per_sample(probes) == (pytest.approx(0.25), pytest.approx(8.0))
    assert memory_per_sample(probes[:1]) is None


def test_counted_activation_memory_matches_the_mlp_by_hand():
    """Default MLP on digits (64 -> 256 -> 256 -> 10, ReLU): per sample, the input (64 floats), two ReLU outputs
    (256 each: the next layer's saved input is the same storage, counted once), the log-softmax (10) and the
    label (one int64)."""
    cfg = config.load(overrides=["batch.micro_batch_size=null"])
    finding = batch_size_finder.find(cfg, limit=256)
    assert finding.largest == 256 and all(p.fits for p in finding.probes)
    slope, fixed = finding.per_sample
    assert slope * 2**20 == pytest.approx((64 + 256 + 256 + 10) * 4 + 8, rel=0.05)
    weights = sum(p.numel() for p in torch.nn.Sequential(torch.nn.Linear(64, 256), torch.nn.Linear(256, 256),
                                                          torch.nn.Linear(256, 10)).parameters())
    assert cfg.optim.name == "sgd" and cfg.optim.momentum > 0
    assert fixed * 2**20 == pytest.approx(weights * 4 * 3, rel=0.05)  # weights, gradients, momentum buffers


def test_activations_freed_by_backward_are_not_mistaken_for_gradients():
    """Backward frees the activations and the allocator hands their memory to the gradients: at 2,048 rows a
    2,048-wide activation has exactly a weight gradient's size. Counted by address after the step, the
    activations vanished (1,024 -> 2,048 rows grew 0.3 MiB instead of 16)."""
    cfg = config.load(overrides=["model.kwargs={hidden_sizes: [2048, 2048]}"])
    finding = batch_size_finder.find(cfg, limit=2048)
    peaks = [p.peak_mb for p in finding.probes]
    assert peaks == sorted(peaks)
    assert finding.per_sample[0] * 2**20 == pytest.approx((64 + 2048 + 2048 + 10) * 4 + 8, rel=0.02)


def test_a_cpu_budget_bounds_the_counted_memory():
    cfg = config.load()
    finding = batch_size_finder.find(cfg, limit=4096, memory_mb=1.5)
    fitted = {p.micro_batch_size: p for p in finding.probes if p.fits}
    assert 1 < finding.largest < 4096 and fitted[finding.largest].peak_mb <= 1.5
    assert not any(p.fits for p in finding.probes if p.micro_batch_size == finding.largest + 1)


def test_a_cpu_probe_predicted_past_the_budget_is_not_run(monkeypatch, capsys):
    """--max 1000000000 doubled on until a probe's step took 23 GiB and the kernel killed the process: a probe is
    run only where the line through the two largest that fit keeps it within the budget."""
    from rayscale.engine import step

    ran, real_step = [], step.train_step
    monkeypatch.setattr(step, "train_step", lambda model, batches, *a, **k: (
        ran.append(len(batches[0]["y"])), real_step(model, batches, *a, **k))[1])
    finding = batch_size_finder.find(config.load(), limit=10**9, memory_mb=1.5)
    skipped = [p for p in finding.probes if p.predicted_mb is not None]
    assert skipped and all(p.predicted_mb > 1.5 and not p.fits for p in skipped)
    assert sorted(ran) == sorted(p.micro_batch_size for p in finding.probes if p.predicted_mb is None)
    assert max(ran) < 4 * finding.largest  # the doubling stopped where the budget ran out, not at --max
    largest = max(p.micro_batch_size for p in finding.probes if p.fits)
    assert finding.largest == largest and not any(p.fits for p in finding.probes if p.micro_batch_size > largest)
    assert cli.main(["find-batch-size", "--max", "1000000000", "--memory-mb", "1.5"]) == 0
    assert "predicted, not run" in capsys.readouterr().out


def test_the_command_finds_the_injected_limit_and_names_the_micro_batch_to_use(cramped, capsys):
    assert cli.main(["find-batch-size", *cramped(37)]) == 0
    out = capsys.readouterr().out
    assert "largest micro-batch that fits: 37\n" in out
    assert "--set batch.micro_batch_size=32 (the largest divisor of the per-worker batch 64" in out
    assert cli.main(["find-batch-size", *cramped(37), "--max", "16"]) == 0
    assert "largest micro-batch that fits: 16 (the most tried" in capsys.readouterr().out


@pytest.mark.parametrize("extra, message", [
    pytest.param(["--max", "0"], "--max 0: expected a micro-batch of at least 1", id="max"),
    pytest.param(["--memory-mb", "-1"], "--memory-mb -1: expected a positive number of MiB", id="budget"),
    pytest.param(["--set", "train.precision=fp16"], "train.precision fp16 needs a GPU", id="fp16-on-cpu"),
    pytest.param(["--set", "data.source=/nonexistent/rows.parquet"], "data.source: no Parquet file at",
                 id="missing-data"),
    pytest.param(["--set", "model.kwargs={hidden_sizes: [0]}"], "model.kwargs", id="bad-model-kwargs"),
])
def test_bad_input_is_one_line(extra, message, capsys):
    """Refused in one line on stderr, before the banner that says what the probes will train."""
    assert cli.main(["find-batch-size", *extra]) == 2
    out, err = capsys.readouterr()
    assert message in err and err.count("\n") == 1 and out == ""


def test_nothing_fits_is_one_line(cramped, capsys):
    assert cli.main(["find-batch-size", *cramped(0)]) == 2
    err = capsys.readouterr().err
    assert "not even micro-batch 1 fits on cpu" in err and err.count("\n") == 1


@pytest.mark.skipif(torch.cuda.is_available(), reason="a GPU is here")
def test_use_gpu_without_one_is_one_line(capsys):
    assert cli.main(["find-batch-size", "--set", "scaling.use_gpu=true"]) == 2
    assert "scaling.use_gpu: no CUDA GPU on this machine" in capsys.readouterr().err
