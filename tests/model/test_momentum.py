"""EMA teacher: hand-computed updates, buffers, freezing, eval mode, wrappers, ZeRO-3 picks,
fp32 EMA state under bf16 (also shard-local), its checkpoint round trip."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from gckd_ray.model.momentum import (EMAState, FrozenTeacher, ema_update, make_teacher,
                                    params_of)


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


def _drift(student: nn.Module, weights: dict[str, torch.Tensor], direction: dict[str, torch.Tensor],
           gen: torch.Generator) -> None:
    """One small optimizer-like step: the fp32 ``weights`` move by ~1e-3, and the (bf16) student
    receives them rounded to its dtype, as DeepSpeed's bf16 engine copies its fp32 weights."""
    with torch.no_grad():
        for name, p in student.named_parameters():
            w = weights[name]
            w.add_(1e-3 * (direction[name] + 0.5 * torch.randn(w.shape, generator=gen)))
            p.copy_(w)


def _flat(tensors) -> torch.Tensor:
    return torch.cat([t.detach().float().flatten() for t in tensors])


def test_bf16_teacher_keeps_its_ema_state_in_fp32():
    torch.manual_seed(0)
    gen = torch.Generator().manual_seed(1)
    student = Tiny(64).to(torch.bfloat16)  # as DeepSpeed bf16 casts the module
    teacher, plain = make_teacher(student), make_teacher(student)
    weights = {n: p.detach().float().clone() for n, p in student.named_parameters()}
    direction = {n: torch.randn(w.shape, generator=gen) for n, w in weights.items()}
    reference = {n: p.detach().float().clone() for n, p in teacher.named_parameters()}
    start = _flat(reference.values())
    state, m = EMAState(), 0.995
    for _ in range(2000):
        _drift(student, weights, direction, gen)
        ema_update(teacher, student, m, state)
        with torch.no_grad():
            for name, s in student.named_parameters():
                # the reference: fp32 EMA fed the same bf16 student weights
                reference[name] = m * reference[name] + (1 - m) * s.float()
            for t, s in zip(plain.parameters(), student.parameters()):
                t.mul_(m).add_(s, alpha=1 - m)  # the old failure mode: in place, in bf16
    masters = state.masters(params_of(teacher))
    assert set(masters) == set(reference) and all(v.dtype == torch.float32
                                                    for v in masters.values())
    names = list(reference)
    ref, moved = _flat(reference.values()), (_flat(reference.values()) - start).norm()
    # fp32 vs fp32: the same EMA, rounded per step by the foreach kernels vs the expression
    # above (at most ~1 ulp of |t| <= 7 each step; measured 2e-9 of the movement); <= 1e-3
    err = (_flat(masters[n] for n in names) - ref).norm()
    assert err <= 1e-3 * moved
    # bf16 vs fp32: the teacher the forward sees is its master rounded once, exactly
    for name, t in teacher.named_parameters():
        assert torch.equal(t, masters[name].to(torch.bfloat16))
    # bf16 (plain in-place EMA) vs fp32: most updates round away, so the teacher lags far behind
    # (measured: off by 0.40 of the movement, having moved 0.65x as far)
    plain_moved = (_flat(plain.parameters()) - start).norm()
    assert (_flat(plain.parameters()) - ref).norm() > 0.2 * moved
    assert plain_moved < 0.8 * moved


def test_bf16_teacher_without_a_state_is_refused():
    student = Tiny().to(torch.bfloat16)
    with pytest.raises(ValueError, match="EMAState"):
        ema_update(make_teacher(student), student, 0.9)


def test_fp32_teacher_is_its_own_state_bit_for_bit():
    torch.manual_seed(0)
    student = Tiny()
    with_state, without = make_teacher(student), make_teacher(student)
    with torch.no_grad():
        for p in student.parameters():
            p.add_(torch.randn_like(p))
    state = EMAState()
    for _ in range(3):
        ema_update(with_state, student, 0.99, state)
        ema_update(without, student, 0.99)
    assert state.state_dict() == {}  # no masters: the float32 tensors are the state
    for a, b in zip(with_state.parameters(), without.parameters()):
        torch.testing.assert_close(a, b, rtol=0, atol=0)  # the same float32 ops: identical


def _bf16_partitioned(module: nn.Module, fill: float, shard: int) -> nn.Module:
    """ZeRO-3 under bf16: each parameter's rank partition ``ds_tensor`` (``shard`` elements,
    not the parameter's shape) is bf16; ``p.data`` is a stub the EMA must not touch."""
    for p in module.parameters():
        p.ds_tensor = torch.full((shard,), fill, dtype=torch.bfloat16)
        p.ds_persist = False
    return module


def test_zero3_fp32_masters_are_shard_shaped_and_shard_local():
    m = 0.995
    for shard in (4, 2):  # two ranks' partitions of a 3x2 weight: 4 + 2 elements
        student = _bf16_partitioned(nn.Linear(2, 3), 1.5, shard)
        teacher = _bf16_partitioned(nn.Linear(2, 3), 1.0, shard)
        stub = teacher.weight.detach().clone()
        state = EMAState()
        for _ in range(10):
            ema_update(teacher, student, m, state)
        saved = state.state_dict()
        assert {n: (v.shape, v.dtype) for n, v in saved.items()} == {
            n: (torch.Size([shard]), torch.float32) for n in ("weight", "bias")}
        # fp32 math: 1.5 - 0.5 m^10 = 1.02441..., 10 rounded steps (~1e-7 relative each)
        expected = torch.full((shard,), 1.5 - 0.5 * m ** 10)
        for name, p in teacher.named_parameters():
            torch.testing.assert_close(saved[name], expected)
            # bf16: the master rounded once, 1 + 3 * 2^-7 = 1.0234375 exactly. An in-place bf16
            # EMA would still be at 1.0: each 0.005 * 0.5 step is under half a bf16 ulp of 1.
            assert torch.equal(p.ds_tensor, torch.full((shard,), 1.0234375,
                                                       dtype=torch.bfloat16))
        torch.testing.assert_close(teacher.weight.detach(), stub, rtol=0, atol=0)  # untouched


def test_ema_state_round_trips_through_a_checkpoint(tmp_path):
    """Resumed from a saved (teacher, EMA state), the EMA continues bit for bit as if
    uninterrupted; resumed without the state (masters rebuilt from the bf16 teacher), it does
    not."""
    torch.manual_seed(0)
    gen = torch.Generator().manual_seed(1)
    student = Tiny(8).to(torch.bfloat16)
    teacher, state = make_teacher(student), EMAState()
    weights = {n: p.detach().float().clone() for n, p in student.named_parameters()}
    direction = {n: torch.randn(w.shape, generator=gen) for n, w in weights.items()}
    for _ in range(30):
        _drift(student, weights, direction, gen)
        ema_update(teacher, student, 0.995, state)
    # a rank's checkpoint part is read back with weights_only=True (checkpointing.py)
    torch.save({"teacher": teacher.state_dict(), "ema": state.state_dict()}, tmp_path / "ckpt.pt")
    saved = torch.load(tmp_path / "ckpt.pt", map_location="cpu", weights_only=True)
    resumed, rebuilt = make_teacher(student), make_teacher(student)
    resumed.load_state_dict(saved["teacher"])
    rebuilt.load_state_dict(saved["teacher"])
    resumed_state, rebuilt_state = EMAState(), EMAState()
    resumed_state.load_state_dict(saved["ema"])
    rebuilt_state.load_state_dict({})
    for _ in range(30):
        _drift(student, weights, direction, gen)
        for t, st in ((teacher, state), (resumed, resumed_state), (rebuilt, rebuilt_state)):
            ema_update(t, student, 0.995, st)
    # fp32 masters and bf16 teachers: the same ops on the same values, so identical
    for name, master in state.state_dict().items():
        assert torch.equal(resumed_state.state_dict()[name], master), name
    for a, b in zip(teacher.state_dict().values(), resumed.state_dict().values()):
        assert torch.equal(a, b)
    assert any(not torch.equal(rebuilt_state.state_dict()[n], v)
               for n, v in state.state_dict().items())


def test_ema_state_that_does_not_fit_the_teacher_is_refused():
    student = Tiny(3).to(torch.bfloat16)
    state = EMAState()
    state.load_state_dict({n: torch.zeros(p.shape) for n, p in Tiny(4).named_parameters()})
    with pytest.raises(ValueError, match="EMA state of"):
        ema_update(make_teacher(student), student, 0.9, state)
    state.load_state_dict({"linear.weight": torch.zeros(3, 2)})
    with pytest.raises(ValueError, match="masters"):
        ema_update(make_teacher(student), student, 0.9, state)
