"""Sweep pieces without a cluster: Tune samplers, trial configs, ASHA, resources, the report."""

import csv
import json

import pytest
from PIL import Image

from gckd_ray import tune_space
from gckd_ray.config import ConfigError, load_config
from gckd_ray.distributed import sweep, sweep_report


def _cfg(*overrides):
    return load_config(None, list(overrides))


def _space(text):
    return f"tune.search_space={text}"


def test_param_space_builds_ray_tune_samplers():
    from ray.tune.search.sample import Categorical, Float, Integer

    dims = tune_space.search_dimensions(_cfg(_space(
        "{graph.k: {grid: [3, 5]}, distill.tau_s: {loguniform: [0.03, 0.2]}, "
        "distill.alpha: {uniform: [0.2, 0.6]}, graph.num_layers: {randint: [1, 3]}, "
        "distill.tau_t: {choice: [0.05, 0.1]}}")))
    space = sweep.param_space(dims)
    assert space["graph.k"] == {"grid_search": [3, 5]}
    assert isinstance(space["distill.tau_s"], Float) and space["distill.tau_s"].lower == 0.03
    assert isinstance(space["distill.alpha"], Float)
    assert isinstance(space["graph.num_layers"], Integer)
    assert isinstance(space["distill.tau_t"], Categorical)
    for _ in range(20):  # the log-uniform sampler stays in its bounds
        assert 0.03 <= space["distill.tau_s"].sample() <= 0.2


def test_trial_config_applies_values_in_its_own_resumable_folder(tmp_path):
    base = _cfg(f"run.output_dir={tmp_path}")
    cfg = sweep.trial_config(base, {"graph.k": 7, "distill.tau_s": 0.05}, "abc_00001")
    assert (cfg.graph.k, cfg.distill.tau_s) == (7, 0.05)
    assert cfg.run.output_dir == str(tmp_path / "trials" / "abc_00001")
    assert cfg.run.resume and not base.run.resume


def test_asha_waits_for_the_end_of_warm_up_and_lets_full_trials_finish():
    scheduler = sweep.asha(_cfg("train.epochs=30", "gckd.warmup_epochs=10",
                                "tune.grace_epochs=2", "tune.reduction_factor=2"))
    assert scheduler._max_t == 31  # a full-length trial is never stopped by ASHA itself
    assert sorted(milestone for milestone, _ in scheduler._brackets[0]._rungs) == [12, 24]
    source_only = sweep.asha(_cfg("method=source_only", "tune.grace_epochs=3"))
    assert min(m for m, _ in source_only._brackets[0]._rungs) == 3


def test_concurrency_from_cluster_cpus_and_a_clear_error_when_a_trial_cannot_fit():
    fits = _cfg("train.num_workers=2", "train.cpus_per_worker=1.0")
    assert sweep.concurrent_trials(fits, 2.0, local=True) == 1
    assert sweep.concurrent_trials(fits, 9.0, local=True) == 4
    assert sweep.concurrent_trials(_cfg("tune.max_concurrent_trials=3",
                                        "train.cpus_per_worker=0.5"), 8.0, local=True) == 3
    with pytest.raises(ConfigError, match=r"train\.cpus_per_worker: one trial needs 4 CPUs .* "
                                          r"this cluster has 2; .*train\.cpus_per_worker \(e\.g\. 1\)"):
        sweep.concurrent_trials(_cfg("train.num_workers=2", "train.cpus_per_worker=2.0"), 2.0,
                                local=True)
    # A joined (possibly autoscaling) cluster with no CPUs yet needs an explicit bound.
    with pytest.raises(ConfigError, match="tune.max_concurrent_trials"):
        sweep.concurrent_trials(fits, 0.0, local=False)
    assert sweep.concurrent_trials(_cfg("tune.max_concurrent_trials=2"), 0.0, local=False) == 2


def _rows():
    dims = tune_space.search_dimensions(_cfg(_space(
        "{graph.k: {grid: [5, 10]}, distill.tau_s: {loguniform: [0.03, 0.2]}}")))
    base = {"ranked_by": "target_mnn", "mAP": 20.0}
    rows = [
        {"trial_id": "t0", "graph.k": 5, "distill.tau_s": 0.05, "epochs": 4,
         "status": "completed", "selection": 3.0, "R1": 20.0, "target_mnn": 3.0, **base},
        {"trial_id": "t1", "graph.k": 10, "distill.tau_s": 0.1, "epochs": 2,
         "status": "stopped early (ASHA)", "selection": 9.0, "R1": 30.0, "target_mnn": 9.0,
         **base},
        {"trial_id": "t2", "graph.k": 10, "distill.tau_s": 0.04, "epochs": 4,
         "status": "completed", "selection": 5.0, "R1": 10.0, "target_mnn": 5.0, **base},
        {"trial_id": "t3", "graph.k": 5, "distill.tau_s": 0.15, "epochs": 0,
         "status": "error", "selection": None, "R1": None, "target_mnn": None, **base},
    ]
    for row in rows:
        row["mAP"] = row["R1"]
    return dims, rows


def test_best_trial_is_the_best_full_length_one_by_the_ranking_metric_not_r1():
    _, rows = _rows()
    assert sweep_report.best_row(rows)["trial_id"] == "t2"  # not t1 (stopped), not t0 (R1)
    early = [dict(r, status="stopped early (ASHA)") for r in rows]
    assert sweep_report.best_row(early)["trial_id"] == "t1"
    with pytest.raises(RuntimeError, match="no trial reported"):
        sweep_report.best_row([rows[3]])


def test_report_writes_csv_best_config_and_plot(tmp_path, capsys):
    dims, rows = _rows()
    base = _cfg(f"run.output_dir={tmp_path}", _space(
        "{graph.k: {grid: [5, 10]}, distill.tau_s: {loguniform: [0.03, 0.2]}}"))
    best_path = sweep_report.write_report(base, rows, dims)

    with open(tmp_path / "sweep.csv") as f:
        table = list(csv.DictReader(f))
    assert [r["trial_id"] for r in table] == ["t1", "t2", "t0", "t3"]  # by target_mnn
    assert {"graph.k", "distill.tau_s", "ranked_by", "selection", "R1", "mAP",
            "status"} <= set(table[0])
    assert {r["ranked_by"] for r in table} == {"target_mnn"}

    text = best_path.read_text()
    assert text.startswith("# Best trial t2") and "label-free" in text
    trained = load_config(best_path)  # what python -m gckd_ray.train --config reads
    assert (trained.graph.k, trained.distill.tau_s) == (10, 0.04)
    assert trained.run.output_dir == str(tmp_path / "best") and not trained.run.resume

    with Image.open(tmp_path / "sweep.png") as png:
        assert png.format == "PNG" and png.size[0] > 300
    out = capsys.readouterr().out
    assert "trials ranked by target_mnn (label-free" in out
    assert "best trial: t2 (completed) graph.k=10 distill.tau_s=0.04" in out


def test_oracle_ranking_is_named_in_every_output(tmp_path, capsys):
    dims, rows = _rows()
    rows = [dict(r, ranked_by="R1", selection=r["R1"]) for r in rows]
    base = _cfg(f"run.output_dir={tmp_path}", "tune.oracle_metric=true")
    best_path = sweep_report.write_report(base, rows, dims)
    assert sweep_report.best_row(rows)["trial_id"] == "t0"
    assert "oracle: target test labels" in best_path.read_text()
    assert "trials ranked by R1 (oracle" in capsys.readouterr().out
    with open(tmp_path / "sweep.csv") as f:
        assert {r["ranked_by"] for r in csv.DictReader(f)} == {"R1"}
    json.dumps(rows)  # rows stay plain data


def test_tied_selection_values_are_marked_and_the_best_config_says_so(tmp_path, capsys):
    dims, rows = _rows()
    rows[0]["selection"] = rows[2]["selection"]  # t0 ties with the best full-length t2
    base = _cfg(f"run.output_dir={tmp_path}", _space(
        "{graph.k: {grid: [5, 10]}, distill.tau_s: {loguniform: [0.03, 0.2]}}"))
    best_path = sweep_report.write_report(base, rows, dims)
    assert "A tie: trial(s) t2 have the same selection value" in best_path.read_text()
    out = capsys.readouterr().out
    tied = [line for line in out.splitlines() if "(tie)" in line]
    assert sorted(line.split()[0] for line in tied) == ["t0", "t2"]
    assert "best trial: t0" in out and "A tie: trial(s) t2" in out

    rows[0]["selection"] = 3.0  # no tie: nothing said
    sweep_report.write_report(base, rows, dims)
    assert "A tie" not in best_path.read_text() and "(tie)" not in capsys.readouterr().out
