"""Graph-based multi-modal propagation (GMP): faiss kNN graph + torch-geometric message passing.

The nodes of one step are the batch's student image and text features of both domains plus C
memory features per modality and domain: one unified source+target, image+text graph. Its
edges are the k most cosine-similar other nodes of every node (:func:`knn_edges`: faiss on CPU
through ``model/knn.py``, the search the memory's pseudo-id graph uses too, a float64 matmul + stable sort on a CUDA device or where faiss is not installed; the pinned
torch-geometric has no pyg-lib / torch-cluster, so no ``knn_graph``). Over the same graph

* :class:`PropagationNet` (trained, attention-weighted message passing) propagates the
  student's features, and
* :func:`propagate_teacher` (parameter-free similarity-weighted smoothing) turns the teacher's
  features into targets,

and :func:`gmp_loss` aligns the first with the second contrastively, so that a target-domain
node borrows knowledge from its source and cross-modal neighbours.

The graph is rank-local: each data-parallel rank builds it from its own batch and the memory
snapshot it was handed, and the loss is a mean over that rank's batch nodes.
"""

from __future__ import annotations

import math

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from torch_geometric.nn import MessagePassing
from torch_geometric.utils import softmax as segment_softmax

from gckd_ray.model.knn import faiss_knn, faiss_module
from gckd_ray.model.precision import at_least_float32, in_compute_dtype

# A faiss score can be off from the exact cosine by float32 rounding (~sqrt(D) * 6e-8 for unit
# vectors); a node outside the searched candidates is ruled out only when faiss scores it more
# than this margin below the k-th exact score.
_FAISS_SCORE_MARGIN = 1e-5
# Rows per chunk when re-scoring candidates in float64 (bounds the (rows, K, D) temporary).
_RESCORE_ELEMENTS = 1 << 22
# Similarity entries per chunk of the dense (matmul) kNN path: bounds its (rows, N) float64 block.
_DENSE_ELEMENTS = 1 << 25


def _exact_scores(x64: np.ndarray, rows: np.ndarray, cand: np.ndarray) -> np.ndarray:
    """float64 cosines of ``x64[rows]`` with their candidates ``x64[cand]`` (R, K) -> (R, K).

    Element-wise product and a sum over D: every score goes through the same reduction, so
    duplicated nodes score exactly alike (a GEMM kernel need not guarantee that), which is what
    makes "ties by lower index" well defined.
    """
    out = np.empty(cand.shape, dtype=np.float64)
    step = max(1, _RESCORE_ELEMENTS // max(1, cand.shape[1] * x64.shape[1]))
    for start in range(0, len(rows), step):
        r, c = rows[start:start + step], cand[start:start + step]
        out[start:start + step] = (x64[r][:, None, :] * x64[c]).sum(axis=-1)
    return out


def knn_edges(features: torch.Tensor, k: int, *, num_threads: int = 1) -> torch.Tensor:
    """Directed kNN graph: every node receives an edge from each of its k nearest other nodes.

    Neighbours are the k most cosine-similar nodes other than the node itself (duplicates of a
    node are other nodes), in decreasing similarity, ties broken by lower index. faiss
    (``IndexFlatIP``, exact inner product, on a detached CPU float32 C-contiguous copy of the
    re-normalised features) proposes candidates; they are re-scored in float64 and sorted by
    (score desc, index asc), and a row whose candidate list could hide a tie or a better node
    (last faiss score within float32 error of the k-th exact score) is searched again with
    twice the candidates, up to all nodes. The result is the exact brute-force answer. On a CUDA
    device (no copy to the host) or without faiss, :func:`dense_knn_edges` gives the same
    answer from a float64 matmul.

    Args:
        features: (N, D) embeddings (L2-normalised; normalised again here), any device.
        k: neighbours per node, 1 <= k < N.
        num_threads: OpenMP threads for the faiss search (restored afterwards; see
            :func:`gckd_ray.model.knn.faiss_threads`).
    Returns:
        edge_index (2, N*k) int64 on ``features.device``: row 0 the neighbour j (message
        source), row 1 the node i (target); node i's k edges are columns i*k .. i*k+k-1 in
        decreasing similarity.
    """
    if features.dim() != 2:
        raise ValueError(f"features must be (N, D), got shape {tuple(features.shape)}")
    n = features.shape[0]
    if k < 1 or k >= n:
        raise ValueError(f"k must satisfy 1 <= k < N (self excluded), got k={k}, N={n}")
    if features.is_cuda or faiss_module() is None:
        return dense_knn_edges(features, k)
    x32 = np.ascontiguousarray(
        F.normalize(features.detach().float(), dim=-1).cpu().numpy(), dtype=np.float32)
    if not np.isfinite(x32).all():
        raise ValueError("features contain NaN or Inf")
    x64 = x32.astype(np.float64)

    neighbours = np.empty((n, k), dtype=np.int64)
    pending = np.arange(n)
    num_candidates = min(n, 2 * k + 2)  # k + self + slack
    while len(pending):
        approx, cand = faiss_knn(x32[pending], x32, num_candidates,
                                 num_threads=num_threads)  # (R, K) each, desc
        exact = _exact_scores(x64, pending, cand)
        exact[cand == pending[:, None]] = -np.inf  # self is never its own neighbour
        # sort by (score desc, index asc): lexsort's last key is the primary one
        order = np.lexsort((cand, -exact), axis=-1)[:, :k]
        chosen = np.take_along_axis(cand, order, axis=-1)  # (R, k)
        kth_score = np.take_along_axis(exact, order[:, -1:], axis=-1)[:, 0]  # (R,)
        settled = ((num_candidates == n)
                   | (approx[:, -1].astype(np.float64) < kth_score - _FAISS_SCORE_MARGIN))
        neighbours[pending[settled]] = chosen[settled]
        pending = pending[~settled]
        num_candidates = min(n, 2 * num_candidates)

    targets = np.repeat(np.arange(n, dtype=np.int64), k)
    edge_index = np.stack([neighbours.reshape(-1), targets])
    return torch.from_numpy(edge_index).to(features.device)


@torch.no_grad()
def dense_knn_edges(features: torch.Tensor, k: int) -> torch.Tensor:
    """:func:`knn_edges` on the features' own device: float64 cosines of row blocks against all
    nodes (matmul), self masked, a stable descending sort (ties to the lower index), the first
    k. Same contract and edge layout as :func:`knn_edges`, tested against brute force with
    duplicated nodes on CPU (exact ties need the device's matmul to round duplicates alike);
    the (rows, N) blocks bound its memory."""
    if features.dim() != 2:
        raise ValueError(f"features must be (N, D), got shape {tuple(features.shape)}")
    n = features.shape[0]
    if k < 1 or k >= n:
        raise ValueError(f"k must satisfy 1 <= k < N (self excluded), got k={k}, N={n}")
    x = F.normalize(features.detach().float(), dim=-1).double()
    if not torch.isfinite(x).all():
        raise ValueError("features contain NaN or Inf")
    rows = max(1, _DENSE_ELEMENTS // n)
    neighbours = []
    for start in range(0, n, rows):
        sim = x[start:start + rows] @ x.t()  # (R, N)
        block = torch.arange(sim.shape[0], device=x.device)
        sim[block, block + start] = -math.inf  # self is never its own neighbour
        neighbours.append(torch.sort(sim, dim=1, descending=True, stable=True).indices[:, :k])
    targets = torch.arange(n, device=x.device).repeat_interleave(k)
    return torch.stack([torch.cat(neighbours).reshape(-1), targets])


class AttentionPropagation(MessagePassing):
    """One similarity-weighted attention step over ``edge_index`` (single head).

    For node i with incoming neighbours j: a_ij = softmax_j((W_q x_i . W_k x_j) / sqrt(h)),
    out_i = W_o sum_j a_ij W_v x_j. A node without incoming edges gets 0 (the residual keeps it).
    Sum aggregation and a softmax grouped by target node: permutation-equivariant.
    """

    def __init__(self, dim: int, hidden: int):
        super().__init__(aggr="add", node_dim=0)
        self.query = nn.Linear(dim, hidden)
        self.key = nn.Linear(dim, hidden)
        self.value = nn.Linear(dim, hidden)
        self.out = nn.Linear(hidden, dim)
        self.scale = 1.0 / math.sqrt(hidden)

    def forward(self, x: torch.Tensor, edge_index: torch.Tensor) -> torch.Tensor:
        """x (N, D), edge_index (2, E) -> (N, D)."""
        aggregated = self.propagate(edge_index, q=self.query(x), k=self.key(x),
                                    v=self.value(x), size=(x.shape[0], x.shape[0]))  # (N, h)
        return self.out(aggregated)

    def message(self, q_i: torch.Tensor, k_j: torch.Tensor, v_j: torch.Tensor,
                index: torch.Tensor, size_i: int | None) -> torch.Tensor:
        """Per edge (E, h) -> attention-weighted value (E, h); softmax over each target's edges."""
        logits = at_least_float32((q_i * k_j).sum(dim=-1)) * self.scale  # (E,)
        weight = segment_softmax(logits, index, num_nodes=size_i)  # (E,)
        return weight.to(v_j.dtype).unsqueeze(-1) * v_j


class PropagationNet(nn.Module):
    """The student's GMP network: ``num_layers`` residual attention-propagation layers.

    Layer l: x <- x + AttentionPropagation_l(LayerNorm_l(x)) (pre-norm residual: the residual
    stream stays in the embedding space, so the network starts near "each node plus a learned
    correction from its neighbours"); the output is L2-normalised.
    """

    def __init__(self, dim: int, num_layers: int = 2, hidden: int | None = None):
        super().__init__()
        if num_layers < 1:
            raise ValueError(f"num_layers must be >= 1, got {num_layers}")
        hidden = dim if hidden is None else hidden
        self.norms = nn.ModuleList(nn.LayerNorm(dim) for _ in range(num_layers))
        self.layers = nn.ModuleList(AttentionPropagation(dim, hidden) for _ in range(num_layers))

    def forward(self, x: torch.Tensor, edge_index: torch.Tensor) -> torch.Tensor:
        """x (N, D) node features, edge_index (2, E) [source j; target i] -> (N, D) unit-norm."""
        for norm, layer in zip(self.norms, self.layers):
            x = x + layer(norm(x), edge_index)
        return F.normalize(x, dim=-1)


@torch.no_grad()
def propagate_teacher(features: torch.Tensor, edge_index: torch.Tensor,
                      temperature: float, self_weight: float = 0.5) -> torch.Tensor:
    """Parameter-free smoothing of teacher features over the graph (the GMP targets).

    x_i' = normalize(self_weight * x_i + (1 - self_weight) * sum_j w_ij x_j), with
    w_ij = softmax over i's incoming neighbours j of cos(x_i, x_j) / temperature. A node without
    incoming edges keeps its own (normalised) feature. At least float32 math, no gradient.

    Args:
        features: (N, D) teacher features (normalised here for the cosines).
        edge_index: (2, E) int64, row 0 the neighbour j, row 1 the node i (as :func:`knn_edges`).
    Returns:
        (N, D) unit-norm smoothed features in the compute dtype (at least float32), no grad.
    """
    x = F.normalize(at_least_float32(features.detach()), dim=-1)  # (N, D)
    src, dst = edge_index[0], edge_index[1]  # (E,) each
    cos = (x[dst] * x[src]).sum(dim=-1)  # (E,)
    weight = segment_softmax(cos / temperature, dst, num_nodes=x.shape[0])  # (E,)
    neighbour_mean = torch.zeros_like(x).index_add_(0, dst, weight.unsqueeze(-1) * x[src])
    has_neighbours = torch.zeros(x.shape[0], dtype=torch.bool, device=x.device)
    has_neighbours[dst] = True
    smoothed = torch.where(has_neighbours.unsqueeze(-1),
                           self_weight * x + (1 - self_weight) * neighbour_mean, x)
    return F.normalize(smoothed, dim=-1)


def gmp_loss(student_nodes: torch.Tensor, teacher_targets: torch.Tensor,
             temperature: float) -> torch.Tensor:
    """InfoNCE of propagated student nodes against their graph-smoothed teacher targets.

    For node i the logits are s_i . t_j / temperature over the given rows j; the positive is
    j = i, the other rows' targets are the negatives. Pass only the batch nodes (memory nodes are
    context for the propagation), and one modality at a time: in a mixed call a node's paired
    caption/image would be one of its negatives.

    Args:
        student_nodes: (B, D) unit-norm propagated student features (with grad).
        teacher_targets: (B, D) unit-norm :func:`propagate_teacher` outputs (detached here).
    Returns:
        scalar mean cross-entropy over the B rows (at least float32).
    """
    if student_nodes.shape != teacher_targets.shape:
        raise ValueError(f"student_nodes {tuple(student_nodes.shape)} and teacher_targets "
                         f"{tuple(teacher_targets.shape)} must have the same shape")
    student, teacher = in_compute_dtype(student_nodes, teacher_targets.detach())
    logits = student @ teacher.t() / temperature  # (B, B)
    labels = torch.arange(student_nodes.shape[0], device=student_nodes.device)
    return F.cross_entropy(logits, labels)
