"""Checkpoint bytes and write seconds at ViT-B/16 size, random weights (issue 25, item 4).

    python -m benchmarks.checkpoint_size [--smoke] [--repeats 2] [--dir /tmp]

The model is this project's GCKD module (student dual encoder, EMA teacher, propagation net,
matching head) around a random CLIP of ViT-B/16 size (vision 768 x 12 layers, patch 16,
384x128 images; text 512 x 12 layers, vocab 49,408, length 77; projection 512), fp32, with
AdamW moments for every trainable parameter (one optimizer step on zero gradients), saved by
``distributed/checkpointing.save_checkpoint`` as one ZeRO-0 rank (world size 1) writes it.
The pretrained folder is a random CLIPModel of the same size, ``save_pretrained`` to disk.

Measured, each the median of ``--repeats`` writes to ``--dir``:

* ``after``: a checkpoint as written now: trained state only (``model.pt``, ``rank000.pt``,
  scheduler, config, state.json naming the tokenizer and the pretrained folder by sha256);
* ``before``: ``save_checkpoint`` as it was before (commit 7215247, replayed here with the same
  helpers): on a CLIP run the run's "tokenizer folder" was the pretrained folder, copied into
  every checkpoint's ``tokenizer/`` (and hashed into its manifest);
* once per run: the pretrained folder's sha256 (on the driver) and ``final_model/`` (the
  student as a Hugging Face CLIP folder).

The GCKD memory (``memory.npz``) is left out: its size follows ``gckd.queue_size`` and the
target set, not the model. The last output line is JSON.
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import tempfile
import time
from pathlib import Path
from types import SimpleNamespace

import torch

from benchmarks.common import benchmark_tokenizer, build_model, clip_config, size_overrides
from gckd_ray.checkpoint_format import (atomic_torch_save, atomic_write_text, folder_reference,
                                        write_manifest)
from gckd_ray.config import load_config, override_config, save_config
from gckd_ray.distributed.checkpointing import _shard_state, full_state_dict, save_checkpoint
from gckd_ray.model.final_model import write_final_model

MB = 1e6


def _bytes(path: Path) -> int:
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())


def _timed(fn) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def _save_before(directory: Path, engine, scheduler, state, cfg, tokenizer_dir: Path,
                 extras) -> None:
    """``save_checkpoint`` of commit 7215247 for one rank (world size 1, no memory): what a
    CLIP run wrote per epoch before the pretrained folder was referenced instead of copied."""
    directory.mkdir(parents=True, exist_ok=True)
    full = full_state_dict(engine)
    atomic_torch_save(_shard_state(engine, extras), directory / "rank000.pt")
    atomic_torch_save(full, directory / "model.pt")
    atomic_torch_save(scheduler.state_dict(), directory / "scheduler.pt")
    save_config(cfg, directory / "config.yaml")
    shutil.copytree(tokenizer_dir, directory / "tokenizer", dirs_exist_ok=True)
    meta = {**state, "world_size": 1, "zero_stage": 0, "format": 2}
    atomic_write_text(directory / "state.json", json.dumps(meta, indent=1))
    write_manifest(directory, 0)


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.checkpoint_size",
                                     description=__doc__.split("\n\n")[0])
    parser.add_argument("--smoke", action="store_true", help="a tiny CLIP (tests)")
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--dir", default=None, help="where to write (default: a temp folder)")
    args = parser.parse_args(argv)
    size = "smoke" if args.smoke else "vit-b/16"
    torch.manual_seed(0)
    cfg = load_config(None, ["method=gckd", *size_overrides(size)])
    tokenizer = benchmark_tokenizer()
    model = build_model(cfg, size, tokenizer)
    trainable = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(trainable, lr=1e-5)
    for param in trainable:
        param.grad = torch.zeros_like(param)
    optimizer.step()  # allocates Adam's two moments per trainable parameter
    optimizer.zero_grad(set_to_none=True)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1.0)
    engine = SimpleNamespace(module=model, optimizer=optimizer,
                             zero_optimization_stage=lambda: 0)
    extras = {"torch_rng": torch.get_rng_state(), "ema": model.ema_state.state_dict()}

    with tempfile.TemporaryDirectory(dir=args.dir) as tmp:
        root = Path(tmp)
        from transformers import CLIPModel

        pretrained = root / "pretrained"
        CLIPModel._from_config(clip_config(size, tokenizer)[0]).save_pretrained(pretrained)
        tokenizer.save(pretrained)  # a CLIP folder brings its tokenizer
        tokenizer.save(root / "run" / "tokenizer")  # written once per run
        hash_s = []
        for _ in range(args.repeats):
            hash_s.append(_timed(lambda: folder_reference(pretrained)))
        references = {"tokenizer": folder_reference(root / "run" / "tokenizer"),
                      "pretrained": folder_reference(pretrained)}
        state = {"epoch": 1, "history": [{"epoch": 1, "loss": 1.0}]}

        def write(directory: Path, before: bool) -> None:
            if before:
                _save_before(directory, engine, scheduler, state, cfg, pretrained, extras)
            else:
                save_checkpoint(directory, engine=engine, scheduler=scheduler, state=state,
                                cfg=cfg, references=references, rank=0, extras=extras,
                                memory=None)

        layouts: dict[str, dict] = {}
        for _ in range(args.repeats):
            for name, before in (("after", False), ("before", True)):
                directory = root / f"ckpt-{name}"
                seconds = _timed(lambda: write(directory, before))
                entry = layouts.setdefault(name, {"seconds": [], "files": {}})
                entry["seconds"].append(seconds)
                entry["bytes"] = _bytes(directory)
                entry["files"] = {p.name: _bytes(p) if p.is_dir() else p.stat().st_size
                                  for p in sorted(directory.iterdir())}
                shutil.rmtree(directory)
        final_cfg = override_config(cfg, [f"model.pretrained={pretrained}"])
        student = model.encoder.state_dict()
        final_s = []
        for _ in range(args.repeats):
            final_s.append(_timed(lambda: write_final_model(
                root / "run" / "final_model", student, final_cfg, root / "run" / "tokenizer")))
        final_bytes = _bytes(root / "run" / "final_model")
        pretrained_bytes = _bytes(pretrained)

    params = sum(p.numel() for p in model.parameters())
    result = {
        "size": size, "parameters": params,
        "trainable_parameters": sum(p.numel() for p in trainable),
        "pretrained_folder_bytes": pretrained_bytes,
        "checkpoint_bytes": {k: v["bytes"] for k, v in layouts.items()},
        "checkpoint_write_s": {k: statistics.median(v["seconds"]) for k, v in layouts.items()},
        "checkpoint_files_after": layouts["after"]["files"],
        "once_per_run": {"pretrained_sha256_s": statistics.median(hash_s),
                         "final_model_bytes": final_bytes,
                         "final_model_write_s": statistics.median(final_s)},
        "repeats": args.repeats,
    }
    print(f"checkpoint_size: {size}, GCKD module {params:,} parameters "
          f"({result['trainable_parameters']:,} trainable), fp32, ZeRO-0, one rank; "
          f"median of {args.repeats}")
    print(f"{'per epoch':<38} {'MB':>9} {'write s':>8}")
    for name in ("before", "after"):
        label = {"before": "checkpoint before (pretrained copied)",
                 "after": "checkpoint after (trained state)"}[name]
        print(f"{label:<38} {result['checkpoint_bytes'][name] / MB:9.1f} "
              f"{result['checkpoint_write_s'][name]:8.2f}")
    for name, size_b in result["checkpoint_files_after"].items():
        print(f"  {name:<36} {size_b / MB:9.1f}")
    once = result["once_per_run"]
    print(f"{'once per run':<38} {'MB':>9} {'s':>8}")
    print(f"{'pretrained folder sha256 (driver)':<38} {pretrained_bytes / MB:9.1f} "
          f"{once['pretrained_sha256_s']:8.2f}")
    print(f"{'final_model/ (HF CLIP folder)':<38} {final_bytes / MB:9.1f} "
          f"{once['final_model_write_s']:8.2f}")
    saved = result["checkpoint_bytes"]["before"] - result["checkpoint_bytes"]["after"]
    print(f"saved per checkpoint: {saved / MB:.1f} MB "
          f"({saved / result['checkpoint_bytes']['before']:.1%})")
    print(json.dumps(result))
    return result


if __name__ == "__main__":
    main()
