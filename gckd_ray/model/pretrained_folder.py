"""Check ``model.pretrained`` on the driver, before Ray starts: a missing folder, a folder
without a CLIP config or weights, or a tokenizer that does not fit the text tower is one
``config error: model.pretrained: ...`` line instead of a Hugging Face traceback in every
worker. Reads only the folder's config and tokenizer, never its weights."""

from __future__ import annotations

import json
from pathlib import Path

from gckd_ray.config import Config, ConfigError
from gckd_ray.data.tokenizer import load_tokenizer

WEIGHT_FILES = ("model.safetensors", "model.safetensors.index.json", "pytorch_model.bin",
                "pytorch_model.bin.index.json")
_LAYOUT = ("a local Hugging Face CLIP folder: config.json (model_type clip), model.safetensors "
           "(or pytorch_model.bin), and its tokenizer: vocab.json + merges.txt or tokenizer.json")


def check_pretrained_folder(cfg: Config) -> None:
    """Raise ConfigError (naming the file and what was expected) unless ``model.pretrained``
    is empty or a CLIP folder the run can load with its data settings."""
    if not cfg.model.pretrained:
        return
    folder = Path(cfg.model.pretrained).expanduser()
    if not folder.is_dir():
        raise ConfigError(f"model.pretrained: {folder} is not a folder (expected {_LAYOUT}; "
                          f"the CPU stand-in is built by python -m experiments.pretrain_standin "
                          f"--out {folder})")
    text, vision = _clip_config(folder)
    if not any((folder / name).is_file() for name in WEIGHT_FILES):
        raise ConfigError(f"model.pretrained: {folder} has no weights (expected one of "
                          f"{', '.join(WEIGHT_FILES)})")
    _check_tokenizer(folder, text["vocab_size"])
    positions = text["max_position_embeddings"]
    if cfg.data.text_length > positions:
        raise ConfigError(f"data.text_length: {cfg.data.text_length} exceeds the text tower's "
                          f"{positions} positions in {folder / 'config.json'}; set "
                          f"data.text_length={positions} or less")
    patch = vision["patch_size"]
    for key in ("data.image_height", "data.image_width"):
        size = getattr(cfg.data, key.split(".")[1])
        if size % patch:
            raise ConfigError(f"{key}: {size} is not a multiple of the vision tower's patch "
                              f"size {patch} ({folder / 'config.json'})")


def _clip_config(folder: Path) -> tuple[dict, dict]:
    """The text and vision settings of ``folder/config.json`` (CLIPConfig fills defaults)."""
    path = folder / "config.json"
    if not path.is_file():
        raise ConfigError(f"model.pretrained: {folder} has no config.json (expected {_LAYOUT})")
    try:
        model_type = json.loads(path.read_text()).get("model_type")
    except (json.JSONDecodeError, UnicodeDecodeError, AttributeError) as err:
        raise ConfigError(f"model.pretrained: {path}: not a JSON object ({err})") from None
    if model_type != "clip":
        raise ConfigError(f"model.pretrained: {path}: model_type is {model_type!r}, expected "
                          "'clip' (a CLIPModel checkpoint, e.g. openai/clip-vit-base-patch16)")
    from transformers import CLIPConfig

    config = CLIPConfig.from_pretrained(str(folder), local_files_only=True)
    return config.text_config.to_dict(), config.vision_config.to_dict()


def _check_tokenizer(folder: Path, model_vocab: int) -> None:
    try:
        tokenizer = load_tokenizer(folder)
    except FileNotFoundError:
        raise ConfigError(f"model.pretrained: {folder} has no tokenizer (expected vocab.json + "
                          "merges.txt or tokenizer.json beside the weights)") from None
    except (OSError, ValueError) as err:
        raise ConfigError(f"model.pretrained: {folder}: unreadable tokenizer: "
                          f"{str(err).splitlines()[0]}") from None
    largest = max(tokenizer.vocab_size - 1, tokenizer.eos_id, tokenizer.bos_id)
    if largest >= model_vocab:
        raise ConfigError(f"model.pretrained: {folder}: the tokenizer's ids reach {largest} "
                          f"(vocabulary of {tokenizer.vocab_size}), beyond the text tower's "
                          f"vocab_size {model_vocab} in config.json: the tokenizer files belong "
                          "to another model")
