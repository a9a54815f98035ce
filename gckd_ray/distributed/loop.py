"""Pieces shared by the epoch loops: batch to device, the optimizer step, progress lines."""

from __future__ import annotations

import time

import torch


def to_device(batch: dict[str, torch.Tensor], device: torch.device) -> dict[str, torch.Tensor]:
    return {k: v.to(device, non_blocking=True) for k, v in batch.items()}


def engine_step(engine, loss: torch.Tensor) -> bool:
    """Backward through the DeepSpeed engine, then ``engine.step()``: at a gradient-accumulation
    boundary it clips, steps the optimizer and the LR schedule and zeroes the gradients.

    Returns:
        whether the optimizer stepped (the EMA teacher follows only those steps).
    """
    boundary = engine.is_gradient_accumulation_boundary()
    engine.backward(loss)
    engine.step()
    return boundary


def log_progress(epoch: int, epochs: int, step: int, steps: int, sums: dict[str, float],
                 lr: float, start: float) -> float:
    """Print running means of the named losses so far in the epoch, learning rate and step
    rate; returns the step rate (steps/s since ``start``)."""
    rate = (step + 1) / (time.perf_counter() - start)
    terms = " ".join(f"{k}={v / (step + 1):.4f}" for k, v in sums.items())
    print(f"[epoch {epoch + 1}/{epochs}] step {step + 1}/{steps} {terms} lr={lr:.2e} "
          f"{rate:.1f} it/s", flush=True)
    return rate
