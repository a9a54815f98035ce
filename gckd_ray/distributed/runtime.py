"""Starting or joining Ray with this project's safety defaults (DESIGN.md §7, §8), and checking
that the cluster can place the Train workers before any starts."""

from __future__ import annotations

import os
import stat
from pathlib import Path
from typing import Any

from gckd_ray.config import ConfigError, TrainConfig

LOOPBACK_ENV = "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"


def use_loopback_if_local() -> None:
    """Keep every Ray socket on 127.0.0.1 for a local run. Must run before ``import ray``:
    Ray reads the variable at import time. Under ``ray job submit`` RAY_ADDRESS is set and the
    cluster's own network settings apply."""
    if "RAY_ADDRESS" not in os.environ:
        os.environ.setdefault(LOOPBACK_ENV, "0")


def worker_env() -> dict[str, str]:
    # Train v2 patches print() into its logger and also tees it when stdout is wrapped, which
    # in a Ray worker it always is: every progress line would appear twice.
    env = {"HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false",
           "RAY_TRAIN_ENABLE_PRINT_PATCH": "0"}
    if LOOPBACK_ENV in os.environ:
        env[LOOPBACK_ENV] = os.environ[LOOPBACK_ENV]
    loopback = _loopback_interface()
    if is_local() and loopback:
        env["GLOO_SOCKET_IFNAME"] = loopback  # gloo's pair sockets on loopback, like the store
    return env


def _loopback_interface() -> str:
    import socket

    names = {name for _, name in socket.if_nameindex()}
    return next((name for name in ("lo", "lo0") if name in names), "")


def is_local() -> bool:
    """A run on a Ray instance this driver starts (not ``ray job submit`` / RAY_ADDRESS)."""
    return not os.environ.get("RAY_ADDRESS")


def process_group_listen_host() -> str:
    """Where the process group's store listens: loopback for a local run, else ("") the first
    worker's node address (the cluster's private network)."""
    return "127.0.0.1" if is_local() else ""


def init_ray(num_cpus: int | None = None, verbose: bool = False) -> None:
    """Join the cluster named by RAY_ADDRESS (``ray job submit``), else start a local one
    (``num_cpus``: its logical CPUs; default: the machine's). Unless ``verbose`` the workers'
    output is not forwarded here (the driver prints the run's own lines from metrics.jsonl)
    and Ray's start-up notices are not shown."""
    import logging

    import ray

    if ray.is_initialized():
        return
    if not verbose:  # its advice is for clusters; local runs keep token auth on (DESIGN §8)
        logging.getLogger("ray._private.authentication.authentication_token_setup"
                          ).setLevel(logging.ERROR)
    runtime_env = {"env_vars": worker_env()}
    if os.environ.get("RAY_ADDRESS"):
        ray.init(runtime_env=runtime_env, log_to_driver=verbose)
    else:
        # address="local": a stale /tmp/ray/ray_current_cluster must not make us join a dead one.
        # The dashboard hosts the state API that Train's placement-group cleaner polls; it
        # listens on loopback only. The cleaner finds it by auto-detection, which fails when
        # other Ray instances run on the machine, and a Tune trial stopped early then leaks
        # its workers' placement group; so every process of this job is told where it is.
        port = _free_loopback_port()
        runtime_env["env_vars"]["RAY_API_SERVER_ADDRESS"] = f"http://127.0.0.1:{port}"
        ray.init(address="local", num_cpus=num_cpus, dashboard_host="127.0.0.1",
                 dashboard_port=port, runtime_env=runtime_env, logging_level="WARNING",
                 log_to_driver=verbose)
    _tighten_token_file()


def _free_loopback_port() -> int:
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _tighten_token_file() -> None:
    # A local ray.init writes the auth token world-readable; it is a credential.
    token = Path.home() / ".ray" / "auth_token"
    if token.is_file() and token.stat().st_mode & (stat.S_IRWXG | stat.S_IRWXO):
        token.chmod(0o600)


def placement_problem(train: TrainConfig, nodes: list[dict[str, float]]) -> str | None:
    """Why the cluster's nodes cannot hold ``train.num_workers`` Train workers, or None.

    Each worker needs ``train.cpus_per_worker`` CPUs and, with ``train.use_gpu``, one GPU on
    one node (Ray Train places a bundle per worker).

    Args:
        nodes: total resources of each alive node, e.g. ``{"CPU": 2.0, "GPU": 0.0}``.
    """
    def room(node: dict[str, float]) -> int:
        fit = int(node.get("CPU", 0.0) / train.cpus_per_worker + 1e-9)
        return min(fit, int(node.get("GPU", 0.0))) if train.use_gpu else fit

    fit = sum(room(node) for node in nodes)
    if fit >= train.num_workers:
        return None
    cpus = sum(node.get("CPU", 0.0) for node in nodes)
    gpus = sum(node.get("GPU", 0.0) for node in nodes)
    largest = max((node.get("CPU", 0.0) for node in nodes), default=0.0)
    cluster = (f"{len(nodes)} node(s), {cpus:g} CPUs and {gpus:g} GPUs in all, at most "
               f"{largest:g} CPUs on one node")
    if train.use_gpu and gpus < 1:
        return (f"train.use_gpu: true needs one GPU per worker; the Ray cluster has none "
                f"({cluster})")
    if fit == 0:
        return (f"train.cpus_per_worker: must be <= {largest:g} (the Ray cluster has {cluster}), "
                f"got {train.cpus_per_worker:g}")
    each = f"train.cpus_per_worker={train.cpus_per_worker:g}" + (
        " and one GPU" if train.use_gpu else "")
    return (f"train.num_workers: must be <= {fit} with {each} per worker (the Ray cluster has "
            f"{cluster}), got {train.num_workers}")


def check_placement(train: TrainConfig) -> None:
    """Fail before any Train worker starts when the cluster cannot place them.

    A local instance (started by this driver) cannot grow: raise `ConfigError`. A joined
    cluster may have an autoscaler that adds nodes on demand: print a warning instead.
    """
    import ray

    nodes = [_resources(node) for node in ray.nodes() if node.get("Alive")]
    problem = placement_problem(train, nodes)
    if problem is None:
        return
    if not os.environ.get("RAY_ADDRESS"):
        raise ConfigError(problem)
    print(f"warning: {problem} (waiting for the cluster to grow, if it autoscales)",
          flush=True)


def _resources(node: dict[str, Any]) -> dict[str, float]:
    return {k: float(v) for k, v in node.get("Resources", {}).items() if k in ("CPU", "GPU")}


def process_group_backend(train: TrainConfig) -> str:
    """The workers' torch.distributed backend: on GPU, NCCL for CUDA tensors with gloo beside
    it for the CPU-side ones (``model/collectives.py`` then moves nothing); gloo on CPU."""
    return "cpu:gloo,cuda:nccl" if train.use_gpu else "gloo"

