"""Target pseudo-ids from the cross-domain graph (DESIGN.md §2 items 3 and 5), Ray-free method
code: the memory bank (``model/memory_bank.py``) calls it on its target tables, and the
``experiments.diagnose_pseudo_pairs`` script on a checkpoint's target features.

Nodes are target image and caption features (optionally centred per modality); edges join an
image and a caption that are among each other's k nearest of the other modality (the kNN is
``model/knn.py``'s exact faiss search, the one the GMP graph uses, or with ``probes`` its
clustered search, for dataset-size tables) above a cosine threshold, and, optionally, two images
that are among each other's nearest images (exact search); a connected component of two or more
nodes is one pseudo-id. Never reads labels; deterministic.
"""

from __future__ import annotations

import numpy as np

from gckd_ray.model.knn import clustered_cross_knn, faiss_knn


def normalised_rows(features: np.ndarray, copy: bool = True) -> np.ndarray:
    """L2-normalise rows (float32; ``copy=False``: in place when ``features`` is float32)."""
    return _normalise(_float32(features, copy))


def centred_rows(features: np.ndarray, copy: bool = True) -> np.ndarray:
    """Subtract the mean and re-normalise rows (float32; ``copy=False``: in place when
    ``features`` is float32)."""
    x = _float32(features, copy)
    if len(x):
        x -= x.mean(0, keepdims=True)
    return _normalise(x)


def _float32(features: np.ndarray, copy: bool) -> np.ndarray:
    return np.array(features, np.float32) if copy else np.asarray(features, np.float32)


def _normalise(x: np.ndarray) -> np.ndarray:
    # in place: a dataset-size table is 100k x 512 (and the same values as out of place)
    x /= np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-12)
    return x


def cross_modal_mutual_edges(images: np.ndarray, texts: np.ndarray, k: int, threshold: float,
                             num_threads: int, probes: int = 0, seed: int = 0) -> np.ndarray:
    """Image-caption edges where each is among the other's k nearest of the other modality.

    Cross-modal on purpose: within a modality every neighbour beats any cross-modal one (the
    modality gap), so a kNN graph over the union of both never links an image to a caption.

    Args:
        images: (Ni, D), texts: (Nt, D) features, L2-normalised.
        k: neighbours of the other modality per node.
        threshold: minimum cosine of a kept edge.
        num_threads: faiss OpenMP threads (0 = faiss' default, every core).
        probes: 0: exact search (``faiss_knn``, both directions); else the clustered search
            (``clustered_cross_knn``: each image meets the captions of ``probes`` caption
            clusters, each caption the images that reach its cluster), seeded by ``seed``.

    Returns:
        (E, 2) int64 ``[image row, Ni + text row]``, by image row.
    """
    if len(images) == 0 or len(texts) == 0:
        return np.zeros((0, 2), np.int64)
    if probes:
        sim_it, nn_it, _, nn_ti = clustered_cross_knn(images, texts, k, probes=probes, seed=seed,
                                                      num_threads=num_threads)
    else:
        sim_it, nn_it = faiss_knn(images, texts, k, num_threads=num_threads)  # (Ni, k) texts
        _, nn_ti = faiss_knn(texts, images, k, num_threads=num_threads)       # (Nt, k) images
    img = np.repeat(np.arange(len(images), dtype=np.int64), nn_it.shape[1])
    txt, sims = nn_it.ravel().astype(np.int64), sim_it.ravel()
    back = (nn_ti[txt] == img[:, None]).any(axis=1)
    keep = back & (txt >= 0) & (sims >= threshold)
    return np.stack([img[keep], len(images) + txt[keep]], axis=1)


def image_mutual_edges(images: np.ndarray, k: int, num_threads: int) -> np.ndarray:
    """Image-image edges where each is among the other's k nearest images (itself excluded).

    Measured on the stand-in's GCKD teacher (synth-icfg train, experiments/RESULTS.md): a
    mutual image neighbour is the same person 58% of the time, an image-caption mutual
    neighbour 8-9%: within a modality the pretrained features already group people.

    Args:
        images: (Ni, D) L2-normalised features. k: neighbours per image.
    Returns:
        (E, 2) int64 ``[image row, image row]``, first < second, sorted.
    """
    if len(images) < 2 or k < 1:
        return np.zeros((0, 2), np.int64)
    _, nn = faiss_knn(images, images, min(k + 1, len(images)), num_threads=num_threads)
    rows = np.arange(len(images), dtype=np.int64)
    self_hit = nn == rows[:, None]
    others = np.where(self_hit, -1, nn)
    others[~self_hit.any(axis=1), -1] = -1  # self outranked by duplicates: still k others
    src = np.repeat(rows, others.shape[1])
    dst = others.ravel().astype(np.int64)
    keep = (dst >= 0) & (src < dst)
    src, dst = src[keep], dst[keep]
    back = (others[dst] == src[:, None]).any(axis=1)
    edges = np.stack([src[back], dst[back]], axis=1)
    return edges[np.lexsort((edges[:, 1], edges[:, 0]))] if len(edges) else edges


def connected_components(num_nodes: int, edges: np.ndarray) -> np.ndarray:
    """Component label per node = the smallest node index in its component.

    Union-find by hooking roots onto the smaller root and pointer jumping, vectorised in numpy
    (no scipy). Args: ``edges`` (E, 2) int. Returns: (num_nodes,) int64.
    """
    parent = np.arange(num_nodes, dtype=np.int64)
    if len(edges) == 0:
        return parent
    i, j = edges[:, 0], edges[:, 1]
    while True:
        # Invariant: every parent is a root, so parent[i] and parent[j] are the roots of i, j.
        ri, rj = parent[i], parent[j]
        differ = ri != rj
        if not differ.any():
            return parent
        lo, hi = np.minimum(ri, rj)[differ], np.maximum(ri, rj)[differ]
        np.minimum.at(parent, hi, lo)  # hook a root onto a smaller root: no cycles
        while True:
            grand = parent[parent]
            if np.array_equal(grand, parent):
                break
            parent = grand


def cross_modal_pseudo_ids(images: np.ndarray, texts: np.ndarray, k: int, threshold: float,
                           num_threads: int, image_k: int, probes: int = 0, seed: int = 0
                           ) -> tuple[np.ndarray, np.ndarray, int]:
    """Pseudo-ids of image and caption nodes: the connected components of two or more nodes of
    :func:`cross_modal_mutual_edges` plus, with ``image_k`` > 0, :func:`image_mutual_edges`,
    numbered by their first node (images by row, then captions by row); every other node gets
    -1. With ``image_k`` = 0 every component holds an image and a caption.

    Args:
        images: (Ni, D), texts: (Nt, D) prepared (normalised or centred) features.
        k, threshold, num_threads, probes, seed: as :func:`cross_modal_mutual_edges`.
        image_k: neighbours per image of the image-image edges (0 = none).
    Returns:
        image ids (Ni,) int64, caption ids (Nt,) int64, and the number of edges.
    """
    num_images, num_nodes = len(images), len(images) + len(texts)
    edges = np.concatenate([
        cross_modal_mutual_edges(images, texts, k, threshold, num_threads, probes, seed),
        image_mutual_edges(images, image_k, num_threads)])
    root = connected_components(num_nodes, edges)
    size = np.bincount(root, minlength=num_nodes)
    grouped = np.flatnonzero(size >= 2)  # roots, ascending = first node
    id_of_root = np.full(num_nodes, -1, np.int64)
    id_of_root[grouped] = np.arange(len(grouped))
    node_ids = id_of_root[root]
    return node_ids[:num_images], node_ids[num_images:], len(edges)
