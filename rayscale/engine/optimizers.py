"""Optimizers: SGD, AdamW, and the two layer-wise large-batch optimizers LARS and LAMB.

Large global batches need a large learning rate, and one global learning rate is too large for some layers and
too small for others. LARS and LAMB rescale each parameter tensor's step by a *trust ratio*, ||weight|| over
||step||, so every layer moves by a similar fraction of its own size. Bias and normalisation parameters are
left out of both weight decay and the trust ratio: they are small vectors whose norms say little about a
layer's scale, and decaying them towards zero only hurts (Goyal et al. 2017, You et al. 2019).

Both optimizers compute the trust ratio with `torch.where` on 0-dim tensors instead of Python `if`s, so a
step on GPU never waits for the device (`.item()` or `bool(tensor)` would sync once per parameter).
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import TYPE_CHECKING

import torch
from torch import nn

from rayscale.config import OptimConfig
from rayscale.errors import ConfigError, UserError

if TYPE_CHECKING:
    from rayscale.engine.strategies.sharded_state import OptimizerShards


def param_groups(model: nn.Module, weight_decay: float) -> list[dict]:
    """Split trainable parameters into "decay" (ndim >= 2) and "no_decay" (ndim <= 1) groups.

    Matrices and kernels (linear, conv, embedding weights) are decayed and get the trust ratio (`adapt`);
    biases and norm scales/shifts are neither. An empty group is left out, since torch rejects one.
    """
    decay = [p for p in model.parameters() if p.requires_grad and p.ndim >= 2]
    no_decay = [p for p in model.parameters() if p.requires_grad and p.ndim <= 1]
    groups = [
        {"name": "decay", "params": decay, "weight_decay": weight_decay, "adapt": True},
        {"name": "no_decay", "params": no_decay, "weight_decay": 0.0, "adapt": False},
    ]
    return [group for group in groups if group["params"]]


def _trust_ratio(numerator: torch.Tensor, denominator: torch.Tensor, w_norm: torch.Tensor,
                 other_norm: torch.Tensor) -> torch.Tensor:
    """numerator / denominator where both norms are positive, else 1 -- without leaving the device."""
    usable = (w_norm > 0) & (other_norm > 0)
    # Where `usable` is false the division may give inf or nan; torch.where discards those lanes.
    return torch.where(usable, numerator / denominator, 1.0)


class LARS(torch.optim.Optimizer):
    """Layer-wise Adaptive Rate Scaling (You, Gitman, Ginsburg 2017, arXiv:1708.03888).

    For each parameter p with gradient g, learning rate lr, weight decay wd, trust coefficient eta::

        g'     = g + wd * p
        if adapt:
            trust  = eta * ||p|| / (||g|| + wd * ||p|| + eps)   if ||p|| > 0 and ||g|| > 0, else 1
            update = lr * trust * g'
        else:
            update = lr * g'
        buf    = momentum * buf + update        (buf = update at the first step)
        p      = p - buf

    lr sits inside the momentum buffer, as in the paper's Algorithm 1: a schedule change reaches the
    parameters gradually instead of rescaling the whole accumulated velocity at once. ||g|| is the norm of the
    raw gradient, so a parameter whose gradient vanished still gets trust 1 (decay only), never nan.
    """

    def __init__(self, params: Iterable, lr: float, momentum: float = 0.9, weight_decay: float = 0.0,
                 trust_coefficient: float = 0.001, eps: float = 0.0, adapt: bool = True):
        if lr < 0 or momentum < 0 or weight_decay < 0 or trust_coefficient <= 0 or eps < 0:
            raise ValueError(f"LARS: invalid hyperparameters lr={lr}, momentum={momentum}, "
                             f"weight_decay={weight_decay}, trust_coefficient={trust_coefficient}, eps={eps}")
        defaults = {"lr": lr, "momentum": momentum, "weight_decay": weight_decay,
                    "trust_coefficient": trust_coefficient, "eps": eps, "adapt": adapt}
        super().__init__(params, defaults)

    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            lr, momentum, weight_decay = group["lr"], group["momentum"], group["weight_decay"]
            for p in group["params"]:
                if p.grad is None:
                    continue
                grad = p.grad
                if grad.is_sparse:
                    raise RuntimeError("LARS does not support sparse gradients")
                update = grad.add(p, alpha=weight_decay)  # a new tensor: p.grad is left as it was
                if group["adapt"]:
                    w_norm = torch.linalg.vector_norm(p)
                    g_norm = torch.linalg.vector_norm(grad)
                    trust = _trust_ratio(group["trust_coefficient"] * w_norm,
                                         g_norm + weight_decay * w_norm + group["eps"], w_norm, g_norm)
                    update.mul_(trust)
                update.mul_(lr)
                state = self.state[p]
                if "momentum_buffer" not in state:
                    state["momentum_buffer"] = update
                else:
                    update = state["momentum_buffer"].mul_(momentum).add_(update)
                p.sub_(update)
        return loss


class LAMB(torch.optim.Optimizer):
    """Layer-wise Adaptive Moments for Batch training (You et al. 2019, "Large Batch Optimization for Deep
    Learning: Training BERT in 76 minutes", arXiv:1904.00962).

    For each parameter p with gradient g at step t (1, 2, ...), betas (b1, b2), weight decay wd::

        m      = b1 * m + (1 - b1) * g
        v      = b2 * v + (1 - b2) * g^2
        m_hat  = m / (1 - b1^t)
        v_hat  = v / (1 - b2^t)
        r      = m_hat / (sqrt(v_hat) + eps) + wd * p
        trust  = ||p|| / ||r||   if adapt and ||p|| > 0 and ||r|| > 0, else 1
        p      = p - lr * trust * r

    This is AdamW's step r with a per-tensor trust ratio. Weight decay is decoupled (added to r, not to g),
    and sits inside the trust ratio, as in the paper. A zero-initialised tensor (||p|| = 0) takes a plain
    AdamW step until it has a norm to scale by.
    """

    def __init__(self, params: Iterable, lr: float, betas: tuple[float, float] = (0.9, 0.999),
                 eps: float = 1e-6, weight_decay: float = 0.0, adapt: bool = True):
        if lr < 0 or eps < 0 or weight_decay < 0 or not all(0.0 <= b < 1.0 for b in betas):
            raise ValueError(f"LAMB: invalid hyperparameters lr={lr}, betas={betas}, eps={eps}, "
                             f"weight_decay={weight_decay}")
        defaults = {"lr": lr, "betas": tuple(betas), "eps": eps, "weight_decay": weight_decay,
                    "adapt": adapt}
        super().__init__(params, defaults)

    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            beta1, beta2 = group["betas"]
            for p in group["params"]:
                if p.grad is None:
                    continue
                grad = p.grad
                if grad.is_sparse:
                    raise RuntimeError("LAMB does not support sparse gradients")
                state = self.state[p]
                if not state:
                    # The step count is a Python int: bias correction is then host arithmetic, no sync.
                    state["step"] = 0
                    state["exp_avg"] = torch.zeros_like(p, memory_format=torch.preserve_format)
                    state["exp_avg_sq"] = torch.zeros_like(p, memory_format=torch.preserve_format)
                state["step"] += 1
                step = state["step"]
                exp_avg, exp_avg_sq = state["exp_avg"], state["exp_avg_sq"]
                exp_avg.mul_(beta1).add_(grad, alpha=1 - beta1)
                exp_avg_sq.mul_(beta2).addcmul_(grad, grad, value=1 - beta2)
                m_hat = exp_avg / (1 - beta1 ** step)
                v_hat = exp_avg_sq / (1 - beta2 ** step)
                update = m_hat.div_(v_hat.sqrt_().add_(group["eps"]))
                update.add_(p, alpha=group["weight_decay"])
                if group["adapt"]:
                    w_norm = torch.linalg.vector_norm(p)
                    r_norm = torch.linalg.vector_norm(update)
                    update.mul_(_trust_ratio(w_norm, r_norm, w_norm, r_norm))
                p.sub_(update, alpha=group["lr"])
        return loss


def _check_betas(betas: list[float]) -> tuple[float, float]:
    if len(betas) != 2 or not all(0.0 <= b < 1.0 for b in betas):
        raise ConfigError(f"optim.betas: expected two numbers in [0, 1), got {betas!r}")
    return betas[0], betas[1]


def _zero_momentum_buffers(optimizer: torch.optim.Optimizer, args, kwargs) -> None:
    """A step pre-hook of fused SGD. Fused SGD creates a momentum buffer uninitialised at a parameter's first step
    and fills it in the kernel: a first step skipped on the device (step.skips_on_device) would leave garbage in
    it. A zero buffer made before gives the same first step (buf = momentum x 0 + grad = grad, as PyTorch's
    buf = grad, where dampening is 0). Only for the tensors this step updates: those with a gradient (under
    optim.shard_state, this rank's own, which is why the shards' hook is registered before this one)."""
    for group in optimizer.param_groups:
        if group["momentum"] and group["dampening"] == 0:
            for parameter in group["params"]:
                if parameter.grad is not None and "momentum_buffer" not in optimizer.state[parameter]:
                    optimizer.state[parameter]["momentum_buffer"] = torch.zeros_like(parameter)


def check_optimizer(cfg: OptimConfig, model: nn.Module, lr: float) -> None:
    """Build the optimizer once and drop it: the driver's check, before Ray starts, that the workers' build
    will not fail (no trainable parameter, a fused kernel the parameters' dtype lacks...).

    Without loading the compiler. PyTorch's optimizers add their parameter groups through a method wrapped in
    torch._disable_dynamo, whose first call imports torch._dynamo: ~1.6 s of a `rayscale train` driver's
    prepare phase, for a driver that never compiles. The check calls the method it wraps (functools.wraps'
    __wrapped__) instead, only while it builds, and only where nothing has loaded the compiler yet."""
    import sys

    decorated = torch.optim.Optimizer.add_param_group
    plain = getattr(decorated, "__wrapped__", None)
    if plain is None or "torch._dynamo" in sys.modules:
        build_optimizer(cfg, model, lr)
        return
    torch.optim.Optimizer.add_param_group = plain
    try:
        build_optimizer(cfg, model, lr)
    finally:
        torch.optim.Optimizer.add_param_group = decorated


def build_optimizer(cfg: OptimConfig, model: nn.Module, lr: float,
                    shards: OptimizerShards | None = None) -> torch.optim.Optimizer:
    """The optimizer named by `cfg.name` over `param_groups(model)`.

    `lr` is the peak learning rate after the batch-size scaling rule. The schedule overwrites each group's
    "lr" every step as a multiple of the group's "initial_lr", which is why both are set here.
    `shards` (optim.shard_state): this rank steps, and keeps state for, only its own tensors (sharded_state.py).
    """
    betas = _check_betas(cfg.betas)
    groups = param_groups(model, cfg.weight_decay)
    if not groups:
        raise UserError("model: has no trainable parameters (every parameter has requires_grad=False)")
    for group in groups:
        group["initial_lr"] = lr
    # PyTorch's fused kernels update every tensor in one pass per step (a few launches on a GPU): faster than
    # its per-tensor default on CPU (5% of a 2-process gloo step of the throughput MLP, benchmarks/README.md)
    # and its "foreach" default on CUDA. They take floating-point tensors on CPU or CUDA only.
    fused = {"fused": True} if all(p.device.type in ("cpu", "cuda") and p.is_floating_point()
                                   for group in groups for p in group["params"]) else {}
    optimizer = _named(cfg, groups, lr, betas, fused)
    if shards is not None:
        shards.attach(optimizer)
    if isinstance(optimizer, torch.optim.SGD) and fused:
        optimizer.register_step_pre_hook(_zero_momentum_buffers)
    return optimizer


def _named(cfg: OptimConfig, groups: list[dict], lr: float, betas: tuple[float, float],
           fused: dict) -> torch.optim.Optimizer:
    if cfg.name == "sgd":
        # Plain SGD's weight_decay is L2 (added to the gradient); each group carries its own value.
        return torch.optim.SGD(groups, lr=lr, momentum=cfg.momentum, nesterov=cfg.nesterov, **fused)
    if cfg.name == "adamw":
        return torch.optim.AdamW(groups, lr=lr, betas=betas, eps=cfg.eps, **fused)
    if cfg.name == "lars":
        return LARS(groups, lr=lr, momentum=cfg.momentum, trust_coefficient=cfg.trust_coefficient)
    if cfg.name == "lamb":
        return LAMB(groups, lr=lr, betas=betas, eps=cfg.eps)
    raise ConfigError(f"optim.name: expected one of sgd, adamw, lars, lamb, got {cfg.name!r}")
