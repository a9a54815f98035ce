"""Where a full GCKD training step spends its time, phase by phase, on the real components.

    python -m benchmarks.step_breakdown [--size vit-b/16] [--steps 3] [--engine deepspeed]
                                        [--smoke] [key=value ...]

One process runs the worker's step: the GCKD module (``model/gckd.py``: student, EMA teacher,
propagation net, matching head) around a random CLIP of ``--size`` in a DeepSpeed engine
(``distributed/deepspeed_config.build_engine``, a one-rank gloo group; ``--engine torch``: plain
torch AdamW), random batches of the configured shapes, and a real memory actor in a local Ray
(loopback) whose queues are filled to ``gckd.queue_size`` (default here 65,536) first. Each
timed step reads the memory (``adaptation.read_memory``: flush, publish, fetch), runs forward,
``engine.backward``, ``engine.step``, the EMA step, and pushes the teacher features
(``adaptation.push_teacher``). Phases are ``torch.profiler`` ranges: ``gckd.*`` inside
GCKDDistiller (student / teacher forward, source loss, kNN graph, propagation, positives, CMKD,
matching head, EMA) and ``bench.*`` around the rest. The snapshot read is charged once per
``gckd.snapshot_every`` steps and the actor's pseudo-id refresh (timed on its own) once per
``gckd.pseudo_every`` steps, as the worker pays them. CPU only. The last line is JSON.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import time
from types import SimpleNamespace

os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")  # loopback, before import ray

import torch  # noqa: E402
from torch.profiler import ProfilerActivity, profile, record_function  # noqa: E402

from benchmarks.common import (SIZE_CHOICES, benchmark_tokenizer, build_model,  # noqa: E402
                               filled_memory_actor, median_seconds, random_batches,
                               size_overrides)
from gckd_ray.config import load_config  # noqa: E402
from gckd_ray.distributed.adaptation import push_teacher, read_memory  # noqa: E402

DEFAULTS = ("gckd.queue_size=65536",)
SMOKE = ("train.batch_size=4", "gckd.queue_size=64", "gckd.memory_nodes=4")
# Phase -> profiler range. Forward ranges live in model/gckd.py; "bench.*" ranges are here.
FORWARD_PHASES = {"student_forward": "gckd.student_forward",
                  "teacher_forward": "gckd.teacher_forward",
                  "source_loss": "gckd.source_loss", "knn_graph": "gckd.knn_graph",
                  "propagation": "gckd.propagation", "positives": "gckd.positives",
                  "cmkd": "gckd.cmkd", "matching": "gckd.matching"}
STEP_PHASES = {"backward": "bench.backward", "optimizer_step": "bench.optimizer_step",
               "ema": "gckd.ema", "memory_push": "bench.memory_push"}
MEMORY_AND_GRAPH = ("memory_push", "snapshot_read", "pseudo_id_refresh", "knn_graph",
                    "propagation")


@contextlib.contextmanager
def _trainer(module, cfg, engine: str):
    """(step_fn, forward_fn): DeepSpeed engine in a one-rank gloo group, or torch AdamW."""
    if engine == "torch":
        optimizer = torch.optim.AdamW([p for p in module.parameters() if p.requires_grad],
                                      lr=cfg.train.lr, weight_decay=cfg.train.weight_decay)

        def backward(loss):
            loss.backward()

        def step():
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
        yield module, backward, step
        return
    from gckd_ray.distributed.deepspeed_config import build_engine

    own_group = not torch.distributed.is_initialized()
    if own_group:
        os.environ.setdefault("LOCAL_RANK", "0")  # DeepSpeed's sanity check reads it
        # One rank needs no rendezvous; a TCPStore would listen on every interface ("::").
        torch.distributed.init_process_group("gloo", store=torch.distributed.HashStore(),
                                             rank=0, world_size=1)
    try:
        wrapped, _ = build_engine(module, cfg, lambda step: 1.0, on_gpu=False)
        yield wrapped, wrapped.backward, wrapped.step
    finally:
        if own_group:
            torch.distributed.destroy_process_group()


def measure(cfg, size: str, steps: int, engine: str) -> dict:
    torch.manual_seed(cfg.run.seed)
    tokenizer = benchmark_tokenizer()
    module = build_model(cfg, size, tokenizer)
    dim = module.encoder.embed_dim
    params = sum(p.numel() for p in module.parameters())
    cpu = torch.device("cpu")
    with (_trainer(module, cfg, engine) as (model, backward, optimizer_step),
          filled_memory_actor(cfg, dim, "gckd-step-breakdown") as client):
        refresh_s = median_seconds(client.refresh, 2)
        generator = torch.Generator().manual_seed(cfg.run.seed)

        def one_step() -> tuple[float, float, int]:
            start = time.perf_counter()
            view, _ = read_memory(client, False, 0, cfg, 0, cpu)  # never refreshes: any step
            snapshot_s = time.perf_counter() - start
            source, target = random_batches(cfg, tokenizer, generator)
            start = time.perf_counter()
            with record_function("bench.forward"):
                out = model(source, target, view, True)
            with record_function("bench.backward"):
                backward(out.losses["loss"])
            with record_function("bench.optimizer_step"):
                optimizer_step()
            module.ema_step()
            rows = torch.arange(len(source["pids"]))     # the batch is its own source split
            with record_function("bench.memory_push"):
                push_teacher(client, out.teacher, SimpleNamespace(labels=source["pids"],
                                                                  image_of=rows), rows, target)
            return time.perf_counter() - start, snapshot_s, 4 * len(rows) + len(view.graph_nodes)

        one_step()                                        # warm-up, not timed
        with profile(activities=[ProfilerActivity.CPU]) as prof:
            timed = [one_step() for _ in range(steps)]
        client.flush()
    totals: dict[str, float] = {}
    for event in prof.key_averages():
        if event.key.startswith(("gckd.", "bench.")):
            totals[event.key] = event.cpu_time_total / 1e3 / steps  # ms per step
    return _summary(cfg, size, engine, params, timed, totals, refresh_s)


def _summary(cfg, size, engine, params, timed, totals, refresh_s) -> dict:
    ms = {name: totals.get(key, 0.0) for name, key in {**FORWARD_PHASES, **STEP_PHASES}.items()}
    ms["forward_other"] = totals["bench.forward"] - sum(ms[k] for k in FORWARD_PHASES)
    ms["snapshot_read"] = 1e3 * sum(t[1] for t in timed) / len(timed) / cfg.gckd.snapshot_every
    ms["pseudo_id_refresh"] = 1e3 * refresh_s / cfg.gckd.pseudo_every
    measured = 1e3 * sum(t[0] for t in timed) / len(timed)  # forward .. push, wall clock
    inside = sum(v for k, v in ms.items() if k not in ("snapshot_read", "pseudo_id_refresh"))
    ms["other"] = max(0.0, measured - inside)
    step_ms = measured + ms["snapshot_read"] + ms["pseudo_id_refresh"]
    share = {k: v / step_ms for k, v in ms.items()}
    return {
        "benchmark": "step_breakdown", "machine": platform.machine(), "cpus": os.cpu_count(),
        "torch_threads": torch.get_num_threads(), "size": size, "engine": engine,
        "zero_stage": cfg.deepspeed.zero_stage, "parameters": params,
        "batch_per_domain": cfg.train.batch_size, "queue_size": cfg.gckd.queue_size,
        "embed_dim": cfg.model.embed_dim, "memory_nodes": cfg.gckd.memory_nodes,
        "graph_nodes": timed[-1][2], "steps": len(timed),
        "step_ms": round(step_ms, 3),
        "ms_per_step": {k: round(v, 3) for k, v in ms.items()},
        "share_of_step": {k: round(v, 4) for k, v in share.items()},
        "memory_and_graph_share": round(sum(share[k] for k in MEMORY_AND_GRAPH), 4),
        "goal_memory_and_graph_share": 0.05,
    }


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.step_breakdown",
                                     description=__doc__.split("\n\n")[0])
    parser.add_argument("--size", choices=SIZE_CHOICES, default="vit-b/16",
                        help="CLIP size (default vit-b/16; config = the config's tiny CLIP)")
    parser.add_argument("--steps", type=int, default=3, help="timed steps after 1 warm-up")
    parser.add_argument("--engine", choices=("deepspeed", "torch"), default="deepspeed")
    parser.add_argument("--smoke", action="store_true", help="tiny sizes, 2 steps (tests)")
    parser.add_argument("overrides", nargs="*", help="config key=value")
    args = parser.parse_args(argv)
    size = "smoke" if args.smoke else args.size
    cfg = load_config(None, [*size_overrides(size), *DEFAULTS, *(SMOKE if args.smoke else ()),
                             *args.overrides])
    result = measure(cfg, size, 2 if args.smoke else args.steps, args.engine)
    print(f"GCKD step {result['step_ms']:.1f} ms ({size}, {result['parameters']:,} parameters, "
          f"{args.engine} ZeRO-{result['zero_stage']}, batch {result['batch_per_domain']} per "
          f"domain, queue {result['queue_size']} x {result['embed_dim']}, "
          f"{result['graph_nodes']} graph nodes, {result['steps']} steps)")
    print(f"  {'phase':18s} {'ms/step':>10s} {'share':>8s}")
    for name, value in result["ms_per_step"].items():
        print(f"  {name:18s} {value:10.1f} {100 * result['share_of_step'][name]:7.2f}%")
    print(f"  memory actor + graph ({' + '.join(MEMORY_AND_GRAPH)}): "
          f"{100 * result['memory_and_graph_share']:.2f}% of the step (goal <= 5%)")
    print(json.dumps(result))
    return result


if __name__ == "__main__":
    main()
