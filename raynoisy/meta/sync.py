"""Synchronising gradients taken outside DDP, and checking that replicas agree.

``torch.autograd.grad`` never fires DDP's reducer hooks, so meta-gradients (and the meta methods' training
gradients) are local to each rank until they are averaged by hand. Averaging them in ONE flattened all-reduce
costs one network latency instead of one per tensor. Every function here is a no-op without an initialised
process group or with a single rank, so the laptop path and the cluster path run the same code.
"""

from __future__ import annotations

import functools
import hashlib
from collections.abc import Mapping, Sequence

import torch
import torch.distributed as dist
from torch import Tensor


class ReplicasDivergedError(RuntimeError):
    """Ranks hold different values for tensors that must be bit-identical: a synchronisation bug."""


def world_size(group: dist.ProcessGroup | None = None) -> int:
    """Ranks in ``group``; 1 without an initialised process group (a laptop run, a unit test)."""
    if not (dist.is_available() and dist.is_initialized()):
        return 1
    return dist.get_world_size(group)


@torch.no_grad()
def all_reduce_sum_(tensors: Sequence[Tensor], group: dist.ProcessGroup | None = None) -> None:
    """Replace each tensor by its sum over the ranks, in place, with a single all-reduce.

    The tensors are packed into one buffer of their promoted dtype (so a float32 loss can ride along with
    float64 gradients) and written back in their own dtype. They must share one device.
    """
    _all_reduce_(tensors, group, mean=False)


@torch.no_grad()
def all_reduce_mean_(tensors: Sequence[Tensor], group: dist.ProcessGroup | None = None) -> None:
    """Replace each tensor by its mean over the ranks, in place, with a single all-reduce (as the sum)."""
    _all_reduce_(tensors, group, mean=True)


@torch.no_grad()
def broadcast_(tensors: Sequence[Tensor], src: int = 0, group: dist.ProcessGroup | None = None) -> None:
    """Overwrite each tensor with rank ``src``'s values, in place, with one broadcast per dtype.

    What DDP does to a model when it wraps it; a model whose gradients are synchronised by hand (and so is
    never wrapped) gets the same guarantee of identical starting weights from this. Packed per dtype, not
    promoted, so integer buffers (BatchNorm's batch counter) travel exactly.
    """
    if world_size(group) == 1:
        return
    for dtype in dict.fromkeys(t.dtype for t in tensors):
        same = [t for t in tensors if t.dtype == dtype]
        flat = _pack(same, dtype)
        dist.broadcast(flat, src=src, group=group)
        _unpack_(flat, same)


def _pack(tensors: Sequence[Tensor], dtype: torch.dtype) -> Tensor:
    return torch.cat([t.reshape(-1).to(dtype) for t in tensors])


def _unpack_(flat: Tensor, tensors: Sequence[Tensor]) -> None:
    offset = 0
    for t in tensors:
        t.copy_(flat[offset : offset + t.numel()].view_as(t))
        offset += t.numel()


def _all_reduce_(tensors: Sequence[Tensor], group: dist.ProcessGroup | None, *, mean: bool) -> None:
    world = world_size(group)
    if world == 1 or not tensors:
        return
    flat = _pack(tensors, functools.reduce(torch.promote_types, (t.dtype for t in tensors)))
    dist.all_reduce(flat, op=dist.ReduceOp.SUM, group=group)
    if mean:
        flat.div_(world)
    _unpack_(flat, tensors)


def _digest(t: Tensor) -> str:
    data = t.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes()
    header = f"{t.dtype}{tuple(t.shape)}".encode()
    return hashlib.sha256(header + data).hexdigest()


def replica_fingerprint(tensors: Sequence[Tensor] | Mapping[str, Tensor]) -> dict[str, str]:
    """SHA-256 of each tensor's dtype, shape and bytes, keyed by name (or position for a sequence)."""
    items = tensors.items() if isinstance(tensors, Mapping) else enumerate(tensors)
    return {str(key): _digest(t) for key, t in items}


def assert_replicas_identical(
    tensors: Sequence[Tensor] | Mapping[str, Tensor], group: dist.ProcessGroup | None = None
) -> None:
    """Raise ``ReplicasDivergedError`` on every rank unless all ranks hold bit-identical tensors.

    Only fingerprints travel (``all_gather_object``), so it is cheap enough for a debug mode. The error
    names the first differing tensor and the ranks that disagree with rank 0.
    """
    world = world_size(group)
    if world == 1:
        return
    gathered: list[dict[str, str]] = [{} for _ in range(world)]
    dist.all_gather_object(gathered, replica_fingerprint(tensors), group=group)
    reference = gathered[0]
    for key in dict.fromkeys(key for prints in gathered for key in prints):
        differing = [rank for rank, prints in enumerate(gathered) if prints.get(key) != reference.get(key)]
        if differing:
            raise ReplicasDivergedError(f"tensor {key!r} differs between rank 0 and ranks {differing}")


def state_tensors(state: object, prefix: str = "") -> dict[str, Tensor]:
    """Every tensor in a nested state dict, keyed by its path: what must match across ranks."""
    if isinstance(state, Tensor):
        return {prefix: state}
    if isinstance(state, Mapping):
        items = state.items()
    elif isinstance(state, list | tuple):
        items = enumerate(state)
    else:
        return {}
    out: dict[str, Tensor] = {}
    for key, value in items:
        out.update(state_tensors(value, f"{prefix}/{key}"))
    return out
