"""CMKD loss and target pseudo-pairs against hand-computed cases."""

from __future__ import annotations

import math

import pytest
import torch

from helpers import softmax as _softmax, unit as _unit
from gckd_ray.model.losses import cmkd_loss


def _cmkd_by_hand(qs, qt, keys, positives, tau_s, tau_t, alpha) -> float:
    """Explicit loops over B queries and M keys."""
    dot = lambda a, b: sum(x * y for x, y in zip(a, b))  # noqa: E731
    total = 0.0
    for b in range(len(qs)):
        p_s = _softmax([dot(qs[b], keys[m]) / tau_s for m in range(len(keys))])
        p_t = _softmax([dot(qt[b], keys[m]) / tau_t for m in range(len(keys))])
        n_pos = sum(positives[b])
        if n_pos == 0:
            target = p_t
        else:
            target = [alpha * p_t[m] + (1 - alpha) * (positives[b][m] / n_pos)
                      for m in range(len(keys))]
        total += -sum(target[m] * math.log(p_s[m]) for m in range(len(keys)))
    return total / len(qs)


QS = [[1.0, 0.2, 0.0], [0.1, 1.0, 0.3]]  # B = 2 student queries
QT = [[0.9, 0.3, 0.1], [0.0, 0.8, 0.5]]  # teacher features of the same items
KEYS = [[1.0, 0.0, 0.1], [0.2, 1.0, 0.0], [0.3, 0.3, 1.0]]  # M = 3: 2 batch keys + 1 memory


@pytest.mark.parametrize("positives", [
    [[True, False, False], [False, True, True]],   # one and two positives
    [[True, False, True], [False, False, False]],  # second row without a positive
    [[False, False, False], [False, False, False]],
])
@pytest.mark.parametrize("alpha", [0.0, 0.4, 1.0])
def test_cmkd_matches_hand_computation(positives, alpha):
    qs, qt, keys = _unit(QS), _unit(QT), _unit(KEYS)
    loss = cmkd_loss(qs, qt, keys, torch.tensor(positives), tau_s=0.1, tau_t=0.2, alpha=alpha)
    expected = _cmkd_by_hand(qs.tolist(), qt.tolist(), keys.tolist(), positives, 0.1, 0.2, alpha)
    # float64 end to end (inputs and hand loops): rounding ~1e-16 per step
    assert loss.dtype == torch.float64
    assert loss.item() == pytest.approx(expected, rel=1e-12)


def test_cmkd_extremes():
    # float64 end to end (inputs and references): the library and the references below take
    # the same steps in float64, so assert_close's float64 defaults (rtol 1e-7) hold with room.
    qs, qt, keys = _unit(QS), _unit(QT), _unit(KEYS)
    pos = torch.tensor([[True, False, False], [False, True, True]])
    log_p = (qs @ keys.t() / 0.07).log_softmax(1)
    # alpha = 1: pure distillation, positives ignored
    p_t = (qt @ keys.t() / 0.05).softmax(1)
    torch.testing.assert_close(cmkd_loss(qs, qt, keys, pos, tau_s=0.07, tau_t=0.05, alpha=1.0),
                               -(p_t * log_p).sum(1).mean())
    # alpha = 0: cross-entropy to the normalised positives, teacher ignored
    y = pos.double() / pos.double().sum(1, keepdim=True)
    torch.testing.assert_close(cmkd_loss(qs, qt, keys, pos, 0.07, 0.07, alpha=0.0),
                               -(y * log_p).sum(1).mean())
    other_teacher = torch.randn(2, 3, dtype=torch.float64)
    torch.testing.assert_close(cmkd_loss(qs, other_teacher, keys, pos, 0.07, 0.07, alpha=0.0),
                               -(y * log_p).sum(1).mean())
    # A student equal to a sharp teacher on one-hot keys is near the target entropy minimum.
    # float32 math: the exact loss is ~80 exp(-100) ~ 3e-42, which float32 rounds to 0 or a
    # denormal, far below 1e-6, while a mismatched student would cost O(1).
    eye = torch.eye(3)
    near_zero = cmkd_loss(eye, eye, eye, torch.eye(3, dtype=torch.bool), 0.01, 0.01, 0.4)
    assert near_zero.item() < 1e-6


def test_cmkd_gradient_only_through_student_queries():
    qs = _unit(QS).float().requires_grad_()
    qt = _unit(QT).float().requires_grad_()
    keys = _unit(KEYS).float().requires_grad_()
    cmkd_loss(qs, qt, keys, torch.tensor([[True, False, False], [False, False, False]]),
              0.07, 0.07, 0.4).backward()
    assert qs.grad is not None and qs.grad.abs().sum() > 0
    assert qt.grad is None and keys.grad is None


def test_cmkd_rejects_mismatched_positives():
    with pytest.raises(ValueError, match=r"\(B, M\)"):
        cmkd_loss(_unit(QS), _unit(QT), _unit(KEYS), torch.zeros(2, 2, dtype=torch.bool),
                  0.07, 0.07, 0.4)
