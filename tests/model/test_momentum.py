"""EMA teacher: hand-computed updates, buffers, freezing, eval mode, wrappers, ZeRO-3 picks."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from gckd_ray.model.momentum import FrozenTeacher, ema_update, make_teacher, params_of


class Tiny(nn.Module):
    def __init__(self, width: int = 3):
        super().__init__()
        self.linear = nn.Linear(2, width)
        self.norm = nn.BatchNorm1d(width)  # running stats are buffers
        self.drop = nn.Dropout(0.5)

    def forward(self, x):
        return self.drop(self.norm(self.linear(x)))


class Wrapped(nn.Module):
    """Stands in for DDP / a DeepSpeed engine: the model is ``.module``."""

    def __init__(self, module: nn.Module):
        super().__init__()
        self.module = module


def _set(module: nn.Module, value: float) -> None:
    with torch.no_grad():
        for p in module.parameters():
            p.fill_(value)


def test_ema_matches_hand_computation_over_two_steps():
    student = Tiny()
    _set(student, 1.0)
    teacher = make_teacher(student)
    _set(student, 2.0)
    # float32 math: one rounded multiply and add per step (~1e-7 relative each), so
    # assert_close's float32 defaults (rtol 1.3e-6)
    ema_update(teacher, student, 0.9)  # 0.9 * 1 + 0.1 * 2 = 1.1
    for p in teacher.parameters():
        torch.testing.assert_close(p, torch.full_like(p, 1.1))
    _set(student, 3.0)
    ema_update(teacher, student, 0.9)  # 0.9 * 1.1 + 0.1 * 3 = 1.29
    for p in teacher.parameters():
        torch.testing.assert_close(p, torch.full_like(p, 1.29))
    for p in student.parameters():  # the student is only read: exactly 3.0 still
        torch.testing.assert_close(p, torch.full_like(p, 3.0), rtol=0, atol=0)


def test_general_values_and_buffers_copied():
    torch.manual_seed(0)
    student = Tiny()
    teacher = make_teacher(student)
    with torch.no_grad():
        for p in student.parameters():
            p.add_(torch.randn_like(p))
    student.train()(torch.randn(8, 2))  # updates BatchNorm running stats
    expected = {n: 0.99 * t + 0.01 * s for (n, t), (_, s)
                in zip(teacher.named_parameters(), student.named_parameters())}
    ema_update(teacher, student, 0.99)
    # float32 math: the update (multiply, then add with alpha) and the expectation above
    # round differently by ~1e-7 relative; assert_close's float32 defaults
    for name, p in teacher.named_parameters():
        torch.testing.assert_close(p, expected[name])
    for (_, t), (_, s) in zip(teacher.named_buffers(), student.named_buffers()):
        torch.testing.assert_close(t, s, rtol=0, atol=0)  # buffers are copied: exact
    assert int(teacher.norm.num_batches_tracked) == 1


def test_teacher_is_a_frozen_eval_copy():
    student = Tiny().train()
    teacher = make_teacher(student)
    assert not teacher.training
    assert all(not p.requires_grad for p in teacher.parameters())
    assert all(p.requires_grad for p in student.parameters())
    assert all(t.data_ptr() != s.data_ptr()
               for t, s in zip(teacher.parameters(), student.parameters()))


def test_teacher_stays_in_eval_when_the_parent_trains():
    class Distiller(nn.Module):
        def __init__(self):
            super().__init__()
            self.student = Tiny()
            self.teacher = FrozenTeacher(make_teacher(self.student))

    distiller = Distiller().train()
    assert distiller.student.training and distiller.teacher.training
    assert not distiller.teacher.module.training
    assert not any(m.training for m in distiller.teacher.module.modules())
    distiller.eval().train()
    assert not any(m.training for m in distiller.teacher.module.modules())
    # eval-mode teacher: deterministic (no dropout), running stats untouched, no graph
    x = torch.randn(4, 2)
    out = distiller.teacher(x)
    # the same float32 forward twice: equal up to float32 kernel rounding (dropout would
    # change whole entries); assert_close's float32 defaults
    torch.testing.assert_close(out, distiller.teacher(x))
    assert not out.requires_grad
    assert int(distiller.teacher.module.norm.num_batches_tracked) == 0
    assert all(not p.requires_grad for p in distiller.teacher.parameters())
    # the teacher is part of the owner's state (checkpointed together)
    assert any(k.startswith("teacher.module.") for k in distiller.state_dict())


def test_wrapped_student_and_teacher_are_unwrapped():
    student = Tiny()
    _set(student, 1.0)
    teacher = FrozenTeacher(make_teacher(Wrapped(student)))  # copies the inner model
    assert isinstance(teacher.module, Tiny)
    _set(student, 0.0)
    ema_update(teacher, Wrapped(student), 0.5)
    for p in teacher.module.parameters():  # 0.5 * 1 + 0.5 * 0: exact in float32
        torch.testing.assert_close(p, torch.full_like(p, 0.5), rtol=0, atol=0)


def test_mismatched_modules_and_momentum_raise():
    with pytest.raises(ValueError, match="shape"):
        ema_update(make_teacher(Tiny(3)), Tiny(4), 0.9)
    with pytest.raises(ValueError, match="differ"):
        ema_update(make_teacher(Tiny()), nn.Linear(2, 3), 0.9)
    with pytest.raises(ValueError, match="momentum"):
        ema_update(make_teacher(Tiny()), Tiny(), 1.5)


def test_params_of_picks_zero3_partitions():
    # A ZeRO-3 parameter carries its rank's flat partition as ``ds_tensor`` (p.data is a stub);
    # the EMA must then read and write the partitions only.
    def partitioned(module: nn.Module, fill: float, persist: bool = False) -> nn.Module:
        for p in module.parameters():
            p.ds_tensor = torch.full((2,), fill)
            p.ds_persist = persist
        return module

    student, teacher = partitioned(nn.Linear(2, 3), 3.0), partitioned(nn.Linear(2, 3), 1.0)
    assert set(params_of(student)) == {"weight", "bias"}
    before = teacher.weight.detach().clone()
    ema_update(teacher, student, 0.9)
    for p in teacher.parameters():  # float32 math: 0.9 * 1 + 0.1 * 3, ~1e-7 relative
        torch.testing.assert_close(p.ds_tensor, torch.full((2,), 1.2))
    torch.testing.assert_close(teacher.weight.detach(), before, rtol=0, atol=0)  # untouched
    with pytest.raises(ValueError, match="persistence_threshold"):
        params_of(partitioned(nn.Linear(2, 3), 0.0, persist=True))
