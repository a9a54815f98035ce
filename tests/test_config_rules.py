"""Cross-key rules: each rule's message and severity, the CLIs stop before Ray and before
writing anything, and the README's table is the generated one."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from gckd_ray import config_rules
from gckd_ray.config import ConfigError, load_config
from gckd_ray.train import main as train_main
from gckd_ray.tune import main as tune_main

ROOT = Path(__file__).resolve().parents[1]


def _cfg(*overrides: str):
    return load_config(None, list(overrides))


def _stderr_line(capsys) -> str:
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1, err  # one line, no traceback
    return err[0]


@pytest.mark.parametrize("main, args, message", [
    (train_main, ["train.epochs=3"],
     "config error: gckd.warmup_epochs=10 >= train.epochs=3: method=gckd would train "
     "source-only for all 3 epoch(s) and never adapt; set gckd.warmup_epochs=2"),
    (tune_main, ["--num-samples", "4", "train.epochs=2"],
     "config error: gckd.warmup_epochs=10 >= train.epochs=2"),
    (tune_main, ["train.epochs=12", "graph.enabled=false"],
     "config error: tune.search_space sweeps keys that cannot act in these trials, so they "
     "would differ in name only: graph.k (graph.enabled=false)"),
    (train_main, ["model.freeze_token_embeddings=true"],
     "config error: model.freeze_token_embeddings=true without model.pretrained would freeze "
     "the tiny CLIP's random token embeddings"),
    (tune_main, ["train.epochs=12", "distill.mode=mnf_csc"],
     "distill.tau_s (distill.mode is not cmkd and loss.weights.i2i=0); distill.tau_t "
     "(distill.mode is not cmkd and loss.weights.i2i=0); distill.alpha (distill.mode is not "
     "cmkd and loss.weights.i2i=0)"),
    (tune_main, ["train.epochs=12", "method=source_only", "tune.search_space={graph.k: {grid: "
                 "[5, 10]}, train.lr: {loguniform: [0.001, 0.01]}}"],
     "graph.k (method is source_only or oracle (no adaptation phase))"),
    (tune_main, ["train.epochs=12", "tune.num_samples=3",
                 "tune.search_space={train.lr: {grid: [0.001, 0.002]}}"],
     "config error: tune.num_samples=3 with a grid-only search space runs each of its 2 "
     "points 3 times with the same run.seed: identical deterministic trials"),
    (tune_main, ["--oracle-metric", "train.epochs=12", "train.eval_every=2"],
     "config error: tune.oracle_metric ranks trials by target test R1 at every ASHA rung, but "
     "train.eval_every=2 scores the test split only on some epochs; set train.eval_every=1"),
])
def test_contradictions_stop_the_command_with_one_line_before_anything_is_written(
        main, args, message, tmp_path, capsys):
    out = tmp_path / "run"
    assert main([*args, f"run.output_dir={out}"]) == 2
    line = _stderr_line(capsys)
    assert line.startswith("config error: ") and message.removeprefix("config error: ") in line
    assert not out.exists()


def test_the_cli_stops_without_starting_ray():
    # A fresh interpreter: `ray` is imported by nothing before the rules refuse the config.
    code = ("import sys; from gckd_ray.train import main; rc = main(['train.epochs=3']); "
            "print('ray' in sys.modules); sys.exit(rc)")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          cwd=ROOT, timeout=60)
    assert done.returncode == 2 and done.stdout.strip() == "False"
    assert done.stderr.startswith("config error: ") and len(done.stderr.splitlines()) == 1


@pytest.mark.parametrize("overrides, command, expected", [
    (("train.epochs=3", "gckd.warmup_epochs=1"), "tune",
     "ASHA's first rung is at epoch 3 (tune.grace_epochs=2 after the warm-up), not before the "
     "last epoch (train.epochs=3)"),
    (("method=source_only", "graph.k=5", "distill.tau_s=0.1"), "train",
     "settings with no effect: graph.k=5 (method is source_only or oracle (no adaptation "
     "phase)); distill.tau_s=0.1 (method is source_only"),
    (("graph.enabled=false", "loss.weights.gmp=1.0"), "train",
     "settings with no effect: loss.weights.gmp=1 (graph.enabled=false)"),
    (("distill.mode=mnf_csc", "distill.alpha=0.5"), "train",
     "distill.alpha=0.5 (distill.mode is not cmkd and loss.weights.i2i=0)"),
    (("gckd.use_pseudo_ids=false", "gckd.pseudo_image_k=1"), "train",
     "gckd.pseudo_image_k=1 (gckd.use_pseudo_ids=false: no refresh runs)"),
    (("distill.mode=cmkd", "distill.csc_tau0=0.1"), "train",
     "distill.csc_tau0=0.1 (distill.mode is not mnf_csc)"),
    (("matching.enabled=false", "matching.rerank_top_k=5"), "train",
     "matching.rerank_top_k=5 (matching.enabled=false)"),
    (("loss.weights.sdm=0", "loss.sdm_temperature=0.05"), "train",
     "loss.sdm_temperature=0.05 (loss.weights.sdm=0)"),
    (("data.source.paired=true",), "train",
     "data.source.paired=true (always: the source is paired and labelled)"),
    (("run.stop_after_epochs=20",), "train",
     "run.stop_after_epochs=20 >= train.epochs=20: the run ends first"),
    (("train.warmup_epochs=20",), "train",
     "train.warmup_epochs=20 >= train.epochs=20: the learning rate never leaves its linear "
     "warm-up"),
    (("train.eval_every=21",), "train",
     "train.eval_every=21 > train.epochs=20: only the final evaluation of the target test "
     "split runs (as with train.eval_every=0)"),
    (("train.eval_every=21",), "tune", "train.eval_every=21 > train.epochs=20"),
])
def test_inert_settings_warn_with_one_line_each(overrides, command, expected, capsys):
    warnings = config_rules.enforce(_cfg(*overrides), command)
    assert len(warnings) == 1 and expected in warnings[0]
    assert _stderr_line(capsys) == f"warning: {warnings[0]}"


def test_a_valid_short_run_and_every_shipped_config_pass():
    assert config_rules.check(_cfg("train.epochs=2", "gckd.warmup_epochs=1"), "train") == ([], [])
    for every in (0, 1, 20):  # 0 = the last epoch only; 20 = the last epoch too: no warning
        assert config_rules.check(_cfg(f"train.eval_every={every}"), "train") == ([], [])
    assert config_rules.check(_cfg("tune.oracle_metric=true"), "tune") == ([], [])
    assert config_rules.check(_cfg(), "train") == ([], [])
    assert config_rules.check(_cfg(), "tune") == ([], [])  # the default sweep can act
    for path in sorted((ROOT / "experiments" / "configs").glob("*.yaml")):
        for command in config_rules.COMMANDS:
            assert config_rules.check(load_config(path), command) == ([], []), (path, command)


def test_the_first_error_is_raised_as_a_config_error():
    with pytest.raises(ConfigError, match=r"gckd.warmup_epochs=1 >= train.epochs=1.*"
                                          r"set train.epochs=2 gckd.warmup_epochs=1"):
        config_rules.enforce(_cfg("train.epochs=1", "gckd.warmup_epochs=1"), "train")
    with pytest.raises(ValueError, match="command must be one of"):
        config_rules.check(_cfg(), "evaluate-everything")


def test_readme_rules_table_is_the_generated_one():
    readme = (ROOT / "README.md").read_text()
    assert config_rules.with_rules_table(readme) == readme, \
        "README rules table is stale: python -m gckd_ray.config_rules --readme README.md"
