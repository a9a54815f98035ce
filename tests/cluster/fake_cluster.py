"""Ray's fake autoscaling cluster on loopback, for tests: a head with 0 CPUs whose autoscaler
(the fake multi-node provider) adds local worker "nodes" on demand and removes idle ones.

Not ``ray.cluster_utils.AutoscalingCluster``: its config is not packaged in the wheel and its
``start()`` runs ``ray stop --force``, which kills every Ray process on the machine (DESIGN.md
section 7). Only the processes this class starts are stopped (the ``ray start --block`` group).
"""

from __future__ import annotations

import json
import os
import secrets
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

from helpers import free_port

HEAD_TYPE = "ray.head.default"
WORKER_TYPE = "ray.worker.cpu"


class FakeAutoscalingCluster:
    """``start()`` it (or ``launch()``, then ``wait_ready()``), run drivers with
    ``driver_env()``, watch ``alive_worker_nodes()``, ``stop()`` it. Token auth is on and every
    socket stays on 127.0.0.1."""

    def __init__(self, max_workers: int = 2, worker_cpus: int = 1,
                 idle_timeout_minutes: float = 0.1):
        self.port, self.dashboard_port = free_port(), free_port()
        self.token = secrets.token_hex(32)
        # Ray's unix sockets live under the temp dir: pytest's long tmp paths exceed their limit.
        self.temp_dir = Path(tempfile.mkdtemp(prefix="rayfake-", dir="/tmp"))
        self.config = _autoscaling_config(self.port, max_workers, worker_cpus,
                                          idle_timeout_minutes)
        self._head: subprocess.Popen | None = None
        self._head_log = self.temp_dir / "ray-start.log"

    def env(self) -> dict[str, str]:
        """Environment for this cluster's processes and clients: no RAY_* variable of the test
        session leaks in; loopback only; one token shared by cluster and clients (DESIGN.md §8)."""
        env = {k: v for k, v in os.environ.items() if not k.startswith("RAY_")}
        env.update(RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER="0", RAY_AUTH_MODE="token",
                   RAY_AUTH_TOKEN=self.token, RAY_USAGE_STATS_ENABLED="0")
        return env

    def driver_env(self) -> dict[str, str]:
        return {**self.env(), "RAY_ADDRESS": f"127.0.0.1:{self.port}"}

    def start(self, timeout: float = 180) -> None:
        self.launch()
        self.wait_ready(timeout)

    def launch(self) -> None:
        """Start the head in the background (``wait_ready`` waits for it)."""
        config_file = self.temp_dir / "autoscaling.json"
        config_file.write_text(json.dumps(self.config))
        env = {**self.env(), "RAY_FAKE_CLUSTER": "1", "AUTOSCALER_UPDATE_INTERVAL_S": "1",
               # The cluster's own state-API clients (Train v2's PlacementGroupCleaner) would
               # otherwise look for "the" local Ray instance and fail on finding several.
               "RAY_API_SERVER_ADDRESS": f"http://127.0.0.1:{self.dashboard_port}"}
        ray = str(Path(sys.executable).with_name("ray"))
        with self._head_log.open("w") as log:
            self._head = subprocess.Popen(
                [ray, "start", "--head", "--block", f"--port={self.port}", "--num-cpus=0",
                 "--object-store-memory=100000000", f"--autoscaling-config={config_file}",
                 "--node-ip-address=127.0.0.1", "--dashboard-host=127.0.0.1",
                 f"--dashboard-port={self.dashboard_port}", f"--temp-dir={self.temp_dir}",
                 # Other Ray instances on this machine hold the default ports of these agents.
                 f"--dashboard-agent-listen-port={free_port()}",
                 f"--dashboard-agent-grpc-port={free_port()}",
                 f"--metrics-export-port={free_port()}", f"--runtime-env-agent-port={free_port()}",
                 f"--ray-client-server-port={free_port()}"],
                env=env, stdout=log, stderr=subprocess.STDOUT,
                start_new_session=True)

    def wait_ready(self, timeout: float = 180) -> None:
        """Return once the head node has registered (the state API lists it ALIVE). A head
        whose raylet missed Ray's fixed 30 s registration window (a loaded machine) is started
        once more, on the same ports."""
        deadline = time.monotonic() + timeout
        error: Exception | None = None
        retried = False
        while time.monotonic() < deadline:
            if self._head.poll() is not None:
                log = self._head_log.read_text()
                if not retried and "timed out during startup" in log:
                    retried = True
                    self._end_head()
                    self.launch()
                    continue
                raise AssertionError(f"ray start exited with {self._head.returncode}:\n"
                                     + log[-3000:])
            try:
                if any(n["state"] == "ALIVE" and n["is_head_node"] for n in self._nodes()):
                    return
            except (OSError, ValueError, KeyError) as err:  # the dashboard is not up yet
                error = err
            time.sleep(1)
        raise AssertionError(f"fake cluster head not up after {timeout} s: {error}")

    def alive_worker_nodes(self) -> int:
        """Worker nodes the cluster reports ALIVE now."""
        return sum(1 for n in self._nodes() if n["state"] == "ALIVE" and not n["is_head_node"])

    def autoscaler_events(self) -> list[str]:
        """The autoscaler's event lines ("Adding 1 node(s) of type ...", "Removing ...")."""
        log = self.temp_dir / "session_latest" / "logs" / "monitor.log"
        if not log.is_file():
            return []
        return [line.split(":event_summary:", 1)[1].strip()
                for line in log.read_text(errors="replace").splitlines()
                if ":event_summary:" in line]

    def stop(self) -> None:
        if self._head is not None:
            self._end_head()
        shutil.rmtree(self.temp_dir, ignore_errors=True)

    def _end_head(self) -> None:
        """End the ``ray start --block`` process group. SIGTERM ends the fake nodes (children
        of the autoscaler) and the head's processes at once; an orderly stop can take minutes
        on a loaded machine, so what is left after a few seconds is killed."""
        try:
            os.killpg(self._head.pid, signal.SIGTERM)
            try:
                self._head.wait(timeout=5)
            except subprocess.TimeoutExpired:
                pass
            os.killpg(self._head.pid, signal.SIGKILL)
        except ProcessLookupError:  # the whole group has exited already
            pass
        self._head.wait(timeout=60)
        self._head = None

    def _nodes(self) -> list[dict]:
        """Ray's state API on the dashboard, called with the cluster's token."""
        request = urllib.request.Request(
            f"http://127.0.0.1:{self.dashboard_port}/api/v0/nodes?limit=100",
            headers={"Authorization": f"Bearer {self.token}"})
        with urllib.request.urlopen(request, timeout=10) as response:
            return json.load(response)["data"]["result"]["result"]


def _autoscaling_config(gcs_port: int, max_workers: int, worker_cpus: int,
                        idle_timeout_minutes: float) -> dict:
    """The fake multi-node provider's cluster config, written out in full: ``ray start``
    takes it as is, without the defaults ``ray up`` would fill in."""
    return {
        "cluster_name": "fake-autoscaling",
        "max_workers": max_workers,
        "upscaling_speed": 1,
        "idle_timeout_minutes": idle_timeout_minutes,
        "provider": {"type": "fake_multinode", "use_node_id_as_ip": True,
                     "disable_node_updaters": True, "disable_launch_config_check": True,
                     "gcs_address": f"127.0.0.1:{gcs_port}"},
        "head_node_type": HEAD_TYPE,
        "available_node_types": {
            HEAD_TYPE: {"resources": {"CPU": 0}, "node_config": {}, "max_workers": 0},
            WORKER_TYPE: {"resources": {"CPU": worker_cpus, "object_store_memory": 2e8},
                          "node_config": {}, "min_workers": 0, "max_workers": max_workers},
        },
        "docker": {}, "auth": {}, "file_mounts": {}, "cluster_synced_files": [],
        "file_mounts_sync_continuously": False, "rsync_exclude": [], "rsync_filter": [],
        "initialization_commands": [], "setup_commands": [], "head_setup_commands": [],
        "worker_setup_commands": [], "head_start_ray_commands": [],
        "worker_start_ray_commands": [],
    }
