"""The soak benchmark's parts, without its long run: the memory-state consistency check on a
real MemoryBank, process roles, RSS sampling of a real process tree, growth and the table."""

import os

import numpy as np
import psutil
import pytest

from benchmarks.soak import (Trace, check_memory_state, growth, memory_summary, role, sample,
                             table)
from gckd_ray.model.centring import SOURCE, TARGET
from gckd_ray.model.memory_bank import MemoryBank

D = 8


@pytest.fixture
def state() -> dict:
    """A bank after its queues wrapped around, with pseudo-ids refreshed."""
    bank = MemoryBank(D, queue_size=12, num_target_images=6, num_target_texts=6, pseudo_k=1,
                      pseudo_threshold=-1.0, pseudo_center=True, pseudo_image_k=0,
                      faiss_threads=1, seed=0)
    rng = np.random.default_rng(0)
    for step in range(4):
        for modality in ("image", "text"):
            feats = rng.standard_normal((5, D)).astype(np.float32)
            bank.push(modality, feats, SOURCE, np.arange(5), np.arange(5))
            rows = np.arange(6)
            bank.push(modality, feats[[0, 1, 2, 3, 4, 0]] + 0.01 * step, TARGET,
                      np.full(6, -1), rows)
    bank.refresh_pseudo_ids()
    return bank.state_dict()


def test_a_wrapped_queue_is_consistent(state):
    assert check_memory_state(state) == []
    summary = memory_summary(state)
    assert summary["image_filled"] == 12 and summary["pushes"] == 16
    assert summary["image_source"] + summary["image_target"] == 12
    assert summary["target_text_with_pseudo_id"] > 0


@pytest.mark.parametrize("spoil, problem", [
    (lambda s: s["image_features"].__setitem__((0, 0), np.nan), "image queue: non-finite"),
    (lambda s: s["text_domain"].__setitem__(3, 7), "text queue: domain flags other than"),
    (lambda s: s["image_labels"].__setitem__(s["image_domain"] == TARGET, 4),
     "image queue: a target entry carries a label"),
    (lambda s: s["text_indices"].__setitem__(s["text_domain"] == TARGET, 99),
     "text queue: indices out of range"),
    (lambda s: s["image_domain"].fill(SOURCE), "image queue: not both domains present"),
    (lambda s: s.__setitem__("text_count", np.array(13)), "text queue: count 13"),
    (lambda s: s["target_image_pseudo_ids"].fill(-1),
     "pseudo-ids: some held by images only or captions only"),
])
def test_inconsistent_states_are_reported(state, spoil, problem):
    spoil(state)
    assert any(p.startswith(problem) for p in check_memory_state(state))


def test_roles_and_sampling_follow_the_process_tree():
    assert role(["ray::RayTrainWorker.run_train_fn"], 5, 1) == "worker"
    assert role(["ray::MemoryActor"], 5, 1) == "memory actor"
    assert role(["ray::TrainController.run"], 5, 1) == "train controller"
    assert role(["/usr/bin/raylet", "--x"], 5, 1) is None
    assert role(["python", "-m", "gckd_ray.train"], 1, 1) == "driver"
    trace, seen = Trace(), {}
    sample(psutil.Process(os.getpid()), trace, seen)  # this process stands in for the driver
    (t, mib), = trace.samples[f"driver (pid {os.getpid()})"]
    assert t >= 0 and mib > 10 and os.getpid() in seen


def test_growth_compares_the_baseline_epoch_with_the_last():
    trace = Trace()
    trace.epoch_ends = {1: 10.0, 2: 20.0, 3: 30.0, 4: 40.0, 5: 50.0}
    for t in range(1, 51):
        trace.add("worker (pid 9)", float(t), 500.0 + (50.0 if t > 40 else 0.0))
        trace.add("driver (pid 1)", float(t), 300.0)
    got = growth(trace, warmup_epochs=1)  # baseline: epoch 3 (the second of adaptation)
    assert got["worker (pid 9)"] == {"baseline_epoch": 3, "baseline_mib": 500.0,
                                     "last_epoch": 5, "last_mib": 550.0, "peak_mib": 550.0,
                                     "growth": 0.1}
    assert got["driver (pid 1)"]["growth"] == 0.0
    assert growth(trace, warmup_epochs=10)["worker (pid 9)"]["baseline_epoch"] == 2
    lines = table(trace, columns=5).splitlines()
    assert lines[2].split()[-5:] == ["300", "300", "300", "300", "300"]
    assert lines[3].split()[-5:] == ["500", "500", "500", "500", "550"]
