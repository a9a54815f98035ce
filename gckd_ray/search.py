"""``python -m gckd_ray.search``: text-to-image person search with a trained checkpoint
(thin entry point; galleries and the cached faiss index are in gckd_ray/gallery.py).

    python -m gckd_ray.search --checkpoint DIR --gallery FOLDER --query "a man in a black
        jacket ..." --top 10 --out result.png
    python -m gckd_ray.search --checkpoint DIR --gallery ROOT --dataset icfg-pedes \\
        --split test --query-index 12 --out result.png

Prints the ranked list with scores and writes a PNG grid of the top-k images under the query.
With ``--dataset`` the gallery is that split of a dataset in its published format (ids known:
with ``--query-index N`` its N-th caption is the query, and matches of the query's person are
framed green, others red); otherwise every image file under the folder, without ids.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np
import torch

from gckd_ray.config import DATASET_NAMES, override_config
from gckd_ray.errors import InputError, one_line
from gckd_ray.evaluate import add_device_argument, resolve_device


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m gckd_ray.search",
        description="Rank gallery images for a caption with a trained checkpoint; writes the "
                    "top-k as a PNG grid.")
    parser.add_argument("--checkpoint", required=True, help="checkpoint directory of a run")
    parser.add_argument("--gallery", required=True,
                        help="image folder, or with --dataset the dataset's root folder")
    parser.add_argument("--dataset", choices=DATASET_NAMES,
                        help="read --gallery as this dataset (person ids known)")
    parser.add_argument("--split", default="test", choices=("train", "val", "test"))
    query = parser.add_mutually_exclusive_group(required=True)
    query.add_argument("--query", help="free-text caption")
    query.add_argument("--query-index", type=int,
                       help="use caption N of the --dataset split as the query")
    parser.add_argument("--top", type=int, default=10, help="images to list and draw")
    parser.add_argument("--out", default="result.png", help="PNG grid of the top images")
    parser.add_argument("--cache", default=None,
                        help="index cache folder (default ~/.cache/gckd_ray/search)")
    add_device_argument(parser)
    parser.add_argument("overrides", nargs="*", metavar="key=value",
                        help="overrides on the checkpoint's config, e.g. "
                             "data.on_bad_record=skip")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return _search(args)
    except InputError as err:
        print(one_line(err), file=sys.stderr)
        return 2
    except (FileNotFoundError, ValueError) as err:  # bad --gallery or --top
        print(f"error: {err}", file=sys.stderr)
        return 2


def _search(args) -> int:
    from gckd_ray import gallery as galleries
    from gckd_ray.data.datasets import Captions
    from gckd_ray.data.tokenizer import load_tokenizer
    from gckd_ray.checkpoint_format import checkpoint_tokenizer_dir, load_checkpoint_config
    from gckd_ray.evaluate import encode_texts, load_encoder

    if args.top < 1:
        raise ValueError(f"--top must be >= 1, got {args.top}")
    if args.query_index is not None and not args.dataset:
        raise ValueError("--query-index needs --dataset (captions come from a dataset split)")
    if args.query is not None and not args.query.strip():
        raise ValueError("--query is empty")
    device = resolve_device(args.device)
    checkpoint, root = Path(args.checkpoint), Path(args.gallery)
    if not checkpoint.is_dir():
        raise FileNotFoundError(f"checkpoint {checkpoint} does not exist")
    if not root.is_dir():
        raise FileNotFoundError(f"gallery {root} is not a folder")
    cfg = override_config(load_checkpoint_config(checkpoint), args.overrides)
    tokenizer = load_tokenizer(checkpoint_tokenizer_dir(checkpoint))
    gallery = (galleries.dataset_gallery(cfg, args.dataset, str(root), args.split, tokenizer)
               if args.dataset else
               galleries.folder_gallery(root, (cfg.data.image_height, cfg.data.image_width)))
    text, query_id = _query(args, gallery)
    encoder = load_encoder(checkpoint, cfg, tokenizer).to(device)

    index, meta = _index(args, encoder, gallery, device)
    ids, mask, _ = tokenizer.encode([text], cfg.data.text_length)
    query = encode_texts(encoder, Captions(ids, mask, 0), device).numpy()[0]
    rows, scores = galleries.top_k(index, query, args.top)
    ids_of = meta["ids"]
    correct = [None if query_id is None else ids_of[r] == query_id for r in rows]
    _print_ranking(text, query_id, rows, scores, meta, correct)
    _draw(text, query_id, rows, scores, meta, correct, args.out)
    print(f"wrote {args.out}", flush=True)
    return 0


def _index(args, encoder, gallery, device: torch.device):
    """The gallery's faiss index and its metadata (paths, ids): from the cache when it was
    built for this checkpoint and these gallery files, else built and cached."""
    from gckd_ray import gallery as galleries

    fingerprint = {"checkpoint": galleries.checkpoint_fingerprint(args.checkpoint),
                   **gallery.fingerprint}
    directory = galleries.cache_dir(args.cache, args.checkpoint, args.gallery,
                                    args.dataset or "", args.split)
    found = galleries.cached_index(directory, fingerprint)
    if found is not None:
        index, meta = found
        skipped = f", {meta['skipped']} unreadable skipped" if meta["skipped"] else ""
        print(f"index cached: {directory} ({index.ntotal} images{skipped})", flush=True)
        return index, meta
    start = time.perf_counter()
    if gallery.ids is None:
        gallery, reasons = galleries.drop_unreadable(gallery)
        if reasons:
            print(f"skipped {len(reasons)} unreadable image(s); first: {reasons[0]}",
                  flush=True)
    index, meta = galleries.build_index(encoder, gallery, directory, fingerprint, device)
    print(f"index built: {directory} ({index.ntotal} images, "
          f"{time.perf_counter() - start:.1f} s)", flush=True)
    return index, meta


def _query(args, gallery) -> tuple[str, int | None]:
    """The query caption and its person id (None for free text: ids unknown)."""
    if args.query_index is None:
        return args.query.strip(), None
    n = len(gallery.captions)
    if not 0 <= args.query_index < n:
        raise ValueError(f"--query-index must be in [0, {n - 1}] ({gallery.name} has {n} "
                         f"captions), got {args.query_index}")
    return gallery.captions[args.query_index], gallery.caption_ids[args.query_index]


def _print_ranking(text, query_id, rows, scores, meta, correct) -> None:
    known = f" (person id {query_id})" if query_id is not None else ""
    print(f"query: {text!r}{known}")
    print(f"{'rank':>4} {'score':>7} {'id':>6} {'match':>5}  image")
    for rank, (row, score, hit) in enumerate(zip(rows, scores, correct), 1):
        pid = meta["ids"][row] if meta["ids"] is not None else "-"
        match = "-" if hit is None else ("yes" if hit else "no")
        print(f"{rank:>4} {score:7.4f} {pid!s:>6} {match:>5}  {meta['paths'][row]}")
    if query_id is not None:
        total = sum(pid == query_id for pid in meta["ids"])
        print(f"correct in the top {len(rows)}: {sum(correct)} of the {total} gallery images "
              f"of person {query_id}", flush=True)


def _draw(text, query_id, rows, scores, meta, correct, out) -> None:
    from gckd_ray.data.formats import read_image
    from gckd_ray.plots import result_grid

    images = [np.asarray(read_image(meta["paths"][row])) for row in rows]
    labels = [f"#{rank} {score:.3f}" + (f" id {meta['ids'][row]}" if meta["ids"] else "")
              for rank, (row, score) in enumerate(zip(rows, scores), 1)]
    title = text + (f"  [person {query_id}]" if query_id is not None else "")
    result_grid(title, images, labels, correct, out)


if __name__ == "__main__":
    sys.exit(main())
