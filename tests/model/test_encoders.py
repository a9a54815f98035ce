"""Dual encoder: shapes, unit norm, non-square images, eos pooling, local-path CLIP loading."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")

from transformers import CLIPConfig, CLIPModel, CLIPTextConfig, CLIPVisionConfig  # noqa: E402

from helpers import write_tiny_clip_tokenizer
from gckd_ray.config import ModelConfig  # noqa: E402
from gckd_ray.data.tokenizer import CLIPBPETokenizer, WordTokenizer, load_tokenizer  # noqa: E402
from gckd_ray.model.encoders import (  # noqa: E402
    DualEncoder, build_dual_encoder, embedding_dim, resample_position_embedding)

CAPTIONS = ["a man in a red coat and black shoes .", "a woman with a blue skirt",
            "the man carries a red bag", "a girl in a white shirt"]
SMALL = ModelConfig(embed_dim=16, hidden_size=32, num_layers=1, num_heads=2, patch_size=8)


def _tiny(text_length: int = 12, image_size=(64, 32)) -> tuple[DualEncoder, WordTokenizer]:
    tok = WordTokenizer.build(CAPTIONS)
    torch.manual_seed(0)
    enc = build_dual_encoder(SMALL, vocab_size=tok.vocab_size, pad_id=tok.pad_id,
                             bos_id=tok.bos_id, eos_id=tok.eos_id, text_length=text_length,
                             image_size=image_size)
    return enc.eval(), tok


def test_shapes_unit_norm_and_non_square_images():
    enc, tok = _tiny()
    ids, mask, _ = tok.encode(CAPTIONS, 12)
    images = torch.randn(4, 3, 64, 32)
    image_emb, text_emb = enc(images, ids, mask)
    assert enc.embed_dim == 16
    assert image_emb.shape == text_emb.shape == (4, 16)
    # float32 model: norms of float32-normalised rows and repeated float32 forwards agree to
    # float32 rounding (~1e-7 relative); assert_close's float32 defaults here and below
    torch.testing.assert_close(image_emb.norm(dim=-1), torch.ones(4))
    torch.testing.assert_close(text_emb.norm(dim=-1), torch.ones(4))
    torch.testing.assert_close(enc.encode_image(images), image_emb)
    # one position per (64/8) x (32/8) patch, plus the class token
    assert enc.clip.vision_model.embeddings.position_embedding.weight.shape == (1 + 8 * 4, 32)
    with pytest.raises(ValueError, match="image size"):
        enc.encode_image(torch.randn(1, 3, 32, 64))


def test_text_length_is_respected():
    enc, tok = _tiny(text_length=10)
    assert enc.clip.config.text_config.max_position_embeddings == 10
    ids, mask, _ = tok.encode(CAPTIONS, 10)
    assert enc.encode_text(ids, mask).shape == (4, 16)
    ids, mask, _ = tok.encode(CAPTIONS, 11)
    with pytest.raises(ValueError, match="text length"):
        enc.encode_text(ids, mask)


def test_text_embedding_pools_at_eos():
    enc, tok = _tiny()
    ids, mask, _ = tok.encode(CAPTIONS, 12)
    with torch.no_grad():  # float32 forwards, compared at float32's assert_close defaults
        ref = enc.encode_text(ids, mask)
        # tokens after eos (padding) are never seen by the eos position
        junk = ids.clone()
        junk[mask == 0] = torch.randint(4, tok.vocab_size, (int((mask == 0).sum()),))
        torch.testing.assert_close(enc.encode_text(junk, mask), ref)
        torch.testing.assert_close(enc.encode_text(junk, torch.ones_like(mask)), ref)
        # a token before eos does matter
        changed = ids.clone()
        changed[:, 1] = tok.unk_id
        assert not torch.allclose(enc.encode_text(changed, mask), ref)
        # HF's own pooler agrees for the tiny config (its eos_token_id is the tokenizer's)
        hf = enc.clip.get_text_features(input_ids=ids, attention_mask=mask).pooler_output
    torch.testing.assert_close(torch.nn.functional.normalize(hf, dim=-1), ref)


def test_all_trainable_parameters_get_gradients():
    enc, tok = _tiny()
    enc.train()
    ids, mask, _ = tok.encode(CAPTIONS, 12)
    image_emb, text_emb = enc(torch.randn(4, 3, 64, 32), ids, mask)
    (image_emb @ text_emb.t()).sum().backward()
    missing = [n for n, p in enc.named_parameters() if p.requires_grad and p.grad is None]
    assert missing == []  # DDP-safe: no trainable parameter is left without a gradient
    assert not enc.clip.logit_scale.requires_grad


def test_resample_position_embedding():
    # float32 bicubic interpolation (weights summing to 1): equal up to float32 rounding
    table = torch.randn(1 + 16, 5)
    torch.testing.assert_close(resample_position_embedding(table, (4, 4), (4, 4)), table)
    const = torch.ones(1 + 16, 5)
    out = resample_position_embedding(const, (4, 4), (6, 2))
    assert out.shape == (1 + 12, 5)
    torch.testing.assert_close(out, torch.ones(13, 5))


def _save_pretrained_clip(directory: Path, tok: CLIPBPETokenizer, eos_token_id: int) -> CLIPModel:
    shared = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                  num_attention_heads=2)
    config = CLIPConfig(
        text_config=CLIPTextConfig(vocab_size=tok.vocab_size, max_position_embeddings=16,
                                   pad_token_id=tok.pad_id, bos_token_id=tok.bos_id,
                                   eos_token_id=eos_token_id, **shared),
        vision_config=CLIPVisionConfig(image_size=32, patch_size=8, **shared),
        projection_dim=24)
    torch.manual_seed(1)
    model = CLIPModel(config)
    model.save_pretrained(directory)
    tok.save(directory)
    return model


def test_local_path_pretrained_loading(tmp_path):
    write_tiny_clip_tokenizer(tmp_path / "tok")
    tok = load_tokenizer(tmp_path / "tok")
    saved = _save_pretrained_clip(tmp_path / "clip", tok, eos_token_id=tok.eos_id)
    tok = load_tokenizer(tmp_path / "clip")  # a checkpoint folder also holds its tokenizer
    assert isinstance(tok, CLIPBPETokenizer)
    cfg = ModelConfig(pretrained=str(tmp_path / "clip"))
    kwargs = dict(vocab_size=tok.vocab_size, pad_id=tok.pad_id, bos_id=tok.bos_id,
                  eos_id=tok.eos_id, text_length=16)

    # float32 model throughout: loaded weights and forwards are compared at float32's
    # assert_close defaults (a float32 same-size resample and repeated forwards round alike
    # to ~1e-7 relative)
    square = build_dual_encoder(cfg, image_size=(32, 32), **kwargs).eval()
    assert square.embed_dim == 24 == embedding_dim(cfg)
    assert embedding_dim(SMALL) == SMALL.embed_dim
    saved_table = saved.vision_model.embeddings.position_embedding.weight
    torch.testing.assert_close(
        square.clip.vision_model.embeddings.position_embedding.weight, saved_table)
    torch.testing.assert_close(square.clip.text_projection.weight, saved.text_projection.weight)
    images = torch.randn(2, 3, 32, 32)
    with torch.no_grad():  # same image features as the untouched HF model
        expected = saved.get_image_features(pixel_values=images).pooler_output
        torch.testing.assert_close(square.encode_image(images),
                                   torch.nn.functional.normalize(expected, dim=-1))

    tall = build_dual_encoder(cfg, image_size=(64, 32), **kwargs).eval()
    table = tall.clip.vision_model.embeddings.position_embedding.weight
    assert table.shape == (1 + 8 * 4, 32)
    torch.testing.assert_close(table[0], saved_table[0])  # class position kept
    ids, mask, _ = tok.encode(["A red man", "a woman in a red coat"], 16)
    with torch.no_grad():
        image_emb, text_emb = tall(torch.randn(2, 3, 64, 32), ids, mask)
    assert image_emb.shape == text_emb.shape == (2, 24)
    torch.testing.assert_close(text_emb.norm(dim=-1), torch.ones(2))

    with pytest.raises(ValueError, match="text length"):
        build_dual_encoder(cfg, image_size=(64, 32), **{**kwargs, "text_length": 17})
    with pytest.raises(ValueError, match="tokenizer"):
        build_dual_encoder(cfg, image_size=(64, 32), **{**kwargs, "vocab_size": 10_000})


def test_legacy_eos_2_config_still_pools_at_the_tokenizer_eos(tmp_path):
    # Old OpenAI configs say eos_token_id=2, which makes HF pool at argmax(input_ids): right only
    # when eos is the largest id. Here bos is the largest id, so HF's pooler reads the bos
    # position; the DualEncoder pools at the tokenizer's eos regardless of the config.
    write_tiny_clip_tokenizer(tmp_path / "tok", eos_last=False)
    tok = load_tokenizer(tmp_path / "tok")
    assert tok.bos_id == tok.vocab_size - 1
    _save_pretrained_clip(tmp_path / "clip", tok, eos_token_id=2)
    enc = build_dual_encoder(ModelConfig(pretrained=str(tmp_path / "clip")),
                             vocab_size=tok.vocab_size, pad_id=tok.pad_id, bos_id=tok.bos_id,
                             eos_id=tok.eos_id, text_length=16, image_size=(64, 32)).eval()
    ids, mask, _ = tok.encode(["A red man", "a woman in a red coat"], 16)
    junk = ids.clone()
    junk[mask == 0] = tok.bos_id
    with torch.no_grad():  # float32 forwards, compared at float32's assert_close defaults
        ours = enc.encode_text(ids, mask)
        torch.testing.assert_close(enc.encode_text(junk, mask), ours)
        out = enc.clip.text_model(input_ids=ids, attention_mask=mask)
        eos_pos = mask.sum(dim=1) - 1
        expected = enc.clip.text_projection(out.last_hidden_state[torch.arange(2), eos_pos])
        torch.testing.assert_close(ours, torch.nn.functional.normalize(expected, dim=-1))
        torch.testing.assert_close(out.pooler_output, out.last_hidden_state[:, 0])  # HF: bos


def test_encode_with_tokens_matches_the_embeddings_in_one_forward_per_tower():
    enc, tok = _tiny()
    ids, mask, _ = tok.encode(CAPTIONS, 12)
    images = torch.randn(4, 3, 64, 32)
    calls = {"vision": 0, "text": 0}
    hooks = [tower.register_forward_hook(lambda *_, name=name: calls.__setitem__(
                 name, calls[name] + 1))
             for name, tower in (("vision", enc.clip.vision_model),
                                 ("text", enc.clip.text_model))]
    with torch.no_grad():
        image_emb, text_emb, image_tokens, text_tokens = enc.encode_with_tokens(images, ids, mask)
    assert calls == {"vision": 1, "text": 1}
    for hook in hooks:
        hook.remove()
    assert image_tokens.shape == (4, 1 + 8 * 4, 32) and text_tokens.shape == (4, 12, 32)
    # float32 forwards repeated through other entry points: float32 assert_close defaults
    with torch.no_grad():
        torch.testing.assert_close(image_emb, enc.encode_image(images))
        torch.testing.assert_close(text_emb, enc.encode_text(ids, mask))
        vision = enc.clip.vision_model(pixel_values=images)
        text = enc.clip.text_model(input_ids=ids, attention_mask=mask)
    # every token gets the post-layernorm that the pooled (class) token gets
    torch.testing.assert_close(image_tokens[:, 0], vision.pooler_output)
    torch.testing.assert_close(image_tokens,
                               enc.clip.vision_model.post_layernorm(vision.last_hidden_state))
    torch.testing.assert_close(text_tokens, text.last_hidden_state)


def test_frozen_token_embeddings_stay_as_loaded_while_the_rest_trains():
    tok = WordTokenizer.build(CAPTIONS)
    torch.manual_seed(0)
    enc = build_dual_encoder(ModelConfig(**{**SMALL.__dict__, "freeze_token_embeddings": True}),
                             vocab_size=tok.vocab_size, pad_id=tok.pad_id, bos_id=tok.bos_id,
                             eos_id=tok.eos_id, text_length=12, image_size=(64, 32))
    table = enc.clip.text_model.embeddings.token_embedding.weight
    before = {n: p.detach().clone() for n, p in enc.named_parameters()}
    optimizer = torch.optim.AdamW([p for p in enc.parameters() if p.requires_grad], lr=1e-2)
    ids, mask, _ = tok.encode(CAPTIONS, 12)
    image_emb, text_emb = enc(torch.randn(4, 3, 64, 32), ids, mask)
    (image_emb @ text_emb.t()).sum().backward()
    optimizer.step()
    assert not table.requires_grad and table.grad is None
    assert torch.equal(table, before["clip.text_model.embeddings.token_embedding.weight"])
    position = "clip.text_model.embeddings.position_embedding.weight"
    assert not torch.equal(dict(enc.named_parameters())[position], before[position])
