"""``python -m gckd_ray.tune`` end to end: a real Ray Tune sweep of real Ray Train runs, its
driver SIGKILLed mid-sweep, then ``--resume`` finishes it and writes the report."""

import csv
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from PIL import Image

from gckd_ray.config import load_config

pytestmark = pytest.mark.slow

SPACE = "tune.search_space={graph.k: {grid: [2, 4]}, distill.tau_s: {loguniform: [0.05, 0.1]}}"


def _tune(args, out: Path, synth_cache: Path, log: Path) -> subprocess.Popen:
    env = {k: v for k, v in os.environ.items() if not k.startswith("RAY_")}
    env["RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"] = "0"
    command = [sys.executable, "-m", "gckd_ray.tune", *args,
               f"data.synth_cache={synth_cache}", "data.synth_scale=0.1",
               f"run.output_dir={out}", "train.epochs=2", "train.batch_size=16",
               "model.hidden_size=32", "model.embed_dim=32", "model.num_layers=1",
               "model.num_heads=2", "gckd.warmup_epochs=1", "gckd.queue_size=256",
               "train.label_free_samples=100",
               "tune.grace_epochs=1", "tune.num_samples=1", SPACE]
    # Its own session: killing the group takes the driver's local Ray instance with it.
    return subprocess.Popen(command, env=env, stdout=log.open("w"), stderr=subprocess.STDOUT,
                            start_new_session=True)


def _reported_epochs(experiment: Path) -> int:
    return sum(len(p.read_text().splitlines()) for p in experiment.glob("*/result.json"))


def _stop(proc: subprocess.Popen, sig=signal.SIGKILL) -> None:
    try:
        os.killpg(proc.pid, sig)
    except ProcessLookupError:
        pass
    proc.wait(timeout=60)


def test_sweep_survives_a_killed_driver_and_resumes_to_a_report(synth_cache, tmp_path):
    out = tmp_path / "sweep"
    first = _tune([], out, synth_cache, tmp_path / "first.log")
    experiment = out / "tune" / "sweep"
    try:
        deadline = time.monotonic() + 400
        # Kill once a trial has reported an epoch and Tune has saved its experiment state.
        while _reported_epochs(experiment) < 1 or not list(experiment.glob("experiment_state*")):
            assert first.poll() is None, (tmp_path / "first.log").read_text()[-3000:]
            assert time.monotonic() < deadline, "no trial reported in time"
            time.sleep(2)
    finally:
        _stop(first)
    assert not (out / "sweep.csv").exists()

    log = tmp_path / "resume.log"
    resumed = _tune(["--resume"], out, synth_cache, log)
    try:
        assert resumed.wait(timeout=600) == 0, log.read_text()[-4000:]
    finally:
        _stop(resumed, signal.SIGTERM)
    text = log.read_text()
    assert "trials ranked by target_mnn (label-free" in text

    with open(out / "sweep.csv") as f:
        rows = list(csv.DictReader(f))
    assert sorted(r["graph.k"] for r in rows) == ["2", "4"]
    assert {r["ranked_by"] for r in rows} == {"target_mnn"}
    assert all(r["status"] in ("completed", "stopped early (ASHA)") for r in rows), rows
    assert any(r["status"] == "completed" and r["epochs"] == "2" for r in rows)
    # A trial resumed from its checkpoint ran each epoch once: its run's history has no gaps.
    for trial in (out / "trials").iterdir():
        results = trial / "results.json"
        if results.is_file():
            epochs = [h["epoch"] for h in json.loads(results.read_text())["history"]]
            assert epochs == [1, 2]

    best = load_config(out / "best_config.yaml")  # python -m gckd_ray.train --config accepts it
    winner = max((r for r in rows if r["status"] == "completed"),
                 key=lambda r: float(r["selection"]))
    assert best.graph.k == int(winner["graph.k"])
    with Image.open(out / "sweep.png") as png:
        assert png.format == "PNG"


def test_bad_search_space_fails_before_ray_starts(tmp_path):
    proc = subprocess.run([sys.executable, "-m", "gckd_ray.tune", f"run.output_dir={tmp_path}",
                           "tune.search_space={graph.k: {uniform: [2, 8]}}"],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2
    assert proc.stderr.strip() == ("config error: tune.search_space.graph.k.uniform: graph.k "
                                   "is an integer key; use randint, grid or choice")
    assert not (tmp_path / "tune").exists()
