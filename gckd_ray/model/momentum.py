"""EMA teacher: a frozen copy of the student, moved towards it after every optimizer step.

t <- m * t + (1 - m) * s over every parameter (momentum m, default 0.995); buffers are copied.
The update is an explicit call after ``optimizer.step()``, never part of a forward.

Precision: the EMA state is kept in at least float32 whatever the training precision. Under
bf16 (DeepSpeed casts the whole engine, teacher included) an update of 0.005 (s - t) is mostly
below half a bf16 ulp of t and rounds away (measured: over 2,000 updates a bf16 teacher moved
0.53-0.65x as far as an fp32 one). :class:`EMAState` therefore holds an fp32 master copy of
every teacher tensor stored below float32; the EMA runs on the master, and the teacher tensor
receives the master rounded once to its own dtype, for the forward. A float32 (or float64)
teacher tensor is its own state, updated in place exactly as before: CPU/fp32 runs are
unchanged bit for bit. The masters live outside ``state_dict()`` (under ZeRO-3 they are
shard-shaped, different on every rank): the owner saves ``EMAState.state_dict()`` with its
rank's part of a checkpoint.

ZeRO-3 (DESIGN section 4): the teacher is a frozen submodule of the student's DeepSpeed engine
(``FrozenTeacher``), so ZeRO-3 partitions it exactly like the student, and each rank updates only
its own partition (no communication), fp32 masters included. :func:`params_of` is the one
place that chooses the tensor the EMA writes: ``p.ds_tensor`` (this rank's partition) when a
parameter is ZeRO-3 partitioned, else the parameter itself. This module reads
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

from gckd_ray.model.precision import at_least_float32, compute_dtype


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


class EMAState:
    """The fp32 master copies of the teacher's EMA, one per teacher tensor stored below float32.

    Keyed by parameter name; each master has the shape of the tensor :func:`params_of` gives
    (this rank's flat partition under ZeRO-3). Built from the teacher's values at the first
    update (or after loading an empty state); float32/float64 teacher tensors have none.
    """

    def __init__(self) -> None:
        self._masters: dict[str, torch.Tensor] | None = None

    def masters(self, teacher: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """Name -> master for every tensor of ``teacher`` (:func:`params_of` of the teacher)
        whose dtype is below float32; moved to the tensor's device if loaded elsewhere.

        Raises:
            ValueError: loaded masters do not match the teacher's names, shapes or precision.
        """
        low = {n: t for n, t in teacher.items() if compute_dtype(t) != t.dtype}
        if self._masters is None:
            self._masters = {n: at_least_float32(t) for n, t in low.items()}  # copies
            return self._masters
        if self._masters.keys() != low.keys():
            raise ValueError(f"EMA state holds {len(self._masters)} fp32 masters, the teacher "
                             f"has {len(low)} tensors below float32: "
                             f"{sorted(self._masters.keys() ^ low.keys())[:5]} differ")
        for name, t in low.items():
            master = self._masters[name]
            if master.shape != t.shape or master.dtype != compute_dtype(t):
                raise ValueError(f"EMA state of {name}: {master.dtype} {tuple(master.shape)}, "
                                 f"expected {compute_dtype(t)} {tuple(t.shape)}")
            if master.device != t.device:
                self._masters[name] = master.to(t.device)
        return self._masters

    def state_dict(self) -> dict[str, torch.Tensor]:
        """Name -> master, cloned on CPU; empty before the first update or without masters."""
        if self._masters is None:
            return {}
        return {n: m.detach().cpu().clone() for n, m in self._masters.items()}

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        """Masters from :meth:`state_dict` (checked against the teacher at the next update); an
        empty state builds them from the teacher's values then."""
        self._masters = dict(state) if state else None


@torch.no_grad()
def ema_update(teacher: nn.Module, student: nn.Module, momentum: float,
               state: EMAState | None = None) -> None:
    """Every teacher parameter t <- m * t + (1 - m) * s, in at least float32; buffers copied
    from the student.

    A teacher tensor in float32/float64 is updated in place. One below float32 (bf16/fp16) is
    updated through its fp32 master in ``state``: master <- m * master + (1 - m) * float(s),
    then t <- master rounded to t's dtype.

    Args:
        teacher: the EMA model (plain, or wrapped: DDP, engine, FrozenTeacher).
        student: the trained model, plain or wrapped; same architecture.
        momentum: m in [0, 1]; 1 keeps the teacher, 0 copies the student.
        state: the fp32 masters; required when a teacher tensor is stored below float32.
    Raises:
        ValueError: m out of range, parameter / buffer names or shapes differ, or a teacher
            tensor is below float32 and no ``state`` is given.
    """
    if not 0.0 <= momentum <= 1.0:
        raise ValueError(f"momentum must be in [0, 1], got {momentum}")
    t_named = params_of(teacher)
    t_params, s_params = _matched(t_named, params_of(student), "parameters")
    t_bufs, s_bufs = _matched(dict(unwrap(teacher).named_buffers()),
                              dict(unwrap(student).named_buffers()), "buffers")
    if state is None:
        low = [n for n, t in t_named.items() if compute_dtype(t) != t.dtype]
        if low:
            raise ValueError(f"teacher parameter {low[0]} is {t_named[low[0]].dtype}: an "
                             "in-place EMA would round most updates away; pass an EMAState")
        masters = {}
    else:
        masters = state.masters(t_named)
    # Each parameter's EMA state: its fp32 master, or the tensor itself (float32 and above).
    states = [masters.get(n, t) for n, t in zip(t_named, t_params)]
    if states:
        torch._foreach_mul_(states, momentum)
        torch._foreach_add_(states, [s.to(x.dtype) for s, x in zip(s_params, states)],
                            alpha=1.0 - momentum)
    if masters:  # rounded once to the training dtype, for the teacher's forward
        torch._foreach_copy_([t_named[n] for n in masters], list(masters.values()))
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
