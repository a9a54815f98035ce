"""The real protocol configs start: real_c2i.yaml as shipped, with only the dataset and model
paths pointed at tiny fixtures (SynthPEDES domains in the CUHK-PEDES and ICFG-PEDES formats, a
tiny random CLIP folder), runs one GCKD epoch through ``python -m gckd_ray.train``.

Besides the paths, the test sets what this 2-core CPU machine needs (``train.use_gpu=false``,
``train.cpus_per_worker=1``), and
``gckd.warmup_epochs=0`` with ``run.stop_after_epochs=1`` so its one epoch is an adaptation
epoch of the 60-epoch schedule (the IRRA recipe: caption epochs, 384x128, 77 tokens, random
erasing, new-module learning rate, ZeRO-2)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from helpers import SYNTH_SCALE, write_tiny_clip

REPO = Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_real_c2i_yaml_starts_and_adapts_on_tiny_fixtures(synth_cache, tmp_path):
    (domains,) = [p for p in synth_cache.iterdir() if p.is_dir()]
    write_tiny_clip(tmp_path / "clip", text_length=77)
    out = tmp_path / "run"
    run = subprocess.run(
        [sys.executable, "-m", "gckd_ray.train", "--config", "experiments/configs/real_c2i.yaml",
         f"data.source.root={domains / 'synth-cuhk'}", f"data.target.root={domains / 'synth-icfg'}",
         f"model.pretrained={tmp_path / 'clip'}", f"run.output_dir={out}",
         "train.use_gpu=false", "train.cpus_per_worker=1", "gckd.warmup_epochs=0", "run.stop_after_epochs=1"],
        capture_output=True, text=True, timeout=900, cwd=REPO)
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    assert "cuhk-pedes/train: " in run.stdout and "icfg-pedes/train: " in run.stdout
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    (evaluation,) = [r for r in records if r["kind"] == "eval"]
    captions = 2 * round(2000 * SYNTH_SCALE) * 2  # synth-cuhk: 2 images x 2 captions per id
    # one caption epoch of the 60-epoch schedule: groups of 2 captions, 32 identities a batch
    assert evaluation["epoch"] == 1 and evaluation["epochs"] == 60
    assert evaluation["step"] == captions // 2 // 32
    results = json.loads((out / "results.json").read_text())
    # IRRA's SDM + ID; GCKD adapts by centring and the lexical bridge, its target losses off
    assert results["phases"] == {"adaptation": {"epochs": 1, "losses": ["sdm", "id"]}}
