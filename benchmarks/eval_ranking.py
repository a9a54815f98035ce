"""Time and peak memory of ``retrieval_metrics_from_embeddings`` against a naive evaluation.

    python -m benchmarks.eval_ranking [--queries 19848 --gallery 19848 --dim 512 --ids 1000]
                                      [--chunk-size 1024] [--smoke]

Both methods see the same random normalised embeddings (identity centroid + noise, so the
metrics are far from chance) and must give the same metrics. The naive method is the IRRA-style
one-shot evaluation: the full (Q, G) similarity, a full stable argsort of it, and the metrics
from the (Q, G) match matrix.

Memory method: each method runs in a fresh subprocess. After building its inputs (and a tiny
warm-up call), the child records its resident set (VmRSS) and resets its peak-RSS mark by writing
"5" to /proc/self/clear_refs; after the run it reads the peak (VmHWM) from /proc/self/status.
Reported peak memory = VmHWM - that VmRSS, i.e. what the method adds on top of its inputs. If
the reset is refused the peak also covers input creation (tiny here) and the output says so.
The last output line is a JSON object with the times, peak MiB, and naive/chunked ratios.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import torch

from gckd_ray.evaluate import retrieval_metrics_from_embeddings

METRICS = ("R1", "R5", "R10", "mAP", "mINP")
SMOKE = {"queries": 300, "gallery": 400, "dim": 32, "ids": 40, "chunk_size": 64}
# Metrics are float64 means; the two methods sum in different orders, so allow rounding noise.
TOLERANCE = 1e-9


def naive_metrics(query_emb, gallery_emb, query_ids, gallery_ids) -> dict[str, float]:
    """Everything at once: (Q, G) similarity, full argsort, (Q, G) matches and cumsum."""
    num_g = gallery_emb.shape[0]
    sim = query_emb @ gallery_emb.T  # (Q, G) float32
    order = torch.argsort(sim, dim=1, descending=True, stable=True)  # (Q, G) int64
    del sim
    matches = gallery_ids[order] == query_ids[:, None]  # (Q, G) bool, in rank order
    del order
    has_match = matches.any(1)
    matches = matches[has_match]
    cum = matches.cumsum(1)  # (Q', G) int64: correct images up to each rank
    num_rel = cum[:, -1]
    hits = {k: (cum[:, k - 1] > 0).double().mean().item() for k in (1, 5, 10) if k <= num_g}
    ranks = torch.arange(1, num_g + 1, dtype=torch.float64)
    precision = cum.double().div_(ranks).mul_(matches)  # (Q', G) precision at correct ranks
    del cum
    ap = precision.sum(1) / num_rel.double()
    del precision
    last = num_g - matches.flip(1).to(torch.uint8).argmax(1)  # 1-based rank of last correct
    inp = num_rel.double() / last
    out = {f"R{k}": 100.0 * hits.get(k, 1.0) for k in (1, 5, 10)}
    out.update(mAP=100.0 * ap.mean().item(), mINP=100.0 * inp.mean().item())
    out["num_queries"] = int(has_match.sum())
    out["num_queries_without_match"] = int((~has_match).sum())
    return out


def make_inputs(queries: int, gallery: int, dim: int, ids: int, seed: int = 0):
    """Normalised (Q, D), (G, D) embeddings near their identity's centroid; every query id
    occurs in the gallery."""
    gen = torch.Generator().manual_seed(seed)
    centroids = torch.nn.functional.normalize(torch.randn(ids, dim, generator=gen), dim=1)
    gallery_ids = torch.randint(0, ids, (gallery,), generator=gen)
    query_ids = gallery_ids[torch.randint(0, gallery, (queries,), generator=gen)]

    def embed(id_list):
        # noise norm ~ (0.4 sqrt(D))^0.5: same-identity cosine a few sigma above chance
        noise = torch.randn(id_list.numel(), dim, generator=gen) * (0.4 / dim**0.5) ** 0.5
        return torch.nn.functional.normalize(centroids[id_list] + noise, dim=1)

    return embed(query_ids), embed(gallery_ids), query_ids, gallery_ids


def _proc_status_kib(field: str) -> int:
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise RuntimeError(f"{field} not in /proc/self/status")


def run_child(args: argparse.Namespace) -> dict:
    """One method in this (fresh) process; returns time, extra peak memory and metrics."""
    inputs = make_inputs(args.queries, args.gallery, args.dim, args.ids, args.seed)
    tiny = make_inputs(8, 16, 4, 3, seed=1)

    def chunked(*xs):
        return retrieval_metrics_from_embeddings(*xs, chunk_size=args.chunk_size)

    method = chunked if args.child == "chunked" else naive_metrics
    method(*tiny)  # warm-up: lazy initialisation is not what we measure
    baseline_kib = _proc_status_kib("VmRSS")
    try:
        with open("/proc/self/clear_refs", "w") as clear_refs:
            clear_refs.write("5")  # reset VmHWM to the current RSS
        hwm_reset = True
    except OSError:
        hwm_reset = False
    start = time.perf_counter()
    metrics = method(*inputs)
    seconds = time.perf_counter() - start
    peak_kib = _proc_status_kib("VmHWM")
    return {
        "method": args.child,
        "seconds": seconds,
        "peak_extra_mib": (peak_kib - baseline_kib) / 1024,
        "baseline_mib": baseline_kib / 1024,
        "hwm_reset": hwm_reset,
        "metrics": metrics,
    }


def run_in_subprocess(method: str, args: argparse.Namespace) -> dict:
    root = Path(__file__).resolve().parents[1]
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(root), env.get("PYTHONPATH")]))
    sizes = [
        f"--queries={args.queries}", f"--gallery={args.gallery}", f"--dim={args.dim}",
        f"--ids={args.ids}", f"--chunk-size={args.chunk_size}", f"--seed={args.seed}",
    ]  # fmt: skip
    command = [sys.executable, "-m", "benchmarks.eval_ranking", "--child", method, *sizes]
    done = subprocess.run(command, cwd=root, env=env, capture_output=True, text=True)
    if done.returncode != 0:
        raise RuntimeError(f"{method} run failed ({done.returncode}):\n{done.stderr[-4000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--queries", type=int, default=19848)
    parser.add_argument("--gallery", type=int, default=19848)
    parser.add_argument("--dim", type=int, default=512)
    parser.add_argument("--ids", type=int, default=1000)
    parser.add_argument("--chunk-size", type=int, default=1024)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--smoke", action="store_true", help="tiny sizes, a few seconds")
    parser.add_argument("--child", choices=("chunked", "naive"), help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.smoke:
        vars(args).update(SMOKE)
    return args


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    if args.child:
        result = run_child(args)
        print(json.dumps(result))
        return result

    runs = {method: run_in_subprocess(method, args) for method in ("chunked", "naive")}
    chunked, naive = runs["chunked"], runs["naive"]
    max_diff = max(abs(chunked["metrics"][k] - naive["metrics"][k]) for k in METRICS)
    same_counts = all(
        chunked["metrics"][k] == naive["metrics"][k]
        for k in ("num_queries", "num_queries_without_match")
    )
    identical = same_counts and max_diff <= TOLERANCE

    print(
        f"eval_ranking: Q={args.queries} G={args.gallery} D={args.dim} ids={args.ids} "
        f"chunk={args.chunk_size}; torch {torch.__version__}, {torch.get_num_threads()} threads"
    )
    print(f"{'method':8s} {'time s':>8s} {'peak MiB':>9s} " + " ".join(f"{k:>8s}" for k in METRICS))
    for name, run in runs.items():
        values = " ".join(f"{run['metrics'][k]:8.3f}" for k in METRICS)
        print(f"{name:8s} {run['seconds']:8.2f} {run['peak_extra_mib']:9.1f} {values}")
    time_ratio = naive["seconds"] / chunked["seconds"]
    memory_ratio = naive["peak_extra_mib"] / max(chunked["peak_extra_mib"], 1e-9)
    print(
        f"naive/chunked: time {time_ratio:.2f}x, peak memory {memory_ratio:.1f}x; metrics "
        f"{'identical' if identical else 'DIFFER'} (max |diff| {max_diff:.2e} points)"
    )
    reset = all(run["hwm_reset"] for run in runs.values())
    print(
        "peak memory = VmHWM - VmRSS after building the inputs, each method in a fresh "
        f"subprocess ({'peak reset via /proc/self/clear_refs' if reset else 'peak NOT reset'})"
    )
    result = {
        "queries": args.queries, "gallery": args.gallery, "dim": args.dim, "ids": args.ids,
        "chunk_size": args.chunk_size,
        "chunked_seconds": chunked["seconds"], "naive_seconds": naive["seconds"],
        "chunked_peak_mib": chunked["peak_extra_mib"], "naive_peak_mib": naive["peak_extra_mib"],
        "time_ratio_naive_over_chunked": time_ratio,
        "memory_ratio_naive_over_chunked": memory_ratio,
        "identical_metrics": identical, "max_metric_diff": max_diff,
        "memory_method": "VmHWM minus VmRSS after inputs, fresh subprocess per method"
        + ("" if reset else " (peak not reset)"),
        "metrics": chunked["metrics"],
    }  # fmt: skip
    print(json.dumps(result))
    return result


if __name__ == "__main__":
    main()
