"""Every ``torch.distributed`` collective of the package, in one place.

Each function is the identity (or the obvious single-process result) without an initialised
process group, so single-process code needs no special case. Tensors travel on the process
group's device: NCCL takes only CUDA tensors and gloo only CPU ones, so a tensor on the other
device is moved for the collective and the result comes back on the caller's device. Under the
mixed backend ``cpu:gloo,cuda:nccl`` (``train.use_gpu``) both devices are native and nothing
moves.
"""

from __future__ import annotations

import torch
import torch.distributed as dist


def rank_and_world() -> tuple[int, int]:
    """(rank, world size); (0, 1) without a process group."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def _group_device(t: torch.Tensor) -> torch.device:
    """Where ``t`` must be for the default group's backend."""
    backend = str(dist.get_backend())
    if "," in backend:  # "cpu:gloo,cuda:nccl": one backend per device type
        return t.device
    if backend == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def all_gather_no_grad(x: torch.Tensor) -> torch.Tensor:
    """(B, ...) per rank -> (W*B, ...) in rank order, without gradient (labels, ids). All ranks
    must pass the same shape."""
    _, world = rank_and_world()
    if world == 1:
        return x
    with torch.no_grad():
        moved = x.to(_group_device(x)).contiguous()
        parts = [torch.empty_like(moved) for _ in range(world)]
        dist.all_gather(parts, moved)
        return torch.cat(parts, dim=0).to(x.device)


def all_gather_with_grad(x: torch.Tensor) -> torch.Tensor:
    """(B, ...) per rank -> (W*B, ...) in rank order; gradients flow back to every rank's slice.

    Identity when torch.distributed is not initialised or has one process. All ranks must pass
    the same shape.
    """
    _, world = rank_and_world()
    if world == 1:
        return x
    return _AllGatherWithGrad.apply(x)


class _AllGatherWithGrad(torch.autograd.Function):
    """Concatenating all-gather whose backward sums every rank's gradient of the gathered
    tensor and hands each rank its own rows (torch.distributed.nn's version is deprecated)."""

    @staticmethod
    def forward(ctx, x: torch.Tensor) -> torch.Tensor:
        return all_gather_no_grad(x)

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> torch.Tensor:
        rank, world = rank_and_world()
        return all_reduce_sum(grad).chunk(world)[rank]


def all_gather_many(tensors: list[torch.Tensor]) -> list[torch.Tensor]:
    """``[all_gather_no_grad(t) for t in tensors]`` with one collective per dtype (small
    gathers cost their latency, not their bytes): each dtype's tensors travel flattened in one
    buffer, then are cut back. (B_k, ...) per rank -> (W*B_k, ...) in rank order, same values.

    All ranks must pass the same shapes and dtypes in the same order, on one device.
    """
    _, world = rank_and_world()
    if world == 1:
        return list(tensors)
    out: list[torch.Tensor | None] = [None] * len(tensors)
    by_dtype: dict[torch.dtype, list[int]] = {}
    for i, t in enumerate(tensors):
        by_dtype.setdefault(t.dtype, []).append(i)
    for members in by_dtype.values():
        flat = torch.cat([tensors[i].reshape(-1) for i in members])
        gathered = all_gather_no_grad(flat).view(world, -1)  # (W, sum of numels)
        parts = gathered.split([tensors[i].numel() for i in members], dim=1)
        for i, part in zip(members, parts):  # (W, numel) -> (W*B, ...): rank 0's rows first
            out[i] = part.reshape(world * tensors[i].shape[0], *tensors[i].shape[1:])
    return out


def all_reduce_sum(x: torch.Tensor) -> torch.Tensor:
    """The sum of ``x`` over ranks, as a new tensor (``x`` is left as it is)."""
    if rank_and_world()[1] == 1:
        return x.clone()
    with torch.no_grad():
        moved = x.to(_group_device(x), copy=True).contiguous()
        dist.all_reduce(moved)
        return moved.to(x.device)


def all_reduce_mean(x: torch.Tensor) -> torch.Tensor:
    """The mean of ``x`` over ranks (equal weights), as a new tensor."""
    return all_reduce_sum(x) / rank_and_world()[1]


def broadcast(x: torch.Tensor, src: int = 0) -> torch.Tensor:
    """Rank ``src``'s ``x`` on every rank, as a new tensor."""
    if rank_and_world()[1] == 1:
        return x
    with torch.no_grad():
        moved = x.to(_group_device(x), copy=True).contiguous()
        dist.broadcast(moved, src=src)
        return moved.to(x.device)


def all_gather_objects(obj: object) -> list[object]:
    """Every rank's picklable ``obj`` in rank order (``[obj]`` without a process group). Small
    per-epoch bookkeeping only: objects travel pickled."""
    _, world = rank_and_world()
    if world == 1:
        return [obj]
    out: list[object] = [None] * world
    dist.all_gather_object(out, obj)
    return out
