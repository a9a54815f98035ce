"""The memory actor through its client on a local Ray: pushes, snapshots and publications,
refreshes (at once and pipelined, across a resume), restore after a kill; and the client as the
package's only caller of the actor."""

import re
import time
import uuid
from pathlib import Path

import numpy as np
import pytest
import torch

import gckd_ray
from gckd_ray.checkpoint_format import MEMORY_FILE
from gckd_ray.distributed import memory
from gckd_ray.distributed.memory import MemoryClient
from gckd_ray.model.centring import SOURCE, TARGET
from gckd_ray.model.memory_bank import MODALITIES, MemoryBank

D = 16
REFRESH = dict(pseudo_k=3, pseudo_threshold=0.5, pseudo_center=True, pseudo_image_k=0,
               faiss_threads=1, seed=0)


def unit(x: np.ndarray) -> np.ndarray:
    return (x / np.linalg.norm(x, axis=-1, keepdims=True)).astype(np.float32)


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


def make_client(tmp_path, **kw) -> MemoryClient:
    args = dict(dim=D, queue_size=32, num_target_images=40, num_target_texts=40,
                restore_from=str(tmp_path / "memory"), max_restarts=3, **REFRESH)
    return MemoryClient.create(f"test-memory-{uuid.uuid4().hex[:8]}", **{**args, **kw})


def without_seconds(stats: dict) -> dict:
    return {k: v for k, v in stats.items() if k not in ("seconds", "wait_seconds")}


def test_no_module_but_the_client_calls_the_memory_actor():
    package = Path(gckd_ray.__file__).resolve().parent
    # an actor method call (handle.method.remote(...)), killing or looking up an actor
    call = re.compile(r"\w+\.\w+\.remote\(|\bray\.kill\(|\bget_actor\(|\bMemoryActor\b")
    offenders = [f"{path.relative_to(package.parent)}: {m.group(0)}"
                 for path in sorted(package.rglob("*.py"))
                 if path != Path(memory.__file__).resolve()
                 for m in call.finditer(path.read_text())]
    assert offenders == []
    found = {m.group(0) for m in call.finditer(Path(memory.__file__).read_text())}
    assert {"ray.kill(", "get_actor(", "MemoryActor"} <= found  # the pattern finds real calls
    assert any(f.endswith(".remote(") for f in found)


@pytest.mark.slow
def test_actor_snapshot_matches_the_plain_bank(ray_session, tmp_path):
    client = make_client(tmp_path)
    bank = MemoryBank(D, 32, 40, 40, **REFRESH)
    client.max_in_flight = 2
    for m, f, dom, lab, idx in pushes():
        client.push(m, f, dom, lab, idx)
        assert client.in_flight <= 2
        bank.push(m, f.numpy(), dom, lab.numpy(), idx.numpy())
    client.flush()
    assert client.in_flight == 0
    refreshed = client.refresh()
    assert without_seconds(refreshed) == without_seconds(bank.refresh_pseudo_ids())
    assert refreshed["seconds"] > 0
    snap, expected = client.snapshot(), bank.snapshot()
    assert set(snap) == set(expected) and int(snap["version"]) == 24
    for key, value in expected.items():
        assert isinstance(snap[key], torch.Tensor)
        np.testing.assert_array_equal(snap[key].numpy(), value, err_msg=key)
    refs = [ray_session.get(client.actor.snapshot_ref.remote())[0] for _ in range(2)]
    assert refs[0].hex() == refs[1].hex()  # one put per version
    with pytest.raises(ValueError, match="target labels"):  # checked before sending
        client.push("image", torch.zeros(2, D), TARGET, torch.tensor([0, 1]), torch.tensor([0, 1]))
    client.shutdown()


@pytest.mark.slow
def test_read_flushes_refreshes_then_publishes(ray_session, tmp_path):
    client = make_client(tmp_path)
    bank = MemoryBank(D, 32, 40, 40, **REFRESH)
    for m, f, dom, lab, idx in pushes(seed=2):
        client.push(m, f, dom, lab, idx)  # not flushed: read flushes
        bank.push(m, f.numpy(), dom, lab.numpy(), idx.numpy())
    first, none = client.read(refresh=False, step=0)
    assert none == [] and client.in_flight == 0
    assert int(client.snapshot(first)["pseudo_version"]) == 0
    second, (stats,) = client.read(refresh=True, step=2)  # lag 0: applied at once
    assert second == first + 1
    assert without_seconds(stats) == {**without_seconds(bank.refresh_pseudo_ids()),
                                      "started_step": 2.0}
    published = client.snapshot(second)  # the refresh is in the publication that follows it
    assert int(published["pseudo_version"]) == 1
    assert np.array_equal(published["target_text_pseudo_ids"].numpy(), bank.pseudo_ids()[1])
    state = client.state()
    assert int(state["pseudo_version"]) == 1 and set(state) == set(bank.state_dict())
    client.push(*next(pushes(seed=3)))
    client.load_state(state)  # back to the state before that push
    assert int(client.snapshot()["version"]) == int(state["version"])
    client.shutdown()


@pytest.mark.slow
def test_a_lagged_refresh_resumed_in_a_new_actor_publishes_what_the_first_would(ray_session,
                                                                                tmp_path):
    stream = list(pushes(seed=4, steps=8))
    bank = MemoryBank(D, 32, 40, 40, **REFRESH)
    first = make_client(tmp_path, refresh_lag=4, faiss_threads=0)
    assert 1 <= first.usage()["refresh_threads"] <= 2  # 0: the CPUs Ray counts (2 here)
    for item in stream[:16]:
        first.push(*item)
        bank.push(item[0], item[1].numpy(), item[2], item[3].numpy(), item[4].numpy())
    number, applied = first.read(refresh=True, step=4)  # starts, applied from step 8 on
    assert applied == [] and int(first.snapshot(number)["pseudo_version"]) == 0
    expected = bank.refresh_pseudo_ids()  # of the memory as it was at the start
    for item in stream[16:]:  # the tables move on: the refresh must not see it
        first.push(*item)
    first.flush()
    state = first.state()  # "the checkpoint": the pending refresh with its result
    assert int(state["refresh_apply_at"][0]) == 8
    second = make_client(tmp_path / "resumed", refresh_lag=4)
    second.load_state(state)
    published = []
    for client in (first, second):
        assert client.read(refresh=False, step=6)[1] == []  # not yet
        number, (stats,) = client.read(refresh=False, step=8)
        assert without_seconds(stats) == {**without_seconds(expected), "started_step": 4.0}
        published.append(client.snapshot(number))
        assert np.array_equal(published[-1]["target_text_pseudo_ids"].numpy(),
                              bank.pseudo_ids()[1])
    for key, value in published[0].items():
        assert torch.equal(value, published[1][key]), key
    usage = first.usage()
    assert usage["pid"] > 0 and usage["peak_rss_mib"] >= usage["rss_mib"] > 0
    first.shutdown()
    second.shutdown()


@pytest.mark.slow
def test_killed_actor_restarts_with_the_saved_queue(ray_session, tmp_path):
    ray = ray_session
    client = make_client(tmp_path, max_restarts=1)
    stream = list(pushes(seed=1))
    for item in stream[:12]:
        client.push(*item)
    client.flush()
    client.refresh()
    saved = client.snapshot()
    assert client.autosave().endswith(MEMORY_FILE)
    for item in stream[12:]:  # after the save: lost by the kill
        client.push(*item)
    client.flush()
    ray.kill(client.actor, no_restart=False)
    # ray.kill is asynchronous: the old process may still answer; poll until the restarted one
    # (its __init__ found memory.npz) does.
    deadline, ready = time.monotonic() + 30, {"restored": False}
    while not ready["restored"]:
        assert time.monotonic() < deadline, "memory actor did not come back restored"
        try:
            ready = ray.get(client.actor.ready.remote(), timeout=5)
        except (ray.exceptions.RayActorError, ray.exceptions.GetTimeoutError):
            time.sleep(0.2)
    assert ready["version"] == 12
    restored = client.snapshot()
    for key, value in saved.items():
        assert torch.equal(restored[key], value), key
    client.shutdown()


@pytest.mark.slow
def test_memory_timings_at_full_size(ray_session, tmp_path):
    """Prints push / snapshot times at 65,536 x 512 per modality (DESIGN.md §7); asserts none."""
    dim, queue, chunk = 512, 65_536, 8_192
    rng = np.random.default_rng(0)
    block = unit(rng.normal(size=(chunk, dim)))
    labels, rows = np.zeros(chunk, np.int64), np.arange(chunk, dtype=np.int64)
    bank = MemoryBank(dim, queue, 16, 16, **REFRESH)
    client = make_client(tmp_path, dim=dim, queue_size=queue, num_target_images=16,
                         num_target_texts=16)
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
    client.shutdown()
