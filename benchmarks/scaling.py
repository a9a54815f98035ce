"""Data-parallel scaling: training throughput with 1 vs 2 Ray Train workers through the real
trainer, and a projection of per-step communication for N GPU nodes.

    python -m benchmarks.scaling [--workers 1 2] [--smoke] [key=value ...]
    python -m benchmarks.scaling --project N [--gpus-per-node 8] [--size vit-b/16]

Throughput: each worker count runs ``python -m gckd_ray.train`` (Ray Train, DeepSpeed, the
memory actor; the default config with ``gckd.warmup_epochs=0`` so every step is a GCKD step,
three epochs, per-worker batch fixed) in a subprocess. The rank-0 progress lines
(``[epoch e/E] step s/S ...``) are time-stamped as they arrive; per epoch, the steps between
its first line after warm-up and its last line over the time between them, summed over the
epochs, x batch x workers = source pairs/s: start-up, warm-up steps, evaluation and
checkpointing are excluded. Ratio = N-worker / 1-worker throughput (goal >= 1.8 for 2
workers; on this machine each worker has one core). Over the same windows the CPU time of
every process on the machine is read from /proc and reported as cores used per role (train
workers, memory actor, driver, Ray's own processes, other processes).

Projection (``--project N``): bytes each rank sends per step for ZeRO-0/2/3 from the parameter
count of the GCKD module at ``--size`` (ring collectives, bf16 parameters and gradients), the
teacher-feature gathers and queue pushes, and the snapshot reads, against the compute time of
the step at a stated MFU (model FLOPs counted with FlopCounterMode at batch 4 and scaled to the
batch). The last line is JSON.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

PROGRESS = re.compile(r"\[epoch (\d+)/\d+\] step (\d+)/(\d+) ")
DEFAULTS = ("gckd.warmup_epochs=0", "train.epochs=3", "train.log_every=5")
# CPU accounting: the first matching command-line fragment names a process's role.
ROLES = (("RayTrainWorker", "train workers"), ("MemoryActor", "memory actor"),
         ("gckd_ray.train", "driver"), ("ray", "ray system"))
SMOKE = ("data.synth_scale=0.1", "train.batch_size=16", "model.hidden_size=32",
         "model.embed_dim=32", "model.num_layers=1", "model.num_heads=2", "train.log_every=2",
         "gckd.queue_size=512")
BF16_BYTES, FP32_BYTES, INDEX_BYTES = 2, 4, 8


def steady_rate(stamped: list[tuple[float, int, int]], skip_steps: int) -> tuple[float, int]:
    """(steps/s, steps measured) from (arrival time, epoch, step) progress lines: per epoch,
    from its first line past ``skip_steps`` to its last line (so evaluation and checkpointing
    between epochs are not counted), summed over epochs."""
    steps = seconds = 0.0
    for epoch in sorted({e for _, e, _ in stamped}):
        lines = [(t, s) for t, e, s in stamped if e == epoch and s > skip_steps]
        if len(lines) >= 2:
            steps += lines[-1][1] - lines[0][1]
            seconds += lines[-1][0] - lines[0][0]
    if not steps:
        raise RuntimeError(f"need two progress lines after step {skip_steps} in an epoch: "
                           "lower train.log_every or raise the data scale")
    return steps / seconds, int(steps)


def windows(stamped: list[tuple[float, int, int]], skip_steps: int) -> list[tuple[float, float]]:
    """(start, end) arrival times of each epoch's measured window (see steady_rate)."""
    out = []
    for epoch in sorted({e for _, e, _ in stamped}):
        times = [t for t, e, s in stamped if e == epoch and s > skip_steps]
        if len(times) >= 2:
            out.append((times[0], times[-1]))
    return out


def cpu_seconds_by_role() -> dict[str, float]:
    """CPU seconds (user + system) used so far by every process on the machine, by role."""
    tick = os.sysconf("SC_CLK_TCK")
    out: dict[str, float] = {}
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit():
            continue
        try:
            stat = (proc / "stat").read_text()
            command = (proc / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
        except OSError:
            continue  # the process ended meanwhile
        fields = stat[stat.rindex(")") + 2:].split()
        role = next((name for key, name in ROLES if key in command), "other processes")
        out[role] = out.get(role, 0.0) + (int(fields[11]) + int(fields[12])) / tick
    return out


def run_workers(workers: int, overrides: list[str], output: Path, log) -> dict:
    """One training run with ``workers`` Ray Train workers; its steady throughput."""
    command = [sys.executable, "-m", "gckd_ray.train", *DEFAULTS, *overrides,
               f"train.num_workers={workers}", f"run.output_dir={output}"]
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    stamped, tail, cpu = [], [], []
    start = time.perf_counter()
    with subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                          env=env, cwd=Path(__file__).resolve().parents[1]) as proc:
        for line in proc.stdout:
            now = time.perf_counter()
            tail = (tail + [line])[-40:]
            match = PROGRESS.search(line)
            if match:
                stamped.append((now, int(match[1]), int(match[2])))
                cpu.append(cpu_seconds_by_role())
                steps = int(match[3])
                log(f"  {workers} worker(s): epoch {match[1]} step {match[2]}/{steps} at "
                    f"{now - start:.1f} s")
    if proc.returncode != 0:
        raise RuntimeError(f"{' '.join(command)} failed ({proc.returncode}):\n{''.join(tail)}")
    log_every = int(next(o.split("=")[1] for o in reversed([*DEFAULTS, *overrides])
                         if o.startswith("train.log_every=")))
    rate, measured = steady_rate(stamped, skip_steps=log_every)
    batch = int(next((o.split("=")[1] for o in reversed(overrides)
                      if o.startswith("train.batch_size=")), 64))
    return {"workers": workers, "steps_per_epoch": steps, "steps_measured": measured,
            "steps_per_s": rate, "source_pairs_per_s": rate * batch * workers,
            "cpu_share": _cpu_share(stamped, cpu, log_every),
            "wall_s": time.perf_counter() - start}


def _cpu_share(stamped, cpu, skip_steps: int) -> dict[str, float]:
    """Cores used per role over the measured windows (CPU seconds / window seconds)."""
    used: dict[str, float] = {}
    seconds = 0.0
    index = {t: i for i, (t, _, _) in enumerate(stamped)}
    for begin, end in windows(stamped, skip_steps):
        before, after = cpu[index[begin]], cpu[index[end]]
        for role, total in after.items():
            used[role] = used.get(role, 0.0) + max(0.0, total - before.get(role, 0.0))
        seconds += end - begin
    return {role: value / seconds for role, value in sorted(used.items())}


def throughput(worker_counts: list[int], overrides: list[str]) -> dict:
    runs = {}
    with tempfile.TemporaryDirectory() as tmp:
        for workers in worker_counts:
            runs[workers] = run_workers(workers, overrides, Path(tmp) / f"w{workers}",
                                        lambda text: print(text, flush=True))
    base = runs[min(worker_counts)]["source_pairs_per_s"]
    return {"runs": list(runs.values()),
            "ratio": {w: r["source_pairs_per_s"] / base for w, r in runs.items()}}


def project(nodes: int, gpus_per_node: int, size: str, overrides: list[str], mfu: float,
            peak_tflops: float, inter_node_gbs: float) -> dict:
    """Per-rank communication per step for ZeRO-0/2/3 on ``nodes`` x ``gpus_per_node`` ranks,
    queue and snapshot traffic, and the step's compute time at ``mfu`` of ``peak_tflops``."""
    import torch

    from benchmarks import mfu as mfu_benchmark
    from benchmarks.common import benchmark_tokenizer, build_model, size_overrides
    from gckd_ray.config import load_config

    cfg = load_config(None, [*size_overrides(size), *(mfu_benchmark.PUBLISHED
                                                      if size == "vit-b/16" else ()),
                             *overrides])
    model = build_model(cfg, size, benchmark_tokenizer())
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    teacher = sum(p.numel() for p in model.teacher.parameters())
    del model
    counted = load_config(None, [*size_overrides(size), *overrides, "train.batch_size=4"])
    torch.set_num_threads(max(1, torch.get_num_threads()))
    flops_b4 = mfu_benchmark.count_step_flops(counted, size)
    b, d, q = cfg.train.batch_size, cfg.model.embed_dim, cfg.gckd.queue_size
    flops = flops_b4 * b / 4  # model FLOPs are linear in the batch (graph context aside)
    ranks = nodes * gpus_per_node
    ring = (ranks - 1) / ranks
    zero = {0: 2 * BF16_BYTES * trainable * ring,               # all-reduce of gradients
            2: 2 * BF16_BYTES * trainable * ring,               # reduce-scatter + all-gather
            3: (3 * BF16_BYTES * trainable + BF16_BYTES * teacher) * ring}  # +fwd/bwd gathers
    entry = FP32_BYTES * d + 2 * INDEX_BYTES                    # feature + label + row
    gathers = 4 * b * entry * (ranks - 1)                       # push_teacher all-gathers
    queue = 4 * b * entry * ranks                               # rank 0 -> actor, per step
    snapshot = 2 * q * (FP32_BYTES * d + 2 * INDEX_BYTES + 1) / cfg.gckd.snapshot_every
    compute_s = flops / (mfu * peak_tflops * 1e12)
    link = inter_node_gbs * 1e9
    per_stage = {s: {"bytes_per_rank": v + gathers, "seconds_at_link": (v + gathers) / link,
                     "ratio_to_compute": (v + gathers) / link / compute_s}
                 for s, v in zero.items()}
    return {"nodes": nodes, "gpus_per_node": gpus_per_node, "ranks": ranks, "size": size,
            "trainable_parameters": trainable, "teacher_parameters": teacher,
            "batch_per_rank": b, "queue_size": q, "embed_dim": d,
            "model_tflop_per_rank_step": flops / 1e12, "assumed_mfu": mfu,
            "peak_tflops": peak_tflops, "compute_s": compute_s,
            "inter_node_gb_per_s": inter_node_gbs, "zero": per_stage,
            "feature_gather_bytes_per_rank": gathers, "queue_push_bytes_per_step": queue,
            "snapshot_bytes_per_node_step": snapshot,
            "snapshot_bytes_per_read": snapshot * cfg.gckd.snapshot_every}


def _print_projection(p: dict) -> None:
    mib = 2**20
    print(f"projection: {p['nodes']} nodes x {p['gpus_per_node']} GPUs = {p['ranks']} ranks, "
          f"{p['size']} ({p['trainable_parameters']:,} trainable + {p['teacher_parameters']:,} "
          f"teacher parameters), batch {p['batch_per_rank']} per rank and domain")
    print(f"  compute per step: {p['model_tflop_per_rank_step']:.2f} TFLOP per rank -> "
          f"{1e3 * p['compute_s']:.0f} ms at {100 * p['assumed_mfu']:.0f}% MFU of "
          f"{p['peak_tflops']:.0f} TFLOP/s")
    link = f"ms at {p['inter_node_gb_per_s']:g} GB/s"
    print(f"  {'ZeRO':5s} {'MiB sent per rank/step':>24s} {link:>14s} {'/ compute':>10s}")
    for stage, z in p["zero"].items():
        print(f"  {stage:<5d} {z['bytes_per_rank'] / mib:24.1f} {1e3 * z['seconds_at_link']:14.1f} "
              f"{z['ratio_to_compute']:10.3f}")
    print(f"  teacher-feature all-gathers {p['feature_gather_bytes_per_rank'] / mib:.2f} MiB per "
          f"rank (included above); queue pushes rank 0 -> actor "
          f"{p['queue_push_bytes_per_step'] / mib:.2f} MiB per step; snapshot "
          f"{p['snapshot_bytes_per_read'] / mib:.1f} MiB per read per node "
          f"({p['snapshot_bytes_per_node_step'] / mib:.1f} MiB per step amortised)")


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.scaling",
                                     description=__doc__.split("\n\n")[0])
    parser.add_argument("--workers", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--project", type=int, metavar="N", help="project for N GPU nodes")
    parser.add_argument("--gpus-per-node", type=int, default=8)
    parser.add_argument("--size", default="vit-b/16", help="model size of the projection")
    parser.add_argument("--mfu", type=float, default=0.45, help="assumed MFU (projection)")
    parser.add_argument("--peak-tflops", type=float, default=989.0,
                        help="GPU peak of the projection (H100 SXM dense bf16)")
    parser.add_argument("--link-gbs", type=float, default=50.0,
                        help="inter-node GB/s per GPU of the projection (400 Gb/s IB)")
    parser.add_argument("--smoke", action="store_true", help="tiny sizes (tests)")
    parser.add_argument("overrides", nargs="*", help="config key=value")
    args = parser.parse_args(argv)
    overrides = [*(SMOKE if args.smoke else ()), *args.overrides]
    if args.project:
        result = {"benchmark": "scaling", "projection": project(
            args.project, args.gpus_per_node, "smoke" if args.smoke else args.size,
            args.overrides, args.mfu, args.peak_tflops, args.link_gbs)}
        _print_projection(result["projection"])
    else:
        result = {"benchmark": "scaling", **throughput(args.workers, overrides),
                  "goal_ratio_2_workers": 1.8}
        roles = sorted({role for run in result["runs"] for role in run["cpu_share"]})
        print(f"{'workers':>8s} {'steps/s':>9s} {'pairs/s':>9s} {'ratio':>7s}  cores used by: "
              + ", ".join(roles))
        for run in result["runs"]:
            cores = " ".join(f"{run['cpu_share'].get(role, 0.0):5.2f}" for role in roles)
            print(f"{run['workers']:8d} {run['steps_per_s']:9.3f} "
                  f"{run['source_pairs_per_s']:9.1f} {result['ratio'][run['workers']]:7.2f}  "
                  f"{cores}")
    print(json.dumps(result))
    return result


if __name__ == "__main__":
    main()
