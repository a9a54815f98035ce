"""Failure recovery on real Ray: a SIGKILLed Train worker and a killed memory actor.

The run goes on in a thread while the test waits for the first checkpoint, kills the process,
and then requires the run to finish every epoch.
"""

import os
import signal
import threading
import time
from pathlib import Path

import pytest

from gckd_ray.distributed.launcher import run_training

pytestmark = pytest.mark.slow

RUN = ("method=gckd", "train.epochs=4", "gckd.warmup_epochs=1", "gckd.queue_size=512",
       "gckd.memory_nodes=16", "gckd.snapshot_every=2", "gckd.pseudo_every=4", "graph.k=5",
       "matching.rerank_top_k=0", "train.max_failures=2")


def _start(cfg):
    outcome = {}

    def target():
        try:
            outcome["results"] = run_training(cfg)
        except BaseException as err:  # surfaced by the test
            outcome["error"] = err

    thread = threading.Thread(target=target, daemon=True)
    thread.start()
    return thread, outcome


def _wait_for_checkpoint(output_dir: Path, thread, timeout: float = 300) -> None:
    """Until Ray Train has registered a checkpoint (its manager snapshot lists one): files
    still being reported are not yet a checkpoint a restart would use."""
    deadline = time.monotonic() + timeout
    while not any("checkpoint_" in p.read_text()
                  for p in output_dir.glob("ray/*/checkpoint_manager_snapshot.json")):
        assert thread.is_alive() and time.monotonic() < deadline, "no checkpoint appeared"
        time.sleep(0.5)


def _alive_actors(class_name: str):
    import ray
    from ray.util.state import list_actors

    # This session's cluster by address: other local Ray instances may share the machine.
    found = list_actors(address=ray.get_runtime_context().gcs_address,
                        filters=[("class_name", "=", class_name)], detail=True)
    return [a for a in found if a.state == "ALIVE"]


def _finish(thread, outcome):
    thread.join(timeout=600)
    assert not thread.is_alive(), "the run did not finish"
    if "error" in outcome:
        raise outcome["error"]
    results = outcome["results"]
    assert [h["epoch"] for h in results["history"]] == [1, 2, 3, 4]
    return results


def test_killed_memory_actor_and_sigkilled_worker_are_both_survived(ray_session, tiny_config,
                                                                     tmp_path, capfd):
    """One run, two failures: the memory actor is killed (Ray restarts it and it reloads its
    saved queues), then a Train worker is SIGKILLed (the group restarts from the registered
    checkpoint); the run still finishes every epoch."""
    import ray

    cfg = tiny_config(*RUN, f"run.output_dir={tmp_path / 'run'}")
    thread, outcome = _start(cfg)
    _wait_for_checkpoint(tmp_path / "run", thread)

    (memory,) = _alive_actors("MemoryActor")
    handle = ray.get_actor(memory.name, namespace=memory.ray_namespace)
    before = ray.get(handle.ready.remote())
    ray.kill(handle, no_restart=False)  # Ray restarts it (max_restarts); it reloads its save
    deadline = time.monotonic() + 120
    while True:  # the kill is asynchronous: wait for the new process
        restarted = [a for a in _alive_actors("MemoryActor") if a.pid != memory.pid]
        if restarted or time.monotonic() > deadline:
            break
        time.sleep(0.5)
    assert restarted, "the memory actor was not restarted"
    after = ray.get(handle.ready.remote(), timeout=120)
    assert not before["restored"] and after["restored"]
    assert after["image_filled"] > 0 and after["text_filled"] > 0  # the queues came back

    victim = _alive_actors("RayTrainWorker")[0]
    os.kill(victim.pid, signal.SIGKILL)
    _finish(thread, outcome)
    out = capfd.readouterr()
    assert "resumed from checkpoint after epoch" in out.out + out.err
