"""The supervised retriever: dual encoder + source losses in one module (source-only, oracle).

Owning the loss heads (ID classifier) inside the module lets data parallelism wrap one object
and a checkpoint hold one state dict. ``forward`` returns named, weighted losses.
"""

from __future__ import annotations

import torch
from torch import nn

from gckd_ray.config import Config
from gckd_ray.data.tokenizer import Tokenizer
from gckd_ray.model.encoders import DualEncoder, build_dual_encoder
from gckd_ray.model.losses import SourceLoss


class Retriever(nn.Module):
    def __init__(self, encoder: DualEncoder, objective: SourceLoss):
        super().__init__()
        self.encoder = encoder
        self.objective = objective

    def forward(self, images: torch.Tensor, input_ids: torch.Tensor,
                attention_mask: torch.Tensor, pids: torch.Tensor) -> dict[str, torch.Tensor]:
        """images (B,3,H,W) normalised, input_ids/attention_mask (B,L), pids (B,) -> losses."""
        image_emb, text_emb = self.encoder(images, input_ids, attention_mask)  # (B, D) each
        return self.objective(image_emb, text_emb, pids)


def build_encoder(cfg: Config, tokenizer: Tokenizer) -> DualEncoder:
    """The dual encoder a config and its tokenizer describe."""
    return build_dual_encoder(
        cfg.model, vocab_size=tokenizer.vocab_size, pad_id=tokenizer.pad_id,
        bos_id=tokenizer.bos_id, eos_id=tokenizer.eos_id, text_length=cfg.data.text_length,
        image_size=(cfg.data.image_height, cfg.data.image_width))


def build_retriever(cfg: Config, tokenizer: Tokenizer, num_classes: int) -> Retriever:
    encoder = build_encoder(cfg, tokenizer)
    return Retriever(encoder, SourceLoss(cfg.loss, encoder.embed_dim, num_classes))
