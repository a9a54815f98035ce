"""Fixtures of the cluster tests (this folder is importable: ``fake_cluster``)."""

import pytest

from fake_cluster import FakeAutoscalingCluster


@pytest.fixture
def fake_autoscaling_cluster():
    """A fake autoscaling cluster, launched: its head is starting in the background, so a test
    can start slow work (a driver's imports) before ``cluster.wait_ready()``. A 0-CPU head; up
    to 2 one-CPU worker nodes added on demand, removed after 6 idle seconds. Only its own
    processes are stopped afterwards."""
    cluster = FakeAutoscalingCluster(max_workers=2, worker_cpus=1, idle_timeout_minutes=0.1)
    try:
        cluster.launch()
        yield cluster
    finally:
        cluster.stop()
