"""A pseudo-id refresh as a computation apart from the memory bank (``model/memory_bank.py``),
so that it can run in the bank's background thread while the bank takes pushes.

``graph_ids`` and ``pair_ids`` compute a refresh from frozen inputs; ``TableReplica`` is the
background thread's own copy of the target tables, kept up to date from a journal of the rows
the bank wrote since the previous refresh started (the bank's thread then never copies a whole
table: at CUHK-PEDES size that copy is 200 MiB and held up the first push after every start);
``PendingRefresh`` is a refresh started and not applied yet.
"""

from __future__ import annotations

import time
from concurrent.futures import Future
from typing import NamedTuple

import numpy as np

from gckd_ray.model.pseudo_ids import centred_rows, cross_modal_pseudo_ids, normalised_rows

MODALITIES = ("image", "text")
# What a refresh reports (``MemoryBank.refresh_pseudo_ids``), in the order a saved state keeps
# them.
REFRESH_STATS = ("num_clusters", "image_coverage", "text_coverage", "mean_cluster_size",
                 "num_nodes", "num_edges", "seconds")


class Refreshed(NamedTuple):
    """A computed refresh: the new pseudo-ids of every target image and caption row, and what
    the refresh found (``REFRESH_STATS``)."""
    image_ids: np.ndarray
    text_ids: np.ndarray
    stats: dict[str, float]


class PendingRefresh(NamedTuple):
    """A refresh started at the read before global step ``started``, applied at the first read
    from step ``apply_at`` on; ``result`` is done once it has computed."""
    started: int
    apply_at: int
    result: Future


# (modality, rows (R,), their values (R, D)) as the bank wrote them, in order.
JournalEntry = tuple[str, np.ndarray, np.ndarray]


class TableReplica:
    """The target tables as the background refresh sees them. Only refreshes touch it, one at
    a time in the order they started (the bank's single refresh thread), so a refresh that
    first replays the journal handed to it at its start sees exactly the bank's tables at that
    start, whatever the bank's thread has written since."""

    def __init__(self, sizes: dict[str, int], dim: int, dtype: np.dtype):
        self.tables = {m: np.zeros((n, dim), dtype) for m, n in sizes.items()}

    def replay(self, journal: list[JournalEntry]) -> dict[str, np.ndarray]:
        """Apply ``journal`` (later entries win, as in the bank) and return the tables."""
        for modality, rows, values in journal:
            self.tables[modality][rows] = values
        return self.tables


def replica_graph_ids(replica: TableReplica, journal: list[JournalEntry],
                      rows: dict[str, np.ndarray], *args) -> Refreshed:
    """``graph_ids`` on ``replica`` once it has replayed ``journal`` (``args`` as
    ``graph_ids``' after ``rows``)."""
    return graph_ids(replica.replay(journal), rows, *args)


def graph_ids(tables: dict[str, np.ndarray], rows: dict[str, np.ndarray],
              sizes: dict[str, int], k: int, image_k: int, threshold: float, center: bool,
              threads: int, probes: int, seed: int) -> Refreshed:
    """``MemoryBank.refresh_pseudo_ids`` of the graph variant, on frozen inputs (``tables``:
    (N_m, D) per modality, never written while this runs; ``rows``: the seen rows)."""
    start = time.perf_counter()
    prepare = centred_rows if center else normalised_rows
    images, texts = (prepare(tables[m][rows[m]], copy=False) for m in MODALITIES)  # own copy
    image_ids, text_ids, num_edges = cross_modal_pseudo_ids(images, texts, k, threshold, threads,
                                                            image_k, probes, seed)
    pseudo = {}
    for m, ids in (("image", image_ids), ("text", text_ids)):
        pseudo[m] = np.full(sizes[m], -1, np.int64)
        pseudo[m][rows[m]] = ids
    # ids are 0 .. clusters - 1, each held by two or more nodes
    clusters = 1 + max(image_ids.max(initial=-1), text_ids.max(initial=-1))
    labelled = (image_ids >= 0).sum() + (text_ids >= 0).sum()

    def coverage(m: str) -> float:
        n = sizes[m]
        return float((pseudo[m] >= 0).sum() / n) if n else 0.0

    stats = {"num_clusters": float(clusters), "image_coverage": coverage("image"),
             "text_coverage": coverage("text"),
             "mean_cluster_size": float(labelled / clusters) if clusters else 0.0,
             "num_nodes": float(len(images) + len(texts)), "num_edges": float(num_edges)}
    return Refreshed(pseudo["image"], pseudo["text"],
                     {**stats, "seconds": time.perf_counter() - start})


def pair_ids(num_images: int, pairs: np.ndarray) -> Refreshed:
    """Paired variant: each target image is its own group, each caption joins its image's
    (the pairs are known; person ids still are not)."""
    start = time.perf_counter()
    num_texts = len(pairs)
    stats = {"num_clusters": float(num_images), "image_coverage": 1.0, "text_coverage": 1.0,
             "mean_cluster_size": (num_images + num_texts) / num_images if num_images else 0.0,
             "num_nodes": float(num_images + num_texts), "num_edges": float(num_texts)}
    return Refreshed(np.arange(num_images, dtype=np.int64), pairs.copy(),
                     {**stats, "seconds": time.perf_counter() - start})
