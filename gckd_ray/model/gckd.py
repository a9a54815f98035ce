"""The GCKD distiller: student, EMA teacher, graph propagation and named losses in one module.

One training step (``forward``) reads like single-process PyTorch: student forward on the
source pairs and on the unpaired target images and captions, teacher forward under no_grad,
the memory snapshot handed in as tensors, graph propagation over batch + memory nodes, and a
dict of weighted losses; ``distill.mode`` picks the distillation term, CMKD or MNF/CSC
(model/mnf_csc.py). The EMA update and the memory push are explicit calls after the
optimizer step (``ema_step``; the worker pushes ``StepOutput.teacher``), never hidden in
``forward``. The EMA's fp32 masters of a bf16 teacher (``ema_state``, model/momentum.py) are
outside ``state_dict()``: the worker saves them with its rank's part of each checkpoint.
Target ids and target pairing are never inputs: target positives come from the memory's
pseudo-ids, which its cross-domain graph derives from teacher features of the whole target
set. In-batch mutual nearest neighbours are not used: an unpaired batch rarely holds
a caption's person at all (64 of 4,000 images: ~3%), and such pairs measured 0% precision.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn
from torch.profiler import record_function

from gckd_ray.config import Config
from gckd_ray.model.centring import IMAGE, SOURCE, TARGET, TEXT
from gckd_ray.model.encoders import DualEncoder
from gckd_ray.model.graph import PropagationNet, gmp_loss, knn_edges, propagate_teacher
from gckd_ray.model.collectives import all_gather_no_grad, all_gather_with_grad
from gckd_ray.model.losses import SourceLoss, cmkd_loss
from gckd_ray.model.matching import MatchingHead, itm_loss, select_hard_negatives
from gckd_ray.model.mnf_csc import MNFCSC, csc_loss, triplet_loss
from gckd_ray.model.momentum import EMAState, FrozenTeacher, ema_update, make_teacher

# Source labels and target pseudo-ids share one integer space for positive masks; target
# groups are shifted past any source label. -1 means "no known group" and is never positive.
TARGET_GROUP_OFFSET = 1 << 40


@dataclass
class MemoryView:
    """Teacher features from the global memory, as tensors (no grad).

    ``image``/``text`` are the whole queues (CMKD keys); ``graph_nodes`` the C newest entries
    per modality and domain that join the step's graph. ``*_groups`` are source labels,
    target pseudo-ids + TARGET_GROUP_OFFSET, or -1.
    """

    image: torch.Tensor          # (Mi, D)
    image_groups: torch.Tensor   # (Mi,)
    text: torch.Tensor           # (Mt, D)
    text_groups: torch.Tensor    # (Mt,)
    graph_nodes: torch.Tensor    # (4C, D)
    target_image_pseudo: torch.Tensor  # (num target images,) pseudo-id per target image row
    target_text_pseudo: torch.Tensor   # (num target captions,)


@dataclass
class StepOutput:
    losses: dict[str, torch.Tensor]
    teacher: dict[str, torch.Tensor]  # detached teacher features to push: src/tgt x image/text
    stats: dict[str, float]


def target_groups(pseudo: torch.Tensor) -> torch.Tensor:
    """Target pseudo-ids -> the shared group space (shifted past source labels; -1 stays)."""
    return torch.where(pseudo >= 0, pseudo + TARGET_GROUP_OFFSET, torch.full_like(pseudo, -1))


def _same_group(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    return (a[:, None] == b[None, :]) & (a[:, None] >= 0)


class GCKDDistiller(nn.Module):
    def __init__(self, student: DualEncoder, source_loss: SourceLoss, cfg: Config):
        super().__init__()
        self.encoder = student  # named like Retriever's, so checkpoints/eval read it the same way
        self.teacher = FrozenTeacher(make_teacher(student))
        self.ema_state = EMAState()  # fp32 masters of a bf16/fp16 teacher, this rank's shards
        self.objective = source_loss
        self.propagation = (PropagationNet(student.embed_dim, cfg.graph.num_layers)
                            if cfg.graph.enabled else None)
        self.matching = None
        if cfg.matching.enabled:
            widths = student.clip.config
            self.matching = MatchingHead(widths.text_config.hidden_size,
                                         widths.vision_config.hidden_size, cfg.matching.hidden,
                                         cfg.matching.num_heads, cfg.matching.num_layers)
        # The noise filter is trained with the student (it is not part of the encoder, so the
        # EMA teacher, a copy of the encoder, neither holds nor averages it).
        self.mnf = (MNFCSC(student.embed_dim, cfg.distill.mnf_hidden)
                    if cfg.distill.mode == "mnf_csc" else None)
        self.gckd, self.graph_cfg, self.distill = cfg.gckd, cfg.graph, cfg.distill
        self.hard_negatives = cfg.matching.hard_negatives
        self.target_losses_on = cfg.target_losses_on
        self.weights = cfg.loss.weights

    @torch.no_grad()
    @record_function("gckd.ema")
    def ema_step(self) -> None:
        ema_update(self.teacher.module, self.encoder, self.gckd.momentum, self.ema_state)

    def forward(self, source: dict[str, torch.Tensor], target: dict[str, torch.Tensor],
                memory: MemoryView | None, adapt: bool) -> StepOutput:
        """source: images (B,3,H,W), input_ids/attention_mask (B,L), pids (B,);
        target: images (Bi,3,H,W), image_rows (Bi,), input_ids/attention_mask (Bt,L),
        text_rows (Bt,) - unpaired, no ids. Either may carry ``teacher_images``, the teacher's
        view of the same images (default: the student's)."""
        teacher = self._teacher_features(source, target)
        with_tokens = adapt and self.matching is not None
        s_img, s_txt, s_tok = self._student(source, SOURCE, with_tokens)          # (B, D)
        with record_function("gckd.source_loss"):
            losses = self.objective(s_img, s_txt, source["pids"])
        if not (adapt and self.target_losses_on):
            return StepOutput(losses, teacher, {})
        g_img, g_txt, g_tok = self._student(target, TARGET, with_tokens)          # (Bi|Bt, D)
        if not self.gckd.target_text_grad:
            g_txt = g_txt.detach()
            if g_tok is not None:
                g_tok = (g_tok[0], g_tok[1].detach(), g_tok[2])
        student = torch.cat([s_img, s_txt, g_img, g_txt])                        # (N, D)
        teacher_nodes = torch.cat([teacher["src_image"], teacher["src_text"],
                                   teacher["tgt_image"], teacher["tgt_text"]])
        if self.propagation is not None:
            losses["gmp"] = self.weights.gmp * self._propagate(student, teacher_nodes, memory,
                                                               len(s_img), len(g_img))
        pos_t2i, pos_i2t, stats = self._target_positives(source, target, memory)
        if with_tokens:
            losses["itm"] = self.weights.itm * self._itm(
                (s_img, g_img, s_txt, g_txt), (s_tok, g_tok), source, target, memory, stats)
        if self.distill.mode == "cmkd":
            losses["cmkd"] = self.weights.cmkd * self._cmkd(
                (s_img, g_img, s_txt, g_txt), teacher, memory, pos_t2i, pos_i2t)
        elif self.distill.mode == "mnf_csc":
            losses.update(self._mnf_csc((s_img, g_img, s_txt, g_txt), teacher, source, target,
                                        memory, stats))
        if self.weights.i2i:
            losses["i2i"] = self.weights.i2i * self._i2i(torch.cat([s_img, g_img]), teacher,
                                                         source, target, memory)
        losses["loss"] = sum(v for k, v in losses.items() if k != "loss")
        return StepOutput(losses, teacher, stats)

    @record_function("gckd.student_forward")
    def _student(self, batch, domain: int, with_tokens: bool):
        """Centred student embeddings of a batch (image, text) and, for the matching head,
        the towers' token states (image_tokens, text_tokens, text_mask) from the same forward."""
        images, ids, mask = batch["images"], batch["input_ids"], batch["attention_mask"]
        if not with_tokens:
            return (self.encoder.encode_image(images, domain),
                    self.encoder.encode_text(ids, mask, domain), None)
        img, txt, img_tokens, txt_tokens = self.encoder.encode_with_tokens(images, ids, mask)
        centring = self.encoder.centring
        return (centring(img, domain, IMAGE), centring(txt, domain, TEXT),
                (img_tokens, txt_tokens, mask))

    @torch.no_grad()
    @record_function("gckd.teacher_forward")
    def _teacher_features(self, source, target) -> dict[str, torch.Tensor]:
        """Teacher features of the step; they also move the student's domain means, which then
        centre teacher and student alike (the teacher gets the means at the next EMA step)."""
        t = self.teacher.module
        raw = {(SOURCE, IMAGE): t.encode_image(source.get("teacher_images", source["images"])),
               (SOURCE, TEXT): t.encode_text(source["input_ids"], source["attention_mask"]),
               (TARGET, IMAGE): t.encode_image(target.get("teacher_images", target["images"])),
               (TARGET, TEXT): t.encode_text(target["input_ids"], target["attention_mask"])}
        centring = self.encoder.centring
        if self.gckd.domain_centring:
            centring.update(raw, self.gckd.centring_momentum)
        names = {(SOURCE, IMAGE): "src_image", (SOURCE, TEXT): "src_text",
                 (TARGET, IMAGE): "tgt_image", (TARGET, TEXT): "tgt_text"}
        return {names[key]: centring(emb, *key) for key, emb in raw.items()}

    def _propagate(self, student, teacher_nodes, memory, b, bi) -> torch.Tensor:
        """GMP loss: batch + memory nodes, kNN on teacher features. Memory nodes are context
        only (teacher features, no grad)."""
        context = (memory.graph_nodes if memory is not None and self.gckd.use_memory
                   else teacher_nodes.new_zeros((0, teacher_nodes.shape[1])))
        nodes_t = torch.cat([teacher_nodes, context])
        with record_function("gckd.knn_graph"):
            edges = knn_edges(nodes_t, min(self.graph_cfg.k, len(nodes_t) - 1))
        with record_function("gckd.propagation"):
            prop = self.propagation(torch.cat([student, context]), edges)[: len(student)]
            smooth = propagate_teacher(nodes_t, edges, self.graph_cfg.temperature)[: len(student)]
            image_rows = torch.cat([torch.arange(b), torch.arange(2 * b, 2 * b + bi)])
            text_rows = torch.cat([torch.arange(b, 2 * b),
                                   torch.arange(2 * b + bi, len(student))])
            t = self.graph_cfg.temperature
            return 0.5 * (gmp_loss(prop[image_rows], smooth[image_rows], t)
                          + gmp_loss(prop[text_rows], smooth[text_rows], t))

    @torch.no_grad()
    @record_function("gckd.positives")
    def _target_positives(self, source, target, memory):
        """Positive masks for CMKD keys [src images; tgt images; memory images] (t2i) and the
        mirror (i2t): same source id, or same memory pseudo-id on the target."""
        key_img, key_txt = self._group_keys(source, target, memory)
        pos_t2i, pos_i2t = _same_group(key_txt, key_img), _same_group(key_img, key_txt)
        if memory is not None and self.gckd.use_memory:
            pos_t2i = torch.cat([pos_t2i, _same_group(key_txt, memory.image_groups)], 1)
            pos_i2t = torch.cat([pos_i2t, _same_group(key_img, memory.text_groups)], 1)
        b = len(source["pids"])
        stats = {"target_text_with_positive": float(pos_t2i[b:].any(1).float().mean()),
                 "target_image_with_positive": float(pos_i2t[b:].any(1).float().mean())}
        return pos_t2i, pos_i2t, stats

    @record_function("gckd.matching")
    def _itm(self, students, tokens, source, target, memory, stats) -> torch.Tensor:
        """Matching-head loss over the batch of both domains: source pairs and target pairs of
        one pseudo-id are positives; each gets a hard negative image and text among the rows
        that cannot be the same person (other domain, or both (pseudo-)ids known and unequal)."""
        s_img, g_img, s_txt, g_txt = students
        (s_itok, s_ttok, s_mask), (g_itok, g_ttok, g_mask) = tokens
        image_tokens, text_tokens = torch.cat([s_itok, g_itok]), torch.cat([s_ttok, g_ttok])
        text_mask = torch.cat([s_mask, g_mask])
        with torch.no_grad():
            b = len(s_img)
            img_key, txt_key = self._group_keys(source, target, memory)
            same = txt_key[:, None] == img_key[None, :]
            known = (txt_key[:, None] >= 0) & (img_key[None, :] >= 0)
            t_dom = torch.arange(len(txt_key), device=same.device) >= b
            i_dom = torch.arange(len(img_key), device=same.device) >= b
            other_domain = t_dom[:, None] != i_dom[None, :]
            positives = same & known & ~other_domain
            positives[:b, :b] = torch.eye(b, dtype=torch.bool, device=same.device)  # own pairs
            pairs = positives.nonzero()[: 2 * b]  # (P, 2) [text, image]; bounded per step
            allowed = other_domain | (known & ~same)
            sim = torch.cat([s_txt, g_txt]) @ torch.cat([s_img, g_img]).t()
            if not self.hard_negatives:  # ablation: a uniformly random allowed negative
                sim = torch.rand_like(sim)
            neg_img = select_hard_negatives(sim[pairs[:, 0]], allowed[pairs[:, 0]])
            neg_txt = select_hard_negatives(sim.t()[pairs[:, 1]], allowed.t()[pairs[:, 1]])
            stats["itm_target_pairs"] = float((pairs[:, 0] >= b).sum())
        return itm_loss(self.matching, text_tokens, text_mask, image_tokens, pairs,
                        neg_img, neg_txt)

    def _group_keys(self, source, target, memory) -> tuple[torch.Tensor, torch.Tensor]:
        """Group of each batch row in the shared space: [source pids; target pseudo-ids or -1]
        for images and for texts."""
        device = source["pids"].device
        img = torch.full((len(target["image_rows"]),), -1, dtype=torch.long, device=device)
        txt = torch.full((len(target["text_rows"]),), -1, dtype=torch.long, device=device)
        if memory is not None and self.gckd.use_pseudo_ids:
            img = target_groups(memory.target_image_pseudo[target["image_rows"]])
            txt = target_groups(memory.target_text_pseudo[target["text_rows"]])
        return torch.cat([source["pids"], img]), torch.cat([source["pids"], txt])

    @record_function("gckd.cmkd")
    def _cmkd(self, students, teacher, memory, pos_t2i, pos_i2t) -> torch.Tensor:
        s_img, g_img, s_txt, g_txt = students
        keys_img = torch.cat([teacher["src_image"], teacher["tgt_image"]])
        keys_txt = torch.cat([teacher["src_text"], teacher["tgt_text"]])
        if memory is not None and self.gckd.use_memory:
            keys_img = torch.cat([keys_img, memory.image])
            keys_txt = torch.cat([keys_txt, memory.text])
        d = self.distill
        t2i = cmkd_loss(torch.cat([s_txt, g_txt]),
                        torch.cat([teacher["src_text"], teacher["tgt_text"]]),
                        keys_img, pos_t2i, d.tau_s, d.tau_t, d.alpha)
        i2t = cmkd_loss(torch.cat([s_img, g_img]),
                        torch.cat([teacher["src_image"], teacher["tgt_image"]]),
                        keys_txt, pos_i2t, d.tau_s, d.tau_t, d.alpha)
        return 0.5 * (t2i + i2t)

    @record_function("gckd.i2i")
    def _i2i(self, student_images, teacher, source, target, memory) -> torch.Tensor:
        """Image-image CMKD: each student image (its strong view in the adaptation phase)
        against the teacher's image keys [source; target; memory images], positives its own
        teacher view and every key of its group (source id, target pseudo-id)."""
        keys = torch.cat([teacher["src_image"], teacher["tgt_image"]])
        with torch.no_grad():
            groups, _ = self._group_keys(source, target, memory)
            positives = _same_group(groups, groups)
            positives |= torch.eye(len(groups), dtype=torch.bool, device=positives.device)
            if memory is not None and self.gckd.use_memory:
                keys = torch.cat([keys, memory.image])
                positives = torch.cat([positives, _same_group(groups, memory.image_groups)], 1)
        d = self.distill
        return cmkd_loss(student_images, keys[: len(groups)], keys, positives, d.tau_s, d.tau_t,
                         d.alpha)

    @record_function("gckd.mnf_csc")
    def _mnf_csc(self, students, teacher, source, target, memory, stats
                 ) -> dict[str, torch.Tensor]:
        """MNF + CSC (model/mnf_csc.py) over the batch of both domains: each teacher feature is
        gated with the student feature of its partner of the other modality; student queries
        are calibrated against the purified teacher keys of every rank (gathered with
        gradient, as the source losses gather theirs), positives by (pseudo-)id."""
        s_img, g_img, s_txt, g_txt = students
        b = len(s_img)
        student_img, student_txt = torch.cat([s_img, g_img]), torch.cat([s_txt, g_txt])
        t_img = torch.cat([teacher["src_image"], teacher["tgt_image"]])  # (B + Bi, D)
        t_txt = torch.cat([teacher["src_text"], teacher["tgt_text"]])    # (B + Bt, D)
        img_groups, txt_groups = self._group_keys(source, target, memory)
        img_partner, img_known = _partners(teacher["tgt_image"], teacher["tgt_text"],
                                           img_groups[b:], txt_groups[b:], b)
        txt_partner, txt_known = _partners(teacher["tgt_text"], teacher["tgt_image"],
                                           txt_groups[b:], img_groups[b:], b)
        p_img, gate_img, l1_img = self.mnf.purify("image", t_img, student_txt[img_partner])
        p_txt, gate_txt, l1_txt = self.mnf.purify("text", t_txt, student_img[txt_partner])
        d = self.distill
        taus = (d.csc_tau0, d.csc_tau_min, d.csc_tau_max)
        t2i = csc_loss(student_txt, all_gather_with_grad(p_img),
                       _same_group(txt_groups, all_gather_no_grad(img_groups)), *taus)
        i2t = csc_loss(student_img, all_gather_with_grad(p_txt),
                       _same_group(img_groups, all_gather_no_grad(txt_groups)), *taus)
        # The triplet needs a partner that is a known (pseudo-)pair, not a mere neighbour.
        triplet = 0.5 * (
            triplet_loss(student_txt[img_partner][img_known].detach(), t_img[img_known],
                         p_img[img_known], d.mnf_margin)
            + triplet_loss(student_img[txt_partner][txt_known].detach(), t_txt[txt_known],
                           p_txt[txt_known], d.mnf_margin))
        stats["mnf_gate_mean"] = torch.cat([gate_img, gate_txt]).detach().mean().item()
        # Every MNF/CSC term compares cosines, which a uniform gate leaves unchanged: how far
        # the gate turns the teacher's features is what it does.
        stats["mnf_gate_cos"] = nn.functional.cosine_similarity(
            torch.cat([p_img, p_txt]).detach().float(), torch.cat([t_img, t_txt]).float()
        ).mean().item()
        w = self.weights
        return {"csc": w.csc * 0.5 * (t2i + i2t), "mnf_triplet": w.mnf_triplet * triplet,
                "mnf_l1": w.mnf_l1 * (l1_img + l1_txt)}


@torch.no_grad()
def _partners(features: torch.Tensor, others: torch.Tensor, groups: torch.Tensor,
              other_groups: torch.Tensor, b: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The other-modality row each of the B source + N target rows is gated with.

    Source row i: its own pair (row i). Target row: among the batch's target rows of the
    other modality, the teacher's most similar one with the same pseudo-id, or, with none,
    the teacher's most similar one overall (target pairs are unknown; in the paired variant
    the own pair has the same pseudo-id). ``features`` (N, D) and ``others`` (N', D) are the
    target teacher features, ``groups`` (N,) / ``other_groups`` (N',) their groups.

    Returns:
        partner (B + N,) row index into [source; target] of the other modality, and
        known (B + N,) bool: the partner is a source pair or shares a pseudo-id.
    """
    same = _same_group(groups, other_groups)  # (N, N')
    # Cosines lie in [-1, 1], so +3 ranks every same-group row above every other row.
    target = b + (features @ others.t() + 3.0 * same).argmax(1)
    own = torch.arange(b, device=features.device)
    known = torch.cat([torch.ones(b, dtype=torch.bool, device=same.device), same.any(1)])
    return torch.cat([own, target]), known


def build_gckd(cfg: Config, tokenizer, num_classes: int) -> GCKDDistiller:
    from gckd_ray.model.retriever import build_encoder

    student = build_encoder(cfg, tokenizer)
    return GCKDDistiller(student, SourceLoss(cfg.loss, student.embed_dim, num_classes), cfg)
