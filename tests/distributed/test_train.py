"""End to end on real Ray Train: 2 CPU workers (gloo), tiny SynthPEDES, results and the
evaluation CLIs (resume is tested with ZeRO-3 in test_zero)."""

import json
from pathlib import Path

import pytest
from PIL import Image

from experiments import diagnose_gap
from gckd_ray.distributed.launcher import run_training
from gckd_ray.distributed.metrics_log import read_records
from gckd_ray.evaluate import main as evaluate_main
from gckd_ray.results import METRIC_KEYS

pytestmark = pytest.mark.slow


def test_two_worker_source_only_run_writes_results(ray_session, tiny_config, capsys):
    cfg = tiny_config("method=source_only", "train.epochs=2")
    results = run_training(cfg)
    saved = json.loads((Path(cfg.run.output_dir) / "results.json").read_text())
    assert saved == results
    assert results["protocol"] == "synth-cuhk->synth-icfg" and results["method"] == "source_only"
    assert "no target labels" in results["selection"]
    assert [h["epoch"] for h in results["history"]] == [1, 2]
    assert set(METRIC_KEYS) <= set(results["final"]) and {"itc", "id", "loss"} <= set(
        results["history"][0])
    assert 0.0 <= results["final"]["R1"] <= results["final"]["R5"] <= results["final"]["R10"]
    out = capsys.readouterr().out
    assert "R1" in out and "mINP" in out

    # metrics.jsonl: progress reports with losses, lr and throughput, and each epoch's metrics.
    records = read_records(Path(cfg.run.output_dir) / "metrics.jsonl")
    train = [r for r in records if r["kind"] == "train"]
    evals = [r for r in records if r["kind"] == "eval"]
    steps = [r["step"] for r in train]
    assert steps == sorted(set(steps)) and len(steps) >= 2
    assert {r["epoch"] for r in train} == {1, 2}
    assert all({"itc", "id", "loss"} <= set(r["losses"]) and r["lr"] > 0
               and r["samples_per_s"] == pytest.approx(r["steps_per_s"] * 16 * 2)
               for r in train)
    assert [(r["epoch"], r["metrics"]["R1"]) for r in evals] == [
        (h["epoch"], h["R1"]) for h in results["history"]]
    assert evals[0]["step"] < train[-1]["step"] <= evals[1]["step"]
    with Image.open(Path(cfg.run.output_dir) / "curves.png") as png:
        assert png.format == "PNG" and png.size[0] > 100

    # The evaluate CLI on the final checkpoint reproduces the run's final metrics.
    checkpoint = max(Path(cfg.run.output_dir).glob("ray/*/checkpoint_*/state.json")).parent
    assert evaluate_main(["--checkpoint", str(checkpoint)]) == 0
    printed = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert {k: printed[k] for k in METRIC_KEYS} == pytest.approx(results["final"], abs=1e-6)
    assert evaluate_main(["--checkpoint", str(checkpoint.parent)]) == 2  # not a checkpoint

    # The gap diagnostic's unedited target row is the run's own metric.
    capsys.readouterr()
    assert diagnose_gap.main(["--checkpoint", str(checkpoint)]) == 0
    gap = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert gap["target_raw"] == pytest.approx(results["final"]["R1"])
    assert gap["unseen_tokens"] > 0 and 0 <= gap["canonical_target_centred"] <= 100
