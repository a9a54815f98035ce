"""Domain-specific centring: running means, pass-through when unseen, teacher and eval reach."""

import torch
import torch.nn.functional as F

from gckd_ray.model.centring import IMAGE, SOURCE, TARGET, TEXT, DomainCentring


def test_unseen_domain_passes_through_and_first_batch_sets_the_mean():
    # float32 math (the means buffer is float32): a mean of 6 rows, a subtraction and a
    # normalisation, rounding ~1e-7 relative; assert_close's float32 defaults (rtol 1.3e-6).
    c = DomainCentring(4)
    x = F.normalize(torch.randn(6, 4), dim=1)
    assert torch.equal(c(x, TARGET, IMAGE), x)
    c.update({(TARGET, IMAGE): x}, momentum=0.9)
    torch.testing.assert_close(c.means[TARGET, IMAGE], x.mean(0))
    assert not c.seen[SOURCE].any() and not c.seen[TARGET, TEXT]
    out = c(x, TARGET, IMAGE)
    torch.testing.assert_close(out, F.normalize(x - x.mean(0), dim=1))
    torch.testing.assert_close(out.norm(dim=1), torch.ones(6))


def test_running_mean_matches_a_hand_computation():
    c = DomainCentring(3)
    a, b = torch.tensor([[1.0, 0, 0], [0, 1.0, 0]]), torch.tensor([[0, 0, 1.0]])
    c.update({(SOURCE, TEXT): a}, momentum=0.75)
    c.update({(SOURCE, TEXT): b}, momentum=0.75)
    expected = 0.75 * torch.tensor([0.5, 0.5, 0]) + 0.25 * torch.tensor([0, 0, 1.0])
    # float32 math on dyadic values (0.75, 0.25, 0.5): every step is exact in float32
    torch.testing.assert_close(c.means[SOURCE, TEXT], expected, rtol=0, atol=0)


def test_centring_removes_a_domain_translation():
    """Two domains = one cloud translated: after centring, target items match their source
    twins again (the failure centring exists to repair)."""
    gen = torch.Generator().manual_seed(0)
    base = torch.randn(50, 8, generator=gen)
    shift = 3 * torch.randn(8, generator=gen)
    src, tgt = F.normalize(base, dim=1), F.normalize(base + shift, dim=1)
    c = DomainCentring(8)
    c.update({(SOURCE, IMAGE): src, (TARGET, IMAGE): tgt}, momentum=0.0)
    raw_hits = (tgt @ src.T).argmax(1).eq(torch.arange(50)).float().mean()
    centred = c(tgt, TARGET, IMAGE) @ c(src, SOURCE, IMAGE).T
    # float32 math; 6 -> 47 hits of 50, every argmax ahead of the runner-up by > 0.007, far
    # beyond float32 rounding (~1e-7): no rounding can flip a hit
    assert centred.argmax(1).eq(torch.arange(50)).float().mean() > raw_hits
