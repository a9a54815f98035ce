"""The CPU stand-in for CLIP (experiments/pretrain_standin.py): its tokenizer conversion, that the
folder loads like a real CLIP folder (Hugging Face and the project's own loader), determinism
and the cache. Builds use tiny settings (a few seconds each)."""

from __future__ import annotations

import functools
import html
import json
import os
import shutil

import pytest
import regex
import torch

from experiments import clip_bpe, pretrain_standin
from experiments.standin_corpus import colour_table, make_item

TINY = ["--corpus-size", "48", "--heldout-size", "12", "--steps", "2", "--batch-size", "8",
        "--hidden-size", "16", "--num-layers", "1", "--num-heads", "2", "--projection-dim",
        "16", "--warmup-steps", "1", "--captions-per-image", "2"]
CAPTIONS = [
    "a photo of a cat",
    "A woman in a crimson coat, carrying a navy-blue backpack.",
    "The man's jacket is    OLIVE green; he wears 2 white sneakers & a robin's egg blue cap!",
    "Café au lait t-shirt (size M) -- 100% cotton, naïve print: <3",
    "She'll have the fuchsia tote; they've got denim pants, he'd wear ivory.",
]


@functools.lru_cache(maxsize=1)
def merges_text() -> str:
    """OpenAI's merges file, obtained exactly as the build obtains it."""
    return clip_bpe.load_merges_text()


class ReferenceTokenizer:
    """OpenAI's SimpleTokenizer (CLIP's simple_tokenizer.py), built from the merges file.
    ftfy.fix_text is left out: it changes none of the captions below."""

    def __init__(self, text: str):
        merges = [tuple(m.split()) for m in text.split("\n")[1:49152 - 256 - 2 + 1]]
        vocab = list(clip_bpe.bytes_to_unicode().values())
        vocab = vocab + [v + "</w>" for v in vocab] + ["".join(m) for m in merges]
        vocab += ["<|startoftext|>", "<|endoftext|>"]
        self.encoder = {token: i for i, token in enumerate(vocab)}
        self.ranks = {m: i for i, m in enumerate(merges)}
        self.byte_encoder = clip_bpe.bytes_to_unicode()
        self.pat = regex.compile(r"""<\|startoftext\|>|<\|endoftext\|>|'s|'t|'re|'ve|'m|'ll|'d|"""
                                 r"""[\p{L}]+|[\p{N}]|[^\s\p{L}\p{N}]+""", regex.IGNORECASE)

    def bpe(self, token: str) -> list[str]:
        word = tuple(token[:-1]) + (token[-1] + "</w>",)
        while len(word) > 1:
            pairs = {(word[i], word[i + 1]) for i in range(len(word) - 1)}
            best = min(pairs, key=lambda p: self.ranks.get(p, float("inf")))
            if best not in self.ranks:
                break
            merged, i = [], 0
            while i < len(word):
                if i < len(word) - 1 and (word[i], word[i + 1]) == best:
                    merged.append(word[i] + word[i + 1])
                    i += 2
                else:
                    merged.append(word[i])
                    i += 1
            word = tuple(merged)
        return list(word)

    def encode(self, text: str) -> list[int]:
        text = " ".join(html.unescape(html.unescape(text)).split()).strip().lower()
        ids = [self.encoder["<|startoftext|>"]]
        for token in regex.findall(self.pat, text):
            token = "".join(self.byte_encoder[b] for b in token.encode("utf-8"))
            ids += [self.encoder[t] for t in self.bpe(token)]
        return ids + [self.encoder["<|endoftext|>"]]


def test_converted_tokenizer_matches_openai_clip(tmp_path):
    from transformers import AutoTokenizer

    from gckd_ray.data.tokenizer import load_tokenizer

    text = merges_text()
    written = clip_bpe.write_tokenizer(tmp_path, text)
    assert sorted(written) == sorted(p.name for p in tmp_path.iterdir())
    vocab = json.loads((tmp_path / "vocab.json").read_text())
    assert len(vocab) == 49408 and sorted(vocab.values()) == list(range(49408))
    assert vocab["<|startoftext|>"] == 49406 and vocab["<|endoftext|>"] == 49407
    assert (tmp_path / "merges.txt").read_text().startswith("#version: 0.2\n")

    hf = AutoTokenizer.from_pretrained(str(tmp_path), local_files_only=True)
    assert (hf.bos_token_id, hf.eos_token_id, hf.pad_token_id, len(hf)) == (49406, 49407, 49407,
                                                                         49408)
    # Published ids (OpenAI's README and the Hugging Face CLIP docs).
    assert hf("a photo of a cat")["input_ids"] == [49406, 320, 1125, 539, 320, 2368, 49407]
    assert hf("a diagram")["input_ids"] == [49406, 320, 22697, 49407]
    reference = ReferenceTokenizer(text)
    corpus = [c for i in range(6) for c in make_item(0, 0, i, 2).captions]
    project = load_tokenizer(tmp_path)  # what training reads the folder with
    for caption in CAPTIONS + corpus:
        expected = reference.encode(caption)
        assert hf(caption)["input_ids"] == expected, caption
        ids, mask, truncated = project.encode([caption], 77)
        assert ids[0, :int(mask.sum())].tolist() == expected and truncated == 0


def test_merges_source_rejects_a_file_that_is_not_openais(tmp_path):
    bad = tmp_path / "merges.txt"
    bad.write_text("#version: 0.2\nh e\n")
    with pytest.raises(clip_bpe.BPESourceError, match="not OpenAI's CLIP merges"):
        clip_bpe.load_merges_text(bad)
    with pytest.raises(clip_bpe.BPESourceError, match="not found"):
        clip_bpe.load_merges_text(tmp_path / "missing.whl")


def test_colour_table_names_and_basic_terms():
    table = {c.name: c for c in colour_table()}
    assert len(table) > 900
    for name, basic in (("crimson", "red"), ("navy", "blue"), ("teal", "green"),
                        ("lilac", "purple"), ("silver", "grey"), ("coffee", "brown"),
                        ("dark slate blue", "blue"), ("white smoke", "white")):
        assert table[name].basic == basic, name
    assert not any("shit" in name or "puke" in name for name in table)


def _build(out, *extra) -> tuple[int, dict]:
    code = pretrain_standin.main(["--out", str(out), *TINY, *extra])
    manifest = json.loads((out / pretrain_standin.MANIFEST).read_text()) if code == 0 else {}
    return code, manifest


@pytest.fixture(scope="module")
def standin(tmp_path_factory):
    out = tmp_path_factory.mktemp("standin") / "clip"
    code, manifest = _build(out)
    assert code == 0
    return out, manifest


def test_folder_loads_like_a_real_clip_folder(standin):
    from transformers import AutoTokenizer, CLIPModel

    out, manifest = standin
    names = {p.name for p in out.iterdir()}
    assert {"config.json", "model.safetensors", "vocab.json", "merges.txt",
            "tokenizer_config.json", "special_tokens_map.json", "standin.json"} <= names
    model = CLIPModel.from_pretrained(str(out), local_files_only=True)
    text_config = model.config.text_config
    assert (text_config.vocab_size, text_config.max_position_embeddings) == (49408, 77)
    assert (text_config.bos_token_id, text_config.eos_token_id,
            text_config.pad_token_id) == (49406, 49407, 49407)
    assert model.config.projection_dim == 16
    tokenizer = AutoTokenizer.from_pretrained(str(out), local_files_only=True)
    assert tokenizer("a red coat")["input_ids"][0] == 49406
    assert manifest["summary"]["final_loss"] > 0


def test_project_loader_uses_the_standin(standin):
    """model.pretrained=DIR with no other change: the project's tokenizer and dual encoder;
    the encoder's build-time position resampling equals the per-forward resampling the
    stand-in was pretrained with."""
    from transformers import CLIPModel

    from gckd_ray.config import load_config
    from gckd_ray.data.tokenizer import load_tokenizer
    from gckd_ray.data.transforms import normalize
    from gckd_ray.model.retriever import build_encoder

    out, _ = standin
    cfg = load_config(None, [f"model.pretrained={out}", "data.text_length=77"])
    tokenizer = load_tokenizer(out)
    encoder = build_encoder(cfg, tokenizer).eval()
    images = torch.randint(0, 256, (2, 3, cfg.data.image_height, cfg.data.image_width),
                           dtype=torch.uint8)
    ids, mask, _ = tokenizer.encode(["a man in a crimson coat", "a woman in blue jeans"], 77)
    with torch.no_grad():
        image_emb, text_emb = encoder(normalize(images), ids, mask)
        clip = CLIPModel.from_pretrained(str(out), local_files_only=True).eval()
        reference_image = pretrain_standin.embed_images(clip, normalize(images))
        reference_text = pretrain_standin.embed_texts(clip, ids, mask)
    assert image_emb.shape == text_emb.shape == (2, 16)
    torch.testing.assert_close(image_emb, reference_image, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(text_emb, reference_text, atol=1e-5, rtol=1e-5)


def test_same_seed_same_weights(standin, tmp_path):
    out, manifest = standin
    code, again = _build(tmp_path / "again")
    assert code == 0
    assert again["files"] == manifest["files"]  # every file, the weights included, identical


def test_cache_rebuild_and_refusal(standin, tmp_path, capsys):
    out, manifest = standin
    mtimes = {p.name: p.stat().st_mtime_ns for p in out.iterdir()}
    capsys.readouterr()
    assert pretrain_standin.main(["--out", str(out), *TINY]) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("stand-in cached:")
    assert {p.name: p.stat().st_mtime_ns for p in out.iterdir()} == mtimes

    # a changed file: one warning line, then a rebuild that restores the same weights
    copy = tmp_path / "copy"
    shutil.copytree(out, copy)
    with open(copy / "model.safetensors", "r+b") as f:
        f.seek(-4, os.SEEK_END)
        f.write(b"\x00\x01\x02\x03")
    capsys.readouterr()
    code, rebuilt = _build(copy)
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 0 and len(err) == 1 and err[0].startswith("warning:")
    assert "model.safetensors has changed" in err[0]
    assert rebuilt["files"] == manifest["files"]
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no leftovers

    # other settings: rebuilt, the warning names the change
    code, other = _build(copy, "--seed", "1")
    assert code == 0 and "seed 0 -> 1" in capsys.readouterr().err
    assert other["files"]["model.safetensors"] != manifest["files"]["model.safetensors"]

    # a folder this command did not write is refused and left alone
    foreign = tmp_path / "foreign"
    foreign.mkdir()
    (foreign / "notes.txt").write_text("keep me")
    assert pretrain_standin.main(["--out", str(foreign), *TINY]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("data error:") and "not a stand-in" in err[0]
    assert [p.name for p in foreign.iterdir()] == ["notes.txt"]
