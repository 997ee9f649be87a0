"""What only a CUDA device can show: batches reach it through page-locked memory, a step with a fused optimizer
never waits for the device however many micro-batches it has (the non-finite guard's flag stays there), and
bf16 / fp16 autocast train there.

Skipped without CUDA (CI has none); benchmarks/gpu_check.sh runs this file on a lent GPU machine."""

import warnings

import numpy as np
import pytest
import torch
from torch import nn

from rayscale.data.collate import collate
from rayscale.engine.precision import make_precision
from rayscale.engine.step import train_step

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")

CPU, CUDA = torch.device("cpu"), torch.device("cuda")


def _read_only(array: np.ndarray) -> np.ndarray:
    array.flags.writeable = False  # as Arrow's buffers and the worker cache arrive
    return array


@pytest.mark.parametrize("rows", [
    # fixed-length token sequences from Arrow: a 2-D integer array, every position real
    pytest.param({"x": np.arange(12).reshape(3, 4), "y": np.arange(12).reshape(3, 4) + 1}, id="tokens"),
    # variable-length sequences: padded per batch, with a mask
    pytest.param({"x": np.array([np.arange(3), np.arange(5)], dtype=object),
                  "y": np.array([np.arange(3) + 1, np.arange(5) + 1], dtype=object)}, id="ragged"),
    # tabular rows with sample weights
    pytest.param({"x": np.linspace(0, 1, 12, dtype=np.float32).reshape(4, 3), "y": np.arange(4),
                  "weight": np.array([1, 0, 2, 1], dtype=np.float64)}, id="weighted"),
])
def test_collate_on_cuda_gives_the_cpu_batch(rows):
    rows = {key: _read_only(value) for key, value in rows.items()}
    on_cpu, on_gpu = collate(rows, CPU), collate(rows, CUDA)
    assert on_gpu.keys() == on_cpu.keys()
    for key, tensor in on_gpu.items():
        assert tensor.device.type == "cuda" and tensor.dtype == on_cpu[key].dtype, key
        assert torch.equal(tensor.cpu(), on_cpu[key]), key


def test_a_staged_batch_survives_its_source_changing():
    """The copy to the GPU runs after collate returns: it must read the page-locked copy, not the rows."""
    x = np.random.default_rng(0).standard_normal((4096, 256)).astype(np.float32)
    expected = x.copy()
    batch = collate({"x": x, "y": np.zeros(4096, dtype=np.int64)}, CUDA)
    x[...] = np.nan  # the rows' memory reused at once, as a replayed cache block or an Arrow buffer can be
    assert torch.equal(batch["x"].cpu(), torch.from_numpy(expected))


def _model(dtype=torch.float32):
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(32, 64), nn.GELU(), nn.Linear(64, 10)).to(CUDA, dtype)


def test_a_step_of_four_micro_batches_never_waits_for_the_device():
    """The fused AdamW skips a non-finite step on the device: nothing in the step may synchronise. (Until
    2026-12-04 the guard read its flag on the host: exactly 1 synchronisation, seen on an H200.)"""
    model = _model()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3, fused=True)
    precision = make_precision("bf16", CUDA)
    x, y = torch.randn(64, 32, device=CUDA), torch.randint(0, 10, (64,), device=CUDA)
    micro_batches = [{"x": x[i:i + 16], "y": y[i:i + 16]} for i in range(0, 64, 16)]

    def step():
        return train_step(model, micro_batches, optimizer, task="classification", lr=1e-3, precision=precision,
                          global_count=64)

    step()  # first-call set-up (cuBLAS handles, the fused kernel's state) is not the steady step
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("warn")
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            result = step()
    finally:
        torch.cuda.set_sync_debug_mode("default")
    syncs = [w for w in caught if "synchroniz" in str(w.message)]
    assert not syncs, [str(w.message) for w in syncs]
    assert not bool(result.skipped)


def test_bf16_on_cuda_trains_close_to_fp32():
    x, y = torch.randn(32, 32, device=CUDA), torch.randint(0, 10, (32,), device=CUDA)
    finals = {}
    for name in ("fp32", "bf16"):
        model = _model()
        optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
        result = train_step(model, [{"x": x[:16], "y": y[:16]}, {"x": x[16:], "y": y[16:]}], optimizer,
                            task="classification", lr=0.1, precision=make_precision(name, CUDA))
        assert not result.skipped
        finals[name] = torch.cat([p.detach().flatten() for p in model.parameters()])
    error = (finals["bf16"] - finals["fp32"]).abs().max() / finals["fp32"].abs().max()
    assert 0 < error < 2e-2  # lower precision really ran, within bf16's 8 mantissa bits
