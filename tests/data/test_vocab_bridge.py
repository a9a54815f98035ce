"""Lexical bridge: context vectors against a dense hand computation, aliases on a toy corpus
and on SynthPEDES against the generator's lexicon, invariance to caption order."""

from __future__ import annotations

import random

import numpy as np
import pytest

from gckd_ray.data.datasets import load_records
from gckd_ray.data.synthetic import CAPTION_STYLES, DOMAIN_STYLES
from gckd_ray.data.tokenizer import split_words
from gckd_ray.data.vocab_bridge import bridge_words, context_vectors

SOURCE = ["a man in a red coat", "a man in a blue hat", "a woman in a red coat",
          "a woman in a blue hat"]


def _target(repeat: int = 3) -> list[str]:
    """Target captions: red coats and blue hats, said 'crimson' / 'azure' as often; 'teal' is
    as often on a coat as on a hat (red or blue?); 'zz' shares no context."""
    captions = []
    for _ in range(repeat):
        for who in ("man", "woman"):
            captions += [f"a {who} in a {colour} {garment}" for colour, garment in (
                ("red", "coat"), ("crimson", "coat"), ("blue", "hat"), ("azure", "hat"),
                ("teal", "coat"), ("teal", "hat"))]
        captions.append("zz zz zz")
    return captions


def _dense_ppmi(sentences, words, window, far_weight):
    index = {w: i for i, w in enumerate(words)}
    n = len(words)
    counts = np.zeros((n, (2 * window + 1) * n))
    for s in sentences:
        for i, w in enumerate(s):
            for j, v in enumerate(s):
                if j == i or w not in index or v not in index:
                    continue
                d = abs(j - i)
                if d <= window:
                    slot, weight = (2 * (d - 1) if j > i else 2 * d - 1), 0.5 ** (d - 1)
                else:
                    slot, weight = 2 * window, far_weight
                counts[index[w], slot * n + index[v]] += weight
    total = counts.sum()
    with np.errstate(divide="ignore", invalid="ignore"):
        pmi = np.log(counts * total / (counts.sum(1, keepdims=True) * counts.sum(0)))
    ppmi = np.where((counts > 0) & (pmi > 0), pmi, 0.0)
    return ppmi / np.linalg.norm(ppmi, axis=1, keepdims=True)


def test_context_vectors_equal_a_dense_hand_computation():
    sentences = [split_words(c) for c in _target(1)]
    words = sorted({w for s in sentences for w in s} - {"coat"})   # coat: neither row nor feature
    sparse = context_vectors(sentences, words, window=2, far_weight=0.3).to_dense().numpy()
    # float64 math stored as float32 (unit rows: rounding <= 6e-8) against a float64 reference
    np.testing.assert_allclose(sparse, _dense_ppmi(sentences, words, 2, 0.3), atol=1e-6)


def test_aliases_only_clear_synonyms():
    aliases = bridge_words(SOURCE, _target(), window=2, min_similarity=0.5, min_margin=0.05)
    assert aliases["crimson"] == "red" and aliases["azure"] == "blue"
    assert "teal" not in aliases          # as close to red as to blue: left alone
    assert "zz" not in aliases            # no source word shares its contexts
    assert set(aliases) == {"crimson", "azure"}


def test_no_unseen_words_no_aliases():
    assert bridge_words(SOURCE, SOURCE * 3) == {}


def test_caption_order_does_not_matter():
    target = _target()
    shuffled = random.Random(0).sample(target, len(target))
    kwargs = dict(window=2, min_similarity=0.5, min_margin=0.05)
    assert bridge_words(SOURCE, shuffled, **kwargs) == bridge_words(SOURCE, target, **kwargs)


@pytest.mark.parametrize("target", ["synth-icfg", "synth-rstp"])
def test_synthpedes_aliases_agree_with_the_generator_lexicon(tiny_config, target):
    """On the small SynthPEDES (400 target captions) the bridge finds synonyms, and most of
    those it finds are the generator's; the misses are siblings ("cardigan" -> coat, not
    sweater). Chance would be about one in ten. The lexicon is read here only, never by
    training."""
    cfg = tiny_config(f"data.target.name={target}")
    source = [r.caption for r in load_records(cfg, cfg.data.source, "train").records]
    captions = [r.caption for r in load_records(cfg, cfg.data.target, "train").records]
    aliases = bridge_words(source, captions)
    lexicon = {}
    for canonical, synonyms in CAPTION_STYLES[DOMAIN_STYLES[target].caption_style].synonyms.items():
        for synonym in synonyms:
            if len(split_words(synonym)) == 1 and len(split_words(canonical)) == 1:
                lexicon[synonym] = canonical
    judged = {w: a for w, a in aliases.items() if w in lexicon}
    right = sum(lexicon[w] == a for w, a in judged.items())
    assert len(judged) >= 8 and 3 * right >= 2 * len(judged), sorted(judged.items())


def test_neighbour_features_can_be_limited_to_frequent_words():
    """Real vocabularies keep only the most frequent words as neighbours; the toy's clear
    synonyms survive with the rarest neighbours dropped."""
    kwargs = dict(window=2, min_similarity=0.5, min_margin=0.05)
    full = bridge_words(SOURCE, _target(), **kwargs)
    assert bridge_words(SOURCE, _target(), max_context_words=100, **kwargs) == full
    assert bridge_words(SOURCE, _target(), max_context_words=8, **kwargs) == full
