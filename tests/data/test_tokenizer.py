"""Tokenizers: vocabulary, sequence layout, truncation, save/load, and eos pooling in HF CLIP."""

from __future__ import annotations

import json
import os

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")

from helpers import write_tiny_clip_tokenizer
from gckd_ray.data.tokenizer import (  # noqa: E402
    WORD_ALIASES_FILE, WORD_VOCAB_FILE, CLIPBPETokenizer, Tokenizer, WordTokenizer,
    copy_tokenizer_files, load_tokenizer, split_words)

CAPTIONS = [
    "A man in a red coat.",
    "The man wears black shoes, and a red bag.",
    "A woman with a blue skirt",
]


def test_split_words_lowercases_and_splits_punctuation():
    assert split_words("A Red-coat, OK.") == ["a", "red", "-", "coat", ",", "ok", "."]


def test_build_is_deterministic_and_ordered_by_count_then_word():
    tok = WordTokenizer.build(CAPTIONS)
    assert (tok.pad_id, tok.bos_id, tok.unk_id, tok.eos_id) == (0, 1, 2, 3)
    # counts: a=4, man=2, red=2, .=2; the rest once, alphabetical
    assert tok.words[:4] == ["a", ".", "man", "red"]
    assert tok.words[4:] == sorted(tok.words[4:])
    assert tok.vocab_size == 4 + len(tok.words)
    assert WordTokenizer.build(reversed(CAPTIONS)).words == tok.words
    assert isinstance(tok, Tokenizer)


def test_build_min_count_drops_rare_words():
    tok = WordTokenizer.build(CAPTIONS, min_count=2)
    assert tok.words == ["a", ".", "man", "red"]


def test_encode_layout_mask_and_unknown_words():
    tok = WordTokenizer.build(CAPTIONS)
    ids, mask, truncated = tok.encode(["A red UFO", ""], 6)
    assert ids.dtype == torch.int64 and mask.dtype == torch.int64
    assert ids.shape == mask.shape == (2, 6)
    a, red = tok.words.index("a") + 4, tok.words.index("red") + 4
    assert ids[0].tolist() == [tok.bos_id, a, red, tok.unk_id, tok.eos_id, tok.pad_id]
    assert mask[0].tolist() == [1, 1, 1, 1, 1, 0]
    assert ids[1].tolist() == [tok.bos_id, tok.eos_id, 0, 0, 0, 0]
    assert mask[1].tolist() == [1, 1, 0, 0, 0, 0]
    assert truncated == 0


def test_truncation_keeps_eos_last_and_is_counted():
    tok = WordTokenizer.build(CAPTIONS)
    ids, mask, truncated = tok.encode(CAPTIONS, 5)
    assert truncated == 3  # 7, 11 and 6 tokens > 3 slots
    assert (ids[:, -1] == tok.eos_id).all() and (mask == 1).all()
    assert ids[0].tolist() == tok.encode([" ".join(split_words(CAPTIONS[0])[:3])], 5)[0][0].tolist()
    _, _, truncated = tok.encode(["a man in"], 5)  # exactly fits: bos + 3 + eos
    assert truncated == 0
    with pytest.raises(ValueError, match="length"):
        tok.encode(["a"], 1)


def test_save_load_round_trip_is_json(tmp_path):
    tok = WordTokenizer.build(CAPTIONS)
    tok.save(tmp_path)
    payload = json.loads((tmp_path / WORD_VOCAB_FILE).read_text())
    assert payload["words"] == tok.words
    loaded = load_tokenizer(tmp_path)
    assert isinstance(loaded, WordTokenizer)
    assert loaded.words == tok.words and loaded.vocab_size == tok.vocab_size
    for a, b in zip(loaded.encode(CAPTIONS, 8), tok.encode(CAPTIONS, 8)):
        assert torch.equal(a, b) if isinstance(a, torch.Tensor) else a == b


def test_aliases_encode_as_their_word_and_survive_save_load(tmp_path):
    tok = WordTokenizer.build(CAPTIONS + ["a crimson coat"], aliases={"crimson": "red"})
    assert tok.token_ids("a crimson coat") == tok.token_ids("a red coat")
    tok.save(tmp_path)
    loaded = load_tokenizer(tmp_path)
    assert loaded.aliases == {"crimson": "red"}
    assert loaded.token_ids("crimson") == tok.token_ids("red")
    # An old vocabulary file without aliases still loads.
    payload = json.loads((tmp_path / WORD_VOCAB_FILE).read_text())
    del payload["aliases"]
    (tmp_path / WORD_VOCAB_FILE).write_text(json.dumps(payload))
    assert WordTokenizer.load(tmp_path).aliases == {}


def test_bad_aliases_are_refused():
    with pytest.raises(ValueError, match="ufo"):
        WordTokenizer.build(CAPTIONS, aliases={"crimson": "ufo"})
    with pytest.raises(ValueError, match="not aliases"):    # no chains
        WordTokenizer.build(CAPTIONS, aliases={"crimson": "red", "red": "blue"})


def test_load_errors_name_the_file(tmp_path):
    with pytest.raises(FileNotFoundError, match=str(tmp_path)):
        load_tokenizer(tmp_path)
    (tmp_path / WORD_VOCAB_FILE).write_text('{"format": "something else"}')
    with pytest.raises(ValueError, match=WORD_VOCAB_FILE):
        WordTokenizer.load(tmp_path)
    WordTokenizer.build(CAPTIONS).save(tmp_path)
    payload = json.loads((tmp_path / WORD_VOCAB_FILE).read_text())
    (tmp_path / WORD_VOCAB_FILE).write_text(json.dumps({**payload, "aliases": {"x": "ufo"}}))
    with pytest.raises(ValueError, match=f"{WORD_VOCAB_FILE}.*ufo"):
        WordTokenizer.load(tmp_path)
    (tmp_path / WORD_VOCAB_FILE).write_text(json.dumps({**payload, "aliases": ["x"]}))
    with pytest.raises(ValueError, match="'aliases' must map"):
        WordTokenizer.load(tmp_path)


def test_clip_bpe_tokenizer_layout_and_round_trip(tmp_path):
    write_tiny_clip_tokenizer(tmp_path / "src")
    tok = load_tokenizer(tmp_path / "src")
    assert isinstance(tok, CLIPBPETokenizer) and isinstance(tok, Tokenizer)
    assert tok.vocab_size == 2 * 94 + 4 + 2
    assert tok.pad_id == tok.eos_id  # CLIP pads with <|endoftext|>
    ids, mask, truncated = tok.encode(["A red man", "a man in a red coat with a bag"], 8)
    red, man = tok.hf.convert_tokens_to_ids(["red</w>", "man</w>"])
    assert ids[0].tolist() == [tok.bos_id, tok.hf.convert_tokens_to_ids("a</w>"), red, man,
                               tok.eos_id, tok.pad_id, tok.pad_id, tok.pad_id]
    assert mask[0].tolist() == [1, 1, 1, 1, 1, 0, 0, 0]
    assert truncated == 1 and ids[1, -1] == tok.eos_id and mask[1].all()

    tok.save(tmp_path / "saved")
    again = load_tokenizer(tmp_path / "saved")
    assert isinstance(again, CLIPBPETokenizer)
    assert torch.equal(again.encode(["A red man"], 8)[0], ids[:1])


def test_clip_bpe_bridge_rewrites_whole_aliased_words_and_travels_with_the_folder(tmp_path):
    """GCKD's lexical bridge on CLIP's BPE: an aliased word is tokenized as its alias, any
    case, only as a whole word; the aliases are saved beside the tokenizer files, copied with
    them, and a folder without them tokenizes plainly."""
    write_tiny_clip_tokenizer(tmp_path / "src")
    plain = load_tokenizer(tmp_path / "src")
    bridged = CLIPBPETokenizer(tmp_path / "src", {"Crimson": "red", "guy": "man"})
    expected = plain.encode(["a red man", "a crimsonred man"], 12)[0]
    assert torch.equal(bridged.encode(["a CRIMSON guy", "a crimsonred guy"], 12)[0], expected)
    assert not torch.equal(plain.encode(["a crimson guy"], 12)[0], expected[:1])

    bridged.save(tmp_path / "saved")
    assert json.loads((tmp_path / "saved" / WORD_ALIASES_FILE).read_text()) == {
        "crimson": "red", "guy": "man"}
    assert WORD_ALIASES_FILE in copy_tokenizer_files(tmp_path / "saved", tmp_path / "copy")
    again = load_tokenizer(tmp_path / "copy")
    assert torch.equal(again.encode(["a crimson guy"], 12)[0], expected[:1])
    plain.save(tmp_path / "plain")
    assert not (tmp_path / "plain" / WORD_ALIASES_FILE).exists()


def test_word_tokenizer_ids_make_hf_clip_pool_at_eos():
    # HF's CLIPTextModel pools at argmax(input_ids) when eos_token_id == 2 and at the first eos
    # otherwise; our eos (3) takes the second branch, so HF's pooled output is the eos state.
    from transformers import CLIPTextConfig, CLIPTextModel

    tok = WordTokenizer.build(CAPTIONS)
    assert tok.eos_id != 2
    torch.manual_seed(0)
    model = CLIPTextModel(CLIPTextConfig(
        vocab_size=tok.vocab_size, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
        num_attention_heads=2, max_position_embeddings=12, pad_token_id=tok.pad_id,
        bos_token_id=tok.bos_id, eos_token_id=tok.eos_id)).eval()
    ids, mask, _ = tok.encode(CAPTIONS, 12)
    with torch.no_grad():
        out = model(input_ids=ids, attention_mask=mask)
    eos_pos = mask.sum(dim=1) - 1
    assert (ids[torch.arange(3), eos_pos] == tok.eos_id).all()
    expected = out.last_hidden_state[torch.arange(3), eos_pos]
    torch.testing.assert_close(out.pooler_output, expected)


def test_copy_tokenizer_files_takes_the_tokenizer_and_never_the_weights(tmp_path):
    clip = tmp_path / "clip"
    write_tiny_clip_tokenizer(clip)
    (clip / "model.safetensors").write_bytes(b"weights")
    (clip / "config.json").write_text("{}")
    (clip / "tokenizer_config.json").write_text("{}")
    assert copy_tokenizer_files(clip, tmp_path / "tok") == [
        "vocab.json", "merges.txt", "tokenizer_config.json"]
    assert sorted(p.name for p in (tmp_path / "tok").iterdir()) == [
        "merges.txt", "tokenizer_config.json", "vocab.json"]
    assert isinstance(load_tokenizer(tmp_path / "tok"), CLIPBPETokenizer)
    WordTokenizer.build(CAPTIONS).save(tmp_path / "words")
    assert copy_tokenizer_files(tmp_path / "words", tmp_path / "w2") == [WORD_VOCAB_FILE]
    with pytest.raises(FileNotFoundError, match="no tokenizer files"):
        copy_tokenizer_files(tmp_path / "w2" / "missing", tmp_path / "w3")
