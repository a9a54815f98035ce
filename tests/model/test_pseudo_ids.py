"""The pseudo-id graph without Ray (model/pseudo_ids.py): cross-modal mutual kNN edges and
connected components against brute force, and the pseudo-ids they give."""

import numpy as np

from gckd_ray.model.pseudo_ids import (centred_rows, connected_components,
                                       cross_modal_mutual_edges, cross_modal_pseudo_ids,
                                       image_mutual_edges, normalised_rows)


def unit(x: np.ndarray) -> np.ndarray:
    return (x / np.linalg.norm(x, axis=-1, keepdims=True)).astype(np.float32)


def test_cross_modal_mutual_knn_and_components_against_brute_force():
    rng = np.random.default_rng(3)
    images, texts = unit(rng.normal(size=(40, 8))), unit(rng.normal(size=(30, 8)))
    k, thr = 4, 0.2
    edges = cross_modal_mutual_edges(images, texts, k, thr, num_threads=1)
    sim = images @ texts.T
    texts_of = np.argsort(-sim, axis=1, kind="stable")[:, :k]
    images_of = np.argsort(-sim.T, axis=1, kind="stable")[:, :k]
    expected = {(i, 40 + t) for i in range(40) for t in texts_of[i]
                if i in images_of[t] and sim[i, t] >= thr}
    assert set(map(tuple, edges.tolist())) == expected and expected
    assert np.array_equal(cross_modal_mutual_edges(images, texts, k, thr, num_threads=0), edges)
    # the clustered search probing all ~sqrt(30) caption clusters compares every pair
    assert np.array_equal(cross_modal_mutual_edges(images, texts, k, thr, 1, probes=6), edges)
    labels = connected_components(7, np.array([[5, 6], [0, 3], [3, 1], [6, 4]]))
    assert labels.tolist() == [0, 0, 2, 0, 4, 4, 4]
    assert connected_components(3, np.zeros((0, 2), np.int64)).tolist() == [0, 1, 2]
    assert len(cross_modal_mutual_edges(images[:0], texts, k, thr, num_threads=1)) == 0


def test_pseudo_ids_number_cross_modal_components_by_their_first_node():
    e = np.eye(4, dtype=np.float32)
    # images 0, 1 near axis 1 and 0; captions: axis 0, axis 1, axis 2 (no image there)
    images = unit(np.stack([e[1] + 0.01 * e[3], e[0]]))
    texts = unit(np.stack([e[0], e[1], e[2]]))
    image_ids, text_ids, num_edges = cross_modal_pseudo_ids(images, texts, 1, 0.5, 1, 0)
    assert image_ids.tolist() == [0, 1] and text_ids.tolist() == [1, 0, -1] and num_edges == 2
    none = cross_modal_pseudo_ids(images, texts[:0], 1, 0.5, 1, 0)
    assert none[0].tolist() == [-1, -1] and len(none[1]) == 0 and none[2] == 0


def test_row_preparation():
    x = np.array([[3.0, 4.0], [0.0, 0.0], [1.0, 1.0]])
    out = normalised_rows(x)
    assert out.dtype == np.float32 and np.allclose(out[0], [0.6, 0.8]) and not out[1].any()
    centred = centred_rows(x)
    assert np.allclose(np.linalg.norm(centred, axis=1), 1.0, atol=1e-6)
    assert centred_rows(x[:0]).shape == (0, 2)


def test_image_edges_join_mutual_nearest_images_against_brute_force():
    rng = np.random.default_rng(5)
    images = unit(rng.normal(size=(30, 6)))
    k = 2
    edges = image_mutual_edges(images, k, num_threads=1)
    sim = images @ images.T
    np.fill_diagonal(sim, -np.inf)
    near = np.argsort(-sim, axis=1, kind="stable")[:, :k]
    expected = {(i, j) for i in range(30) for j in near[i] if i < j and i in near[j]}
    assert set(map(tuple, edges.tolist())) == expected and expected
    assert len(image_mutual_edges(images, 0, num_threads=1)) == 0
    assert len(image_mutual_edges(images[:1], k, num_threads=1)) == 0


def test_image_edges_give_image_only_groups_and_widen_cross_modal_ones():
    e = np.eye(4, dtype=np.float32)
    # images 0 and 1 are each other's nearest image; image 2 pairs with caption 0 only
    images = unit(np.stack([e[1] + 0.1 * e[3], e[1] - 0.1 * e[3], e[0]]))
    texts = unit(np.stack([e[0], e[2]]))
    without = cross_modal_pseudo_ids(images, texts, 1, 0.5, 1, 0)
    assert without[0].tolist() == [-1, -1, 0] and without[1].tolist() == [0, -1]
    image_ids, text_ids, num_edges = cross_modal_pseudo_ids(images, texts, 1, 0.5, 1, 1)
    # image 2's nearest image is 0 or 1, whose nearest images are each other: no edge for it
    assert image_ids.tolist() == [0, 0, 1] and text_ids.tolist() == [1, -1] and num_edges == 2
