"""Dual encoder: Hugging Face CLIP from a local folder, or a tiny random CLIP for tests.

Two details differ from calling ``CLIPModel`` as is:

* **Non-square images.** CLIP's vision position embeddings are a square grid and HF's
  ``interpolate_pos_encoding=True`` resamples them on *every* forward, reading the weight
  without calling the embedding module (ZeRO-3 gathers a parameter when its module runs, so it
  may see a partitioned stub; not tried). As IRRA does, the table is resampled once at build
  time to the ``(H/p, W/p)`` grid and the vision embeddings module is replaced by
  :class:`GridVisionEmbeddings`, which adds it through the embedding module's own forward.
  Parameter names stay those of HF CLIP.
* **Text pooling.** The text embedding is taken at the first ``eos_id`` position, computed
  here. HF pools at ``argmax(input_ids)`` whenever the config says ``eos_token_id == 2`` (legacy
  OpenAI configs), which is only right when eos is the largest id in the vocabulary.

``logit_scale`` of CLIPModel is frozen: temperatures are fixed in the loss config, and a
trainable parameter that receives no gradient breaks DDP.

A run's ``final_model/`` folder (model/final_model.py) is a CLIP folder like any other; its
square position table is the trained grid resampled, so beside it ``gckd_ray.safetensors``
keeps the trained grid's table, which `build_dual_encoder` uses when the image size matches.
"""

from __future__ import annotations

from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn
from transformers import CLIPConfig, CLIPModel, CLIPTextConfig, CLIPVisionConfig

from gckd_ray.config import ModelConfig
from gckd_ray.model.centring import IMAGE, TEXT, DomainCentring
from gckd_ray.model.precision import at_least_float32


def resample_position_embedding(weight: torch.Tensor, old_grid: tuple[int, int],
                                new_grid: tuple[int, int]) -> torch.Tensor:
    """(1 + gh*gw, D) table of [class; row-major grid] -> (1 + nh*nw, D), bicubic on the grid."""
    dim = weight.shape[1]
    cls, grid = weight[:1], weight[1:]
    grid = at_least_float32(grid.reshape(1, *old_grid, dim).permute(0, 3, 1, 2))  # (1, D, gh, gw)
    grid = F.interpolate(grid, size=new_grid, mode="bicubic", align_corners=False)
    grid = grid.permute(0, 2, 3, 1).reshape(-1, dim).to(weight.dtype)  # (nh*nw, D)
    return torch.cat([cls, grid])


class GridVisionEmbeddings(nn.Module):
    """CLIP's class + patch + position embeddings for an ``(H, W)`` image, H and W multiples
    of the patch size (a drop-in for ``CLIPVisionEmbeddings``; same parameter names)."""

    def __init__(self, original: nn.Module, image_size: tuple[int, int]):
        super().__init__()
        height, width = image_size
        self.patch_size = original.patch_size
        if height % self.patch_size or width % self.patch_size:
            raise ValueError(f"image size {height}x{width} is not a multiple of the patch size "
                             f"{self.patch_size}")
        self.image_size = (height, width)
        self.grid = (height // self.patch_size, width // self.patch_size)
        self.embed_dim = original.embed_dim
        self.class_embedding = original.class_embedding  # (D,)
        self.patch_embedding = original.patch_embedding  # Conv2d(3, D, p, stride p)

        old_weight = original.position_embedding.weight.detach()
        side = round((old_weight.shape[0] - 1) ** 0.5)
        if side * side != old_weight.shape[0] - 1:
            raise ValueError(f"expected a square position grid, got {old_weight.shape[0] - 1} "
                             "positions")
        new_weight = (old_weight if (side, side) == self.grid
                      else resample_position_embedding(old_weight, (side, side), self.grid))
        self.position_embedding = nn.Embedding(new_weight.shape[0], self.embed_dim,
                                               device=new_weight.device, dtype=new_weight.dtype)
        with torch.no_grad():
            self.position_embedding.weight.copy_(new_weight)
        self.register_buffer("position_ids", torch.arange(new_weight.shape[0]).unsqueeze(0),
                             persistent=False)

    def forward(self, pixel_values: torch.Tensor, interpolate_pos_encoding: bool = False
                ) -> torch.Tensor:
        """pixel_values (B, 3, H, W) -> tokens (B, 1 + H/p * W/p, D)."""
        if interpolate_pos_encoding:
            raise ValueError("position embeddings are resampled at build time; "
                             "interpolate_pos_encoding is not supported")
        if tuple(pixel_values.shape[-2:]) != self.image_size:
            raise ValueError(f"image size {tuple(pixel_values.shape[-2:])} does not match the "
                             f"encoder's {self.image_size}")
        batch = pixel_values.shape[0]
        patches = self.patch_embedding(pixel_values.to(self.patch_embedding.weight.dtype))
        patches = patches.flatten(2).transpose(1, 2)  # (B, gh*gw, D), row-major like HF
        cls = self.class_embedding.expand(batch, 1, -1)  # (B, 1, D)
        tokens = torch.cat([cls, patches], dim=1)
        return tokens + self.position_embedding(self.position_ids)


class DualEncoder(nn.Module):
    """Image tower + text tower + projections of a CLIPModel; L2-normalised (B, D) outputs.

    Args:
        clip: the CLIPModel (pretrained or random).
        eos_id: the tokenizer's eos id; the text embedding is read at its first occurrence.
        text_length: the longest token sequence accepted (<= max_position_embeddings).
        image_size: (H, W) of every input image.
    """

    def __init__(self, clip: CLIPModel, *, eos_id: int, text_length: int,
                 image_size: tuple[int, int]):
        super().__init__()
        max_positions = clip.config.text_config.max_position_embeddings
        if text_length > max_positions:
            raise ValueError(f"text length {text_length} exceeds the text tower's "
                             f"max_position_embeddings {max_positions}")
        self.clip = clip
        self.eos_id = eos_id
        self.text_length = text_length
        self.image_size = tuple(image_size)
        self.embed_dim = clip.config.projection_dim
        # Unused here (losses own their temperatures) and frozen; 1-D because DeepSpeed's
        # parameter broadcast views every parameter as bytes, which a 0-D tensor cannot be.
        clip.logit_scale = nn.Parameter(clip.logit_scale.detach().reshape(1), requires_grad=False)
        vision = clip.vision_model
        vision.embeddings = GridVisionEmbeddings(vision.embeddings, self.image_size)
        self.centring = DomainCentring(self.embed_dim)

    def encode_image(self, pixel_values: torch.Tensor, domain: int | None = None
                     ) -> torch.Tensor:
        """pixel_values (B, 3, H, W) normalised float -> (B, D) unit-norm; with ``domain``
        (centring.SOURCE / TARGET) centred by that domain's running mean (see centring)."""
        pooled = self.clip.vision_model(pixel_values=pixel_values).pooler_output  # (B, Hv)
        emb = self._project_image(pooled)
        return emb if domain is None else self.centring(emb, domain, IMAGE)

    def encode_text(self, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                    domain: int | None = None) -> torch.Tensor:
        """input_ids, attention_mask (B, L), each row ``[bos] ... [eos] pad`` -> (B, D) unit-norm;
        ``domain`` as for encode_image.

        Rows must contain ``eos_id`` (the tokenizers guarantee it, also when truncating).
        """
        emb = self._project_text(self._text_hidden(input_ids, attention_mask), input_ids)
        return emb if domain is None else self.centring(emb, domain, TEXT)

    def encode_with_tokens(self, pixel_values: torch.Tensor, input_ids: torch.Tensor,
                           attention_mask: torch.Tensor
                           ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """Embeddings plus token states for the matching head, one forward per tower.

        Args:
            pixel_values: (B, 3, H, W); input_ids, attention_mask: (B', L) as for encode_text.
        Returns:
            image_emb (B, D) and text_emb (B', D), unit-norm, equal to ``encode_image`` and
            ``encode_text``; image_tokens (B, 1 + P, Hv): the vision tower's last hidden state
            with ``post_layernorm`` applied to every token (the pooled path applies it to the
            class token, so ``image_tokens[:, 0]`` is the feature the projection reads);
            text_tokens (B', L, Ht): the text tower's last hidden state (after its final layer
            norm). Positions after eos are padding: mask them with ``attention_mask``.
        """
        vision = self.clip.vision_model
        image_tokens = vision.post_layernorm(
            vision(pixel_values=pixel_values).last_hidden_state)  # (B, 1+P, Hv)
        text_tokens = self._text_hidden(input_ids, attention_mask)  # (B', L, Ht)
        return (self._project_image(image_tokens[:, 0]),
                self._project_text(text_tokens, input_ids), image_tokens, text_tokens)

    def _project_image(self, pooled: torch.Tensor) -> torch.Tensor:
        """Post-layernorm class token (B, Hv) -> (B, D) unit-norm."""
        return F.normalize(self.clip.visual_projection(pooled), dim=-1)

    def _text_hidden(self, input_ids: torch.Tensor, attention_mask: torch.Tensor
                     ) -> torch.Tensor:
        """(B, L) ids and mask -> the text tower's last hidden state (B, L, Ht)."""
        if input_ids.shape[-1] > self.text_length:
            raise ValueError(f"token sequences of length {input_ids.shape[-1]} exceed the "
                             f"encoder's text length {self.text_length}")
        return self.clip.text_model(input_ids=input_ids,
                                    attention_mask=attention_mask).last_hidden_state

    def _project_text(self, hidden: torch.Tensor, input_ids: torch.Tensor) -> torch.Tensor:
        """Hidden states (B, L, Ht) pooled at each row's first eos -> (B, D) unit-norm."""
        eos_pos = (input_ids == self.eos_id).int().argmax(dim=-1)  # (B,) first eos
        pooled = hidden[torch.arange(hidden.shape[0], device=hidden.device), eos_pos]  # (B, Ht)
        return F.normalize(self.clip.text_projection(pooled), dim=-1)

    def forward(self, pixel_values: torch.Tensor, input_ids: torch.Tensor,
                attention_mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """-> image embeddings (B, D), text embeddings (B, D), both unit-norm."""
        return self.encode_image(pixel_values), self.encode_text(input_ids, attention_mask)


# Beside a final_model/ folder's weights: what CLIPModel cannot hold (model/final_model.py).
FINAL_MODEL_EXTRAS = "gckd_ray.safetensors"
GRID_TABLE = "vision_position_embedding"


def _load_trained_grid(encoder: DualEncoder, folder: str | Path) -> None:
    """Replace the resampled position table by the trained one that a final_model/ folder
    keeps in ``FINAL_MODEL_EXTRAS``, when it was trained on this grid (else keep the resample)."""
    from safetensors import safe_open

    path = Path(folder) / FINAL_MODEL_EXTRAS
    if not path.is_file():
        return
    embeddings = encoder.clip.vision_model.embeddings
    with safe_open(str(path), framework="pt") as f:
        if (f.metadata() or {}).get("grid") != "x".join(map(str, embeddings.grid)):
            return
        table = f.get_tensor(GRID_TABLE)
    with torch.no_grad():
        embeddings.position_embedding.weight.copy_(table)


def tiny_clip_config(cfg: ModelConfig, *, vocab_size: int, pad_id: int, bos_id: int,
                     eos_id: int, text_length: int, image_size: tuple[int, int]) -> CLIPConfig:
    """A small random-init CLIP config from ``cfg`` (4x MLP, one position per text token)."""
    for name, token in (("pad_id", pad_id), ("bos_id", bos_id), ("eos_id", eos_id)):
        if not 0 <= token < vocab_size:
            raise ValueError(f"{name} {token} is outside the vocabulary (size {vocab_size})")
    shared = dict(hidden_size=cfg.hidden_size, intermediate_size=4 * cfg.hidden_size,
                  num_hidden_layers=cfg.num_layers, num_attention_heads=cfg.num_heads)
    text = CLIPTextConfig(vocab_size=vocab_size, max_position_embeddings=text_length,
                          pad_token_id=pad_id, bos_token_id=bos_id, eos_token_id=eos_id,
                          **shared)
    # The square size only seeds the table that GridVisionEmbeddings resamples to (H, W).
    vision = CLIPVisionConfig(image_size=image_size[0], patch_size=cfg.patch_size, **shared)
    return CLIPConfig(text_config=text, vision_config=vision, projection_dim=cfg.embed_dim)


def embedding_dim(cfg: ModelConfig) -> int:
    """The joint embedding size ``build_dual_encoder(cfg, ...)`` will have, without building it."""
    if cfg.pretrained:
        return CLIPConfig.from_pretrained(cfg.pretrained, local_files_only=True).projection_dim
    return cfg.embed_dim


def build_dual_encoder(cfg: ModelConfig, *, vocab_size: int, pad_id: int, bos_id: int,
                       eos_id: int, text_length: int, image_size: tuple[int, int]
                       ) -> DualEncoder:
    """``cfg.pretrained`` set: CLIP from that local folder (never downloads; a run's
    final_model/ folder with its trained position grid); else a tiny random CLIP sized by
    ``cfg``. Token ids come from the tokenizer the model will read."""
    if cfg.pretrained:
        clip = CLIPModel.from_pretrained(cfg.pretrained, local_files_only=True,
                                         attn_implementation="sdpa")
        model_vocab = clip.config.text_config.vocab_size
        if vocab_size > model_vocab or not 0 <= eos_id < model_vocab:
            raise ValueError(f"tokenizer (vocab {vocab_size}, eos {eos_id}) does not fit the "
                             f"text tower of {cfg.pretrained} (vocab {model_vocab}); use the "
                             "checkpoint's own CLIP tokenizer")
    else:
        config = tiny_clip_config(cfg, vocab_size=vocab_size, pad_id=pad_id, bos_id=bos_id,
                                  eos_id=eos_id, text_length=text_length, image_size=image_size)
        clip = CLIPModel._from_config(config, attn_implementation="sdpa")
    encoder = DualEncoder(clip, eos_id=eos_id, text_length=text_length, image_size=image_size)
    if cfg.pretrained:
        _load_trained_grid(encoder, cfg.pretrained)
    if cfg.freeze_token_embeddings:
        clip.text_model.embeddings.token_embedding.weight.requires_grad_(False)
    return encoder
