"""The compute dtype of the losses: at least float32, never below the caller's precision."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from gckd_ray.model.graph import gmp_loss, propagate_teacher
from gckd_ray.model.losses import IdentityClassifier, cmkd_loss, itc_loss, sdm_loss
from gckd_ray.model.mnf_csc import csc_loss, triplet_loss
from gckd_ray.model.precision import at_least_float32, compute_dtype

CMKD = (0.07, 0.07, 0.4)  # tau_s, tau_t, alpha
CSC = (0.07, 0.05, 1.0)   # tau0, tau_min, tau_max


@pytest.mark.parametrize("given, expected", [
    (torch.bfloat16, torch.float32), (torch.float16, torch.float32),
    (torch.float32, torch.float32), (torch.float64, torch.float64)])
def test_compute_dtype_lifts_half_types_and_keeps_float64(given, expected):
    x = torch.ones(2, dtype=given)
    assert compute_dtype(x) == expected
    assert at_least_float32(x).dtype == expected
    assert compute_dtype(x, torch.ones(1, dtype=torch.float64)) == torch.float64


def _losses(dtype: torch.dtype) -> dict[str, torch.Tensor]:
    torch.manual_seed(0)
    img = F.normalize(torch.randn(6, 8, dtype=torch.float64), dim=1).to(dtype)
    txt = F.normalize(torch.randn(6, 8, dtype=torch.float64), dim=1).to(dtype)
    pids = torch.tensor([0, 0, 1, 1, 2, 2])
    positives = pids.view(-1, 1) == pids.view(1, -1)
    edges = torch.tensor([[1, 2, 0, 3], [0, 0, 1, 2]])
    id_head = IdentityClassifier(8, 3).to(dtype)
    return {"sdm": sdm_loss(img, txt, pids, 0.02), "itc": itc_loss(img, txt, 0.05),
            "id": id_head(img, txt, pids), "cmkd": cmkd_loss(img, img, txt, positives, *CMKD),
            "csc": csc_loss(img, txt, positives, *CSC), "triplet": triplet_loss(img, txt, img, 0.2),
            "gmp": gmp_loss(img, propagate_teacher(txt, edges, 0.1), 0.07)}


def test_losses_return_float64_for_float64_inputs():
    assert {name: loss.dtype for name, loss in _losses(torch.float64).items()} == \
        dict.fromkeys(_losses(torch.float64), torch.float64)


def test_losses_return_float32_for_bf16_inputs():
    losses = _losses(torch.bfloat16)
    assert {name: loss.dtype for name, loss in losses.items()} == \
        dict.fromkeys(losses, torch.float32)


def test_float64_inputs_are_not_rounded_through_float32():
    # Upcasting a float32 result would give the float32 value exactly; computing in float64
    # differs from it in the low bits (and agrees to float32's precision, ~1e-6 relative).
    exact, single = _losses(torch.float64), _losses(torch.float32)
    for name in ("sdm", "itc", "id", "cmkd", "csc", "gmp"):
        assert exact[name].item() != single[name].double().item(), name
        torch.testing.assert_close(single[name].double(), exact[name], rtol=1e-5, atol=1e-6)


def test_mixed_float32_and_float64_inputs_meet_in_float64():
    torch.manual_seed(0)
    a64 = F.normalize(torch.randn(4, 8, dtype=torch.float64), dim=1)
    b32 = F.normalize(torch.randn(4, 8), dim=1)
    pids = torch.tensor([0, 0, 1, 1])
    positives = pids.view(-1, 1) == pids.view(1, -1)
    for loss in (sdm_loss(a64, b32, pids, 0.02), itc_loss(b32, a64, 0.05),
                 cmkd_loss(a64, b32, b32, positives, *CMKD), csc_loss(b32, a64, positives, *CSC),
                 triplet_loss(b32, a64, b32, 0.2), gmp_loss(a64, b32, 0.07)):
        assert loss.dtype == torch.float64
