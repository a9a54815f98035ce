"""Driver-side preparation: the tokenizer a run trains with (lexical bridge only for GCKD)."""

from __future__ import annotations

from gckd_ray.data.datasets import load_records
from gckd_ray.data.tokenizer import load_tokenizer, split_words
from gckd_ray.distributed.launcher import prepare_tokenizer


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
