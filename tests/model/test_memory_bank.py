"""The memory bank without Ray: FIFO queues, target tables, snapshots, pseudo-id refreshes
(at once, and pipelined with a lag, across a resume), save/load (model/memory_bank.py)."""

import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from gckd_ray.checkpoint_format import MEMORY_FILE
from gckd_ray.model import pseudo_refresh
from gckd_ray.model.centring import SOURCE, TARGET
from gckd_ray.model.memory_bank import MODALITIES, PENDING_KEYS, MemoryBank

D = 16
# The refresh settings these tests were written for (the config owns the run's values).
REFRESH = dict(pseudo_k=5, pseudo_threshold=0.5, pseudo_center=True, pseudo_image_k=0,
               faiss_threads=1, seed=0)


def make_bank(queue_size: int, num_target_images: int, num_target_texts: int,
              **kw) -> MemoryBank:
    return MemoryBank(D, queue_size, num_target_images, num_target_texts, **{**REFRESH, **kw})


def load(directory) -> MemoryBank:
    return MemoryBank.load(directory, pseudo_center=True, pseudo_image_k=0, faiss_threads=1)


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
    bank = make_bank(queue_size=8, num_target_images=4, num_target_texts=4)
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
    bank = make_bank(queue_size=16, num_target_images=6, num_target_texts=6, pseudo_k=2,
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
    bank = make_bank(queue_size=4, num_target_images=6, num_target_texts=3)
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
def clustered_bank(order_seed: int = 0, **kw) -> tuple[MemoryBank, dict]:
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
    bank = make_bank(queue_size=64, num_target_images=12, num_target_texts=18,
                     **{"pseudo_k": 5, "pseudo_threshold": 0.5, **kw})
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


def test_the_clustered_search_above_the_exact_size_finds_the_same_clusters():
    bank, _ = clustered_bank()
    exact = bank.refresh_pseudo_ids()
    # 17 captions: 4 clusters; probing all 4 compares every pair, probing 2 still separates
    # these well-apart groups
    for probes in (4, 2):
        clustered, _ = clustered_bank(pseudo_probes=probes, pseudo_exact_pairs=11 * 17 - 1)
        stats = clustered.refresh_pseudo_ids()
        assert all(np.array_equal(a, b) for a, b in zip(bank.pseudo_ids(), clustered.pseudo_ids()))
        assert {k: v for k, v in stats.items() if k != "seconds"} == \
            {k: v for k, v in exact.items() if k != "seconds"}
    assert make_bank(8, 2, 2, pseudo_probes=0).pseudo_probes == 0
    with pytest.raises(ValueError, match="refresh_lag"):
        make_bank(8, 2, 2, refresh_lag=-1)


def test_target_labels_never_reach_the_bank():
    bank = make_bank(queue_size=8, num_target_images=4, num_target_texts=4)
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


def test_modality_gap_still_yields_cross_modal_pseudo_ids():
    # Texts sit in their own cone (a shared offset): every image's nearest node overall is
    # another image, yet each image and its caption are mutual cross-modal neighbours.
    rng = np.random.default_rng(0)
    centres = rng.normal(size=(20, D))
    images = unit(centres + 0.1 * rng.normal(size=(20, D)) + 3 * np.eye(D)[0])
    texts = unit(centres + 0.1 * rng.normal(size=(20, D)) - 3 * np.eye(D)[0])
    bank = make_bank(queue_size=64, num_target_images=20, num_target_texts=20, pseudo_k=1,
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
    loaded = load(tmp_path)
    a, b = bank.state_dict(), loaded.state_dict()
    assert set(a) == set(b) == set(MemoryBank._state_keys())
    for key in a:
        np.testing.assert_array_equal(a[key], b[key], err_msg=key)
    s1, s2 = bank.snapshot(), loaded.snapshot()
    assert all(np.array_equal(s1[k], s2[k]) for k in s1)
    source_push(loaded, "image", [999])  # keeps working where it left off
    assert loaded.snapshot()["image_indices"][-1] == 999 and loaded.version == bank.version + 1
    with pytest.raises(ValueError, match="queue_size"):
        make_bank(queue_size=32, num_target_images=12, num_target_texts=18).load_state_dict(a)


def test_paired_variant_groups_captions_with_their_images_and_survives_save(tmp_path):
    pairs = np.array([2, 0, 1, 1, 0])  # caption row -> image row
    bank = make_bank(queue_size=16, num_target_images=3, num_target_texts=5,
                     target_pairs=pairs)
    stats = bank.refresh_pseudo_ids()  # needs no features: the pairs are known
    snap = bank.snapshot()
    assert snap["target_image_pseudo_ids"].tolist() == [0, 1, 2]
    assert snap["target_text_pseudo_ids"].tolist() == pairs.tolist()
    assert stats["text_coverage"] == stats["image_coverage"] == 1.0
    bank.save(tmp_path)
    loaded = load(tmp_path)
    assert loaded.target_pairs.tolist() == pairs.tolist()
    assert load(tmp_path).snapshot()["target_text_pseudo_ids"].tolist() == [2, 0, 1, 1, 0]
    with pytest.raises(ValueError, match="target_pairs must map each of the 5 target captions"):
        make_bank(queue_size=16, num_target_images=3, num_target_texts=5,
                  target_pairs=np.array([0, 1, 3, 0, 0]))


def test_load_reports_missing_and_truncated_files(tmp_path):
    with pytest.raises(FileNotFoundError, match=MEMORY_FILE):
        load(tmp_path)
    bank, _ = clustered_bank()
    path = bank.save(tmp_path)
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(ValueError, match=f"{MEMORY_FILE}.*unreadable"):
        load(tmp_path)


def test_float16_storage_is_consistent(tmp_path):
    bank = make_bank(queue_size=8, num_target_images=2, num_target_texts=2,
                     feature_dtype="float16")
    target_push(bank, "image", unit(np.ones((2, D))), [0, 1])
    assert bank.snapshot()["image_features"].dtype == np.float16
    bank.save(tmp_path)
    assert load(tmp_path).snapshot()["image_features"].dtype == np.float16


def test_refresh_reports_its_wall_time_and_counts():
    bank, _ = clustered_bank()
    stats = bank.refresh_pseudo_ids()
    assert set(stats) == {"num_clusters", "image_coverage", "text_coverage",
                          "mean_cluster_size", "num_nodes", "num_edges", "seconds"}
    assert stats["seconds"] > 0 and stats["num_nodes"] == 11 + 17 and stats["num_edges"] > 0
    assert make_bank(8, 2, 2, target_pairs=np.array([0, 1])).refresh_pseudo_ids()["seconds"] >= 0


def test_refresh_settings_come_from_the_caller():
    with pytest.raises(TypeError, match="pseudo_k"):
        MemoryBank(D, 8, 2, 2)  # no hidden defaults for what the config owns
    with pytest.raises(ValueError, match="faiss_threads"):
        make_bank(8, 2, 2, faiss_threads=-1)


def test_the_bank_and_the_pseudo_id_graph_import_no_ray():
    code = ("import sys; import gckd_ray.model.memory_bank, gckd_ray.model.pseudo_ids; "
            "print(sorted(m for m in ('ray', 'deepspeed') if m in sys.modules))")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          cwd=Path(__file__).resolve().parents[2], timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.strip() == "[]"


# ---------------------------------------------------------------------- pipelined refresh
READ_EVERY, REFRESH_EVERY, LAG = 2, 4, 6


def push_step(bank: MemoryBank, step: int) -> None:
    """The step's pushes, a function of the step alone: source rows and 6 of the 10 target rows
    of each modality, moved a little each step."""
    rng = np.random.default_rng(step)
    for m in MODALITIES:
        source_push(bank, m, rng.integers(0, 50, 4))
        rows = rng.choice(10, 6, replace=False)
        target_push(bank, m, unit(np.eye(D)[rows % 4] + 0.3 * rng.normal(size=(6, D))), rows)


def run_schedule(bank: MemoryBank, first: int, last: int, log: list) -> None:
    """Steps ``first`` .. ``last`` - 1 of a fake training loop: a read every READ_EVERY steps
    (a refresh starts every REFRESH_EVERY steps), then the step's pushes. Logs per read the
    step, the published snapshot and what the refreshes applied there found."""
    for step in range(first, last):
        if step % READ_EVERY == 0:
            applied = bank.refresh_on_schedule(step, start=step > 0 and step % REFRESH_EVERY == 0)
            log.append((step, bank.snapshot(), [without_timing(a) for a in applied]))
        push_step(bank, step)


def without_timing(stats: dict) -> dict:
    return {k: v for k, v in stats.items() if k not in ("seconds", "wait_seconds")}


def lagged_bank(lag: int = LAG) -> MemoryBank:
    return make_bank(queue_size=24, num_target_images=10, num_target_texts=10, pseudo_k=2,
                     pseudo_threshold=0.0, refresh_lag=lag)


def assert_same_logs(a: list, b: list) -> None:
    assert [step for step, _, _ in a] == [step for step, _, _ in b]
    for (step, snap_a, applied_a), (_, snap_b, applied_b) in zip(a, b):
        assert applied_a == applied_b, step
        for key in snap_a:
            np.testing.assert_array_equal(snap_a[key], snap_b[key], err_msg=f"{key} at {step}")


def test_a_lagged_refresh_is_applied_lag_steps_later_on_the_tables_of_its_start():
    bank, log = lagged_bank(), []
    run_schedule(bank, 0, 13, log)  # refreshes start at 4, 8, 12; the one of 4 applies at 10
    applied = {step: [a["started_step"] for a in done] for step, _, done in log if done}
    assert applied == {10: [4.0]}
    assert bank.stats()["pending_refreshes"] == 2 and bank.pseudo_version == 1
    # what a synchronous refresh of the memory as it was before step 4 gives
    reference = lagged_bank(lag=0)
    run_schedule(reference, 0, 4, [])
    reference.refresh_pseudo_ids()
    published = dict((step, snap) for step, snap, _ in log)
    for m in MODALITIES:
        ids = reference.pseudo_ids()[MODALITIES.index(m)]
        np.testing.assert_array_equal(published[10][f"target_{m}_pseudo_ids"], ids)
        assert (published[8][f"target_{m}_pseudo_ids"] == -1).all()  # not before step 10
    # the tables moved since step 4: a refresh of the memory at step 10 would differ
    now = lagged_bank(lag=0)
    run_schedule(now, 0, 10, [])
    now.refresh_pseudo_ids()
    assert not all(np.array_equal(a, b) for a, b in zip(now.pseudo_ids(), reference.pseudo_ids()))


def test_lag_zero_is_the_synchronous_refresh():
    a, b = lagged_bank(lag=0), lagged_bank(lag=0)
    run_schedule(a, 0, 4, [])
    run_schedule(b, 0, 4, [])
    (applied,) = a.refresh_on_schedule(4, start=True)
    expected = b.refresh_pseudo_ids()
    assert without_timing(applied) == {**without_timing(expected), "started_step": 4.0}
    assert applied["wait_seconds"] < 0.1
    assert all(np.array_equal(x, y) for x, y in zip(a.pseudo_ids(), b.pseudo_ids()))
    assert a.stats()["pending_refreshes"] == 0


def test_a_late_refresh_is_waited_for_and_applied_all_the_same(monkeypatch):
    fast, log_fast = lagged_bank(), []
    run_schedule(fast, 0, 12, log_fast)
    graph_ids = pseudo_refresh.graph_ids

    def slow_graph_ids(*args):
        time.sleep(0.5)
        return graph_ids(*args)

    monkeypatch.setattr(pseudo_refresh, "graph_ids", slow_graph_ids)
    slow, log_slow = lagged_bank(), []
    tables = dict(slow._table)
    for step in range(0, 12):  # runs on while a refresh sleeps: its pushes must not reach it
        if step % READ_EVERY == 0:
            applied = slow.refresh_on_schedule(step, step > 0 and step % REFRESH_EVERY == 0)
            log_slow.append((step, slow.snapshot(), [without_timing(a) for a in applied]))
            if applied:
                assert applied[0]["wait_seconds"] > 0.1
        push_step(slow, step)
    assert_same_logs(log_fast, log_slow)
    # pushes wrote the tables in place: the refresh reads its own replica, never these
    assert all(slow._table[m] is tables[m] for m in MODALITIES)


@pytest.mark.parametrize("stop", [5, 9, 11])  # between a start and its apply, and with two
def test_a_resumed_lagged_run_publishes_exactly_what_an_uninterrupted_one_does(tmp_path, stop):
    whole, whole_log = lagged_bank(), []
    run_schedule(whole, 0, 24, whole_log)
    first, log = lagged_bank(), []
    run_schedule(first, 0, stop, log)
    assert first.stats()["pending_refreshes"] >= 1  # started, not applied yet
    first.save(tmp_path)  # waits for the computing refreshes and saves their results
    assert set(PENDING_KEYS) <= set(np.load(tmp_path / MEMORY_FILE).files)
    resumed = MemoryBank.load(tmp_path, pseudo_center=True, pseudo_image_k=0, faiss_threads=1,
                              refresh_lag=LAG)
    assert resumed.stats()["pending_refreshes"] == first.stats()["pending_refreshes"]
    run_schedule(resumed, stop, 24, log)
    assert_same_logs(whole_log, log)
    # and loading a state into a bank with refreshes of its own in flight drops those
    busy = lagged_bank()
    run_schedule(busy, 0, 13, [])
    busy.load_state_dict(first.state_dict())
    assert busy.stats()["pending_refreshes"] == first.stats()["pending_refreshes"]


def test_states_saved_before_the_pipelined_refresh_still_load():
    bank = lagged_bank()
    run_schedule(bank, 0, 6, [])
    state = {k: v for k, v in bank.state_dict().items() if k not in PENDING_KEYS}
    fresh = lagged_bank()
    fresh.load_state_dict(state)
    assert fresh.stats()["pending_refreshes"] == 0 and fresh.version == bank.version
