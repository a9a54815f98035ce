"""Checkpoint directories of a DeepSpeed-trained run: full model, per-rank optimizer (and ZeRO-3
parameter) partitions, LR schedule, trainer state, config and tokenizer.

Layout of one checkpoint directory (Ray Train merges the ranks' folders into it)::

    model.pt        full state dict of the model (student, teacher, heads; gathered under
                    ZeRO-3): what evaluation and the search CLI read
    rank000.pt ...  per rank: its optimizer state dict, its RNG states (torch, augmentation)
                    and, under ZeRO-3, its partition of every parameter
    memory.npz      the GCKD memory's queues, target tables and pseudo-ids (numpy, no pickle)
    scheduler.pt    LR-scheduler state
    state.json      epoch, metric history, world size and ZeRO stage
    config.yaml     the full run config
    tokenizer/      the tokenizer the model was trained with
    manifest-rank000.json ...  per rank, written last: size and sha256 of every file that
                    rank wrote

Every torch load is ``weights_only=True``; ZeRO optimizer states hold three small DeepSpeed
classes, which are allow-listed by name for those loads only. Files are written to a temporary
name, synced and renamed, and each rank's manifest comes last, so an interrupted write never
leaves a checkpoint that verifies. `verify_checkpoint` checks every manifest before anything is
loaded; `usable_checkpoint` falls back to the newest earlier checkpoint of the run that
verifies.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import posixpath
import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import torch
import yaml

from gckd_ray.config import Config, config_from_dict, save_config
from gckd_ray.distributed.memory import MEMORY_FILE, read_state, write_state
from gckd_ray.errors import InputError
from gckd_ray.model.collectives import rank_and_world


MANIFEST = "manifest-rank{rank:03d}.json"
# state.json "format": 2 = checkpoints with manifests; older ones carry no "format" key.
CHECKPOINT_FORMAT = 2


class CheckpointError(InputError):
    """An incomplete or corrupted checkpoint; the message names the file."""

    kind = "checkpoint"


@contextlib.contextmanager
def _atomic(path: str | Path, mode: str) -> Iterator[Any]:
    """Write to ``path.tmp``, sync it, then rename it to ``path``."""
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, mode) as f:
        yield f
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def atomic_write_text(path: str | Path, text: str) -> None:
    with _atomic(path, "w") as f:
        f.write(text)


def atomic_torch_save(obj: Any, path: str | Path) -> None:
    with _atomic(path, "wb") as f:
        torch.save(obj, f)


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def write_manifest(directory: str | Path, rank: int) -> Path:
    """List size and sha256 of every file under ``directory`` (this rank's part of a
    checkpoint) in ``manifest-rank<rank>.json``, atomically; call it after the last file."""
    directory = Path(directory)
    files = {}
    for path in sorted(p for p in directory.rglob("*") if p.is_file()):
        name = path.relative_to(directory).as_posix()
        if not (name.startswith("manifest-rank") or name.endswith(".tmp")):
            files[name] = {"size": path.stat().st_size, "sha256": _sha256(path)}
    out = directory / MANIFEST.format(rank=rank)
    atomic_write_text(out, json.dumps({"rank": rank, "files": files}, indent=1))
    return out


def verify_checkpoint(directory: str | Path) -> dict[str, Any]:
    """Check that a checkpoint is complete and intact: every rank's manifest is there and
    every file it lists has the listed size and sha256. Checkpoints written before manifests
    existed (no ``format`` in state.json) have nothing to check.

    Returns:
        The checkpoint's state.json.

    Raises:
        CheckpointError: naming the missing, truncated or corrupted file.
    """
    directory = Path(directory)
    state = _read_json(_require(directory, "state.json"))
    if "format" not in state:
        return state
    for rank in range(int(state.get("world_size", 1))):
        manifest = directory / MANIFEST.format(rank=rank)
        if not manifest.is_file():
            raise CheckpointError(f"{directory}: incomplete checkpoint (missing {manifest.name})")
        for name, entry in _read_json(manifest).get("files", {}).items():
            _verify_file(directory, manifest.name, name, entry)
    return state


def _verify_file(directory: Path, manifest: str, name: str, entry: dict[str, Any]) -> None:
    if Path(name).is_absolute() or ".." in Path(name).parts:
        raise CheckpointError(f"{directory / manifest}: file name {name!r} outside the checkpoint")
    path = directory / name
    if not path.is_file():
        raise CheckpointError(f"{path}: missing (listed in {manifest})")
    size = path.stat().st_size
    if size != entry["size"]:
        raise CheckpointError(f"{path}: truncated or overwritten ({size} bytes, {manifest} "
                              f"lists {entry['size']})")
    if _sha256(path) != entry["sha256"]:
        raise CheckpointError(f"{path}: corrupted (its sha256 differs from the one in {manifest})")


def _read_json(path: Path) -> dict[str, Any]:
    try:
        data = json.loads(path.read_bytes())
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise CheckpointError(f"{path}: corrupted (not valid JSON: {err})") from None
    if not isinstance(data, dict):
        raise CheckpointError(f"{path}: corrupted (not a JSON object)")
    return data


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
                    cfg: Config, tokenizer_dir: str | Path, rank: int,
                    extras: dict[str, Any], memory: dict[str, np.ndarray] | None) -> None:
    """Write this rank's part of a checkpoint into ``directory`` (every rank calls it).

    ``extras``: this rank's tensors to restore on resume (RNG states); ``memory``: the GCKD
    memory's state (rank 0), or None."""
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
        shutil.copytree(tokenizer_dir, directory / "tokenizer", dirs_exist_ok=True)
        meta = {**state, "world_size": world, "zero_stage": _zero_stage(engine),
                "format": CHECKPOINT_FORMAT}
        atomic_write_text(directory / "state.json", json.dumps(meta, indent=1))
    # Last: a rank's part of the checkpoint verifies only once all of it is written.
    write_manifest(directory, rank)


def _require(directory: Path, name: str) -> Path:
    path = directory / name
    if not path.is_file():
        raise CheckpointError(f"{directory}: not a complete gckd-ray checkpoint "
                              f"(missing {name})")
    return path


def load_checkpoint_config(directory: str | Path) -> Config:
    """The run config of a checkpoint, after `verify_checkpoint` (raises CheckpointError)."""
    directory = Path(directory)
    verify_checkpoint(directory)
    return config_from_dict(yaml.safe_load(_require(directory, "config.yaml").read_text()))


def load_model_state(directory: str | Path) -> dict[str, torch.Tensor]:
    return torch.load(_require(Path(directory), "model.pt"), map_location="cpu",
                      weights_only=True)


def _load_shard(path: Path) -> dict[str, Any]:
    from deepspeed.runtime.fp16.loss_scaler import LossScaler
    from deepspeed.runtime.zero.config import ZeroStageEnum
    from deepspeed.utils.tensor_fragment import fragment_address

    with torch.serialization.safe_globals([LossScaler, ZeroStageEnum, fragment_address]):
        return torch.load(path, map_location="cpu", weights_only=True)


def load_memory_state(directory: str | Path) -> dict[str, np.ndarray] | None:
    """The GCKD memory state a checkpoint holds (numpy, ``allow_pickle=False``), or None."""
    if not (Path(directory) / MEMORY_FILE).is_file():
        return None
    return read_state(directory)


def load_training_state(directory: str | Path, engine, scheduler: Any, rank: int,
                        world: int) -> tuple[dict[str, Any], dict[str, Any]]:
    """Restore model, optimizer (this rank's partition) and LR schedule in place; return the
    trainer state and this rank's ``extras``. The run must have the world size and ZeRO stage
    it was saved with."""
    directory = Path(directory)
    state = json.loads(_require(directory, "state.json").read_text())
    stage = _zero_stage(engine)
    saved = (state.get("world_size"), state.get("zero_stage"))
    if saved != (world, stage):
        raise ValueError(f"{directory}: saved with {saved[0]} workers at ZeRO stage {saved[1]}; "
                         f"this run has {world} workers at stage {stage}: resume with the same "
                         "train.num_workers and deepspeed.zero_stage")
    # ZeRO-1/2 optimizers rebuild their partition from every rank's saved state.
    ranks = range(world) if stage in (1, 2) else [rank]
    shards = {r: _load_shard(_require(directory, f"rank{r:03d}.pt")) for r in ranks}
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
    scheduler.load_state_dict(torch.load(_require(directory, "scheduler.pt"),
                                         map_location="cpu", weights_only=True))
    return {k: state[k] for k in ("epoch", "history")}, shards[rank]["extras"]
