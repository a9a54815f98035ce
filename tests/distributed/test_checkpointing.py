"""Checkpoint manifests: incomplete, truncated and corrupted checkpoints are refused naming the
file, a resume falls back to the newest earlier checkpoint that verifies, and loading never
unpickles arbitrary objects. (Real checkpoints of real runs: test_zero, test_train.)"""

import json
import pickle
import shutil
from pathlib import Path

import pytest
import torch
from ray.train import Checkpoint

from gckd_ray.config import Config, save_config
from gckd_ray.distributed.checkpointing import (CHECKPOINT_FORMAT, CheckpointError,
                                               atomic_torch_save, atomic_write_text,
                                               load_model_state, usable_checkpoint,
                                               verify_checkpoint, write_manifest)
from gckd_ray.evaluate import main as evaluate_main


def _write_checkpoint(directory: Path, epoch: int = 1, world: int = 2, legacy: bool = False,
                      model: object = None) -> Path:
    """A checkpoint laid out as `save_checkpoint` writes one: each rank writes its part in its
    own folder with its manifest last, then the folders are merged (as Ray Train does)."""
    parts = directory.with_name(directory.name + ".parts")
    for rank in range(world):
        part = parts / str(rank)
        part.mkdir(parents=True)
        atomic_torch_save({"optimizer": {"step": torch.tensor(epoch + rank)}},
                          part / f"rank{rank:03d}.pt")
        if rank == 0:
            atomic_torch_save({"w": torch.arange(64.0)} if model is None else model,
                              part / "model.pt")
            save_config(Config(), part / "config.yaml")
            (part / "tokenizer").mkdir()
            (part / "tokenizer" / "vocab.json").write_text('{"a": 0}')
            meta = {"epoch": epoch, "history": [], "world_size": world, "zero_stage": 0}
            if not legacy:
                meta["format"] = CHECKPOINT_FORMAT
            atomic_write_text(part / "state.json", json.dumps(meta))
        if not legacy:
            write_manifest(part, rank)
        shutil.copytree(part, directory, dirs_exist_ok=True)
    shutil.rmtree(parts)
    return directory


def _flip_byte(path: Path) -> None:
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0xFF
    path.write_bytes(bytes(data))


def test_a_complete_checkpoint_verifies(tmp_path):
    ckpt = _write_checkpoint(tmp_path / "ckpt")
    assert verify_checkpoint(ckpt)["epoch"] == 1
    listed = json.loads((ckpt / "manifest-rank000.json").read_text())["files"]
    assert set(listed) == {"rank000.pt", "model.pt", "config.yaml", "state.json",
                           "tokenizer/vocab.json"}
    assert set(json.loads((ckpt / "manifest-rank001.json").read_text())["files"]) == {
        "rank001.pt"}


@pytest.mark.parametrize("damage, message", [
    (lambda c: _flip_byte(c / "model.pt"),
     "{c}/model.pt: corrupted (its sha256 differs from the one in manifest-rank000.json)"),
    (lambda c: (c / "model.pt").write_bytes((c / "model.pt").read_bytes()[:100]),
     "{c}/model.pt: truncated or overwritten (100 bytes, manifest-rank000.json lists "),
    (lambda c: _flip_byte(c / "rank001.pt"),
     "{c}/rank001.pt: corrupted (its sha256 differs from the one in manifest-rank001.json)"),
    (lambda c: (c / "tokenizer" / "vocab.json").unlink(),
     "{c}/tokenizer/vocab.json: missing (listed in manifest-rank000.json)"),
    (lambda c: (c / "manifest-rank001.json").unlink(),  # rank 1's part never arrived
     "{c}: incomplete checkpoint (missing manifest-rank001.json)"),
    (lambda c: (c / "state.json").write_text('{"epoch": 1, "hist'),
     "{c}/state.json: corrupted (not valid JSON: "),
    (lambda c: (c / "state.json").unlink(), "{c}: not a complete gckd-ray checkpoint "
                                            "(missing state.json)"),
    (lambda c: (c / "manifest-rank000.json").write_text("[]"),
     "{c}/manifest-rank000.json: corrupted (not a JSON object)"),
])
def test_damaged_checkpoints_are_refused_naming_the_file(tmp_path, damage, message):
    ckpt = _write_checkpoint(tmp_path / "ckpt")
    damage(ckpt)
    with pytest.raises(CheckpointError) as err:
        verify_checkpoint(ckpt)
    assert str(err.value).startswith(message.format(c=ckpt))


def test_an_interrupted_manifest_write_leaves_an_incomplete_checkpoint(tmp_path):
    ckpt = _write_checkpoint(tmp_path / "ckpt")
    (ckpt / "manifest-rank000.json").rename(ckpt / "manifest-rank000.json.tmp")
    with pytest.raises(CheckpointError, match="incomplete checkpoint .missing "
                                              "manifest-rank000.json"):
        verify_checkpoint(ckpt)


def test_checkpoints_from_before_manifests_still_load(tmp_path):
    ckpt = _write_checkpoint(tmp_path / "ckpt", legacy=True)
    assert verify_checkpoint(ckpt)["epoch"] == 1
    assert torch.equal(load_model_state(ckpt)["w"], torch.arange(64.0))


def test_evaluate_refuses_a_corrupted_checkpoint(tmp_path, capsys):
    ckpt = _write_checkpoint(tmp_path / "ckpt")
    (ckpt / "model.pt").write_bytes((ckpt / "model.pt").read_bytes()[:-7])
    assert evaluate_main(["--checkpoint", str(ckpt)]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"checkpoint error: {ckpt}/model.pt: truncated or overwritten (") and \
        err.count("\n") == 1


class _Payload:
    def __reduce__(self):
        return (print, ("unpickled!",))


def test_loading_never_unpickles_arbitrary_objects(tmp_path, capsys):
    ckpt = _write_checkpoint(tmp_path / "ckpt", model={"w": _Payload()})
    verify_checkpoint(ckpt)  # intact: the manifest says nothing about what is inside
    with pytest.raises(pickle.UnpicklingError, match="Weights only load failed"):
        load_model_state(ckpt)
    assert "unpickled!" not in capsys.readouterr().out


def _run(tmp_path: Path, *epochs_and_damage) -> list[Path]:
    """Checkpoint folders named as Ray Train names them, oldest first."""
    out = []
    for i, (epoch, damaged) in enumerate(epochs_and_damage):
        ckpt = _write_checkpoint(tmp_path / "run" / f"checkpoint_2026-12-01_10-00-0{i}.000000",
                                 epoch=epoch)
        if damaged:
            _flip_byte(ckpt / "model.pt")
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
