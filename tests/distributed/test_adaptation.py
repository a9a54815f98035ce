"""The worker's target feed (independent streams when unpaired, pairs together when paired), the
epoch's batches through loader processes and the prefetcher, the bucketed teacher push on 2 gloo ranks, and the smoke
run of the GCKD overhead benchmark (memory actor + graph build per step)."""

import numpy as np
import pytest
import torch
import torch.distributed as dist
import torch.nn.functional as F

from gckd_ray.config import load_config
from gckd_ray.data.datasets import (Captions, IdentityBalancedSampler, PairedSplit,
                                    UnpairedTarget, load_split, load_unpaired)
from gckd_ray.data.tokenizer import WordTokenizer
from gckd_ray.data.transforms import TrainAugment, normalize
from gckd_ray.distributed.adaptation import (GCKDSteps, TargetFeed, push_teacher, refresh_due,
                                              views)
from gckd_ray.distributed.loop import loader_processes, prepared_batches
from gckd_ray.model.centring import SOURCE, TARGET
from gckd_ray.model.memory_bank import MemoryBank
from gckd_ray.model.collectives import all_gather_many, all_gather_no_grad
from helpers import run_gloo_ranks


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


@pytest.mark.parametrize("processes, prefetch", [(0, True), (2, False), (2, True)])
def test_epoch_batches_equal_the_plain_loop_with_loader_processes_and_prefetch(
        tiny_config, processes, prefetch):
    """GCKDSteps' data path as run_epoch runs it (real-format files decoded per step, both
    views) over two epochs: with loader processes and/or the background thread, the same
    batches, the same augmentation state at each epoch end (what a checkpoint saves) and an
    untouched global torch generator, as the plain in-process loop."""
    runs = {}
    for variant in ((0, False), (processes, prefetch)):
        cfg = tiny_config("data.cache_images=false", "gckd.warmup_epochs=0",
                          "gckd.strong_views=student", f"train.loader_processes={variant[0]}",
                          f"train.prefetch={variant[1]}")
        tokenizer = WordTokenizer.build(["a"])
        split = load_split(cfg, cfg.data.source, "train", tokenizer)
        feed = TargetFeed(load_unpaired(cfg, tokenizer), cfg, rank=1, world=2)
        sampler = IdentityBalancedSampler(split.labels, 16, 2, cfg.run.seed, rank=1,
                                          world_size=2)
        augment = TrainAugment(seed=5)
        method = GCKDSteps(split, sampler, feed, None, augment, cfg, torch.device("cpu"),
                           rank=1, log=None)
        torch.manual_seed(0)
        got, states = [], []
        for epoch in range(2):
            items, load, prepare = method.epoch_batches(epoch)
            with prepared_batches(items[:4], load, prepare, cfg) as prepared:
                got += list(prepared)
            states.append(augment.state_dict()["generator"])
        runs[variant] = got, states, torch.get_rng_state()
    (plain, plain_states, plain_rng), (other, other_states, other_rng) = runs.values()
    assert len(plain) == len(other) == 8
    for (idx, src, tgt), (idx2, src2, tgt2) in zip(plain, other):
        assert torch.equal(idx, idx2)
        assert list(src) == list(src2) and list(tgt) == list(tgt2)  # same keys, same order
        assert {"images", "teacher_images", "image_rows"} <= src.keys() | tgt.keys()
        assert all(torch.equal(src[k], src2[k]) for k in src)
        assert all(torch.equal(tgt[k], tgt2[k]) for k in tgt)
    assert all(torch.equal(a, b) for a, b in zip(plain_states, other_states))
    assert torch.equal(plain_rng, other_rng)


def test_loader_processes_follow_the_cpus_of_a_gpu_worker_and_stay_off_on_cpu():
    def processes(*overrides):
        return loader_processes(load_config(None, list(overrides)))
    assert processes("train.cpus_per_worker=8") == 0  # CPU workers fill their cores already
    assert processes("train.cpus_per_worker=8", "train.use_gpu=true") == 8
    assert processes("train.cpus_per_worker=0.49", "train.use_gpu=true") == 0
    assert processes("train.loader_processes=3") == 3
    assert processes("train.loader_processes=0", "train.use_gpu=true") == 0


# ---- push_teacher's bucketed all-gathers: 2 gloo ranks ---------------------------------------

WORLD, B, D, ROWS = 2, 4, 6, 9
KEYS = ("src_image", "src_text", "tgt_image", "tgt_text")


def _push_inputs(rank: int):
    """One rank's teacher features, source split and target rows (seeded by the rank)."""
    g = torch.Generator().manual_seed(rank)
    teacher = {k: F.normalize(torch.randn(B, D, generator=g), dim=-1) for k in KEYS}
    split = PairedSplit(name="src", images=None, captions=None,
                        image_of=torch.arange(20).flip(0), labels=torch.arange(20) // 2,
                        image_labels=torch.arange(10), num_ids=10)
    caption_idx = torch.randperm(20, generator=g)[:B]
    target = {"image_rows": torch.randperm(ROWS, generator=g)[:B],
              "text_rows": torch.randperm(ROWS, generator=g)[:B]}
    return teacher, split, caption_idx, target


def _push_per_tensor(bank, teacher, split, caption_idx, target) -> None:
    """push_teacher as it was before bucketing: one all-gather per tensor (12 per step)."""
    pids = split.labels[caption_idx]
    rows_i, rows_t = target["image_rows"], target["text_rows"]
    entries = [("image", "src_image", SOURCE, pids, split.image_of[caption_idx]),
               ("text", "src_text", SOURCE, pids, caption_idx),
               ("image", "tgt_image", TARGET, torch.full_like(rows_i, -1), rows_i),
               ("text", "tgt_text", TARGET, torch.full_like(rows_t, -1), rows_t)]
    for modality, key, domain, labels, rows in entries:
        feats, labels, rows = (all_gather_no_grad(t) for t in (teacher[key], labels, rows))
        if bank is not None:
            bank.push(modality, feats, domain, labels, rows)


def _push_worker(rank: int) -> dict:
    calls = []
    real_all_gather = dist.all_gather

    def counting_all_gather(*args, **kwargs):  # the real collective, counted
        calls.append(1)
        return real_all_gather(*args, **kwargs)

    dist.all_gather = counting_all_gather
    try:
        banks = [MemoryBank(D, 64, ROWS, ROWS, pseudo_k=1, pseudo_threshold=0.0,
                            pseudo_center=True, pseudo_image_k=0, faiss_threads=1, seed=0)
                 if rank == 0 else None for _ in range(2)]
        push_teacher(banks[0], *_push_inputs(rank))
        bucketed = len(calls)
        _push_per_tensor(banks[1], *_push_inputs(rank))
        # mixed dtypes and shapes through the helper itself
        g = torch.Generator().manual_seed(10 + rank)
        mixed = [torch.randn(3, 2, 5, generator=g, dtype=torch.float64),
                 torch.randint(-9, 9, (3,), generator=g, dtype=torch.int32),
                 torch.randn(2, 4, generator=g, dtype=torch.float64)]
        calls.clear()
        many = all_gather_many(mixed)
        result = {"bucketed_calls": bucketed, "many_calls": len(calls),
                  "many_equal": all(torch.equal(a, all_gather_no_grad(t))
                                    for a, t in zip(many, mixed))}
        if rank == 0:
            result["banks"] = [{k: torch.from_numpy(np.asarray(v)) for k, v in
                                bank.state_dict().items() if np.asarray(v).dtype.kind in "biuf"}
                               for bank in banks]
        return result
    finally:
        dist.all_gather = real_all_gather


@pytest.mark.slow
def test_bucketed_teacher_push_pushes_what_per_tensor_gathers_pushed():
    ranks = run_gloo_ranks(_push_worker, WORLD)
    assert all(r["bucketed_calls"] == 2 and r["many_calls"] == 2 and r["many_equal"]
               for r in ranks)  # one gather per dtype instead of one per tensor
    bucketed, per_tensor = ranks[0]["banks"]
    assert bucketed.keys() == per_tensor.keys()
    for key in bucketed:
        assert torch.equal(bucketed[key], per_tensor[key]), key
    # and both hold every rank's entries in rank order: source then target, per modality
    inputs = [_push_inputs(r) for r in range(WORLD)]
    for modality in ("image", "text"):
        expected = torch.cat([inputs[r][0][f"{domain}_{modality}"] for domain in ("src", "tgt")
                              for r in range(WORLD)])
        assert torch.equal(bucketed[f"{modality}_features"][:len(expected)], expected)
    expected_rows = torch.cat([inputs[r][3]["text_rows"] for r in range(WORLD)])
    assert torch.equal(bucketed["text_indices"][WORLD * B:2 * WORLD * B], expected_rows)


@pytest.mark.slow
def test_gckd_overhead_benchmark_smoke(ray_session):
    from benchmarks import gckd_overhead

    result = gckd_overhead.main(["--smoke"])
    parts = result["ms_per_step"]
    assert set(parts) == {"push", "snapshot", "pseudo_id_refresh", "knn_graph_build"}
    assert all(v > 0 for v in parts.values()) and result["compute_ms"] > 0
    assert result["graph_nodes"] == 4 * 8 + 4 * 8       # batch 8 per domain and modality + C
    assert 0 < result["memory_and_graph_share"] < 1


def test_refreshes_start_on_the_pseudo_every_schedule_and_never_without_pseudo_ids():
    cfg = load_config(None, ["gckd.snapshot_every=5", "gckd.pseudo_every=20"])
    steps = 31  # reads at steps 0, 5, ..., 30 of each epoch
    due = [(e, s) for e in range(2) for s in range(0, steps, 5) if refresh_due(e, s, steps, cfg)]
    # global steps 20, 40 (epoch 1 step 9 -> read at 10), 60 (step 29 -> read at 30)
    assert due == [(0, 20), (1, 10), (1, 30)]
    off = load_config(None, ["gckd.snapshot_every=5", "gckd.pseudo_every=20",
                             "gckd.use_pseudo_ids=false"])
    assert not any(refresh_due(e, s, steps, off) for e in range(2) for s in range(0, steps, 5))


def test_without_target_losses_the_step_runs_with_no_memory():
    cfg = load_config(None, ["distill.mode=none", "graph.enabled=false",
                             "matching.enabled=false", "gckd.snapshot_every=1",
                             "gckd.pseudo_every=1"])  # use_pseudo_ids stays on: still no refresh
    assert not any(refresh_due(e, s, 10, cfg) for e in range(2) for s in range(10))
    assert not cfg.uses_memory  # the driver starts no memory actor for this config
    steps = GCKDSteps(split=None, sampler=None, feed=None, memory=None, augment=None,
                      cfg=cfg, device=torch.device("cpu"), rank=0, log=None)
    emas = []

    class Distiller(torch.nn.Module):
        def forward(self, source, target, memory, adapt):
            assert memory is None
            return type("Out", (), {"losses": {"loss": torch.zeros(())}, "stats": {},
                                    "teacher": {}})()

        def ema_step(self):
            emas.append(True)
    steps.adapt = True
    for step in range(3):  # every step a snapshot step and the pusher is rank 0
        steps.forward(Distiller(), (None, {}, {}), epoch=1, step=step, steps=10).after_step(True)
    steps.end_epoch()
    assert emas == [True] * 3  # the teacher still follows (it feeds the domain means)
