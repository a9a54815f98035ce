"""``python -m gckd_ray.train`` as a user runs it: a healthy run prints this project's lines
only, and every socket of the run (Ray, the process group's store, gloo) listens on loopback."""

from __future__ import annotations

import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest

from helpers import SYNTH_SCALE

pytestmark = pytest.mark.slow

REPO = Path(__file__).resolve().parents[1]
LOOPBACK = {"127.0.0.1", "::ffff:127.0.0.1", "::1"}
NOISE = ("TrainingReport", "core_worker.cc", "Ray deduplicates", "RAY_DEDUP_LOGS",
         "DeprecationWarning", "Loading faiss", "authentication_token_setup",
         "RayTrainWorker pid=", "Traceback")


def _listening(root: psutil.Process) -> set[tuple[str, int]]:
    found = set()
    try:
        processes = [root, *root.children(recursive=True)]
    except psutil.NoSuchProcess:
        return found
    for process in processes:
        try:
            found |= {(c.laddr.ip, c.laddr.port) for c in process.net_connections("inet")
                      if c.status == psutil.CONN_LISTEN}
        except psutil.NoSuchProcess:
            continue
    return found


def test_a_healthy_run_is_quiet_and_listens_on_loopback_only(synth_cache, tmp_path):
    out = tmp_path / "run"
    run = subprocess.Popen(
        [sys.executable, "-m", "gckd_ray.train", "method=gckd", "train.epochs=2",
         "gckd.warmup_epochs=1", "train.warmup_epochs=0.5", f"data.synth_cache={synth_cache}",
         f"data.synth_scale={SYNTH_SCALE}", f"run.output_dir={out}", "train.batch_size=16",
         "model.hidden_size=32", "model.embed_dim=32", "model.num_layers=1",
         "model.num_heads=2", "train.log_every=5", "gckd.queue_size=512",
         "gckd.memory_nodes=16", "graph.k=5"],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, cwd=REPO)
    sockets: set[tuple[str, int]] = set()
    deadline = time.monotonic() + 600
    while run.poll() is None and time.monotonic() < deadline:  # sample while it trains
        sockets |= _listening(psutil.Process(run.pid))
        time.sleep(0.2)
    output = run.communicate(timeout=60)[0]
    assert run.returncode == 0, output
    # Ray's sockets, the process group's store and gloo's pairs were seen, all on loopback.
    assert len(sockets) >= 5 and [s for s in sockets if s[0] not in LOOPBACK] == []

    lines = output.splitlines()
    assert [line for line in lines if any(noise in line for noise in NOISE)] == []
    assert lines[0].startswith("gckd-ray: method gckd, synth-cuhk->synth-icfg, 2 epochs (1 "
                               f"source + 1 adaptation), 2 worker(s) x 1 CPU, ZeRO-0; outputs "
                               f"in {out}")
    progress = [line for line in lines if " step " in line and " it/s ETA " in line]
    evaluations = [line for line in lines if "] target synth-icfg/test: R1=" in line]
    assert len(progress) == 4 and len(evaluations) == 2  # 12 steps an epoch, every 5
    assert f"results: {out / 'results.json'}" in lines
