"""``results.json`` (gckd_ray.results): what a run reports it ran."""

from __future__ import annotations

import json

import pytest

from gckd_ray.config import load_config
from gckd_ray.results import METRIC_KEYS, format_table, phases, write_results


def _cfg(*overrides: str):
    return load_config(None, list(overrides))


def test_phases_say_what_ran():
    cfg = _cfg("train.epochs=3", "gckd.warmup_epochs=1")
    history = [{"epoch": 1, "itc": 1.0, "id": 2.0, "loss": 3.0, "R1": 5.0},
               {"epoch": 2, "itc": 1.0, "id": 2.0, "cmkd": 1.0, "gmp": 0.5, "loss": 4.5},
               {"epoch": 3, "itc": 1.0, "id": 2.0, "cmkd": 1.0, "itm": 0.1, "loss": 4.1}]
    assert phases(cfg, history) == {
        "source": {"epochs": 1, "losses": ["itc", "id"]},
        "adaptation": {"epochs": 2, "losses": ["itc", "id", "cmkd", "gmp", "itm"]}}
    assert phases(_cfg("method=source_only"), history[:1]) == {
        "source": {"epochs": 1, "losses": ["itc", "id"]}}


def test_epochs_without_a_test_evaluation_keep_their_losses_and_the_last_scored_is_final(
        tmp_path):
    cfg = _cfg("method=source_only", "train.epochs=3", "train.eval_every=2",
               f"run.output_dir={tmp_path}")
    scores = {k: 10.0 for k in METRIC_KEYS}
    history = [{"epoch": 1, "itc": 1.0, "loss": 1.0, "target_mnn": 5.0},
               {"epoch": 2, "itc": 0.9, "loss": 0.9, "target_mnn": 6.0, **scores},
               {"epoch": 3, "itc": 0.8, "loss": 0.8, "target_mnn": 7.0,
                **{k: 20.0 for k in METRIC_KEYS}}]
    results = write_results(cfg, history)
    assert results["final"] == {k: 20.0 for k in METRIC_KEYS} and results["final_epoch"] == 3
    assert results["history"] == history and results["phases"]["source"]["epochs"] == 3
    assert json.loads((tmp_path / "results.json").read_text()) == results
    assert "20.00" in format_table(results)
    # A run stopped early (run.stop_after_epochs) reports the last epoch it scored.
    assert write_results(cfg, history[:2])["final_epoch"] == 2
    with pytest.raises(ValueError, match="no epoch of the history scored the target test"):
        write_results(cfg, history[:1])


def test_skipped_images_are_in_the_results_and_the_table(tmp_path):
    from gckd_ray.distributed.metrics_log import console_line

    cfg = _cfg("method=source_only", "train.epochs=1", "data.on_bad_image=skip",
               f"run.output_dir={tmp_path}")
    history = [{"epoch": 1, "itc": 1.0, "loss": 1.0, "skipped_images": 2,
                **{k: 10.0 for k in METRIC_KEYS}}]
    results = write_results(cfg, history, ["/d/imgs/b.jpg", "/d/imgs/a.jpg"])
    assert results["skipped_images"] == {"count": 2, "files": ["/d/imgs/a.jpg", "/d/imgs/b.jpg"]}
    assert results["history"][0]["skipped_images"] == 2
    assert "skipped images (data.on_bad_image=skip): 2" in format_table(results)
    # data.on_bad_image=error: no such key (an undecodable image would have stopped the run)
    assert "skipped_images" not in write_results(_cfg(f"run.output_dir={tmp_path}"),
                                                 history[:1])
    record = {"kind": "skipped_images", "epoch": 2, "epochs": 3, "count": 1,
              "files": ["/d/imgs/a.jpg"]}
    assert console_line(record) == ("[epoch 2/3] skipped images (data.on_bad_image=skip): 1 "
                                    "(/d/imgs/a.jpg)")
    assert console_line({**record, "count": 0, "files": []}).endswith("skip): 0")
