"""EMA teacher: a frozen copy of the student, moved towards it after every optimizer step.

t <- m * t + (1 - m) * s over every parameter (momentum m, default 0.995); buffers are copied.
The update is an explicit call after ``optimizer.step()``, never part of a forward.

ZeRO-3 (DESIGN section 4): the teacher is a frozen submodule of the student's DeepSpeed engine
(``FrozenTeacher``), so ZeRO-3 partitions it exactly like the student, and each rank updates only
its own partition (no communication). :func:`params_of`
is the one place that chooses the tensor the EMA writes: ``p.ds_tensor`` (this rank's
partition) when a parameter is ZeRO-3 partitioned, else the parameter itself. This module reads
those attributes by name and never imports DeepSpeed. The shard-local update matches a
full-parameter EMA only with ``stage3_param_persistence_threshold: 0``: a persistent parameter
is kept whole in ``p.data`` and is never re-gathered from ``ds_tensor`` for a parameter the
optimizer does not own (the frozen teacher's), so :func:`params_of` refuses it instead of
drifting silently.
"""

from __future__ import annotations

import copy

import torch
from torch import nn


def unwrap(module: nn.Module) -> nn.Module:
    """The model inside DDP / DeepSpeed engines / :class:`FrozenTeacher` (anything exposing the
    wrapped model as ``.module``); ``module`` itself otherwise."""
    while isinstance(getattr(module, "module", None), nn.Module):
        module = module.module
    return module


def params_of(module: nn.Module) -> dict[str, torch.Tensor]:
    """Name -> the tensor the EMA reads (student) or writes (teacher) for each parameter.

    A plain, DDP-wrapped or ZeRO-0/1/2 model: the parameter itself (its full value). A ZeRO-3
    partitioned parameter (it has ``ds_tensor``): this rank's flat partition, so the update is
    shard-local; teacher and student partitions line up because one engine partitions both
    (same ZeRO-3 config, same architecture).

    Raises:
        ValueError: a ZeRO-3 parameter is persistent (``ds_persist``): set
            ``stage3_param_persistence_threshold: 0`` in the DeepSpeed config.
    """
    tensors = {}
    for name, param in unwrap(module).named_parameters():
        shard = getattr(param, "ds_tensor", None)
        if shard is None:
            tensors[name] = param.detach()
            continue
        if getattr(param, "ds_persist", False):
            raise ValueError(f"ZeRO-3 parameter {name} is persistent (kept whole, not "
                             "re-gathered for the teacher): a shard-local EMA would drift; set "
                             "stage3_param_persistence_threshold: 0")
        tensors[name] = shard.detach()
    return tensors


def make_teacher(student: nn.Module) -> nn.Module:
    """A deep copy of the (unwrapped) student with every parameter frozen, in eval mode."""
    teacher = copy.deepcopy(unwrap(student))
    teacher.requires_grad_(False)
    return teacher.eval()


def _matched(teacher: dict[str, torch.Tensor], student: dict[str, torch.Tensor], what: str
             ) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    """Teacher and student tensors in the same order; raises on differing names or shapes."""
    if teacher.keys() != student.keys():
        only_t = sorted(teacher.keys() - student.keys())[:5]
        only_s = sorted(student.keys() - teacher.keys())[:5]
        raise ValueError(f"teacher and student {what} differ: teacher only {only_t}, "
                         f"student only {only_s}")
    for name, t in teacher.items():
        if t.shape != student[name].shape:
            raise ValueError(f"{what[:-1]} {name}: teacher shape {tuple(t.shape)} != student "
                             f"shape {tuple(student[name].shape)}")
    names = list(teacher)
    return [teacher[n] for n in names], [student[n] for n in names]


@torch.no_grad()
def ema_update(teacher: nn.Module, student: nn.Module, momentum: float) -> None:
    """In place: every teacher parameter t <- m * t + (1 - m) * s; buffers copied from the student.

    Args:
        teacher: the EMA model (plain, or wrapped: DDP, engine, FrozenTeacher).
        student: the trained model, plain or wrapped; same architecture.
        momentum: m in [0, 1]; 1 keeps the teacher, 0 copies the student.
    Raises:
        ValueError: m out of range, or parameter / buffer names or shapes differ.
    """
    if not 0.0 <= momentum <= 1.0:
        raise ValueError(f"momentum must be in [0, 1], got {momentum}")
    t_params, s_params = _matched(params_of(teacher), params_of(student), "parameters")
    t_bufs, s_bufs = _matched(dict(unwrap(teacher).named_buffers()),
                              dict(unwrap(student).named_buffers()), "buffers")
    if t_params:
        torch._foreach_mul_(t_params, momentum)
        torch._foreach_add_(t_params, s_params, alpha=1.0 - momentum)
    for t, s in zip(t_bufs, s_bufs):
        t.copy_(s)


class FrozenTeacher(nn.Module):
    """Holds the teacher as a submodule (so ``.to``, ``state_dict`` and checkpoints include it)
    but keeps it frozen and in eval mode: ``train()`` on any parent does not reach it.

    ``forward`` runs the teacher under ``torch.no_grad``; methods are reached through
    ``.module`` (e.g. ``frozen.module.encode_image(x)``, called under ``no_grad`` by the owner).
    """

    def __init__(self, module: nn.Module):
        super().__init__()
        self.module = module.requires_grad_(False).eval()

    def train(self, mode: bool = True) -> FrozenTeacher:
        self.training = mode  # the wrapper follows its parent; the teacher stays in eval
        self.module.eval()
        return self

    def forward(self, *args, **kwargs):
        with torch.no_grad():
            return self.module(*args, **kwargs)
