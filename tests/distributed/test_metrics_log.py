"""MetricsLog in one process: records, curves.png, and resume without duplicated steps."""

import json
import time

from PIL import Image

from gckd_ray.distributed.metrics_log import (CURVES_FILE, METRICS_FILE, MetricsLog,
                                             console_line, read_records)


def _epoch(log, epoch, steps=4, every=2):
    sums, start = {}, time.perf_counter()
    for step in range(steps):
        for name, value in {"loss": 2.0 - epoch, "itc": 1.0, "target_text_with_positive": 0.5
                            }.items():
            sums[name] = sums.get(name, 0.0) + value
        if (step + 1) % every == 0:
            log.progress(epoch, step, steps, sums, 1e-3, start, loss_names=("loss", "itc"))
    log.evaluation(epoch + 1, {"R1": 10.0 * (epoch + 1), "R5": 20.0, "R10": 30.0,
                               "mAP": 5.0, "mINP": 1.0, "num_queries": 7}, "synth-icfg/test")


def test_records_curves_and_resume(tmp_path, capsys):
    log = MetricsLog(tmp_path, 0, steps_per_epoch=4, epochs=3, samples_per_step=32)
    for epoch in range(2):
        _epoch(log, epoch)
    records = read_records(tmp_path / METRICS_FILE)
    lines = [console_line(r) for r in records]  # what the driver's console shows
    assert lines[3].startswith("[epoch 2/3] step 2/4 loss=") and " it/s ETA 0:00:" in lines[3]
    assert lines[5] == ("[epoch 2/3] target synth-icfg/test: R1=20.00 R5=20.00 R10=30.00 "
                        "mAP=5.00 mINP=1.00")
    assert [(r["kind"], r["step"]) for r in records] == [
        ("train", 2), ("train", 4), ("eval", 4), ("train", 6), ("train", 8), ("eval", 8)]
    first = records[0]
    assert first["losses"] == {"loss": 2.0, "itc": 1.0}
    assert first["stats"] == {"target_text_with_positive": 0.5}
    assert first["samples_per_s"] == first["steps_per_s"] * 32 and first["lr"] == 1e-3
    assert records[5]["metrics"]["R1"] == 20.0 and records[5]["epoch"] == 2
    with Image.open(tmp_path / CURVES_FILE) as png:
        assert png.format == "PNG" and png.size[0] > 100

    # Interrupted after writing epoch 2 but restored from the epoch-1 checkpoint: epoch 2's
    # records are dropped before it runs again; a torn last line is ignored.
    with (tmp_path / METRICS_FILE).open("a") as f:
        f.write('{"kind": "train", "st')
    resumed = MetricsLog(tmp_path, 1, steps_per_epoch=4, epochs=3, samples_per_step=32)
    assert [r["step"] for r in resumed.records] == [2, 4, 4]
    _epoch(resumed, 1)
    _epoch(resumed, 2)
    lines = (tmp_path / METRICS_FILE).read_text().splitlines()
    steps = [json.loads(line)["step"] for line in lines if '"train"' in line]
    assert steps == [2, 4, 6, 8, 10, 12]
    assert [json.loads(line)["epoch"] for line in lines if '"eval"' in line] == [1, 2, 3]

    fresh = MetricsLog(tmp_path, 0, steps_per_epoch=4, epochs=3, samples_per_step=32)
    assert fresh.records == [] and (tmp_path / METRICS_FILE).read_text() == ""


def test_refresh_records_are_kept_apart_from_the_curves(tmp_path):
    log = MetricsLog(tmp_path, 0, steps_per_epoch=4, epochs=2, samples_per_step=32)
    stats = {"num_clusters": 3.0, "image_coverage": 0.5, "text_coverage": 0.25,
             "mean_cluster_size": 2.0, "num_nodes": 9.0, "num_edges": 4.0, "seconds": 0.01}
    log.refresh(1, 2, stats)  # read before the third step of the second epoch
    _epoch(log, 1)  # the curves are drawn over every record kind
    records = read_records(tmp_path / METRICS_FILE)
    assert records[0] == {"kind": "refresh", "step": 6, "epoch": 2, **stats,
                          "time": records[0]["time"]}
    assert [r["kind"] for r in records] == ["refresh", "train", "train", "eval"]
    assert (tmp_path / CURVES_FILE).is_file()
    assert [r["kind"] for r in MetricsLog(tmp_path, 1, 4, 2, 32).records] == []  # epoch 2 dropped
