"""Offline diagnostic: how good are the teacher's target pseudo-pairs? (reads target labels)

    python -m experiments.diagnose_pseudo_pairs --checkpoint DIR [--thresholds 0.2 0.3 0.5]

Encodes the target TRAIN split with a checkpoint's encoder and reports, per cosine threshold,
how many cross-modal mutual-nearest-neighbour pairs there are and which fraction joins a
caption with an image of the same person. Ground-truth target ids are read here and only here:
training and model selection never see them. Use it to judge how far the teacher can be trusted on the target.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

from gckd_ray.data.datasets import load_split
from gckd_ray.data.tokenizer import load_tokenizer
from gckd_ray.distributed.checkpointing import load_checkpoint_config
from gckd_ray.evaluate import encode_split, load_encoder
from gckd_ray.model.losses import cross_modal_pseudo_pairs


def pair_precision(images: torch.Tensor, texts: torch.Tensor, image_labels: torch.Tensor,
                   text_labels: torch.Tensor, threshold: float) -> dict[str, float]:
    pairs = cross_modal_pseudo_pairs(images, texts, threshold)  # (M, N)
    img, txt = pairs.nonzero(as_tuple=True)
    correct = (image_labels[img] == text_labels[txt]).float()
    return {"threshold": threshold, "pairs": int(len(img)),
            "caption_coverage": len(txt) / len(texts),
            "precision": float(correct.mean()) if len(img) else float("nan")}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m experiments.diagnose_pseudo_pairs",
                                     description=__doc__.split("\n\n")[0])
    parser.add_argument("--checkpoint", required=True)
    parser.add_argument("--thresholds", nargs="+", type=float, default=[0.0, 0.2, 0.3, 0.4, 0.5])
    args = parser.parse_args(argv)
    cfg = load_checkpoint_config(args.checkpoint)
    tokenizer = load_tokenizer(Path(args.checkpoint) / "tokenizer")
    split = load_split(cfg, cfg.data.target, "train", tokenizer, verbose=True)
    images, texts = encode_split(load_encoder(args.checkpoint, cfg, tokenizer), split,
                                 torch.device("cpu"))
    for threshold in args.thresholds:
        print(json.dumps(pair_precision(images, texts, split.image_labels, split.labels,
                                        threshold)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
