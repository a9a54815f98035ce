"""The momentum memory: the plain MemoryBank (queues, tables, pseudo-ids, save/load) without Ray,
then the Ray actor (client pushes, snapshot ObjectRef, restore after a kill) on a local Ray."""

import time
import uuid

import numpy as np
import pytest
import torch

from gckd_ray.checkpoint_format import MEMORY_FILE
from gckd_ray.distributed.memory import (
    MODALITIES, SOURCE, TARGET, MemoryBank, MemoryClient, connected_components,
    create_memory_actor, cross_modal_mutual_edges)

D = 16


def unit(x: np.ndarray) -> np.ndarray:
    return (x / np.linalg.norm(x, axis=-1, keepdims=True)).astype(np.float32)


def coded(indices) -> np.ndarray:
    """Features whose first column carries the item's index (to follow rows through the queue)."""
    f = np.zeros((len(indices), D), np.float32)
    f[:, 0] = indices
    return f


def source_push(bank, modality, indices, labels=None):
    indices = np.asarray(indices, np.int64)
    labels = indices % 7 if labels is None else np.asarray(labels, np.int64)
    bank.push(modality, coded(indices), SOURCE, labels, indices)


def target_push(bank, modality, features, rows):
    rows = np.asarray(rows, np.int64)
    bank.push(modality, features, TARGET, np.full(len(rows), -1, np.int64), rows)


# ---------------------------------------------------------------------- queues and snapshot
def test_fifo_wraps_around_keeping_the_newest_oldest_first():
    bank = MemoryBank(D, queue_size=8, num_target_images=4, num_target_texts=4)
    for start in range(0, 12, 3):  # 12 items through a queue of 8
        source_push(bank, "image", np.arange(start, start + 3))
    snap = bank.snapshot()
    assert snap["image_indices"].tolist() == list(range(4, 12))
    assert snap["image_features"][:, 0].tolist() == list(range(4, 12))
    assert snap["image_labels"].tolist() == [i % 7 for i in range(4, 12)]
    assert snap["text_features"].shape == (0, D) and snap["text_indices"].shape == (0,)

    source_push(bank, "image", np.arange(100, 110))  # one push larger than the queue
    assert bank.snapshot()["image_indices"].tolist() == list(range(102, 110))
    source_push(bank, "image", [200])
    assert bank.snapshot()["image_indices"].tolist() == [*range(103, 110), 200]


def test_snapshot_is_consistent_versioned_and_labels_targets_with_pseudo_ids():
    # Exact hand-built geometry: centring would collapse the two identical captions.
    bank = MemoryBank(D, queue_size=16, num_target_images=6, num_target_texts=6, pseudo_k=2,
                      pseudo_threshold=0.9, pseudo_center=False)
    assert int(bank.snapshot()["version"]) == 0
    source_push(bank, "image", [0, 1], labels=[3, 4])
    source_push(bank, "text", [0, 1, 2], labels=[3, 3, 4])
    centre = unit(np.eye(D)[0] + 0.0)
    target_push(bank, "image", np.stack([centre, unit(np.eye(D)[1])]), [2, 5])
    target_push(bank, "text", np.stack([centre, centre]), [4, 1])
    assert int(bank.snapshot()["version"]) == 4
    bank.refresh_pseudo_ids()
    snap = bank.snapshot()
    for m in MODALITIES:
        n = len(snap[f"{m}_indices"])
        assert {len(snap[f"{m}_{k}"]) for k in ("features", "domain", "labels")} == {n}
        assert all(snap[f"{m}_{k}"].flags.c_contiguous for k in ("features", "labels"))
    pids_img, pids_txt = bank.pseudo_ids()
    assert pids_img[2] >= 0 and pids_img[2] == pids_txt[4] == pids_txt[1] and pids_img[5] == -1
    assert snap["image_domain"].tolist() == [SOURCE, SOURCE, TARGET, TARGET]
    assert snap["image_labels"].tolist() == [3, 4, pids_img[2], -1]
    assert snap["text_labels"].tolist() == [3, 3, 4, pids_txt[4], pids_txt[1]]
    assert np.array_equal(snap["target_image_pseudo_ids"], pids_img)
    assert int(snap["pseudo_version"]) == 1
    snap["image_features"][:] = 7  # a copy: the bank is untouched
    assert not (bank.snapshot()["image_features"] == 7).any()
    stats = bank.stats()
    assert (stats["image_source"], stats["image_target"], stats["text_filled"]) == (2, 2, 5)
    assert stats["target_text_seen"] == 2 and stats["version"] == 4


def test_target_tables_keep_the_newest_feature_per_row():
    bank = MemoryBank(D, queue_size=4, num_target_images=6, num_target_texts=3)
    a, b, c, d = (unit(np.random.default_rng(s).normal(size=D)) for s in range(4))
    target_push(bank, "image", np.stack([a, b]), [3, 5])
    target_push(bank, "image", np.stack([c, d, a]), [3, 1, 1])  # row 1 twice: the last wins
    table, seen = bank.target_table("image")
    assert seen.tolist() == [False, True, False, True, False, True]
    np.testing.assert_array_equal(table[3], c)
    np.testing.assert_array_equal(table[5], b)
    np.testing.assert_array_equal(table[1], a)
    assert not bank.target_table("text")[1].any()


# ---------------------------------------------------------------------- pseudo-ids
def clustered_bank(order_seed: int = 0) -> tuple[MemoryBank, dict]:
    """3 image+text clusters, two more image+text clusters at cosine 0.3 (below the threshold
    but inside each other's kNN), a caption-only pair and an isolated image."""
    rng = np.random.default_rng(0)
    e = np.eye(D)
    centres = [e[0], e[1], e[2], e[3], 0.3 * e[3] + np.sqrt(1 - 0.09) * e[4]]
    images, texts, img_rows, txt_rows = [], [], [], []
    groups = {}
    for c, centre in enumerate(centres):
        ir, tr = [2 * c, 2 * c + 1], [3 * c, 3 * c + 1, 3 * c + 2]
        images += [unit(centre + 0.05 * rng.normal(size=D)) for _ in ir]
        texts += [unit(centre + 0.05 * rng.normal(size=D)) for _ in tr]
        img_rows += ir
        txt_rows += tr
        groups[c] = (ir, tr)
    texts += [unit(e[6] + 0.05 * rng.normal(size=D)) for _ in range(2)]  # captions only
    txt_rows += [15, 16]
    images.append(unit(e[7]))  # isolated image
    img_rows.append(10)
    bank = MemoryBank(D, queue_size=64, num_target_images=12, num_target_texts=18, pseudo_k=5,
                      pseudo_threshold=0.5)
    order = np.random.default_rng(order_seed).permutation
    pi, pt = order(len(images)), order(len(texts))
    target_push(bank, "image", np.stack(images)[pi], np.array(img_rows)[pi])
    target_push(bank, "text", np.stack(texts)[pt], np.array(txt_rows)[pt])
    return bank, groups


def test_pseudo_ids_are_cross_modal_components_of_the_mutual_knn_graph():
    bank, groups = clustered_bank()
    stats = bank.refresh_pseudo_ids()
    img, txt = bank.pseudo_ids()
    ids = []
    for c, (ir, tr) in groups.items():
        cluster = set(img[ir]) | set(txt[tr])
        assert len(cluster) == 1 and -1 not in cluster, f"cluster {c}: {cluster}"
        ids += list(cluster)
    assert sorted(ids) == list(range(5))  # distinct: nothing crossed the cosine-0.3 gap
    assert img[10] == -1 and img[11] == -1  # isolated / never pushed
    assert txt[15] == txt[16] == -1 and txt[17] == -1  # caption-only component / never pushed
    assert stats["num_clusters"] == 5 and stats["mean_cluster_size"] == 5.0
    assert stats["image_coverage"] == pytest.approx(10 / 12)
    assert stats["text_coverage"] == pytest.approx(15 / 18)


def test_pseudo_ids_are_deterministic_and_ignore_source_entries():
    bank, _ = clustered_bank(order_seed=0)
    bank.refresh_pseudo_ids()
    first = bank.pseudo_ids()
    bank.refresh_pseudo_ids()
    assert all(np.array_equal(a, b) for a, b in zip(first, bank.pseudo_ids()))
    other, _ = clustered_bank(order_seed=1)  # same data pushed in another order
    source_push(other, "image", np.arange(30), labels=np.zeros(30))  # one source "person"
    source_push(other, "text", np.arange(30), labels=np.zeros(30))
    other.refresh_pseudo_ids()
    assert all(np.array_equal(a, b) for a, b in zip(first, other.pseudo_ids()))


def test_target_labels_never_reach_the_bank():
    bank = MemoryBank(D, queue_size=8, num_target_images=4, num_target_texts=4)
    f = unit(np.ones((2, D)))
    with pytest.raises(ValueError, match="target labels"):
        bank.push("image", f, TARGET, np.array([0, 1]), np.array([0, 1]))
    with pytest.raises(ValueError, match="target labels"):
        bank.push("text", f, TARGET, np.array([-1, 2]), np.array([0, 1]))
    with pytest.raises(ValueError, match="out of range"):
        target_push(bank, "image", f, [0, 4])
    with pytest.raises(ValueError, match="modality"):
        bank.push("audio", f, SOURCE, np.array([0, 1]), np.array([0, 1]))
    with pytest.raises(ValueError, match="dim"):
        bank.push("image", np.ones((2, D + 1), np.float32), SOURCE, np.array([0, 1]),
                  np.array([0, 1]))
    assert bank.version == 0 and bank.stats()["image_filled"] == 0  # rejected pushes left no trace


def test_cross_modal_mutual_knn_and_components_against_brute_force():
    rng = np.random.default_rng(3)
    images, texts = unit(rng.normal(size=(40, 8))), unit(rng.normal(size=(30, 8)))
    k, thr = 4, 0.2
    edges = cross_modal_mutual_edges(images, texts, k, thr)
    sim = images @ texts.T
    texts_of = np.argsort(-sim, axis=1, kind="stable")[:, :k]
    images_of = np.argsort(-sim.T, axis=1, kind="stable")[:, :k]
    expected = {(i, 40 + t) for i in range(40) for t in texts_of[i]
                if i in images_of[t] and sim[i, t] >= thr}
    assert set(map(tuple, edges.tolist())) == expected and expected
    labels = connected_components(7, np.array([[5, 6], [0, 3], [3, 1], [6, 4]]))
    assert labels.tolist() == [0, 0, 2, 0, 4, 4, 4]
    assert connected_components(3, np.zeros((0, 2), np.int64)).tolist() == [0, 1, 2]
    assert len(cross_modal_mutual_edges(images[:0], texts, k, thr)) == 0


def test_modality_gap_still_yields_cross_modal_pseudo_ids():
    # Texts sit in their own cone (a shared offset): every image's nearest node overall is
    # another image, yet each image and its caption are mutual cross-modal neighbours.
    rng = np.random.default_rng(0)
    centres = rng.normal(size=(20, D))
    images = unit(centres + 0.1 * rng.normal(size=(20, D)) + 3 * np.eye(D)[0])
    texts = unit(centres + 0.1 * rng.normal(size=(20, D)) - 3 * np.eye(D)[0])
    bank = MemoryBank(D, queue_size=64, num_target_images=20, num_target_texts=20, pseudo_k=1,
                      pseudo_threshold=-1.0)
    target_push(bank, "image", images, range(20))
    target_push(bank, "text", texts, range(20))
    stats = bank.refresh_pseudo_ids()
    pids_img, pids_txt = bank.pseudo_ids()
    assert stats["num_clusters"] == 20 and (pids_img == pids_txt).all() and (pids_img >= 0).all()


# ---------------------------------------------------------------------- save / load
def test_save_load_round_trip(tmp_path):
    bank, _ = clustered_bank()
    source_push(bank, "image", np.arange(70))  # wraps the 64-entry queue
    bank.refresh_pseudo_ids()
    path = bank.save(tmp_path)
    assert path == tmp_path / MEMORY_FILE and not list(tmp_path.glob("*.tmp"))
    loaded = MemoryBank.load(tmp_path)
    a, b = bank.state_dict(), loaded.state_dict()
    assert set(a) == set(b) == set(MemoryBank._state_keys())
    for key in a:
        np.testing.assert_array_equal(a[key], b[key], err_msg=key)
    s1, s2 = bank.snapshot(), loaded.snapshot()
    assert all(np.array_equal(s1[k], s2[k]) for k in s1)
    source_push(loaded, "image", [999])  # keeps working where it left off
    assert loaded.snapshot()["image_indices"][-1] == 999 and loaded.version == bank.version + 1
    with pytest.raises(ValueError, match="queue_size"):
        MemoryBank(D, queue_size=32, num_target_images=12, num_target_texts=18).load_state_dict(a)


def test_paired_variant_groups_captions_with_their_images_and_survives_save(tmp_path):
    pairs = np.array([2, 0, 1, 1, 0])  # caption row -> image row
    bank = MemoryBank(D, queue_size=16, num_target_images=3, num_target_texts=5,
                      target_pairs=pairs)
    stats = bank.refresh_pseudo_ids()  # needs no features: the pairs are known
    snap = bank.snapshot()
    assert snap["target_image_pseudo_ids"].tolist() == [0, 1, 2]
    assert snap["target_text_pseudo_ids"].tolist() == pairs.tolist()
    assert stats["text_coverage"] == stats["image_coverage"] == 1.0
    bank.save(tmp_path)
    loaded = MemoryBank.load(tmp_path)
    assert loaded.target_pairs.tolist() == pairs.tolist()
    assert MemoryBank.load(tmp_path).snapshot()["target_text_pseudo_ids"].tolist() == [2, 0, 1, 1, 0]
    with pytest.raises(ValueError, match="target_pairs must map each of the 5 target captions"):
        MemoryBank(D, queue_size=16, num_target_images=3, num_target_texts=5,
                   target_pairs=np.array([0, 1, 3, 0, 0]))


def test_load_reports_missing_and_truncated_files(tmp_path):
    with pytest.raises(FileNotFoundError, match=MEMORY_FILE):
        MemoryBank.load(tmp_path)
    bank, _ = clustered_bank()
    path = bank.save(tmp_path)
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(ValueError, match=f"{MEMORY_FILE}.*unreadable"):
        MemoryBank.load(tmp_path)


def test_float16_storage_is_consistent(tmp_path):
    bank = MemoryBank(D, queue_size=8, num_target_images=2, num_target_texts=2,
                      feature_dtype="float16")
    target_push(bank, "image", unit(np.ones((2, D))), [0, 1])
    assert bank.snapshot()["image_features"].dtype == np.float16
    bank.save(tmp_path)
    assert MemoryBank.load(tmp_path).snapshot()["image_features"].dtype == np.float16


# ---------------------------------------------------------------------- Ray actor
def pushes(seed: int = 0, steps: int = 6, batch: int = 8):
    """A reproducible stream of (modality, features, domain, labels, indices)."""
    rng = np.random.default_rng(seed)
    for step in range(steps):
        for m in MODALITIES:
            f = torch.from_numpy(unit(rng.normal(size=(batch, D))))
            yield m, f, SOURCE, torch.arange(batch) % 3, torch.arange(batch) + step * batch
            t = f + 0.05 * torch.from_numpy(rng.normal(size=(batch, D)).astype(np.float32))
            rows = torch.from_numpy(rng.choice(40, batch, replace=False))
            yield m, t / t.norm(dim=1, keepdim=True), TARGET, torch.full((batch,), -1), rows


def make_actor(tmp_path, **kw):
    args = dict(dim=D, queue_size=32, num_target_images=40, num_target_texts=40,
                restore_from=str(tmp_path / "memory"), pseudo_k=3, pseudo_threshold=0.5)
    return create_memory_actor(f"test-memory-{uuid.uuid4().hex[:8]}", **{**args, **kw})


@pytest.mark.slow
def test_actor_snapshot_matches_the_plain_bank(ray_session, tmp_path):
    ray = ray_session
    actor = make_actor(tmp_path)
    bank = MemoryBank(D, queue_size=32, num_target_images=40, num_target_texts=40, pseudo_k=3,
                      pseudo_threshold=0.5)
    client = MemoryClient(actor, max_in_flight=2)
    for m, f, dom, lab, idx in pushes():
        client.push(m, f, dom, lab, idx)
        assert client.in_flight <= 2
        bank.push(m, f.numpy(), dom, lab.numpy(), idx.numpy())
    client.flush()
    assert client.in_flight == 0
    assert ray.get(actor.refresh_pseudo_ids.remote()) == bank.refresh_pseudo_ids()
    snap, expected = client.snapshot(), bank.snapshot()
    assert set(snap) == set(expected) and int(snap["version"]) == 24
    for key, value in expected.items():
        assert isinstance(snap[key], torch.Tensor)
        np.testing.assert_array_equal(snap[key].numpy(), value, err_msg=key)
    refs = [ray.get(actor.snapshot_ref.remote())[0] for _ in range(2)]
    assert refs[0].hex() == refs[1].hex()  # one put per version
    with pytest.raises(ValueError, match="target labels"):  # checked before sending
        client.push("image", torch.zeros(2, D), TARGET, torch.tensor([0, 1]), torch.tensor([0, 1]))
    ray.kill(actor)


@pytest.mark.slow
def test_killed_actor_restarts_with_the_saved_queue(ray_session, tmp_path):
    ray = ray_session
    actor = make_actor(tmp_path, max_restarts=1)
    client = MemoryClient(actor)
    stream = list(pushes(seed=1))
    for item in stream[:12]:
        client.push(*item)
    client.flush()
    ray.get(actor.refresh_pseudo_ids.remote())
    saved = client.snapshot()
    assert ray.get(actor.autosave.remote()).endswith(MEMORY_FILE)
    for item in stream[12:]:  # after the save: lost by the kill
        client.push(*item)
    client.flush()
    ray.kill(actor, no_restart=False)
    # ray.kill is asynchronous: the old process may still answer; poll until the restarted one
    # (its __init__ found memory.npz) does.
    deadline, ready = time.monotonic() + 30, {"restored": False}
    while not ready["restored"]:
        assert time.monotonic() < deadline, "memory actor did not come back restored"
        try:
            ready = ray.get(actor.ready.remote(), timeout=5)
        except (ray.exceptions.RayActorError, ray.exceptions.GetTimeoutError):
            time.sleep(0.2)
    assert ready["version"] == 12
    restored = client.snapshot()
    for key, value in saved.items():
        assert torch.equal(restored[key], value), key
    ray.kill(actor)


@pytest.mark.slow
def test_memory_timings_at_full_size(ray_session, tmp_path):
    """Prints push / snapshot times at 65,536 x 512 per modality (DESIGN.md §7); asserts none."""
    ray = ray_session
    dim, queue, chunk = 512, 65_536, 8_192
    rng = np.random.default_rng(0)
    block = unit(rng.normal(size=(chunk, dim)))
    labels, rows = np.zeros(chunk, np.int64), np.arange(chunk, dtype=np.int64)
    bank = MemoryBank(dim, queue, num_target_images=16, num_target_texts=16)
    actor = make_actor(tmp_path, dim=dim, queue_size=queue, num_target_images=16,
                       num_target_texts=16)
    client = MemoryClient(actor)
    for m in MODALITIES:
        for _ in range(queue // chunk):
            bank.push(m, block, SOURCE, labels, rows)
            client.push(m, torch.from_numpy(block), SOURCE, labels, rows)
    client.flush()
    small = torch.from_numpy(block[:256])

    def timed(fn, repeat=5):
        fn()  # warm
        start = time.perf_counter()
        for _ in range(repeat):
            fn()
        return 1e3 * (time.perf_counter() - start) / repeat

    def actor_push():
        client.push("image", small, SOURCE, labels[:256], rows[:256])
        client.flush()

    def actor_snapshot():  # a new version each time, so the actor puts a fresh snapshot
        actor_push()
        return client.snapshot()

    times = {
        "bank_push_256x512_ms": timed(lambda: bank.push("image", block[:256], SOURCE,
                                                        labels[:256], rows[:256])),
        "bank_snapshot_65536x512x2_ms": timed(bank.snapshot, repeat=3),
        "actor_push_256x512_roundtrip_ms": timed(actor_push),
        "actor_push_plus_snapshot_65536x512x2_ms": timed(actor_snapshot, repeat=3),
        "actor_snapshot_cached_ref_ms": timed(client.snapshot),
    }
    snap = client.snapshot()
    assert snap["image_features"].shape == snap["text_features"].shape == (queue, dim)
    print("\nmemory timings:", {k: round(v, 2) for k, v in times.items()})
    ray.kill(actor)
