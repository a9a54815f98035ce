"""The method's faiss k-nearest-neighbour searches, with the OpenMP thread count set for the
search only: :func:`faiss_knn`, exact inner product (``IndexFlatIP``) on float32 C-contiguous
copies, and :func:`clustered_cross_knn`, an approximate search in both directions between two
large sets (a faiss k-means coarse quantizer, then exact blocks by matrix product).

Both graphs of the method search with :func:`faiss_knn`: the step's GMP graph
(``model/graph.py``, ``knn_edges``) and the memory's pseudo-id graph
(``model/pseudo_ids.py``, ``cross_modal_mutual_edges``), which switches to
:func:`clustered_cross_knn` for dataset-size target tables (DESIGN.md §10).
"""

from __future__ import annotations

import contextlib
import math
import os
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import torch


def faiss_module():
    """The faiss module, or None where it is not installed (e.g. a bare GPU image)."""
    try:
        import faiss
    except ImportError:
        return None
    return faiss


@contextlib.contextmanager
def faiss_threads(num_threads: int) -> Iterator[None]:
    """Run faiss with ``num_threads`` OpenMP threads (0: leave faiss' default, every core),
    then restore the previous setting.

    faiss and torch share one OpenMP runtime in this stack (``faiss.omp_set_num_threads(1)``
    also makes ``torch.get_num_threads()`` return 1), and each would otherwise spread over all
    cores next to the other's threads (and next to the data loader and Ray's workers), which
    oversubscribes small machines. So the count is set for the search only and both settings
    are put back afterwards.
    """
    if num_threads == 0:
        yield
        return
    faiss = faiss_module()
    faiss_before, torch_before = faiss.omp_get_max_threads(), torch.get_num_threads()
    faiss.omp_set_num_threads(num_threads)
    torch.set_num_threads(num_threads)
    try:
        yield
    finally:
        faiss.omp_set_num_threads(faiss_before)
        torch.set_num_threads(torch_before)


def faiss_knn(queries: np.ndarray, keys: np.ndarray, k: int, *,
              num_threads: int) -> tuple[np.ndarray, np.ndarray]:
    """The ``min(k, len(keys))`` keys of largest inner product with each query, exact.

    Args:
        queries: (Q, D), keys: (N, D) features (cast to float32 C-contiguous copies if needed).
        k: neighbours per query.
        num_threads: OpenMP threads for the search (0: faiss' default, every core); the
            previous faiss and torch thread settings are restored afterwards.
    Returns:
        scores (Q, k') float32 and key rows (Q, k') int64, each row in decreasing score.
    """
    faiss = faiss_module()
    with faiss_threads(num_threads):
        index = faiss.IndexFlatIP(keys.shape[1])
        index.add(np.ascontiguousarray(keys, np.float32))
        return index.search(np.ascontiguousarray(queries, np.float32), min(k, len(keys)))


def clustered_cross_knn(queries: np.ndarray, keys: np.ndarray, k: int, *, probes: int, seed: int,
                        num_threads: int) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Approximate k nearest neighbours by inner product in both directions, in one pass.

    The keys are split into ``round(sqrt(N))`` lists by a spherical faiss k-means (10
    iterations on at most 64 keys per list, seeded: deterministic); each query is compared
    with the keys of the ``probes`` lists whose centroids are nearest to it, one exact matrix
    product per list (BLAS, where faiss' own inverted-file scan reads every key vector once
    per query and ran about 9x slower per multiply-add here). Each key sees all the queries
    that probe its list, so one product serves both directions: the queries' neighbours among
    the keys they reach and the keys' neighbours among the queries that reach them. Work is
    about ``probes / sqrt(N)`` of an exact search in one direction; ``probes >= sqrt(N)``
    compares every pair (exact up to ties).

    The lists are shared among ``num_threads`` Python threads, each computing its lists'
    products on one core, and the k-means runs on one: no OpenMP fork-join per small product or
    k-means iteration, which on a loaded machine cost more than the work itself (OpenMP threads
    wait at every barrier for a descheduled one; measured 2.5 s against 15 ms on a tiny
    problem with 2 threads on the 2 shared cores).

    Args:
        queries: (Q, D), keys: (N, D) features (float32 copies are made).
        k: neighbours per row in each direction.
        probes: lists each query is compared with (>= 1).
        seed: the k-means seed.
        num_threads: threads (0: every core this process may use).
    Returns:
        query scores (Q, k) float32 and key rows (Q, k) int64; key scores (N, k) float32 and
        query rows (N, k) int64; each row in decreasing score (ties in ``torch.topk``'s
        order), -inf / -1 where fewer than k were compared.
    """
    if probes < 1:
        raise ValueError(f"probes must be >= 1, got {probes}")
    faiss = faiss_module()
    queries = np.ascontiguousarray(queries, np.float32)
    keys = np.ascontiguousarray(keys, np.float32)
    (num_queries, dim), num_keys = queries.shape, len(keys)
    lists = max(1, min(num_keys, round(math.sqrt(num_keys))))
    probes = min(probes, lists)
    workers = num_threads or len(os.sched_getaffinity(0))
    with faiss_threads(1):  # the k-means and assignments: ~1/5 of the work, no barriers
        kmeans = faiss.Kmeans(dim, lists, niter=10, seed=seed, spherical=True,
                              max_points_per_centroid=64, min_points_per_centroid=1)
        kmeans.train(keys)
        coarse = faiss.IndexFlatIP(dim)
        coarse.add(kmeans.centroids)
        members = _members(coarse.search(keys, 1)[1].ravel(), lists)       # key rows per list
        # (query row * probes + probe) per list: query i's j-th nearest list has i there
        probing = _members(coarse.search(queries, probes)[1].ravel(), lists)
    q, x = torch.from_numpy(queries), torch.from_numpy(keys)
    # per query and probe, the k best keys of that list: (Q, probes * k)
    q_cand = torch.full((num_queries, probes * k), -math.inf)
    q_cand_rows = torch.full((num_queries, probes * k), -1, dtype=torch.int64)
    k_scores = torch.full((num_keys, k), -math.inf)
    k_rows = torch.full((num_keys, k), -1, dtype=torch.int64)

    def scan(first: int) -> None:
        # every thread writes its own lists' slots and keys: no two write the same element
        torch.set_num_threads(1)
        for lst in range(first, lists, workers):
            in_list, flat = torch.from_numpy(members[lst]), torch.from_numpy(probing[lst])
            if len(in_list) == 0 or len(flat) == 0:
                continue
            by = flat // probes                                             # query rows
            sim = q[by] @ x[in_list].T                                      # (q_l, n_l)
            top, at = torch.topk(sim, min(k, len(in_list)), dim=1)
            slots = (flat % probes * k)[:, None] + torch.arange(top.shape[1])
            q_cand[by[:, None], slots], q_cand_rows[by[:, None], slots] = top, in_list[at]
            top, at = torch.topk(sim, min(k, len(by)), dim=0)               # (k', n_l)
            # every key is in one list: its top-k among all queries that reach it, complete
            k_scores[in_list, :len(top)], k_rows[in_list, :len(top)] = top.T, by[at].T

    torch_before = torch.get_num_threads()
    try:
        with ThreadPoolExecutor(workers) as pool:
            list(pool.map(scan, range(workers)))
    finally:
        torch.set_num_threads(torch_before)
    q_scores, pick = torch.topk(q_cand, k, dim=1)
    q_rows = torch.where(torch.isfinite(q_scores), q_cand_rows.gather(1, pick), -1)
    return q_scores.numpy(), q_rows.numpy(), k_scores.numpy(), k_rows.numpy()


def _members(assigned: np.ndarray, lists: int) -> list[np.ndarray]:
    """Per list, the positions in ``assigned`` (a list per position) holding it, ascending."""
    order = np.argsort(assigned, kind="stable")
    bounds = np.searchsorted(assigned[order], np.arange(lists + 1))
    return [order[bounds[i]:bounds[i + 1]] for i in range(lists)]
