"""Offline diagnostic: which part of the SynthPEDES domain gap costs a checkpoint its R@1?
(reads target test labels and the generator's synonym lexicon)

    python -m experiments.diagnose_gap --checkpoint DIR

Evaluates text-to-image R@1 of a checkpoint on the target test split under controlled edits:

- ``source_test``: the source test split (in-domain reference);
- ``target_raw`` / ``target_centred``: the target as training sees it, embeddings raw or with
  each modality's target-train mean removed (``gckd.domain_centring`` post hoc);
- ``canonical_*``: the same with every target synonym written back as the source word it
  replaced (``CAPTION_STYLES[...].synonyms``), i.e. what the vocabulary shift alone costs;
- ``unseen_as_mean_*``: token embeddings of words never seen in source training captions set to
  the mean of the seen ones (what an untrained, random embedding costs).

Only SynthPEDES targets have a known lexicon. Training never imports this module.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import re
import sys

import torch

from gckd_ray.checkpoint_format import checkpoint_tokenizer_dir, load_checkpoint_config
from gckd_ray.data.datasets import PairedSplit, build_split, load_records
from gckd_ray.data.synthetic import CAPTION_STYLES, DOMAIN_STYLES
from gckd_ray.data.tokenizer import load_tokenizer
from gckd_ray.evaluate import encode_split, load_encoder, retrieval_metrics_from_embeddings
from gckd_ray.model.centring import SOURCE


def canonical_caption(text: str, synonyms: dict[str, tuple[str, ...]]) -> str:
    """``text`` with each domain synonym replaced by its canonical word (longest first)."""
    pairs = sorted(((s, c) for c, words in synonyms.items() for s in words),
                   key=lambda pair: -len(pair[0]))
    for synonym, canonical in pairs:
        text = re.sub(rf"\b{re.escape(synonym)}\b", canonical, text, flags=re.IGNORECASE)
    return text


def _r1(split: PairedSplit, images: torch.Tensor, texts: torch.Tensor) -> float:
    return retrieval_metrics_from_embeddings(texts, images, split.labels,
                                             split.image_labels)["R1"]


def _unit(x: torch.Tensor) -> torch.Tensor:
    return torch.nn.functional.normalize(x, dim=1)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m experiments.diagnose_gap",
                                     description=__doc__.split("\n\n")[0])
    parser.add_argument("--checkpoint", required=True)
    args = parser.parse_args(argv)
    cfg = load_checkpoint_config(args.checkpoint)
    if cfg.data.target.name not in DOMAIN_STYLES:
        parser.error(f"target {cfg.data.target.name!r} is not a SynthPEDES domain")
    synonyms = dict(CAPTION_STYLES[DOMAIN_STYLES[cfg.data.target.name].caption_style].synonyms)
    tokenizer = load_tokenizer(checkpoint_tokenizer_dir(args.checkpoint))
    encoder = load_encoder(args.checkpoint, cfg, tokenizer)
    size = (cfg.data.image_height, cfg.data.image_width)

    def split(domain, name, edit=None):
        records = load_records(cfg, domain, name)
        if edit:
            records = dataclasses.replace(records, records=[
                dataclasses.replace(r, caption=edit(r.caption)) for r in records.records])
        return build_split(records, tokenizer, cfg.data.text_length, size, True)

    cpu = torch.device("cpu")
    source_train, source_test = (split(cfg.data.source, s) for s in ("train", "test"))
    target_train, target_test = (split(cfg.data.target, s) for s in ("train", "test"))
    canonical = split(cfg.data.target, "test", lambda c: canonical_caption(c, synonyms))
    result = {"source_test": _r1(source_test,
                                 *encode_split(encoder, source_test, cpu, domain=SOURCE))}

    def target_rows(prefix: str) -> None:
        means = [_unit(x).mean(0) for x in encode_split(encoder, target_train, cpu)]
        images, texts = map(_unit, encode_split(encoder, target_test, cpu))
        canonical_texts = _unit(encode_split(encoder, canonical, cpu)[1])
        for name, txt in ((prefix, texts), (f"canonical_{prefix}", canonical_texts)):
            result[f"{name}raw"] = _r1(target_test, images, txt)
            result[f"{name}centred"] = _r1(target_test, images - means[0], txt - means[1])

    target_rows("target_")
    seen = torch.unique(source_train.captions.input_ids[source_train.captions.attention_mask
                                                         .bool()])
    embedding = encoder.clip.text_model.embeddings.token_embedding.weight
    with torch.no_grad():
        unseen = torch.ones(len(embedding), dtype=torch.bool)
        unseen[seen] = False
        embedding[unseen] = embedding[seen].mean(0)
    target_rows("unseen_as_mean_")
    result["unseen_tokens"] = int(unseen.sum())
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
