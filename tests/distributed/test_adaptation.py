"""The worker's target feed (independent streams when unpaired, pairs together when paired), and
the smoke run of the GCKD overhead benchmark (memory actor + graph build per step)."""

import pytest
import torch

from gckd_ray.config import load_config
from gckd_ray.data.datasets import Captions, UnpairedTarget
from gckd_ray.data.transforms import TrainAugment, normalize
from gckd_ray.distributed.adaptation import TargetFeed, views


def _target(image_of=None):
    ids = torch.arange(30).reshape(10, 3)
    return UnpairedTarget(images=list(range(5)), captions=Captions(ids, torch.ones_like(ids), 0),
                          image_of=image_of)


def test_unpaired_feed_draws_images_and_captions_independently():
    cfg = load_config(None, ["train.batch_size=4"])
    steps = TargetFeed(_target(), cfg, rank=0, world=1).epoch(0, steps=3)
    assert len(steps) == 3 and all(len(i) == len(c) == 4 for i, c in steps)
    assert not all(torch.equal(i, c % 5) for i, c in steps)


def test_views_give_the_teacher_the_plain_view_only_in_student_mode():
    images = torch.randint(0, 256, (4, 3, 16, 8), dtype=torch.uint8)
    plain = TrainAugment(seed=1)(images)
    none = views(images, TrainAugment(seed=1), "none")
    assert set(none) == {"images"} and none["images"].equal(normalize(plain))
    student = views(images, TrainAugment(seed=1), "student")
    assert student["teacher_images"].equal(normalize(plain))
    assert not student["images"].equal(student["teacher_images"])
    both = views(images, TrainAugment(seed=1), "both")
    assert both["images"].equal(student["images"])  # the same strong draw
    assert both["teacher_images"].equal(both["images"])


def test_paired_feed_brings_each_captions_own_image():
    cfg = load_config(None, ["train.batch_size=4"])
    image_of = torch.tensor([4, 3, 2, 1, 0, 0, 1, 2, 3, 4])
    feed = TargetFeed(_target(image_of), cfg, rank=0, world=1)
    unpaired = TargetFeed(_target(), cfg, rank=0, world=1).epoch(1, steps=3)
    for (images, captions), (_, same_captions) in zip(feed.epoch(1, steps=3), unpaired):
        assert torch.equal(captions, same_captions)  # same caption stream as unpaired
        assert torch.equal(images, image_of[captions])


@pytest.mark.slow
def test_gckd_overhead_benchmark_smoke(ray_session):
    from benchmarks import gckd_overhead

    result = gckd_overhead.main(["--smoke"])
    parts = result["ms_per_step"]
    assert set(parts) == {"push", "snapshot", "pseudo_id_refresh", "knn_graph_build"}
    assert all(v > 0 for v in parts.values()) and result["compute_ms"] > 0
    assert result["graph_nodes"] == 4 * 8 + 4 * 8       # batch 8 per domain and modality + C
    assert 0 < result["memory_and_graph_share"] < 1
