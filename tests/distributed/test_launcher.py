"""Driver-side preparation: the tokenizer a run trains with (lexical bridge only for GCKD,
as word aliases beside a CLIP folder's tokenizer files), written once per run (a CLIP folder's
tokenizer files only, never its weights), and a resume from a changed
pretrained folder refused in one line before Ray starts."""

from __future__ import annotations

import json

import pytest

from gckd_ray.checkpoint_format import CheckpointError, folder_reference, folder_sha256
from gckd_ray.data.datasets import load_records
from gckd_ray.data.tokenizer import CLIPBPETokenizer, load_tokenizer, split_words
from gckd_ray.distributed.launcher import prepare_tokenizer
from gckd_ray.train import main as train_main
from helpers import SYNTH_SCALE, write_tiny_clip


def _prepare(cfg):
    cfg = cfg.with_absolute_paths()
    target = load_records(cfg, cfg.data.target, "train").records
    return load_tokenizer(prepare_tokenizer(cfg, target)), cfg


def test_gckd_tokenizer_aliases_target_only_words_to_source_words(tiny_config, capsys):
    tok, cfg = _prepare(tiny_config("method=gckd"))
    source = {w for r in load_records(cfg, cfg.data.source, "train").records
              for w in split_words(r.caption)}
    assert tok.aliases
    assert all(w not in source and a in source for w, a in tok.aliases.items())
    assert f"vocabulary bridge: {len(tok.aliases)} target-only words" in capsys.readouterr().out


def test_bridge_is_off_for_baselines_and_when_disabled(tiny_config):
    for overrides in (["method=source_only"], ["method=oracle"],
                      ["method=gckd", "gckd.vocab_bridge=false"]):
        tok, _ = _prepare(tiny_config(*overrides))
        assert tok.aliases == {}, overrides


def test_a_clip_folder_gives_the_run_its_tokenizer_files_only_once(tiny_config, tmp_path):
    write_tiny_clip(tmp_path / "clip")
    cfg = tiny_config(f"model.pretrained={tmp_path / 'clip'}").with_absolute_paths()
    out = prepare_tokenizer(cfg, [])
    assert out == tmp_path / "run" / "tokenizer"
    assert sorted(p.name for p in out.iterdir()) == ["merges.txt", "vocab.json"]
    assert isinstance(load_tokenizer(out), CLIPBPETokenizer)
    before = out.stat().st_mtime_ns
    assert prepare_tokenizer(cfg, [], expected=folder_sha256(out)) == out
    assert out.stat().st_mtime_ns == before  # the same tokenizer: left as it was
    with pytest.raises(CheckpointError, match="the tokenizer built for this run .* differs "
                                              "from the one the checkpoint to resume was "
                                              "trained with"):
        prepare_tokenizer(cfg, [], expected="0" * 64)
    assert folder_sha256(out) != "0" * 64 and sorted(p.name for p in out.parent.iterdir()) == [
        "tokenizer"]  # refused before replacing anything; no temporary left


def test_a_clip_folder_gets_the_bridge_as_word_aliases_under_gckd_only(tiny_config, tmp_path):
    write_tiny_clip(tmp_path / "clip")
    gckd, cfg = _prepare(tiny_config("method=gckd", f"model.pretrained={tmp_path / 'clip'}"))
    source = {w for r in load_records(cfg, cfg.data.source, "train").records
              for w in split_words(r.caption)}
    assert isinstance(gckd, CLIPBPETokenizer) and gckd.aliases
    assert all(w not in source and a in source for w, a in gckd.aliases.items())
    assert (tmp_path / "run" / "tokenizer" / "word_aliases.json").is_file()
    word, alias = next(iter(gckd.aliases.items()))
    assert gckd.rewrite(f"a {word} coat") == f"a {alias} coat"
    baseline, _ = _prepare(tiny_config("method=source_only", f"run.output_dir={tmp_path / 'so'}",
                                       f"model.pretrained={tmp_path / 'clip'}"))
    assert baseline.aliases == {} and not (tmp_path / "so" / "tokenizer" /
                                           "word_aliases.json").exists()


def test_resume_with_a_changed_pretrained_folder_stops_in_one_line_before_ray(
        synth_cache, tmp_path, capsys):
    clip, out = tmp_path / "clip", tmp_path / "run"
    write_tiny_clip(clip)
    trained_from = folder_reference(clip)
    ckpt = out / "ray" / "train-1" / "checkpoint_2026-12-01_10-00-00.000000"
    ckpt.mkdir(parents=True)
    (out / "ray" / "LATEST").write_text("train-1")
    (ckpt / "state.json").write_text(json.dumps({
        "epoch": 1, "history": [], "format": 3,
        "references": {"tokenizer": None, "pretrained": trained_from}}))
    write_tiny_clip(clip, seed=2)  # the folder's weights change after the checkpoint
    args = [f"data.synth_cache={synth_cache}", f"data.synth_scale={SYNTH_SCALE}",
            f"run.output_dir={out}", "run.resume=true", f"model.pretrained={clip}",
            "method=source_only", "train.epochs=2", "train.batch_size=16",
            "data.image_height=32", "data.image_width=32", "data.text_length=16"]
    capsys.readouterr()  # save_pretrained's progress bars
    assert train_main(args) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == [f"checkpoint error: model.pretrained {clip} has changed since {ckpt} was "
                   f"saved: its files' sha256 is {folder_sha256(clip)}, the checkpoint was "
                   f"trained from sha256 {trained_from['sha256']} (then at {clip}); restore "
                   "that folder, or start a new run (run.resume=false or another "
                   "run.output_dir)"]
    assert not (out / "tokenizer").exists()  # stopped before the run wrote anything
