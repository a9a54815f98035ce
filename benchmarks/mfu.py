"""Model FLOPs utilisation (MFU) of the full GCKD training step, single worker, no Ray.

    python -m benchmarks.mfu [--size vit-b/16] [--steps 10] [--compile] [--peak-tflops X]
                             [--device auto|cuda|cpu] [--smoke] [key=value ...]

The step is the worker's GCKD step without the plumbing (DESIGN.md §7: the kernel-level
benchmark runs without Ray): the GCKD module (student, EMA teacher, propagation net, matching
head) around a random CLIP of ``--size``, one random source batch and one random target batch
of the configured shapes, a random memory snapshot of ``gckd.queue_size`` features per modality
(65,536 at vit-b/16 size), forward, backward, gradient clipping, AdamW, EMA. It imports only
torch, transformers, torch-geometric, faiss when installed (on CUDA the kNN graph is a torch
matmul + sort on the device) and ``gckd_ray.config/data/model``.

Model FLOPs = what ``torch.utils.flop_counter.FlopCounterMode`` counts in one eager step:
matmuls, convolutions and attention of student forward + backward, teacher forward, heads and
losses (CPU SDPA kernels are added to its table; the optimizer and EMA are not counted).
MFU = FLOPs / median step time / peak. On CUDA: bf16 autocast, SDPA attention, fused AdamW,
TF32, optional ``--compile`` (torch.compile of the four towers and the matching head); peak =
the device's dense bf16 peak by name (H100 SXM / H200 989, H100 PCIe 756, A100 312 TFLOP/s) or
``--peak-tflops``. On CPU: fp32, and unless ``--peak-tflops`` is given the peak is the measured
throughput of a 2048^3 fp32 matmul (an achievable peak, above which no step can run): a CPU
figure, not a GPU one. The last line is JSON.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import statistics
import time

import torch
from torch.utils.flop_counter import FlopCounterMode

from benchmarks.common import (SIZE_CHOICES, benchmark_tokenizer, build_model,
                               random_batches, random_memory_view, size_overrides)
from gckd_ray.config import load_config

# Dense bf16 TFLOP/s (no sparsity), matched against torch.cuda.get_device_name in this order.
GPU_PEAKS = (("H200", 989.0), ("H100 PCIe", 756.0), ("H100", 989.0), ("A100", 312.0))
MATMUL_SIZE = 2048  # the CPU peak's matmul: large enough for the BLAS kernel's best rate
PUBLISHED = ("gckd.queue_size=65536",)  # DESIGN.md §2 reference settings (vit-b/16 size)
SMOKE = ("train.batch_size=4", "gckd.queue_size=64", "gckd.memory_nodes=4")


def _cpu_sdpa_formulas() -> dict:
    """FlopCounterMode's SDPA formulas for the CPU flash-attention kernels it does not list."""
    from torch.utils.flop_counter import flop_registry

    aten = torch.ops.aten
    # The registry holds shape-wrapped formulas; custom_mapping wraps again, so pass the raw one.
    return {aten._scaled_dot_product_flash_attention_for_cpu:
            flop_registry[aten._scaled_dot_product_flash_attention].__wrapped__,
            aten._scaled_dot_product_flash_attention_for_cpu_backward:
            flop_registry[aten._scaled_dot_product_flash_attention_backward].__wrapped__}


def peak_tflops(device: torch.device, given: float | None) -> tuple[float, str]:
    """(peak TFLOP/s, where it comes from)."""
    if given:
        return given, "--peak-tflops"
    if device.type == "cuda":
        name = torch.cuda.get_device_name(device)
        for key, peak in GPU_PEAKS:
            if key in name:
                return peak, f"dense bf16 peak of {name}"
        raise SystemExit(f"no bf16 peak known for {name!r}: pass --peak-tflops")
    return _cpu_matmul_tflops(), (f"CPU: measured fp32 matmul throughput ({MATMUL_SIZE}^3, "
                                  f"best of 5, {torch.get_num_threads()} threads)")


def _cpu_matmul_tflops() -> float:
    """Best fp32 TFLOP/s of a square matmul on this CPU: an achievable peak (the clock under
    load and the FMA width of a shared virtual CPU are not reliably known from cpuinfo)."""
    a = torch.randn(MATMUL_SIZE, MATMUL_SIZE)
    b = torch.randn(MATMUL_SIZE, MATMUL_SIZE)
    a @ b  # warm-up
    best = min(_seconds(lambda: a @ b) for _ in range(5))
    return 2 * MATMUL_SIZE**3 / best / 1e12


def _seconds(fn) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def _flops_by_part(counts: dict[str, dict]) -> dict[str, int]:
    """FLOPs per child of the root module (encoder = student, teacher, heads, losses).

    The counter lists every module that ran through its ``__call__`` with its subtree's FLOPs;
    the towers run through ``encode_image``/``encode_text``, so a child itself may be absent.
    Sum, per child, the outermost modules listed under it; "other" is what ran outside any
    child (CMKD, teacher smoothing and the kNN matmul are functions, not modules)."""
    totals = {name: sum(ops.values()) for name, ops in counts.items()}
    parts: dict[str, int] = {}
    for name, flops in totals.items():
        path = name.split(".")
        if len(path) < 2 or any(".".join(path[:i]) in totals for i in range(2, len(path))):
            continue
        parts[path[1]] = parts.get(path[1], 0) + flops
    parts["other"] = totals.get("Global", 0) - sum(parts.values())
    return parts


def _compile(model) -> None:
    """torch.compile the towers of student and teacher and the matching head, in place."""
    for encoder in (model.encoder, model.teacher.module):
        encoder.clip.vision_model.compile()
        encoder.clip.text_model.compile()
    if model.matching is not None:
        model.matching.compile()


def _setup(cfg, size: str, device: torch.device):
    """(model, trainable parameters, step): ``step(forward_mode, backward_mode)`` runs one
    training step, its forward and backward inside the given context managers."""
    cuda = device.type == "cuda"
    if cuda:
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    torch.manual_seed(cfg.run.seed)
    tokenizer = benchmark_tokenizer()
    model = build_model(cfg, size, tokenizer).to(device).train()
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=cfg.train.lr, weight_decay=cfg.train.weight_decay,
                                  fused=cuda)
    generator = torch.Generator().manual_seed(cfg.run.seed)
    view = random_memory_view(cfg, model.encoder.embed_dim, generator, device)
    source, target = random_batches(cfg, tokenizer, generator, device)
    autocast = (torch.autocast("cuda", dtype=torch.bfloat16) if cuda
                else contextlib.nullcontext())

    def step(forward_mode=contextlib.nullcontext(), backward_mode=contextlib.nullcontext()):
        with forward_mode, autocast:
            out = model(source, target, view, True)
        with backward_mode:
            out.losses["loss"].backward()
        torch.nn.utils.clip_grad_norm_(params, cfg.train.grad_clip, foreach=True)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        model.ema_step()
    return model, params, step


def _count(step) -> tuple[int, dict[str, int], int]:
    """(total, forward per part, backward) FLOPs of one step. Two counters: the counter's
    module attribution of backward ops is not reliable for modules run through helper
    methods, so backward is counted as a whole."""
    forward, backward = (FlopCounterMode(display=False, custom_mapping=_cpu_sdpa_formulas())
                         for _ in range(2))
    step(forward, backward)
    return (forward.get_total_flops() + backward.get_total_flops(),
            _flops_by_part(forward.get_flop_counts()), backward.get_total_flops())


def count_step_flops(cfg, size: str) -> int:
    """Model FLOPs of one GCKD training step at ``cfg``'s shapes (eager, on the CPU)."""
    return _count(_setup(cfg, size, torch.device("cpu"))[2])[0]


def measure(cfg, size: str, device: torch.device, steps: int, warmup: int,
            compile_model: bool) -> dict:
    model, params, step = _setup(cfg, size, device)
    flops, by_part, backward_flops = _count(step)
    if compile_model:
        _compile(model)
    cuda = device.type == "cuda"
    times = []
    for i in range(warmup + steps):
        if cuda:
            torch.cuda.synchronize(device)
        start = time.perf_counter()
        step()
        if cuda:
            torch.cuda.synchronize(device)
        if i >= warmup:
            times.append(time.perf_counter() - start)
    return {"flops": flops, "forward_flops_by_part": by_part, "backward_flops": backward_flops,
            "step_s": statistics.median(times), "step_s_all": times,
            "parameters": sum(p.numel() for p in model.parameters()),
            "trainable_parameters": sum(p.numel() for p in params)}


def _device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.mfu",
                                     description=__doc__.split("\n\n")[0])
    parser.add_argument("--size", choices=SIZE_CHOICES, default=None,
                        help="CLIP size (default: vit-b/16 on CUDA, config on CPU)")
    parser.add_argument("--device", default="auto", help="auto (default), cuda or cpu")
    parser.add_argument("--steps", type=int, default=10, help="timed steps (median is used)")
    parser.add_argument("--warmup", type=int, default=3, help="untimed steps before timing")
    parser.add_argument("--compile", action="store_true", help="torch.compile the towers")
    parser.add_argument("--peak-tflops", type=float, default=None,
                        help="the device's peak TFLOP/s (default: by GPU name / CPU estimate)")
    parser.add_argument("--smoke", action="store_true", help="tiny sizes, 1 step (tests)")
    parser.add_argument("overrides", nargs="*", help="config key=value")
    args = parser.parse_args(argv)
    device = _device(args.device)
    size = "smoke" if args.smoke else args.size or (
        "vit-b/16" if device.type == "cuda" else "config")
    cfg = load_config(None, [*size_overrides(size), *(PUBLISHED if size == "vit-b/16" else ()),
                             *(SMOKE if args.smoke else ()), *args.overrides])
    steps, warmup = (1, 1) if args.smoke else (args.steps, args.warmup)
    run = measure(cfg, size, device, steps, warmup, args.compile)
    peak, peak_source = peak_tflops(device, args.peak_tflops)
    achieved = run["flops"] / run["step_s"] / 1e12
    result = {
        "benchmark": "mfu", "device": (torch.cuda.get_device_name(device)
                                       if device.type == "cuda" else f"cpu ({os.cpu_count()} "
                                       f"cores, {torch.get_num_threads()} threads)"),
        "gpu": device.type == "cuda", "size": size, "compile": args.compile,
        "precision": "bf16 autocast, TF32" if device.type == "cuda" else "fp32",
        "batch_per_domain": cfg.train.batch_size, "image_size": [cfg.data.image_height,
                                                                 cfg.data.image_width],
        "text_length": cfg.data.text_length, "queue_size": cfg.gckd.queue_size,
        "parameters": run["parameters"], "trainable_parameters": run["trainable_parameters"],
        "model_tflop_per_step": run["flops"] / 1e12,
        "forward_tflop_by_part": {k: v / 1e12 for k, v in run["forward_flops_by_part"].items()},
        "backward_tflop": run["backward_flops"] / 1e12,
        "step_ms": 1e3 * run["step_s"], "step_ms_all": [1e3 * t for t in run["step_s_all"]],
        "achieved_tflops": achieved, "peak_tflops": peak, "peak_source": peak_source,
        "mfu": achieved / peak, "goal_mfu": 0.45,
    }
    print(f"GCKD step MFU on {result['device']} ({size}, {result['precision']}, batch "
          f"{result['batch_per_domain']} source + {result['batch_per_domain']} target, queue "
          f"{result['queue_size']}, {result['parameters']:,} parameters"
          f"{', compiled' if args.compile else ''})")
    print(f"  {'model GFLOP per step':28s} {1e3 * result['model_tflop_per_step']:12.3f}")
    for part, tflop in result["forward_tflop_by_part"].items():
        print(f"    {'forward, ' + part:26s} {1e3 * tflop:12.3f}")
    print(f"    {'backward, all':26s} {1e3 * result['backward_tflop']:12.3f}")
    print(f"  {'step time (median) ms':28s} {result['step_ms']:12.1f}")
    print(f"  {'achieved TFLOP/s':28s} {achieved:12.5f}")
    print(f"  {'peak TFLOP/s':28s} {peak:12.3f}  ({peak_source})")
    print(f"  {'MFU':28s} {100 * result['mfu']:11.2f}%  (goal >= 45% on a GPU)")
    if device.type != "cuda":
        print("  CPU figure: no GPU in this run; the goal is stated for a GPU.")
    print(json.dumps(result))
    return result


if __name__ == "__main__":
    main()
