"""Images/s of the training data pipelines and the share of a training step spent waiting on data.

    python -m benchmarks.data_loading [--steps 20] [--upscale 2.5] [--smoke] [key=value ...]

Two pipelines over the real dataset objects (``data/datasets.py``), as one Ray Train worker
runs them (``train.cpus_per_worker`` torch threads; no loader processes: images are fetched in
the step's own thread, decoded by ``ImageSource``'s thread pool when not cached):

* ``synthpedes``: the default, SynthPEDES decoded once into a uint8 cache
  (``data.cache_images``), then per step the source batch and the target image + caption
  batches (``PairedSplit.batch``, ``TargetFeed.batch``) with the adaptation phase's views
  (``adaptation.views``: IRRA flip/pad/crop, the student's strong view, CLIP normalisation).
* ``real_format``: the same steps from files, ``data.cache_images=false``: a real-format copy of
  synth-cuhk (``cuhk-pedes``, PNG) and synth-icfg (``icfg-pedes``, JPEG), images upscaled by
  ``--upscale`` to a real crop's resolution, read with the real readers (``read_image`` decode,
  bicubic resize to the configured size, then the same augmentation).

The loop is the worker's: per step the data work, then the config's GCKD step (forward with
``adapt=True``, no memory snapshot, backward, torch AdamW, EMA). Images/s = the step's source and
target images / its data time; the wait share = data time / step time (medians over the steps
after the first), data being fetched in the step's thread (nothing prefetches). Timing the data
work in the loop, not alone: alone, the large per-step image tensors are freed and faulted in
again every step, which made the 384x128 pipelines look 2x slower than they run in training.
The last line is JSON.
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from pathlib import Path

import torch
from PIL import Image

from gckd_ray.config import load_config
from gckd_ray.data.datasets import (IdentityBalancedSampler, build_unpaired, load_records,
                                    load_split)
from gckd_ray.data.formats import FORMATS, IMAGE_DIR, SYNTH_FORMATS
from gckd_ray.data.tokenizer import WordTokenizer
from gckd_ray.data.transforms import TrainAugment
from gckd_ray.model.gckd import build_gckd

SMOKE = ("data.synth_scale=0.05", "train.batch_size=8", "model.hidden_size=32",
         "model.embed_dim=32", "model.num_layers=1", "model.num_heads=2")
# Real-format copy: (SynthPEDES domain, format it is read as, image file type).
REAL_COPY = {"source": ("synth-cuhk", "cuhk-pedes", "PNG"),
             "target": ("synth-icfg", "icfg-pedes", "JPEG")}


def write_real_format(cfg, out: Path, upscale: float, max_records: int) -> dict[str, Path]:
    """Copy the first ``max_records`` training records of the source and target SynthPEDES
    domains into real-format folders (annotation file + ``imgs/``), images re-encoded as the
    real datasets store them and upscaled. Returns {"source"|"target": dataset root}."""
    roots = {}
    for role, (synth, fmt, kind) in REAL_COPY.items():
        spec = FORMATS[fmt]
        synth_root = Path(load_records(cfg, getattr(cfg.data, role), "train").records[0]
                          .source).parent
        items = [item for item in json.loads((synth_root / spec.annotation).read_text())
                 if item["split"] == "train"][:max_records]
        root = out / fmt
        for item in items:
            rel = Path(item[spec.path_key]).with_suffix(".jpg" if kind == "JPEG" else ".png")
            target = root / IMAGE_DIR / rel
            if not target.exists():
                target.parent.mkdir(parents=True, exist_ok=True)
                with Image.open(synth_root / IMAGE_DIR / item[spec.path_key]) as image:
                    size = (round(image.width * upscale), round(image.height * upscale))
                    image.convert("RGB").resize(size, Image.Resampling.BICUBIC).save(
                        target, kind, **({"quality": 90} if kind == "JPEG" else {}))
            item[spec.path_key] = rel.as_posix()
        (root / spec.annotation).write_text(json.dumps(items))
        roots[role] = root
    return roots


def _pipeline(cfg, tokenizer, steps: int):
    """(source split, target feed, sampler batches, target batches) of one worker."""
    from gckd_ray.distributed.adaptation import TargetFeed

    split = load_split(cfg, cfg.data.source, "train", tokenizer)
    target = build_unpaired(load_records(cfg, cfg.data.target, "train"), tokenizer,
                            cfg.data.text_length, (cfg.data.image_height, cfg.data.image_width),
                            cfg.data.cache_images)
    sampler = IdentityBalancedSampler(split.labels, cfg.train.batch_size,
                                      cfg.train.instances_per_id, cfg.run.seed,
                                      0, cfg.train.num_workers)
    batches = [b for epoch in range(-(-steps // sampler.steps_per_epoch))
               for b in sampler.epoch(epoch)][:steps]
    feed = TargetFeed(target, cfg, 0, cfg.train.num_workers)
    return split, feed, batches, feed.epoch(0, len(batches))


def measure(cfg, tokenizer, steps: int) -> dict:
    """Median per-step data seconds and whole-step seconds of one pipeline."""
    from gckd_ray.distributed.adaptation import views

    split, feed, batches, targets = _pipeline(cfg, tokenizer, steps)
    augment, cpu = TrainAugment(seed=cfg.run.seed), torch.device("cpu")
    torch.manual_seed(cfg.run.seed)
    model = build_gckd(cfg, tokenizer, split.num_ids).train()
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad],
                                  lr=cfg.train.lr)
    data_s, step_s, images = [], [], 0
    for i, (idx, (image_rows, text_rows)) in enumerate(zip(batches, targets)):
        start = time.perf_counter()
        src = split.batch(idx)
        src.update(views(src.pop("images"), augment, cfg.gckd.strong_views))
        tgt = feed.batch(image_rows, text_rows, augment, cfg.gckd.strong_views, cpu)
        fetched = time.perf_counter()
        out = model(src, tgt, None, True)
        optimizer.zero_grad(set_to_none=True)
        out.losses["loss"].backward()
        optimizer.step()
        model.ema_step()
        if i > 0:  # the first step warms up thread pools and allocators
            data_s.append(fetched - start)
            step_s.append(time.perf_counter() - start)
            images = len(idx) + len(image_rows)
    return {"images_per_step": images, "data_s": statistics.median(data_s),
            "step_s": statistics.median(step_s)}


def run(cfg, steps: int, upscale: float, work: Path) -> dict:
    captions = [r.caption for domain in (cfg.data.source, cfg.data.target)
                for r in load_records(cfg, domain, "train").records]
    tokenizer = WordTokenizer.build(captions)
    need = 2 * (steps + 1) * cfg.train.batch_size * cfg.train.num_workers
    roots = write_real_format(cfg, work, upscale, max_records=need)
    real = load_config(None, [
        *_overrides(cfg), "data.cache_images=false",
        f"data.source.name={REAL_COPY['source'][1]}", f"data.source.root={roots['source']}",
        f"data.target.name={REAL_COPY['target'][1]}", f"data.target.root={roots['target']}"])
    out = {}
    for name, config in (("synthpedes", cfg), ("real_format", real)):
        run = measure(config, tokenizer, steps)
        out[name] = {"images_per_s": run["images_per_step"] / run["data_s"],
                     "data_ms": 1e3 * run["data_s"], "step_ms": 1e3 * run["step_s"],
                     "wait_share": run["data_s"] / run["step_s"]}
    return out


def _overrides(cfg) -> list[str]:
    """The config as key=value overrides (to derive the real-format variant from it)."""
    from gckd_ray.config import get_key

    keys = ("data.image_height", "data.image_width", "data.text_length", "data.synth_scale",
            "data.synth_cache", "train.batch_size", "train.instances_per_id",
            "train.num_workers", "train.cpus_per_worker", "model.hidden_size",
            "model.embed_dim", "model.num_layers", "model.num_heads", "model.patch_size",
            "gckd.strong_views", "run.seed")
    return [f"{k}={get_key(cfg, k)}" for k in keys]


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.data_loading",
                                     description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=20, help="steps per measurement")
    parser.add_argument("--upscale", type=float, default=2.5,
                        help="real-format images: SynthPEDES size times this (default 2.5)")
    parser.add_argument("--smoke", action="store_true", help="tiny sizes, 3 steps (tests)")
    parser.add_argument("overrides", nargs="*", help="config key=value")
    args = parser.parse_args(argv)
    cfg = load_config(None, [*(SMOKE if args.smoke else ()), *args.overrides])
    if cfg.data.source.name not in SYNTH_FORMATS or cfg.data.target.name not in SYNTH_FORMATS:
        raise SystemExit("data_loading builds its real-format copy from SynthPEDES domains")
    torch.set_num_threads(max(1, int(cfg.train.cpus_per_worker)))  # as a Ray Train worker
    with tempfile.TemporaryDirectory() as work:
        pipelines = run(cfg, 3 if args.smoke else args.steps, args.upscale, Path(work))
    result = {"benchmark": "data_loading", "batch_per_domain": cfg.train.batch_size,
              "image_size": [cfg.data.image_height, cfg.data.image_width],
              "strong_views": cfg.gckd.strong_views, "torch_threads": torch.get_num_threads(),
              "workers": cfg.train.num_workers, "upscale": args.upscale,
              "pipelines": pipelines}
    print(f"data pipelines of one worker (of {cfg.train.num_workers}; {torch.get_num_threads()} "
          f"torch thread(s)), batch {cfg.train.batch_size} source + {cfg.train.batch_size} "
          f"target images at {cfg.data.image_height}x{cfg.data.image_width}, views "
          f"'{cfg.gckd.strong_views}'")
    print(f"  {'pipeline':12s} {'images/s':>10s} {'data ms':>9s} {'step ms':>9s} "
          f"{'wait share':>11s}")
    for name, p in pipelines.items():
        print(f"  {name:12s} {p['images_per_s']:10.0f} {p['data_ms']:9.1f} {p['step_ms']:9.1f} "
              f"{100 * p['wait_share']:10.1f}%")
    print(json.dumps(result))
    return result


if __name__ == "__main__":
    main()
