"""End to end on real Ray Train: 2 CPU workers (gloo), tiny SynthPEDES, results and the
evaluation CLIs (resume is tested with ZeRO-3 in test_zero); train.eval_every, lean
checkpoints and the final_model/ folder."""

import json
from pathlib import Path

import pytest
import torch
from PIL import Image

from experiments import diagnose_gap, diagnose_pseudo_pairs
from gckd_ray.checkpoint_format import checkpoint_tokenizer_dir, folder_sha256
from gckd_ray.config import override_config
from gckd_ray.data.tokenizer import load_tokenizer
from gckd_ray.distributed.launcher import run_training
from gckd_ray.distributed.metrics_log import read_records
from gckd_ray.distributed.metrics_log import console_line
from gckd_ray.distributed.worker import evaluates_test
from gckd_ray.evaluate import load_encoder, main as evaluate_main
from gckd_ray.model.retriever import build_encoder
from gckd_ray.results import METRIC_KEYS

pytestmark = pytest.mark.slow


def test_two_worker_source_only_run_writes_results(source_only_run, capsys):
    cfg, results = source_only_run
    saved = json.loads((Path(cfg.run.output_dir) / "results.json").read_text())
    assert saved == results
    assert results["protocol"] == "synth-cuhk->synth-icfg" and results["method"] == "source_only"
    assert "no target labels" in results["selection"]
    assert [h["epoch"] for h in results["history"]] == [1, 2]
    assert set(METRIC_KEYS) <= set(results["final"]) and {"itc", "id", "loss"} <= set(
        results["history"][0])
    assert 0.0 <= results["final"]["R1"] <= results["final"]["R5"] <= results["final"]["R10"]

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

    # The pseudo-pair diagnostic reports cross-modal and image-image precision, in [0, 1].
    assert diagnose_pseudo_pairs.main(["--checkpoint", str(checkpoint), "--thresholds", "0.0",
                                       "--image-k", "1"]) == 0
    rows = [json.loads(line) for line in capsys.readouterr().out.strip().splitlines()
            if line.startswith("{")]
    assert [("k" in r, "image_k" in r) for r in rows] == [(True, False), (False, True)] * 2
    assert all(r["pairs"] > 0 and 0 <= r["precision"] <= 1 for r in rows)


def test_eval_every_lean_checkpoints_and_the_final_model(ray_session, tiny_config, capsys):
    cfg = tiny_config("method=source_only", "train.epochs=3", "train.eval_every=2",
                      "run.keep_checkpoints=0")
    out = Path(cfg.run.output_dir)
    results = run_training(cfg)

    # The test split is scored after epochs 2 and 3 only; target_mnn and losses every epoch.
    history = results["history"]
    assert [(h["epoch"], "R1" in h) for h in history] == [(1, False), (2, True), (3, True)]
    assert all("target_mnn" in h and "loss" in h for h in history)
    assert results["final_epoch"] == 3 and results["final"] == {
        k: history[2][k] for k in METRIC_KEYS}
    evals = [r for r in read_records(out / "metrics.jsonl") if r["kind"] == "eval"]
    assert [(r["epoch"], "R1" in r["metrics"]) for r in evals] == [
        (1, False), (2, True), (3, True)]
    capsys.readouterr()

    # Checkpoints hold trained state only and name the run's one tokenizer.
    checkpoints = sorted(p.parent for p in out.glob("ray/*/checkpoint_*/state.json"))
    assert len(checkpoints) == 3  # run.keep_checkpoints=0: one per epoch, all kept
    for ckpt in checkpoints:
        state = json.loads((ckpt / "state.json").read_text())
        assert not (ckpt / "tokenizer").exists() and state["references"]["pretrained"] is None
        assert checkpoint_tokenizer_dir(ckpt).resolve() == (out / "tokenizer").resolve()
        assert state["references"]["tokenizer"]["sha256"] == folder_sha256(out / "tokenizer")
    final_ckpt = checkpoints[-1]
    assert evaluate_main(["--checkpoint", str(final_ckpt), "--device", "cpu"]) == 0
    scored = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert {k: scored[k] for k in METRIC_KEYS} == pytest.approx(results["final"], abs=1e-6)

    # final_model/: CLIPModel.from_pretrained loads it; model.pretrained=final_model rebuilds
    # the final checkpoint's student exactly.
    from transformers import CLIPModel

    final = out / "final_model"
    _, info = CLIPModel.from_pretrained(final, local_files_only=True, output_loading_info=True)
    assert {k: v for k, v in info.items() if v} == {}
    tokenizer = load_tokenizer(final)
    trained = load_encoder(final_ckpt, cfg, tokenizer)
    rebuilt = build_encoder(override_config(cfg, [f"model.pretrained={final}"]),
                            tokenizer).eval()
    images = torch.randn(2, 3, cfg.data.image_height, cfg.data.image_width)
    ids, mask, _ = tokenizer.encode(["a man in a red coat", "a woman"], cfg.data.text_length)
    with torch.no_grad():
        assert torch.equal(rebuilt.encode_image(images), trained.encode_image(images))
        assert torch.equal(rebuilt.encode_text(ids, mask), trained.encode_text(ids, mask))
    assert json.loads((final / "gckd_ray.json").read_text())["epochs"] == 3


def test_which_epochs_score_the_test_split(tiny_config):
    cfg = tiny_config("train.epochs=5", "train.eval_every=2")
    assert [e for e in range(1, 6) if evaluates_test(cfg, e)] == [2, 4, 5]  # and the last
    cfg = tiny_config("train.epochs=5", "train.eval_every=0")
    assert [e for e in range(1, 6) if evaluates_test(cfg, e)] == [5]
    cfg = tiny_config("train.epochs=5")  # the default: every epoch, as before
    assert [e for e in range(1, 6) if evaluates_test(cfg, e)] == [1, 2, 3, 4, 5]
    # An epoch without test scoring shows its label-free score alone.
    lines = [console_line({"kind": "eval", "epoch": e, "epochs": 3, "split": "synth-icfg",
                           "metrics": m})
             for e, m in ((1, {"target_mnn": 1.5}),
                          (3, {"R1": 10.0, "num_queries": 40, "target_mnn": 1.5}))]
    assert lines == ["[epoch 1/3] target synth-icfg: target_mnn=1.50",
                     "[epoch 3/3] target synth-icfg: R1=10.00 target_mnn=1.50"]
