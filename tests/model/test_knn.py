"""The faiss kNN searches (model/knn.py): the exact one of the GMP graph and the pseudo-id
graph, and the clustered one the pseudo-id graph uses at dataset size."""

import faiss
import numpy as np
import pytest
import torch

from gckd_ray.model import graph, pseudo_ids
from gckd_ray.model.knn import clustered_cross_knn, faiss_knn


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


def unit(x: np.ndarray) -> np.ndarray:
    return (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32)


def test_clustered_search_probing_every_list_is_the_exact_search_both_ways():
    rng = np.random.default_rng(1)
    queries, keys = unit(rng.normal(size=(90, 12))), unit(rng.normal(size=(150, 12)))
    for k in (1, 3):
        q_scores, q_rows, k_scores, k_rows = clustered_cross_knn(queries, keys, k, probes=13,
                                                                 seed=0, num_threads=1)
        for (scores, rows), (a, b) in (((q_scores, q_rows), (queries, keys)),
                                       ((k_scores, k_rows), (keys, queries))):
            exact_scores, exact_rows = faiss_knn(a, b, k, num_threads=1)
            assert rows.dtype == np.int64 and np.array_equal(rows, exact_rows)
            np.testing.assert_allclose(scores, exact_scores, atol=1e-6)
        # the lists are shared among threads: the same result on 2 (and deterministic)
        again = clustered_cross_knn(queries, keys, k, probes=13, seed=0, num_threads=2)
        assert all(np.array_equal(x, y) for x, y in zip(again, (q_scores, q_rows, k_scores,
                                                                 k_rows)))


def test_clustered_search_finds_neighbours_within_clusters_with_few_probes():
    # 40 well-separated groups: the nearest key of a query is in its own group
    rng = np.random.default_rng(2)
    centres = rng.normal(size=(40, 32))
    group_q, group_k = rng.integers(0, 40, 400), rng.integers(0, 40, 800)
    queries = unit(centres[group_q] + 0.1 * rng.normal(size=(400, 32)))
    keys = unit(centres[group_k] + 0.1 * rng.normal(size=(800, 32)))
    _, exact = faiss_knn(queries, keys, 1, num_threads=1)
    q_scores, q_rows, k_scores, k_rows = clustered_cross_knn(queries, keys, 1, probes=2, seed=0,
                                                             num_threads=1)
    assert (q_rows == exact).mean() > 0.95 and (group_k[q_rows[:, 0]] == group_q).mean() > 0.95
    # a key no query reached has no neighbour: -1 / -inf, never a wrong row
    reached = k_rows[:, 0] >= 0
    assert (group_q[k_rows[reached, 0]] == group_k[reached]).mean() > 0.95
    assert np.isneginf(k_scores[~reached]).all()
    with pytest.raises(ValueError, match="probes"):
        clustered_cross_knn(queries, keys, 1, probes=0, seed=0, num_threads=1)
    # more keys than a thread's share of lists, fewer queries than k
    small = clustered_cross_knn(queries[:2], keys, 3, probes=1, seed=0, num_threads=1)
    assert (small[3][:, 2] == -1).all() and small[1].shape == (2, 3)
