"""Resuming from a Ray Train checkpoint: a resume falls back to the newest earlier checkpoint
of the run that verifies, and fails listing every reason when none does. (The file format
itself: test_checkpoint_format; real checkpoints of real runs: test_zero, test_train.)"""

from pathlib import Path

import pytest
from ray.train import Checkpoint

from gckd_ray.checkpoint_format import CheckpointError, verify_checkpoint
from gckd_ray.distributed.checkpointing import usable_checkpoint
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
