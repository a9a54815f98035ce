"""The method's one faiss k-nearest-neighbour search: exact inner product (``IndexFlatIP``) on
float32 C-contiguous copies, with the OpenMP thread count set for the search only.

Both graphs of the method search with :func:`faiss_knn`: the step's GMP graph
(``model/graph.py``, ``knn_edges``) and the memory's pseudo-id graph
(``model/pseudo_ids.py``, ``cross_modal_mutual_edges``).
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

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
