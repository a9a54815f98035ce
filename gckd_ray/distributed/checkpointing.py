"""Checkpoints of a DeepSpeed-trained run through Ray Train: each rank writes its part of a
checkpoint from its DeepSpeed engine (full model, optimizer and ZeRO-3 parameter partitions, LR
schedule, trainer state, config, GCKD memory; the tokenizer and a pretrained folder are only
referenced, by path and sha256), a resumed run restores the engine from one, and
`usable_checkpoint` picks the newest checkpoint of the run that verifies. The directory layout,
manifests, checksums, atomic writes and the Ray-free loaders are the file format in
`gckd_ray.checkpoint_format`.
"""

from __future__ import annotations

import contextlib
import json
import posixpath
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import torch

from gckd_ray.checkpoint_format import (CHECKPOINT_FORMAT, CheckpointError, atomic_torch_save,
                                        atomic_write_text, check_pretrained, load_model_state,
                                        require_file, verify_checkpoint, write_manifest,
                                        write_state)
from gckd_ray.config import Config, save_config
from gckd_ray.model.collectives import rank_and_world


@contextlib.contextmanager
def usable_checkpoint(checkpoint, log: bool = False) -> Iterator[Path]:
    """The local directory of ``checkpoint`` (a ``ray.train.Checkpoint``: the latest one Ray
    Train hands a resumed or restarted run) if it verifies, else of the newest earlier
    checkpoint of the same run that does. ``log`` prints which were passed over and why.

    Raises:
        CheckpointError: no checkpoint of the run verifies (every reason is listed).
    """
    problems = []
    for candidate in _this_and_earlier(checkpoint):
        name = posixpath.basename(candidate.path.rstrip("/"))
        with candidate.as_directory() as directory:
            try:
                verify_checkpoint(directory)
            except CheckpointError as err:
                problems.append(str(err))
                if log:
                    print(f"checkpoint {name} is unusable: {err}", flush=True)
                continue
            if log and problems:
                print(f"resuming from the previous checkpoint {name} instead", flush=True)
            yield Path(directory)
            return
    raise CheckpointError("no usable checkpoint: " + "; ".join(problems))


def _this_and_earlier(checkpoint) -> list:
    """``checkpoint``, then its run's earlier checkpoints, newest first (Ray Train names them
    ``checkpoint_<timestamp>``, so names sort by time)."""
    from pyarrow.fs import FileSelector, FileType
    from ray.train import Checkpoint

    parent, name = posixpath.split(checkpoint.path.rstrip("/"))
    siblings = checkpoint.filesystem.get_file_info(FileSelector(parent))
    earlier = sorted((info.base_name for info in siblings if info.type == FileType.Directory
                      and info.base_name.startswith("checkpoint_") and info.base_name < name),
                     reverse=True)
    return [checkpoint] + [Checkpoint(path=posixpath.join(parent, n),
                                      filesystem=checkpoint.filesystem) for n in earlier]


def _zero_stage(engine) -> int:
    return int(engine.zero_optimization_stage())


def full_state_dict(engine) -> dict[str, torch.Tensor]:
    """The whole model's state dict on CPU; under ZeRO-3 a collective (every rank calls it)."""
    module = engine.module
    gathered = contextlib.nullcontext()
    if _zero_stage(engine) == 3:
        import deepspeed

        gathered = deepspeed.zero.GatheredParameters(list(module.parameters()), modifier_rank=None)
    with gathered:
        return {k: v.detach().cpu().clone() for k, v in module.state_dict().items()}


def _shard_state(engine, extras: dict[str, Any]) -> dict[str, Any]:
    shard: dict[str, Any] = {"optimizer": engine.optimizer.state_dict(), "extras": extras}
    if _zero_stage(engine) == 3:
        shard["partitions"] = {name: p.ds_tensor.detach().cpu().clone()
                               for name, p in engine.module.named_parameters()}
    return shard


def save_checkpoint(directory: str | Path, *, engine, scheduler: Any, state: dict[str, Any],
                    cfg: Config, references: dict[str, Any], rank: int,
                    extras: dict[str, Any], memory: dict[str, np.ndarray] | None) -> None:
    """Write this rank's part of a checkpoint into ``directory`` (every rank calls it).

    ``references``: ``{"tokenizer": ..., "pretrained": ... or None}``, the run's inputs that
    the checkpoint names instead of copying (`checkpoint_format.folder_reference`, computed
    once per run by the driver); ``extras``: this rank's tensors to restore on resume (RNG
    states, the EMA's fp32 masters); ``memory``: the GCKD memory's state (rank 0), or None."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    full = full_state_dict(engine)
    atomic_torch_save(_shard_state(engine, extras), directory / f"rank{rank:03d}.pt")
    if rank == 0:
        if memory is not None:
            write_state(directory, memory)
        world = rank_and_world()[1]
        atomic_torch_save(full, directory / "model.pt")
        atomic_torch_save(scheduler.state_dict(), directory / "scheduler.pt")
        save_config(cfg, directory / "config.yaml")
        meta = {**state, "world_size": world, "zero_stage": _zero_stage(engine),
                "format": CHECKPOINT_FORMAT, "references": references}
        atomic_write_text(directory / "state.json", json.dumps(meta, indent=1))
    # Last: a rank's part of the checkpoint verifies only once all of it is written.
    write_manifest(directory, rank)


def _load_shard(path: Path) -> dict[str, Any]:
    from deepspeed.runtime.fp16.loss_scaler import LossScaler
    from deepspeed.runtime.zero.config import ZeroStageEnum
    from deepspeed.utils.tensor_fragment import fragment_address

    with torch.serialization.safe_globals([LossScaler, ZeroStageEnum, fragment_address]):
        return torch.load(path, map_location="cpu", weights_only=True)


def load_training_state(directory: str | Path, engine, scheduler: Any, rank: int,
                        world: int, pretrained: dict[str, str] | None = None
                        ) -> tuple[dict[str, Any], dict[str, Any]]:
    """Restore model, optimizer (this rank's partition) and LR schedule in place; return the
    trainer state and this rank's ``extras``. The run must have the world size and ZeRO stage
    it was saved with, and the pretrained folder (``pretrained``: its path and sha256, None
    for a model built from scratch) it was trained from (CheckpointError otherwise)."""
    directory = Path(directory)
    state = json.loads(require_file(directory, "state.json").read_text())
    check_pretrained(directory, state, pretrained)
    stage = _zero_stage(engine)
    saved = (state.get("world_size"), state.get("zero_stage"))
    if saved != (world, stage):
        raise ValueError(f"{directory}: saved with {saved[0]} workers at ZeRO stage {saved[1]}; "
                         f"this run has {world} workers at stage {stage}: resume with the same "
                         "train.num_workers and deepspeed.zero_stage")
    # ZeRO-1/2 optimizers rebuild their partition from every rank's saved state.
    ranks = range(world) if stage in (1, 2) else [rank]
    shards = {r: _load_shard(require_file(directory, f"rank{r:03d}.pt")) for r in ranks}
    full = load_model_state(directory)
    module = engine.module
    if stage == 3:
        with torch.no_grad():
            for name, param in module.named_parameters():
                param.ds_tensor.copy_(shards[rank]["partitions"][name])
            for name, buf in module.named_buffers():
                if name in full:  # non-persistent buffers (e.g. position ids) are not saved
                    buf.copy_(full[name])
    else:
        module.load_state_dict(full)
    if stage == 0:
        engine.optimizer.load_state_dict(shards[rank]["optimizer"])
    else:
        per_rank = [shards[r]["optimizer"] if r in shards else {} for r in range(world)]
        engine.optimizer.load_state_dict(per_rank, load_optimizer_states=True,
                                         load_from_fp32_weights=True)
    scheduler.load_state_dict(torch.load(require_file(directory, "scheduler.pt"),
                                         map_location="cpu", weights_only=True))
    # skipped_images: data.on_bad_image=skip runs only (and not in older checkpoints)
    kept = {k: state[k] for k in ("epoch", "history", "skipped_images") if k in state}
    return kept, shards[rank]["extras"]
