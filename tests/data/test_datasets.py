"""Samplers and the target views: identity balance, rank sharding, no target labels."""

import random

import pytest
import torch

from gckd_ray.config import load_config
from gckd_ray.data.datasets import (IdentityBalancedSampler, UnpairedStreams, build_split,
                                    build_unpaired, check_batches_fit, sample_unpaired)
from gckd_ray.data.formats import DatasetFormatError, DomainRecords, Record
from gckd_ray.data.tokenizer import WordTokenizer


def test_identity_balanced_batches_and_rank_shards():
    labels = torch.arange(40).repeat_interleave(3)  # 40 ids x 3 captions
    samplers = [IdentityBalancedSampler(labels, 8, 2, seed=1, rank=r, world_size=2)
                for r in range(2)]
    per_rank = [s.epoch(0) for s in samplers]
    assert len(per_rank[0]) == len(per_rank[1]) == samplers[0].steps_per_epoch == 40 // 4 // 2
    seen = []
    for batches in per_rank:
        for b in batches:
            ids = labels[b]
            assert len(b) == 8 and len(ids.unique()) == 4
            assert all((ids == i).sum() == 2 for i in ids.unique())
            seen += ids.unique().tolist()
    assert len(seen) == len(set(seen))  # an identity lands in one batch of one rank per epoch
    assert all(torch.equal(a, b) for a, b in zip(per_rank[0], samplers[0].epoch(0)))
    assert not all(torch.equal(a, b) for a, b in zip(per_rank[0], samplers[0].epoch(1)))


def test_identity_with_too_few_captions_is_sampled_with_replacement():
    labels = torch.tensor([0, 1, 1, 1, 2, 2, 2, 3, 3, 3])
    batch = IdentityBalancedSampler(labels, 8, 2 * 2, seed=0).epoch(0)[0]
    assert (labels[batch] == 0).sum() in (0, 4)


def test_unpaired_streams_are_independent_and_sharded():
    streams = [UnpairedStreams(50, 100, 10, seed=3, rank=r, world_size=2) for r in range(2)]
    steps = [s.epoch(0, steps=2) for s in streams]
    images = torch.cat([i for rank in steps for i, _ in rank])
    captions = torch.cat([c for rank in steps for _, c in rank])
    assert len(images.unique()) == 40 and len(captions.unique()) == 40
    assert not torch.equal(images, captions[:40])


def _records(pairs, source="ann.json"):
    return DomainRecords(name="toy", split="train", skipped={}, records=[
        Record(image_path=f"/imgs/{img}.png", image_key=f"{img}.png", caption=cap, pid=pid,
               split="train", source=source, index=i)
        for i, (img, cap, pid) in enumerate(pairs)])


def test_unpaired_target_ignores_ids_and_pairing():
    pairs = [(f"im{i // 2}", f"person {i // 2} wears colour {i % 5}", i // 2) for i in range(20)]
    tok = WordTokenizer.build(c for _, c, _ in pairs)
    plain = build_unpaired(_records(pairs), tok, 12, (8, 4), cache_images=False)
    rng = random.Random(0)
    captions = [c for _, c, _ in pairs]
    rng.shuffle(captions)
    pid_perm = list(range(10))
    rng.shuffle(pid_perm)
    leaked = [(img, cap, 1000 + pid_perm[pid]) for (img, _, pid), cap in zip(pairs, captions)]
    shuffled = build_unpaired(_records(leaked), tok, 12, (8, 4), cache_images=False)
    assert plain.images.paths == shuffled.images.paths
    assert torch.equal(plain.captions.input_ids, shuffled.captions.input_ids)
    assert not hasattr(plain, "labels") and not hasattr(plain.images, "labels")
    assert plain.image_of is None


def test_paired_target_knows_pairs_but_not_ids():
    pairs = [(f"im{i // 2}", f"person {i // 2} wears colour {i % 5}", i // 2) for i in range(20)]
    tok = WordTokenizer.build(c for _, c, _ in pairs)
    target = build_unpaired(_records(pairs), tok, 12, (8, 4), cache_images=False, paired=True)
    for row, img in enumerate(target.image_of.tolist()):
        person_token = target.captions.input_ids[row, 2].item()  # [bos] person <n> ...
        person = tok.words[person_token - len(tok.SPECIALS)]
        assert target.images.paths[img] == f"/imgs/im{person}.png"
    relabelled = [(img, cap, 500 - pid) for img, cap, pid in pairs]
    other = build_unpaired(_records(relabelled), tok, 12, (8, 4), cache_images=False, paired=True)
    assert torch.equal(other.image_of, target.image_of)
    assert other.images.paths == target.images.paths


def test_label_free_sample_draws_images_and_captions_independently_of_ids_and_pairs():
    pairs = [(f"im{i // 2}", f"person {i // 2} wears colour {i % 5}", i // 2) for i in range(40)]
    tok = WordTokenizer.build(c for _, c, _ in pairs)
    sample = sample_unpaired(_records(pairs), tok, 12, (8, 4), False, n=6, seed=3)
    assert len(sample.images) == 6 and len(sample.captions) == 6 and sample.image_of is None
    full = build_unpaired(_records(pairs), tok, 12, (8, 4), cache_images=False)
    assert set(sample.images.paths) <= set(full.images.paths)
    again = sample_unpaired(_records(pairs), tok, 12, (8, 4), False, n=6, seed=3)
    assert again.images.paths == sample.images.paths
    assert torch.equal(again.captions.input_ids, sample.captions.input_ids)
    rng = random.Random(1)  # ids permuted and captions shuffled across images: same sample
    captions = [c for _, c, _ in pairs]
    rng.shuffle(captions)
    leaked = [(img, cap, 7 * pid + 1) for (img, _, pid), cap in zip(pairs, captions)]
    shuffled = sample_unpaired(_records(leaked), tok, 12, (8, 4), False, n=6, seed=3)
    assert shuffled.images.paths == sample.images.paths
    assert torch.equal(shuffled.captions.input_ids, sample.captions.input_ids)
    everything = sample_unpaired(_records(pairs), tok, 12, (8, 4), False, n=1000, seed=0)
    assert (len(everything.images), len(everything.captions)) == (20, 40)


def test_build_split_indexes_images_and_labels():
    pairs = [("a", "x one", 7), ("a", "x two", 7), ("b", "y", 3), ("c", "z", 7)]
    tok = WordTokenizer.build(c for _, c, _ in pairs)
    split = build_split(_records(pairs), tok, 6, (8, 4), cache_images=False)
    assert split.image_of.tolist() == [0, 0, 1, 2]
    assert split.labels.tolist() == [1, 1, 0, 1] and split.image_labels.tolist() == [1, 0, 1]
    assert split.num_ids == 2


def test_too_few_identities_for_a_batch_on_every_worker_is_refused_with_the_fix():
    records = [Record(image_path=f"/d/{i}.jpg", image_key=f"{i}.jpg", caption="a man",
                      pid=i // 2, split="train", source="/d/reid_raw.json", index=i)
               for i in range(26)]  # 13 identities
    domain = DomainRecords(name="cuhk-pedes", split="train", records=records)
    check_batches_fit(load_config(None, ["train.batch_size=12", "train.num_workers=2"]), domain)
    with pytest.raises(DatasetFormatError, match=r"cuhk-pedes/train: 13 identities, but "
                       r"train.batch_size=32 .* needs 16 per batch on each of "
                       r"train.num_workers=2 workers \(32\); set train.batch_size=12"):
        check_batches_fit(load_config(None, ["train.batch_size=32"]), domain)


def test_caption_epochs_see_every_caption_once_in_identity_balanced_batches():
    counts = torch.tensor([1, 2, 3, 4, 5, 7] * 10)  # 60 ids, 220 captions
    labels = torch.arange(60).repeat_interleave(counts)
    samplers = [IdentityBalancedSampler(labels, 8, 2, seed=1, rank=r, world_size=2,
                                        unit="captions") for r in range(2)]
    groups = int((-(-counts // 2)).sum())  # captions in groups of 2 per identity
    assert samplers[0].steps_per_epoch == groups // 4 // 2
    batches = [b for s in samplers for b in s.epoch(0)]
    assert all(len(b) == 8 and len(labels[b].unique()) == 4 for b in batches)
    assert all((labels[b] == i).sum() == 2 for b in batches for i in labels[b].unique())
    seen = torch.cat(batches).unique()
    assert len(seen) >= 0.9 * len(labels)  # every caption once, but for the last batch's spill
    by_identities = IdentityBalancedSampler(labels, 8, 2, seed=1, world_size=2)
    assert samplers[0].steps_per_epoch > 1.5 * by_identities.steps_per_epoch
    assert all(torch.equal(a, b) for a, b in zip(samplers[1].epoch(0), samplers[1].epoch(0)))
