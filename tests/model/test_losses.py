"""Source losses against hand-computed cases, and their data-parallel equivalence (2 gloo ranks)."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from helpers import run_gloo_ranks, softmax as _softmax, unit as _unit
from gckd_ray.config import LossConfig, LossWeights
from gckd_ray.model.collectives import all_gather_with_grad
from gckd_ray.model.losses import IdentityClassifier, SourceLoss, itc_loss, sdm_loss


def _sdm_by_hand(img, txt, pids, tau, eps=1e-8) -> float:
    """Explicit loops: sum over directions of mean_i KL(softmax(s_i / tau) || labels_i)."""
    n = len(pids)
    dot = lambda a, b: sum(x * y for x, y in zip(a, b))  # noqa: E731
    total = 0.0
    for queries, keys in ((img, txt), (txt, img)):
        direction = 0.0
        for i in range(n):
            p = _softmax([dot(queries[i], keys[j]) / tau for j in range(n)])
            same = [1.0 if pids[i] == pids[j] else 0.0 for j in range(n)]
            q = [s / sum(same) for s in same]
            direction += sum(p[j] * (math.log(p[j]) - math.log(q[j] + eps)) for j in range(n))
        total += direction / n
    return total


def _itc_by_hand(img, txt, tau) -> float:
    n = len(img)
    dot = lambda a, b: sum(x * y for x, y in zip(a, b))  # noqa: E731
    total = 0.0
    for queries, keys in ((img, txt), (txt, img)):
        total += sum(-math.log(_softmax([dot(queries[i], keys[j]) / tau for j in range(n)])[i])
                     for i in range(n)) / n
    return total / 2


IMG = [[1.0, 0.2, 0.0], [0.3, 1.0, 0.1], [0.0, 0.4, 1.0], [0.5, 0.5, 0.5]]
TXT = [[0.9, 0.1, 0.3], [0.2, 0.8, 0.0], [0.1, 0.3, 0.7], [0.6, 0.2, 0.4]]


@pytest.mark.parametrize("pids", [[0, 1, 2, 3], [0, 0, 1, 1], [5, 2, 5, 5]])
def test_sdm_matches_hand_computation(pids):
    img, txt = _unit(IMG), _unit(TXT)
    loss = sdm_loss(img, txt, torch.tensor(pids), temperature=0.1)
    expected = _sdm_by_hand(img.tolist(), txt.tolist(), pids, 0.1)
    # float64 end to end (inputs and hand loops): rounding ~1e-16 per step
    assert loss.dtype == torch.float64
    assert loss.item() == pytest.approx(expected, rel=1e-12)


def test_sdm_matches_irra_formula_with_duplicate_pids():
    # IRRA's compute_sdm, verbatim up to names and dtype (labels / labels.sum(dim=1) broadcasts
    # by column; the same as row normalisation because the label matrix is symmetric). float64
    # end to end: the two sides multiply in different orders (img @ txt.t() / 0.02 against
    # 50 * txt @ img.t(), transposed), which in float32 would differ by ~1e-6 relative at
    # logits up to 50; in float64 assert_close's float64 defaults (rtol 1e-7) hold with room.
    torch.manual_seed(0)
    img = F.normalize(torch.randn(8, 6, dtype=torch.float64), dim=-1)
    txt = F.normalize(torch.randn(8, 6, dtype=torch.float64), dim=-1)
    pid = torch.tensor([0, 0, 1, 1, 1, 2, 3, 3])
    labels = (pid.view(-1, 1) - pid.view(1, -1) == 0).double()
    t2i = 50.0 * txt @ img.t()
    i2t = t2i.t()
    dist_labels = labels / labels.sum(dim=1)
    i2t_loss = F.softmax(i2t, 1) * (F.log_softmax(i2t, 1) - torch.log(dist_labels + 1e-8))
    t2i_loss = F.softmax(t2i, 1) * (F.log_softmax(t2i, 1) - torch.log(dist_labels + 1e-8))
    irra = i2t_loss.sum(1).mean() + t2i_loss.sum(1).mean()
    assert irra.dtype == torch.float64
    torch.testing.assert_close(sdm_loss(img, txt, pid, temperature=0.02), irra)


def test_sdm_is_near_zero_when_aligned():
    # float32 math. The exact KL is ~1e-41 (off-diagonal mass exp(-100)) less IRRA's epsilon
    # term log(1 + 1e-8) per row (0 after float32 rounding): |loss| <= ~1e-8, far below 1e-6,
    # while a misaligned pair would cost O(1).
    eye = torch.eye(4)
    assert abs(sdm_loss(eye, eye, torch.arange(4), temperature=0.01).item()) < 1e-6


def test_itc_matches_hand_computation():
    img, txt = _unit(IMG), _unit(TXT)
    loss = itc_loss(img, txt, temperature=0.05)
    # float64 end to end (inputs and hand loops): rounding ~1e-16 per step
    assert loss.dtype == torch.float64
    assert loss.item() == pytest.approx(_itc_by_hand(img.tolist(), txt.tolist(), 0.05), rel=1e-12)


def test_gradients_flow_to_both_modalities():
    img = _unit(IMG).float().requires_grad_()
    txt = _unit(TXT).float().requires_grad_()
    (sdm_loss(img, txt, torch.tensor([0, 0, 1, 2]), 0.02) + itc_loss(img, txt, 0.05)).backward()
    for grad in (img.grad, txt.grad):
        assert grad is not None and torch.isfinite(grad).all() and grad.abs().sum() > 0


def test_all_gather_with_grad_is_identity_on_one_process():
    x = torch.randn(3, 2)
    assert all_gather_with_grad(x) is x


def test_identity_classifier_is_mean_of_two_cross_entropies():
    torch.manual_seed(0)
    head = IdentityClassifier(4, 3)
    assert head.classifier.weight.std() < 0.01 and (head.classifier.bias == 0).all()
    # float64 end to end: nn.Linear (addmm) and the explicit x @ w.t() + b below round
    # differently; in float64 that is ~1e-16, so assert_close's float64 defaults hold.
    head = head.double()
    img = torch.randn(5, 4, dtype=torch.float64)
    txt = torch.randn(5, 4, dtype=torch.float64)
    pids = torch.tensor([0, 1, 2, 1, 0])
    w, b = head.classifier.weight, head.classifier.bias

    def ce(x):  # explicit -log softmax at the label, averaged
        logits = x @ w.t() + b
        return -(logits.log_softmax(1)[torch.arange(5), pids]).mean()

    loss = head(img, txt, pids)
    assert loss.dtype == torch.float64
    torch.testing.assert_close(loss, (ce(img) + ce(txt)) / 2)
    head(img, txt, pids).backward()
    assert head.classifier.weight.grad.abs().sum() > 0


def test_source_loss_weights_each_term_and_sums():
    torch.manual_seed(0)
    cfg = LossConfig(weights=LossWeights(sdm=1.5, itc=0.25, id=0.5), sdm_temperature=0.1,
                     itc_temperature=0.2)
    # float64 end to end (head and inputs): each term is recomputed by the same function, and
    # the total adds them in the same order, so only float64 rounding (~1e-16) could differ;
    # assert_close's float64 defaults.
    objective = SourceLoss(cfg, embed_dim=3, num_classes=4).double()
    img, txt, pids = _unit(IMG), _unit(TXT), torch.tensor([0, 0, 1, 3])
    out = objective(img, txt, pids)
    assert set(out) == {"sdm", "itc", "id", "loss"}
    assert {name: v.dtype for name, v in out.items()} == dict.fromkeys(out, torch.float64)
    torch.testing.assert_close(out["sdm"], 1.5 * sdm_loss(img, txt, pids, 0.1))
    torch.testing.assert_close(out["itc"], 0.25 * itc_loss(img, txt, 0.2))
    torch.testing.assert_close(out["id"], 0.5 * objective.id_head(img, txt, pids))
    torch.testing.assert_close(out["loss"], out["sdm"] + out["itc"] + out["id"])


def test_source_loss_zero_weight_terms_are_absent():
    cfg = LossConfig(weights=LossWeights(sdm=1.0, itc=0.0, id=0.0))
    objective = SourceLoss(cfg, embed_dim=3, num_classes=4)
    assert objective.id_head is None and list(objective.parameters()) == []
    img, txt = _unit(IMG).float(), _unit(TXT).float()
    out = objective(img, txt, torch.tensor([0, 0, 1, 3]))
    assert set(out) == {"sdm", "loss"}
    assert out["loss"].dtype == torch.float32  # float32 in, float32 out
    # the total is 0 + sdm: exact in any precision
    torch.testing.assert_close(out["loss"], out["sdm"], rtol=0, atol=0)


# ---- data parallelism: 2 gloo ranks vs one process on the concatenated batch ----------------

WORLD, LOCAL_B, DIM = 2, 4, 6
PIDS = [0, 0, 1, 1, 1, 2, 2, 0]  # identities shared across the two ranks' halves


def _global_batch() -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    img = F.normalize(torch.randn(WORLD * LOCAL_B, DIM, generator=g, dtype=torch.float64), dim=-1)
    txt = F.normalize(torch.randn(WORLD * LOCAL_B, DIM, generator=g, dtype=torch.float64), dim=-1)
    return img, txt, torch.tensor(PIDS)


def _loss_fns():
    torch.manual_seed(0)  # same ID head on every rank, as in data-parallel training
    source = SourceLoss(LossConfig(weights=LossWeights(sdm=1.0, itc=0.5, id=0.5)), DIM, 3).double()
    return {"sdm": lambda i, t, p: sdm_loss(i, t, p, 0.1),
            "itc": lambda i, t, p: itc_loss(i, t, 0.1),
            "source": lambda i, t, p: source(i, t, p)["loss"]}


def _rank_worker(rank: int) -> dict:
    img, txt, pids = _global_batch()
    rows = slice(rank * LOCAL_B, (rank + 1) * LOCAL_B)
    results = {}
    for name, fn in _loss_fns().items():
        local_img = img[rows].clone().requires_grad_()
        local_txt = txt[rows].clone().requires_grad_()
        loss = fn(local_img, local_txt, pids[rows])
        loss.backward()
        results[name] = (loss.detach(), local_img.grad, local_txt.grad)
    return results


@pytest.mark.slow
def test_distributed_losses_equal_single_process_on_concatenated_batch():
    ranks = run_gloo_ranks(_rank_worker, WORLD)

    img, txt, pids = _global_batch()
    for name, fn in _loss_fns().items():
        full_img, full_txt = img.clone().requires_grad_(), txt.clone().requires_grad_()
        full = fn(full_img, full_txt, pids)
        full.backward()
        # data-parallel training averages the ranks' losses and gradients
        pairs = [(sum(r[name][0] for r in ranks) / WORLD, full.detach()),
                 (torch.cat([r[name][1] for r in ranks]) / WORLD, full_img.grad),
                 (torch.cat([r[name][2] for r in ranks]) / WORLD, full_txt.grad)]
        # float64 end to end (inputs, ID head, loss math): the ranks' (4, 8) products and the
        # single process's (8, 8) ones are blocked differently by BLAS, which in float64 moves
        # results by ~1e-16 relative, so assert_close's float64 defaults (rtol 1e-7, atol 1e-7)
        # hold on any CPU; a wrong gather or gradient scaling is off by O(1).
        for what, (actual, expected) in zip(("loss", "image grad", "text grad"), pairs):
            assert actual.dtype == expected.dtype == torch.float64, (name, what)
            torch.testing.assert_close(actual, expected, msg=lambda m: f"{name} {what}: {m}")
