"""Resuming from a Ray Train checkpoint: a resume falls back to the newest earlier checkpoint
of the run that verifies, and fails listing every reason when none does; a rank's extras (the
EMA's fp32 masters) come back; a checkpoint holds trained state only (tokenizer and pretrained
folder named by path and sha256) and refuses a changed pretrained folder. (The file format
itself: test_checkpoint_format; real checkpoints of real runs: test_zero, test_train.)"""

from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from ray.train import Checkpoint
from torch import nn

from gckd_ray.checkpoint_format import (CheckpointError, checkpoint_tokenizer_dir,
                                        folder_reference, folder_sha256, verify_checkpoint)
from gckd_ray.config import Config
from gckd_ray.distributed.checkpointing import (load_training_state, save_checkpoint,
                                               usable_checkpoint)
from gckd_ray.model.momentum import EMAState, ema_update, make_teacher
from helpers import flip_byte, write_checkpoint


def _run(tmp_path: Path, *epochs_and_damage) -> list[Path]:
    """Checkpoint folders named as Ray Train names them, oldest first."""
    out = []
    for i, (epoch, damaged) in enumerate(epochs_and_damage):
        ckpt = write_checkpoint(tmp_path / "run" / f"checkpoint_2026-12-01_10-00-0{i}.000000",
                                epoch=epoch)
        if damaged:
            flip_byte(ckpt / "model.pt")
        out.append(ckpt)
    return out


def test_usable_checkpoint_falls_back_to_the_newest_good_earlier_one(tmp_path, capsys):
    first, second, third, newer = _run(tmp_path, (1, False), (2, False), (3, True), (4, False))
    # Ray Train hands over `third` (its latest); `newer` was never registered: not considered.
    with usable_checkpoint(Checkpoint.from_directory(str(third)), log=True) as directory:
        assert Path(directory) == second
        assert verify_checkpoint(directory)["epoch"] == 2
    lines = capsys.readouterr().out.splitlines()
    assert lines == [f"checkpoint {third.name} is unusable: {third}/model.pt: corrupted (its "
                     "sha256 differs from the one in manifest-rank000.json)",
                     f"resuming from the previous checkpoint {second.name} instead"]
    with usable_checkpoint(Checkpoint.from_directory(str(second))) as directory:
        assert Path(directory) == second
    assert capsys.readouterr().out == ""


def test_usable_checkpoint_fails_when_none_verifies(tmp_path):
    first, second = _run(tmp_path, (1, True), (2, True))
    with pytest.raises(CheckpointError) as err:
        with usable_checkpoint(Checkpoint.from_directory(str(second))):
            pass
    assert str(err.value) == (f"no usable checkpoint: {second}/model.pt: corrupted (its sha256 "
                              f"differs from the one in manifest-rank000.json); {first}/model.pt:"
                              f" corrupted (its sha256 differs from the one in "
                              f"manifest-rank000.json)")


def _references(tmp_path: Path, pretrained: Path | None = None) -> dict:
    tokenizer = tmp_path / "run" / "tokenizer"
    tokenizer.mkdir(parents=True, exist_ok=True)
    (tokenizer / "word_vocab.json").write_text('{"a": 0}')
    return {"tokenizer": folder_reference(tokenizer, relative_to=tmp_path / "ckpt"),
            "pretrained": None if pretrained is None else folder_reference(pretrained)}


def _linear_engine():
    module = nn.Linear(4, 3)
    optimizer = torch.optim.AdamW(module.parameters(), lr=0.1)
    module(torch.randn(2, 4)).sum().backward()
    optimizer.step()  # Adam moments exist: the optimizer state a checkpoint carries
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1.0)
    return SimpleNamespace(module=module, optimizer=optimizer,
                           zero_optimization_stage=lambda: 0), scheduler


def test_a_checkpoint_holds_trained_state_and_names_the_tokenizer_and_pretrained_folder(
        tmp_path):
    clip = tmp_path / "clip"
    clip.mkdir()
    (clip / "model.safetensors").write_bytes(b"w" * 100_000)  # stands in for 600 MB
    (clip / "vocab.json").write_text('{"a": 0}')
    engine, scheduler = _linear_engine()
    references = _references(tmp_path, pretrained=clip)
    save_checkpoint(tmp_path / "ckpt", engine=engine, scheduler=scheduler,
                    state={"epoch": 1, "history": []}, cfg=Config(), references=references,
                    rank=0, extras={}, memory=None)
    ckpt = tmp_path / "ckpt"
    assert sorted(p.name for p in ckpt.iterdir()) == [
        "config.yaml", "manifest-rank000.json", "model.pt", "rank000.pt", "scheduler.pt",
        "state.json"]  # no tokenizer/, no copy of the pretrained folder
    assert sum(p.stat().st_size for p in ckpt.iterdir()) < 100_000
    state = verify_checkpoint(ckpt)
    assert state["format"] == 3 and state["references"] == references
    assert checkpoint_tokenizer_dir(ckpt).resolve() == (tmp_path / "run" / "tokenizer").resolve()

    # Resuming from the same folder works; from a changed one is refused, naming both hashes.
    resumed, scheduler = _linear_engine()
    load_training_state(ckpt, resumed, scheduler, 0, 1, pretrained=folder_reference(clip))
    assert torch.equal(resumed.module.weight, engine.module.weight)
    (clip / "model.safetensors").write_bytes(b"v" * 100_000)
    with pytest.raises(CheckpointError, match=f"model.pretrained {clip} has changed since "
                                              f"{ckpt} was saved: its files' sha256 is "
                                              f"{folder_sha256(clip)}, the checkpoint was "
                                              f"trained from sha256 "
                                              f"{references['pretrained']['sha256']}"):
        load_training_state(ckpt, resumed, scheduler, 0, 1, pretrained=folder_reference(clip))


def test_extras_bring_back_the_teachers_fp32_ema_masters(tmp_path):
    """A rank's extras as the worker builds them (RNG state, the EMA's fp32 masters of a bf16
    teacher) come back from load_training_state (read with weights_only) bit for bit, and the
    restored EMA continues exactly as the saved one."""
    student = nn.Linear(4, 3).to(torch.bfloat16)
    teacher, state = make_teacher(student), EMAState()
    with torch.no_grad():
        student.weight.add_(0.5)
    ema_update(teacher, student, 0.995, state)
    optimizer = torch.optim.SGD(student.parameters(), lr=0.1)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1.0)
    engine = SimpleNamespace(module=teacher, optimizer=optimizer,  # a ZeRO-0 engine's surface
                             zero_optimization_stage=lambda: 0)
    extras = {"torch_rng": torch.get_rng_state(), "ema": state.state_dict()}
    save_checkpoint(tmp_path / "ckpt", engine=engine, scheduler=scheduler,
                    state={"epoch": 1, "history": []}, cfg=Config(),
                    references=_references(tmp_path), rank=0, extras=extras, memory=None)
    resumed = make_teacher(student)
    _, back = load_training_state(tmp_path / "ckpt", SimpleNamespace(
        module=resumed, optimizer=optimizer, zero_optimization_stage=lambda: 0), scheduler, 0, 1)
    restored = EMAState()
    restored.load_state_dict(back["ema"])
    for name, master in state.state_dict().items():
        assert master.dtype == torch.float32 and torch.equal(restored.state_dict()[name], master)
    ema_update(teacher, student, 0.995, state)
    ema_update(resumed, student, 0.995, restored)
    for a, b in zip(teacher.parameters(), resumed.parameters()):
        assert torch.equal(a, b)  # bf16 teachers from identical fp32 masters: identical
