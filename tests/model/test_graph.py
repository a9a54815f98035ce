"""GMP: faiss kNN graph against brute force, the propagation network, teacher smoothing, loss."""

from __future__ import annotations

import math

import faiss
import pytest
import torch
import torch.nn.functional as F

from gckd_ray.model import graph
from gckd_ray.model.graph import (
    AttentionPropagation, PropagationNet, dense_knn_edges, gmp_loss, knn_edges,
    propagate_teacher)


def _brute_force_edges(features: torch.Tensor, k: int) -> torch.Tensor:
    """Full float64 cosine matrix, self masked, stable sort: ties go to the lower index."""
    x = F.normalize(features.float(), dim=-1).double()
    sim = (x[:, None, :] * x[None, :, :]).sum(-1)  # same reduction for every pair: exact ties
    sim.fill_diagonal_(-math.inf)
    order = torch.sort(-sim, dim=1, stable=True).indices[:, :k]  # (N, k)
    targets = torch.arange(x.shape[0]).repeat_interleave(k)
    return torch.stack([order.reshape(-1), targets])


@pytest.mark.parametrize("n,k", [(40, 5), (33, 1), (12, 11)])
def test_knn_edges_equal_brute_force(n, k):
    g = torch.Generator().manual_seed(n)
    x = F.normalize(torch.randn(n, 16, generator=g), dim=-1)
    edges = knn_edges(x, k)
    assert edges.dtype == torch.int64 and edges.shape == (2, n * k)
    assert torch.equal(edges, _brute_force_edges(x, k))


def test_knn_edges_with_duplicated_rows_break_ties_by_index():
    g = torch.Generator().manual_seed(0)
    base = F.normalize(torch.randn(10, 16, generator=g), dim=-1)
    # row 0 six times (more ties than k + 1 candidates), rows 1..3 twice, shuffled positions
    x = torch.cat([base, base[[0] * 5], base[[1, 2, 3]]])
    x = x[torch.randperm(len(x), generator=g)]
    for k in (1, 3, 7):
        assert torch.equal(knn_edges(x, k), _brute_force_edges(x, k)), k
    # a duplicate of node i is a neighbour of i, i itself never is
    edges = knn_edges(x, 3)
    assert (edges[0] != edges[1]).all()


def test_dense_knn_edges_equal_brute_force_with_ties_and_blocks(monkeypatch):
    g = torch.Generator().manual_seed(1)
    base = F.normalize(torch.randn(30, 16, generator=g), dim=-1)
    x = torch.cat([base, base[[0] * 5], base[[1, 2, 3]]])[torch.randperm(38, generator=g)]
    monkeypatch.setattr(graph, "_DENSE_ELEMENTS", 38 * 7)  # 7-row blocks: a ragged last one
    for k in (1, 3, 10, 37):
        assert torch.equal(dense_knn_edges(x, k), _brute_force_edges(x, k)), k
    with pytest.raises(ValueError, match=r"k=38.*N=38"):
        dense_knn_edges(x, 38)


def test_knn_edges_without_faiss_uses_the_dense_path(monkeypatch):
    x = F.normalize(torch.randn(25, 8, generator=torch.Generator().manual_seed(2)), dim=-1)
    with_faiss = knn_edges(x, 4)
    monkeypatch.setattr(graph, "faiss_module", lambda: None)
    assert torch.equal(knn_edges(x, 4), with_faiss)


def test_knn_edges_errors_and_device():
    x = F.normalize(torch.randn(4, 8), dim=-1)
    with pytest.raises(ValueError, match=r"k=4.*N=4"):
        knn_edges(x, 4)
    with pytest.raises(ValueError, match="k=0"):
        knn_edges(x, 0)
    with pytest.raises(ValueError, match="NaN"):
        knn_edges(torch.full((4, 8), math.nan), 2)
    assert knn_edges(x.requires_grad_(), 2).device == x.device


def test_knn_edges_restores_thread_settings():
    torch_before, faiss_before = torch.get_num_threads(), faiss.omp_get_max_threads()
    knn_edges(F.normalize(torch.randn(20, 8), dim=-1), 3, num_threads=1)
    assert (torch.get_num_threads(), faiss.omp_get_max_threads()) == (torch_before, faiss_before)


def _graph(n: int = 24, dim: int = 16, k: int = 4, seed: int = 0,
           dtype: torch.dtype = torch.float32):
    g = torch.Generator().manual_seed(seed)
    x = F.normalize(torch.randn(n, dim, generator=g, dtype=dtype), dim=-1)
    return x, knn_edges(x, k)


def test_propagation_net_is_permutation_equivariant():
    # float64 end to end: permuting the nodes only moves rows within the matmuls and the
    # scatter, which can change rounding (~1e-16 in float64); assert_close's float64 defaults.
    torch.manual_seed(0)
    net = PropagationNet(16, hidden=8).double()
    x, edges = _graph(dtype=torch.float64)
    perm = torch.randperm(x.shape[0])
    inverse = torch.argsort(perm)  # old index -> new index
    out = net(x, edges)
    out_permuted = net(x[perm], inverse[edges])
    assert out.dtype == torch.float64
    torch.testing.assert_close(out_permuted, out[perm])


def test_propagation_net_output_norm_layers_and_gradients():
    torch.manual_seed(0)
    net = PropagationNet(16).double()
    assert len(net.layers) == 2
    x, edges = _graph(dtype=torch.float64)
    x = x.clone().requires_grad_()
    out = net(x, edges)
    assert out.shape == x.shape
    # float64 end to end: the output is normalised in float64, so its norm is 1 to ~1e-16
    torch.testing.assert_close(out.norm(dim=-1), torch.ones(x.shape[0], dtype=torch.float64))
    (out * torch.randn_like(out)).sum().backward()
    for name, p in net.named_parameters():
        assert p.grad is not None and p.grad.abs().sum() > 0, name
    assert x.grad.abs().sum() > 0


def test_attention_layer_matches_formula():
    """out_i = W_o sum_j softmax_j(q_i . k_j / sqrt(h)) v_j over i's incoming edges (row 1 = i)."""
    # float64 end to end: the layer (per-edge products, segment softmax, scatter sum) and the
    # dense formula round differently, ~1e-16 in float64; assert_close's float64 defaults.
    torch.manual_seed(0)
    layer = AttentionPropagation(16, hidden=8).double()
    x, edges = _graph(dtype=torch.float64)
    out = layer(x, edges)
    assert out.dtype == torch.float64
    q, k, v = layer.query(x), layer.key(x), layer.value(x)
    for i in (0, 7):
        nbrs = edges[0, edges[1] == i]
        weights = (q[i] @ k[nbrs].t() / math.sqrt(8)).softmax(0)
        torch.testing.assert_close(out[i], layer.out(weights @ v[nbrs]))


def test_propagation_uses_neighbours():
    torch.manual_seed(0)
    net = PropagationNet(16)
    x, edges = _graph()
    out = net(x, edges)
    x_changed = x.clone()
    x_changed[edges[0, 0]] = F.normalize(torch.randn(16), dim=-1)  # node 0's first neighbour
    # float32 math; a new neighbour moves the output by O(0.1), far beyond allclose's 1e-5
    assert not torch.allclose(net(x_changed, edges)[0], out[0])


def _propagate_by_hand(x, edges, i, temperature, self_weight):
    nbrs = edges[0, edges[1] == i].tolist()
    xn = F.normalize(x.double(), dim=-1)
    logits = [float(xn[i] @ xn[j]) / temperature for j in nbrs]
    m = max(logits)
    w = [math.exp(v - m) for v in logits]
    mixed = self_weight * xn[i] + (1 - self_weight) * sum(wj / sum(w) * xn[j]
                                                          for wj, j in zip(w, nbrs))
    return F.normalize(mixed, dim=0)


def test_propagate_teacher_matches_formula_and_has_no_grad():
    # float64 end to end (features, library and hand formula): rounding ~1e-16 per step;
    # assert_close's float64 defaults.
    x, edges = _graph(dtype=torch.float64)
    x = x.clone().requires_grad_()
    out = propagate_teacher(x, edges, temperature=0.2, self_weight=0.3)
    assert not out.requires_grad and out.dtype == torch.float64
    for i in (0, 5, 23):
        torch.testing.assert_close(out[i], _propagate_by_hand(x.detach(), edges, i, 0.2, 0.3))


def test_propagate_teacher_identity_when_neighbours_are_duplicates():
    g = torch.Generator().manual_seed(0)
    base = F.normalize(torch.randn(5, 8, generator=g, dtype=torch.float64), dim=-1)
    x = base.repeat_interleave(4, dim=0)  # each node has 3 exact copies: its 3 nearest
    out = propagate_teacher(x, knn_edges(x, 3), temperature=0.1)
    # float64 end to end (unit rows normalised in float64): out = x to ~1e-16
    assert out.dtype == torch.float64
    torch.testing.assert_close(out, x)


def test_propagate_teacher_smooths_toward_neighbours():
    # float64 end to end: a kept feature is x re-normalised in float64 (~1e-16 off)
    x, edges = _graph(dtype=torch.float64)
    out = propagate_teacher(x, edges, temperature=0.1)
    src, dst = edges
    before = (x[dst] * x[src]).sum(-1).mean()
    after = (out[dst] * out[src]).sum(-1).mean()
    assert after > before
    # a node without incoming edges keeps its feature
    kept = propagate_teacher(x, edges[:, edges[1] != 0], temperature=0.1)
    torch.testing.assert_close(kept[0], x[0])


def test_gmp_loss_matches_hand_computation():
    s = F.normalize(torch.tensor([[1.0, 0.2], [0.1, 1.0], [0.7, 0.7]], dtype=torch.float64), dim=-1)
    t = F.normalize(torch.tensor([[0.9, 0.1], [0.3, 1.0], [0.5, 0.6]], dtype=torch.float64), dim=-1)
    tau = 0.1
    expected = 0.0
    for i in range(3):
        logits = [float(s[i] @ t[j]) / tau for j in range(3)]
        expected += -(logits[i] - math.log(sum(math.exp(v) for v in logits))) / 3
    # float64 end to end (inputs and hand loop): rounding ~1e-16 per step
    loss = gmp_loss(s, t, tau)
    assert loss.dtype == torch.float64
    assert loss.item() == pytest.approx(expected, rel=1e-12)


def test_gmp_loss_gradient_reaches_student_only():
    s = F.normalize(torch.randn(6, 8), dim=-1).requires_grad_()
    t = F.normalize(torch.randn(6, 8), dim=-1).requires_grad_()
    gmp_loss(s, t, 0.07).backward()
    assert s.grad.abs().sum() > 0 and t.grad is None
    with pytest.raises(ValueError, match="same shape"):
        gmp_loss(s, t[:5], 0.07)


def test_target_nodes_move_toward_source_and_cross_modal_cluster_mates():
    """Two domains x two modalities of 6 identities: teacher smoothing over the unified kNN graph
    brings target nodes closer to their source and other-modality nodes of the same identity."""
    g = torch.Generator().manual_seed(0)
    ids, per_group, dim = 6, 3, 32
    centres = F.normalize(torch.randn(ids, dim, generator=g), dim=-1)
    shift = {key: 0.6 * F.normalize(torch.randn(dim, generator=g), dim=-1)
             for key in ("source", "target", "image", "text")}
    feats, pid, domain, modality = [], [], [], []
    for d in ("source", "target"):
        for m in ("image", "text"):
            for p in range(ids):
                noise = 0.3 * torch.randn(per_group, dim, generator=g) / math.sqrt(dim)
                feats.append(centres[p] + shift[d] + shift[m] + noise)
                pid += [p] * per_group
                domain += [d] * per_group
                modality += [m] * per_group
    x = F.normalize(torch.cat(feats), dim=-1)
    pid = torch.tensor(pid)
    is_target = torch.tensor([d == "target" for d in domain])
    is_image = torch.tensor([m == "image" for m in modality])

    edges = knn_edges(x, k=8)
    crossing = (is_target[edges[0]] != is_target[edges[1]]) | (is_image[edges[0]]
                                                                != is_image[edges[1]])
    assert crossing.any()  # the graph links domains/modalities, not only within a group
    smoothed = propagate_teacher(x, edges, temperature=0.1, self_weight=0.5)

    def mean_cos_to_mates(feat, mates_mask):
        same_id = pid[:, None] == pid[None, :]
        mask = is_target[:, None] & same_id & mates_mask  # target rows, mate columns
        return (feat @ feat.t())[mask].mean()

    source_cols = (~is_target)[None, :].expand(len(pid), -1)
    cross_modal_target = is_target[None, :] & (is_image[:, None] != is_image[None, :])
    for mates in (source_cols, cross_modal_target):  # float32 math; margin 0.01 >> rounding
        assert mean_cos_to_mates(smoothed, mates) > mean_cos_to_mates(x, mates) + 0.01
