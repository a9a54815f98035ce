"""Tensors a training step consumes: labelled source pairs, unpaired target streams, eval splits.

Captions are tokenised once up front; images are decoded once into a uint8 cache (SynthPEDES)
or on demand with a thread pool (large real datasets). Batches are index lists drawn by seeded,
rank-aware samplers, so every worker sees a disjoint shard and a run is reproducible from
``(seed, epoch)`` alone. The target training data is exposed as two independent streams (images,
captions) carrying no ids and no pairing unless ``data.target.paired`` asks for it.
"""

from __future__ import annotations

import concurrent.futures
import os
from dataclasses import dataclass

import numpy as np
import torch

from gckd_ray.config import DATASET_NAMES, Config, DomainConfig
from gckd_ray.data.bad_images import BadImages, stand_in_rows
from gckd_ray.data.formats import (FORMATS, IMAGE_DIR, SYNTH_FORMATS, DatasetFormatError,
                                   DomainRecords, Record, read_annotations, read_image)
from gckd_ray.data.synthetic import ensure_synthetic
from gckd_ray.data.tokenizer import Tokenizer
from gckd_ray.data.transforms import pil_to_uint8


class ImageSource:
    """Unique images of one split, fetched as uint8 batches ``(B, 3, H, W)``.

    With ``bad`` (``data.on_bad_image=skip``) an image that does not decode is recorded there
    and replaced by the next decodable image of its group (``groups``: one id per row; None:
    one group), as `bad_images` describes; without it, it raises `DatasetFormatError`.
    """

    def __init__(self, paths: list[str], where: list[tuple[str, int]], size: tuple[int, int],
                 cache: bool, threads: int = 4, groups: list[int] | None = None,
                 bad: BadImages | None = None):
        self.paths, self.where, self.size = paths, where, size
        self.groups, self.bad = groups, bad
        self._rows_of: dict[int, list[int]] = {}
        for row, group in enumerate(groups or ()):
            self._rows_of.setdefault(group, []).append(row)
        self._pool = concurrent.futures.ThreadPoolExecutor(threads) if not cache else None
        self._pool_pid = os.getpid()
        self._cache = self._decode(range(len(paths))) if cache else None

    def __len__(self) -> int:
        return len(self.paths)

    def _load(self, i: int) -> torch.Tensor:
        if self.bad is None:
            return pil_to_uint8(read_image(self.paths[i], *self.where[i]), self.size)
        for row in stand_in_rows(i, self.groups, self._rows_of, len(self.paths)):
            if self.paths[row] in self.bad:  # it failed before and would fail again
                continue
            try:
                return pil_to_uint8(read_image(self.paths[row], *self.where[row]), self.size)
            except DatasetFormatError as err:
                self.bad.add(self.paths[row], str(err))
        source, index = self.where[i]
        group = ("target training image" if self.groups is None
                 else f"image of person {self.groups[i]}")
        raise DatasetFormatError(f"{source}: record {index}: image {self.paths[i]} does not "
                                 f"decode, nor does any other {group} to stand in for it "
                                 f"(data.on_bad_image=skip)")

    def _decode(self, indices) -> torch.Tensor:
        indices = list(indices)
        out = torch.empty((len(indices), 3, *self.size), dtype=torch.uint8)
        # A forked loader process (data/loader.py) inherits the pool but not its threads, which
        # would leave its work queued forever; there it decodes in its own thread (the loader
        # processes are the parallelism).
        threaded = self._pool is not None and os.getpid() == self._pool_pid
        loaded = self._pool.map(self._load, indices) if threaded else map(self._load, indices)
        for row, img in enumerate(loaded):
            out[row] = img
        return out

    def fetch(self, indices: torch.Tensor) -> torch.Tensor:
        if self._cache is not None:
            return self._cache[indices]
        return self._decode(indices.tolist())


@dataclass
class Captions:
    """Tokenised captions of one split: ``input_ids``/``attention_mask`` (N, L)."""

    input_ids: torch.Tensor
    attention_mask: torch.Tensor
    truncated: int

    def __len__(self) -> int:
        return self.input_ids.shape[0]

    def take(self, indices: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return self.input_ids[indices], self.attention_mask[indices]


@dataclass
class PairedSplit:
    """One labelled split: caption i describes image ``image_of[i]`` of person ``labels[i]``.

    ``labels`` are contiguous 0..num_ids-1 (ID-loss classes); ``pids`` keep the dataset's ids.
    """

    name: str
    images: ImageSource
    captions: Captions
    image_of: torch.Tensor      # (N,) caption -> image row
    labels: torch.Tensor        # (N,) contiguous person label per caption
    image_labels: torch.Tensor  # (M,) contiguous person label per image
    num_ids: int

    def batch(self, caption_idx: torch.Tensor) -> dict[str, torch.Tensor]:
        ids, mask = self.captions.take(caption_idx)
        return {"images": self.images.fetch(self.image_of[caption_idx]), "input_ids": ids,
                "attention_mask": mask, "pids": self.labels[caption_idx]}


def build_split(domain: DomainRecords, tokenizer: Tokenizer, text_length: int,
                image_size: tuple[int, int], cache_images: bool,
                bad_images: BadImages | None = None) -> PairedSplit:
    """Index a split's records: unique images in first-seen order, contiguous person labels.
    ``bad_images``: replace and record images that do not decode (``data.on_bad_image=skip``;
    a stand-in is another image of the same person); None: they raise."""
    if not domain.records:
        raise ValueError(f"{domain.name}/{domain.split}: no records left to train or evaluate on")
    image_row: dict[str, int] = {}
    paths, where, image_pid = [], [], []
    for rec in domain.records:
        if rec.image_key not in image_row:
            image_row[rec.image_key] = len(paths)
            paths.append(rec.image_path)
            where.append((rec.source, rec.index))
            image_pid.append(rec.pid)
    label_of = {pid: i for i, pid in enumerate(sorted(set(image_pid)))}
    ids, mask, truncated = tokenizer.encode([r.caption for r in domain.records], text_length)
    return PairedSplit(
        name=f"{domain.name}/{domain.split}",
        images=ImageSource(paths, where, image_size, cache_images, groups=image_pid,
                           bad=bad_images),
        captions=Captions(ids, mask, truncated),
        image_of=torch.tensor([image_row[r.image_key] for r in domain.records]),
        labels=torch.tensor([label_of[r.pid] for r in domain.records]),
        image_labels=torch.tensor([label_of[p] for p in image_pid]),
        num_ids=len(label_of),
    )


def load_domain(name: str, root: str, split: str, on_bad_record: str = "error",
                synth_seed: int = 0, synth_cache: str = "",
                synth_scale: float = 1.0) -> DomainRecords:
    """Read one split of a named dataset; SynthPEDES domains come from the generator's cache.

    Args:
        name: one of ``config.DATASET_NAMES``.
        root: folder holding the annotation JSON and ``imgs/``; for a synth-* domain ``""``
            means the generated cache (``ensure_synthetic(synth_cache, synth_seed,
            synth_scale) / name``).
        split: "train" | "val" | "test".
        on_bad_record: "error" | "skip".
        synth_seed, synth_cache, synth_scale: the SynthPEDES generation to use.

    Returns:
        The split's records, named ``name``.
    """
    if name in SYNTH_FORMATS:
        if not root:
            root = str(ensure_synthetic(synth_cache, synth_seed, synth_scale) / name)
        return read_annotations(SYNTH_FORMATS[name], root, split, on_bad_record, name=name)
    if name not in FORMATS:
        raise ValueError(f"unknown dataset {name!r}; known: {', '.join(DATASET_NAMES)}")
    if not root:
        raise ValueError(f"dataset {name!r} needs a root: the folder holding "
                         f"{FORMATS[name].annotation} and {IMAGE_DIR}/")
    return read_annotations(name, root, split, on_bad_record, name=name)


def load_records(cfg: Config, domain: DomainConfig, split: str) -> DomainRecords:
    return load_domain(domain.name, domain.root, split, cfg.data.on_bad_record,
                       cfg.data.synth_seed, cfg.data.synth_cache, cfg.data.synth_scale)


def labelled_domain(cfg: Config) -> DomainConfig:
    """The domain whose labels train: the source (the oracle trains on target labels: a
    measurement-only upper bound, never a GCKD input)."""
    return cfg.data.target if cfg.method == "oracle" else cfg.data.source


def check_batches_fit(cfg: Config, labelled: DomainRecords) -> None:
    """Refuse, before any worker starts, a labelled split with too few identities for one
    identity-balanced batch on every worker (``IdentityBalancedSampler`` would fail in each)."""
    ids = len({r.pid for r in labelled.records})
    per_batch = cfg.train.batch_size // cfg.train.instances_per_id
    workers = cfg.train.num_workers
    if ids >= per_batch * workers:
        return
    fits = (ids // workers) * cfg.train.instances_per_id
    fix = (f"train.batch_size={fits}" if fits >= cfg.train.instances_per_id
           else f"train.num_workers={max(1, ids // per_batch)} or a larger dataset")
    raise DatasetFormatError(
        f"{labelled.name}/{labelled.split}: {ids} identities, but train.batch_size="
        f"{cfg.train.batch_size} with train.instances_per_id={cfg.train.instances_per_id} needs "
        f"{per_batch} per batch on each of train.num_workers={workers} workers "
        f"({per_batch * workers}); set {fix}")


def load_split(cfg: Config, domain: DomainConfig, split: str, tokenizer: Tokenizer,
               verbose: bool = False, bad_images: BadImages | None = None) -> PairedSplit:
    """Read, validate and index one labelled split; prints the reader's summary line.
    ``bad_images``: as `build_split`."""
    records = load_records(cfg, domain, split)
    if verbose:
        print(records.summary(), flush=True)
    built = build_split(records, tokenizer, cfg.data.text_length,
                        (cfg.data.image_height, cfg.data.image_width), cfg.data.cache_images,
                        bad_images)
    if verbose and built.captions.truncated:
        print(f"{built.name}: {built.captions.truncated} captions truncated to "
              f"{cfg.data.text_length} tokens", flush=True)
    return built


def load_unpaired(cfg: Config, tokenizer: Tokenizer, verbose: bool = False,
                  bad_images: BadImages | None = None) -> UnpairedTarget:
    """The target training split as GCKD sees it (`build_unpaired`); prints the reader's
    summary line and the count of truncated captions, as `load_split` does."""
    records = load_records(cfg, cfg.data.target, "train")
    if verbose:
        print(records.summary(), flush=True)
    target = build_unpaired(records, tokenizer, cfg.data.text_length,
                            (cfg.data.image_height, cfg.data.image_width), cfg.data.cache_images,
                            cfg.data.target.paired, bad_images)
    if verbose and target.captions.truncated:
        print(f"{records.name}/train: {target.captions.truncated} captions truncated to "
              f"{cfg.data.text_length} tokens", flush=True)
    return target


def _epoch_generator(seed: int, epoch: int, stream: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed * 1_000_003 + epoch * 101 + stream)


class IdentityBalancedSampler:
    """Batches of ``batch_size // instances`` distinct identities x ``instances`` captions each.

    ``unit="identities"``: an epoch takes every identity once, ``instances`` of its captions
    (drawn with replacement when it has fewer). ``unit="captions"`` (IRRA's epoch): every
    caption once; each identity's shuffled captions are cut into groups of ``instances`` (the
    last one topped up from the same identity) and a batch takes one group from each of
    ``batch_size // instances`` identities drawn in proportion to their remaining groups, so
    the identities drain together; when fewer remain than a batch needs, a fresh pass of groups
    is added (an epoch stays a fixed number of steps). Batches are dealt round-robin to ranks
    and trimmed so every rank gets the same number of steps (collectives stay in lockstep).
    """

    def __init__(self, labels: torch.Tensor, batch_size: int, instances: int, seed: int,
                 rank: int = 0, world_size: int = 1, unit: str = "identities"):
        self.batch_size, self.instances, self.seed = batch_size, instances, seed
        self.rank, self.world_size, self.unit = rank, world_size, unit
        order = torch.argsort(labels, stable=True)
        counts = torch.bincount(labels)
        self._members = torch.split(order, counts.tolist())
        self.ids_per_batch = batch_size // instances
        if len(self._members) < self.ids_per_batch * world_size:
            raise ValueError(f"{len(self._members)} identities cannot fill one batch of "
                             f"{self.ids_per_batch} identities on each of {world_size} workers")
        groups = (len(self._members) if unit == "identities"
                  else sum(-(-len(m) // instances) for m in self._members))
        self.steps_per_epoch = groups // self.ids_per_batch // world_size

    def epoch(self, epoch: int) -> list[torch.Tensor]:
        gen = _epoch_generator(self.seed, epoch, 0)
        usable = self.steps_per_epoch * self.world_size
        if self.unit == "captions":
            batches = self._caption_batches(gen, usable)
        else:
            ids = torch.randperm(len(self._members), generator=gen)
            flat = torch.cat([self._pick(self._members[pid], gen) for pid in ids.tolist()])
            batches = list(flat.split(self.batch_size))
        return batches[self.rank:usable:self.world_size]

    def _pick(self, members: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
        if len(members) >= self.instances:
            return members[torch.randperm(len(members), generator=gen)[: self.instances]]
        return members[torch.randint(len(members), (self.instances,), generator=gen)]

    def _groups(self, members: torch.Tensor, gen: torch.Generator) -> list[torch.Tensor]:
        """One identity's captions, shuffled, in groups of ``instances`` (the last topped up)."""
        shuffled = members[torch.randperm(len(members), generator=gen)]
        short = -len(shuffled) % self.instances
        if short:
            extra = members[torch.randint(len(members), (short,), generator=gen)]
            shuffled = torch.cat([shuffled, extra])
        return list(shuffled.split(self.instances))

    def _caption_batches(self, gen: torch.Generator, count: int) -> list[torch.Tensor]:
        pending: list[list[torch.Tensor]] = [[] for _ in self._members]
        remaining = torch.zeros(len(self._members), dtype=torch.float64)  # groups per identity
        batches = []
        while len(batches) < count:
            if int((remaining > 0).sum()) < self.ids_per_batch:  # a fresh pass of groups
                for pid, members in enumerate(self._members):
                    pending[pid].extend(self._groups(members, gen))
                remaining = torch.tensor([len(p) for p in pending], dtype=torch.float64)
            ids = torch.multinomial(remaining, self.ids_per_batch, replacement=False,
                                    generator=gen)
            remaining[ids] -= 1
            batches.append(torch.cat([pending[pid].pop(0) for pid in ids.tolist()]))
        return batches


class UnpairedStreams:
    """The target training set as the GCKD setting sees it: two independent streams.

    ``epoch(e)`` yields ``(image_rows, caption_rows)`` per step, drawn from independent
    permutations, so a caption batch says nothing about which image it describes. It holds no
    ids at all: nothing downstream can read target labels from it.
    """

    def __init__(self, num_images: int, num_captions: int, batch_size: int, seed: int,
                 rank: int = 0, world_size: int = 1):
        self.num_images, self.num_captions = num_images, num_captions
        self.batch_size, self.seed = batch_size, seed
        self.rank, self.world_size = rank, world_size

    def _stream(self, n: int, epoch: int, stream: int, steps: int) -> list[torch.Tensor]:
        gen = _epoch_generator(self.seed, epoch, stream)
        need = steps * self.world_size * self.batch_size
        reps = -(-need // n)
        flat = torch.cat([torch.randperm(n, generator=gen) for _ in range(reps)])[:need]
        return list(flat.split(self.batch_size))[self.rank::self.world_size]

    def epoch(self, epoch: int, steps: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
        images = self._stream(self.num_images, epoch, 1, steps)
        captions = self._stream(self.num_captions, epoch, 2, steps)
        return list(zip(images, captions))


@dataclass
class UnpairedTarget:
    """Target training data with ids removed: images and captions, and - only in the
    ``paired: true`` variant - which image each caption describes.

    Images are ordered by file key and captions by text, so in the default unpaired setting not
    even row order hints at which caption describes which image; shuffling captions across
    images or permuting ids in the annotation file leaves this object unchanged.
    """

    images: ImageSource
    captions: Captions
    image_of: torch.Tensor | None = None  # (N,) caption row -> image row; paired variant only


def target_order(records: list[Record]) -> tuple[list[str], list[Record]]:
    """The memory's target rows: image keys sorted, captions sorted by (text, image key)."""
    keys = sorted({rec.image_key for rec in records})
    return keys, sorted(records, key=lambda r: (r.caption, r.image_key))


def target_pairs(records: list[Record]) -> np.ndarray:
    """Caption row -> image row of the target training set in ``build_unpaired``'s order (the
    paired variant's known pairs; ids are not part of it)."""
    keys, captions = target_order(records)
    row = {k: i for i, k in enumerate(keys)}
    return np.array([row[r.image_key] for r in captions], np.int64)


def build_unpaired(domain: DomainRecords, tokenizer: Tokenizer, text_length: int,
                   image_size: tuple[int, int], cache_images: bool,
                   paired: bool = False, bad_images: BadImages | None = None) -> UnpairedTarget:
    """``bad_images``: replace and record images that do not decode (a stand-in is another
    target image: they carry no ids); None: they raise."""
    if not domain.records:
        raise ValueError(f"{domain.name}/{domain.split}: no records left to adapt on")
    keys, captions = target_order(domain.records)
    image_of = torch.from_numpy(target_pairs(domain.records)) if paired else None
    return _unpaired(domain, keys, captions, tokenizer, text_length, image_size, cache_images,
                     image_of, bad_images)


def sample_unpaired(domain: DomainRecords, tokenizer: Tokenizer, text_length: int,
                    image_size: tuple[int, int], cache_images: bool, n: int,
                    seed: int, bad_images: BadImages | None = None) -> UnpairedTarget:
    """Up to ``n`` target images and ``n`` target captions, each set drawn independently (no
    ids, no pairing): the data of the label-free selection criterion. The draw depends only
    on ``seed`` and the sorted image keys and caption texts, as ``build_unpaired``'s order."""
    if not domain.records:
        raise ValueError(f"{domain.name}/{domain.split}: no records left to adapt on")
    keys, captions = target_order(domain.records)
    gen = torch.Generator().manual_seed(seed)
    image_rows = torch.randperm(len(keys), generator=gen)[:n].sort().values.tolist()
    caption_rows = torch.randperm(len(captions), generator=gen)[:n].sort().values.tolist()
    return _unpaired(domain, [keys[i] for i in image_rows], [captions[i] for i in caption_rows],
                     tokenizer, text_length, image_size, cache_images, None, bad_images)


def _unpaired(domain: DomainRecords, keys: list[str], captions: list[Record],
              tokenizer: Tokenizer, text_length: int, image_size: tuple[int, int],
              cache_images: bool, image_of: torch.Tensor | None,
              bad_images: BadImages | None) -> UnpairedTarget:
    first: dict[str, tuple[str, str, int]] = {}
    for rec in domain.records:
        first.setdefault(rec.image_key, (rec.image_path, rec.source, rec.index))
    paths = [first[k][0] for k in keys]
    where = [(first[k][1], first[k][2]) for k in keys]
    ids, mask, truncated = tokenizer.encode([r.caption for r in captions], text_length)
    return UnpairedTarget(ImageSource(paths, where, image_size, cache_images, bad=bad_images),
                          Captions(ids, mask, truncated), image_of)
