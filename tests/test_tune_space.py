"""The sweep's search space and ranking metric, parsed from config without Ray."""

import re

import pytest

from gckd_ray import tune_space
from gckd_ray.config import ConfigError, load_config


def _cfg(*overrides):
    return load_config(None, list(overrides))


def _space(text):
    return f"tune.search_space={text}"


def test_default_space_sweeps_temperatures_alpha_and_k():
    dims = tune_space.search_dimensions(_cfg())
    assert [(d.key, d.kind) for d in dims] == [
        ("distill.tau_s", "loguniform"), ("distill.tau_t", "loguniform"),
        ("distill.alpha", "uniform"), ("graph.k", "grid")]
    assert tune_space.num_trials(_cfg("tune.num_samples=3"), dims) == 6  # 2 grid points x 3


def test_nested_and_dotted_keys_are_the_same_space():
    nested = tune_space.search_dimensions(_cfg(_space("{graph: {k: {grid: [3, 5]}}}")))
    dotted = tune_space.search_dimensions(_cfg(_space("{graph.k: {grid: [3, 5]}}")))
    assert nested == dotted == [tune_space.Dimension("graph.k", "grid", (3, 5))]


def test_a_user_space_replaces_the_default_one():
    cfg = _cfg(_space("{graph.k: {choice: [4]}}"))
    assert cfg.tune.search_space == {"graph.k": {"choice": [4]}}


@pytest.mark.parametrize("space, message", [
    ("{graph.kk: {grid: [1]}}", "tune.search_space.graph.kk: not a config key"),
    ("{graph.k: {normal: [1, 2]}}", "tune.search_space.graph.k: must be one of"),
    ("{graph.k: [1, 2]}", "tune.search_space.graph.k: must be one of"),
    ("{graph.k: {grid: []}}", "tune.search_space.graph.k.grid: expected a non-empty list"),
    ("{distill.tau_s: {uniform: [0.2, 0.1]}}", "low < high"),
    ("{distill.tau_s: {loguniform: [0, 0.1]}}", "bounds must be > 0"),
    ("{graph.k: {uniform: [2, 8]}}", "graph.k is an integer key"),
    ("{graph.k: {randint: [2.5, 8]}}", "bounds must be integers"),
    ("{graph.k: {grid: [0, 4]}}", "value 0 is rejected: graph.k: must be > 0"),
    ("{distill.alpha: {grid: [0.5, 1.5]}}", "value 1.5 is rejected: distill.alpha"),
    ("{distill.tau_t: {choice: [fast]}}", "value 'fast' is rejected"),
    ("{run.seed: {grid: [0, 1]}}", "run.* keys cannot be swept"),
    ("{}", "tune.search_space: empty"),
])
def test_bad_search_spaces_name_the_entry(space, message):
    with pytest.raises(ConfigError, match=re.escape(message)):
        tune_space.search_dimensions(_cfg(_space(space)))


def test_ranking_metric_is_label_free_unless_oracle():
    assert tune_space.ranking_metric(_cfg()) == "target_mnn"
    assert tune_space.ranking_metric(_cfg("tune.oracle_metric=true")) == "R1"
    assert "label-free" in tune_space.describe_metric("target_mnn")
    assert "oracle" in tune_space.describe_metric("R1")


def test_first_rung_follows_the_gckd_warm_up():
    assert tune_space.first_rung(_cfg("gckd.warmup_epochs=10", "tune.grace_epochs=2")) == 12
    assert tune_space.first_rung(_cfg("method=source_only", "tune.grace_epochs=3")) == 3
