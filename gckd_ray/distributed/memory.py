"""The memory actor and its one client: ``MemoryActor`` is the memory bank
(``model/memory_bank.py``) as a named Ray actor (a snapshot handed out as an ObjectRef, numbered
publications, restore-on-restart); ``MemoryClient`` is the only code of the package that talks
to it (DESIGN.md §4, §10): the driver creates and finally kills the actor through it, and the
workers push teacher features (fire-and-forget, bounded in flight), read published snapshots as
tensors, refresh pseudo-ids, and save and restore the memory's state with it.

The actor runs its tasks one at a time in call order (a plain, not a threaded, actor); a
pipelined pseudo-id refresh computes in one background thread of its own, on its replica of
the target tables, with ``gckd.refresh_threads`` threads (0: every CPU Ray counts on the actor's
node). The actor holds no CPU slot (``num_cpus=0``), so it never keeps Train workers or
Tune trials from being placed; its refresh uses the node's cores for a few seconds every
``gckd.pseudo_every`` steps.
"""

from __future__ import annotations

import os
import warnings
from collections import deque
from pathlib import Path
from typing import Any

import numpy as np
import torch

from gckd_ray.checkpoint_format import MEMORY_FILE, read_state
from gckd_ray.model.memory_bank import MemoryBank, check_push


def memory_actor_name(run_name: str) -> str:
    return f"gckd-memory-{run_name}"


class MemoryActor(MemoryBank):
    """The bank as a Ray actor (``MemoryClient.create`` applies ``ray.remote`` and the restart
    options). When Ray restarts the actor process its ``__init__`` runs again with the same
    arguments: with ``restore_from`` set it reloads the last ``autosave``, so a killed actor
    comes back with its queues, tables and pseudo-ids (pushes after that save are lost)."""

    def __init__(self, *args: Any, restore_from: str = "", **kwargs: Any):
        kwargs["faiss_threads"] = kwargs.get("faiss_threads") or node_cpus()
        super().__init__(*args, **kwargs)
        self.restore_from = restore_from
        self.restored = bool(restore_from) and (Path(restore_from) / MEMORY_FILE).is_file()
        if self.restored:
            self.load_state_dict(read_state(restore_from))
        self._cached_ref: tuple[tuple[int, int], Any] | None = None
        self._published = 0
        self._publications: dict[int, Any] = {}

    def ready(self) -> dict[str, Any]:
        """Answers once ``__init__`` has finished (and restored, if it did)."""
        return {"restored": self.restored, "refresh_threads": self.faiss_threads, **self.stats()}

    def usage(self) -> dict[str, float]:
        """This actor process: ``pid``, ``rss_mib`` now and ``peak_rss_mib`` (since it
        started), and the threads its refresh uses (``refresh_threads``)."""
        kib = {}
        with open("/proc/self/status") as status:  # VmRSS now, VmHWM its peak (Linux)
            for line in status:
                name, _, value = line.partition(":")
                if name in ("VmRSS", "VmHWM"):
                    kib[name] = int(value.split()[0])
        return {"pid": os.getpid(), "rss_mib": kib["VmRSS"] / 1024,
                "peak_rss_mib": kib["VmHWM"] / 1024, "refresh_threads": self.faiss_threads}

    def read(self, step: int, refresh: bool) -> tuple[int, list[dict[str, float]]]:
        """The memory read before global step ``step``: the pipelined refresh
        (``refresh_on_schedule``: apply what is due, start one if ``refresh``), then
        ``publish``. Returns the publication number and the applied refreshes' statistics."""
        applied = self.refresh_on_schedule(step, refresh)
        return self.publish(), applied

    def snapshot_ref(self) -> list:
        """``[ObjectRef]`` of ``snapshot()``, put in the object store once per version.

        Wrapped in a list so Ray hands the caller the ref instead of resolving it; the caller
        ``ray.get``s it and reads the arrays zero-copy from shared memory. The object is owned
        by this actor: it is lost if the actor dies (pull a new one after a restart).
        """
        import ray

        key = (self.version, self.pseudo_version)
        if self._cached_ref is None or self._cached_ref[0] != key:
            self._cached_ref = None  # drop the old object before putting the new one
            self._cached_ref = (key, ray.put(self.snapshot()))
        return [self._cached_ref[1]]

    def publish(self) -> int:
        """Put the current snapshot in the object store under a new publication number.

        One caller publishes and tells the others the number, so every worker of a step reads
        the same snapshot whatever the timing of their calls (a run is then reproducible).
        The last few publications stay readable.
        """
        self._published += 1
        self._publications[self._published] = self.snapshot_ref()[0]
        for old in [p for p in self._publications if p <= self._published - 4]:
            del self._publications[old]
        return self._published

    def published_ref(self, number: int) -> list:
        """``[ObjectRef]`` of publication ``number`` (see ``publish``)."""
        if number not in self._publications:
            raise KeyError(f"memory snapshot publication {number} is not available "
                           f"(have {sorted(self._publications)})")
        return [self._publications[number]]

    def autosave(self) -> str:
        """Save to ``restore_from``, where a restarted actor looks; return the file path."""
        if not self.restore_from:
            raise ValueError("this memory actor was created without restore_from")
        return str(self.save(self.restore_from))


def node_cpus() -> int:
    """The CPUs Ray counts on this process's node (its ``CPU`` resource), at most those this
    process may run on, at least 1: the memory actor's refresh threads for
    ``gckd.refresh_threads=0``."""
    import ray

    node = ray.get_runtime_context().get_node_id()
    cpus = next((n["Resources"].get("CPU", 0) for n in ray.nodes()
                 if n["NodeID"] == node and n["Alive"]), 0)
    return max(1, min(int(cpus), len(os.sched_getaffinity(0))))


def _as_numpy(x: Any, dtype: np.dtype) -> np.ndarray:
    if isinstance(x, torch.Tensor):
        x = x.detach().to("cpu")
        x = x.float() if dtype == np.float32 else x.long()
        return x.contiguous().numpy()
    return np.ascontiguousarray(x, dtype)


class MemoryClient:
    """Everything the driver and the workers do with the memory actor, as plain methods.

    Pushes are fire-and-forget with a bound on pending calls; snapshots come back as torch
    tensors. Calls from one client reach the actor in call order (one caller's actor tasks run
    in submission order), which is what orders a refresh before the publish that follows it.

    Args:
        actor: the memory actor handle (``create`` or ``connect`` make one).
        max_in_flight: pending pushes allowed before ``push`` waits for the oldest one.
    """

    def __init__(self, actor: Any, max_in_flight: int = 4):
        if max_in_flight < 1:
            raise ValueError(f"max_in_flight must be >= 1, got {max_in_flight}")
        self.actor, self.max_in_flight = actor, max_in_flight
        self._pending: deque = deque()

    @classmethod
    def create(cls, name: str, *, dim: int, queue_size: int, num_target_images: int,
               num_target_texts: int, restore_from: str, pseudo_k: int,
               pseudo_threshold: float, pseudo_center: bool, pseudo_image_k: int,
               faiss_threads: int, seed: int, max_restarts: int, feature_dtype: str = "float32",
               target_pairs: np.ndarray | None = None, refresh_lag: int = 0,
               pseudo_probes: int = 0, pseudo_exact_pairs: int = 0,
               namespace: str | None = None) -> "MemoryClient":
        """Start (or join, ``get_if_exists``) the named memory actor, wait until it answers and
        return its client. The bank's arguments are ``MemoryBank``'s, except ``faiss_threads``
        0: every CPU Ray counts on the actor's node (``node_cpus``); ``restore_from``: the
        folder a restarted actor reloads its last ``autosave`` from ("" for none);
        ``max_restarts``: Ray restarts of a dead actor process.

        Create it from the driver: a non-detached actor shares the fate of the process that
        created it, so one created by a Train worker dies with that worker. An existing actor
        of that name is returned as is, whatever the other arguments say. ``num_cpus=0``: it
        holds no CPU slot.
        """
        import ray

        actor = ray.remote(MemoryActor).options(
            name=name, namespace=namespace, get_if_exists=True, max_restarts=max_restarts,
            max_task_retries=-1, num_cpus=0,
        ).remote(dim, queue_size, num_target_images, num_target_texts, pseudo_k=pseudo_k,
                 pseudo_threshold=pseudo_threshold, seed=seed, feature_dtype=feature_dtype,
                 faiss_threads=faiss_threads, pseudo_center=pseudo_center,
                 pseudo_image_k=pseudo_image_k,
                 target_pairs=target_pairs, refresh_lag=refresh_lag,
                 pseudo_probes=pseudo_probes, pseudo_exact_pairs=pseudo_exact_pairs,
                 restore_from=restore_from)
        ray.get(actor.ready.remote())  # surfaces a failed restore here, not at the first push
        return cls(actor)

    @classmethod
    def connect(cls, name: str, namespace: str | None = None) -> "MemoryClient":
        """The client of a running memory actor (workers look it up by name)."""
        import ray

        return cls(ray.get_actor(name, namespace=namespace))

    @property
    def in_flight(self) -> int:
        return len(self._pending)

    def push(self, modality: str, features: torch.Tensor, domain: int, labels: Any,
             indices: Any) -> None:
        """Send (B, D) teacher features (cast to float32 on CPU) with (B,) labels / indices.
        Returns at once unless ``max_in_flight`` pushes are pending; then it waits for (and
        raises the error of) the oldest."""
        import ray

        feats = _as_numpy(features, np.float32)
        labels, indices = _as_numpy(labels, np.int64), _as_numpy(indices, np.int64)
        check_push(modality, feats, int(domain), labels, indices)
        self._pending.append(self.actor.push.remote(modality, feats, int(domain), labels, indices))
        while len(self._pending) > self.max_in_flight:
            ray.get(self._pending.popleft())

    def flush(self) -> None:
        """Wait for every pending push (raises the first failed one's error)."""
        import ray

        while self._pending:
            ray.get(self._pending.popleft())

    def refresh(self) -> dict[str, float]:
        """Recompute the target pseudo-ids now and wait; returns the refresh's statistics
        (``MemoryBank.refresh_pseudo_ids``). Outside the pipelined schedule of ``read``."""
        import ray

        return ray.get(self.actor.refresh_pseudo_ids.remote())

    def read(self, refresh: bool, step: int) -> tuple[int, list[dict[str, float]]]:
        """The memory read before global step ``step``: flush the pending pushes, then in the
        actor apply the pseudo-id refreshes due by ``step`` (waiting for one still computing),
        start one when ``refresh`` (applied ``gckd.refresh_lag`` steps later; at once with lag
        0) and publish a snapshot (``MemoryActor.read``). One caller (rank 0) does this and
        tells the other ranks the publication number, so every rank reads the same memory.

        Returns:
            the publication number (for ``snapshot``) and the statistics of each refresh
            applied at this read (``MemoryBank.refresh_on_schedule``; usually none or one).
        """
        import ray

        self.flush()
        number, applied = ray.get(self.actor.read.remote(step, refresh))
        return number, applied

    def snapshot(self, publication: int | None = None) -> dict[str, torch.Tensor]:
        """The actor's latest snapshot, or publication ``publication`` (``read``), as tensors
        (keys as ``MemoryBank.snapshot``).

        Zero-copy: the tensors view read-only shared memory; do not modify them in place
        (``clone()`` first). Pushes still in flight may not be in the latest snapshot
        (``flush()`` first if that matters).
        """
        import ray

        call = (self.actor.snapshot_ref.remote() if publication is None
                else self.actor.published_ref.remote(publication))
        (ref,) = ray.get(call)
        arrays = ray.get(ref)
        with warnings.catch_warnings():  # read-only arrays: torch warns about writability
            warnings.filterwarnings("ignore", message="The given NumPy array is not writable")
            return {k: torch.from_numpy(v) for k, v in arrays.items()}

    def usage(self) -> dict[str, float]:
        """The actor process's ``pid``, ``rss_mib``, ``peak_rss_mib`` and
        ``refresh_threads`` (``MemoryActor.usage``)."""
        import ray

        return ray.get(self.actor.usage.remote())

    def state(self) -> dict[str, np.ndarray]:
        """The memory's whole state (``MemoryBank.state_dict``, pending refreshes with their
        results: waits for any still computing), for a checkpoint."""
        import ray

        return ray.get(self.actor.state_dict.remote())

    def load_state(self, state: dict[str, np.ndarray]) -> None:
        """Replace the memory's contents with ``state`` (from a checkpoint) and wait."""
        import ray

        ray.get(self.actor.load_state_dict.remote(state))

    def autosave(self) -> str:
        """Save the state where a restarted actor looks (``restore_from``) and wait; returns
        the file path."""
        import ray

        return ray.get(self.actor.autosave.remote())

    def shutdown(self) -> None:
        """Kill the actor (no restart)."""
        import ray

        ray.kill(self.actor)
