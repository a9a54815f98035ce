"""Source supervision (IRRA): similarity-distribution matching, InfoNCE, identity classification.

Data parallelism: each rank scores its *local* queries against the *global* keys (all ranks'
embeddings, gathered with gradient) and averages over its local queries. With equal local batch
sizes B on W ranks, the mean of the W rank losses is the single-process loss on the
concatenated W*B batch, and since the gather's backward sums the key gradients back to the rank
that produced them, the data-parallel gradient average equals the single-process gradient.
On one process every collective is the identity: no special case for the caller.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from gckd_ray.config import LossConfig
from gckd_ray.model.collectives import all_gather_no_grad, all_gather_with_grad, rank_and_world
from gckd_ray.model.precision import at_least_float32, compute_dtype, in_compute_dtype


def _gather_keys(image_emb: torch.Tensor, text_emb: torch.Tensor
                 ) -> tuple[torch.Tensor, torch.Tensor, int]:
    """Global image and text keys (N, D) with gradient, and this rank's row offset in them."""
    rank, _ = rank_and_world()
    return (all_gather_with_grad(image_emb), all_gather_with_grad(text_emb),
            rank * image_emb.shape[0])


def _kl_to_labels(logits: torch.Tensor, label_dist: torch.Tensor, epsilon: float) -> torch.Tensor:
    """mean_i KL(softmax(logits_i) || label_dist_i) with IRRA's epsilon: (B, N) -> scalar."""
    pred = logits.softmax(dim=1)
    kl = pred * (logits.log_softmax(dim=1) - torch.log(label_dist + epsilon))
    return kl.sum(dim=1).mean()


def sdm_loss(image_emb: torch.Tensor, text_emb: torch.Tensor, pids: torch.Tensor,
             temperature: float, epsilon: float = 1e-8) -> torch.Tensor:
    """IRRA's similarity-distribution matching, image-to-text plus text-to-image.

    For a query i the predicted distribution over keys j is softmax(s_ij / temperature); the
    label distribution is uniform over keys with the query's id. Loss = KL(pred || labels),
    averaged over queries, summed over the two directions (as IRRA's ``compute_sdm``).

    Args:
        image_emb, text_emb: (B, D) L2-normalised embeddings of B image-caption pairs.
        pids: (B,) int identity ids (duplicates expected: identity-balanced batches).
    Returns:
        scalar loss in the inputs' compute dtype (float32 for bf16/fp32, float64 for float64).
    """
    all_image, all_text, _ = _gather_keys(image_emb, text_emb)  # (N, D) each, N = W*B
    all_pids = all_gather_no_grad(pids)  # (N,)
    img, txt, all_image, all_text = in_compute_dtype(image_emb, text_emb, all_image, all_text)
    i2t = img @ all_text.t() / temperature  # (B, N)
    t2i = txt @ all_image.t() / temperature  # (B, N)
    same = pids.view(-1, 1) == all_pids.view(1, -1)  # (B, N), >= 1 per row (self)
    labels = same.to(i2t.dtype)
    label_dist = labels / labels.sum(dim=1, keepdim=True)
    return _kl_to_labels(i2t, label_dist, epsilon) + _kl_to_labels(t2i, label_dist, epsilon)


def itc_loss(image_emb: torch.Tensor, text_emb: torch.Tensor,
             temperature: float) -> torch.Tensor:
    """CLIP's symmetric InfoNCE: the paired caption/image is the only positive.

    Args:
        image_emb, text_emb: (B, D) L2-normalised embeddings of B pairs.
    Returns:
        scalar ``(CE_i2t + CE_t2i) / 2`` in the inputs' compute dtype (at least float32).
    """
    all_image, all_text, offset = _gather_keys(image_emb, text_emb)  # (N, D) each
    targets = offset + torch.arange(image_emb.shape[0], device=image_emb.device)  # (B,)
    img, txt, all_image, all_text = in_compute_dtype(image_emb, text_emb, all_image, all_text)
    i2t = img @ all_text.t() / temperature  # (B, N)
    t2i = txt @ all_image.t() / temperature  # (B, N)
    return (F.cross_entropy(i2t, targets) + F.cross_entropy(t2i, targets)) / 2


class IdentityClassifier(nn.Module):
    """IRRA's ID loss: one linear classifier shared by both modalities, CE averaged over them.

    Per-sample and local: the data-parallel average of rank means is the global mean.
    """

    def __init__(self, embed_dim: int, num_classes: int):
        super().__init__()
        if num_classes < 1:
            raise ValueError(f"num_classes must be >= 1, got {num_classes}")
        self.classifier = nn.Linear(embed_dim, num_classes)
        nn.init.normal_(self.classifier.weight, std=0.001)  # as IRRA
        nn.init.zeros_(self.classifier.bias)

    def forward(self, image_emb: torch.Tensor, text_emb: torch.Tensor,
                pids: torch.Tensor) -> torch.Tensor:
        """image_emb, text_emb (B, D); pids (B,) class indices in [0, num_classes) -> scalar."""
        image_logits = at_least_float32(self.classifier(image_emb))  # (B, C)
        text_logits = at_least_float32(self.classifier(text_emb))  # (B, C)
        return (F.cross_entropy(image_logits, pids) + F.cross_entropy(text_logits, pids)) / 2


class SourceLoss(nn.Module):
    """The weighted source objective; terms with weight 0 are neither computed nor reported.

    ``forward`` returns ``{"sdm", "itc", "id"}`` (those with weight > 0), each already multiplied
    by its weight, plus ``"loss"``, their sum.
    """

    def __init__(self, cfg: LossConfig, embed_dim: int, num_classes: int):
        super().__init__()
        self.weights = {"sdm": cfg.weights.sdm, "itc": cfg.weights.itc, "id": cfg.weights.id}
        self.sdm_temperature = cfg.sdm_temperature
        self.itc_temperature = cfg.itc_temperature
        self.id_head = IdentityClassifier(embed_dim, num_classes) if cfg.weights.id > 0 else None

    def forward(self, image_emb: torch.Tensor, text_emb: torch.Tensor,
                pids: torch.Tensor) -> dict[str, torch.Tensor]:
        """image_emb, text_emb (B, D) unit-norm, pids (B,) class indices -> named losses."""
        w = self.weights
        losses: dict[str, torch.Tensor] = {}
        if w["sdm"] > 0:
            losses["sdm"] = w["sdm"] * sdm_loss(image_emb, text_emb, pids, self.sdm_temperature)
        if w["itc"] > 0:
            losses["itc"] = w["itc"] * itc_loss(image_emb, text_emb, self.itc_temperature)
        if w["id"] > 0:
            losses["id"] = w["id"] * self.id_head(image_emb, text_emb, pids)
        losses["loss"] = sum(losses.values(), image_emb.new_zeros((), dtype=compute_dtype(image_emb)))
        return losses

    def extra_repr(self) -> str:
        return (f"weights={self.weights}, sdm_temperature={self.sdm_temperature}, "
                f"itc_temperature={self.itc_temperature}")


# ---- contrastive momentum knowledge distillation (CMKD), GCKD section 2 item 5 ---------------
#
# Per-query and local: each rank distils its own queries against keys that are already global
# (the memory queue every rank pushes to) plus its own batch's teacher keys, so the loss is a
# mean over the rank's queries and needs no collective.


def cmkd_loss(student_queries: torch.Tensor, teacher_queries: torch.Tensor, keys: torch.Tensor,
              positives: torch.Tensor, tau_s: float, tau_t: float, alpha: float
              ) -> torch.Tensor:
    """One direction (i2t or t2i) of CMKD: cross-entropy from a softened target to the student.

    p_s = softmax(q_s K^T / tau_s); target = alpha * softmax(q_t K^T / tau_t) + (1 - alpha) * y,
    y = ``positives`` normalised per row. A row with no positive (a target query without a
    confident pseudo-pair) has no hard label to mix in, so its target is the teacher's
    distribution alone (as alpha = 1 for that row) rather than a distribution of mass alpha.
    Loss = mean over rows of -sum_m target_m log p_s,m. The target is detached; the math runs in
    at least float32 (:mod:`gckd_ray.model.precision`).

    Args:
        student_queries: (B, D) student features of the queries (with grad).
        teacher_queries: (B, D) teacher features of the same items.
        keys: (M, D) teacher features of the other modality: [the batch's; the memory queue's].
        positives: (B, M) bool, True where key m is a positive of query b (same source id, or a
            target pseudo-pair / pseudo-id).
    Returns:
        scalar loss in the inputs' compute dtype (float32 for bf16/fp32, float64 for float64).
    """
    if positives.shape != (student_queries.shape[0], keys.shape[0]):
        raise ValueError(f"positives must be (B, M) = ({student_queries.shape[0]}, "
                         f"{keys.shape[0]}), got {tuple(positives.shape)}")
    student, teacher, keys = in_compute_dtype(student_queries, teacher_queries.detach(),
                                              keys.detach())
    with torch.no_grad():
        teacher_dist = (teacher @ keys.t() / tau_t).softmax(dim=1)
        labels = positives.to(keys.dtype)  # (B, M)
        count = labels.sum(dim=1, keepdim=True)  # (B, 1)
        mixed = alpha * teacher_dist + (1 - alpha) * labels / count.clamp(min=1)
        target = torch.where(count > 0, mixed, teacher_dist)  # (B, M)
    log_p_student = (student @ keys.t() / tau_s).log_softmax(dim=1)  # (B, M)
    return -(target * log_p_student).sum(dim=1).mean()
