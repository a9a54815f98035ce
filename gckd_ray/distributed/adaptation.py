"""Worker-side GCKD plumbing: unpaired target feed, memory snapshots and pushes, the GCKD step
for the epoch loop (``loop.run_epoch``).

The method itself lives in ``model/gckd.py``; this module feeds it, talking to the memory actor
only through ``MemoryClient``. Every step pushes the teacher's features (fire-and-forget,
bounded in flight) and every ``gckd.snapshot_every`` steps reads the memory's published
snapshot (starting pseudo-id refreshes on schedule and applying each ``gckd.refresh_lag`` steps
later, each recorded in metrics.jsonl when applied) and turns it into the tensors the step
expects. A step's batches are read and decoded by ``load_step`` (in loader processes with
``train.loader_processes``, ``data/loader.py``) and given their views on the device by
``prepare_step`` (in a background thread while a step computes with ``train.prefetch``,
``data/prefetch.py``).
"""

from __future__ import annotations

import torch

from gckd_ray.config import Config
from gckd_ray.data.datasets import PairedSplit, UnpairedStreams, UnpairedTarget
from gckd_ray.data.transforms import normalize
from gckd_ray.distributed.loop import StepResult, to_device
from gckd_ray.distributed.memory import MemoryClient
from gckd_ray.distributed.metrics_log import MetricsLog
from gckd_ray.model.centring import SOURCE, TARGET
from gckd_ray.model.gckd import MemoryView, target_groups
from gckd_ray.model.collectives import all_gather_many, broadcast
from gckd_ray.model.momentum import unwrap


def memory_view(snapshot: dict[str, torch.Tensor], nodes_per_group: int,
                device: torch.device) -> MemoryView | None:
    """Tensors for one step; None while the queues are still empty."""
    if snapshot["image_features"].shape[0] == 0 or snapshot["text_features"].shape[0] == 0:
        return None

    def groups(modality: str) -> torch.Tensor:
        labels, domain = snapshot[f"{modality}_labels"], snapshot[f"{modality}_domain"]
        return torch.where(domain == SOURCE, labels, target_groups(labels)).to(device)

    graph = []
    for modality in ("image", "text"):
        feats, domain = snapshot[f"{modality}_features"], snapshot[f"{modality}_domain"]
        for flag in (SOURCE, TARGET):
            graph.append(feats[domain == flag][-nodes_per_group:])  # newest C of the group
    return MemoryView(
        image=snapshot["image_features"].float().to(device), image_groups=groups("image"),
        text=snapshot["text_features"].float().to(device), text_groups=groups("text"),
        graph_nodes=torch.cat(graph).float().to(device),
        target_image_pseudo=snapshot["target_image_pseudo_ids"].to(device),
        target_text_pseudo=snapshot["target_text_pseudo_ids"].to(device))


class TargetFeed:
    """Target batches: image rows and caption rows from independent streams; in the paired
    variant the images are those of the step's captions (so pairs meet in the batch)."""

    def __init__(self, target: UnpairedTarget, cfg: Config, rank: int, world: int):
        self.target = target
        self.streams = UnpairedStreams(len(target.images), len(target.captions),
                                       cfg.train.batch_size, cfg.run.seed, rank, world)

    def epoch(self, epoch: int, steps: int):
        batches = self.streams.epoch(epoch, steps)
        if self.target.image_of is None:
            return batches
        return [(self.target.image_of[captions], captions) for _, captions in batches]

    def batch(self, image_rows: torch.Tensor, text_rows: torch.Tensor
              ) -> dict[str, torch.Tensor]:
        """Host tensors of a target batch: uint8 ``images`` (B, 3, H, W), token rows, rows."""
        ids, mask = self.target.captions.take(text_rows)
        return {"images": self.target.images.fetch(image_rows), "image_rows": image_rows,
                "input_ids": ids, "attention_mask": mask, "text_rows": text_rows}


def load_step(split: PairedSplit, feed: TargetFeed):
    """The epoch's ``load``: ``(caption_idx, (image_rows, text_rows)) -> (caption_idx, source
    batch, target batch)`` as host tensors (images uint8, not augmented). No random draws, so
    a loader process may run it."""
    def load(item):
        idx, (image_rows, text_rows) = item
        return idx, split.batch(idx), feed.batch(image_rows, text_rows)
    return load


def prepare_step(augment, strong: str, device: torch.device):
    """The epoch's ``prepare`` for its ``Prefetcher``: a loaded step on ``device`` with its
    views, source first, then target (the augmentation draws' order)."""
    def prepare(loaded):
        idx, src, tgt = loaded
        src = to_device(src, device)
        src.update(views(src.pop("images"), augment, strong))
        tgt = to_device(tgt, device)
        return idx, src, {**views(tgt.pop("images"), augment, strong), **tgt}
    return prepare


def views(images: torch.Tensor, augment, strong: str) -> dict[str, torch.Tensor]:
    """Normalised ``images`` for the student and, with ``strong="student"``,
    ``teacher_images``: the teacher keeps the plain augmented view, the student gets a stronger
    view of it. ``"both"``: one strong view for both; ``"none"``: the plain view only."""
    plain = augment(images)
    if strong == "none":
        return {"images": normalize(plain)}
    view = normalize(augment.strong(plain))
    return {"images": view, "teacher_images": normalize(plain) if strong == "student" else view}


def push_teacher(client: MemoryClient | None, teacher: dict[str, torch.Tensor],
                 split: PairedSplit, caption_idx: torch.Tensor,
                 target: dict[str, torch.Tensor]) -> None:
    """Gather every rank's teacher features in rank order; rank 0 (``client``) pushes them.

    One pusher keeps the queue order independent of timing. Source entries carry source
    labels; target entries carry -1 (the memory assigns pseudo-ids itself and never sees
    target labels)."""
    pids = split.labels[caption_idx]
    rows_i, rows_t = target["image_rows"].cpu(), target["text_rows"].cpu()
    entries = [("image", "src_image", SOURCE, pids, split.image_of[caption_idx]),
               ("text", "src_text", SOURCE, pids, caption_idx),
               ("image", "tgt_image", TARGET, torch.full_like(rows_i, -1), rows_i),
               ("text", "tgt_text", TARGET, torch.full_like(rows_t, -1), rows_t)]
    device = teacher["src_image"].device
    # Two collectives per step instead of twelve: the float features, the int64 labels and rows.
    gathered = all_gather_many([t for _, key, _, labels, rows in entries
                                for t in (teacher[key].float(), labels.to(device),
                                          rows.to(device))])
    if client is not None:
        for n, (modality, _, domain, _, _) in enumerate(entries):
            feats, labels, rows = gathered[3 * n: 3 * n + 3]
            client.push(modality, feats, domain, labels, rows)


def read_memory(client: MemoryClient, refresh: bool, step: int, cfg: Config, rank: int,
                device: torch.device) -> tuple[MemoryView | None, list[dict[str, float]]]:
    """The memory read before global step ``step``: rank 0 applies the pseudo-id refreshes due
    by then, starts one when ``refresh`` and publishes a snapshot (``MemoryClient.read``);
    every rank reads that publication (its number is broadcast), so all ranks see identical
    memory.

    Returns:
        the step's memory view, and on rank 0 the statistics of the refreshes applied at this
        read (empty on the other ranks).
    """
    number, refreshed = torch.zeros(1, dtype=torch.long), []
    if rank == 0:
        number[0], refreshed = client.read(refresh, step)
    view = memory_view(client.snapshot(int(broadcast(number, src=0))), cfg.gckd.memory_nodes,
                       device)
    return view, refreshed


def refresh_due(epoch: int, step: int, steps: int, cfg: Config) -> bool:
    """Whether the memory read at (epoch, step) starts a pseudo-id refresh: it does when a
    multiple of ``gckd.pseudo_every`` global steps lies after the previous read and up to this
    one. A pure function of the schedule, so a resumed run refreshes exactly when an
    uninterrupted one does (and applies each refresh at the same later read). Never with
    ``gckd.use_pseudo_ids=false`` or without a target loss: nothing would read the ids."""
    if not (cfg.gckd.use_pseudo_ids and cfg.target_losses_on):
        return False
    snap, every = cfg.gckd.snapshot_every, cfg.gckd.pseudo_every
    now = epoch * steps + step
    if step >= snap:
        previous = now - snap
    elif epoch > 0:
        previous = (epoch - 1) * steps + ((steps - 1) // snap) * snap
    else:
        return False  # the very first read: the memory is still empty
    return now // every > previous // every


class GCKDSteps:
    """``gckd``: a source batch and an unpaired target batch per step; the memory is read every
    ``gckd.snapshot_every`` steps (starting and applying pseudo-id refreshes on schedule;
    ``log``, rank 0's ``MetricsLog``, records each refresh where it is applied); after the
    optimizer step the teacher follows by EMA and its features are pushed to the memory (rank
    0 pushes). Without a target loss (``Config.target_losses_on``) the run has no memory
    (``memory`` None): the teacher then only feeds the domain means."""

    def __init__(self, split: PairedSplit, sampler, feed: TargetFeed,
                 memory: MemoryClient | None,
                 augment, cfg: Config, device: torch.device, rank: int,
                 log: MetricsLog | None):
        self.split, self.sampler, self.feed, self.augment = split, sampler, feed, augment
        self.memory, self.cfg, self.device, self.rank, self.log = memory, cfg, device, rank, log
        self.pusher = memory if rank == 0 else None
        self.view: MemoryView | None = None
        self.adapt = False

    def epoch_batches(self, epoch: int):
        batches = self.sampler.epoch(epoch)
        targets = self.feed.epoch(epoch, len(batches))
        self.adapt = epoch >= self.cfg.gckd.warmup_epochs
        self.view = None
        strong = self.cfg.gckd.strong_views if self.adapt else "none"
        return (list(zip(batches, targets)), load_step(self.split, self.feed),
                prepare_step(self.augment, strong, self.device))

    def forward(self, model, batch, epoch: int, step: int, steps: int) -> StepResult:
        idx, src, tgt = batch
        if self.memory is not None and step % self.cfg.gckd.snapshot_every == 0:
            self.view, applied = read_memory(self.memory,
                                             refresh_due(epoch, step, steps, self.cfg),
                                             epoch * steps + step, self.cfg, self.rank,
                                             self.device)
            for refreshed in applied if self.log is not None else ():
                self.log.refresh(epoch, step, refreshed)
            if applied and self.log is not None and self.cfg.gckd.save_pseudo_ids:
                self.log.pseudo_ids(epoch, step, self.view.target_image_pseudo.cpu().numpy(),
                                    self.view.target_text_pseudo.cpu().numpy())
        out = model(src, tgt, self.view, self.adapt)

        def after_step(stepped: bool) -> None:
            if stepped:
                unwrap(model).ema_step()
            if self.memory is not None:  # every rank joins push_teacher's all-gather
                push_teacher(self.pusher, out.teacher, self.split, idx, tgt)
        return StepResult(out.losses, out.stats, after_step)

    def end_epoch(self) -> None:
        if self.memory is not None:
            self.memory.flush()
