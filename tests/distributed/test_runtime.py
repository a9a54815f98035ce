"""Ray runtime defaults: workers that the cluster cannot place fail before any starts, every
socket of a local instance listens on loopback only, and no secret reaches the workers."""

import os

import psutil
import pytest

from gckd_ray.config import ConfigError, TrainConfig
from gckd_ray.distributed.runtime import (check_placement, placement_problem,
                                          process_group_backend, worker_env)
from gckd_ray.train import main as train_main
from helpers import SYNTH_SCALE

LOOPBACK = {"127.0.0.1", "::ffff:127.0.0.1", "::1"}


@pytest.mark.parametrize("train, nodes, message", [
    (TrainConfig(num_workers=2), [{"CPU": 2.0}], None),
    (TrainConfig(num_workers=4, cpus_per_worker=0.49), [{"CPU": 2.0}], None),
    (TrainConfig(num_workers=2, cpus_per_worker=1.5), [{"CPU": 2.0}, {"CPU": 2.0}], None),
    (TrainConfig(num_workers=3), [{"CPU": 2.0}],
     "train.num_workers: must be <= 2 with train.cpus_per_worker=1 per worker (the Ray cluster "
     "has 1 node(s), 2 CPUs and 0 GPUs in all, at most 2 CPUs on one node), got 3"),
    (TrainConfig(num_workers=3, cpus_per_worker=1.5), [{"CPU": 2.0}, {"CPU": 2.0}],
     "train.num_workers: must be <= 2 with train.cpus_per_worker=1.5 per worker"),
    (TrainConfig(num_workers=1, cpus_per_worker=4), [{"CPU": 2.0}, {"CPU": 2.0}],
     "train.cpus_per_worker: must be <= 2 (the Ray cluster has 2 node(s), 4 CPUs and 0 GPUs "
     "in all, at most 2 CPUs on one node), got 4"),
    (TrainConfig(num_workers=1, use_gpu=True), [{"CPU": 2.0}],
     "train.use_gpu: true needs one GPU per worker; the Ray cluster has none (1 node(s)"),
    (TrainConfig(num_workers=2, use_gpu=True), [{"CPU": 8.0, "GPU": 1.0}],
     "train.num_workers: must be <= 1 with train.cpus_per_worker=1 and one GPU per worker"),
])
def test_placement_problem_names_the_key_and_the_allowed_range(train, nodes, message):
    problem = placement_problem(train, nodes)
    if message is None:
        assert problem is None
    else:
        assert problem.startswith(message) and "\n" not in problem


def test_worker_env_carries_no_secrets(monkeypatch):
    monkeypatch.setenv("RAY_AUTH_TOKEN", "not-for-workers")
    monkeypatch.setenv("RAY_AUTH_MODE", "token")
    assert "not-for-workers" not in "".join(f"{k}={v}" for k, v in worker_env().items())


@pytest.mark.slow
def test_unplaceable_workers_fail_before_any_worker_starts(ray_session, synth_cache, tmp_path,
                                                           capsys, monkeypatch):
    out = tmp_path / "run"
    code = train_main(["method=source_only", "train.num_workers=3",
                       f"data.synth_cache={synth_cache}", f"data.synth_scale={SYNTH_SCALE}",
                       f"run.output_dir={out}"])
    err = capsys.readouterr().err
    assert code == 2 and err.count("\n") == 1
    assert err.startswith("config error: train.num_workers: must be <= 2 with "
                          "train.cpus_per_worker=1 per worker (the Ray cluster has 1 node(s), "
                          "2 CPUs")
    assert not (out / "ray").exists()  # no Train run, no memory actor was started

    # Joining a cluster (ray job submit): an autoscaler may add nodes, so only a warning.
    monkeypatch.setenv("RAY_ADDRESS", "127.0.0.1:6379")
    check_placement(TrainConfig(num_workers=3))
    assert capsys.readouterr().out.startswith("warning: train.num_workers: must be <= 2")
    monkeypatch.delenv("RAY_ADDRESS")
    with pytest.raises(ConfigError, match="train.num_workers"):
        check_placement(TrainConfig(num_workers=3))


def _session_pids(ray) -> set[int]:
    """The driver and every process of this session's Ray node, with their children."""
    node = ray._private.worker._global_node
    pids = {os.getpid()}
    for infos in node.all_processes.values():
        for info in infos:
            pids.add(info.process.pid)
            try:
                pids |= {c.pid for c in psutil.Process(info.process.pid).children(recursive=True)}
            except psutil.NoSuchProcess:
                pass
    return pids


@pytest.mark.slow
def test_local_ray_listens_on_loopback_only(ray_session):
    ray = ray_session
    listening = []
    for pid in _session_pids(ray):
        try:
            process = psutil.Process(pid)
            listening += [(process.name(), c.laddr) for c in process.net_connections("inet")
                          if c.status == psutil.CONN_LISTEN]
        except psutil.NoSuchProcess:
            continue
    ports = {addr.port for _, addr in listening}
    node = ray._private.worker._global_node
    gcs_port = int(node.gcs_address.rsplit(":", 1)[1])
    dashboard_host, dashboard_port = node.address_info["webui_url"].rsplit(":", 1)
    assert gcs_port in ports and int(dashboard_port) in ports and dashboard_host == "127.0.0.1"
    exposed = [(name, addr) for name, addr in listening if addr.ip not in LOOPBACK]
    assert len(listening) >= 3 and exposed == []


def test_process_group_backend_pairs_nccl_with_gloo_on_gpu_and_is_gloo_on_cpu():
    assert process_group_backend(TrainConfig(use_gpu=True)) == "cpu:gloo,cuda:nccl"
    assert process_group_backend(TrainConfig(use_gpu=False)) == "gloo"
