"""The adapted student as a Hugging Face CLIP folder: ``<run.output_dir>/final_model/``.

Written once, when a run has trained all its epochs, from its last checkpoint's ``model.pt``
(the full state, gathered under ZeRO-3), so users can take the model elsewhere::

    config.json, model.safetensors  CLIPModel.from_pretrained(folder) loads them
    tokenizer files                 the run's tokenizer (word_vocab.json, or CLIP's BPE files);
                                    gckd_ray.data.tokenizer.load_tokenizer(folder) reads them
    gckd_ray.safetensors            what CLIPModel cannot hold: the position table of the
                                    trained (H/p, W/p) grid, the domain-centring means
    gckd_ray.json                   how it was trained, how to load it, what is left out

In this project ``model.pretrained=<folder>`` builds the student from it (with its trained
position grid when the image size is the same). Not carried: the EMA teacher, the source
losses' identity classifier, the matching head, the propagation net and the GCKD memory.
The folder is written under a temporary name and renamed, so it is complete or absent.
"""

from __future__ import annotations

import json
import secrets
import shutil
from pathlib import Path
from typing import Any

import torch

from gckd_ray.checkpoint_format import (checkpoint_tokenizer_dir, load_checkpoint_config,
                                        load_model_state)
from gckd_ray.config import Config
from gckd_ray.data.tokenizer import Tokenizer, copy_tokenizer_files, load_tokenizer
from gckd_ray.model.encoders import (FINAL_MODEL_EXTRAS, GRID_TABLE,
                                     resample_position_embedding, tiny_clip_config)

FINAL_MODEL_DIR = "final_model"
INFO_FILE = "gckd_ray.json"
_POSITIONS = "vision_model.embeddings.position_embedding.weight"
NOT_INCLUDED = ("EMA teacher", "identity classifier of the source losses",
                "matching head (re-ranking)", "graph propagation net", "GCKD memory")


def clip_config(cfg: Config, tokenizer: Tokenizer):
    """The CLIPConfig of the student ``cfg`` trains: its pretrained folder's, or the tiny one."""
    from transformers import CLIPConfig

    if cfg.model.pretrained:
        return CLIPConfig.from_pretrained(cfg.model.pretrained, local_files_only=True)
    return tiny_clip_config(cfg.model, vocab_size=tokenizer.vocab_size, pad_id=tokenizer.pad_id,
                            bos_id=tokenizer.bos_id, eos_id=tokenizer.eos_id,
                            text_length=cfg.data.text_length,
                            image_size=(cfg.data.image_height, cfg.data.image_width))


def clip_state_dict(encoder_state: dict[str, torch.Tensor], config,
                    image_size: tuple[int, int]) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
    """A ``DualEncoder`` state dict -> (the CLIPModel state dict that ``config`` describes, the
    trained grid's position table (1 + H/p * W/p, D)).

    The DualEncoder's position table is on the (H/p, W/p) grid and its ``logit_scale`` is 1-D;
    CLIPModel's table is on the config's square grid and its ``logit_scale`` 0-D. The square
    table is the trained one resampled (bicubic; the same table when the grid is square)."""
    state = {k.removeprefix("clip."): v.detach().cpu().contiguous()
             for k, v in encoder_state.items() if k.startswith("clip.")}
    state["logit_scale"] = state["logit_scale"].reshape(())
    grid_table = state[_POSITIONS]
    patch = config.vision_config.patch_size
    side = config.vision_config.image_size // patch
    grid = (image_size[0] // patch, image_size[1] // patch)
    if grid != (side, side):
        state[_POSITIONS] = resample_position_embedding(grid_table, grid, (side, side))
    return state, grid_table


def write_final_model(out: str | Path, encoder_state: dict[str, torch.Tensor], cfg: Config,
                      tokenizer_dir: str | Path, info: dict[str, Any] | None = None) -> Path:
    """Write the student (``encoder_state``: a DualEncoder's state dict) of a run of ``cfg``
    as a Hugging Face CLIP folder at ``out``, atomically (replacing an older one).

    Args:
        tokenizer_dir: the tokenizer it was trained with (its files are copied in).
        info: extra entries for gckd_ray.json (e.g. the epochs trained).
    """
    from safetensors.torch import save_file

    out = Path(out)
    tokenizer = load_tokenizer(tokenizer_dir)
    config = clip_config(cfg, tokenizer)
    config.architectures = ["CLIPModel"]
    image_size = (cfg.data.image_height, cfg.data.image_width)
    state, grid_table = clip_state_dict(encoder_state, config, image_size)
    patch = config.vision_config.patch_size
    grid = f"{image_size[0] // patch}x{image_size[1] // patch}"
    tmp = out.with_name(f".{out.name}-{secrets.token_hex(4)}")
    try:
        tmp.mkdir(parents=True)
        config.save_pretrained(tmp)
        save_file(state, str(tmp / "model.safetensors"), metadata={"format": "pt"})
        extras = {GRID_TABLE: grid_table}
        extras.update({f"centring_{k.split('.')[-1]}": v.detach().cpu().contiguous()
                       for k, v in encoder_state.items() if k.startswith("centring.")})
        save_file(extras, str(tmp / FINAL_MODEL_EXTRAS), metadata={"grid": grid})
        copy_tokenizer_files(tokenizer_dir, tmp)
        description = _description(cfg, tokenizer, image_size, grid, config)
        (tmp / INFO_FILE).write_text(json.dumps({**description, **(info or {})}, indent=1))
        _replace(tmp, out)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return out


def _replace(tmp: Path, out: Path) -> None:
    """Rename ``tmp`` to ``out``; an older ``out`` is moved aside first, then removed."""
    old = None
    if out.exists():
        old = out.with_name(f".{out.name}-old-{secrets.token_hex(4)}")
        out.rename(old)
    tmp.rename(out)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


def _description(cfg: Config, tokenizer: Tokenizer, image_size: tuple[int, int], grid: str,
                 config) -> dict[str, Any]:
    side = config.vision_config.image_size
    return {
        "format": "gckd_ray.final_model", "version": 1,
        "load": "transformers.CLIPModel.from_pretrained(<this folder>); the tokenizer: "
                "gckd_ray.data.tokenizer.load_tokenizer(<this folder>); in gckd-ray: "
                "model.pretrained=<this folder>",
        "method": cfg.method, "protocol": cfg.protocol,
        "trained_from": cfg.model.pretrained or None,
        "image_size": list(image_size), "text_length": cfg.data.text_length,
        "tokens": {"bos_id": tokenizer.bos_id, "eos_id": tokenizer.eos_id,
                   "pad_id": tokenizer.pad_id},
        "text_pooling": "the text embedding is read at the first eos token; Hugging Face "
                        "pools at argmax(input_ids) when config.text_config.eos_token_id == 2",
        "position_embedding": f"model.safetensors holds the {side}x{side} table CLIPModel "
                              f"expects, resampled (bicubic) from the trained {grid} grid of "
                              f"{image_size[0]}x{image_size[1]} images (the same table when the "
                              f"grid is square); {FINAL_MODEL_EXTRAS}[{GRID_TABLE}] holds the "
                              "trained grid's table itself",
        "centring": f"{FINAL_MODEL_EXTRAS}[centring_means] (2 domains: 0 source, 1 target; x 2 "
                    "modalities: 0 image, 1 text; x D) and [centring_seen]: gckd-ray evaluates "
                    "target embeddings as normalize(embedding - means[1, modality]) where seen; "
                    "CLIPModel does not apply them",
        "word_aliases": ("word_aliases.json (GCKD's lexical bridge, when the run had one): "
                         "gckd-ray's tokenizer rewrites each listed target word as its alias "
                         "before BPE; CLIPTokenizer does not"),
        "not_included": list(NOT_INCLUDED),
    }


def export_final_model(checkpoint: str | Path, out: str | Path,
                       info: dict[str, Any] | None = None) -> Path:
    """Write the student of a training checkpoint (its ``model.pt``, config and tokenizer) as a
    final_model/ folder at ``out``; return ``out``."""
    checkpoint = Path(checkpoint)
    cfg = load_checkpoint_config(checkpoint)
    prefix = "encoder."
    student = {k[len(prefix):]: v for k, v in load_model_state(checkpoint).items()
               if k.startswith(prefix)}
    return write_final_model(out, student, cfg, checkpoint_tokenizer_dir(checkpoint), info)
