"""What Ray costs: the same training steps as plain PyTorch in one process and through
``gckd_ray.train`` with one Ray Train worker, source-only and GCKD.

    python -m benchmarks.framework_tax [--epochs 2] [--repeats 1] [--smoke] [key=value ...]

Both sides run the same config, model (``build_retriever`` / ``build_gckd``), batches
(``data/datasets.py``: the same split, identity-balanced sampler, unpaired target feed and
augmentation seeds), loss, optimizer (torch AdamW, the LR schedule, gradient clipping) and
number of steps, with ``train.cpus_per_worker`` torch threads. The plain side is one process
running the worker's own step code (``loop.SourceSteps`` / ``adaptation.GCKDSteps``) with a
plain ``backward``/``step`` and, for GCKD, the memory as an in-process ``MemoryBank`` (pushes and
pseudo-id refreshes inline); no Ray, no DeepSpeed, no evaluation, no checkpoint. The Ray side
is ``python -m gckd_ray.train train.num_workers=1`` in a subprocess (Ray Train, a DeepSpeed
engine, the memory actor, evaluation and a checkpoint per epoch, metrics.jsonl).

Steady state only: per epoch, from the ``train.log_every``-th step to the epoch's last progress
record, summed over epochs (``scaling.steady_rate``), on time stamps taken at the same steps
(the Ray side's from its metrics.jsonl, the plain side's in the loop). Start-up, the first steps
of each epoch, evaluation and checkpoints are outside every window. Variants run back to back,
plain then Ray, per method and repeat, so both see the same machine load. Ratio = Ray step time
/ plain step time (goal <= 1.15). The last line is JSON.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")  # loopback, before import ray

import torch  # noqa: E402

from benchmarks.scaling import steady_rate  # noqa: E402
from gckd_ray.config import Config, load_config  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
METHODS = {"source_only": ("method=source_only",),
           # every epoch adapts: the GCKD variant measures GCKD steps only
           "gckd": ("method=gckd", "gckd.warmup_epochs=0")}
# No test-split scoring but after the last epoch, no label-free criterion: both run outside
# the measured windows anyway; they only lengthen the benchmark.
DEFAULTS = ("train.num_workers=1", "train.eval_every=0", "train.label_free_samples=0",
            "train.log_every=5")
SMOKE = ("data.synth_scale=0.1", "train.batch_size=16", "model.hidden_size=32",
         "model.embed_dim=32", "model.num_layers=1", "model.num_heads=2", "train.log_every=2")
SMOKE_GCKD = ("gckd.queue_size=512", "gckd.snapshot_every=2", "gckd.pseudo_every=4")


def plain_run(cfg: Config) -> dict:
    """The training steps in this process without Ray or DeepSpeed; steady steps/s."""
    from gckd_ray.data.datasets import (IdentityBalancedSampler, labelled_domain, load_records,
                                        load_split, load_unpaired)
    from gckd_ray.data.tokenizer import load_tokenizer
    from gckd_ray.data.transforms import TrainAugment
    from gckd_ray.distributed.adaptation import GCKDSteps, TargetFeed
    from gckd_ray.distributed.deepspeed_config import param_groups
    from gckd_ray.distributed.launcher import prepare_tokenizer
    from gckd_ray.distributed.loop import SourceSteps
    from gckd_ray.distributed.worker import _lr_lambda
    from gckd_ray.model.gckd import build_gckd
    from gckd_ray.model.retriever import build_retriever

    threads = torch.get_num_threads()
    torch.set_num_threads(max(1, int(cfg.train.cpus_per_worker)))  # as the worker does
    try:
        target = load_records(cfg, cfg.data.target, "train").records
        tokenizer = load_tokenizer(prepare_tokenizer(cfg, target))
        split = load_split(cfg, labelled_domain(cfg), "train", tokenizer)
        sampler = IdentityBalancedSampler(split.labels, cfg.train.batch_size,
                                          cfg.train.instances_per_id, cfg.run.seed,
                                          unit=cfg.train.epoch_unit)
        torch.manual_seed(cfg.run.seed)
        gckd = cfg.method == "gckd"
        model = (build_gckd if gckd else build_retriever)(cfg, tokenizer, split.num_ids)
        params = [p for p in model.parameters() if p.requires_grad]
        optimizer = torch.optim.AdamW(
            param_groups(model, cfg.train.lr, cfg.train.new_module_lr_scale),
            lr=cfg.train.lr, weight_decay=cfg.train.weight_decay)
        scheduler = torch.optim.lr_scheduler.LambdaLR(
            optimizer, _lr_lambda(cfg, sampler.steps_per_epoch))
        augment = TrainAugment(seed=cfg.run.seed * 7919, erase_prob=cfg.data.random_erasing)
        device = torch.device("cpu")
        if gckd:
            feed = TargetFeed(load_unpaired(cfg, tokenizer), cfg, 0, 1)
            memory = LocalMemory(cfg, model.encoder.embed_dim, target)
            method = GCKDSteps(split, sampler, feed, memory, augment, cfg, device, 0, None)
        else:
            method = SourceSteps(split, sampler, augment, device)
        stamped = []
        for epoch in range(cfg.train.epochs):
            model.train()
            items, load, prepare = method.epoch_batches(epoch)
            for step, item in enumerate(items):
                out = method.forward(model, prepare(load(item)), epoch, step, len(items))
                optimizer.zero_grad(set_to_none=True)
                out.losses["loss"].backward()
                if cfg.train.grad_clip > 0:
                    torch.nn.utils.clip_grad_norm_(params, cfg.train.grad_clip)
                optimizer.step()
                scheduler.step()
                out.after_step(True)
                for value in out.losses.values():  # the loop's .item() per loss, as run_epoch
                    value.item()
                if (step + 1) % cfg.train.log_every == 0:
                    stamped.append((time.perf_counter(), epoch + 1, step + 1))
            method.end_epoch()
    finally:
        torch.set_num_threads(threads)
    rate, measured = steady_rate(stamped, skip_steps=cfg.train.log_every)
    return {"steps_per_s": rate, "steps_measured": measured,
            "steps_per_epoch": sampler.steps_per_epoch}


class LocalMemory:
    """``MemoryClient``'s methods that the GCKD step calls, on an in-process ``MemoryBank``."""

    def __init__(self, cfg: Config, dim: int, target_records: list):
        from gckd_ray.model.memory_bank import MemoryBank

        self.bank = MemoryBank(
            dim, cfg.gckd.queue_size, len({r.image_key for r in target_records}),
            len(target_records), pseudo_k=cfg.gckd.pseudo_k,
            pseudo_threshold=cfg.gckd.pseudo_threshold, pseudo_center=cfg.gckd.pseudo_center,
            pseudo_image_k=cfg.gckd.pseudo_image_k, faiss_threads=cfg.gckd.refresh_threads,
            seed=cfg.run.seed, refresh_lag=cfg.gckd.refresh_lag,
            pseudo_probes=cfg.gckd.pseudo_probes,
            pseudo_exact_pairs=cfg.gckd.pseudo_exact_pairs)

    def push(self, modality, features, domain, labels, indices) -> None:
        self.bank.push(modality, features.float().numpy(), int(domain), labels.numpy(),
                       indices.numpy())

    def flush(self) -> None:
        pass

    def read(self, refresh: bool, step: int):
        return 0, self.bank.refresh_on_schedule(step, refresh)

    def snapshot(self, publication: int | None = None) -> dict[str, torch.Tensor]:
        return {k: torch.from_numpy(v) for k, v in self.bank.snapshot().items()}


def ray_run(overrides: list[str], output: Path) -> dict:
    """``python -m gckd_ray.train`` with one worker; steady steps/s from its metrics.jsonl."""
    command = [sys.executable, "-m", "gckd_ray.train", *overrides, f"run.output_dir={output}"]
    start = time.perf_counter()
    done = subprocess.run(command, capture_output=True, text=True, cwd=ROOT,
                          env={**os.environ, "PYTHONPATH": str(ROOT)})
    if done.returncode != 0:
        raise RuntimeError(f"{' '.join(command)} failed ({done.returncode}):\n"
                           f"{done.stderr[-3000:]}")
    records = [json.loads(line) for line in (output / "metrics.jsonl").read_text().splitlines()]
    stamped = [(r["time"], r["epoch"], r["epoch_step"]) for r in records if r["kind"] == "train"]
    log_every = load_config(None, overrides).train.log_every
    rate, measured = steady_rate(stamped, skip_steps=log_every)
    return {"steps_per_s": rate, "steps_measured": measured,
            "steps_per_epoch": stamped[-1][2] if stamped else 0,
            "wall_s": time.perf_counter() - start}


def measure(overrides: list[str], repeats: int, smoke: bool, log=print) -> dict:
    runs: dict[str, dict[str, list[dict]]] = {}
    with tempfile.TemporaryDirectory() as tmp:
        for repeat in range(repeats):
            for method, method_overrides in METHODS.items():
                keys = [*DEFAULTS, *method_overrides,
                        *(SMOKE_GCKD if smoke and method == "gckd" else ()), *overrides]
                out = Path(tmp) / f"{method}-{repeat}"
                cfg = load_config(None, [*keys, f"run.output_dir={out / 'plain'}"])
                cfg = cfg.with_absolute_paths()
                side = runs.setdefault(method, {"plain": [], "gckd_ray": []})
                side["plain"].append(plain_run(cfg))
                log(f"  {method} repeat {repeat}: plain "
                    f"{side['plain'][-1]['steps_per_s']:.3f} steps/s")
                side["gckd_ray"].append(ray_run(keys, out / "ray"))
                log(f"  {method} repeat {repeat}: gckd_ray "
                    f"{side['gckd_ray'][-1]['steps_per_s']:.3f} steps/s")
    return runs


def summarise(runs: dict, overrides: list[str]) -> dict:
    def rate(items: list[dict]) -> float:  # steps over seconds, pooled over repeats
        return (sum(r["steps_measured"] for r in items)
                / sum(r["steps_measured"] / r["steps_per_s"] for r in items))

    methods = {m: {"plain_steps_per_s": rate(s["plain"]),
                   "gckd_ray_steps_per_s": rate(s["gckd_ray"]),
                   "ratio": rate(s["plain"]) / rate(s["gckd_ray"]),
                   "steps_per_epoch": s["plain"][0]["steps_per_epoch"],
                   "steps_measured": sum(r["steps_measured"] for r in s["gckd_ray"])}
               for m, s in runs.items()}
    plain = sum(m["plain_steps_per_s"] for m in methods.values()) / len(methods)
    ray = sum(m["gckd_ray_steps_per_s"] for m in methods.values()) / len(methods)
    # Headline: the step time summed over the variants (each variant weighs its step time).
    plain_s = sum(1 / m["plain_steps_per_s"] for m in methods.values())
    ray_s = sum(1 / m["gckd_ray_steps_per_s"] for m in methods.values())
    return {"benchmark": "framework_tax", "cpus": os.cpu_count(), "overrides": overrides,
            "methods": methods, "plain_steps_per_s": plain, "gckd_ray_steps_per_s": ray,
            "ratio": ray_s / plain_s, "goal_ratio": 1.15}


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.framework_tax",
                                     description=__doc__.split("\n\n")[0])
    parser.add_argument("--epochs", type=int, default=2, help="epochs per run (default 2)")
    parser.add_argument("--repeats", type=int, default=1,
                        help="plain/Ray pairs per method, interleaved (default 1)")
    parser.add_argument("--smoke", action="store_true", help="tiny sizes (tests)")
    parser.add_argument("overrides", nargs="*", help="config key=value")
    args = parser.parse_args(argv)
    overrides = [*(SMOKE if args.smoke else ()), f"train.epochs={args.epochs}", *args.overrides]
    result = summarise(measure(overrides, args.repeats, args.smoke), overrides)
    print(f"{'method':12s} {'plain steps/s':>14s} {'gckd_ray steps/s':>17s} {'ratio':>7s} "
          f"{'steps measured':>15s}")
    for name, m in result["methods"].items():
        print(f"{name:12s} {m['plain_steps_per_s']:14.3f} {m['gckd_ray_steps_per_s']:17.3f} "
              f"{m['ratio']:7.3f} {m['steps_measured']:15d}")
    print(f"ratio (gckd_ray step time / plain step time, both variants) {result['ratio']:.3f}; "
          f"goal <= {result['goal_ratio']}")
    print(json.dumps({k: result[k] for k in ("plain_steps_per_s", "gckd_ray_steps_per_s",
                                              "ratio")} | {"methods": result["methods"]}))
    return result


if __name__ == "__main__":
    main()
