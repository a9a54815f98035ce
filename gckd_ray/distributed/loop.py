"""The one epoch loop every method runs, and the pieces it shares.

A method (``SourceSteps`` here for ``source_only`` / ``oracle``, ``adaptation.GCKDSteps`` for
``gckd``) gives the loop two things: its epoch's batches (the items, the ``load`` that reads one
into host tensors, run in loader processes with ``train.loader_processes``, and the ``prepare``
that turns a loaded batch into tensors on the device, augmentation included, run ahead in a
thread with ``train.prefetch``), and its step's forward (named losses, step statistics and what to do after the optimizer step: the
EMA update and the memory push). The loop owns everything else, in this order per step:
forward, backward and optimizer step, the method's after-step, running sums, progress line.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from contextlib import closing, contextmanager
from dataclasses import dataclass, field
from typing import Any, Protocol

import torch

from gckd_ray.config import Config
from gckd_ray.data.datasets import PairedSplit
from gckd_ray.data.loader import load_batches
from gckd_ray.data.prefetch import Prefetcher
from gckd_ray.data.transforms import normalize


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


@dataclass
class StepResult:
    """One step's forward: ``losses`` (``"loss"`` is what is optimised), step statistics, and
    ``after_step(stepped)``, run after the optimizer step (``stepped``: it updated weights)."""

    losses: dict[str, torch.Tensor]
    stats: dict[str, float] = field(default_factory=dict)
    after_step: Callable[[bool], None] = lambda stepped: None


class StepMethod(Protocol):
    def epoch_batches(self, epoch: int
                      ) -> tuple[Sequence[Any], Callable[[Any], Any], Callable[[Any], Any]]:
        """The epoch's batch items, the ``load`` that reads one into host tensors (no random
        draws: any process may run it) and the ``prepare`` that makes a loaded batch ready for
        ``forward`` (called in item order: it draws the augmentation)."""

    def forward(self, model, batch: Any, epoch: int, step: int, steps: int) -> StepResult:
        """The step's forward on a prepared batch."""

    def end_epoch(self) -> None:
        """After the epoch's last step."""


def run_epoch(model, scheduler, method: StepMethod, epoch: int, cfg: Config, log=None
              ) -> dict[str, float]:
    """One epoch of ``method``'s steps; returns the mean of each named loss and statistic.
    ``log`` (a ``MetricsLog``, rank 0) prints and records the progress reports."""
    model.train()
    items, load, prepare = method.epoch_batches(epoch)
    sums: dict[str, float] = {}
    start = time.perf_counter()
    with prepared_batches(items, load, prepare, cfg) as prepared:
        for step, batch in enumerate(prepared):
            out = method.forward(model, batch, epoch, step, len(items))
            out.after_step(engine_step(model, out.losses["loss"]))
            for name, value in {**out.losses, **out.stats}.items():
                # .item(), not float(): float() of a tensor that requires grad warns every run.
                value = value.item() if isinstance(value, torch.Tensor) else value
                sums[name] = sums.get(name, 0.0) + value
            if log is not None and (step + 1) % cfg.train.log_every == 0:
                log.progress(epoch, step, len(items), sums, scheduler.get_last_lr()[0],
                             start, loss_names=out.losses)
    method.end_epoch()
    return {k: v / len(items) for k, v in sums.items()}


@contextmanager
def prepared_batches(items: Sequence[Any], load: Callable[[Any], Any],
                     prepare: Callable[[Any], Any], cfg: Config) -> Iterator[Iterable[Any]]:
    """``prepare(load(item))`` for each item, in order: ``load`` in ``train.loader_processes``
    loader processes, ``prepare`` a step ahead in a thread with ``train.prefetch``. Leaving the
    block stops both, also after an error."""
    loaded = load_batches(items, load, loader_processes(cfg),
                          pin_memory=cfg.train.use_gpu and torch.cuda.is_available())
    with closing(loaded), Prefetcher(loaded, prepare, enabled=cfg.train.prefetch) as prepared:
        yield prepared


def loader_processes(cfg: Config) -> int:
    """``train.loader_processes`` with -1 resolved: ``train.cpus_per_worker`` on GPU, else 0."""
    if cfg.train.loader_processes >= 0:
        return cfg.train.loader_processes
    return int(cfg.train.cpus_per_worker) if cfg.train.use_gpu else 0


class SourceSteps:
    """``source_only`` and ``oracle``: identity-balanced labelled pairs, the retriever's losses."""

    def __init__(self, split: PairedSplit, sampler, augment, device: torch.device):
        self.split, self.sampler, self.augment, self.device = split, sampler, augment, device

    def epoch_batches(self, epoch: int):
        def prepare(loaded: dict[str, torch.Tensor]
                    ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
            batch = to_device(loaded, self.device)
            return normalize(self.augment(batch.pop("images"))), batch
        return self.sampler.epoch(epoch), self.split.batch, prepare

    def forward(self, model, batch, epoch: int, step: int, steps: int) -> StepResult:
        images, tensors = batch
        return StepResult(model(images, **tensors))

    def end_epoch(self) -> None:
        pass
