"""``model.pretrained`` is checked on the driver: each bad folder is one config error line."""

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from gckd_ray.config import ConfigError, load_config
from gckd_ray.model.pretrained_folder import check_pretrained_folder
from helpers import write_tiny_clip, write_tiny_clip_tokenizer

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def clip_folder(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("clip")
    write_tiny_clip(folder)
    return folder


def _check(folder: Path, *overrides: str) -> None:
    check_pretrained_folder(load_config(None, [f"model.pretrained={folder}",
                                               "data.text_length=16", *overrides]))


def _copy(clip_folder: Path, tmp_path: Path, *without: str) -> Path:
    folder = tmp_path / "clip"
    shutil.copytree(clip_folder, folder, ignore=shutil.ignore_patterns(*without))
    return folder


def test_a_good_folder_passes(clip_folder):
    _check(clip_folder)
    check_pretrained_folder(load_config(None, []))  # no model.pretrained: nothing to check


@pytest.mark.parametrize("without, overrides, expected", [
    ((), ("data.text_length=17",), "data.text_length: 17 exceeds the text tower's 16 positions"),
    ((), ("data.image_width=36",), "data.image_width: 36 is not a multiple of the vision "
                                   "tower's patch size 8"),
    (("config.json",), (), "has no config.json (expected a local Hugging Face CLIP folder"),
    (("model.safetensors",), (), "has no weights (expected one of model.safetensors"),
    (("vocab.json",), (), "has no tokenizer (expected vocab.json + merges.txt"),
])
def test_a_bad_folder_is_one_config_error_naming_what_is_missing(
        clip_folder, tmp_path, without, overrides, expected):
    with pytest.raises(ConfigError, match=None) as err:
        _check(_copy(clip_folder, tmp_path, *without), *overrides)
    assert expected in str(err.value) and "\n" not in str(err.value)


def test_a_missing_folder_and_a_foreign_config(clip_folder, tmp_path):
    with pytest.raises(ConfigError, match="is not a folder"):
        _check(tmp_path / "nowhere")
    folder = _copy(clip_folder, tmp_path)
    config = json.loads((folder / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps({**config, "model_type": "bert"}))
    with pytest.raises(ConfigError, match="model_type is 'bert', expected 'clip'"):
        _check(folder)
    (folder / "config.json").write_text("{not json")
    with pytest.raises(ConfigError, match="config.json: not a JSON object"):
        _check(folder)


def test_a_tokenizer_larger_than_the_text_tower_is_refused(clip_folder, tmp_path):
    folder = _copy(clip_folder, tmp_path)
    vocab = json.loads((folder / "vocab.json").read_text())
    vocab.update({f"extra{i}</w>": len(vocab) + i for i in range(5)})
    (folder / "vocab.json").write_text(json.dumps(vocab))
    with pytest.raises(ConfigError, match="beyond the text tower's vocab_size .* belong to "
                                          "another model"):
        _check(folder)


def test_the_train_cli_refuses_before_ray_starts(tmp_path):
    write_tiny_clip_tokenizer(tmp_path / "tokenizer-only")
    code = ("import sys; from gckd_ray.train import main; "
            f"rc = main(['model.pretrained={tmp_path / 'tokenizer-only'}', "
            f"'run.output_dir={tmp_path / 'run'}']); print('ray' in sys.modules); sys.exit(rc)")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          cwd=ROOT, timeout=60)
    assert done.returncode == 2 and done.stdout.strip() == "False"
    assert done.stderr.startswith("config error: model.pretrained: ")
    assert "has no config.json" in done.stderr and len(done.stderr.splitlines()) == 1
    assert not (tmp_path / "run").exists()
