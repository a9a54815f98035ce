"""Cross-domain fine-grained matching: an image-text matching (ITM) head, as in ALBEF/RaSa.

Caption tokens attend to image tokens (cross-attention), the fused tokens are pooled and
classified as [non-match, match]. Training pairs (DESIGN section 2, item 5): source pairs and
target pseudo-pairs are positives; each positive text gets a hard negative image and each
positive image a hard negative text, sampled from the most similar candidates that cannot be
the same person (a different (pseudo-)id, or the other domain: datasets never share people).

Rows refer to the token tensors handed in: only the step's batch has token states (the memory
holds pooled features), so candidates for hard negatives are batch rows of both domains. At
evaluation :func:`rerank` adds the match probability to the top-k similarities of a query.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from gckd_ray.model.precision import at_least_float32


class _CrossAttentionLayer(nn.Module):
    """Post-norm block: x <- LN(x + CrossAttn(x, image)); x <- LN(x + FFN(x))."""

    def __init__(self, hidden: int, num_heads: int):
        super().__init__()
        self.attention = nn.MultiheadAttention(hidden, num_heads, batch_first=True)
        self.norm1 = nn.LayerNorm(hidden)
        self.ffn = nn.Sequential(nn.Linear(hidden, 4 * hidden), nn.GELU(),
                                 nn.Linear(4 * hidden, hidden))
        self.norm2 = nn.LayerNorm(hidden)

    def forward(self, text: torch.Tensor, image: torch.Tensor) -> torch.Tensor:
        """text (B, L, h), image (B, T, h) -> (B, L, h)."""
        attended, _ = self.attention(text, image, image, need_weights=False)
        text = self.norm1(text + attended)
        return self.norm2(text + self.ffn(text))


class MatchingHead(nn.Module):
    """(caption tokens, image tokens) -> logits (B, 2) for [non-match, match].

    Args:
        text_width, image_width: token widths Ht, Hv of the two towers.
        hidden: width of the fusion layers (a multiple of ``num_heads``).
        num_heads, num_layers: cross-attention heads and layers.
    """

    def __init__(self, text_width: int, image_width: int, hidden: int = 64, num_heads: int = 4,
                 num_layers: int = 1):
        super().__init__()
        if hidden % num_heads:
            raise ValueError(f"hidden {hidden} is not a multiple of num_heads {num_heads}")
        self.text_in = nn.Sequential(nn.Linear(text_width, hidden), nn.LayerNorm(hidden))
        self.image_in = nn.Sequential(nn.Linear(image_width, hidden), nn.LayerNorm(hidden))
        self.layers = nn.ModuleList(_CrossAttentionLayer(hidden, num_heads)
                                    for _ in range(num_layers))
        self.classifier = nn.Linear(hidden, 2)

    def forward(self, text_tokens: torch.Tensor, text_mask: torch.Tensor,
                image_tokens: torch.Tensor) -> torch.Tensor:
        """text_tokens (B, L, Ht), text_mask (B, L) 1/True on real tokens, image_tokens
        (B, T, Hv) -> logits (B, 2).

        The fused text tokens are mean-pooled over the mask: CLIP's text tower is causal, so
        its first token has seen no word and cannot summarise the caption.
        """
        if text_tokens.shape[:2] != text_mask.shape or len(image_tokens) != len(text_tokens):
            raise ValueError(f"shapes do not match: text_tokens {tuple(text_tokens.shape)}, "
                             f"text_mask {tuple(text_mask.shape)}, image_tokens "
                             f"{tuple(image_tokens.shape)}")
        text = self.text_in(text_tokens)     # (B, L, h)
        image = self.image_in(image_tokens)  # (B, T, h)
        for layer in self.layers:
            text = layer(text, image)
        weights = text_mask.to(text.dtype).unsqueeze(-1)  # (B, L, 1)
        pooled = (text * weights).sum(1) / weights.sum(1).clamp_min(1.0)  # (B, h)
        return self.classifier(pooled)


@torch.no_grad()
def select_hard_negatives(similarity: torch.Tensor, allowed: torch.Tensor,
                          generator: torch.Generator | None = None) -> torch.Tensor:
    """One hard negative per row among the allowed candidates.

    Args:
        similarity: (B, M) query-candidate scores; ALBEF samples from softmax(s / tau), so pass
            the similarity already divided by the temperature you want.
        allowed: (B, M) bool, True where the candidate is a valid negative for the row
            (different (pseudo-)id, or the other domain).
        generator: None -> the most similar allowed candidate (argmax); else a sample from
            softmax(similarity) restricted to the allowed entries, drawn with this generator
            (on ``similarity``'s device).
    Returns:
        (B,) long candidate index per row; -1 for rows without an allowed candidate.
    """
    if similarity.shape != allowed.shape or similarity.dim() != 2:
        raise ValueError(f"similarity {tuple(similarity.shape)} and allowed "
                         f"{tuple(allowed.shape)} must be the same (B, M) shape")
    allowed = allowed.bool()
    has_any = allowed.any(dim=1)  # (B,)
    logits = at_least_float32(similarity).masked_fill(~allowed, float("-inf"))
    if generator is None:
        picked = logits.argmax(dim=1)
    else:
        # rows with nothing allowed get zeros (any valid distribution); overwritten below
        logits = torch.where(has_any[:, None], logits, torch.zeros_like(logits))
        probs = logits.softmax(dim=1)  # exactly 0 on disallowed entries
        picked = torch.multinomial(probs, 1, generator=generator).squeeze(1)
    return torch.where(has_any, picked, torch.full_like(picked, -1))


def itm_loss(head: MatchingHead, text_tokens: torch.Tensor, text_mask: torch.Tensor,
             image_tokens: torch.Tensor, positive_pairs: torch.Tensor,
             neg_image_for_text: torch.Tensor, neg_text_for_image: torch.Tensor
             ) -> torch.Tensor:
    """Mean cross-entropy of the head over positive and hard-negative (text, image) pairs.

    For each positive (t, i): (t, i) is a match, (t, neg_image_for_text) and
    (neg_text_for_image, i) are non-matches; -1 negatives are skipped (ALBEF's 1 : 2 mix).

    Args:
        text_tokens (Nt, L, Ht), text_mask (Nt, L), image_tokens (Ni, T, Hv): the candidates.
        positive_pairs: (P, 2) long [text_row, image_row].
        neg_image_for_text: (P,) image row per positive's text, -1 = none.
        neg_text_for_image: (P,) text row per positive's image, -1 = none.
    Returns:
        scalar. With no pair at all: ``0.0 * sum(head params)``, a zero that keeps every head
        parameter in the graph (zero gradients; data-parallel ranks stay in step).
    """
    if positive_pairs.dim() != 2 or positive_pairs.shape[1] != 2:
        raise ValueError(f"positive_pairs must be (P, 2), got {tuple(positive_pairs.shape)}")
    count = len(positive_pairs)
    if neg_image_for_text.shape != (count,) or neg_text_for_image.shape != (count,):
        raise ValueError(f"negatives must be ({count},), got {tuple(neg_image_for_text.shape)} "
                         f"and {tuple(neg_text_for_image.shape)}")
    texts, images = positive_pairs[:, 0], positive_pairs[:, 1]
    has_neg_image, has_neg_text = neg_image_for_text >= 0, neg_text_for_image >= 0
    text_rows = torch.cat([texts, texts[has_neg_image], neg_text_for_image[has_neg_text]])
    image_rows = torch.cat([images, neg_image_for_text[has_neg_image], images[has_neg_text]])
    if len(text_rows) == 0:
        return 0.0 * sum(p.sum() for p in head.parameters())
    labels = torch.zeros(len(text_rows), dtype=torch.long, device=text_rows.device)
    labels[:count] = 1  # the positives come first
    logits = head(text_tokens[text_rows], text_mask[text_rows], image_tokens[image_rows])
    return F.cross_entropy(logits, labels)


@torch.no_grad()
def rerank(head: MatchingHead, text_tokens: torch.Tensor, text_mask: torch.Tensor,
           image_tokens_all: torch.Tensor, similarity_row: torch.Tensor, top_k: int,
           weight: float) -> torch.Tensor:
    """Re-score the top-k gallery images of each query with the matching head.

    new score = similarity + weight * P(match) on each query's top-k, unchanged elsewhere.
    The head scores Q * k pairs at once: chunk queries for large galleries.

    Args:
        text_tokens: (Q, L, Ht) or (L, Ht) for one query; text_mask (Q, L) or (L,).
        image_tokens_all: (G, T, Hv) gallery tokens; may live on another device (e.g. CPU):
            only the selected rows are moved to the queries' device.
        similarity_row: (Q, G) or (G,) scores.
        top_k: how many of the highest scores to re-score (clipped to G).
        weight: factor of the match probability.
    Returns:
        new scores, the shape of ``similarity_row``.
    """
    single = similarity_row.dim() == 1
    if single:
        similarity_row, text_tokens, text_mask = (
            similarity_row[None], text_tokens.reshape(1, *text_tokens.shape[-2:]),
            text_mask.reshape(1, -1))
    queries, gallery = similarity_row.shape
    k = min(top_k, gallery)
    if k <= 0:
        return similarity_row[0].clone() if single else similarity_row.clone()
    top = similarity_row.topk(k, dim=1).indices  # (Q, k)
    images = image_tokens_all[top.reshape(-1).to(image_tokens_all.device)]  # (Q*k, T, Hv)
    logits = head(text_tokens.repeat_interleave(k, dim=0),
                  text_mask.repeat_interleave(k, dim=0),
                  images.to(text_tokens.device))  # (Q*k, 2)
    match = logits.softmax(dim=-1)[:, 1].reshape(queries, k).to(similarity_row.dtype)
    scores = similarity_row.clone().scatter_add_(1, top, weight * match)
    return scores[0] if single else scores
