"""GCKD end to end on real Ray: memory actor, graph, CMKD (MNF/CSC in the paired run), and no
target-label leakage."""

import json
import math
import random
import shutil

import numpy as np
import pytest
from PIL import Image

from experiments import graph_precision, pseudo_curves
from gckd_ray.data.tokenizer import load_tokenizer
from gckd_ray.distributed.launcher import run_training
from gckd_ray.distributed.metrics_log import METRICS_FILE, read_records
from gckd_ray.evaluate import main as evaluate_main
from gckd_ray.results import METRIC_KEYS

pytestmark = pytest.mark.slow

# A refresh every 4 steps, applied 4 steps after its start (12 steps per epoch; the default
# 20-step lag would apply none in these 24 steps).
GCKD = ("method=gckd", "train.epochs=2", "gckd.warmup_epochs=1", "gckd.queue_size=512",
        "gckd.memory_nodes=16", "gckd.snapshot_every=2", "gckd.pseudo_every=4",
        "gckd.refresh_lag=4", "graph.k=5")


def _scrambled_copy(domain_dir, out_dir, seed=0):
    """The target domain with train ids permuted and captions shuffled across train images."""
    shutil.copytree(domain_dir, out_dir)
    ann = out_dir / "ICFG-PEDES.json"
    records = json.loads(ann.read_text())
    train = [r for r in records if r["split"] == "train"]
    rng = random.Random(seed)
    ids = sorted({r["id"] for r in train})
    new_id = dict(zip(ids, rng.sample(range(10_000, 10_000 + len(ids)), len(ids))))
    captions = [r["captions"] for r in train]
    rng.shuffle(captions)
    for record, caps in zip(train, captions):
        record["id"] = new_id[record["id"]]
        record["captions"] = caps
    ann.write_text(json.dumps(records))
    return out_dir


def test_target_ids_and_pairing_never_reach_training(ray_session, tiny_config, synth_cache,
                                                     tmp_path, capsys):
    domain = next(synth_cache.glob("*/synth-icfg"))
    plain = shutil.copytree(domain, tmp_path / "plain")
    scrambled = _scrambled_copy(domain, tmp_path / "scrambled")
    # The second run also prepares its batches in the step's thread (train.prefetch=false):
    # prefetching must not change a single value either.
    results = [run_training(tiny_config(*GCKD, f"data.target.root={root}",
                                        f"run.output_dir={tmp_path / root.name}-run",
                                        f"train.prefetch={root is plain}",
                                        "gckd.save_pseudo_ids=true"))
               for root in (plain, scrambled)]
    first, second = (r["history"] for r in results)
    assert {"cmkd", "gmp", "itc", "id", "itm", "R1", "rerank_R1"} <= set(first[-1])
    # A short run (2 epochs, 1 of warm-up) trains both phases and says so.
    assert results[0]["phases"] == {
        "source": {"epochs": 1, "losses": ["itc", "id"]},
        "adaptation": {"epochs": 1, "losses": ["itc", "id", "cmkd", "gmp", "itm"]}}
    assert set(results[0]["final_rerank"]) == {"R1", "R5", "R10", "mAP", "mINP"}
    assert first == second  # identical losses, pseudo-pair counts and metrics
    # Every pseudo-id refresh is in metrics.jsonl with what it found and its wall time; the
    # scrambled target annotation changes none of what it found.
    refreshes = [[r for r in read_records(tmp_path / f"{root.name}-run" / METRICS_FILE)
                  if r["kind"] == "refresh"] for root in (plain, scrambled)]
    steps = [r["step"] for r in refreshes[0]]
    assert steps and steps == sorted(set(steps)) and {r["epoch"] for r in refreshes[0]} <= {1, 2}
    assert all(r["seconds"] > 0 and r["num_nodes"] > 0 and 0 <= r["text_coverage"] <= 1
               and r["step"] - r["started_step"] == 4 for r in refreshes[0])
    found = [[{k: v for k, v in r.items() if k not in ("seconds", "wait_seconds", "time")}
              for r in run] for run in refreshes]
    assert found[0] == found[1]
    # gckd.save_pseudo_ids wrote each applied refresh's ids (the same in both runs), and
    # experiments.pseudo_curves scores them offline against the target annotation's ids.
    saved = [sorted((tmp_path / f"{root.name}-run" / "pseudo_ids").glob("*.npz"))
             for root in (plain, scrambled)]
    assert [p.name for p in saved[0]] == [f"step_{step:07d}.npz" for step in steps]
    for ours, theirs in zip(*saved):
        with np.load(ours) as a, np.load(theirs) as b:
            assert np.array_equal(a["image"], b["image"]) and np.array_equal(a["text"], b["text"])
    capsys.readouterr()
    assert pseudo_curves.main([str(tmp_path / "plain-run"), "--out", str(tmp_path / "pc.png"),
                               "--json", str(tmp_path / "pc.jsonl")]) == 0
    scored = [json.loads(line) for line in (tmp_path / "pc.jsonl").read_text().splitlines()]
    assert scored == [json.loads(line) for line in capsys.readouterr().out.splitlines()
                      if line.startswith("{")]
    with Image.open(tmp_path / "pc.png") as png:
        assert png.format == "PNG"
    assert [r["step"] for r in scored] == steps
    for row, refresh in zip(scored, refreshes[0]):
        assert row["text_coverage"] == pytest.approx(refresh["text_coverage"], abs=1e-3)
        assert row["pairs"] > 0 and 0 <= row["pair_precision"] <= 1
    # experiments.graph_precision scores the step graphs of each kept checkpoint's memory.
    assert graph_precision.main([str(tmp_path / "plain-run"), "--draws", "2"]) == 0
    graphs = [json.loads(line) for line in capsys.readouterr().out.splitlines()
              if line.startswith("{")]
    assert [r["epoch"] for r in graphs] == [1, 2] and all(r["context"] == 16 for r in graphs)
    assert all(0 <= r[key] <= 1 for r in graphs for key in (
        "edge_precision", "target_edge_precision", "cross_domain_share", "target_edge_ceiling"))
    # The lexical bridge ran, and read only what scrambling leaves intact.
    aliases = [load_tokenizer(tmp_path / f"{root.name}-run" / "tokenizer").aliases
               for root in (plain, scrambled)]
    assert aliases[0] and aliases[0] == aliases[1]

    # The evaluate CLI reproduces the run's metrics: it applies the target centring the
    # checkpoint's encoder learned.
    checkpoint = max((tmp_path / "plain-run").glob("ray/*/checkpoint_*/state.json")).parent
    capsys.readouterr()
    assert evaluate_main(["--checkpoint", str(checkpoint)]) == 0
    printed = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert {k: printed[k] for k in METRIC_KEYS} == pytest.approx(results[0]["final"], abs=1e-6)


def test_paired_variant_uses_each_captions_own_image(ray_session, tiny_config, tmp_path):
    """Run with the second distillation mode (MNF/CSC): one run covers both, on 2 workers."""
    results = run_training(tiny_config(*GCKD, "data.target.paired=true",
                                       "distill.mode=mnf_csc",
                                       f"run.output_dir={tmp_path / 'paired'}"))
    adapted = results["history"][-1]
    # every target caption meets its own image in the batch, known to the memory as one group
    assert adapted["target_text_with_positive"] == 1.0
    assert adapted["itm_target_pairs"] > 0
    assert {"csc", "mnf_triplet", "mnf_l1", "gmp"} <= set(adapted) and "cmkd" not in adapted
    assert all(math.isfinite(adapted[k]) for k in ("csc", "mnf_triplet", "mnf_l1", "loss"))
    assert 0 < adapted["mnf_gate_mean"] < 1 and 0 < adapted["mnf_gate_cos"] <= 1
