"""Matching head: shapes, a learnable toy task, hard-negative selection, ITM loss, re-ranking."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from gckd_ray.model.matching import MatchingHead, itm_loss, rerank, select_hard_negatives

COLOURS, L, T, HT, HV = 6, 6, 5, 10, 12


@pytest.fixture(autouse=True)
def one_thread():
    """Tiny ops: OpenMP threads only add sync cost, ~30x on 2 busy cores (1 s -> 30 s)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def colour_pairs(n: int, g: torch.Generator):
    """Toy (caption, image) pairs: the caption has one colour token among filler tokens (random
    length, loud padding), the image one colour patch among background patches; the pair
    matches iff the colours agree (half of the pairs). Colour codes differ per modality, so
    the head has to learn the correspondence."""
    codes = torch.Generator().manual_seed(1)
    text_colour = 3 * F.normalize(torch.randn(COLOURS, HT, generator=codes), dim=-1)
    image_colour = 3 * F.normalize(torch.randn(COLOURS, HV, generator=codes), dim=-1)
    c_text = torch.randint(0, COLOURS, (n,), generator=g)
    match = torch.rand(n, generator=g) < 0.5
    other = (c_text + torch.randint(1, COLOURS, (n,), generator=g)) % COLOURS
    c_image = torch.where(match, c_text, other)
    lengths = torch.randint(3, L + 1, (n,), generator=g)
    mask = torch.arange(L)[None] < lengths[:, None]  # (n, L)
    text = torch.randn(n, L, HT, generator=g)
    text[~mask] = 10 * torch.randn(int((~mask).sum()), HT, generator=g)  # padding is ignored
    rows = torch.arange(n)
    at = (torch.rand(n, generator=g) * lengths).long()
    text[rows, at] = text_colour[c_text] + 0.1 * torch.randn(n, HT, generator=g)
    image = torch.randn(n, T, HV, generator=g)
    at = torch.randint(0, T, (n,), generator=g)
    image[rows, at] = image_colour[c_image] + 0.1 * torch.randn(n, HV, generator=g)
    return text, mask, image, match.long()


def test_head_shapes_and_padding_is_ignored():
    torch.manual_seed(0)
    head = MatchingHead(HT, HV, hidden=16, num_heads=2, num_layers=2).eval()
    text, mask, image, _ = colour_pairs(5, torch.Generator().manual_seed(0))
    logits = head(text, mask, image)
    assert logits.shape == (5, 2)
    junk = text.clone()
    junk[~mask] = torch.randn(int((~mask).sum()), HT)
    # float32 forward twice: masked keys get zero attention weight, so only kernel rounding
    # (~1e-7 relative) could differ; assert_close's float32 defaults. Junk that leaked in would
    # move the logits by O(1).
    torch.testing.assert_close(head(junk, mask, image), logits)
    with pytest.raises(ValueError, match="shapes"):
        head(text, mask[:, :3], image)
    with pytest.raises(ValueError, match="multiple"):
        MatchingHead(HT, HV, hidden=10, num_heads=4)


def test_head_learns_colour_matching():
    torch.manual_seed(0)
    g = torch.Generator().manual_seed(0)
    head = MatchingHead(HT, HV, hidden=32, num_heads=4)
    optimizer = torch.optim.Adam(head.parameters(), lr=3e-3)
    for _ in range(200):
        text, mask, image, labels = colour_pairs(64, g)
        loss = F.cross_entropy(head(text, mask, image), labels)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    text, mask, image, labels = colour_pairs(500, torch.Generator().manual_seed(123))
    with torch.no_grad():
        accuracy = (head(text, mask, image).argmax(-1) == labels).float().mean().item()
    assert accuracy > 0.9


def test_select_hard_negatives_respects_allowed():
    similarity = torch.tensor([[0.9, 0.5, 0.1, 0.8],
                               [0.2, 0.3, 0.7, 0.1],
                               [0.5, 0.5, 0.5, 0.5]])
    allowed = torch.tensor([[False, True, True, True],
                            [True, True, False, True],
                            [False, False, False, False]])
    assert select_hard_negatives(similarity, allowed).tolist() == [3, 1, -1]

    torch.manual_seed(0)
    similarity = torch.randn(16, 12) * 3
    allowed = torch.rand(16, 12) < 0.4
    allowed[3] = False
    g = torch.Generator().manual_seed(0)
    draws = torch.stack([select_hard_negatives(similarity, allowed, g) for _ in range(300)])
    assert (draws[:, 3] == -1).all()
    rows = [r for r in range(16) if r != 3]
    assert allowed[rows][torch.arange(15)[None].expand(300, -1), draws[:, rows]].all()
    # sampled in proportion to softmax over the allowed entries
    row = 0 if allowed[0].sum() >= 2 else int(allowed.sum(1).argmax())
    expected = similarity[row].masked_fill(~allowed[row], float("-inf")).softmax(0)
    freq = torch.bincount(draws[:, row], minlength=12).float() / 300
    assert (freq - expected).abs().max() < 0.1
    # the same generator state gives the same draw
    again = select_hard_negatives(similarity, allowed, torch.Generator().manual_seed(0))
    torch.testing.assert_close(again, draws[0])


def _tokens(g: torch.Generator):
    return (torch.randn(6, L, HT, generator=g), torch.ones(6, L, dtype=torch.bool),
            torch.randn(5, T, HV, generator=g))


def test_itm_loss_is_finite_and_decreases():
    torch.manual_seed(0)
    head = MatchingHead(HT, HV, hidden=16, num_heads=2)
    text, mask, image = _tokens(torch.Generator().manual_seed(0))
    positives = torch.tensor([[0, 0], [1, 1], [2, 2], [3, 3]])
    neg_image = torch.tensor([1, 2, -1, 4])
    neg_text = torch.tensor([5, -1, 4, 0])
    optimizer = torch.optim.Adam(head.parameters(), lr=1e-2)
    losses = []
    for _ in range(15):
        loss = itm_loss(head, text, mask, image, positives, neg_image, neg_text)
        assert torch.isfinite(loss)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    assert losses[-1] < 0.5 * losses[0]
    # the pairs scored: 4 positives, then 3 text->image and 3 image->text negatives
    with torch.no_grad():
        logits = head(torch.cat([text[[0, 1, 2, 3, 0, 1, 3, 5, 4, 0]]]),
                      mask[[0, 1, 2, 3, 0, 1, 3, 5, 4, 0]],
                      image[[0, 1, 2, 3, 1, 2, 4, 0, 2, 3]])
        labels = torch.tensor([1, 1, 1, 1, 0, 0, 0, 0, 0, 0])
        # float32: the same 10 pairs through the same head (with and without autograd), so
        # only kernel rounding (~1e-7 relative) could differ; assert_close's float32 defaults
        torch.testing.assert_close(
            F.cross_entropy(logits, labels),
            itm_loss(head, text, mask, image, positives, neg_image, neg_text))


def test_itm_loss_without_pairs_is_a_zero_with_grad():
    head = MatchingHead(HT, HV, hidden=16, num_heads=2)
    text, mask, image = _tokens(torch.Generator().manual_seed(0))
    empty = torch.zeros(0, dtype=torch.long)
    loss = itm_loss(head, text, mask, image, torch.zeros(0, 2, dtype=torch.long), empty, empty)
    assert loss.item() == 0.0 and loss.grad_fn is not None
    loss.backward()
    assert all(p.grad is not None and (p.grad == 0).all() for p in head.parameters())
    with pytest.raises(ValueError, match="negatives"):
        itm_loss(head, text, mask, image, torch.tensor([[0, 0]]), empty, empty)


def test_rerank_changes_only_the_top_k():
    torch.manual_seed(0)
    head = MatchingHead(HT, HV, hidden=16, num_heads=2).eval()
    g = torch.Generator().manual_seed(0)
    text, mask, gallery = torch.randn(3, L, HT, generator=g), torch.ones(3, L), \
        torch.randn(9, T, HV, generator=g)
    similarity = torch.randn(3, 9, generator=g)
    scores = rerank(head, text, mask, gallery, similarity, top_k=4, weight=0.5)
    top = similarity.topk(4, dim=1).indices
    in_top = torch.zeros_like(similarity, dtype=torch.bool).scatter_(1, top, True)
    # scores outside the top k are copied: exact
    torch.testing.assert_close(scores[~in_top], similarity[~in_top], rtol=0, atol=0)
    with torch.no_grad():
        probs = head(text[1:2].expand(4, -1, -1), mask[1:2].expand(4, -1),
                     gallery[top[1]]).softmax(-1)[:, 1]
    # float32: the head scores these pairs in a batch of 4 here and of 12 (3 queries x 4) in
    # rerank, which kernels may round differently (~1e-7 relative); assert_close's float32
    # defaults.
    torch.testing.assert_close(scores[1, top[1]], similarity[1, top[1]] + 0.5 * probs)
    # one query as 1-D inputs gives that query's row (a batch of 4 against 12: float32 again)
    single = rerank(head, text[1], mask[1], gallery, similarity[1], top_k=4, weight=0.5)
    assert single.shape == (9,)
    torch.testing.assert_close(single, scores[1])
    torch.testing.assert_close(rerank(head, text, mask, gallery, similarity, 0, 0.5), similarity,
                               rtol=0, atol=0)  # top_k = 0 returns a copy: exact
