"""final_model/: the student as a Hugging Face CLIP folder. CLIPModel.from_pretrained loads it
without missing or unexpected keys, and the project's loader (model.pretrained=folder) rebuilds
the trained student exactly, for a tiny random CLIP and for a pretrained CLIP folder."""

from __future__ import annotations

import json
import os
from pathlib import Path

import torch
import torch.nn.functional as F

os.environ.setdefault("HF_HUB_OFFLINE", "1")

from transformers import CLIPModel  # noqa: E402

from gckd_ray.config import load_config  # noqa: E402
from gckd_ray.data.tokenizer import (CLIPBPETokenizer, WordTokenizer,  # noqa: E402
                                     load_tokenizer)
from gckd_ray.model.encoders import FINAL_MODEL_EXTRAS  # noqa: E402
from gckd_ray.model.final_model import INFO_FILE, NOT_INCLUDED, write_final_model  # noqa: E402
from gckd_ray.model.retriever import build_encoder  # noqa: E402
from helpers import write_tiny_clip  # noqa: E402

TINY = ("model.hidden_size=32", "model.embed_dim=16", "model.num_layers=1", "model.num_heads=2",
        "model.patch_size=8", "data.text_length=16")
CAPTIONS = ["a man in a red coat", "a woman with a red bag"]


def _trained(cfg, tokenizer):
    """A student as training leaves it: weights moved off their init, target means estimated."""
    torch.manual_seed(3)
    encoder = build_encoder(cfg, tokenizer)
    with torch.no_grad():
        for param in encoder.parameters():
            param.add_(0.01 * torch.randn_like(param))
        encoder.centring.means.normal_()
        encoder.centring.seen[1] = True
    return encoder.eval()


def _load_both(folder: Path, cfg_overrides: tuple[str, ...]):
    clip, info = CLIPModel.from_pretrained(folder, local_files_only=True,
                                           output_loading_info=True)
    assert {k: v for k, v in info.items() if v} == {}  # no missing/unexpected/mismatched keys
    cfg = load_config(None, [*cfg_overrides, f"model.pretrained={folder}"])
    tokenizer = load_tokenizer(folder)
    return clip.eval(), build_encoder(cfg, tokenizer).eval(), tokenizer


def test_tiny_random_student_on_a_non_square_grid(tmp_path):
    cfg = load_config(None, [*TINY, "data.image_height=64", "data.image_width=32"])
    tokenizer = WordTokenizer.build(CAPTIONS)
    tokenizer.save(tmp_path / "tokenizer")
    trained = _trained(cfg, tokenizer)
    out = write_final_model(tmp_path / "final_model", trained.state_dict(), cfg,
                            tmp_path / "tokenizer", info={"epochs": 3})
    assert sorted(p.name for p in out.iterdir()) == sorted(
        ["config.json", "model.safetensors", FINAL_MODEL_EXTRAS, INFO_FILE, "word_vocab.json"])
    clip, rebuilt, tok = _load_both(out, ("data.image_height=64", "data.image_width=32",
                                          "data.text_length=16"))
    assert isinstance(tok, WordTokenizer) and tok.words == tokenizer.words
    # The HF folder holds CLIP's square 8x8 table; the trained 8x4 grid comes back exactly.
    assert clip.vision_model.embeddings.position_embedding.weight.shape == (1 + 8 * 8, 32)
    images = torch.randn(2, 3, 64, 32)
    ids, mask, _ = tokenizer.encode(CAPTIONS, 16)
    with torch.no_grad():  # same weights, same float32 forwards: bitwise equal
        assert torch.equal(rebuilt.encode_image(images), trained.encode_image(images))
        assert torch.equal(rebuilt.encode_text(ids, mask), trained.encode_text(ids, mask))
        # Plain CLIPModel: the same text embedding (it pools at the first eos here too)
        hf_text = clip.get_text_features(input_ids=ids, attention_mask=mask).pooler_output
    torch.testing.assert_close(F.normalize(hf_text, dim=-1), trained.encode_text(ids, mask))
    info = json.loads((out / INFO_FILE).read_text())
    assert info["epochs"] == 3 and info["not_included"] == list(NOT_INCLUDED)
    assert info["image_size"] == [64, 32] and info["tokens"]["eos_id"] == tokenizer.eos_id
    assert "8x4 grid" in info["position_embedding"]


def test_pretrained_clip_student_carries_its_bpe_tokenizer_and_replaces_atomically(tmp_path):
    write_tiny_clip(tmp_path / "clip", image_size=32)
    overrides = ("data.image_height=32", "data.image_width=32", "data.text_length=16")
    cfg = load_config(None, [*overrides, f"model.pretrained={tmp_path / 'clip'}"])
    tokenizer = load_tokenizer(tmp_path / "clip")
    trained = _trained(cfg, tokenizer)
    out = tmp_path / "run" / "final_model"
    write_final_model(out, {k: torch.zeros_like(v) for k, v in trained.state_dict().items()},
                      cfg, tmp_path / "clip")  # an older final model, replaced below
    write_final_model(out, trained.state_dict(), cfg, tmp_path / "clip")
    assert [p.name for p in out.parent.iterdir()] == ["final_model"]  # no temporary left
    assert not (out / "pytorch_model.bin").exists()
    clip, rebuilt, tok = _load_both(out, overrides)
    assert isinstance(tok, CLIPBPETokenizer) and tok.eos_id == tokenizer.eos_id
    images = torch.randn(2, 3, 32, 32)
    ids, mask, _ = tokenizer.encode(CAPTIONS, 16)
    with torch.no_grad():
        assert torch.equal(rebuilt.encode_image(images), trained.encode_image(images))
        assert torch.equal(rebuilt.encode_text(ids, mask), trained.encode_text(ids, mask))
        # Square grid: plain CLIPModel's image features are the student's too.
        hf_image = clip.get_image_features(pixel_values=images).pooler_output
    torch.testing.assert_close(F.normalize(hf_image, dim=-1), trained.encode_image(images))
    assert json.loads((out / INFO_FILE).read_text())["trained_from"] == str(tmp_path / "clip")
