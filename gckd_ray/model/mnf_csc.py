"""Optional distillation mode ``distill.mode: mnf_csc`` (DESIGN §2): a modality noise filter
(MNF) purifies the teacher's features, and contrastive semantic calibration (CSC) distils them.

After "Robust cross-modal knowledge distillation for unconstrained videos"
(GeWu-Lab/cross-modal-distillation), adapted to text-to-image retrieval with an EMA teacher:

* MNF: gate g = sigmoid(MLP([t ; c])) per dimension, where t is a teacher feature of one
  modality and c the student's embedding of the other modality for the same item (its
  partner); purified teacher = g * t. Regularised by a triplet loss (the purified teacher must
  be closer to c than the raw one by a margin, 0.2) and an L1 sparsity term on the MLP weights
  (weight 1e-3). Two differences from the original: LayerNorm instead of BatchNorm (no running
  statistics that would differ between data-parallel ranks) and the L1 term over both layers
  (the original's loop keeps only the last one).
* CSC: in-batch supervised contrastive loss of student queries s_i against purified teacher
  keys p_j of the other modality, with the adaptive pair temperature
  tau_ij = clamp(cos(s_i, p_j) + tau0, tau_min, tau_max), detached: similar pairs get a softer
  temperature (their logit cos / tau saturates below 1), dissimilar ones the floor.

The functions here are per-rank math; which rows are positives and partners, and the gather of
keys over ranks, are the distiller's (model/gckd.py).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from gckd_ray.model.precision import in_compute_dtype


class NoiseFilter(nn.Module):
    """Gate MLP: Linear(2D, H) -> LayerNorm -> ReLU -> Linear(H, D) -> sigmoid.

    The two weight matrices are this module's own parameters (not those of child Linear
    modules) because the L1 term reads them: ZeRO-3 gathers a module's own parameters for its
    forward, so computing the penalty inside this forward sees full weights, not partitions.
    """

    def __init__(self, dim: int, hidden: int):
        super().__init__()
        first, second = nn.Linear(2 * dim, hidden), nn.Linear(hidden, dim)  # default init
        self.weight1, self.bias1 = first.weight, first.bias
        self.norm = nn.LayerNorm(hidden)
        self.weight2, self.bias2 = second.weight, second.bias

    def forward(self, teacher: torch.Tensor, context: torch.Tensor
                ) -> tuple[torch.Tensor, torch.Tensor]:
        """teacher (N, D) features to purify, context (N, D) the student's partner features.

        Returns:
            gate (N, D) in (0, 1), and the L1 penalty: the mean over output rows of each
            weight's row L1 norm, summed over the two layers (scalar).
        """
        hidden = F.relu(self.norm(F.linear(torch.cat([teacher, context], 1),
                                           self.weight1, self.bias1)))
        gate = torch.sigmoid(F.linear(hidden, self.weight2, self.bias2))
        l1 = self.weight1.abs().sum(1).mean() + self.weight2.abs().sum(1).mean()
        return gate, l1


def _cosines(queries: torch.Tensor, keys: torch.Tensor) -> torch.Tensor:
    """cos(q_i, k_j) in at least float32: (B, D), (M, D) -> (B, M)."""
    queries, keys = in_compute_dtype(queries, keys)
    return F.normalize(queries, dim=1) @ F.normalize(keys, dim=1).t()


def pair_temperature(queries: torch.Tensor, keys: torch.Tensor, tau0: float, tau_min: float,
                     tau_max: float) -> torch.Tensor:
    """tau_ij = clamp(cos(q_i, k_j) + tau0, tau_min, tau_max), detached: (B, M).

    Without the detach the loss could lower itself by moving features to change their own
    temperatures; the original also detaches.
    """
    with torch.no_grad():
        cos = _cosines(queries, keys)
        return (cos + tau0).clamp(tau_min, tau_max)


def csc_loss(queries: torch.Tensor, keys: torch.Tensor, positives: torch.Tensor,
             tau0: float, tau_min: float, tau_max: float) -> torch.Tensor:
    """Contrastive semantic calibration, one direction.

    For query i: p_i = softmax_j(cos(q_i, k_j) / tau_ij); loss_i = -mean over positives j of
    log p_ij. Rows without a positive (a target query without pseudo-id partner in the batch)
    are left out of the mean; with none at all the loss is 0 (still attached to the graph).

    Args:
        queries: (B, D) student features (with grad).
        keys: (M, D) purified teacher features of the other modality (with grad into the gate).
        positives: (B, M) bool: same source id, or same target pseudo-id.
    Returns:
        scalar loss in the inputs' compute dtype (at least float32).
    """
    if positives.shape != (queries.shape[0], keys.shape[0]):
        raise ValueError(f"positives must be (B, M) = ({queries.shape[0]}, {keys.shape[0]}), "
                         f"got {tuple(positives.shape)}")
    tau = pair_temperature(queries, keys, tau0, tau_min, tau_max)  # (B, M), no grad
    cos = _cosines(queries, keys)  # (B, M)
    log_p = (cos / tau).log_softmax(dim=1)  # (B, M)
    labels = positives.to(cos.dtype)
    count = labels.sum(dim=1)  # (B,)
    rows = count > 0
    per_row = -(log_p * labels).sum(dim=1)[rows] / count[rows]
    return per_row.mean() if rows.any() else log_p.sum() * 0.0


def triplet_loss(anchor: torch.Tensor, raw: torch.Tensor, purified: torch.Tensor,
                 margin: float) -> torch.Tensor:
    """mean_i max(cos(a_i, raw_i) - cos(a_i, purified_i) + margin, 0): the purified teacher
    feature must be closer to the student's partner feature than the raw one. (N, D) each;
    0 for N = 0."""
    if anchor.shape[0] == 0:
        return purified.sum() * 0.0
    anchor, raw, purified = in_compute_dtype(anchor, raw, purified)
    a = F.normalize(anchor, dim=1)
    negative = (a * F.normalize(raw, dim=1)).sum(1)
    positive = (a * F.normalize(purified, dim=1)).sum(1)
    return (negative - positive + margin).clamp(min=0).mean()


class MNFCSC(nn.Module):
    """One noise filter per teacher modality (teacher images are gated with student text
    context, teacher texts with student image context)."""

    def __init__(self, dim: int, hidden: int = 0):
        super().__init__()
        hidden = hidden or max(1, dim // 2)
        self.image = NoiseFilter(dim, hidden)
        self.text = NoiseFilter(dim, hidden)

    def purify(self, modality: str, teacher: torch.Tensor, context: torch.Tensor
               ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Teacher features (N, D) of ``modality`` ("image" | "text") and their partners'
        student features (N, D, detached here: the gate reads the student, it does not train
        it through the context). Returns (purified (N, D), gate (N, D), L1 penalty)."""
        gate, l1 = getattr(self, modality)(teacher, context.detach())
        return gate * teacher, gate, l1
