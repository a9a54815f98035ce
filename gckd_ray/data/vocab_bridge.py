"""Lexical bridge: map each target-only caption word to the source word used in its contexts.

A word vocabulary learned on source captions has never trained the target's own words
("crimson", "gentleman", ...): their embeddings keep their random initialisation, and every
target caption that uses one is partly noise to the text tower. The target's unlabelled
captions still say which words are interchangeable: a synonym fills the same template slots,
between the same neighbours, as the word it stands for. `bridge_words` compares positional
context vectors (positive PMI of the word ``d`` places to the left / right, ``d <= window``,
weights halving with distance, plus the rest of the caption at a low weight) over the target
captions, and aliases a target-only word to the most similar source word when that cosine
reaches ``min_similarity`` (the target's own template words, "him", "head", match nothing well
and stay) and leads the runner-up by ``min_margin``.

Context alone cannot separate siblings that occur in identical slots ("olive": pink, orange or
green?). On SynthPEDES synth-icfg the best match is the generator's word for 38 of its 48
one-word synonyms; with ``min_margin=0`` the rest are still aliased, to a sibling, since a
sibling's trained embedding is a better start than a random one (GCKD, seed 0, target R@1:
20.0 without the bridge, 32.5 with it, about 28 with ``min_margin=0.02``; experiments/RESULTS.md).

Reads caption text only (no ids, no pairing): shuffling captions across images changes nothing.
"""

from __future__ import annotations

import warnings
from collections import Counter
from collections.abc import Sequence

import numpy as np
import torch

from gckd_ray.data.tokenizer import split_words


def bridge_words(source_captions: Sequence[str], target_captions: Sequence[str], *,
                 window: int = 4, far_weight: float = 0.1, min_similarity: float = 0.6,
                 min_margin: float = 0.0, min_count: int = 2, max_context_words: int = 1000
                 ) -> dict[str, str]:
    """Aliases ``target-only word -> source word`` found from context similarity.

    Args:
        source_captions: captions whose words the model is trained on (labelled domain).
        target_captions: the target's unlabelled captions; contexts are counted here only,
            since both a synonym and the source word it stands for occur in them.
        window: context positions on each side with their own slots.
        far_weight: weight of the farther words of a caption (see `context_vectors`).
        min_similarity: cosine the best source word needs: function words of the target's
            own templates ("him", "head") match nothing well and are left alone.
        min_margin: cosine lead of the best source word over the second best needed to alias.
        min_count: words seen fewer times in the target captions are left alone.
        max_context_words: only the most frequent words count as neighbours (bounds the
            dense similarity computation on real vocabularies; SynthPEDES has ~120 words).

    Returns:
        Alias map; empty when the target has no words unseen in the source.
    """
    seen = {w for caption in source_captions for w in split_words(caption)}
    sentences = [split_words(caption) for caption in target_captions]
    counts = Counter(w for sentence in sentences for w in sentence)
    words = sorted(w for w, n in counts.items() if n >= min_count)
    unseen = [i for i, w in enumerate(words) if w not in seen]
    known = [i for i, w in enumerate(words) if w in seen]
    if not unseen or len(known) < 2:
        return {}
    vectors = _frequent_features(context_vectors(sentences, words, window, far_weight),
                                 [counts[w] for w in words], max_context_words)
    similarity = vectors[unseen] @ vectors[known].T             # cosine (unseen, known)
    top = similarity.topk(2, dim=1)
    confident = ((top.values[:, 0] >= min_similarity)
                 & (top.values[:, 0] - top.values[:, 1] >= min_margin))
    return {words[unseen[row]]: words[known[int(top.indices[row, 0])]]
            for row in torch.nonzero(confident).flatten().tolist()}


def context_vectors(sentences: Sequence[Sequence[str]], words: Sequence[str], window: int,
                    far_weight: float = 0.1) -> torch.Tensor:
    """Row-normalised positive-PMI vectors of ``words`` over (slot, neighbour) features.

    Slots: the neighbour ``d`` places to the right or left (``d <= window``, weight
    ``0.5 ** (d - 1)``), and one slot for any farther word of the same caption (weight
    ``far_weight``): a pronoun three clauses on still says "lady" is not "man".

    Args:
        sentences: tokenised captions.
        words: the rows; other tokens are neither rows nor features.
        window: offsets -window..-1 and 1..window get their own slots.
        far_weight: weight of the shared slot of the farther words.

    Returns:
        Sparse COO tensor (len(words), (2 * window + 1) * len(words)).
    """
    index = {w: i for i, w in enumerate(words)}
    length = max((len(s) for s in sentences), default=0)
    ids = np.full((len(sentences), length), -1, dtype=np.int64)
    for row, sentence in enumerate(sentences):
        ids[row, :len(sentence)] = [index.get(w, -1) for w in sentence]
    n = len(words)
    width = (2 * window + 1) * n
    near = [_pairs(ids, d) for d in range(1, min(window, length - 1) + 1)]
    rows, cols, weights = [], [], []
    for d, (left, right) in enumerate(near, start=1):
        rows += [left, right]
        cols += [2 * (d - 1) * n + right, (2 * d - 1) * n + left]
        weights.append(np.full(2 * len(left), 0.5 ** (d - 1)))
    far_rows, far_cols, far_counts = _far_pairs(ids, n, near)
    rows.append(far_rows)
    cols.append(2 * window * n + far_cols)
    weights.append(far_weight * far_counts)
    keys, inverse = np.unique(np.concatenate(rows) * width + np.concatenate(cols),
                              return_inverse=True)
    counts = np.bincount(inverse, weights=np.concatenate(weights))
    keys, counts = keys[counts > 0], counts[counts > 0]
    if not len(keys):
        return torch.sparse_coo_tensor(torch.zeros(2, 0, dtype=torch.int64), [], (n, width))
    rows, cols = keys // width, keys % width
    row_sum = np.bincount(rows, weights=counts, minlength=n)
    col_sum = np.bincount(cols, weights=counts, minlength=width)
    pmi = np.log(counts * counts.sum() / (row_sum[rows] * col_sum[cols]))
    keep = pmi > 0
    rows, cols, pmi = rows[keep], cols[keep], pmi[keep]
    norm = np.sqrt(np.bincount(rows, weights=pmi ** 2, minlength=n))
    values = (pmi / norm[rows]).astype(np.float32)
    return torch.sparse_coo_tensor(np.stack([rows, cols]), values, (n, width),
                                   check_invariants=True).coalesce()


def _pairs(ids: np.ndarray, d: int) -> tuple[np.ndarray, np.ndarray]:
    """(left, right) word ids of every pair of known tokens ``d`` apart in a caption."""
    left, right = ids[:, :-d].ravel(), ids[:, d:].ravel()
    ok = (left >= 0) & (right >= 0)
    return left[ok], right[ok]


def _far_pairs(ids: np.ndarray, n: int, near: list[tuple[np.ndarray, np.ndarray]]
               ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Counts of (word, other word) at a distance beyond the near window in one caption.

    All ordered pairs of distinct positions come from the caption-by-word count matrix X as
    X^T X minus each word's own position (the diagonal); the near pairs are then taken off.
    Memory stays O(tokens + distinct pairs), not O(captions x length^2).
    """
    captions, _ = np.nonzero(ids >= 0)
    tokens = ids[ids >= 0]
    x = torch.sparse_coo_tensor(np.stack([captions, tokens]), np.ones(len(tokens)),
                                (len(ids), n), check_invariants=True).coalesce()
    with warnings.catch_warnings():  # sparse @ sparse goes through CSR, which warns "beta"
        warnings.filterwarnings("ignore", message="Sparse CSR tensor support is in beta")
        co = torch.sparse.mm(x.t().coalesce(), x).coalesce()
    (rows, cols), values = co.indices().numpy(), co.values().numpy()
    diagonal = np.arange(n)
    near_left = np.concatenate([p for pair in near for p in pair] or [np.zeros(0, np.int64)])
    near_right = np.concatenate([p for pair in near for p in pair[::-1]]
                                or [np.zeros(0, np.int64)])
    rows = np.concatenate([rows, diagonal, near_left])
    cols = np.concatenate([cols, diagonal, near_right])
    counts = np.concatenate([values, -np.bincount(tokens, minlength=n).astype(np.float64),
                             -np.ones(len(near_left))])
    keys, inverse = np.unique(rows * n + cols, return_inverse=True)
    summed = np.bincount(inverse, weights=counts)
    keep = summed > 0.5                                      # integer counts: exact
    return keys[keep] // n, keys[keep] % n, summed[keep]


def _frequent_features(vectors: torch.Tensor, word_counts: list[int], keep: int
                       ) -> torch.Tensor:
    """Dense unit rows restricted to the features whose neighbour is one of the ``keep``
    most frequent words (all of them when there are no more than ``keep`` words)."""
    n = len(word_counts)
    indices, values = vectors.indices(), vectors.values()
    if n > keep:
        frequent = torch.zeros(n, dtype=torch.bool)
        frequent[torch.tensor(word_counts).topk(keep).indices] = True
        mask = frequent[indices[1] % n]
        indices, values = indices[:, mask], values[mask]
        slots = torch.unique(indices[1])                       # compact the kept columns
        indices = torch.stack([indices[0], torch.searchsorted(slots, indices[1])])
        width = len(slots)
    else:
        width = vectors.shape[1]
    dense = torch.zeros(n, width)
    dense[indices[0], indices[1]] = values                     # coalesced: no duplicates
    return torch.nn.functional.normalize(dense, dim=1)
