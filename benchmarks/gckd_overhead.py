"""GCKD's per-step overhead: memory pushes, snapshot reads, pseudo-id refresh and kNN graph
build, against the whole training step, measured in one run on the real components.

    python -m benchmarks.gckd_overhead [--steps 30] [--smoke] [key=value ...]

One process trains the default config's GCKD module (student, EMA teacher, propagation net,
matching head; random batches of the configured shapes, torch AdamW) against a real memory actor
in a local Ray (loopback), its queues filled to ``gckd.queue_size`` first. Per step it times:
the compute (forward, backward, optimizer and EMA step; this includes the kNN graph build), the
four teacher-feature pushes (the worker's ``push_teacher``, fire-and-forget), and every
``gckd.snapshot_every`` steps the snapshot read (the worker's ``read_memory``: flush, publish,
fetch, tensors); the actor-side
pseudo-id refresh is timed on its own and spread over ``gckd.pseudo_every`` steps, as is the
graph build (``knn_edges`` on the step's node count, timed on its own). The last line is JSON.
Overrides are config keys, e.g. ``gckd.queue_size=65536 model.embed_dim=512``.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import time
from types import SimpleNamespace

os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")  # loopback, before import ray

import torch  # noqa: E402

from benchmarks.common import (NUM_IDS, benchmark_tokenizer, filled_memory_actor,  # noqa: E402
                               median_seconds, random_batches)
from gckd_ray.config import load_config  # noqa: E402
from gckd_ray.distributed.adaptation import push_teacher, read_memory  # noqa: E402
from gckd_ray.model.gckd import build_gckd  # noqa: E402
from gckd_ray.model.graph import knn_edges  # noqa: E402

SMOKE = ("train.batch_size=8", "gckd.queue_size=64", "gckd.memory_nodes=8",
         "model.hidden_size=32", "model.embed_dim=32", "model.num_layers=1", "model.num_heads=2")


def measure(cfg, steps: int) -> dict:
    torch.manual_seed(cfg.run.seed)
    tokenizer = benchmark_tokenizer()
    model = build_gckd(cfg, tokenizer, num_classes=NUM_IDS)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad],
                                  lr=cfg.train.lr)
    dim = model.encoder.embed_dim
    with filled_memory_actor(cfg, dim, "gckd-overhead-benchmark") as client:
        refresh_s = median_seconds(client.refresh, 3)
        generator = torch.Generator().manual_seed(cfg.run.seed)
        compute, push, snapshot, view, node_count = [], [], [], None, 0
        for step in range(steps + 2):                        # 2 warm-up steps, not timed
            start = time.perf_counter()
            if step % cfg.gckd.snapshot_every == 0:
                view, _ = read_memory(client, False, step, cfg, 0, torch.device("cpu"))
                snapshot.append(time.perf_counter() - start)
            source, target = random_batches(cfg, tokenizer, generator)
            start = time.perf_counter()
            out = model(source, target, view, adapt=True)
            optimizer.zero_grad(set_to_none=True)
            out.losses["loss"].backward()
            optimizer.step()
            model.ema_step()
            compute.append(time.perf_counter() - start)
            rows = torch.arange(len(source["pids"]))     # the batch is its own source split
            split = SimpleNamespace(labels=source["pids"], image_of=rows)
            start = time.perf_counter()
            push_teacher(client, out.teacher, split, rows, target)
            push.append(time.perf_counter() - start)
            node_count = 4 * cfg.train.batch_size + len(view.graph_nodes)
        client.flush()
    nodes = torch.nn.functional.normalize(torch.randn(node_count, dim), dim=1)
    knn_s = median_seconds(lambda: knn_edges(nodes, min(cfg.graph.k, node_count - 1)), 20)
    return _summary(cfg, compute[2:], push[2:], snapshot[1:] or snapshot, refresh_s, knn_s,
                    node_count)


def _summary(cfg, compute, push, snapshot, refresh_s, knn_s, node_count) -> dict:
    ms = 1000.0
    compute_ms = statistics.median(compute) * ms
    parts = {"push": statistics.median(push) * ms,
             "snapshot": statistics.median(snapshot) * ms / cfg.gckd.snapshot_every,
             "pseudo_id_refresh": refresh_s * ms / cfg.gckd.pseudo_every,
             "knn_graph_build": knn_s * ms}
    step_ms = compute_ms + parts["push"] + parts["snapshot"] + parts["pseudo_id_refresh"]
    return {
        "benchmark": "gckd_overhead", "machine": platform.machine(),
        "cpus": os.cpu_count(), "torch_threads": torch.get_num_threads(),
        "batch_per_domain": cfg.train.batch_size, "queue_size": cfg.gckd.queue_size,
        "embed_dim": cfg.model.embed_dim, "graph_nodes": node_count,
        "step_ms": round(step_ms, 3), "compute_ms": round(compute_ms, 3),
        "ms_per_step": {k: round(v, 3) for k, v in parts.items()},
        "share_of_step": {k: round(v / step_ms, 4) for k, v in parts.items()},
        "memory_and_graph_share": round(sum(parts.values()) / step_ms, 4),
    }


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.gckd_overhead",
                                     description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=30, help="timed steps (default 30)")
    parser.add_argument("--smoke", action="store_true", help="tiny sizes, a few steps (tests)")
    parser.add_argument("overrides", nargs="*", help="config key=value")
    args = parser.parse_args(argv)
    cfg = load_config(None, [*(SMOKE if args.smoke else ()), *args.overrides])
    result = measure(cfg, cfg.gckd.snapshot_every + 1 if args.smoke else args.steps)
    print(f"step {result['step_ms']:.1f} ms (compute {result['compute_ms']:.1f} ms, "
          f"{result['graph_nodes']} graph nodes, queue {result['queue_size']} x "
          f"{result['embed_dim']})")
    for name, value in result["ms_per_step"].items():
        print(f"  {name:18s} {value:9.3f} ms/step  {100 * result['share_of_step'][name]:6.2f} %")
    print(f"  memory + graph     {100 * result['memory_and_graph_share']:6.2f} % of the step")
    print(json.dumps(result))
    return result


if __name__ == "__main__":
    main()
