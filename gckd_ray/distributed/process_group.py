"""The Train workers' torch.distributed process group, with its rendezvous store listening only
where it must: 127.0.0.1 for a local run, the first worker's node address on a cluster.

Ray Train's own ``TorchConfig`` lets ``init_process_group`` create the TCPStore, and torch's
store server listens on every interface. torch 2.13 takes a socket the caller bound
(``TCPStore(..., master_listen_fd=fd)``), so the first worker binds one to ``listen_host``,
starts the store on it, and every worker joins the group through that store. Gloo's own pair
sockets follow ``GLOO_SOCKET_IFNAME`` (``runtime.worker_env`` sets it to the loopback device for
local runs). Everything else (environment variables, shutdown) is Ray Train's.
"""

from __future__ import annotations

import os
import socket
from dataclasses import dataclass
from datetime import timedelta

import ray
import torch.distributed as dist
from ray.train._internal.utils import get_address_and_port
from ray.train._internal.worker_group import WorkerGroup as V1WorkerGroup
from ray.train.torch.config import TorchConfig, _set_torch_distributed_env_vars, _TorchBackend

# The rank-0 worker's store server: kept alive for the life of the process group. One per worker
# process (a Train worker runs one group), as torch keeps its default group.
_SERVER_STORE: list[dist.TCPStore] = []


@dataclass
class BoundStoreTorchConfig(TorchConfig):
    """``TorchConfig`` whose store listens on ``listen_host`` ("" = the first worker's node
    address, for multi-node runs)."""

    listen_host: str = ""

    @property
    def backend_cls(self):
        return _BoundStoreBackend


def _start_store(host: str, world_size: int, timeout_s: int) -> int:
    """On the first worker: the store server on a socket bound to ``host``; returns its port."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.bind((host, 0))
    sock.listen()
    port = sock.getsockname()[1]
    store = dist.TCPStore(host, port, world_size, is_master=True,
                          timeout=timedelta(seconds=timeout_s), wait_for_workers=False,
                          master_listen_fd=sock.detach())
    _SERVER_STORE[:] = [store]
    return port


def _join_group(backend: str, rank: int, world_size: int, host: str, port: int,
                timeout_s: int) -> None:
    if "nccl" in backend:  # fail on a timed-out NCCL collective instead of hanging (as Ray)
        os.environ.setdefault("TORCH_NCCL_ASYNC_ERROR_HANDLING", "1")
    store = _SERVER_STORE[0] if rank == 0 else dist.TCPStore(
        host, port, world_size, is_master=False, timeout=timedelta(seconds=timeout_s))
    dist.init_process_group(backend=backend, store=store, rank=rank, world_size=world_size,
                            timeout=timedelta(seconds=timeout_s))


class _BoundStoreBackend(_TorchBackend):
    def on_start(self, worker_group, backend_config: BoundStoreTorchConfig) -> None:
        world = len(worker_group)
        host = (backend_config.listen_host
                or worker_group.execute_single(0, get_address_and_port)[0])
        if not isinstance(worker_group, V1WorkerGroup):
            worker_group.execute(_set_torch_distributed_env_vars)
        port = worker_group.execute_single(0, _start_store, host, world, backend_config.timeout_s)
        ray.get([worker_group.execute_single_async(i, _join_group, backend_config.backend, i,
                                                   world, host, port, backend_config.timeout_s)
                 for i in range(world)])
