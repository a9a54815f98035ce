"""The cluster path on one machine: ``ray start --head`` on free loopback ports, then
``ray job submit --working-dir . -- python -m gckd_ray.train ...`` as the README shows it.

Only the Ray processes this test starts are stopped (the PID of ``ray start --block``).
"""

import json
import os
import secrets
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest

from helpers import free_port

pytestmark = pytest.mark.slow

REPO = Path(__file__).resolve().parents[2]


def _ray_cli() -> str:
    return str(Path(sys.executable).with_name("ray"))


def _not_submitted_yet(output: str) -> bool:
    """The dashboard answers before the node's job agent is up, and on a loaded machine it may
    drop the working-dir upload's first requests; either way no job was created yet."""
    transient = ("No available agent", "RemoteDisconnected", "Connection refused")
    return "submitted successfully" not in output and any(t in output for t in transient)


def test_ray_job_submit_runs_training_on_a_local_cluster(synth_cache, tmp_path):
    port, dashboard = free_port(), free_port()
    # Loopback only; token auth on, with one token shared by the cluster and the CLI (§8).
    # No RAY_* variable of this test session's own Ray instance may leak into the new cluster.
    env = {k: v for k, v in os.environ.items() if not k.startswith("RAY_")}
    env.update(RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER="0", RAY_AUTH_MODE="token",
               RAY_AUTH_TOKEN=secrets.token_hex(32))
    # Ray's unix sockets live under --temp-dir: pytest's long tmp paths exceed the socket limit.
    short_tmp = tempfile.mkdtemp(prefix="rayjob-", dir="/tmp")
    head = subprocess.Popen(
        [_ray_cli(), "start", "--head", "--block", f"--port={port}", "--num-cpus=2",
         "--node-ip-address=127.0.0.1", "--dashboard-host=127.0.0.1",
         f"--dashboard-port={dashboard}", f"--temp-dir={short_tmp}",
         # Other Ray instances on this machine (this session's own included) hold the default
         # agent ports; a second agent that cannot bind them never serves job submissions.
         f"--dashboard-agent-listen-port={free_port()}",
         f"--dashboard-agent-grpc-port={free_port()}", f"--metrics-export-port={free_port()}",
         f"--runtime-env-agent-port={free_port()}"],
        env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    out = tmp_path / "job-run"
    try:
        address = f"http://127.0.0.1:{dashboard}"
        _wait_for_dashboard(address, env)
        command = [_ray_cli(), "job", "submit", f"--address={address}", "--working-dir",
                   str(REPO), "--", sys.executable, "-m", "gckd_ray.train",
                   "method=source_only", "train.epochs=1", "train.batch_size=16",
                   "model.hidden_size=32", "model.embed_dim=32", "model.num_layers=1",
                   "model.num_heads=2", f"data.synth_cache={synth_cache}",
                   "data.synth_scale=0.1", f"run.output_dir={out}"]
        for _ in range(15):
            submit = subprocess.run(command, env=env, capture_output=True, text=True,
                                    timeout=600)
            if not _not_submitted_yet(submit.stdout + submit.stderr):
                break
            time.sleep(2)
        assert submit.returncode == 0, submit.stdout[-3000:] + submit.stderr[-3000:]
        assert "succeeded" in submit.stdout
        results = json.loads((out / "results.json").read_text())
        assert results["method"] == "source_only" and len(results["history"]) == 1
        # The token is in no log line and no file of the run (config.yaml of checkpoints ...).
        token = env["RAY_AUTH_TOKEN"]
        assert token not in submit.stdout + submit.stderr
        written = [p for p in out.rglob("*") if p.is_file()]
        assert any(p.name == "config.yaml" for p in written)
        assert [p for p in written if token.encode() in p.read_bytes()] == []
    finally:
        os.killpg(head.pid, signal.SIGTERM)  # ray start --block stops its cluster on SIGTERM
        try:
            head.wait(timeout=20)
        except subprocess.TimeoutExpired:  # its orderly stop can take minutes: end the group
            os.killpg(head.pid, signal.SIGKILL)
            head.wait(timeout=60)
        shutil.rmtree(short_tmp, ignore_errors=True)


def _wait_for_dashboard(address: str, env: dict, timeout: float = 120) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        probe = subprocess.run([_ray_cli(), "job", "list", f"--address={address}"],
                               env=env, capture_output=True, text=True)
        if probe.returncode == 0:
            return
        time.sleep(2)
    raise AssertionError(f"no Ray job server at {address}: {probe.stderr[-2000:]}")
