"""Checkpoint directories: model/optimizer state, trainer state, config and tokenizer.

Layout of one checkpoint directory::

    model.pt        state dict of the unwrapped model (loaded with weights_only=True)
    optimizer.pt    optimizer + LR-scheduler state (weights_only=True)
    state.json      epoch, global step, metric history
    config.yaml     the full run config
    tokenizer/      the tokenizer the model was trained with

Files are written to a temporary name and renamed, so an interrupted write never leaves a file
that looks complete.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import Any

import torch
import yaml

from gckd_ray.config import Config, config_from_dict, save_config


def atomic_write_text(path: str | Path, text: str) -> None:
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


def atomic_torch_save(obj: Any, path: str | Path) -> None:
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    torch.save(obj, tmp)
    os.replace(tmp, path)


def save_checkpoint(directory: str | Path, *, model: torch.nn.Module,
                    optimizer: torch.optim.Optimizer, scheduler: Any, state: dict[str, Any],
                    cfg: Config, tokenizer_dir: str | Path) -> None:
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    atomic_torch_save(model.state_dict(), directory / "model.pt")
    atomic_torch_save({"optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict()},
                      directory / "optimizer.pt")
    save_config(cfg, directory / "config.yaml")
    shutil.copytree(tokenizer_dir, directory / "tokenizer", dirs_exist_ok=True)
    # state.json last: its presence marks the directory complete.
    atomic_write_text(directory / "state.json", json.dumps(state, indent=1))


def _require(directory: Path, name: str) -> Path:
    path = directory / name
    if not path.is_file():
        raise FileNotFoundError(f"{directory}: not a complete gckd-ray checkpoint "
                                f"(missing {name})")
    return path


def load_checkpoint_config(directory: str | Path) -> Config:
    directory = Path(directory)
    _require(directory, "state.json")
    return config_from_dict(yaml.safe_load(_require(directory, "config.yaml").read_text()))


def load_model_state(directory: str | Path) -> dict[str, torch.Tensor]:
    return torch.load(_require(Path(directory), "model.pt"), map_location="cpu",
                      weights_only=True)


def load_training_state(directory: str | Path, model: torch.nn.Module,
                        optimizer: torch.optim.Optimizer, scheduler: Any) -> dict[str, Any]:
    """Restore model, optimizer and scheduler in place; return the trainer state."""
    directory = Path(directory)
    state = json.loads(_require(directory, "state.json").read_text())
    model.load_state_dict(load_model_state(directory))
    opt = torch.load(_require(directory, "optimizer.pt"), map_location="cpu", weights_only=True)
    optimizer.load_state_dict(opt["optimizer"])
    scheduler.load_state_dict(opt["scheduler"])
    return state
