"""Autoscaling shown, not claimed: on Ray's fake autoscaling cluster (a 0-CPU head, no worker
nodes) a Tune sweep shaped like ``gckd_ray.tune``'s (trial drivers on the head, each running a
Ray Train v2 TorchTrainer whose worker needs a CPU) makes the autoscaler add worker nodes, and
once the sweep is over it removes the idle nodes again. The worker-node count is sampled every
second from Ray's state API; the autoscaler's own log must agree."""

import json
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from fake_cluster import WORKER_TYPE

pytestmark = pytest.mark.slow

DRIVER = Path(__file__).with_name("tune_sweep_driver.py")


class NodeTimeline:
    """(seconds since start, alive worker nodes) every ``period`` s, in a background thread."""

    def __init__(self, cluster, period: float = 1.0):
        self.cluster, self.period = cluster, period
        self.t0 = time.monotonic()
        self.samples: list[tuple[float, int]] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def __enter__(self):
        self.samples.append((0.0, self.cluster.alive_worker_nodes()))
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join(timeout=30)

    def now(self) -> float:
        return time.monotonic() - self.t0

    def wait_until_workers(self, count: int, after: float, timeout: float) -> bool:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if any(t >= after and n == count for t, n in self.samples):
                return True
            time.sleep(self.period)
        return False

    def changes(self) -> str:
        """The samples where the count changed, e.g. ``0s:0 21.4s:1 23.0s:2 41.2s:0``."""
        shown = [s for i, s in enumerate(self.samples) if i == 0 or s[1] != self.samples[i - 1][1]]
        return " ".join(f"{t:.1f}s:{n}" for t, n in shown)

    def _run(self) -> None:
        while not self._stop.wait(self.period):
            try:
                self.samples.append((self.now(), self.cluster.alive_worker_nodes()))
            except OSError:  # a slow answer on a loaded machine: skip this sample
                pass


def test_tune_sweep_adds_worker_nodes_from_zero_and_idle_ones_go(fake_autoscaling_cluster,
                                                                 tmp_path):
    cluster = fake_autoscaling_cluster
    start = tmp_path / "start"
    # The driver imports Ray and Tune while the head comes up, then waits for `start`.
    driver = subprocess.Popen(
        [sys.executable, str(DRIVER), str(tmp_path / "tune"), "--start-when", str(start)],
        env=cluster.driver_env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        cluster.wait_ready()
        with NodeTimeline(cluster) as timeline:
            start.touch()
            output, _ = driver.communicate(timeout=300)
            sweep_done = timeline.now()
            scaled_down = timeline.wait_until_workers(0, after=sweep_done, timeout=90)
        events = _autoscaler_events_once(cluster, "Removing", timeout=30)
    finally:
        if driver.poll() is None:
            driver.kill()
            driver.wait()
    print(f"\nworker nodes (time:alive): {timeline.changes()}; sweep done at {sweep_done:.1f}s")
    print("autoscaler events:", "; ".join(e for e in events if "node" in e))

    assert driver.returncode == 0, output[-4000:]
    # Ray streams the autoscaler's messages to the driver too: find the driver's own line.
    (line,) = [x for x in output.splitlines() if x.startswith('{"trials"')]
    result = json.loads(line)
    # Both trials got every epoch's report of their Train run through TuneReportCallback.
    assert result == {"trials": 2, "errors": 0,
                      "last": [{"epoch": 2, "score": 2}, {"epoch": 2, "score": 4}]}, output[-4000:]
    assert timeline.samples[0][1] == 0  # no worker node before the sweep
    during = [n for t, n in timeline.samples if t <= sweep_done]
    assert max(during) >= 1, timeline.changes()  # the Train workers' CPUs came from added nodes
    assert scaled_down, f"idle worker nodes not removed: {timeline.changes()}"
    assert any(e.startswith("Adding") and WORKER_TYPE in e for e in events), events
    assert any(e.startswith("Removing") and "(idle)" in e for e in events), events


def _autoscaler_events_once(cluster, prefix: str, timeout: float) -> list[str]:
    """The autoscaler's events once one starts with ``prefix`` (its log lags the state API)."""
    deadline = time.monotonic() + timeout
    while True:
        events = cluster.autoscaler_events()
        if any(e.startswith(prefix) for e in events) or time.monotonic() > deadline:
            return events
        time.sleep(1)
