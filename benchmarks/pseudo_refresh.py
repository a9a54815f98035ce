"""The pipelined pseudo-id refresh at a real target size: how long a refresh computes in the
memory actor, and how much of a training loop waits for it (issue 25, item 3; DESIGN.md §10).

    python -m benchmarks.pseudo_refresh --size {cuhk,icfg,rstp} [--step-ms 500] [--refreshes 6]
                                        [--smoke] [key=value ...]

A memory actor in a local Ray (loopback) is given one random unit feature (D = 512) for every
target training image and caption of the dataset (CUHK-PEDES 34,054 x 68,108, ICFG-PEDES
34,674 x 34,674, RSTPReid 18,505 x 37,010), with the config's memory settings
(``gckd.refresh_lag``, ``gckd.refresh_threads``, ``gckd.pseudo_*``, ``gckd.queue_size``). Then
a loop stands in for training: each step "computes" for ``--step-ms`` (a sleep: on a GPU node
the step's time is the device's), pushes one step of teacher features (4 x
``train.batch_size`` rows, fire-and-forget, as rank 0 does), and every ``gckd.snapshot_every``
steps reads the memory as the workers do (``adaptation.read_memory``: apply the refreshes due,
start one when ``refresh_due`` says so, publish, fetch), until ``--refreshes`` refreshes have
been applied.

After a warm-up of 8 reads, the same loop runs twice on the same memory: first as a control
whose reads never start a refresh, then on the training schedule. ``wait_fraction``: the time
the second loop's reads were blocked on a refresh not finished by the step that applies it
(the actor's clock: ``wait_seconds`` of each applied refresh), over that loop's wall time; the
rest of a read's refresh work is O(1) (a refresh starts by handing over the journal of rows
written since the previous one, and is applied by swapping two arrays). The table also gives
the interference: how much longer the second loop's reads and pushes took than the control's
(the refresh computing on the same cores slows them; on a shared machine this difference is
mostly noise, of either sign). ``refresh_s``: the median compute time of a refresh (the actor's
clock). ``actor_rss_mib``: the actor process's peak resident memory. A table, then one JSON
line.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import time

os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")  # loopback, before import ray

import numpy as np  # noqa: E402
import torch  # noqa: E402

from benchmarks.common import memory_actor  # noqa: E402
from gckd_ray.config import load_config  # noqa: E402
from gckd_ray.distributed.adaptation import read_memory, refresh_due  # noqa: E402
from gckd_ray.model.centring import SOURCE, TARGET  # noqa: E402

# Target training split sizes (images, captions) and feature dimension (DESIGN.md §5, §10).
SIZES = {"cuhk": (34_054, 68_108), "icfg": (34_674, 34_674), "rstp": (18_505, 37_010)}
DIM = 512
SMOKE_SIZE, SMOKE_DIM = (120, 240), 16
# Smoke: tiny memory and schedule; pseudo_exact_pairs=0 runs the clustered search.
SMOKE = ("train.batch_size=8", "gckd.queue_size=64", "gckd.snapshot_every=2",
         "gckd.pseudo_every=4", "gckd.refresh_lag=4", "gckd.pseudo_exact_pairs=0")
FILL_ROWS = 4096
WARMUP_READS = 8


def unit_rows(rng: np.random.Generator, n: int, dim: int) -> np.ndarray:
    x = rng.standard_normal((n, dim), dtype=np.float32)
    return x / np.linalg.norm(x, axis=1, keepdims=True)


def fill_targets(client, sizes: tuple[int, int], dim: int, rng: np.random.Generator) -> None:
    """One random unit feature per target image and caption row (target pushes: they fill the
    target tables, and the queues with them)."""
    for modality, rows in zip(("image", "text"), sizes):
        for start in range(0, rows, FILL_ROWS):
            index = np.arange(start, min(rows, start + FILL_ROWS))
            client.push(modality, unit_rows(rng, len(index), dim), TARGET,
                        np.full(len(index), -1), index)
    client.flush()


def push_step(client, sizes: tuple[int, int], dim: int, batch: int,
              rng: np.random.Generator) -> None:
    """One step of rank 0's pushes: source and target rows of each modality."""
    for modality, rows in zip(("image", "text"), sizes):
        client.push(modality, unit_rows(rng, batch, dim), SOURCE, rng.integers(0, 1000, batch),
                    rng.integers(0, rows, batch))
        client.push(modality, unit_rows(rng, batch, dim), TARGET, np.full(batch, -1),
                    rng.choice(rows, batch, replace=False))


def run_loop(client, cfg, sizes: tuple[int, int], dim: int, steps: int, step_ms: float,
             refresh: bool, rng: np.random.Generator) -> dict:
    """The simulated training loop (see the module docstring); ``refresh`` False: the same
    loop whose reads never start a refresh (the control)."""
    cpu = torch.device("cpu")
    reads, applied, overrun = [], [], 0.0
    start_loop = time.perf_counter()
    for step in range(steps):
        if step % cfg.gckd.snapshot_every == 0:
            due = refresh and refresh_due(0, step, steps, cfg)
            start = time.perf_counter()
            _, done = read_memory(client, due, step, cfg, 0, cpu)
            reads.append(time.perf_counter() - start)
            applied += [{**stats, "applied_step": step, "read_s": reads[-1]} for stats in done]
        deadline = time.perf_counter() + step_ms / 1000
        push_step(client, sizes, dim, cfg.train.batch_size, rng)
        left = deadline - time.perf_counter()
        overrun += max(0.0, -left)  # pushes held up past the step's compute: a wait too
        time.sleep(max(0.0, left))
    client.flush()
    return {"loop_s": time.perf_counter() - start_loop, "reads": reads, "overrun_s": overrun,
            "applied": applied}


def measure(cfg, size: str, sizes: tuple[int, int], dim: int, step_ms: float,
            refreshes: int) -> dict:
    rng = np.random.default_rng(cfg.run.seed)
    snap, every, lag = cfg.gckd.snapshot_every, cfg.gckd.pseudo_every, cfg.gckd.refresh_lag
    # Steps until the read that applies the last refresh (started at step refreshes * every).
    steps = -(-(refreshes * every + lag + 1) // snap) * snap
    with memory_actor(cfg, dim, f"pseudo-refresh-benchmark-{size}", *sizes) as client:
        fill_targets(client, sizes, dim, rng)
        # warm-up (not measured): the first reads after the fill ran slower, which made a
        # control right after it slower than the loop it is compared with
        run_loop(client, cfg, sizes, dim, WARMUP_READS * snap, step_ms, False, rng)
        control = run_loop(client, cfg, sizes, dim, steps, step_ms, False, rng)
        loop = run_loop(client, cfg, sizes, dim, steps, step_ms, True, rng)
        usage = client.usage()
    applied = loop["applied"]
    wait_s = sum(a["wait_seconds"] for a in applied)  # reads blocked on a late refresh
    # the refreshes' interference with the loop's memory calls (CPU shared; noisy)
    difference_s = (sum(loop["reads"]) + loop["overrun_s"]
                    - sum(control["reads"]) - control["overrun_s"])
    lists = round(sizes[1] ** 0.5)  # model/knn.py: clustered_cross_knn
    search = ("exact" if not cfg.gckd.pseudo_probes
              or sizes[0] * sizes[1] <= cfg.gckd.pseudo_exact_pairs
              else f"clustered ({min(cfg.gckd.pseudo_probes, lists)} of {lists} caption "
                   "clusters per image)")
    return {"size": size, "images": sizes[0], "captions": sizes[1], "dim": dim,
            "search": search, "refresh_threads": usage["refresh_threads"],
            "refresh_lag": lag, "snapshot_every": snap, "pseudo_every": every,
            "step_ms": step_ms, "steps": steps, "reads": len(loop["reads"]),
            "read_ms": {name: {"median": 1000 * statistics.median(run["reads"]),
                               "max": 1000 * max(run["reads"]),
                               "total": 1000 * sum(run["reads"])}
                        for name, run in (("control", control), ("refresh", loop))},
            "loop_s": loop["loop_s"], "control_loop_s": control["loop_s"], "wait_s": wait_s,
            "overrun_s": {"control": control["overrun_s"], "refresh": loop["overrun_s"]},
            "interference_s": difference_s, "refreshes": applied,
            "refresh_s": statistics.median(a["seconds"] for a in applied),
            "wait_fraction": wait_s / loop["loop_s"],
            "interference_fraction": difference_s / loop["loop_s"],
            "actor_rss_mib": usage["peak_rss_mib"]}


def print_table(result: dict) -> None:
    print(f"{result['size']}: {result['images']:,} images x {result['captions']:,} captions, "
          f"D = {result['dim']}, {result['search']} search, {result['refresh_threads']} "
          f"refresh thread(s), lag {result['refresh_lag']} steps, a refresh every "
          f"{result['pseudo_every']} steps, a read every {result['snapshot_every']}, "
          f"step {result['step_ms']:g} ms, {result['steps']} steps")
    print("| started at step | applied at step | compute s | read blocked s | read s "
          "| clusters | image / caption coverage |")
    print("|---|---|---|---|---|---|---|")
    for r in result["refreshes"]:
        print(f"| {int(r['started_step'])} | {r['applied_step']} | {r['seconds']:.2f} "
              f"| {r['wait_seconds']:.3f} | {r['read_s']:.3f} | {int(r['num_clusters'])} "
              f"| {r['image_coverage']:.3f} / {r['text_coverage']:.3f} |")
    reads = result["read_ms"]
    print(f"reads (ms, median / max / total of {result['reads']}): control "
          f"{reads['control']['median']:.1f} / {reads['control']['max']:.1f} / "
          f"{reads['control']['total']:.0f}, with refreshes {reads['refresh']['median']:.1f} / "
          f"{reads['refresh']['max']:.1f} / {reads['refresh']['total']:.0f}")
    overrun = result["overrun_s"]
    print(f"pushes held up past a step's compute (s): control {overrun['control']:.2f}, with "
          f"refreshes {overrun['refresh']:.2f}")
    print(f"loop {result['loop_s']:.1f} s (control {result['control_loop_s']:.1f} s): reads "
          f"blocked on a late refresh {result['wait_s']:.2f} s: wait_fraction "
          f"{result['wait_fraction']:.4f}; interference (reads and pushes, loop minus control) "
          f"{result['interference_s']:+.2f} s = {result['interference_fraction']:+.4f}; "
          f"refresh {result['refresh_s']:.2f} s (median); actor peak RSS "
          f"{result['actor_rss_mib']:.0f} MiB")


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.pseudo_refresh",
                                     description=__doc__.split("\n\n")[0])
    parser.add_argument("--size", choices=sorted(SIZES), help="the target dataset's size")
    parser.add_argument("--step-ms", type=float, default=500.0,
                        help="simulated training step time (default 500)")
    parser.add_argument("--refreshes", type=int, default=6,
                        help="refreshes to apply in the loop (default 6)")
    parser.add_argument("--smoke", action="store_true",
                        help="tiny sizes and schedule, 20 ms steps, 2 refreshes (tests)")
    parser.add_argument("overrides", nargs="*", help="config key=value")
    args = parser.parse_args(argv)
    if not args.smoke and args.size is None:
        parser.error("--size is required (or --smoke)")
    cfg = load_config(None, [*(SMOKE if args.smoke else ()), *args.overrides])
    if args.smoke:
        result = measure(cfg, "smoke", SMOKE_SIZE, SMOKE_DIM, 20.0, 2)
    else:
        result = measure(cfg, args.size, SIZES[args.size], DIM, args.step_ms, args.refreshes)
    print_table(result)
    print(json.dumps({k: result[k] for k in ("size", "refresh_s", "wait_fraction",
                                             "actor_rss_mib")}))
    return result


if __name__ == "__main__":
    main()
