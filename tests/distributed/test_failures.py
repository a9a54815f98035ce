"""Input errors end a run at once (no retry), with their one line; faults are retried."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from ray.train import FailureConfig
from ray.train.v2._internal.exceptions import UserExceptionWithTraceback
from ray.train.v2._internal.execution.failure_handling.failure_policy import FailureDecision
from ray.train.v2.api.exceptions import WorkerGroupError

from gckd_ray.data.formats import DatasetFormatError
from gckd_ray.distributed.failures import InputErrorsAreFinal, input_error_of
from helpers import SYNTH_SCALE

REPO = Path(__file__).resolve().parents[2]


def _failed(*errors: BaseException) -> WorkerGroupError:
    return WorkerGroupError("x", {rank: UserExceptionWithTraceback(e, "traceback text")
                                  for rank, e in enumerate(errors)})


def test_an_input_error_is_raised_at_once_and_a_fault_is_retried():
    bad_data = DatasetFormatError("/data/imgs/1.jpg: truncated image")
    assert input_error_of(_failed(RuntimeError("peer died"), bad_data)) is bad_data
    assert input_error_of(_failed(RuntimeError("peer died"))) is None
    policy = InputErrorsAreFinal(FailureConfig(max_failures=2))
    assert policy.make_decision(_failed(bad_data)) == FailureDecision.RAISE
    assert policy.make_decision(_failed(RuntimeError("OOM"))) == FailureDecision.RETRY


def _target_with_a_truncated_test_image(synth_cache: Path, tmp_path: Path) -> tuple[Path, Path]:
    """A copy of synth-icfg in the ICFG-PEDES format with one test image cut in half."""
    target = shutil.copytree(next(synth_cache.glob("*/synth-icfg")), tmp_path / "icfg")
    records = json.loads((target / "ICFG-PEDES.json").read_text())
    bad = target / "imgs" / next(r for r in records if r["split"] == "test")["file_path"]
    bad.write_bytes(bad.read_bytes()[: bad.stat().st_size // 2])
    return target, bad


@pytest.mark.slow
def test_a_truncated_image_in_a_worker_stops_the_run_with_one_line_and_no_retry(synth_cache,
                                                                                tmp_path):
    target, bad = _target_with_a_truncated_test_image(synth_cache, tmp_path)
    run = subprocess.run(
        [sys.executable, "-m", "gckd_ray.train", "method=source_only", "train.epochs=1",
         "train.max_failures=2", "data.target.name=icfg-pedes", f"data.target.root={target}",
         f"data.synth_cache={synth_cache}", f"data.synth_scale={SYNTH_SCALE}",
         f"run.output_dir={tmp_path / 'run'}", "train.batch_size=16", "model.hidden_size=32",
         "model.embed_dim=32", "model.num_layers=1", "model.num_heads=2"],
        capture_output=True, text=True, timeout=300, cwd=REPO)
    assert run.returncode == 2
    last = run.stderr.strip().splitlines()[-1]
    assert last.startswith("data error: ") and str(bad) in last
    # No worker traceback for it (Ray's own teardown messages are issue 26's quiet console).
    assert "Error in training function" not in run.stderr
    assert "DatasetFormatError" not in run.stderr
    # The source split is read once: the workers were not started a second time.
    assert run.stdout.count("synth-cuhk/train: ") == 1, run.stdout


@pytest.mark.slow
def test_with_on_bad_image_skip_a_truncated_image_is_replaced_counted_and_reported(synth_cache,
                                                                                    tmp_path):
    target, bad = _target_with_a_truncated_test_image(synth_cache, tmp_path)
    out = tmp_path / "run"
    run = subprocess.run(
        [sys.executable, "-m", "gckd_ray.train", "method=source_only", "train.epochs=2",
         "train.eval_every=0", "data.on_bad_image=skip", "data.target.name=icfg-pedes",
         f"data.target.root={target}", f"data.synth_cache={synth_cache}",
         f"data.synth_scale={SYNTH_SCALE}", f"run.output_dir={out}", "train.batch_size=16",
         "model.hidden_size=32", "model.embed_dim=32", "model.num_layers=1",
         "model.num_heads=2"],
        capture_output=True, text=True, timeout=300, cwd=REPO)
    assert run.returncode == 0, run.stderr[-3000:]
    # Both workers cache the test split and meet the same file: counted once, every epoch.
    for epoch in (1, 2):
        assert (f"[epoch {epoch}/2] skipped images (data.on_bad_image=skip): 1 ({bad})"
                in run.stdout), run.stdout
    assert "skipped images (data.on_bad_image=skip): 1\n" in run.stdout
    results = json.loads((out / "results.json").read_text())
    assert results["skipped_images"] == {"count": 1, "files": [str(bad)]}
    assert [row["skipped_images"] for row in results["history"]] == [1, 1]
    logged = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["count"] for r in logged if r["kind"] == "skipped_images"] == [1, 1]
