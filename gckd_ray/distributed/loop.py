"""Pieces shared by the epoch loops: batch to device, the optimizer step, progress lines."""

from __future__ import annotations

import time

import torch


def to_device(batch: dict[str, torch.Tensor], device: torch.device) -> dict[str, torch.Tensor]:
    return {k: v.to(device, non_blocking=True) for k, v in batch.items()}


def optimizer_step(model: torch.nn.Module, optimizer: torch.optim.Optimizer, scheduler,
                   loss: torch.Tensor, grad_clip: float) -> None:
    """Backward, optional global-norm clipping, optimizer and LR-scheduler step."""
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    if grad_clip > 0:
        torch.nn.utils.clip_grad_norm_(model.parameters(), grad_clip)
    optimizer.step()
    scheduler.step()


def log_progress(epoch: int, epochs: int, step: int, steps: int, sums: dict[str, float],
                 lr: float, start: float) -> None:
    """Running means of the named losses so far in the epoch, learning rate and step rate."""
    rate = (step + 1) / (time.perf_counter() - start)
    terms = " ".join(f"{k}={v / (step + 1):.4f}" for k, v in sums.items())
    print(f"[epoch {epoch + 1}/{epochs}] step {step + 1}/{steps} {terms} lr={lr:.2e} "
          f"{rate:.1f} it/s", flush=True)
