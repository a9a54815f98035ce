"""The one faiss kNN search (model/knn.py) of the GMP graph and the pseudo-id graph."""

import faiss
import numpy as np
import torch

from gckd_ray.model import graph, pseudo_ids
from gckd_ray.model.knn import faiss_knn


def test_faiss_knn_is_the_exact_inner_product_top_k():
    rng = np.random.default_rng(0)
    keys, queries = rng.normal(size=(50, 8)), rng.normal(size=(7, 8))  # float64: cast here
    scores, rows = faiss_knn(queries, keys, 5, num_threads=1)
    sim = queries.astype(np.float32) @ keys.astype(np.float32).T
    assert rows.dtype == np.int64 and scores.dtype == np.float32
    assert np.array_equal(rows, np.argsort(-sim, axis=1, kind="stable")[:, :5])
    np.testing.assert_allclose(scores, np.take_along_axis(sim, rows, axis=1), rtol=1e-5)
    assert faiss_knn(queries, keys[:3], 5, num_threads=1)[1].shape == (7, 3)  # k capped at N


def test_faiss_knn_restores_thread_settings():
    before = torch.get_num_threads(), faiss.omp_get_max_threads()
    x = np.eye(4, dtype=np.float32)
    for threads in (1, 0):
        assert faiss_knn(x, x, 1, num_threads=threads)[1].ravel().tolist() == [0, 1, 2, 3]
        assert (torch.get_num_threads(), faiss.omp_get_max_threads()) == before


def test_both_graphs_search_with_it():
    assert graph.faiss_knn is faiss_knn and pseudo_ids.faiss_knn is faiss_knn
