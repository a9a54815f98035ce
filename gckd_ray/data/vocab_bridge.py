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

from collections import Counter
from collections.abc import Sequence

import numpy as np
import torch

from gckd_ray.data.tokenizer import split_words


def bridge_words(source_captions: Sequence[str], target_captions: Sequence[str], *,
                 window: int = 4, far_weight: float = 0.1, min_similarity: float = 0.6,
                 min_margin: float = 0.0, min_count: int = 2
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
    vectors = context_vectors(sentences, words, window, far_weight)
    similarity = _cosine(vectors, unseen, known)                # (unseen, known)
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
    n, far_slot = len(words), 2 * window
    width = (2 * window + 1) * n
    rows, cols, weights = [], [], []
    for d in range(1, length):
        left, right = ids[:, :-d].ravel(), ids[:, d:].ravel()
        ok = (left >= 0) & (right >= 0)
        left, right = left[ok], right[ok]
        near = d <= window
        to_right, to_left = (2 * (d - 1), 2 * d - 1) if near else (far_slot, far_slot)
        rows += [left, right]
        cols += [to_right * n + right, to_left * n + left]
        weights.append(np.full(2 * len(left), 0.5 ** (d - 1) if near else far_weight))
    if not rows:
        return torch.sparse_coo_tensor(torch.zeros(2, 0, dtype=torch.int64), [], (n, width))
    keys, inverse = np.unique(np.concatenate(rows) * width + np.concatenate(cols),
                              return_inverse=True)
    counts = np.bincount(inverse, weights=np.concatenate(weights))
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


def _cosine(vectors: torch.Tensor, rows: list[int], cols: list[int]) -> torch.Tensor:
    """Cosine similarities (len(rows), len(cols)) of unit rows of a sparse matrix."""
    other = vectors.index_select(0, torch.tensor(cols))
    chunks = [vectors.index_select(0, torch.tensor(rows[start:start + 256])).to_dense()
              for start in range(0, len(rows), 256)]            # bounded dense blocks
    return torch.cat([torch.sparse.mm(other, chunk.T).T for chunk in chunks])
