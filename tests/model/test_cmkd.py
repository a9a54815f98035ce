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
    assert loss.dtype == torch.float32
    assert loss.item() == pytest.approx(expected, rel=1e-5)


def test_cmkd_extremes():
    qs, qt, keys = _unit(QS), _unit(QT), _unit(KEYS)
    pos = torch.tensor([[True, False, False], [False, True, True]])
    log_p = (qs.float() @ keys.float().t() / 0.07).log_softmax(1)
    # alpha = 1: pure distillation, positives ignored
    p_t = (qt.float() @ keys.float().t() / 0.05).softmax(1)
    torch.testing.assert_close(cmkd_loss(qs, qt, keys, pos, tau_t=0.05, alpha=1.0),
                               -(p_t * log_p).sum(1).mean())
    # alpha = 0: cross-entropy to the normalised positives, teacher ignored
    y = pos.float() / pos.float().sum(1, keepdim=True)
    torch.testing.assert_close(cmkd_loss(qs, qt, keys, pos, alpha=0.0), -(y * log_p).sum(1).mean())
    torch.testing.assert_close(cmkd_loss(qs, torch.randn(2, 3), keys, pos, alpha=0.0),
                               -(y * log_p).sum(1).mean())
    # a student equal to a sharp teacher on one-hot keys is near the target entropy minimum
    eye = torch.eye(3)
    near_zero = cmkd_loss(eye, eye, eye, torch.eye(3, dtype=torch.bool), 0.01, 0.01, 0.4)
    assert near_zero.item() < 1e-6


def test_cmkd_gradient_only_through_student_queries():
    qs = _unit(QS).float().requires_grad_()
    qt = _unit(QT).float().requires_grad_()
    keys = _unit(KEYS).float().requires_grad_()
    cmkd_loss(qs, qt, keys, torch.tensor([[True, False, False], [False, False, False]])).backward()
    assert qs.grad is not None and qs.grad.abs().sum() > 0
    assert qt.grad is None and keys.grad is None


def test_cmkd_rejects_mismatched_positives():
    with pytest.raises(ValueError, match=r"\(B, M\)"):
        cmkd_loss(_unit(QS), _unit(QT), _unit(KEYS), torch.zeros(2, 2, dtype=torch.bool))
