"""Per-worker memory of parameters + gradients + optimizer states under ZeRO-0/2/3.

    python -m benchmarks.zero_memory [--smoke] [--workers 2]

The model is this project's GCKD module (student dual encoder, EMA teacher, propagation net,
matching head) around a randomly initialised CLIP of ViT-B/16 size (vision 768 x 12 layers,
patch 16; text 512 x 12 layers, vocab 49,408; 512-d embedding), fp32 on CPU, with torch AdamW
inside a DeepSpeed engine, ``--workers`` gloo processes. ``--smoke`` uses a tiny CLIP.

What is counted: after a first optimizer step (so Adam's moments exist), a second step's
forward and backward run and, at that point (gradients alive, before ``engine.step()``), every
distinct tensor storage reachable from the model's parameters and gradients and from the
engine's optimizer object (DeepSpeed's flat groups, fp32 partitions, gradient partitions and
buckets, the base optimizer's state) is summed once. Activations are not counted. The last
output line is JSON with bytes per stage and the ratios to ZeRO-0 (goal: ZeRO-3 <= 0.6).
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import tempfile

import torch
import torch.multiprocessing as mp

BYTES_PER_MIB = 2**20


def _storages(obj, seen_objs: set[int], out: dict[int, int], depth: int = 0) -> None:
    """Distinct tensor storages (data pointer -> bytes) reachable from ``obj``."""
    if depth > 6 or id(obj) in seen_objs:
        return
    seen_objs.add(id(obj))
    if isinstance(obj, torch.Tensor):
        if obj.numel():
            storage = obj.untyped_storage()
            out[storage.data_ptr()] = storage.nbytes()
        grad = obj.grad if obj.is_leaf else None
        if grad is not None:
            _storages(grad, seen_objs, out, depth + 1)
        return
    if isinstance(obj, dict):
        items = list(obj.keys()) + list(obj.values())
    elif isinstance(obj, (list, tuple, set)):
        items = list(obj)
    elif hasattr(obj, "__dict__") and type(obj).__module__.split(".")[0] in ("deepspeed", "torch"):
        items = list(vars(obj).values())
    else:
        return
    for item in items:
        _storages(item, seen_objs, out, depth + 1)


def _worker(rank: int, world: int, port: int, stage: int, smoke: bool, out: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank),
                      WORLD_SIZE=str(world), LOCAL_RANK=str(rank), DS_ACCELERATOR="cpu")
    torch.distributed.init_process_group("gloo", rank=rank, world_size=world)
    from transformers import CLIPModel

    from benchmarks.common import clip_config
    from gckd_ray.config import load_config
    from gckd_ray.distributed.deepspeed_config import build_engine
    from gckd_ray.model.encoders import DualEncoder
    from gckd_ray.model.gckd import GCKDDistiller
    from gckd_ray.model.losses import SourceLoss

    clip_cfg, image_size, text_length = clip_config("smoke" if smoke else "vit-b/16")
    # graph.k=5: a batch of 2 per domain gives the step graph 8 nodes (k <= 7; memory unused).
    cfg = load_config(None, [f"deepspeed.zero_stage={stage}", "train.batch_size=2", "graph.k=5",
                             "train.instances_per_id=2", f"data.text_length={text_length}",
                             f"data.image_height={image_size[0]}",
                             f"data.image_width={image_size[1]}"])
    torch.manual_seed(0)
    clip = CLIPModel._from_config(clip_cfg, attn_implementation="sdpa")
    student = DualEncoder(clip, eos_id=2, text_length=text_length, image_size=image_size)
    module = GCKDDistiller(student, SourceLoss(cfg.loss, student.embed_dim, 100), cfg)
    engine, _ = build_engine(module, cfg, lambda step: 1.0, on_gpu=False)
    vocab = clip_cfg.text_config.vocab_size
    ids = torch.randint(4, vocab, (2, text_length))
    ids[:, -1] = 2  # eos
    source = {"images": torch.randn(2, 3, *image_size), "input_ids": ids,
              "attention_mask": torch.ones_like(ids), "pids": torch.tensor([0, 0])}
    target = {"images": torch.randn(2, 3, *image_size), "image_rows": torch.arange(2),
              "input_ids": ids.flip(0), "attention_mask": torch.ones_like(ids),
              "text_rows": torch.arange(2)}
    for step in range(2):
        loss = engine(source, target, None, True).losses["loss"]
        engine.backward(loss)
        if step == 1:
            held: dict[int, int] = {}
            _storages([list(engine.module.parameters()), engine.optimizer], set(), held)
        engine.step()
    total = torch.tensor([float(sum(held.values()))])
    peak = total.clone()
    torch.distributed.all_reduce(peak, op=torch.distributed.ReduceOp.MAX)
    params = sum(p.numel() for p in module.parameters())
    if rank == 0:
        with open(out, "w") as f:
            json.dump({"bytes": int(peak.item()), "parameters": params}, f)
    torch.distributed.destroy_process_group()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def measure(stage: int, workers: int, smoke: bool) -> dict:
    with tempfile.TemporaryDirectory() as tmp:
        out = os.path.join(tmp, "result.json")
        mp.start_processes(_worker, args=(workers, _free_port(), stage, smoke, out),
                           nprocs=workers, start_method="spawn")
        with open(out) as f:
            return json.load(f)


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.zero_memory",
                                     description=__doc__.split("\n\n")[0])
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--smoke", action="store_true", help="tiny CLIP (the CI smoke test)")
    args = parser.parse_args(argv)
    stages = {stage: measure(stage, args.workers, args.smoke) for stage in (0, 2, 3)}
    base = stages[0]["bytes"]
    print(f"model parameters (student + teacher + heads): {stages[0]['parameters']:,}")
    print(f"{'ZeRO stage':<12}{'MiB per worker':>16}{'vs ZeRO-0':>12}")
    for stage, res in stages.items():
        print(f"{stage:<12}{res['bytes'] / BYTES_PER_MIB:>16.1f}{res['bytes'] / base:>12.3f}")
    summary = {"workers": args.workers, "smoke": args.smoke,
               "parameters": stages[0]["parameters"],
               "mib_per_worker": {s: r["bytes"] / BYTES_PER_MIB for s, r in stages.items()},
               "ratio_to_zero0": {s: r["bytes"] / base for s, r in stages.items()},
               "goal_zero3_ratio": 0.6}
    print(json.dumps(summary))
    return summary


if __name__ == "__main__":
    main()
