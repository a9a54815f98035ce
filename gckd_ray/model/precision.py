"""The compute dtype of numerically sensitive math (losses, similarities, graph weights).

Softmaxes over hundreds of logits at temperature 0.02, EMA steps of 0.005 and cosine rankings
lose their meaning in bf16/fp16, so such math runs in at least float32. It never runs *below*
the caller's precision: a float64 input (a gradient check, a reference computation) stays
float64, so a test can compare at float64 tolerance and get what it asked for.
"""

from __future__ import annotations

import torch


def compute_dtype(*tensors: torch.Tensor) -> torch.dtype:
    """float32 promoted with every tensor's dtype: bf16/fp16/fp32 -> float32, float64 -> float64."""
    dtype = torch.float32
    for t in tensors:
        dtype = torch.promote_types(dtype, t.dtype)
    return dtype


def at_least_float32(x: torch.Tensor) -> torch.Tensor:
    """``x`` in :func:`compute_dtype` (the same tensor when it already is)."""
    return x.to(compute_dtype(x))


def in_compute_dtype(*tensors: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """The tensors in their common :func:`compute_dtype` (mixed float32/float64 inputs meet in
    float64, as torch's own type promotion would have them)."""
    dtype = compute_dtype(*tensors)
    return tuple(t.to(dtype) for t in tensors)
