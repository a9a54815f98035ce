"""Search galleries: a dataset split or a folder of images, embedded into a cached faiss index.

A dataset gallery (``cuhk-pedes``, ``synth-icfg``, ...) is a split's unique images in the order
evaluation uses (``build_split``), with person ids, and its captions can serve as queries; a
folder gallery is every image file under a folder, sorted by path, without ids (unreadable
files are skipped and counted). Embeddings come from ``evaluate.encode_images`` with the
target domain's centring, exactly as evaluation computes them, and are kept L2-normalised in
a faiss ``IndexFlatIP``.

The index is cached in ``<cache>/<hash of checkpoint and gallery paths>/`` as ``index.faiss``
and ``gallery.json``; the latter records a fingerprint (checkpoint weights and config; the
gallery's files with sizes and modification times; the image size) and is written last, so a
cache is used only when complete and when nothing it depends on has changed since.
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass
from pathlib import Path

import faiss
import numpy as np
import torch

from gckd_ray.config import Config, DomainConfig
from gckd_ray.data.datasets import ImageSource, build_split, load_records
from gckd_ray.data.formats import DatasetFormatError, read_image
from gckd_ray.evaluate import encode_images
from gckd_ray.model.centring import TARGET

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp", ".tif", ".tiff")
DEFAULT_CACHE = Path("~/.cache/gckd_ray/search")


@dataclass
class Gallery:
    """Gallery images in index order; ``ids`` (person ids) only for dataset galleries, which
    also carry the split's captions and their ids (queries for ``--query-index``)."""

    name: str
    paths: list[str]
    ids: list[int] | None
    images: ImageSource
    fingerprint: dict
    skipped: int = 0
    captions: list[str] | None = None
    caption_ids: list[int] | None = None


def _stat(path: str | Path) -> list:
    st = os.stat(path)
    return [str(path), st.st_size, st.st_mtime_ns]


def dataset_gallery(cfg: Config, name: str, root: str, split: str, tokenizer) -> Gallery:
    """One split of a dataset in its published format under ``root`` (``--dataset``)."""
    records = load_records(cfg, DomainConfig(name=name, root=root), split)
    size = (cfg.data.image_height, cfg.data.image_width)
    # Decoded on demand: a cached index needs only the few images a result shows.
    built = build_split(records, tokenizer, cfg.data.text_length, size, cache_images=False)
    pids = sorted({r.pid for r in records.records})  # build_split's labels index this list
    annotations = sorted({r.source for r in records.records})
    fingerprint = {"gallery": f"{name}/{split}", "size": list(size),
                   "files": [_stat(p) for p in annotations + built.images.paths]}
    return Gallery(f"{name}/{split}", built.images.paths,
                   [pids[i] for i in built.image_labels.tolist()], built.images, fingerprint,
                   captions=[r.caption for r in records.records],
                   caption_ids=[pids[i] for i in built.labels.tolist()])


def folder_gallery(folder: str | Path, size: tuple[int, int]) -> Gallery:
    """Every image file under ``folder`` (recursive, sorted by path); `drop_unreadable`
    removes the ones that do not decode when the index is built.

    Raises:
        ValueError: the folder holds no image file.
    """
    folder = Path(folder)
    files = sorted(str(p) for p in folder.rglob("*")
                   if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file())
    if not files:
        raise ValueError(f"gallery {folder}: no image files ({', '.join(IMAGE_SUFFIXES)})")
    fingerprint = {"gallery": str(folder.resolve()), "size": list(size),
                   "files": [_stat(p) for p in files]}
    return Gallery(str(folder), files, None, ImageSource(files, [("", -1)] * len(files), size,
                                                         cache=False), fingerprint)


def drop_unreadable(gallery: Gallery) -> tuple[Gallery, list[str]]:
    """The gallery without the files that do not decode; returns the reasons of those
    skipped. Raises ValueError when none is left."""
    kept, reasons = [], []
    for path in gallery.paths:
        try:
            read_image(path)
            kept.append(path)
        except DatasetFormatError as err:
            reasons.append(str(err))
    if not kept:
        raise ValueError(f"gallery {gallery.name}: none of its {len(gallery.paths)} image "
                         f"files can be read (first: {reasons[0]})")
    size = gallery.images.size
    images = ImageSource(kept, [("", -1)] * len(kept), size, cache=False)
    return Gallery(gallery.name, kept, gallery.ids, images, gallery.fingerprint,
                   len(reasons)), reasons


def cache_dir(base: str | Path | None, checkpoint: str | Path, gallery: str | Path,
              dataset: str, split: str) -> Path:
    """``<base>/<hash>``: one folder per (checkpoint, gallery, dataset, split)."""
    key = json.dumps([str(Path(checkpoint).resolve()), str(Path(gallery).resolve()),
                      dataset, split])
    base = Path(base).expanduser() if base else DEFAULT_CACHE.expanduser()
    return base / hashlib.sha256(key.encode()).hexdigest()[:16]


def checkpoint_fingerprint(checkpoint: str | Path) -> list:
    checkpoint = Path(checkpoint)
    config = hashlib.sha256((checkpoint / "config.yaml").read_bytes()).hexdigest()
    return [_stat(checkpoint / "model.pt"), config]


def cached_index(directory: Path, fingerprint: dict) -> tuple[faiss.Index, dict] | None:
    """The index and its gallery.json if ``directory`` holds one built for ``fingerprint``."""
    meta_file = directory / "gallery.json"
    if not meta_file.is_file():
        return None
    meta = json.loads(meta_file.read_text())
    if meta.get("fingerprint") != fingerprint:
        return None
    return faiss.read_index(str(directory / "index.faiss")), meta


def build_index(encoder, gallery: Gallery, directory: Path, fingerprint: dict,
                device: torch.device) -> tuple[faiss.Index, dict]:
    """Embed the gallery (evaluation's embedding, target centring), index it, and cache it."""
    emb = encode_images(encoder, gallery.images, device, TARGET).numpy()
    emb = np.ascontiguousarray(emb, dtype=np.float32)
    faiss.normalize_L2(emb)
    index = faiss.IndexFlatIP(emb.shape[1])
    index.add(emb)
    directory.mkdir(parents=True, exist_ok=True)
    tmp = directory / "index.faiss.tmp"
    faiss.write_index(index, str(tmp))
    os.replace(tmp, directory / "index.faiss")
    meta = {"fingerprint": fingerprint, "name": gallery.name, "paths": gallery.paths,
            "ids": gallery.ids, "skipped": gallery.skipped}
    tmp = directory / "gallery.json.tmp"
    tmp.write_text(json.dumps(meta))
    os.replace(tmp, directory / "gallery.json")  # last: marks the cache complete
    return index, meta


def top_k(index: faiss.Index, query: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """Gallery rows and scores of the ``k`` best matches of one (D,) query, best first;
    equal scores rank by gallery row, as evaluation ranks them."""
    query = np.ascontiguousarray(query.reshape(1, -1), dtype=np.float32)
    faiss.normalize_L2(query)
    wanted = min(index.ntotal, 2 * k)  # spare candidates so ties at the k-th place sort right
    scores, rows = index.search(query, wanted)
    scores, rows = scores[0], rows[0]
    order = np.lexsort((rows, -scores))[:k]
    return rows[order], scores[order]
