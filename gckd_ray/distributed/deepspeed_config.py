"""The DeepSpeed JSON of a run, generated from the project's config, and the student's engine.

The generated config is the single source of truth for batch size, accumulation, clipping,
ZeRO stage and precision; ``deepspeed.config_file`` may override any of its entries (merged
key by key). ZeRO-3 keeps ``stage3_param_persistence_threshold: 0`` so every parameter is
partitioned: the EMA teacher is then updated shard-locally (model/momentum.py), which matches a
full-parameter EMA only when no parameter is kept whole.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import torch

from gckd_ray.config import Config, ConfigError, merge_dicts

# Never print DeepSpeed's per-step lines; progress comes from the project's own log.
_QUIET_STEPS = 10**9
_BUCKET = 20_000_000


def generated_config(cfg: Config, use_bf16: bool) -> dict[str, Any]:
    """DeepSpeed's JSON for this run (before the user's overrides)."""
    # Communication buckets of 2e7 elements (80 MB in fp32): DeepSpeed's defaults (5e8) would
    # pre-allocate 2 GB per worker, more than a ViT-B/16-size model's sharded states.
    zero: dict[str, Any] = {"stage": cfg.deepspeed.zero_stage, "reduce_bucket_size": _BUCKET,
                            "allgather_bucket_size": _BUCKET}
    if cfg.deepspeed.zero_stage == 3:
        zero.update(stage3_param_persistence_threshold=0, stage3_prefetch_bucket_size=_BUCKET)
    return {
        "train_micro_batch_size_per_gpu": cfg.train.batch_size,
        "gradient_accumulation_steps": cfg.deepspeed.gradient_accumulation_steps,
        "gradient_clipping": cfg.train.grad_clip,
        "zero_optimization": zero,
        "bf16": {"enabled": use_bf16},
        # The optimizer is torch's AdamW: DeepSpeed's own CPU Adam would JIT-compile (30-40 s).
        "zero_allow_untested_optimizer": True,
        "steps_per_print": _QUIET_STEPS,
        "wall_clock_breakdown": False,
    }


def deepspeed_config(cfg: Config, use_bf16: bool) -> dict[str, Any]:
    """The generated config merged with ``deepspeed.config_file`` (if set).

    Raises:
        ConfigError: the file is missing, not JSON, or not a JSON object.
    """
    config = generated_config(cfg, use_bf16)
    if not cfg.deepspeed.config_file:
        return config
    path = Path(cfg.deepspeed.config_file)
    try:
        user = json.loads(path.read_text())
    except FileNotFoundError:
        raise ConfigError(f"deepspeed.config_file: {path} does not exist") from None
    except json.JSONDecodeError as err:
        raise ConfigError(f"deepspeed.config_file: {path}: line {err.lineno}, column "
                          f"{err.colno}: {err.msg}") from None
    if not isinstance(user, dict):
        raise ConfigError(f"deepspeed.config_file: {path}: expected a JSON object, got "
                          f"{type(user).__name__}")
    return merge_dicts(config, user)


def param_groups(module: torch.nn.Module, lr: float, new_module_scale: float) -> list[dict]:
    """AdamW groups: the CLIP model's parameters (``encoder.clip``: pretrained when
    ``model.pretrained`` is set) at ``lr``, the modules added around it at
    ``lr * new_module_scale`` (IRRA's recipe). One group when the scale is 1.

    The learning-rate schedule multiplies each group's own ``lr``, so the ratio holds
    through warm-up and decay."""
    trainable = [(name, p) for name, p in module.named_parameters() if p.requires_grad]
    if new_module_scale == 1:
        return [{"params": [p for _, p in trainable], "lr": lr}]
    clip = [p for name, p in trainable if name.startswith("encoder.clip.")]
    new = [p for name, p in trainable if not name.startswith("encoder.clip.")]
    groups = [{"params": clip, "lr": lr}, {"params": new, "lr": lr * new_module_scale}]
    return [g for g in groups if g["params"]]  # ZeRO cannot flatten an empty group


def build_engine(module: torch.nn.Module, cfg: Config, lr_lambda, on_gpu: bool):
    """The student's engine inside the process group Ray Train created (``on_gpu``: bf16
    weights on CUDA; else fp32 on CPU).

    Returns:
        (engine, scheduler): the engine steps the optimizer, clips and steps the scheduler in
        ``engine.step()``; ``engine.module`` is ``module``.
    """
    # DeepSpeed picks its accelerator once, at first use; a CPU worker must say so (DESIGN §7).
    os.environ.setdefault("DS_ACCELERATOR", "cuda" if on_gpu else "cpu")
    import deepspeed

    optimizer = torch.optim.AdamW(param_groups(module, cfg.train.lr, cfg.train.new_module_lr_scale),
                                  lr=cfg.train.lr, weight_decay=cfg.train.weight_decay)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_lambda)
    engine, _, _, scheduler = deepspeed.initialize(
        model=module, optimizer=optimizer, lr_scheduler=scheduler,
        config=deepspeed_config(cfg, use_bf16=on_gpu), dist_init_required=False)
    return engine, scheduler
