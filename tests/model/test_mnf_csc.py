"""distill.mode=mnf_csc: noise filter gate, pair temperatures, CSC / triplet / L1 against hand
computations, and one GCKD step with the mode on."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from helpers import softmax, unit
from gckd_ray.model.gckd import TARGET_GROUP_OFFSET, _partners
from gckd_ray.model.mnf_csc import (MNFCSC, NoiseFilter, csc_loss, pair_temperature,
                                    triplet_loss)

TAUS = (0.07, 0.05, 1.0)  # tau0, tau_min, tau_max (the defaults)


def _dot(a, b):
    return sum(x * y for x, y in zip(a, b))


def _unit_rows(rows):
    return [[x / math.sqrt(_dot(r, r)) for x in r] for r in rows]


def test_gate_shapes_range_and_default_width():
    torch.manual_seed(0)
    filt = NoiseFilter(dim=6, hidden=3)
    teacher, context = torch.randn(5, 6), torch.randn(5, 6)
    gate, l1 = filt(teacher, context)
    assert gate.shape == (5, 6) and l1.shape == ()
    assert (gate > 0).all() and (gate < 1).all()
    mnf = MNFCSC(dim=16)  # hidden 0 -> dim // 2, as the original filter
    assert mnf.image.weight1.shape == (8, 32) and mnf.text.weight2.shape == (16, 8)
    purified, gate, _ = mnf.purify("text", teacher.repeat(1, 3)[:, :16],
                                   context.repeat(1, 3)[:, :16])
    assert purified.shape == (5, 16)
    # float32: the same single product on both sides; assert_close's float32 defaults
    torch.testing.assert_close(purified, gate * teacher.repeat(1, 3)[:, :16])


def test_context_is_detached_and_gate_reads_it():
    torch.manual_seed(0)
    mnf = MNFCSC(dim=4, hidden=4)
    teacher = torch.randn(3, 4)
    context = torch.randn(3, 4, requires_grad=True)
    purified, _, _ = mnf.purify("image", teacher, context)
    purified.sum().backward()
    assert context.grad is None  # the student is not trained through the gate's input
    assert mnf.image.weight1.grad is not None
    other, _, _ = mnf.purify("image", teacher, context + 1.0)
    assert not torch.allclose(other, purified)  # an O(1) change in the context, not rounding


def test_pair_temperature_is_clamped_and_detached():
    # float64 end to end (inputs and hand cosines): rounding ~1e-16; a clamped entry is the
    # bound itself, exactly
    q = unit([[1.0, 0.0], [0.0, 1.0]]).requires_grad_(True)
    k = unit([[1.0, 0.0], [-1.0, 0.1], [0.6, 0.8]])
    tau = pair_temperature(q, k, *TAUS)
    assert tau.dtype == torch.float64
    cos = [[_dot(a, b) for b in _unit_rows([[1.0, 0.0], [-1.0, 0.1], [0.6, 0.8]])]
           for a in [[1.0, 0.0], [0.0, 1.0]]]
    expected = [min(max(c + 0.07, 0.05), 1.0) for row in cos for c in row]
    assert tau.flatten().tolist() == pytest.approx(expected, rel=1e-12)
    assert tau[0, 0].item() == 1.0                    # cos 1 + 0.07 clamped to tau_max
    assert tau[0, 1].item() == 0.05                   # negative cos clamped to tau_min
    assert tau[1, 2].item() == pytest.approx(0.8 + 0.07, rel=1e-12)  # inside the range
    assert not tau.requires_grad


def _csc_by_hand(qs, ks, positives, tau0, tau_min, tau_max) -> float:
    qs, ks = _unit_rows(qs), _unit_rows(ks)
    total, rows = 0.0, 0
    for i, q in enumerate(qs):
        cos = [_dot(q, k) for k in ks]
        logits = [c / min(max(c + tau0, tau_min), tau_max) for c in cos]
        p = softmax(logits)
        n = sum(positives[i])
        if n:
            total += -sum(math.log(p[j]) for j in range(len(ks)) if positives[i][j]) / n
            rows += 1
    return total / rows if rows else 0.0


QS = [[1.0, 0.2, 0.0], [0.1, 1.0, 0.3], [-0.5, 0.2, 1.0]]
KS = [[1.0, 0.0, 0.1], [0.2, 1.0, 0.0], [-1.0, 0.1, 0.0], [0.3, 0.3, 1.0]]


@pytest.mark.parametrize("positives", [
    [[True, False, False, False], [False, True, False, True], [False, False, False, True]],
    [[True, False, True, False], [False] * 4, [False, False, False, True]],  # a row without
    [[False] * 4] * 3,
])
def test_csc_loss_matches_hand_computation(positives):
    got = csc_loss(torch.tensor(QS, dtype=torch.float64), torch.tensor(KS, dtype=torch.float64),
                   torch.tensor(positives), *TAUS)
    # float64 end to end (inputs and hand loops): rounding ~1e-16 per step
    assert got.dtype == torch.float64
    assert got.item() == pytest.approx(_csc_by_hand(QS, KS, positives, *TAUS), rel=1e-12)
    assert torch.isfinite(got)


def test_no_gradient_flows_through_the_temperature():
    # float64 end to end: the library's backward and the hand-built graph below round
    # differently (~1e-16 in float64); assert_close's float64 defaults.
    f64 = dict(dtype=torch.float64)
    positives = torch.tensor([[True, False, False, True], [False, True, False, False],
                              [False, False, True, False]])
    q = torch.tensor(QS, requires_grad=True, **f64)
    k = torch.tensor(KS, requires_grad=True, **f64)
    csc_loss(q, k, positives, *TAUS).backward()

    def with_tau(tau):
        q2 = torch.tensor(QS, requires_grad=True, **f64)
        k2 = torch.tensor(KS, requires_grad=True, **f64)
        cos = F.normalize(q2, dim=1) @ F.normalize(k2, dim=1).t()
        log_p = (cos / tau(cos)).log_softmax(1)
        labels = positives.double()
        (-(log_p * labels).sum(1) / labels.sum(1)).mean().backward()
        return q2.grad, k2.grad

    constant = pair_temperature(torch.tensor(QS, **f64), torch.tensor(KS, **f64), *TAUS)
    q_const, k_const = with_tau(lambda cos: constant)  # tau as a plain constant
    assert q.grad.dtype == torch.float64
    torch.testing.assert_close(q.grad, q_const)
    torch.testing.assert_close(k.grad, k_const)
    # A temperature left in the graph would give another gradient: the check can fail.
    q_live, _ = with_tau(lambda cos: (cos + 0.07).clamp(0.05, 1.0))
    assert not torch.allclose(q.grad, q_live, atol=1e-4)


def test_triplet_loss_matches_hand_computation():
    anchor, raw = [[1.0, 0.0], [0.0, 1.0]], [[0.6, 0.8], [1.0, 1.0]]
    purified = [[0.9, 0.1], [0.9, 0.1]]
    expected = 0.0
    for a, r, p in zip(_unit_rows(anchor), _unit_rows(raw), _unit_rows(purified)):
        expected += max(_dot(a, r) - _dot(a, p) + 0.2, 0.0)
    got = triplet_loss(*(torch.tensor(x, dtype=torch.float64) for x in (anchor, raw, purified)),
                       margin=0.2)
    # float64 end to end (inputs and hand loop): rounding ~1e-16 per step
    assert got.dtype == torch.float64
    assert got.item() == pytest.approx(expected / 2, rel=1e-12)
    # The first row is already beyond the margin: only the second contributes.
    assert _dot(_unit_rows(anchor)[0], _unit_rows(purified)[0]) - \
        _dot(_unit_rows(anchor)[0], _unit_rows(raw)[0]) > 0.2
    assert triplet_loss(torch.zeros(0, 2), torch.zeros(0, 2), torch.zeros(0, 2), 0.2).item() == 0.0


def test_l1_penalty_matches_hand_computation():
    filt = NoiseFilter(dim=2, hidden=2)
    w1 = [[1.0, -2.0, 0.5, 0.0], [0.0, 1.0, -1.0, 3.0]]
    w2 = [[-1.0, 1.0], [0.25, 0.0]]
    with torch.no_grad():
        filt.weight1.copy_(torch.tensor(w1))
        filt.weight2.copy_(torch.tensor(w2))
    _, l1 = filt(torch.randn(3, 2), torch.randn(3, 2))
    by_hand = (sum(sum(abs(x) for x in row) for row in w1) / 2
               + sum(sum(abs(x) for x in row) for row in w2) / 2)
    # float32 math on dyadic weights: every sum and mean is exact, so equal exactly
    assert l1.item() == by_hand  # (3.5 + 5) / 2 + (2 + 0.25) / 2


def test_partners_own_pair_on_source_pseudo_pair_or_neighbour_on_target():
    g = TARGET_GROUP_OFFSET
    features = unit([[1.0, 0.0], [0.0, 1.0], [0.7, 0.7]]).float()  # 3 target images
    others = unit([[0.0, 1.0], [1.0, 0.1], [1.0, 0.0]]).float()     # 3 target captions
    # image 0 shares pseudo-id 7 with caption 0 (less similar than caption 2); image 1 has none
    partner, known = _partners(features, others, torch.tensor([g + 7, -1, g + 9]),
                               torch.tensor([g + 7, g + 8, g + 9]), b=2)
    assert partner.tolist() == [0, 1, 2 + 0, 2 + 0, 2 + 2]
    assert known.tolist() == [True, True, True, False, True]


def _distiller_step(*overrides):
    from test_gckd import _memory, _setup

    cfg, model, source, target = _setup("distill.mode=mnf_csc", *overrides)
    return model, model(source, target, _memory(), adapt=True)


def test_a_uniform_gate_turns_no_feature_whatever_its_mean():
    from test_gckd import _memory, _setup

    cfg, model, source, target = _setup("distill.mode=mnf_csc")
    with torch.no_grad():
        for noise_filter in (model.mnf.image, model.mnf.text):
            noise_filter.weight2.zero_()
            noise_filter.bias2.fill_(-2.0)  # gate = sigmoid(-2) = 0.12 on every dimension
    stats = model(source, target, _memory(), adapt=True).stats
    assert stats["mnf_gate_mean"] == pytest.approx(0.1192, abs=1e-4)
    assert stats["mnf_gate_cos"] == pytest.approx(1.0, abs=1e-5)  # float32 cosines


def test_gckd_step_with_mnf_csc_trains_the_gate_not_the_teacher():
    model, out = _distiller_step()
    assert {"csc", "mnf_triplet", "mnf_l1", "gmp", "itm"} <= set(out.losses)
    assert "cmkd" not in out.losses
    assert all(torch.isfinite(v) for v in out.losses.values())
    assert 0 < out.stats["mnf_gate_mean"] < 1
    assert 0 < out.stats["mnf_gate_cos"] < 1  # a random gate turns every feature somewhat
    out.losses["loss"].backward()
    for name, p in model.mnf.named_parameters():
        assert p.grad is not None and p.grad.abs().sum() > 0, name
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in model.encoder.parameters())
    # The filter is the distiller's (trained, checkpointed), never part of the EMA teacher.
    assert any(k.startswith("mnf.") for k in model.state_dict())
    assert not any("mnf" in k for k in model.teacher.state_dict())
    model.ema_step()
    _, no_graph = _distiller_step("graph.enabled=false")
    assert "gmp" not in no_graph.losses and "csc" in no_graph.losses
