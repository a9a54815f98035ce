"""``train_loop_per_worker``: what every Ray Train worker runs.

Reads like single-process PyTorch: Ray appears only in ``get_context``, ``get_checkpoint`` and
``report``; the model is a DeepSpeed engine (ZeRO stage from ``deepspeed.zero_stage``) in the
process group Ray Train created. One epoch = an identity-balanced pass over the labelled
split (``train.epoch_unit``); after each epoch the label-free criterion ``target_mnn`` is scored, every
``train.eval_every`` epochs (and after the last) the target test split is encoded (sharded
over workers, gathered) and scored, and a checkpoint (carrying the metric history) is reported.
"""

from __future__ import annotations

import math
import tempfile
from pathlib import Path
from typing import Any

import ray.train
import ray.train.torch
import torch

from gckd_ray.checkpoint_format import load_memory_state
from gckd_ray.config import Config, config_from_dict
from gckd_ray.data.bad_images import BadImages
from gckd_ray.data.datasets import (IdentityBalancedSampler, PairedSplit, UnpairedTarget,
                                    labelled_domain, load_records, load_split, load_unpaired,
                                    sample_unpaired)
from gckd_ray.data.tokenizer import load_tokenizer
from gckd_ray.data.transforms import TrainAugment
from gckd_ray.distributed.adaptation import GCKDSteps, TargetFeed
from gckd_ray.distributed.checkpointing import (load_training_state, save_checkpoint,
                                               usable_checkpoint)
from gckd_ray.distributed.deepspeed_config import build_engine
from gckd_ray.distributed.failures import quiet_input_error_tracebacks
from gckd_ray.distributed.memory import MemoryClient
from gckd_ray.distributed.loop import SourceSteps, run_epoch
from gckd_ray.distributed.metrics_log import MetricsLog
from gckd_ray.evaluate import (encode_split, mutual_nn_agreement, rerank_split,
                               retrieval_metrics_from_embeddings)
from gckd_ray.model.collectives import all_gather_objects
from gckd_ray.model.gckd import build_gckd
from gckd_ray.model.momentum import unwrap
from gckd_ray.model.retriever import build_retriever


def _lr_lambda(cfg: Config, steps_per_epoch: int):
    steps_per_epoch = max(1, steps_per_epoch // cfg.deepspeed.gradient_accumulation_steps)
    warmup = max(1, int(cfg.train.warmup_epochs * steps_per_epoch))
    total = max(warmup + 1, cfg.train.epochs * steps_per_epoch)

    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        return 0.5 * (1 + math.cos(math.pi * (step - warmup) / (total - warmup)))
    return factor


def train_loop_per_worker(loop_config: dict[str, Any]) -> None:
    quiet_input_error_tracebacks()
    cfg = config_from_dict(loop_config["cfg"])
    tokenizer_dir, references = loop_config["tokenizer_dir"], loop_config["references"]
    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    torch.set_num_threads(max(1, int(cfg.train.cpus_per_worker)))
    device = ray.train.torch.get_device()
    tokenizer = load_tokenizer(tokenizer_dir)
    bad = BadImages() if cfg.data.on_bad_image == "skip" else None

    train_split = load_split(cfg, labelled_domain(cfg), "train", tokenizer, verbose=rank == 0,
                             bad_images=bad)
    test_split = load_split(cfg, cfg.data.target, "test", tokenizer, verbose=rank == 0,
                            bad_images=bad)
    selection = _label_free_set(cfg, tokenizer, bad)
    sampler = IdentityBalancedSampler(train_split.labels, cfg.train.batch_size,
                                      cfg.train.instances_per_id, cfg.run.seed, rank, world,
                                      unit=cfg.train.epoch_unit)

    torch.manual_seed(cfg.run.seed)  # identical init on every rank
    gckd = cfg.method == "gckd"
    module = (build_gckd if gckd else build_retriever)(cfg, tokenizer, train_split.num_ids)
    model, scheduler = build_engine(module.to(device), cfg,
                                    _lr_lambda(cfg, sampler.steps_per_epoch),
                                    on_gpu=cfg.train.use_gpu)
    augment = TrainAugment(seed=cfg.run.seed * 7919 + rank, erase_prob=cfg.data.random_erasing)
    memory = MemoryClient.connect(loop_config["memory_actor"]) if cfg.uses_memory else None
    state: dict[str, Any] = {"epoch": 0, "history": []}
    checkpoint = ray.train.get_checkpoint()
    if checkpoint:
        with usable_checkpoint(checkpoint, log=rank == 0) as ckpt_dir:  # verified
            state, extras = load_training_state(ckpt_dir, model, scheduler, rank, world,
                                                pretrained=references["pretrained"])
            memory_state = (load_memory_state(ckpt_dir)
                            if rank == 0 and memory is not None else None)
        torch.set_rng_state(extras["torch_rng"])
        augment.load_state_dict({"generator": extras["augment_rng"]})
        if gckd:  # older checkpoints have no "ema": its masters are rebuilt from the teacher
            unwrap(model).ema_state.load_state_dict(extras.get("ema", {}))
        if memory_state is not None:  # the memory as it was at this checkpoint
            memory.load_state(memory_state)
        # Bad files found before the resume stay counted, whether or not this run meets them
        # again (skipping a known one without decoding it gives the same stand-in).
        for path in state.get("skipped_images", []) if bad is not None else []:
            bad.add(path, "found before the resume")
    log = (MetricsLog(cfg.run.output_dir, state["epoch"], sampler.steps_per_epoch,
                      cfg.train.epochs, cfg.train.batch_size * world) if rank == 0 else None)
    if log is not None and checkpoint:
        log.note(state["epoch"], f"resumed from checkpoint after epoch {state['epoch']}")

    if gckd:
        feed = TargetFeed(load_unpaired(cfg, tokenizer, verbose=rank == 0, bad_images=bad),
                          cfg, rank, world)
        method = GCKDSteps(train_split, sampler, feed, memory, augment, cfg, device, rank, log)
    else:
        method = SourceSteps(train_split, sampler, augment, device)

    first_epoch = state["epoch"]
    for epoch in range(first_epoch, cfg.train.epochs):
        losses = run_epoch(model, scheduler, method, epoch, cfg, log)
        stopping = _stops_after(cfg, epoch, first_epoch)
        metrics = evaluate_target(unwrap(model), test_split, device, cfg, selection,
                                  test=stopping or evaluates_test(cfg, epoch + 1))
        row = {"epoch": epoch + 1, **losses, **metrics}
        state = {"epoch": epoch + 1, "history": state["history"] + [row]}
        if log is not None and metrics:
            log.evaluation(epoch + 1, metrics, test_split.name)
        if bad is not None:
            state["skipped_images"] = skipped_images(bad)
            row["skipped_images"] = len(state["skipped_images"])
            if log is not None:
                log.skipped_images(epoch + 1, state["skipped_images"])
        if memory is not None and rank == 0:
            memory.autosave()  # the memory restarts from here if its actor dies
        extras = {"torch_rng": torch.get_rng_state(),
                  "augment_rng": augment.state_dict()["generator"]}
        if gckd:  # the teacher's fp32 EMA masters: per rank (shard-shaped under ZeRO-3)
            extras["ema"] = unwrap(model).ema_state.state_dict()
        memory_state = memory.state() if memory is not None and rank == 0 else None
        _report(cfg, model, scheduler, state, references, rank, extras, memory_state)
        if stopping:
            if log is not None:
                log.note(epoch + 1, f"stopping after {cfg.run.stop_after_epochs} epoch(s) as "
                                    "configured; continue with run.resume=true")
            break


def evaluates_test(cfg: Config, epoch: int) -> bool:
    """Whether the target test split is scored after ``epoch`` (1-based): every
    ``train.eval_every`` epochs (0: none but the last) and always after the last epoch, whose
    metrics are the run's final ones. Reporting only: nothing is selected on them."""
    every = cfg.train.eval_every
    return epoch >= cfg.train.epochs or (every > 0 and epoch % every == 0)


def _stops_after(cfg: Config, epoch: int, first_epoch: int) -> bool:
    """Whether this invocation stops after ``epoch`` (0-based) on ``run.stop_after_epochs``
    (its metrics then stand as the run's final ones until it resumes: scored in full)."""
    return bool(cfg.run.stop_after_epochs) and \
        epoch + 1 - first_epoch >= cfg.run.stop_after_epochs


def _label_free_set(cfg: Config, tokenizer, bad: BadImages | None) -> UnpairedTarget | None:
    """Unlabelled, unpaired target training images and captions for ``target_mnn``."""
    if not cfg.train.label_free_samples:
        return None
    return sample_unpaired(load_records(cfg, cfg.data.target, "train"), tokenizer,
                           cfg.data.text_length, (cfg.data.image_height, cfg.data.image_width),
                           cfg.data.cache_images, cfg.train.label_free_samples, cfg.run.seed,
                           bad)


def skipped_images(bad: BadImages) -> list[str]:
    """The bad image files of every rank, sorted (a collective: every rank calls it). Ranks
    that cache a split all meet its bad files; ranks that decode per batch meet their own."""
    return sorted({path for files in all_gather_objects(bad.files()) for path in files})


def evaluate_target(module, split: PairedSplit, device: torch.device, cfg: Config,
                    selection: UnpairedTarget | None = None, test: bool = True
                    ) -> dict[str, float]:
    """Target test metrics (``test``); with a matching head, also ``rerank_*`` (reported
    separately). The split is encoded once for both. ``target_mnn``, the label-free criterion,
    scores ``selection`` (target training data without ids or pairing), never the test split;
    it is scored every epoch, test or not (Tune's ASHA ranks trials on it at any epoch)."""
    metrics: dict[str, float] = {}
    if test:
        images, texts = encode_split(module.encoder, split, device)
        metrics = retrieval_metrics_from_embeddings(texts, images, split.labels,
                                                    split.image_labels)
    if selection is not None:
        sel_images, sel_texts = encode_split(module.encoder, selection, device)
        metrics["target_mnn"] = mutual_nn_agreement(sel_texts, sel_images)
    head = getattr(module, "matching", None)
    if test and head is not None and cfg.matching.rerank_top_k > 0:
        reranked = rerank_split(module.encoder, head, split, device, images, texts,
                                cfg.matching.rerank_top_k, cfg.matching.rerank_weight)
        metrics.update({f"rerank_{k}": reranked[k] for k in ("R1", "R5", "R10", "mAP", "mINP")})
    return metrics


def _report(cfg, engine, scheduler, state, references, rank, extras, memory_state) -> None:
    """Every rank writes its part (optimizer partition; ZeRO-3 parameter partition) into its
    own folder; Ray Train merges the ranks' folders into one checkpoint."""
    metrics = dict(state["history"][-1])
    with tempfile.TemporaryDirectory() as tmp:
        save_checkpoint(Path(tmp), engine=engine, scheduler=scheduler, state=state, cfg=cfg,
                        references=references, rank=rank, extras=extras,
                        memory=memory_state)
        ray.train.report(metrics, checkpoint=ray.train.Checkpoint.from_directory(tmp))
