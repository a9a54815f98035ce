"""Image transforms in torch + Pillow (no torchvision wheel exists here for CPU).

Images are decoded and resized once to ``(3, H, W)`` uint8 (:func:`pil_to_uint8`), batched, and
moved to the device as uint8 (4x less traffic than float). Augmentation (:class:`TrainAugment`)
runs batched on uint8 tensors on whatever device they live on; :func:`normalize` turns them into
CLIP-normalised float32 last. Training = ``normalize(augment(batch))``; evaluation =
``eval_transform(batch)``.

Augmentation follows IRRA's training transform: random horizontal flip (p=0.5), zero padding
(10 px at IRRA's 384x128, scaled with the image height), random crop back to (H, W), then,
with probability ``erase_prob`` (``data.random_erasing``; IRRA 0.5), one random rectangle of
2-40% of the image with aspect 0.3-3.3 set to the mean pixel (IRRA erases the normalised image
with value 0, which is the same pixel).

:meth:`TrainAugment.strong` is the student's view in GCKD's adaptation phase (the teacher keeps
the plain view): a random zoom with independent horizontal and vertical scale (person shape and
canvas aspect differ between datasets) and a mild photometric jitter (hue rotation, saturation,
per-channel gain, brightness, pixel noise), so distillation from the teacher's view teaches
invariance to camera and framing. Hue stays within +-8 degrees: clothing colours, the words
captions use most, are ~30 degrees apart.
"""

from __future__ import annotations

import functools
import math

import PIL.Image
import torch
import torch.nn.functional as F

CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
_ERASE_AREA = (0.02, 0.4)     # IRRA's RandomErasing(scale=(0.02, 0.4)), torchvision's ratio
_ERASE_RATIO = (0.3, 1 / 0.3)


def pil_to_uint8(img: PIL.Image.Image, size: tuple[int, int]) -> torch.Tensor:
    """Resize (bicubic) to ``size = (H, W)`` and convert to a (3, H, W) uint8 tensor."""
    height, width = size
    img = img.convert("RGB")
    if img.size != (width, height):
        img = img.resize((width, height), PIL.Image.Resampling.BICUBIC)
    data = torch.frombuffer(bytearray(img.tobytes()), dtype=torch.uint8)
    return data.view(height, width, 3).permute(2, 0, 1).contiguous()


def normalize(batch_uint8: torch.Tensor) -> torch.Tensor:
    """(B, 3, H, W) or (3, H, W) uint8 -> float32 ``(x / 255 - mean) / std``, same device."""
    if batch_uint8.dtype != torch.uint8:
        raise TypeError(f"normalize expects uint8 images, got {batch_uint8.dtype}")
    if batch_uint8.shape[-3] != 3:
        raise ValueError(f"normalize expects 3 channels at dim -3, got shape "
                         f"{tuple(batch_uint8.shape)}")
    mean, std = _mean_std(batch_uint8.device)
    return (batch_uint8.float().div_(255.0) - mean).div_(std)


@functools.lru_cache(maxsize=8)
def _mean_std(device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    # Cached per device: building them every call is a blocking host-to-device copy on GPU.
    return (torch.tensor(CLIP_MEAN, device=device).view(3, 1, 1),
            torch.tensor(CLIP_STD, device=device).view(3, 1, 1))


eval_transform = normalize


class TrainAugment:
    """Batched IRRA-style augmentation on uint8 images, reproducible from a seed.

    Random numbers come from a CPU ``torch.Generator`` owned by the object (seeded once), so the
    sequence of augmentations does not depend on the device the images live on.

    Args:
        seed: seed of the generator (make it differ per data-parallel rank).
        padding: zero padding before the random crop, in pixels; ``None`` = IRRA's 10 px at a
            384-pixel height, scaled to the batch's height (at least 1 px).
        flip_prob: probability of a horizontal flip.
        erase_prob: probability of random erasing per image (0: no draws are made for it, so
            the augmentation stream is the same as without the option).
    """

    def __init__(self, seed: int = 0, padding: int | None = None, flip_prob: float = 0.5,
                 erase_prob: float = 0.0):
        if padding is not None and padding < 0:
            raise ValueError(f"padding must be >= 0, got {padding}")
        self.padding = padding
        self.flip_prob = flip_prob
        self.erase_prob = erase_prob
        self.generator = torch.Generator().manual_seed(seed)

    def pad_for(self, height: int) -> int:
        if self.padding is not None:
            return self.padding
        return max(1, round(10 * height / 384))

    def __call__(self, images: torch.Tensor) -> torch.Tensor:
        """images (B, 3, H, W) uint8 -> augmented (B, 3, H, W) uint8, same device."""
        if images.dim() != 4 or images.dtype != torch.uint8:
            raise ValueError(f"TrainAugment expects (B, 3, H, W) uint8, got "
                             f"{tuple(images.shape)} {images.dtype}")
        b, _, h, w = images.shape
        pad = self.pad_for(h)
        flip = torch.rand(b, generator=self.generator) < self.flip_prob  # (B,)
        top = torch.randint(0, 2 * pad + 1, (b,), generator=self.generator)  # (B,)
        left = torch.randint(0, 2 * pad + 1, (b,), generator=self.generator)  # (B,)

        device = images.device  # one small copy of the draws to the images' device
        flip, top, left = torch.stack([flip.long(), top, left]).to(device).unbind(0)
        flip = flip.bool()
        out = torch.where(flip.view(b, 1, 1, 1), images.flip(-1), images)
        if pad > 0:
            out = self._crop(out, pad, top, left)
        return self.erase(out) if self.erase_prob > 0 else out

    def _crop(self, out: torch.Tensor, pad: int, top: torch.Tensor, left: torch.Tensor
              ) -> torch.Tensor:
        b, _, h, w = out.shape
        device = out.device
        padded = torch.nn.functional.pad(out, (pad, pad, pad, pad))  # (B, 3, H+2p, W+2p), zeros
        rows = top.view(b, 1) + torch.arange(h, device=device)  # (B, H)
        cols = left.view(b, 1) + torch.arange(w, device=device)  # (B, W)
        batch = torch.arange(b, device=device).view(b, 1, 1)
        crop = padded.permute(0, 2, 3, 1)[batch, rows.view(b, h, 1), cols.view(b, 1, w)]
        return crop.permute(0, 3, 1, 2).contiguous()  # (B, H, W, 3) -> (B, 3, H, W)

    def erase(self, images: torch.Tensor) -> torch.Tensor:
        """Random erasing of (B, 3, H, W) uint8 images: each, with probability
        ``erase_prob``, gets one rectangle (area 2-40%, aspect 0.3-3.3, clipped to the image)
        set to the CLIP mean pixel. Draws come from this object's generator."""
        b, _, h, w = images.shape
        u = torch.rand(b, 5, generator=self.generator)  # (B, 5): apply, area, ratio, top, left
        area = (_ERASE_AREA[0] + (_ERASE_AREA[1] - _ERASE_AREA[0]) * u[:, 1]) * h * w
        lo, hi = math.log(_ERASE_RATIO[0]), math.log(_ERASE_RATIO[1])
        log_ratio = lo + (hi - lo) * u[:, 2]
        eh = (area * log_ratio.exp()).sqrt().round().clamp(1, h)  # (B,) rectangle height
        ew = (area / log_ratio.exp()).sqrt().round().clamp(1, w)
        top = ((h - eh + 1) * u[:, 3]).floor().clamp(max=h - 1)
        left = ((w - ew + 1) * u[:, 4]).floor().clamp(max=w - 1)
        device = images.device
        rows = torch.arange(h).view(1, h)
        cols = torch.arange(w).view(1, w)
        inside_rows = (rows >= top[:, None]) & (rows < (top + eh)[:, None])  # (B, H)
        inside_cols = (cols >= left[:, None]) & (cols < (left + ew)[:, None])  # (B, W)
        mask = (u[:, 0] < self.erase_prob).view(b, 1, 1) & inside_rows[:, :, None] & \
            inside_cols[:, None, :]  # (B, H, W)
        mean = torch.tensor([round(255 * m) for m in CLIP_MEAN], dtype=torch.uint8)
        mask, mean = mask.to(device), mean.to(device)
        return torch.where(mask[:, None], mean.view(1, 3, 1, 1), images)

    def strong(self, images: torch.Tensor, zoom: tuple[float, float] = (0.8, 1.25),
               hue_degrees: float = 8.0, saturation: tuple[float, float] = (0.85, 1.1),
               gain: float = 0.06, brightness: float = 0.15, noise: float = 4.0) -> torch.Tensor:
        """A stronger view of (B, 3, H, W) uint8 images (usually ``self(images)``), same shape.

        Per image: horizontal and vertical zoom factors drawn independently from ``zoom``
        (bilinear resampling, border pixels repeated), a hue rotation about the gray axis
        within +-``hue_degrees``, saturation scaled in ``saturation``, each channel's gain in
        1 +- ``gain``, brightness in 1 +- ``brightness`` and Gaussian pixel noise with a std
        drawn in [0, ``noise``] (0..255 units). Draws come from this object's generator.
        """
        if images.dim() != 4 or images.dtype != torch.uint8:
            raise ValueError(f"TrainAugment.strong expects (B, 3, H, W) uint8, got "
                             f"{tuple(images.shape)} {images.dtype}")
        b, device = images.shape[0], images.device
        g = self.generator
        u = torch.rand(b, 8, generator=g)  # (B, 8) uniforms, one column per factor
        log_lo, log_hi = math.log(zoom[0]), math.log(zoom[1])
        scale = (log_lo + (log_hi - log_lo) * u[:, :2]).exp()  # (B, 2) x, y zoom
        hue = (2 * u[:, 2] - 1) * math.radians(hue_degrees)
        sat = saturation[0] + (saturation[1] - saturation[0]) * u[:, 3]
        gains = 1 + (2 * u[:, 4:7] - 1) * gain  # (B, 3)
        gains = gains * (1 + (2 * u[:, 7:8] - 1) * brightness)
        noise_std = torch.rand(b, generator=g) * noise
        noise_draw = torch.randn(images.shape, generator=g)
        colour = gains[:, :, None] * _hue_saturation_matrix(hue, sat)  # (B, 3, 3)

        theta = torch.zeros(b, 2, 3)
        theta[:, 0, 0], theta[:, 1, 1] = 1 / scale[:, 0], 1 / scale[:, 1]
        x = images.float()
        grid = F.affine_grid(theta.to(device), list(x.shape), align_corners=False)
        x = F.grid_sample(x, grid, mode="bilinear", padding_mode="border", align_corners=False)
        x = torch.einsum("bij,bjhw->bihw", colour.to(device), x)
        x = x + noise_std.to(device).view(b, 1, 1, 1) * noise_draw.to(device)
        return x.round_().clamp_(0, 255).to(torch.uint8)

    def state_dict(self) -> dict[str, torch.Tensor]:
        """Generator state, so a resumed run continues the same augmentation stream."""
        return {"generator": self.generator.get_state()}

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        self.generator.set_state(state["generator"])


def _hue_saturation_matrix(hue: torch.Tensor, saturation: torch.Tensor) -> torch.Tensor:
    """(B,) hue rotations (radians) and saturation factors -> (B, 3, 3) RGB matrices: rotation
    about the gray axis (brightness kept), then scaling of the chroma about the gray level."""
    gray = torch.full((3, 3), 1 / 3)
    cross = torch.tensor([[0.0, -1.0, 1.0], [1.0, 0.0, -1.0], [-1.0, 1.0, 0.0]]) / math.sqrt(3)
    cos, sin = hue.cos().view(-1, 1, 1), hue.sin().view(-1, 1, 1)
    rotation = cos * torch.eye(3) + sin * cross + (1 - cos) * gray  # Rodrigues about (1,1,1)
    chroma = saturation.view(-1, 1, 1) * (torch.eye(3) - gray) + gray
    return chroma @ rotation
