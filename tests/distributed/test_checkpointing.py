"""Resuming from a Ray Train checkpoint: a resume falls back to the newest earlier checkpoint
of the run that verifies, and fails listing every reason when none does; a rank's extras (the
EMA's fp32 masters) come back. (The file format itself: test_checkpoint_format; real
checkpoints of real runs: test_zero, test_train.)"""

from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from ray.train import Checkpoint
from torch import nn

from gckd_ray.checkpoint_format import CheckpointError, verify_checkpoint
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
    (tmp_path / "tokenizer").mkdir()
    (tmp_path / "tokenizer" / "vocab.json").write_text('{"a": 0}')
    extras = {"torch_rng": torch.get_rng_state(), "ema": state.state_dict()}
    save_checkpoint(tmp_path / "ckpt", engine=engine, scheduler=scheduler,
                    state={"epoch": 1, "history": []}, cfg=Config(),
                    tokenizer_dir=tmp_path / "tokenizer", rank=0, extras=extras, memory=None)
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
