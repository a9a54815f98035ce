"""The checkpoint file format (gckd_ray.checkpoint_format), without Ray: manifests refuse
incomplete, truncated and corrupted checkpoints naming the file, loading never unpickles
arbitrary objects, the GCKD memory state file round-trips, the tokenizer and the pretrained
folder are referenced by path and sha256 (older checkpoints with their own tokenizer still
load), and evaluation and search import neither Ray nor DeepSpeed. (The Ray Train fall-back:
distributed/test_checkpointing; real checkpoints of real runs: test_zero, test_train.)"""

import json
import pickle
import re
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from gckd_ray.checkpoint_format import (MEMORY_FILE, CheckpointError, check_pretrained,
                                        checkpoint_tokenizer_dir, folder_reference,
                                        folder_sha256, load_memory_state, load_model_state,
                                        newest_checkpoint, read_state, verify_checkpoint,
                                        write_state)
from gckd_ray.errors import one_line
from gckd_ray.evaluate import main as evaluate_main
from helpers import flip_byte, write_checkpoint

ROOT = Path(__file__).resolve().parents[1]


def test_a_complete_checkpoint_verifies(tmp_path):
    ckpt = write_checkpoint(tmp_path / "ckpt")
    assert verify_checkpoint(ckpt)["epoch"] == 1
    listed = json.loads((ckpt / "manifest-rank000.json").read_text())["files"]
    assert set(listed) == {"rank000.pt", "model.pt", "config.yaml", "state.json",
                           "tokenizer/vocab.json"}
    assert set(json.loads((ckpt / "manifest-rank001.json").read_text())["files"]) == {
        "rank001.pt"}


@pytest.mark.parametrize("damage, message", [
    (lambda c: flip_byte(c / "model.pt"),
     "{c}/model.pt: corrupted (its sha256 differs from the one in manifest-rank000.json)"),
    (lambda c: (c / "model.pt").write_bytes((c / "model.pt").read_bytes()[:100]),
     "{c}/model.pt: truncated or overwritten (100 bytes, manifest-rank000.json lists "),
    (lambda c: flip_byte(c / "rank001.pt"),
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
    ckpt = write_checkpoint(tmp_path / "ckpt")
    damage(ckpt)
    with pytest.raises(CheckpointError) as err:
        verify_checkpoint(ckpt)
    assert str(err.value).startswith(message.format(c=ckpt))


def test_an_interrupted_manifest_write_leaves_an_incomplete_checkpoint(tmp_path):
    ckpt = write_checkpoint(tmp_path / "ckpt")
    (ckpt / "manifest-rank000.json").rename(ckpt / "manifest-rank000.json.tmp")
    with pytest.raises(CheckpointError, match="incomplete checkpoint .missing "
                                              "manifest-rank000.json"):
        verify_checkpoint(ckpt)


def test_checkpoints_from_before_manifests_still_load(tmp_path):
    ckpt = write_checkpoint(tmp_path / "ckpt", legacy=True)
    assert verify_checkpoint(ckpt)["epoch"] == 1
    assert torch.equal(load_model_state(ckpt)["w"], torch.arange(64.0))


def test_evaluate_refuses_a_corrupted_checkpoint(tmp_path, capsys):
    ckpt = write_checkpoint(tmp_path / "ckpt")
    (ckpt / "model.pt").write_bytes((ckpt / "model.pt").read_bytes()[:-7])
    assert evaluate_main(["--checkpoint", str(ckpt)]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"checkpoint error: {ckpt}/model.pt: truncated or overwritten (") and \
        err.count("\n") == 1


class _Payload:
    def __reduce__(self):
        return (print, ("unpickled!",))


def test_loading_never_unpickles_arbitrary_objects(tmp_path, capsys):
    ckpt = write_checkpoint(tmp_path / "ckpt", model={"w": _Payload()})
    verify_checkpoint(ckpt)  # intact: the manifest says nothing about what is inside
    with pytest.raises(pickle.UnpicklingError, match="Weights only load failed"):
        load_model_state(ckpt)
    assert "unpickled!" not in capsys.readouterr().out


def test_memory_state_file_round_trips_and_names_what_is_wrong(tmp_path):
    assert load_memory_state(tmp_path) is None  # a checkpoint without a GCKD memory
    with pytest.raises(FileNotFoundError, match=f"{MEMORY_FILE}: no saved memory state"):
        read_state(tmp_path)
    state = {"dim": np.int64(4), "queue_size": np.int64(8), "num_target_images": np.int64(2),
             "num_target_texts": np.int64(3), "feature_dtype": np.str_("float16"),
             "image_features": np.arange(32, dtype=np.float16).reshape(8, 4)}
    path = write_state(tmp_path / "ckpt", state)
    assert path == tmp_path / "ckpt" / MEMORY_FILE and not list(path.parent.glob("*.tmp"))
    loaded = load_memory_state(path.parent)
    assert set(loaded) == set(state)
    for key in state:
        np.testing.assert_array_equal(loaded[key], state[key], err_msg=key)
    assert loaded["image_features"].dtype == np.float16
    write_state(tmp_path / "partial", {"dim": np.int64(4)})
    with pytest.raises(ValueError) as err:
        read_state(tmp_path / "partial")
    assert str(err.value) == (f"{tmp_path / 'partial' / MEMORY_FILE}: not a memory state (missing "
                              "['queue_size', 'num_target_images', 'num_target_texts', "
                              "'feature_dtype'])")


def test_evaluation_and_search_import_neither_ray_nor_deepspeed():
    # A fresh interpreter: the checkpoint format, evaluation and search stay out of distributed/.
    code = ("import sys, gckd_ray.evaluate, gckd_ray.search, gckd_ray.checkpoint_format; "
            "print(sorted(m for m in sys.modules if m.split('.')[0] in ('ray','deepspeed') "
            "or m.startswith('gckd_ray.distributed')))")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          cwd=ROOT, timeout=120)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "[]"
    # Their deferred (in-function) imports too.
    for name in ("checkpoint_format.py", "evaluate.py", "search.py"):
        source = (ROOT / "gckd_ray" / name).read_text()
        assert not re.search(r"^\s*(from|import) gckd_ray\.distributed", source, re.M), name


def _folder(path: Path, files: dict[str, str]) -> Path:
    for name, text in files.items():
        (path / name).parent.mkdir(parents=True, exist_ok=True)
        (path / name).write_text(text)
    return path


def test_folder_sha256_covers_names_and_contents_not_dot_files(tmp_path):
    a = _folder(tmp_path / "a", {"config.json": "{}", "sub/w.bin": "123"})
    b = _folder(tmp_path / "b", {"sub/w.bin": "123", "config.json": "{}"})
    assert folder_sha256(a) == folder_sha256(b)
    _folder(b, {".DS_Store": "x", ".cache/lock": "y"})  # browsing a folder does not change it
    assert folder_sha256(a) == folder_sha256(b)
    _folder(b, {"sub/w.bin": "124"})
    assert folder_sha256(a) != folder_sha256(b)
    renamed = _folder(tmp_path / "c", {"config.json": "{}", "sub/v.bin": "123"})
    assert folder_sha256(a) != folder_sha256(renamed)
    with pytest.raises(FileNotFoundError, match="not a folder"):
        folder_sha256(tmp_path / "none")


def _run_with_reference(tmp_path: Path) -> tuple[Path, Path]:
    """A run folder as the launcher lays it out: tokenizer/ once, checkpoints under ray/<run>/
    naming it (relative to where Ray Train puts a checkpoint, and absolute)."""
    run = tmp_path / "run"
    tokenizer = _folder(run / "tokenizer", {"word_vocab.json": "{}"})
    refs = {"tokenizer": folder_reference(tokenizer, relative_to=run / "ray" / "r" / "c"),
            "pretrained": None}
    ckpt = write_checkpoint(run / "ray" / "r" / "checkpoint_1", references=refs)
    return run, ckpt


def test_new_checkpoints_name_the_runs_tokenizer_instead_of_copying_it(tmp_path):
    run, ckpt = _run_with_reference(tmp_path)
    assert not (ckpt / "tokenizer").exists()
    state = verify_checkpoint(ckpt)
    assert state["references"]["tokenizer"]["relative"] == "../../../tokenizer"
    assert checkpoint_tokenizer_dir(ckpt) == ckpt / "../../../tokenizer"
    # The whole run folder moved: found relative to the checkpoint.
    moved = run.rename(tmp_path / "moved")
    ckpt = moved / "ray" / "r" / "checkpoint_1"
    assert checkpoint_tokenizer_dir(ckpt).resolve() == (moved / "tokenizer").resolve()
    # The checkpoint alone, copied elsewhere: found at the recorded absolute path.
    _folder(tmp_path / "run" / "tokenizer", {"word_vocab.json": "{}"})
    alone = Path(shutil.copytree(ckpt, tmp_path / "alone"))
    assert checkpoint_tokenizer_dir(alone) == tmp_path / "run" / "tokenizer"
    # A tokenizer that changed is refused, naming both hashes; none at all too.
    shutil.rmtree(tmp_path / "run")
    _folder(moved / "tokenizer", {"word_vocab.json": '{"changed": 1}'})
    with pytest.raises(CheckpointError, match="not the tokenizer .* was trained with "
                                              r"\(sha256 [0-9a-f]{64}, the checkpoint records"):
        checkpoint_tokenizer_dir(ckpt)
    shutil.rmtree(moved / "tokenizer")
    with pytest.raises(CheckpointError, match="its tokenizer folder is missing"):
        checkpoint_tokenizer_dir(ckpt)


def test_old_checkpoints_keep_their_own_tokenizer(tmp_path):
    ckpt = write_checkpoint(tmp_path / "ckpt")
    assert checkpoint_tokenizer_dir(ckpt) == ckpt / "tokenizer"
    legacy = write_checkpoint(tmp_path / "legacy", legacy=True)
    assert checkpoint_tokenizer_dir(legacy) == legacy / "tokenizer"


def test_a_changed_pretrained_folder_is_refused_in_one_line_naming_both_hashes(tmp_path):
    clip = _folder(tmp_path / "clip", {"config.json": "{}", "model.safetensors": "w"})
    then = folder_reference(clip)
    state = {"references": {"tokenizer": None, "pretrained": then}}
    check_pretrained("ckpt", state, then)  # the same folder
    moved = Path(shutil.copytree(clip, tmp_path / "elsewhere"))
    check_pretrained("ckpt", state, folder_reference(moved))  # same files, new place: fine
    check_pretrained("ckpt", {"epoch": 1}, folder_reference(moved))  # no references: older
    _folder(clip, {"model.safetensors": "w2"})
    now = folder_reference(clip)
    with pytest.raises(CheckpointError) as err:
        check_pretrained("ckpt", state, now)
    line = one_line(err.value)
    assert line == (f"checkpoint error: model.pretrained {clip} has changed since ckpt was "
                    f"saved: its files' sha256 is {now['sha256']}, the checkpoint was trained "
                    f"from sha256 {then['sha256']} (then at {clip}); restore that folder, or "
                    "start a new run (run.resume=false or another run.output_dir)")
    with pytest.raises(CheckpointError, match="trained from .*clip; this run has no "
                                              "model.pretrained"):
        check_pretrained("ckpt", state, None)
    with pytest.raises(CheckpointError, match="trained from scratch"):
        check_pretrained("ckpt", {"references": {"pretrained": None}}, now)


def test_newest_checkpoint_is_the_newest_with_a_readable_state(tmp_path):
    assert newest_checkpoint(tmp_path) is None
    write_checkpoint(tmp_path / "checkpoint_2026-01-01_00-00-01.0", epoch=1)
    write_checkpoint(tmp_path / "checkpoint_2026-01-01_00-00-02.0", epoch=2)
    (tmp_path / "checkpoint_2026-01-01_00-00-03.0").mkdir()  # interrupted before state.json
    directory, state = newest_checkpoint(tmp_path)
    assert directory.name.endswith("02.0") and state["epoch"] == 2
