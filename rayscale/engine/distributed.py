"""The collectives the engine makes, in one place. Each is a no-op with one process (or none initialised),
so the same code runs in local mode, in-process tests and a Ray Train worker group."""

from __future__ import annotations

import datetime
import socket
from collections.abc import Callable, Sequence
from typing import TypeVar

import torch
import torch.distributed as dist

T = TypeVar("T")


def world_size() -> int:
    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


def is_distributed() -> bool:
    return world_size() > 1


def join_process_group(backend: str, host: str, port: int, rank: int, size: int,
                       timeout: datetime.timedelta = datetime.timedelta(minutes=30)) -> None:
    """init_process_group through a store that rank 0 serves at host:port and nowhere else. torch's own store
    (init_method env:// or tcp://) listens on every interface of rank 0's machine whatever host it is given
    (`ss -tlnp`: *:port): on a cluster bound to loopback, or a node reached only at its cluster address, the
    ranks need it at the address they are told to reach, and nothing else does. Gloo's own connections are on
    that address already. `timeout`: the store's and every collective's (torch's default for gloo)."""
    if rank == 0:
        family, kind, _, _, address = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)[0]
        listener = socket.socket(family, kind)
        listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        listener.bind(address)
        listener.listen(max(size, 128))  # every rank may knock at once (the kernel caps it at somaxconn)
        # The store owns the descriptor from here (detach: the socket object would close it when collected).
        store = dist.TCPStore(host, port, size, True, timeout=timeout, master_listen_fd=listener.detach())
    else:
        store = dist.TCPStore(host, port, size, False, timeout=timeout)
    dist.init_process_group(backend, store=store, rank=rank, world_size=size, timeout=timeout)


def all_reduce(values: Sequence[float] | torch.Tensor, device: torch.device, op: str = "sum") -> torch.Tensor:
    """`values` summed (or their max, `op="max"`) over every rank, as float64 on `device`."""
    tensor = values if isinstance(values, torch.Tensor) else torch.tensor(list(values), dtype=torch.float64)
    tensor = tensor.to(device=device, dtype=torch.float64)
    if is_distributed():
        dist.all_reduce(tensor, op=dist.ReduceOp.MAX if op == "max" else dist.ReduceOp.SUM)
    return tensor


def sum_and_max(sums: Sequence[float], maxima: Sequence[float], device: torch.device
                ) -> tuple[list[float], list[float]]:
    """`sums` summed and `maxima` maxed over every rank in one collective, an all-gather of both: a log line's
    two reductions then cost the ranks one meeting, not two (each meeting waits for the slowest rank). The sums
    are added in rank order."""
    values = torch.tensor([*sums, *maxima], dtype=torch.float64).to(device)
    if is_distributed():
        gathered = [torch.empty_like(values) for _ in range(world_size())]
        dist.all_gather(gathered, values)
        values = torch.stack(gathered)
    else:
        values = values[None]
    return values[:, :len(sums)].sum(0).tolist(), values[:, len(sums):].amax(0).tolist()


def all_reduce_sum_(value: torch.Tensor) -> torch.Tensor:
    """`value` summed over every rank, in place (any dtype, on its own device)."""
    if is_distributed():
        dist.all_reduce(value, op=dist.ReduceOp.SUM)
    return value


def broadcast_buffers(module: torch.nn.Module) -> None:
    """Rank 0's buffers (BatchNorm's running statistics and counters) in `module` on every rank."""
    if is_distributed():
        for buffer in module.buffers():
            dist.broadcast(buffer, src=0)


def barrier() -> None:
    if is_distributed():
        dist.barrier()


def from_rank_0(decide: Callable[[], T], rank: int) -> T:
    """Rank 0's answer on every rank: `decide` runs on rank 0 only (a file listing, a choice from timings
    that differ between ranks), and every rank gets what it returned."""
    if not is_distributed():
        return decide()
    box = [decide() if rank == 0 else None]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def average_gradients(parameters: list[torch.Tensor], bucket_mb: float = 25.0) -> None:
    """What DDP's all-reduce does (sum over ranks / world size), in flat buckets, for a step accumulated
    entirely under no_sync. A parameter without a gradient counts as zero, so every rank makes the same calls.
    Each gradient becomes a view of its reduced bucket, as under DDP's gradient_as_bucket_view: no copy back
    (the next step's zero_grad(set_to_none=True) lets DDP put its own bucket views in again)."""
    ranks = world_size()
    for p in parameters:
        if p.grad is None:
            p.grad = torch.zeros_like(p)
    groups: dict[tuple, list[list[torch.Tensor]]] = {}
    limit = bucket_mb * 2**20
    for p in parameters:
        buckets = groups.setdefault((p.grad.dtype, p.grad.device), [[]])
        if buckets[-1] and sum(q.grad.numel() * q.grad.element_size() for q in buckets[-1]) >= limit:
            buckets.append([])
        buckets[-1].append(p)
    for buckets in groups.values():
        for bucket in buckets:
            grads = [p.grad for p in bucket]
            flat = torch._utils._flatten_dense_tensors(grads)
            dist.all_reduce(flat.div_(ranks))
            for p, synced in zip(bucket, torch._utils._unflatten_dense_tensors(flat, grads), strict=True):
                p.grad = synced


def broadcast_from(tensors: list[torch.Tensor], source: int) -> None:
    """`source` rank's values of `tensors` on every rank, in place, in one broadcast per dtype (the other ranks'
    tensors give only their shapes)."""
    if not is_distributed() or not tensors:
        return
    by_dtype: dict[torch.dtype, list[torch.Tensor]] = {}
    for tensor in tensors:
        by_dtype.setdefault(tensor.dtype, []).append(tensor)
    for same in by_dtype.values():
        flat = torch._utils._flatten_dense_tensors([t.detach() for t in same])
        dist.broadcast(flat, src=source)
        if dist.get_rank() != source:
            with torch.no_grad():
                torch._foreach_copy_(same, torch._utils._unflatten_dense_tensors(flat, same))


def gather_to_rank_0(value: T) -> list[T] | None:
    """Every rank's `value` (picklable) on rank 0, in rank order; None on the other ranks."""
    if not is_distributed():
        return [value]
    box = [None] * world_size() if dist.get_rank() == 0 else None
    dist.gather_object(value, box, dst=0)
    return box
