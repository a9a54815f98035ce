"""The checkpoint file format, Ray-free: the layout of a checkpoint directory, atomic writes,
per-rank manifests with sizes and sha256 checksums, verification, and the loaders that
evaluation, search and the results scripts use (config, model state, GCKD memory state).
Writing a checkpoint from DeepSpeed engines and finding one through Ray Train stay in
``gckd_ray.distributed.checkpointing``.

Layout of one checkpoint directory (Ray Train merges the ranks' folders into it)::

    model.pt        full state dict of the model (student, teacher, heads; gathered under
                    ZeRO-3): what evaluation and the search CLI read
    rank000.pt ...  per rank: its optimizer state dict, its RNG states (torch, augmentation)
                    and, under ZeRO-3, its partition of every parameter
    memory.npz      the GCKD memory's queues, target tables and pseudo-ids (numpy, no pickle)
    scheduler.pt    LR-scheduler state
    state.json      epoch, metric history, world size and ZeRO stage, and the run's inputs
                    that are referenced, not copied (``references``): the tokenizer (path
                    relative to the checkpoint, absolute path, sha256) and the pretrained CLIP
                    folder (path, sha256), or null when the model was built from scratch
    config.yaml     the full run config
    manifest-rank000.json ...  per rank, written last: size and sha256 of every file that
                    rank wrote

A checkpoint holds trained state only. The tokenizer is written once per run, in
``<run.output_dir>/tokenizer/`` (a word vocabulary, or the tokenizer files of a CLIP folder);
a pretrained folder stays where it is, named by path and sha256 (`folder_sha256`, computed
once per run on the driver), and a resume refuses a folder whose sha256 differs. Checkpoints
of format 2 and older carry their own ``tokenizer/`` folder; `checkpoint_tokenizer_dir` finds
the tokenizer of either kind.

Every torch load is ``weights_only=True``; ZeRO optimizer states hold three small DeepSpeed
classes, which ``distributed/checkpointing.py`` allow-lists by name for those loads only. Files
are written to a temporary name, synced and renamed, and each rank's manifest comes last, so an
interrupted write never leaves a checkpoint that verifies. `verify_checkpoint` checks every
manifest before anything is loaded; on resume, ``usable_checkpoint`` falls back to the newest
earlier checkpoint of the run that verifies.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import torch
import yaml

from gckd_ray.config import Config, config_from_dict
from gckd_ray.errors import InputError


MANIFEST = "manifest-rank{rank:03d}.json"
# state.json "format": 2 = checkpoints with manifests (and a tokenizer/ copy); 3 = the tokenizer
# and the pretrained folder referenced by path and sha256; older ones carry no "format" key.
CHECKPOINT_FORMAT = 3
TOKENIZER_DIR = "tokenizer"
MEMORY_FILE = "memory.npz"
# The memory bank's size settings: every memory state holds them (and its feature dtype).
MEMORY_CONFIG_KEYS = ("dim", "queue_size", "num_target_images", "num_target_texts")


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


def file_sha256(path: Path) -> str:
    """sha256 of a file's bytes, read in 1 MiB blocks."""
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
            files[name] = {"size": path.stat().st_size, "sha256": file_sha256(path)}
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
    state = _read_json(require_file(directory, "state.json"))
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
    if file_sha256(path) != entry["sha256"]:
        raise CheckpointError(f"{path}: corrupted (its sha256 differs from the one in {manifest})")


def _read_json(path: Path) -> dict[str, Any]:
    try:
        data = json.loads(path.read_bytes())
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise CheckpointError(f"{path}: corrupted (not valid JSON: {err})") from None
    if not isinstance(data, dict):
        raise CheckpointError(f"{path}: corrupted (not a JSON object)")
    return data


def require_file(directory: Path, name: str) -> Path:
    """``directory/name``, which a complete checkpoint holds (raises CheckpointError if not)."""
    path = directory / name
    if not path.is_file():
        raise CheckpointError(f"{directory}: not a complete gckd-ray checkpoint "
                              f"(missing {name})")
    return path


def load_checkpoint_config(directory: str | Path) -> Config:
    """The run config of a checkpoint, after `verify_checkpoint` (raises CheckpointError)."""
    directory = Path(directory)
    verify_checkpoint(directory)
    return config_from_dict(yaml.safe_load(require_file(directory, "config.yaml").read_text()))


def load_model_state(directory: str | Path) -> dict[str, torch.Tensor]:
    return torch.load(require_file(Path(directory), "model.pt"), map_location="cpu",
                      weights_only=True)


def folder_sha256(directory: str | Path) -> str:
    """One sha256 over a folder's files: each file's path (relative, posix) and sha256, in path
    order. Names starting with "." (``.DS_Store``, ``.cache/``) are left out, so browsing a
    folder does not change it.

    Raises:
        FileNotFoundError: ``directory`` is not a folder.
    """
    directory = Path(directory)
    if not directory.is_dir():
        raise FileNotFoundError(f"{directory}: not a folder")
    digest = hashlib.sha256()
    for path in sorted(p for p in directory.rglob("*") if p.is_file()):
        name = path.relative_to(directory).as_posix()
        if not any(part.startswith(".") for part in name.split("/")):
            digest.update(f"{name}\0{file_sha256(path)}\n".encode())
    return digest.hexdigest()


def folder_reference(directory: str | Path, relative_to: str | Path | None = None
                     ) -> dict[str, str]:
    """``{"path", "sha256"}`` of a folder a checkpoint refers to (absolute path); with
    ``relative_to`` also ``"relative"``: the path from that folder (where the checkpoint will
    be), so a run folder that moves as a whole still finds it."""
    directory = Path(directory).resolve()
    ref = {"path": str(directory), "sha256": folder_sha256(directory)}
    if relative_to is not None:
        ref["relative"] = os.path.relpath(directory, Path(relative_to).resolve())
    return ref


def checkpoint_tokenizer_dir(directory: str | Path) -> Path:
    """The folder of the tokenizer a checkpoint was trained with: its own ``tokenizer/``
    (format 2 and older), else the run's tokenizer that state.json names (tried at its path
    relative to the checkpoint, then at its absolute path), checked against its sha256.

    Raises:
        CheckpointError: no tokenizer found, or the one found differs from the recorded one.
    """
    directory = Path(directory)
    inside = directory / TOKENIZER_DIR
    if inside.is_dir():
        return inside
    ref = _read_json(require_file(directory, "state.json")).get("references", {}).get(
        "tokenizer")
    if not ref:
        raise CheckpointError(f"{directory}: no tokenizer (no {TOKENIZER_DIR}/ folder and no "
                              "tokenizer reference in state.json)")
    candidates = [directory / ref["relative"]] if ref.get("relative") else []
    candidates.append(Path(ref["path"]))
    found = [c for c in candidates if c.is_dir()]
    for candidate in found:
        if folder_sha256(candidate) == ref["sha256"]:
            return candidate
    if not found:
        raise CheckpointError(f"{directory}: its tokenizer folder is missing (looked for "
                              f"{' and '.join(str(c) for c in candidates)})")
    raise CheckpointError(f"{found[0]}: not the tokenizer {directory} was trained with "
                          f"(sha256 {folder_sha256(found[0])}, the checkpoint records "
                          f"{ref['sha256']})")


def check_pretrained(directory: str | Path, state: dict[str, Any],
                     current: dict[str, str] | None) -> None:
    """Refuse to resume a checkpoint (``directory``, its state.json ``state``) with another
    pretrained folder than it was trained from. ``current``: `folder_reference` of this run's
    ``model.pretrained``, or None. Checkpoints without references (format 2 and older) pass.

    Raises:
        CheckpointError: naming the folder and both sha256.
    """
    references = state.get("references")
    if references is None:
        return
    saved = references.get("pretrained")
    if saved is None and current is None:
        return
    if saved is None or current is None:
        now = f"model.pretrained={current['path']}" if current else "no model.pretrained"
        then = f"from {saved['path']}" if saved else "from scratch (no model.pretrained)"
        raise CheckpointError(f"{directory}: trained {then}; this run has {now}: resume with "
                              "the model it was trained from, or start a new run")
    if saved["sha256"] != current["sha256"]:
        raise CheckpointError(
            f"model.pretrained {current['path']} has changed since {directory} was saved: "
            f"its files' sha256 is {current['sha256']}, the checkpoint was trained from "
            f"sha256 {saved['sha256']} (then at {saved['path']}); restore that folder, or "
            "start a new run (run.resume=false or another run.output_dir)")


def newest_checkpoint(run_dir: str | Path) -> tuple[Path, dict[str, Any]] | None:
    """The newest ``checkpoint_*`` folder under a Ray Train run folder that has a readable
    state.json, with that state (no verification: for reading its references before a resume
    starts), or None."""
    for candidate in sorted(Path(run_dir).glob("checkpoint_*"), reverse=True):
        try:
            return candidate, json.loads((candidate / "state.json").read_bytes())
        except (OSError, ValueError):
            continue
    return None


def write_state(directory: str | Path, state: dict[str, np.ndarray]) -> Path:
    """Write a bank's ``state_dict`` to ``directory/memory.npz`` atomically (temp file, fsync,
    rename); return its path."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    path = directory / MEMORY_FILE
    with _atomic(path, "wb") as f:
        np.savez(f, **state)
    return path


def read_state(directory: str | Path) -> dict[str, np.ndarray]:
    """The arrays of ``directory/memory.npz`` (no pickle).

    Raises:
        FileNotFoundError: the file is missing.
        ValueError: the file is truncated or not a memory state (the message names the file).
    """
    path = Path(directory) / MEMORY_FILE
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no saved memory state")
    try:
        with np.load(path, allow_pickle=False) as data:
            state = {k: data[k] for k in data.files}  # read every array now: errors surface here
    except Exception as exc:  # zipfile.BadZipFile, EOFError, ValueError, OSError ...
        raise ValueError(f"{path}: unreadable memory state ({type(exc).__name__}: {exc})") from exc
    missing = [k for k in MEMORY_CONFIG_KEYS + ("feature_dtype",) if k not in state]
    if missing:
        raise ValueError(f"{path}: not a memory state (missing {missing})")
    return state


def load_memory_state(directory: str | Path) -> dict[str, np.ndarray] | None:
    """The GCKD memory state a checkpoint holds (numpy, ``allow_pickle=False``), or None."""
    if not (Path(directory) / MEMORY_FILE).is_file():
        return None
    return read_state(directory)
