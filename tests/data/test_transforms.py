"""Image transforms: decoding/resizing, normalisation values, seeded batched augmentation."""

from __future__ import annotations

import PIL.Image
import pytest
import torch

from gckd_ray.data.transforms import (
    CLIP_MEAN, CLIP_STD, TrainAugment, eval_transform, normalize, pil_to_uint8)


def _gradient_image(width: int, height: int) -> PIL.Image.Image:
    img = PIL.Image.new("RGB", (width, height))
    img.putdata([(x * 7 % 256, y * 5 % 256, (x + y) % 256)
                 for y in range(height) for x in range(width)])
    return img


def _batch(b: int = 6, h: int = 16, w: int = 8, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, 256, (b, 3, h, w), generator=g, dtype=torch.uint8)


def test_pil_to_uint8_layout_and_bicubic_resize():
    img = _gradient_image(10, 20)
    same = pil_to_uint8(img, (20, 10))
    assert same.shape == (3, 20, 10) and same.dtype == torch.uint8
    assert same[:, 3, 4].tolist() == list(img.getpixel((4, 3)))  # (C, row=y, col=x)

    resized = pil_to_uint8(img, (12, 6))
    reference = img.resize((6, 12), PIL.Image.Resampling.BICUBIC)
    assert resized.shape == (3, 12, 6)
    assert all(resized[:, y, x].tolist() == list(reference.getpixel((x, y)))
               for y in range(12) for x in range(6))


def test_pil_to_uint8_converts_grayscale_and_rgba():
    gray = PIL.Image.new("L", (4, 4), color=100)
    assert pil_to_uint8(gray, (4, 4)).unique().tolist() == [100]
    rgba = PIL.Image.new("RGBA", (4, 4), color=(1, 2, 3, 4))
    assert pil_to_uint8(rgba, (2, 2))[:, 0, 0].tolist() == [1, 2, 3]


def test_normalize_values_dtype_and_shapes():
    batch = torch.tensor([0, 128, 255], dtype=torch.uint8).view(1, 3, 1, 1).repeat(2, 1, 2, 3)
    out = normalize(batch)
    assert out.dtype == torch.float32 and out.shape == (2, 3, 2, 3)
    for c, value in enumerate((0, 128, 255)):
        expected = (value / 255 - CLIP_MEAN[c]) / CLIP_STD[c]
        # float32 output: a scale and a shift in float32, ~1e-7 relative; float32 defaults
        torch.testing.assert_close(out[:, c], torch.full((2, 2, 3), expected))
    torch.testing.assert_close(normalize(batch[0]), out[0])  # (3, H, W) works too
    assert eval_transform(batch).equal(out)
    with pytest.raises(TypeError):
        normalize(batch.float())


def test_augment_shape_dtype_and_seeded_determinism():
    images = _batch()
    out = TrainAugment(seed=3)(images)
    assert out.shape == images.shape and out.dtype == torch.uint8
    assert TrainAugment(seed=3)(images).equal(out)
    assert not TrainAugment(seed=4)(images).equal(out)
    augment = TrainAugment(seed=3)
    first = augment(images)
    assert not augment(images).equal(first)  # the stream advances between calls


def test_augment_flip_only():
    images = _batch()
    assert TrainAugment(padding=0, flip_prob=1.0)(images).equal(images.flip(-1))
    assert TrainAugment(padding=0, flip_prob=0.0)(images).equal(images)
    flips = [TrainAugment(seed=s, padding=0)(images[:1]).equal(images[:1].flip(-1))
             for s in range(40)]
    assert 5 < sum(flips) < 35  # p = 0.5


def test_augment_crop_is_a_window_of_the_zero_padded_image():
    images = _batch(b=8)
    pad = 2
    out = TrainAugment(seed=1, padding=pad, flip_prob=0.0)(images)
    padded = torch.nn.functional.pad(images, (pad, pad, pad, pad))
    offsets = set()
    for b in range(len(images)):
        matches = [(dy, dx) for dy in range(2 * pad + 1) for dx in range(2 * pad + 1)
                   if padded[b, :, dy:dy + 16, dx:dx + 8].equal(out[b])]
        assert matches, f"sample {b} is not a crop of its padded image"
        offsets.add(matches[0])
    assert len(offsets) > 1


def test_augment_default_padding_scales_with_height():
    augment = TrainAugment()
    assert augment.pad_for(384) == 10  # IRRA: Pad(10) at 384x128
    assert augment.pad_for(64) == 2
    assert augment.pad_for(16) == 1


def test_augment_state_dict_resumes_the_stream():
    images = _batch()
    augment = TrainAugment(seed=5)
    augment(images)
    state = augment.state_dict()
    expected = augment(images)
    resumed = TrainAugment(seed=0)
    resumed.load_state_dict(state)
    assert resumed(images).equal(expected)


def test_augment_rejects_float_input():
    with pytest.raises(ValueError):
        TrainAugment()(_batch().float())


def test_strong_view_shape_dtype_determinism_and_strength():
    images = _batch(b=8, h=32, w=16)
    first, again = TrainAugment(seed=4), TrainAugment(seed=4)
    out = first.strong(images)
    assert out.shape == images.shape and out.dtype == torch.uint8
    assert again.strong(images).equal(out)  # same seed, same view
    assert not first.strong(images).equal(out)  # the shared stream advances
    # Every factor at its identity value: zoom 1, no hue, saturation 1, no gain, no noise.
    identity = TrainAugment(seed=4).strong(images, zoom=(1.0, 1.0), hue_degrees=0.0,
                                           saturation=(1.0, 1.0), gain=0.0, brightness=0.0,
                                           noise=0.0)
    assert identity.equal(images)


def test_strong_view_keeps_gray_gray_and_moves_colours_within_bounds():
    gray = torch.full((16, 3, 8, 4), 120, dtype=torch.uint8)
    out = TrainAugment(seed=1).strong(gray, gain=0.0, brightness=0.0, noise=0.0)
    assert out.equal(gray)  # hue rotation and saturation leave the gray axis fixed
    red = torch.tensor([196, 32, 38], dtype=torch.uint8).view(1, 3, 1, 1).repeat(64, 1, 8, 4)
    out = TrainAugment(seed=2).strong(red, zoom=(1.0, 1.0), noise=0.0).float()
    assert (out[:, 0] > out[:, 1] + 100).all()  # still clearly red after the jitter


def test_strong_view_zoom_stretches_horizontally():
    # A centred vertical bar of width 4 in a width-16 image; zoom x in [1.5, 1.5] widens it.
    bar = torch.zeros(1, 3, 8, 16, dtype=torch.uint8)
    bar[..., 6:10] = 255
    out = TrainAugment(seed=0).strong(bar, zoom=(1.5, 1.5), hue_degrees=0.0,
                                      saturation=(1.0, 1.0), gain=0.0, brightness=0.0,
                                      noise=0.0)
    assert int((out[0, 0, 4] > 127).sum()) == 6


def test_strong_view_rejects_float_input():
    with pytest.raises(ValueError, match="uint8"):
        TrainAugment().strong(torch.zeros(1, 3, 4, 4))


def test_random_erasing_sets_one_rectangle_to_the_mean_pixel():
    images = torch.full((400, 3, 24, 12), 7, dtype=torch.uint8)  # no pixel equals the mean
    out = TrainAugment(seed=0, padding=0, flip_prob=0.0, erase_prob=0.5).erase(images)
    mean = torch.tensor([round(255 * m) for m in CLIP_MEAN], dtype=torch.uint8)
    erased = (out == mean.view(1, 3, 1, 1)).all(dim=1)  # (B, H, W)
    hit = erased.flatten(1).any(dim=1)
    assert 0.4 < hit.float().mean() < 0.6  # p = 0.5 over 400 images
    assert torch.equal(out[~hit], images[~hit])  # the others are untouched
    for mask in erased[hit]:  # one axis-aligned rectangle of 2-40% (rounding aside) per image
        rows, cols = mask.any(dim=1).nonzero().flatten(), mask.any(dim=0).nonzero().flatten()
        assert mask.sum() == len(rows) * len(cols)
        assert rows.diff().eq(1).all() and cols.diff().eq(1).all()
        assert 0.01 <= mask.float().mean() <= 0.5


def test_random_erasing_off_keeps_the_augmentation_stream():
    batch = _batch()
    plain = TrainAugment(seed=3)
    zero = TrainAugment(seed=3, erase_prob=0.0)
    assert torch.equal(plain(batch), zero(batch))
    assert torch.equal(plain(batch), zero(batch))  # and the next draws too
    erasing = TrainAugment(seed=3, erase_prob=1.0)
    assert not torch.equal(TrainAugment(seed=3)(batch), erasing(batch))
