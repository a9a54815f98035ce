"""Progress lines printed by rank 0 during an epoch."""

from __future__ import annotations

import time


def log_progress(epoch: int, epochs: int, step: int, steps: int, sums: dict[str, float],
                 lr: float, start: float) -> None:
    """Running means of the named losses so far in the epoch, learning rate and step rate."""
    rate = (step + 1) / (time.perf_counter() - start)
    terms = " ".join(f"{k}={v / (step + 1):.4f}" for k, v in sums.items())
    print(f"[epoch {epoch + 1}/{epochs}] step {step + 1}/{steps} {terms} lr={lr:.2e} "
          f"{rate:.1f} it/s", flush=True)
