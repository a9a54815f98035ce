"""The global momentum memory's state: per-modality FIFO queues of teacher features, the
newest feature per target row, and target pseudo-ids; plain single-process code (numpy + faiss),
tested without Ray. ``distributed/memory.py`` wraps it as the named Ray actor.

Layout (DESIGN.md §2 items 3 and 6, §4):

- one ring buffer per modality (``"image"``, ``"text"``) of ``queue_size`` entries; each entry is
  a teacher feature ``(D,)``, a domain flag (SOURCE / TARGET, ``model/centring.py``), a label
  (source person label; -1 for target: the bank is never given target ids) and the item's row
  in its split;
- per target row the newest feature pushed for it (``num_target_images x D`` and
  ``num_target_texts x D`` tables with a ``seen`` mask): the nodes of the cross-domain graph;
- target pseudo-ids: connected components of the mutual-kNN graph over those nodes that hold at
  least one image and one caption (``model/pseudo_ids.py``), recomputed on the caller's
  schedule: at once (``refresh_pseudo_ids``) or pipelined (``refresh_on_schedule``).

Pipelined refresh (DESIGN.md §10): a refresh started at the memory read before global step s
computes in a background thread on the target tables as they were at that read (its own
replica, brought up to date from the journal of rows written since the previous start:
``model/pseudo_refresh.py``) and is applied at the first read
from step s + ``refresh_lag`` on, waiting there only if it is still computing. Which pseudo-ids
a read publishes is therefore a function of the schedule alone, never of timing, and
``state_dict`` carries the refreshes started but not applied yet (their results), so a run
resumed from a checkpoint applies exactly what an uninterrupted one would. ``refresh_lag`` 0 is
the synchronous refresh, computed in the caller's thread.

Features are stored and snapshotted in ``feature_dtype`` (float32 by default; float16 halves the
memory, the snapshot and the object-store traffic — the consumer then casts). Target tables use
the same dtype; the graph is always built in float32.
"""

from __future__ import annotations

import time
from concurrent.futures import Future, ThreadPoolExecutor, wait
from functools import partial
from pathlib import Path
from typing import Any, Callable

import numpy as np

from gckd_ray.checkpoint_format import MEMORY_CONFIG_KEYS, read_state, write_state
from gckd_ray.model import pseudo_refresh
from gckd_ray.model.centring import SOURCE, TARGET
from gckd_ray.model.pseudo_refresh import (MODALITIES, REFRESH_STATS, JournalEntry,
                                           PendingRefresh, Refreshed, TableReplica)

FEATURE_DTYPES = ("float32", "float16")
# The pending refreshes in a saved state (absent from states saved before they existed).
PENDING_KEYS = ("refresh_started", "refresh_apply_at", "refresh_image_ids", "refresh_text_ids",
                "refresh_stats")


def check_push(modality: str, features: np.ndarray, domain: int, labels: np.ndarray,
               indices: np.ndarray) -> None:
    """Validate one push without knowing the bank's sizes (the client calls it before sending,
    so a bad push fails at the call site, not later inside the actor).

    Raises:
        ValueError: unknown modality or domain, mismatched shapes, a target label other than -1
            (target ids must never reach the memory) or a negative source label / index.
    """
    if modality not in MODALITIES:
        raise ValueError(f"modality must be one of {MODALITIES}, got {modality!r}")
    if domain not in (SOURCE, TARGET):
        raise ValueError(f"domain must be SOURCE ({SOURCE}) or TARGET ({TARGET}), got {domain!r}")
    if features.ndim != 2:
        raise ValueError(f"features must be (B, D), got shape {features.shape}")
    batch = features.shape[0]
    if labels.shape != (batch,) or indices.shape != (batch,):
        raise ValueError(f"labels {labels.shape} and indices {indices.shape} must be ({batch},)")
    if domain == TARGET and (labels != -1).any():
        raise ValueError("target labels must all be -1: the memory is never given target ids")
    if domain == SOURCE and (labels < 0).any():
        raise ValueError("source labels must be >= 0")
    if (indices < 0).any():
        raise ValueError("indices must be >= 0")


class MemoryBank:
    """Per-modality FIFO queues of teacher features + target tables + target pseudo-ids.

    Args:
        dim: feature dimension D.
        queue_size: entries per modality queue (both domains share it, in push order).
        num_target_images / num_target_texts: rows of the target training image / caption
            splits (the node tables of the cross-domain graph).
        pseudo_k: neighbours per node in the kNN graph (``gckd.pseudo_k``).
        pseudo_threshold: minimum cosine of a kept (mutual) edge (``gckd.pseudo_threshold``).
        pseudo_center: centre each modality's target features before the graph
            (``gckd.pseudo_center``).
        pseudo_image_k: image-image mutual neighbours also joined in the graph
            (``gckd.pseudo_image_k``; 0 = image-caption edges only).
        faiss_threads: OpenMP threads for the kNN search (``gckd.refresh_threads``; 0 leaves
            faiss' default: every core).
        seed: kept in the state; seeds the clustered search's k-means (deterministic).
        feature_dtype: ``"float32"`` or ``"float16"``: storage and snapshot dtype of features.
        target_pairs: paired-target variant only: the image row of each target caption.
        refresh_lag: steps from a refresh's start to the read that applies it
            (``gckd.refresh_lag``, ``refresh_on_schedule``); 0: applied at the read that
            starts it.
        pseudo_probes: 0: exact kNN search at every size; else graphs of more than
            ``pseudo_exact_pairs`` image-caption pairs use the clustered search, each image
            meeting the captions of this many caption clusters (``gckd.pseudo_probes``,
            ``gckd.pseudo_exact_pairs``; ``model/knn.py``).
    """

    def __init__(self, dim: int, queue_size: int, num_target_images: int, num_target_texts: int,
                 *, pseudo_k: int, pseudo_threshold: float, pseudo_center: bool,
                 pseudo_image_k: int, faiss_threads: int, seed: int, feature_dtype: str = "float32",
                 target_pairs: np.ndarray | None = None, refresh_lag: int = 0,
                 pseudo_probes: int = 0, pseudo_exact_pairs: int = 0):
        if dim <= 0 or queue_size <= 0 or num_target_images < 0 or num_target_texts < 0:
            raise ValueError("dim and queue_size must be > 0, target sizes >= 0")
        if feature_dtype not in FEATURE_DTYPES:
            raise ValueError(f"feature_dtype must be one of {FEATURE_DTYPES}, "
                             f"got {feature_dtype!r}")
        if pseudo_k < 1:
            raise ValueError(f"pseudo_k must be >= 1, got {pseudo_k}")
        for name, value in (("faiss_threads", faiss_threads), ("pseudo_image_k", pseudo_image_k),
                            ("refresh_lag", refresh_lag), ("pseudo_probes", pseudo_probes),
                            ("pseudo_exact_pairs", pseudo_exact_pairs)):
            if value < 0:
                raise ValueError(f"{name} must be >= 0, got {value}")
        self.dim, self.queue_size = dim, queue_size
        self.num_targets = {"image": num_target_images, "text": num_target_texts}
        self.pseudo_k, self.pseudo_threshold, self.seed = pseudo_k, float(pseudo_threshold), seed
        self.feature_dtype, self.faiss_threads = feature_dtype, faiss_threads
        self.pseudo_center, self.pseudo_image_k = pseudo_center, pseudo_image_k
        self.refresh_lag, self.pseudo_probes = refresh_lag, pseudo_probes
        self.pseudo_exact_pairs = pseudo_exact_pairs
        # Paired-target variant: caption row -> image row of the target training set.
        self.target_pairs = None if target_pairs is None else self._check_pairs(target_pairs)
        self.version = 0         # +1 per push
        self.pseudo_version = 0  # +1 per refresh_pseudo_ids
        dt = np.dtype(feature_dtype)
        self._features = {m: np.zeros((queue_size, dim), dt) for m in MODALITIES}
        self._domain = {m: np.zeros(queue_size, np.int8) for m in MODALITIES}
        self._labels = {m: np.full(queue_size, -1, np.int64) for m in MODALITIES}
        self._indices = {m: np.zeros(queue_size, np.int64) for m in MODALITIES}
        self._ptr = {m: 0 for m in MODALITIES}    # next slot to write
        self._count = {m: 0 for m in MODALITIES}  # filled slots
        self._table = {m: np.zeros((n, dim), dt) for m, n in self.num_targets.items()}
        self._seen = {m: np.zeros(n, bool) for m, n in self.num_targets.items()}
        self._pseudo = {m: np.full(n, -1, np.int64) for m, n in self.num_targets.items()}
        self._pending: list[PendingRefresh] = []  # started, not applied yet; oldest first
        # Lagged graph refreshes read a replica of the tables in the refresh thread; the rows
        # written since the last start, in order, bring it up to date there.
        self._journaling = refresh_lag > 0 and self.target_pairs is None
        self._journal: list[JournalEntry] = []
        self._replica: TableReplica | None = None
        self._worker: ThreadPoolExecutor | None = None

    def _check_pairs(self, pairs: np.ndarray) -> np.ndarray:
        pairs = np.asarray(pairs, np.int64)
        n_img, n_txt = self.num_targets["image"], self.num_targets["text"]
        if pairs.shape != (n_txt,) or (n_txt and not 0 <= pairs.min() <= pairs.max() < n_img):
            raise ValueError(f"target_pairs must map each of the {n_txt} target captions to an "
                             f"image row in [0, {n_img}), got shape {pairs.shape}")
        return pairs

    # ------------------------------------------------------------------ queues
    def push(self, modality: str, features: np.ndarray, domain: int, labels: np.ndarray,
             indices: np.ndarray) -> None:
        """Enqueue teacher features; overwrite the oldest entries once the queue is full.

        Args:
            modality: ``"image"`` or ``"text"``.
            features: (B, D) teacher features, L2-normalised.
            domain: SOURCE or TARGET.
            labels: (B,) int64 source person labels; all -1 for TARGET.
            indices: (B,) int64 row of each item in its split (image row / caption row).
        """
        features = np.asarray(features)
        labels = np.asarray(labels, np.int64).reshape(-1)
        indices = np.asarray(indices, np.int64).reshape(-1)
        domain = int(domain)
        check_push(modality, features, domain, labels, indices)
        if features.shape[1] != self.dim:
            raise ValueError(f"features have dim {features.shape[1]}, the memory {self.dim}")
        if domain == TARGET:
            n = self.num_targets[modality]
            if (indices >= n).any():
                raise ValueError(f"target {modality} index {int(indices.max())} out of range "
                                 f"(num_target_{modality}s = {n})")
            self._update_table(modality, features, indices)
        self._enqueue(modality, features, domain, labels, indices)
        self.version += 1

    def _update_table(self, modality: str, features: np.ndarray, indices: np.ndarray) -> None:
        # Newest feature per row: within the batch the last occurrence of a row wins.
        last = len(indices) - 1 - np.unique(indices[::-1], return_index=True)[1]
        rows = indices[last]
        self._table[modality][rows] = features[last]
        self._seen[modality][rows] = True
        if self._journaling:
            self._journal.append((modality, rows, self._table[modality][rows]))

    def _enqueue(self, m: str, features: np.ndarray, domain: int, labels: np.ndarray,
                 indices: np.ndarray) -> None:
        q, batch = self.queue_size, len(indices)
        if batch >= q:  # only the newest q survive; they fill the buffer oldest first
            features, labels, indices = features[-q:], labels[-q:], indices[-q:]
            batch, self._ptr[m] = q, 0
        start = self._ptr[m]
        first = min(batch, q - start)  # rows before the wrap
        for dst, src in ((slice(start, start + first), slice(0, first)),
                         (slice(0, batch - first), slice(first, batch))):
            self._features[m][dst] = features[src]
            self._domain[m][dst] = domain
            self._labels[m][dst] = labels[src]
            self._indices[m][dst] = indices[src]
        self._ptr[m] = (start + batch) % q
        self._count[m] = min(self._count[m] + batch, q)

    def _ordered(self, m: str, array: np.ndarray) -> np.ndarray:
        """Copy of the filled slots of ``array``, oldest first."""
        count, ptr = self._count[m], self._ptr[m]
        start = (ptr - count) % self.queue_size
        if start + count <= self.queue_size:
            return array[start:start + count].copy()
        return np.concatenate([array[start:], array[:ptr]])

    # ------------------------------------------------------------------ graph and pseudo-ids
    def target_table(self, modality: str) -> tuple[np.ndarray, np.ndarray]:
        """Copies of the newest feature per target row ``(N, D)`` and the ``seen`` mask ``(N,)``."""
        return self._table[modality].copy(), self._seen[modality].copy()

    def refresh_pseudo_ids(self) -> dict[str, float]:
        """Recompute target pseudo-ids from the cross-domain graph (never from labels), now.

        Nodes: the newest feature of every seen target image and caption, centred per modality
        when ``pseudo_center`` (the shared component makes every cosine high and turns a few
        nodes into hubs; measured on a source-only teacher: mutual-NN pair precision 3.0% raw,
        5.2% centred). Edges: image-caption pairs that are among each other's ``pseudo_k``
        nearest of the other modality (cosine; faiss ``IndexFlatIP``, or the clustered search
        above ``pseudo_exact_pairs`` pairs when ``pseudo_probes``), cosine
        ``>= pseudo_threshold``; with ``pseudo_image_k``, also image-image mutual neighbours. A
        connected component of two or more nodes gets a pseudo-id (numbered by its first node:
        images by row, then captions by row); every other row gets -1 (``model/pseudo_ids.py``).
        Deterministic. The paired variant groups each caption with its known image instead.

        Returns:
            ``num_clusters``, ``image_coverage`` / ``text_coverage`` (fraction of all target
            rows with a pseudo-id), ``mean_cluster_size`` (nodes per pseudo-id),
            ``num_nodes``, ``num_edges``, and ``seconds`` (wall time of the computation).
        """
        return self._apply(self._frozen_refresh()())

    def refresh_on_schedule(self, step: int, start: bool) -> list[dict[str, float]]:
        """The pipelined refresh at the memory read before global step ``step``: apply every
        pending refresh due by now (``apply_at <= step``, oldest first, waiting for one still
        computing), then, if ``start``, start one on the memory as it is now, computed in a
        background thread and applied at the first read from step ``step + refresh_lag`` on
        (with lag 0: computed here and applied at once, as ``refresh_pseudo_ids``).

        Returns:
            per refresh applied here, its statistics (``refresh_pseudo_ids``) with
            ``started_step`` (the step it started before) and ``wait_seconds`` (how long this
            read waited for it to finish).
        """
        applied = self._apply_due(step)
        if start:
            if self.refresh_lag == 0:
                result: Future = Future()
                result.set_result(self._frozen_refresh()())
            else:
                compute = self._frozen_refresh(background=True)
                if self._worker is None:
                    self._worker = ThreadPoolExecutor(1, thread_name_prefix="pseudo-id-refresh")
                result = self._worker.submit(compute)
            self._pending.append(PendingRefresh(step, step + self.refresh_lag, result))
            applied += self._apply_due(step)
        return applied

    def _apply_due(self, step: int) -> list[dict[str, float]]:
        applied = []
        while self._pending and self._pending[0].apply_at <= step:
            pending = self._pending.pop(0)
            begin = time.perf_counter()
            refreshed = pending.result.result()  # a failed refresh raises here
            waited = time.perf_counter() - begin
            applied.append({**self._apply(refreshed), "started_step": float(pending.started),
                            "wait_seconds": waited})
        return applied

    def _apply(self, refreshed: Refreshed) -> dict[str, float]:
        self._pseudo["image"], self._pseudo["text"] = refreshed.image_ids, refreshed.text_ids
        self.pseudo_version += 1
        return dict(refreshed.stats)

    def _frozen_refresh(self, background: bool = False) -> Callable[[], Refreshed]:
        """The refresh of the memory as it is now, as a function: called at once on the live
        tables, or with ``background`` later in the refresh thread on its replica, handed the
        journal of the rows written since the previous background start (which it replays
        first). Either way it holds the seen rows and the settings of now."""
        if self.target_pairs is not None:
            return partial(pseudo_refresh.pair_ids, self.num_targets["image"], self.target_pairs)
        rows = {m: np.flatnonzero(self._seen[m]) for m in MODALITIES}
        pairs = len(rows["image"]) * len(rows["text"])
        probes = self.pseudo_probes if pairs > self.pseudo_exact_pairs else 0
        settings = (dict(self.num_targets), self.pseudo_k, self.pseudo_image_k,
                    self.pseudo_threshold, self.pseudo_center, self.faiss_threads, probes,
                    self.seed)
        if not background:
            return partial(pseudo_refresh.graph_ids, dict(self._table), rows, *settings)
        if self._replica is None:
            self._replica = TableReplica(self.num_targets, self.dim, np.dtype(self.feature_dtype))
        journal, self._journal = self._journal, []
        return partial(pseudo_refresh.replica_graph_ids, self._replica, journal, rows, *settings)

    def pseudo_ids(self) -> tuple[np.ndarray, np.ndarray]:
        """Copies of the target image ``(num_target_images,)`` and caption
        ``(num_target_texts,)`` pseudo-ids, int64, -1 = none."""
        return self._pseudo["image"].copy(), self._pseudo["text"].copy()

    # ------------------------------------------------------------------ snapshot
    def snapshot(self) -> dict[str, np.ndarray]:
        """A consistent copy of the queues, oldest entry first (C-contiguous numpy).

        Returns, for each modality m: ``{m}_features`` (n, D) in ``feature_dtype``,
        ``{m}_domain`` (n,) int8, ``{m}_labels`` (n,) int64 — source label, or for a target
        entry its row's *current* pseudo-id (-1 if none) —, ``{m}_indices`` (n,) int64; plus
        ``target_image_pseudo_ids``, ``target_text_pseudo_ids``, and 0-d int64 ``version``
        (pushes so far) and ``pseudo_version`` (refreshes so far).
        """
        out: dict[str, np.ndarray] = {}
        for m in MODALITIES:
            domain = self._ordered(m, self._domain[m])
            labels = self._ordered(m, self._labels[m])
            indices = self._ordered(m, self._indices[m])
            target = domain == TARGET
            labels[target] = self._pseudo[m][indices[target]]
            out.update({f"{m}_features": self._ordered(m, self._features[m]),
                        f"{m}_domain": domain, f"{m}_labels": labels, f"{m}_indices": indices})
        out["target_image_pseudo_ids"] = self._pseudo["image"].copy()
        out["target_text_pseudo_ids"] = self._pseudo["text"].copy()
        out["version"] = np.array(self.version, np.int64)
        out["pseudo_version"] = np.array(self.pseudo_version, np.int64)
        return out

    def stats(self) -> dict[str, Any]:
        """Fill levels per modality and domain, seen target rows, versions (flat, for logging)."""
        out: dict[str, Any] = {"version": self.version, "pseudo_version": self.pseudo_version,
                               "queue_size": self.queue_size}
        for m in MODALITIES:
            domain = self._domain[m][self._filled_slots(m)]
            out[f"{m}_filled"] = self._count[m]
            out[f"{m}_source"] = int((domain == SOURCE).sum())
            out[f"{m}_target"] = int((domain == TARGET).sum())
            out[f"target_{m}_seen"] = int(self._seen[m].sum())
        out["pending_refreshes"] = len(self._pending)
        return out

    def _filled_slots(self, m: str) -> np.ndarray:
        return (self._ptr[m] - self._count[m] + np.arange(self._count[m])) % self.queue_size

    # ------------------------------------------------------------------ state
    @staticmethod
    def _state_keys() -> list[str]:
        per_modality = ("{m}_features", "{m}_domain", "{m}_labels", "{m}_indices", "{m}_ptr",
                        "{m}_count", "target_{m}_features", "target_{m}_seen",
                        "target_{m}_pseudo_ids")
        return [*MEMORY_CONFIG_KEYS, "pseudo_k", "seed", "version", "pseudo_version",
                "pseudo_threshold", "feature_dtype", "target_pairs", *PENDING_KEYS,
                *(k.format(m=m) for m in MODALITIES for k in per_modality)]

    def state_dict(self) -> dict[str, np.ndarray]:
        """Every array of the bank, plain numpy (no objects: loadable with allow_pickle=False).

        Pending refreshes (started, not applied yet) are saved with their results: this waits
        for any still computing, so that a bank loaded from the state applies exactly what
        this one would (``refresh_started``, ``refresh_apply_at`` (P,), ``refresh_image_ids``
        (P, num_target_images), ``refresh_text_ids`` (P, num_target_texts),
        ``refresh_stats`` (P, len(REFRESH_STATS)))."""
        state = {"dim": self.dim, "queue_size": self.queue_size,
                 "num_target_images": self.num_targets["image"],
                 "num_target_texts": self.num_targets["text"], "pseudo_k": self.pseudo_k,
                 "seed": self.seed, "version": self.version, "pseudo_version": self.pseudo_version}
        state = {k: np.array(v, np.int64) for k, v in state.items()}
        state["pseudo_threshold"] = np.array(self.pseudo_threshold, np.float64)
        state["feature_dtype"] = np.array(self.feature_dtype)
        # -1: unpaired (a zero-length array would be ambiguous with "no target captions").
        state["target_pairs"] = (np.array(-1, np.int64) if self.target_pairs is None
                                 else self.target_pairs)
        for m in MODALITIES:
            state.update({f"{m}_features": self._features[m], f"{m}_domain": self._domain[m],
                          f"{m}_labels": self._labels[m], f"{m}_indices": self._indices[m],
                          f"{m}_ptr": np.array(self._ptr[m], np.int64),
                          f"{m}_count": np.array(self._count[m], np.int64),
                          f"target_{m}_features": self._table[m],
                          f"target_{m}_seen": self._seen[m],
                          f"target_{m}_pseudo_ids": self._pseudo[m]})
        state.update(self._pending_state())
        return {k: v.copy() for k, v in state.items()}

    def _pending_state(self) -> dict[str, np.ndarray]:
        done = [p.result.result() for p in self._pending]

        def rows(values: list, width: int, dtype: type) -> np.ndarray:
            out = np.zeros((len(values), width), dtype)
            for j, value in enumerate(values):
                out[j] = value
            return out

        return {
            "refresh_started": np.array([p.started for p in self._pending], np.int64),
            "refresh_apply_at": np.array([p.apply_at for p in self._pending], np.int64),
            "refresh_image_ids": rows([r.image_ids for r in done], self.num_targets["image"],
                                      np.int64),
            "refresh_text_ids": rows([r.text_ids for r in done], self.num_targets["text"],
                                     np.int64),
            "refresh_stats": rows([[r.stats[k] for k in REFRESH_STATS] for r in done],
                                  len(REFRESH_STATS), np.float64)}

    def load_state_dict(self, state: dict[str, np.ndarray]) -> None:
        """Replace the bank's contents; sizes (dim, queue size, target sizes) must match."""
        missing = sorted(set(self._state_keys()) - set(PENDING_KEYS) - set(state))
        if missing:
            raise ValueError(f"memory state lacks {missing}")
        sizes = {"dim": self.dim, "queue_size": self.queue_size,
                 "num_target_images": self.num_targets["image"],
                 "num_target_texts": self.num_targets["text"]}
        wrong = {k: (int(state[k]), v) for k, v in sizes.items() if int(state[k]) != v}
        if wrong:
            raise ValueError("memory state does not fit this bank (saved, expected): "
                             + ", ".join(f"{k} {a} != {b}" for k, (a, b) in wrong.items()))
        self.pseudo_k, self.seed = int(state["pseudo_k"]), int(state["seed"])
        self.pseudo_threshold = float(state["pseudo_threshold"])
        self.version, self.pseudo_version = int(state["version"]), int(state["pseudo_version"])
        self.feature_dtype = str(state["feature_dtype"])
        pairs = np.asarray(state["target_pairs"])
        self.target_pairs = None if pairs.ndim == 0 else self._check_pairs(pairs)
        dt = np.dtype(self.feature_dtype)
        for m in MODALITIES:
            self._features[m] = np.array(state[f"{m}_features"], dt)
            self._domain[m] = np.array(state[f"{m}_domain"], np.int8)
            self._labels[m] = np.array(state[f"{m}_labels"], np.int64)
            self._indices[m] = np.array(state[f"{m}_indices"], np.int64)
            self._ptr[m], self._count[m] = int(state[f"{m}_ptr"]), int(state[f"{m}_count"])
            self._table[m] = np.array(state[f"target_{m}_features"], dt)
            self._seen[m] = np.array(state[f"target_{m}_seen"], bool)
            self._pseudo[m] = np.array(state[f"target_{m}_pseudo_ids"], np.int64)
        self._load_pending(state)
        if self._journaling:  # the replica catches up with the loaded tables at the next start
            self._journal = [(m, seen, self._table[m][seen]) for m in MODALITIES
                             for seen in [np.flatnonzero(self._seen[m])]]

    def _load_pending(self, state: dict[str, np.ndarray]) -> None:
        """The saved pending refreshes replace the bank's own (whose computations are dropped:
        those not started are cancelled, a running one is waited for). States saved before the
        pipelined refresh have none."""
        for pending in self._pending:
            pending.result.cancel()
        wait([p.result for p in self._pending])
        self._pending = []
        if PENDING_KEYS[0] not in state:
            return
        for started, apply_at, image_ids, text_ids, stats in zip(
                state["refresh_started"], state["refresh_apply_at"], state["refresh_image_ids"],
                state["refresh_text_ids"], state["refresh_stats"]):
            result: Future = Future()
            result.set_result(Refreshed(np.array(image_ids, np.int64),
                                        np.array(text_ids, np.int64),
                                        dict(zip(REFRESH_STATS, map(float, stats)))))
            self._pending.append(PendingRefresh(int(started), int(apply_at), result))

    def save(self, directory: str | Path) -> Path:
        """Write ``directory/memory.npz`` atomically (see ``write_state``); return its path."""
        return write_state(directory, self.state_dict())

    @classmethod
    def load(cls, directory: str | Path, *, pseudo_center: bool, pseudo_image_k: int,
             faiss_threads: int, **refresh: int) -> "MemoryBank":
        """A bank rebuilt from ``directory/memory.npz``; the state does not hold the refresh's
        ``pseudo_center``, ``pseudo_image_k``, ``faiss_threads`` and the keyword arguments
        ``refresh_lag``, ``pseudo_probes``, ``pseudo_exact_pairs`` (defaults as the
        constructor's), so the caller gives them."""
        state = read_state(directory)
        bank = cls(int(state["dim"]), int(state["queue_size"]), int(state["num_target_images"]),
                   int(state["num_target_texts"]), pseudo_k=int(state["pseudo_k"]),
                   pseudo_threshold=float(state["pseudo_threshold"]),
                   pseudo_center=pseudo_center, pseudo_image_k=pseudo_image_k,
                   faiss_threads=faiss_threads, seed=int(state["seed"]),
                   feature_dtype=str(state["feature_dtype"]), **refresh)
        bank.load_state_dict(state)
        return bank
