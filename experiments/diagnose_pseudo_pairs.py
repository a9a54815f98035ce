"""Offline diagnostic: how good are the target pseudo-pairs? (reads target labels)

    python -m experiments.diagnose_pseudo_pairs --checkpoint DIR [--thresholds 0.0 0.3] [--k 1]
        [--image-k 1 2]

Encodes the target TRAIN split with a checkpoint's encoder and builds the memory's own
pseudo-id graph edges (``cross_modal_mutual_edges``, raw and centred per modality as
``gckd.pseudo_center`` does); reports, per cosine threshold, how many image-caption edges there
are and which fraction joins a caption with an image of the same person; then the same for
the image-image mutual edges of ``gckd.pseudo_image_k``. Ground-truth target ids are read here
and only here: training and model selection never see them. Use it to judge how far the
teacher can be trusted on the target.
"""

from __future__ import annotations

import argparse
import json
import sys

import numpy as np
import torch

from gckd_ray.checkpoint_format import checkpoint_tokenizer_dir, load_checkpoint_config
from gckd_ray.data.datasets import load_split
from gckd_ray.data.tokenizer import load_tokenizer
from gckd_ray.model.pseudo_ids import (centred_rows, cross_modal_mutual_edges, image_mutual_edges,
                                       normalised_rows)
from gckd_ray.evaluate import encode_split, load_encoder


def pair_precision(images: np.ndarray, texts: np.ndarray, image_labels: np.ndarray,
                   text_labels: np.ndarray, k: int, threshold: float) -> dict[str, float]:
    edges = cross_modal_mutual_edges(images, texts, k, threshold, num_threads=0)  # every core
    img, txt = edges[:, 0], edges[:, 1] - len(images)
    correct = image_labels[img] == text_labels[txt]
    return {"k": k, "threshold": threshold, "pairs": int(len(edges)),
            "caption_coverage": len(np.unique(txt)) / len(texts),
            "precision": float(correct.mean()) if len(edges) else float("nan")}


def image_pair_precision(images: np.ndarray, image_labels: np.ndarray, k: int
                         ) -> dict[str, float]:
    """The same for ``gckd.pseudo_image_k``'s image-image mutual edges."""
    edges = image_mutual_edges(images, k, num_threads=0)
    correct = image_labels[edges[:, 0]] == image_labels[edges[:, 1]]
    return {"image_k": k, "pairs": int(len(edges)),
            "image_coverage": len(np.unique(edges)) / len(images),
            "precision": float(correct.mean()) if len(edges) else float("nan")}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m experiments.diagnose_pseudo_pairs",
                                     description=__doc__.split("\n\n")[0])
    parser.add_argument("--checkpoint", required=True)
    parser.add_argument("--thresholds", nargs="+", type=float, default=[0.0, 0.2, 0.3, 0.4, 0.5])
    parser.add_argument("--k", type=int, default=1, help="as gckd.pseudo_k")
    parser.add_argument("--image-k", type=int, nargs="*", default=[1],
                        help="as gckd.pseudo_image_k: image-image mutual edges (none: skip)")
    args = parser.parse_args(argv)
    cfg = load_checkpoint_config(args.checkpoint)
    tokenizer = load_tokenizer(checkpoint_tokenizer_dir(args.checkpoint))
    split = load_split(cfg, cfg.data.target, "train", tokenizer, verbose=True)
    images, texts = encode_split(load_encoder(args.checkpoint, cfg, tokenizer), split,
                                 torch.device("cpu"))
    labels = split.image_labels.numpy(), split.labels.numpy()
    for name, prepare in (("raw", normalised_rows), ("centred", centred_rows)):
        for threshold in args.thresholds:
            stats = pair_precision(prepare(images.numpy()), prepare(texts.numpy()), *labels,
                                   args.k, threshold)
            print(json.dumps({"features": name, **stats}))
        for k in args.image_k:
            stats = image_pair_precision(prepare(images.numpy()), labels[0], k)
            print(json.dumps({"features": name, **stats}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
