"""Mixed precision: the autocast dtype and, for fp16, the GradScaler that keeps small gradients from flushing
to zero. Which precision a run may use (fp16 needs a GPU) is one of the rules checked before it starts
(rayscale/rules.py); here a device that cannot do it is a bug in the caller."""

from __future__ import annotations

import contextlib
from dataclasses import dataclass

import torch


@dataclass
class Precision:
    name: str  # fp32 | bf16 | fp16
    device_type: str  # cpu | cuda
    scaler: torch.amp.GradScaler | None = None

    def autocast(self) -> contextlib.AbstractContextManager:
        if self.name == "fp32":
            return contextlib.nullcontext()
        dtype = torch.bfloat16 if self.name == "bf16" else torch.float16
        return torch.autocast(device_type=self.device_type, dtype=dtype)


def make_precision(name: str, device: torch.device) -> Precision:
    if name == "fp16":
        if device.type != "cuda":
            raise ValueError(f"fp16 needs a CUDA device, got {device} (rules.py refuses this before a run)")
        return Precision(name, device.type, torch.amp.GradScaler("cuda"))
    if name == "bf16" and device.type == "cuda" and not torch.cuda.is_bf16_supported():
        from rayscale.errors import ConfigError

        raise ConfigError("train.precision bf16: this GPU does not support bfloat16; use fp16")
    return Precision(name, device.type)
