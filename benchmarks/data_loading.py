"""Images/s of the training data pipelines and the share of a training step spent waiting on data,
with and without the background prefetch thread (``train.prefetch``); with ``--loaders``, the
samples/s that loader processes (``train.loader_processes``) read at 384x128 against what one
H100 needs.

    python -m benchmarks.data_loading [--steps 20] [--upscale 2.5] [--cpus N] [--smoke]
                                      [key=value ...]
    python -m benchmarks.data_loading --loaders [--processes 0,1,2] [--mfu 0.4]
                                      [--step-tflop X] [--steps 20] [--upscale 2.5] [--smoke]

Two pipelines over the real dataset objects (``data/datasets.py``), as one Ray Train worker
runs them (``train.cpus_per_worker`` torch threads; no loader processes: images are fetched by
``adaptation.load_step``, decoded by ``ImageSource``'s thread pool when not cached, either in
the step's own thread or, prefetched, in ``data/prefetch.py``'s one background thread):

* ``synthpedes``: the default, SynthPEDES decoded once into a uint8 cache
  (``data.cache_images``), then per step the source batch and the target image + caption
  batches (``PairedSplit.batch``, ``TargetFeed.batch``) with the adaptation phase's views
  (``adaptation.views``: IRRA flip/pad/crop, the student's strong view, CLIP normalisation).
* ``real_format``: the same steps from files, ``data.cache_images=false``: a real-format copy of
  synth-cuhk (``cuhk-pedes``, PNG) and synth-icfg (``icfg-pedes``, JPEG), images upscaled by
  ``--upscale`` to a real crop's resolution, read with the real readers (``read_image`` decode,
  bicubic resize to the configured size, then the same augmentation).

The loop is the worker's: per step the next batch from a ``Prefetcher``, then the config's
GCKD step (forward with ``adapt=True``, no memory snapshot, backward, torch AdamW, EMA). Each
pipeline runs twice, ``prefetch`` off and on, from the same seeds; the step losses of the two
must be identical (``losses_identical``). Images/s = the step's source and target images / the
time ``prepare`` took (in whichever thread ran it); wait = the time the step's thread waited for
its batch; the wait share = wait / whole step (medians over the steps after the first). Timing
the data work in the loop, not alone: alone, the large per-step image tensors are freed and
faulted in again every step, which made the 384x128 pipelines look 2x slower than they run in
training. ``--cpus N`` pins the process to N cores first (``--cpus 1``: a worker's share when 2
workers run on 2 cores, where a prefetch thread has no idle core to use). The last line is JSON.

``--loaders``: the host half of the worker's steps (``adaptation.load_step``: read, decode and
bicubic-resize the source and target images of the real-format copy at 384x128, take the token
rows; ``data.cache_images=false``) through ``data/loader.py`` with 0, 1, 2 loader processes;
samples/s = images delivered (source + target, each with its caption rows) / seconds, after the
first batch (process start-up, once per epoch). The augmentation is not in it: in training it
runs on the worker's device. The need of one H100 is 989e12 dense bf16 FLOP/s x ``--mfu``
(assumed, default 0.4) / the training FLOPs per sample of the GCKD step at CLIP ViT-B/16 size,
384x128, text 77, queue 65,536 (``benchmarks.mfu``'s count: student forward + backward,
teacher forward, heads, losses), counted at batch 4 and 8 per domain and extended linearly to
``train.batch_size`` (part of the step, the memory's graph nodes, does not grow with the batch),
divided by the step's 2 x batch images. ``--step-tflop`` gives the step's TFLOP instead.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import tempfile
import time
from contextlib import closing
from pathlib import Path

import torch
from PIL import Image

from gckd_ray.config import load_config
from gckd_ray.data.datasets import (IdentityBalancedSampler, build_unpaired, load_records,
                                    load_split)
from gckd_ray.data.formats import FORMATS, IMAGE_DIR, SYNTH_FORMATS
from gckd_ray.data.loader import load_batches
from gckd_ray.data.prefetch import Prefetcher
from gckd_ray.data.tokenizer import WordTokenizer
from gckd_ray.data.transforms import TrainAugment
from gckd_ray.model.gckd import build_gckd

SMOKE = ("data.synth_scale=0.05", "train.batch_size=8", "model.hidden_size=32",
         "model.embed_dim=32", "model.num_layers=1", "model.num_heads=2")
MODES = ("no_prefetch", "prefetch")
H100_BF16_FLOPS = 989e12  # dense (no sparsity), H100 SXM
LOADER_SIZE = ("data.image_height=384", "data.image_width=128", "data.text_length=77")
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


def measure(cfg, tokenizer, steps: int, prefetch: bool) -> dict:
    """Median per-step prepare, wait and whole-step seconds of one pipeline, and its losses."""
    from gckd_ray.distributed.adaptation import load_step, prepare_step

    split, feed, batches, targets = _pipeline(cfg, tokenizer, steps)
    augment = TrainAugment(seed=cfg.run.seed)
    torch.manual_seed(cfg.run.seed)
    model = build_gckd(cfg, tokenizer, split.num_ids).train()
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad],
                                  lr=cfg.train.lr)
    prepare_s: list[float] = []
    load = load_step(split, feed)
    views = prepare_step(augment, cfg.gckd.strong_views, torch.device("cpu"))

    def prepare(item):
        start = time.perf_counter()
        batch = views(load(item))
        prepare_s.append(time.perf_counter() - start)
        return batch

    wait_s, step_s, losses, images = [], [], [], 0
    with Prefetcher(zip(batches, targets), prepare, enabled=prefetch) as prepared:
        ready = iter(prepared)
        for i in range(len(batches)):
            start = time.perf_counter()
            idx, src, tgt = next(ready)
            fetched = time.perf_counter()
            out = model(src, tgt, None, True)
            optimizer.zero_grad(set_to_none=True)
            out.losses["loss"].backward()
            optimizer.step()
            model.ema_step()
            losses.append(out.losses["loss"].item())
            if i > 0:  # the first step warms up thread pools and allocators
                wait_s.append(fetched - start)
                step_s.append(time.perf_counter() - start)
                images = len(idx) + len(tgt["image_rows"])
    return {"images_per_step": images, "prepare_s": statistics.median(prepare_s[1:]),
            "wait_s": statistics.median(wait_s), "step_s": statistics.median(step_s),
            "losses": losses}


def _tokenizer(cfg) -> WordTokenizer:
    return WordTokenizer.build([r.caption for domain in (cfg.data.source, cfg.data.target)
                                for r in load_records(cfg, domain, "train").records])


def _real_config(cfg, steps: int, upscale: float, work: Path):
    """``cfg`` reading its real-format copy from files (enough records for ``steps``)."""
    need = 2 * (steps + 1) * cfg.train.batch_size * cfg.train.num_workers
    roots = write_real_format(cfg, work, upscale, max_records=need)
    return load_config(None, [
        *_overrides(cfg), "data.cache_images=false",
        f"data.source.name={REAL_COPY['source'][1]}", f"data.source.root={roots['source']}",
        f"data.target.name={REAL_COPY['target'][1]}", f"data.target.root={roots['target']}"])


def run(cfg, steps: int, upscale: float, work: Path) -> dict:
    tokenizer = _tokenizer(cfg)
    real = _real_config(cfg, steps, upscale, work)
    out = {}
    for name, config in (("synthpedes", cfg), ("real_format", real)):
        runs = {mode: measure(config, tokenizer, steps, prefetch=mode == "prefetch")
                for mode in MODES}
        out[name] = {mode: {"images_per_s": run["images_per_step"] / run["prepare_s"],
                            "prepare_ms": 1e3 * run["prepare_s"], "wait_ms": 1e3 * run["wait_s"],
                            "step_ms": 1e3 * run["step_s"],
                            "wait_share": run["wait_s"] / run["step_s"]}
                     for mode, run in runs.items()}
        out[name]["losses_identical"] = runs["no_prefetch"]["losses"] == runs["prefetch"]["losses"]
    return out


def loader_rates(cfg, steps: int, upscale: float, work: Path, counts: list[int]
                 ) -> dict[int, float]:
    """Samples/s (images with their caption rows) of the worker's ``load_step`` over the
    real-format copy with each number of loader processes in ``counts``."""
    from gckd_ray.distributed.adaptation import load_step

    split, feed, batches, targets = _pipeline(_real_config(cfg, steps, upscale, work),
                                              _tokenizer(cfg), steps + 1)
    items, load = list(zip(batches, targets)), load_step(split, feed)
    rates = {}
    for processes in counts:
        with closing(load_batches(items, load, processes)) as loaded:
            next(loaded)  # process start-up (once per epoch) and the first batch: untimed
            start = time.perf_counter()
            images = sum(len(idx) + len(tgt["image_rows"]) for idx, _, tgt in loaded)
            rates[processes] = images / (time.perf_counter() - start)
    return rates


def step_flops(batch: int, smoke: bool) -> tuple[float, dict[int, int]]:
    """Training FLOPs of one GCKD step at CLIP ViT-B/16 size (384x128, text 77, queue 65,536)
    with ``batch`` per domain, and the counts it is extended from: ``benchmarks.mfu``'s count
    at batch 4 and 8, linear in the batch (the memory's graph nodes are a fixed part)."""
    from benchmarks.common import size_overrides
    from benchmarks.mfu import PUBLISHED, SMOKE as MFU_SMOKE, count_step_flops

    size = "smoke" if smoke else "vit-b/16"
    counts = {b: count_step_flops(load_config(None, [
        *size_overrides(size), *(MFU_SMOKE if smoke else PUBLISHED), f"train.batch_size={b}"]),
        size) for b in (4, 8)}
    return counts[4] + (counts[8] - counts[4]) / 4 * (batch - 4), counts


def run_loaders(cfg, args, work: Path) -> dict:
    """The ``--loaders`` result: loader samples/s against one H100's need."""
    counts = [int(n) for n in args.processes.split(",")]
    rates = loader_rates(cfg, 3 if args.smoke else args.steps, args.upscale, work, counts)
    counted = {}
    if args.step_tflop:
        flops = args.step_tflop * 1e12
    else:
        flops, counted = step_flops(cfg.train.batch_size, args.smoke)
    per_sample = flops / (2 * cfg.train.batch_size)
    need = H100_BF16_FLOPS * args.mfu / per_sample
    result = {"benchmark": "data_loading_loaders", "batch_per_domain": cfg.train.batch_size,
              "image_size": [cfg.data.image_height, cfg.data.image_width],
              "upscale": args.upscale, "cores": len(os.sched_getaffinity(0)),
              "samples_per_s": {str(n): r for n, r in rates.items()},
              "h100": {"peak_flops": H100_BF16_FLOPS, "assumed_mfu": args.mfu,
                       "step_tflop": flops / 1e12,
                       "counted_tflop": {str(b): f / 1e12 for b, f in counted.items()},
                       "gflop_per_sample": per_sample / 1e9, "samples_per_s_needed": need}}
    if 1 in rates:  # if each process added what one does (it cannot beyond the free cores)
        result["processes_needed_at_one_process_rate"] = -(-need // rates[1])
    print(f"loader processes of one worker at {cfg.data.image_height}x{cfg.data.image_width} "
          f"({result['cores']} core(s)): read + decode + resize of batch {cfg.train.batch_size} "
          f"source + {cfg.train.batch_size} target images per step, real-format files "
          f"(PNG/JPEG, SynthPEDES x{args.upscale})")
    share = "of one H100's need"
    print(f"  {'loader processes':18s} {'samples/s':>10s} {share:>19s}")
    for n, rate in rates.items():
        print(f"  {n:<18d} {rate:10.0f} {100 * rate / need:18.1f}%")
    print(f"  one H100 needs {need:,.0f} samples/s = {H100_BF16_FLOPS:.3g} FLOP/s x MFU "
          f"{args.mfu} / {per_sample / 1e9:,.1f} GFLOP per sample (GCKD step "
          f"{flops / 1e12:,.2f} TFLOP at batch {cfg.train.batch_size} + "
          f"{cfg.train.batch_size}, " + ("given" if args.step_tflop else
                                          "counted at batch 4 and 8, linear in the batch")
          + f"; {'smoke size' if args.smoke else 'CLIP ViT-B/16, 384x128, text 77'})")
    if "processes_needed_at_one_process_rate" in result:
        print(f"  at one process's rate, {result['processes_needed_at_one_process_rate']:.0f} "
              f"loader processes keep up")
    print(json.dumps(result))
    return result


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
    parser.add_argument("--cpus", type=int, default=0,
                        help="pin the process to this many cores first (0: leave it)")
    parser.add_argument("--smoke", action="store_true", help="tiny sizes, 3 steps (tests)")
    parser.add_argument("--loaders", action="store_true",
                        help="loader processes' samples/s at 384x128 against one H100's need")
    parser.add_argument("--processes", default="0,1,2",
                        help="--loaders: loader process counts (default 0,1,2)")
    parser.add_argument("--mfu", type=float, default=0.4,
                        help="--loaders: the H100's assumed MFU (default 0.4)")
    parser.add_argument("--step-tflop", type=float, default=None,
                        help="--loaders: the GCKD step's TFLOP at train.batch_size (default: "
                             "counted)")
    parser.add_argument("overrides", nargs="*", help="config key=value")
    args = parser.parse_args(argv)
    size = LOADER_SIZE if args.loaders and not args.smoke else ()
    cfg = load_config(None, [*(SMOKE if args.smoke else ()), *size, *args.overrides])
    if cfg.data.source.name not in SYNTH_FORMATS or cfg.data.target.name not in SYNTH_FORMATS:
        raise SystemExit("data_loading builds its real-format copy from SynthPEDES domains")
    if args.cpus:
        os.sched_setaffinity(0, sorted(os.sched_getaffinity(0))[:args.cpus])
    torch.set_num_threads(max(1, int(cfg.train.cpus_per_worker)))  # as a Ray Train worker
    if args.loaders:
        with tempfile.TemporaryDirectory() as work:
            return run_loaders(cfg, args, Path(work))
    with tempfile.TemporaryDirectory() as work:
        pipelines = run(cfg, 3 if args.smoke else args.steps, args.upscale, Path(work))
    result = {"benchmark": "data_loading", "batch_per_domain": cfg.train.batch_size,
              "image_size": [cfg.data.image_height, cfg.data.image_width],
              "strong_views": cfg.gckd.strong_views, "torch_threads": torch.get_num_threads(),
              "workers": cfg.train.num_workers, "upscale": args.upscale,
              "cores": len(os.sched_getaffinity(0)), "pipelines": pipelines}
    print(f"data pipelines of one worker (of {cfg.train.num_workers}; {torch.get_num_threads()} "
          f"torch thread(s), {result['cores']} core(s)), batch {cfg.train.batch_size} source + "
          f"{cfg.train.batch_size} target images at {cfg.data.image_height}x"
          f"{cfg.data.image_width}, views '{cfg.gckd.strong_views}'")
    print(f"  {'pipeline':12s} {'mode':12s} {'images/s':>9s} {'prepare ms':>11s} "
          f"{'wait ms':>8s} {'step ms':>9s} {'wait share':>11s}")
    for name, p in pipelines.items():
        for mode in MODES:
            m = p[mode]
            print(f"  {name:12s} {mode:12s} {m['images_per_s']:9.0f} {m['prepare_ms']:11.1f} "
                  f"{m['wait_ms']:8.1f} {m['step_ms']:9.1f} {100 * m['wait_share']:10.1f}%")
        print(f"  {name:12s} losses identical with and without prefetch: "
              f"{p['losses_identical']}")
    print(json.dumps(result))
    return result


if __name__ == "__main__":
    main()
