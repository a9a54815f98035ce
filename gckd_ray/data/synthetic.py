"""SynthPEDES: the embedded default dataset, written in the three published annotation formats.

A seeded generator of people (gender, hair, garments and their colours, bag, hat) rendered as
small RGB images and described by template captions, in three domains that differ the way the
real datasets do: camera aspect, illumination and colour cast, background, blur and noise
(images); sentence structure, synonyms and how many attributes a caption mentions (text).
Every number that sets the size of that domain gap lives in `DOMAIN_STYLES`; the caption
templates and synonym lexicons in `CAPTION_STYLES`.

``synth-cuhk`` is written as CUHK-PEDES, ``synth-icfg`` as ICFG-PEDES and ``synth-rstp`` as
RSTPReid, so every run goes through the real readers in `gckd_ray.data.formats`.
`ensure_synthetic` keeps one complete generation per (version, seed, scale, styles) in a cache.

    python -m gckd_ray.data.synthetic --out DIR --seed N [--scale S]
"""

from __future__ import annotations

import argparse
import hashlib
import json
import logging
import os
import re
import shutil
import tempfile
import time
import zlib
from dataclasses import dataclass, field
from pathlib import Path
from types import MappingProxyType
from typing import Mapping, Sequence

import numpy as np
from PIL import Image

from gckd_ray.data.formats import FORMATS, IMAGE_DIR

# Bump when the generator's output changes for the same seed, scale and styles.
GENERATOR_VERSION = 4
MANIFEST = "synthpedes.json"
SPLITS = ("train", "val", "test")

Colour = tuple[int, int, int]


@dataclass(frozen=True)
class DomainStyle:
    """Everything that makes one SynthPEDES domain look and read the way it does."""

    fmt: str                                  # published format written: see formats.FORMATS
    ids: tuple[tuple[str, int], ...]          # (split, identities) at scale 1
    images_per_id: int
    captions_per_image: int
    height: int                               # canvas, pixels
    width: int
    figure_height: tuple[float, float]        # person height / canvas height, range per image
    gain: float                               # illumination multiplier
    colour_cast: tuple[float, float, float]   # per-channel RGB multipliers
    hue_shift: float                          # degrees of hue rotation (palette shift)
    saturation: float                         # 1 = unchanged, 0 = gray
    brightness_jitter: float                  # per-image brightness factor in 1 +- this
    background: str                           # "plain" | "clutter" | "gradient"
    blur_sigma: float                         # gaussian blur, pixels
    noise_std: float                          # pixel noise std, 0..255 units
    caption_style: str                        # key of CAPTION_STYLES
    synonym_prob: float                       # P(canonical word -> domain synonym)
    mention_prob: float                       # P(an attribute is mentioned); >= 3 always are


# The domain-gap table: tune the gap strength by editing these numbers.
DOMAIN_STYLES: Mapping[str, DomainStyle] = MappingProxyType({
    "synth-cuhk": DomainStyle(
        fmt="cuhk-pedes", ids=(("train", 2000), ("val", 100), ("test", 200)),
        images_per_id=2, captions_per_image=2, height=80, width=40,
        figure_height=(0.80, 0.95), gain=1.0, colour_cast=(1.0, 1.0, 1.0), hue_shift=0.0,
        saturation=1.0, brightness_jitter=0.08, background="plain", blur_sigma=0.4,
        noise_std=2.0, caption_style="cuhk", synonym_prob=0.0, mention_prob=0.7),
    "synth-icfg": DomainStyle(
        fmt="icfg-pedes", ids=(("train", 2000), ("test", 200)),
        images_per_id=2, captions_per_image=1, height=96, width=36,
        figure_height=(0.88, 0.98), gain=0.9, colour_cast=(1.03, 1.0, 0.95), hue_shift=5.0,
        saturation=0.92, brightness_jitter=0.12, background="clutter", blur_sigma=0.5,
        noise_std=4.0, caption_style="icfg", synonym_prob=0.25, mention_prob=0.8),
    "synth-rstp": DomainStyle(
        fmt="rstpreid", ids=(("train", 1000), ("val", 50), ("test", 100)),
        images_per_id=2, captions_per_image=2, height=72, width=40,
        figure_height=(0.75, 0.92), gain=1.05, colour_cast=(0.94, 0.99, 1.06), hue_shift=-8.0,
        saturation=0.9, brightness_jitter=0.1, background="gradient", blur_sigma=0.5,
        noise_std=3.0, caption_style="rstp", synonym_prob=0.25, mention_prob=0.6),
})

# ---------------------------------------------------------------- attributes and palettes

COLOURS: Mapping[str, Colour] = MappingProxyType({
    "black": (30, 30, 32), "white": (232, 232, 228), "red": (196, 32, 38),
    "blue": (38, 70, 190), "green": (46, 140, 60), "yellow": (230, 205, 50),
    "grey": (130, 130, 130), "brown": (118, 78, 42), "pink": (236, 150, 186),
    "purple": (116, 52, 150), "orange": (236, 126, 32),
})
HAIR_COLOURS: Mapping[str, Colour] = MappingProxyType({
    "black": (24, 22, 22), "brown": (96, 60, 30), "blonde": (214, 184, 112),
    "grey": (160, 160, 158),
})
SKIN_TONES: tuple[Colour, ...] = ((236, 202, 174), (214, 168, 130), (170, 118, 82),
                                  (112, 76, 52))
UPPER_TYPES = ("t-shirt", "shirt", "jacket", "coat", "sweater", "dress")
LONG_SLEEVES = frozenset({"shirt", "jacket", "coat", "sweater"})
LOWER_TYPES = ("trousers", "jeans", "shorts", "skirt")
PLURAL_GARMENTS = frozenset({"trousers", "jeans", "shorts"})
BAG_TYPES = ("backpack", "handbag", "shoulder bag")
JEANS_COLOURS = (("blue", "black", "grey", "white"), (0.55, 0.2, 0.15, 0.1))
SHOE_COLOURS = (("black", "white", "brown", "grey", "red", "blue"),
                (0.35, 0.3, 0.12, 0.1, 0.07, 0.06))


@dataclass(frozen=True)
class Person:
    """One identity's attributes; `rgb` holds its (slightly jittered) colour of each part."""

    gender: str                  # "man" | "woman"
    hair: str                    # key of HAIR_COLOURS
    long_hair: bool
    upper: str                   # one of UPPER_TYPES
    upper_colour: str
    lower: str | None            # one of LOWER_TYPES; None under a dress
    lower_colour: str | None
    shoes_colour: str
    bag: str | None              # one of BAG_TYPES or None
    bag_colour: str | None
    hat_colour: str | None       # None: no hat
    rgb: Mapping[str, np.ndarray] = field(compare=False, repr=False)


def sample_person(rng: np.random.Generator) -> Person:
    """Draw one identity from the attribute distribution shared by all domains.

    Args:
        rng: the identity's own generator.

    Returns:
        The person.
    """
    gender = "woman" if rng.random() < 0.5 else "man"
    colours = tuple(COLOURS)
    upper_types = UPPER_TYPES if gender == "woman" else UPPER_TYPES[:-1]
    upper = str(rng.choice(upper_types))
    lower = lower_colour = None
    if upper != "dress":
        lower = str(rng.choice(LOWER_TYPES if gender == "woman" else LOWER_TYPES[:-1]))
        lower_colour = (str(rng.choice(JEANS_COLOURS[0], p=JEANS_COLOURS[1])) if lower == "jeans"
                        else str(rng.choice(colours)))
    bag = rng.choice((None, *BAG_TYPES), p=(0.3, 0.25, 0.2, 0.25))
    person = dict(
        gender=gender, hair=str(rng.choice(tuple(HAIR_COLOURS), p=(0.45, 0.3, 0.15, 0.1))),
        long_hair=bool(rng.random() < (0.7 if gender == "woman" else 0.1)),
        upper=upper, upper_colour=str(rng.choice(colours)), lower=lower,
        lower_colour=lower_colour,
        shoes_colour=str(rng.choice(SHOE_COLOURS[0], p=SHOE_COLOURS[1])),
        bag=None if bag is None else str(bag),
        bag_colour=None if bag is None else str(rng.choice(colours)),
        hat_colour=str(rng.choice(colours)) if rng.random() < 0.2 else None)
    return Person(**person, rgb=MappingProxyType(_person_rgb(person, rng)))


def _person_rgb(person: dict, rng: np.random.Generator) -> dict[str, np.ndarray]:
    """Each part's RGB: the named colour jittered per person, as real garments vary."""
    named = {"upper": person["upper_colour"], "lower": person["lower_colour"],
             "shoes": person["shoes_colour"], "bag": person["bag_colour"],
             "hat": person["hat_colour"], "inner": str(rng.choice(("white", "grey", "black")))}
    rgb = {part: np.clip(np.array(COLOURS[name], np.float32) + rng.uniform(-12, 12, 3), 0, 255)
           for part, name in named.items() if name is not None}
    rgb["hair"] = np.array(HAIR_COLOURS[person["hair"]], np.float32) + rng.uniform(-8, 8, 3)
    rgb["skin"] = np.array(SKIN_TONES[rng.integers(len(SKIN_TONES))], np.float32)
    return rgb


# ---------------------------------------------------------------- captions


@dataclass(frozen=True)
class CaptionStyle:
    """How one domain's annotators write: templates, subjects, vocabulary."""

    # Slots: {Subj} {Pron} {poss} {obj} always filled; {upper} always mentioned; {hair} {lower}
    # {shoes} {bag} {hat} only when mentioned, so they sit in [optional] segments, which are
    # kept only when every slot in them is filled; {worn} lists the mentioned clothing.
    templates: tuple[str, ...]
    subjects: tuple[str, ...]                     # "{g}" is the gender word
    synonyms: Mapping[str, tuple[str, ...]]       # canonical word -> domain words
    pair: str                                     # prefix of plural garments and shoes
    last_join: str                                # joins the last of 3+ listed items


CAPTION_STYLES: Mapping[str, CaptionStyle] = MappingProxyType({
    "cuhk": CaptionStyle(
        templates=(
            "{Subj}[ with {hair}] is wearing {worn}.[ {Pron} is carrying {bag}.]",
            "{Subj} wears {worn}.[ {Pron} has {hair}.][ {Pron} carries {bag}.]",
            "{Subj}[ with {hair}] walks and wears {worn}.[ {Pron} has {bag}.]",
            "{Subj}[ carrying {bag}] is wearing {worn}.[ {Pron} has {hair}.]",
        ),
        subjects=("A {g}", "The {g}", "This {g}"), synonyms=MappingProxyType({}),
        pair="", last_join=" and "),
    "icfg": CaptionStyle(
        templates=(
            "{Subj}[ has {hair} and] wears {upper}[ with {lower}][ and {shoes}]."
            "[ {Pron} has {hat} on {poss} head.][ {Pron} is carrying {bag}.]",
            "{Subj} is dressed in {upper}[ over {lower}][ and {shoes}].[ {Pron} has {hair}.]"
            "[ On {poss} head is {hat}.][ {Pron} has {bag} with {obj}.]",
            "{Subj}[ with {hair}][ in {hat}] is wearing {upper}[ and {lower}]."
            "[ {Pron} also wears {shoes}.][ {Pron} carries {bag}.]",
        ),
        subjects=("The {g}", "A {g}"),
        synonyms=MappingProxyType({
            "man": ("gentleman", "guy"), "woman": ("lady", "young woman"),
            "black": ("dark", "jet"), "white": ("ivory", "snowy"), "red": ("crimson", "scarlet"),
            "blue": ("navy", "azure"), "green": ("olive", "emerald"),
            "yellow": ("golden", "mustard"), "grey": ("gray", "silver"),
            "brown": ("tan", "chocolate"), "pink": ("rose", "salmon"),
            "purple": ("violet", "lilac"), "orange": ("amber", "tangerine"),
            "blonde": ("fair", "flaxen"),
            "t-shirt": ("short-sleeved shirt", "tee"), "shirt": ("button-up shirt", "blouse"),
            "jacket": ("windbreaker", "blazer"), "coat": ("overcoat", "trench coat"),
            "sweater": ("jumper", "pullover"), "dress": ("gown", "frock"),
            "trousers": ("pants", "slacks"), "jeans": ("denims", "denim pants"),
            "shorts": ("bermudas", "short pants"), "skirt": ("miniskirt", "pleated skirt"),
            "shoes": ("sneakers", "boots"), "backpack": ("rucksack", "knapsack"),
            "handbag": ("purse", "tote"), "shoulder bag": ("messenger bag", "satchel"),
            "hat": ("cap", "beanie"),
        }),
        pair="", last_join=" and "),
    "rstp": CaptionStyle(
        templates=(
            "{Subj} is wearing {worn}.[ {Pron} has {hair}.][ {Pron} is carrying {bag}.]",
            "{Subj} walking on the street wears {worn}.[ {Pron} carries {bag}.]"
            "[ {Pron} has {hair}.]",
            "{Subj}[ with {bag}] is walking. {Pron} is wearing {worn}.[ {Pron} has {hair}.]",
            "{Subj} in {upper}[ and {lower}] is walking forward.[ {Pron} wears {shoes}.]"
            "[ {Pron} wears {hat}.][ {Pron} has {hair}.][ {Pron} carries {bag}.]",
        ),
        subjects=("The {g}", "A {g}", "This {g}"),
        synonyms=MappingProxyType({
            "man": ("male", "boy"), "woman": ("female", "girl"),
            "black": ("ebony", "charcoal"), "white": ("pale", "milky"),
            "red": ("ruby", "cherry"), "blue": ("cobalt", "sapphire"),
            "green": ("lime", "jade"), "yellow": ("lemon", "canary"),
            "grey": ("ash", "slate"), "brown": ("coffee", "khaki"),
            "pink": ("magenta", "blush"), "purple": ("plum", "mauve"),
            "orange": ("coral", "peach"), "blonde": ("sandy", "straw"),
            "t-shirt": ("tee shirt", "top"), "shirt": ("collared shirt", "polo shirt"),
            "jacket": ("anorak", "parka"), "coat": ("long coat", "raincoat"),
            "sweater": ("cardigan", "hoodie"), "dress": ("sundress", "long dress"),
            "trousers": ("long pants", "chinos"), "jeans": ("jean pants", "denim trousers"),
            "shorts": ("hot pants", "cut-offs"), "skirt": ("midi skirt", "short skirt"),
            "shoes": ("trainers", "loafers"), "backpack": ("school bag", "daypack"),
            "handbag": ("clutch", "hand purse"), "shoulder bag": ("crossbody bag", "sling bag"),
            "hat": ("baseball cap", "bucket hat"),
        }),
        pair="a pair of ", last_join=", and "),
})

_OPTIONAL = re.compile(r"\[([^\[\]]*)\]")
_SLOT = re.compile(r"\{(\w+)\}")
_TOKEN = re.compile(r"[a-z0-9]+(?:-[a-z0-9]+)*")
ATTRIBUTES = ("hair", "upper", "lower", "shoes", "bag", "hat")
WORN = ("upper", "lower", "shoes", "hat")


def caption(person: Person, style: DomainStyle, rng: np.random.Generator) -> str:
    """One caption of a person in a domain's style.

    Args:
        person: who is described.
        style: the domain (its caption style, synonym and mention probabilities).
        rng: generator for template, mentions and synonyms.

    Returns:
        The caption, e.g. "A man with short black hair is wearing a red t-shirt and blue
        jeans. He is carrying a black backpack."
    """
    cap = CAPTION_STYLES[style.caption_style]
    mentioned = _mentions(person, style.mention_prob, rng)
    slots = {attr: _phrase(attr, person, style, cap, rng) for attr in mentioned}
    slots["worn"] = _join([slots[attr] for attr in WORN if attr in slots], cap.last_join)
    he = person.gender == "man"
    subject = str(rng.choice(cap.subjects)).format(g=_word(person.gender, style, cap, rng))
    slots.update(Subj=subject, Pron="He" if he else "She", poss="his" if he else "her",
                 obj="him" if he else "her")
    return fill_template(str(rng.choice(cap.templates)), slots)


def fill_template(template: str, slots: Mapping[str, str]) -> str:
    """Fill a caption template: keep an [optional] segment only when all its slots are filled.

    Args:
        template: text with {slot}s and [optional] segments (not nested).
        slots: slot name -> phrase.

    Returns:
        The caption text.
    """
    def keep(match: re.Match) -> str:
        segment = match.group(1)
        return segment if all(s in slots for s in _SLOT.findall(segment)) else ""
    return _SLOT.sub(lambda m: slots[m.group(1)], _OPTIONAL.sub(keep, template))


def tokens(text: str) -> list[str]:
    """Lowercase word tokens, as in the ``processed_tokens`` of the published files."""
    return _TOKEN.findall(text.lower())


def _join(items: list[str], last_join: str) -> str:
    """Join phrases as: a | a and b | a, b<last_join>c."""
    if len(items) < 3:
        return " and ".join(items)
    return ", ".join(items[:-1]) + last_join + items[-1]


def _mentions(person: Person, prob: float, rng: np.random.Generator) -> list[str]:
    """Attributes a caption mentions: the upper garment always, others with `prob`, >= 3."""
    present = [a for a in ATTRIBUTES if a != "upper" and _has(person, a)]
    chosen = [a for a in present if rng.random() < prob]
    rest = [a for a in present if a not in chosen]
    extra = max(0, 2 - len(chosen))
    chosen += [rest[i] for i in rng.permutation(len(rest))[:extra]]
    return ["upper", *chosen]


def _has(person: Person, attr: str) -> bool:
    return {"lower": person.lower, "bag": person.bag, "hat": person.hat_colour}.get(attr, True) \
        is not None


def _phrase(attr: str, p: Person, style: DomainStyle, cap: CaptionStyle,
            rng: np.random.Generator) -> str:
    """The noun phrase for one attribute, with articles and the domain's words."""
    def w(canonical: str) -> str:
        return _word(canonical, style, cap, rng)
    if attr == "hair":
        return f"{'long' if p.long_hair else 'short'} {w(p.hair)} hair"
    if attr == "upper":
        return _article(f"{w(p.upper_colour)} {w(p.upper)}")
    if attr == "lower" and p.lower in PLURAL_GARMENTS:
        return f"{cap.pair}{w(p.lower_colour)} {w(p.lower)}"
    if attr == "lower":
        return _article(f"{w(p.lower_colour)} {w(p.lower)}")
    if attr == "shoes":
        return f"{cap.pair}{w(p.shoes_colour)} {w('shoes')}"
    if attr == "bag":
        return _article(f"{w(p.bag_colour)} {w(p.bag)}")
    return _article(f"{w(p.hat_colour)} {w('hat')}")


def _word(canonical: str, style: DomainStyle, cap: CaptionStyle,
          rng: np.random.Generator) -> str:
    """The canonical word, or one of the domain's synonyms with probability synonym_prob."""
    choices = cap.synonyms.get(canonical, ())
    if choices and rng.random() < style.synonym_prob:
        return str(rng.choice(choices))
    return canonical


def _article(phrase: str) -> str:
    return ("an " if phrase[0] in "aeiou" else "a ") + phrase


# ---------------------------------------------------------------- rendering


@dataclass(frozen=True)
class Pose:
    """Per-image figure placement, in supersampled canvas pixels."""

    top: float          # row of the top of the head
    height: float       # figure height
    centre: float       # column of the body's axis
    unit: float         # horizontal unit: the figure spans about +-0.46 units
    stride: float       # -1..1, leg and arm swing
    back: bool          # seen from behind
    side: int           # +1 / -1: mirrors the figure (which side the bag hangs on)
    brightness: float   # per-image brightness factor


SUPERSAMPLE = 2  # render at 2x and average down, so edges are anti-aliased


def render(person: Person, style: DomainStyle, rng: np.random.Generator) -> np.ndarray:
    """Render one image of a person in a domain's style.

    Args:
        person: who is drawn.
        style: the domain (canvas, background, photometrics).
        rng: the image's generator (pose, background, noise).

    Returns:
        (H, W, 3) uint8 RGB.
    """
    h, w = style.height * SUPERSAMPLE, style.width * SUPERSAMPLE
    pose = _sample_pose(style, rng, h, w)
    canvas = _background(style.background, rng, h, w)
    _draw_person(_Figure(canvas, pose), person)
    small = sum(canvas[i::SUPERSAMPLE, j::SUPERSAMPLE] for i in range(SUPERSAMPLE)
                for j in range(SUPERSAMPLE)) / SUPERSAMPLE ** 2
    return _photometric(small, style, pose.brightness, rng)


def _sample_pose(style: DomainStyle, rng: np.random.Generator, h: int, w: int) -> Pose:
    height = rng.uniform(*style.figure_height) * h
    top = h - height - rng.uniform(0.0, 0.04) * h
    return Pose(top=top, height=height, centre=w / 2 + rng.uniform(-0.08, 0.08) * w,
                unit=min(0.46 * height, 0.95 * w / 0.92), stride=rng.uniform(-1, 1),
                back=bool(rng.random() < 0.5), side=1 if rng.random() < 0.5 else -1,
                brightness=1 + rng.uniform(-1, 1) * style.brightness_jitter)


def _background(kind: str, rng: np.random.Generator, h: int, w: int) -> np.ndarray:
    """(h, w, 3) float32 background: plain light, cluttered rectangles, or a sky/road gradient."""
    if kind == "plain":
        base = 226 + rng.uniform(-8, 12) + rng.uniform(-5, 5, 3)
        canvas = np.broadcast_to(base, (h, w, 3)).astype(np.float32)
        canvas[int(0.85 * h):] *= 0.93  # floor
        return canvas
    if kind == "clutter":
        base = rng.uniform(150, 205) + rng.uniform(-10, 10, 3)
        canvas = np.broadcast_to(base, (h, w, 3)).astype(np.float32)
        for _ in range(int(rng.integers(8, 15))):
            y0, x0 = rng.uniform(0, h), rng.uniform(0, w)
            y1, x1 = y0 + rng.uniform(0.1, 0.5) * h, x0 + rng.uniform(0.1, 0.6) * w
            # Street clutter: low-contrast, mostly luminance. Saturated or high-contrast patches
            # read as garments and leave a from-scratch source model near chance on the target
            # (measured: R1 4.5 with the colour shift removed), far from real direct transfer.
            colour = base + rng.uniform(-22, 22) + 0.15 * rng.uniform(-60, 60, 3)
            _quad(canvas, y0, y1, x0, x1, x0, x1, colour)
        return canvas
    if kind == "gradient":
        sky = rng.uniform(165, 235, 3) * np.array([0.95, 0.98, 1.05])
        road = rng.uniform(70, 125) + rng.uniform(-8, 8, 3)
        t = np.clip((np.arange(h, dtype=np.float32) / h - rng.uniform(0.3, 0.6)) * 2.5, 0, 1)
        column = (1 - t)[:, None] * sky + t[:, None] * road
        return np.broadcast_to(column[:, None, :], (h, w, 3)).astype(np.float32)
    raise ValueError(f"unknown background kind {kind!r}")


@dataclass(frozen=True)
class _Figure:
    """Draws in figure coordinates: y in figure heights from the top of the head, x in
    horizontal units from the body's axis (mirrored when pose.side is -1)."""

    canvas: np.ndarray
    pose: Pose

    def x(self, f: float) -> float:
        return self.pose.centre + self.pose.side * f * self.pose.unit

    def y(self, f: float) -> float:
        return self.pose.top + f * self.pose.height

    def quad(self, y0: float, y1: float, top: tuple[float, float],
             bottom: tuple[float, float], colour: np.ndarray) -> None:
        """Fill rows y0..y1 between x-extents `top` (at y0) and `bottom` (at y1)."""
        _quad(self.canvas, self.y(y0), self.y(y1), self.x(top[0]), self.x(top[1]),
              self.x(bottom[0]), self.x(bottom[1]), colour)

    def ellipse(self, cy: float, ry: float, rx: float, colour: np.ndarray | None,
                shade: float = 1.0) -> None:
        """An ellipse centred on the axis at height cy (radii in heights and units)."""
        _ellipse(self.canvas, self.y(cy), self.pose.centre, ry * self.pose.height,
                 rx * self.pose.unit, colour, shade)


def _draw_person(fig: _Figure, p: Person) -> None:
    """Draw the figure back to front: shadow, long hair, legs, body, head, bag."""
    back = fig.pose.back
    fig.ellipse(0.975, 0.025, 0.45, None, 0.7)  # shadow on the ground
    if p.long_hair and not back:
        fig.quad(0.06, 0.30, (-0.17, 0.17), (-0.19, 0.19), p.rgb["hair"])
    _draw_legs(fig, p)
    _draw_upper(fig, p)
    if p.long_hair and back:
        fig.quad(0.06, 0.30, (-0.17, 0.17), (-0.19, 0.19), p.rgb["hair"])
    _draw_head(fig, p)
    if p.bag is not None:
        _draw_bag(fig, p)


def _leg(side: float, stride: float, y0: float, y1: float, widen: float = 0.0
         ) -> tuple[float, float, tuple[float, float], tuple[float, float]]:
    """One leg's quad between heights y0 and y1 (hip 0.50, ankle 0.93); side -1 left, +1 right."""
    swing = 0.10 * stride * side

    def edges(y: float) -> tuple[float, float]:
        t = (y - 0.50) / 0.43
        inner, outer = 0.02 + 0.02 * t, 0.19 - 0.03 * t
        return (side * inner + swing * t - widen * side * 0.3,
                side * outer + swing * t + widen * side)
    return y0, y1, edges(y0), edges(y1)


def _draw_legs(fig: _Figure, p: Person) -> None:
    """Bare legs, then trousers/jeans/shorts or a skirt over them, then shoes."""
    rgb, stride = p.rgb, fig.pose.stride
    for side in (-1.0, 1.0):
        fig.quad(*_leg(side, stride, 0.50, 0.93), rgb["skin"])
    if p.lower in PLURAL_GARMENTS:
        bottom = 0.66 if p.lower == "shorts" else 0.925
        fig.quad(0.47, 0.55, (-0.21, 0.21), (-0.21, 0.21), rgb["lower"])
        for side in (-1.0, 1.0):
            fig.quad(*_leg(side, stride, 0.50, bottom, 0.02), rgb["lower"])
            if p.lower == "jeans":  # seam: jeans read as textured, trousers as flat
                y0, y1, (a, b), (c, d) = _leg(side, stride, 0.55, 0.92)
                mid0, mid1 = (a + b) / 2, (c + d) / 2
                fig.quad(y0, y1, (mid0 - 0.015, mid0 + 0.015), (mid1 - 0.015, mid1 + 0.015),
                         rgb["lower"] * 0.75 + 30)
    elif p.lower == "skirt":
        fig.quad(0.47, 0.71, (-0.22, 0.22), (-0.31, 0.31), rgb["lower"])
    for side in (-1.0, 1.0):
        *_, (a, b) = _leg(side, stride, 0.90, 0.93)
        fig.quad(0.92, 0.985, (a - 0.03, b + 0.03), (a - 0.04, b + 0.04), rgb["shoes"])


def _draw_upper(fig: _Figure, p: Person) -> None:
    """Neck, arms with sleeves by garment type, torso, and the garment's length and details."""
    rgb, swing = p.rgb, 0.04 * fig.pose.stride
    garment = rgb["upper"]
    fig.quad(0.12, 0.17, (-0.06, 0.06), (-0.06, 0.06), rgb["skin"])  # neck
    sleeve_end = 0.46 if p.upper in LONG_SLEEVES else 0.27 if p.upper == "t-shirt" else 0.0
    for side in (-1.0, 1.0):
        top = (side * 0.25, side * 0.37)
        bottom = (side * (0.28 - swing), side * (0.39 - swing))
        fig.quad(0.17, 0.51, top, bottom, rgb["skin"])
        if sleeve_end:  # a dress is sleeveless
            t = (sleeve_end - 0.17) / 0.34
            cuff = (top[0] + t * (bottom[0] - top[0]), top[1] + t * (bottom[1] - top[1]))
            fig.quad(0.17, sleeve_end, top, cuff, garment)
    fig.quad(0.16, 0.51, (-0.27, 0.27), (-0.21, 0.21), garment)
    if p.upper == "coat":
        fig.quad(0.50, 0.75, (-0.23, 0.23), (-0.27, 0.27), garment)
    elif p.upper == "dress":
        fig.quad(0.50, 0.77, (-0.21, 0.21), (-0.33, 0.33), garment)
    elif p.upper == "sweater":  # ribbed hem
        fig.quad(0.46, 0.51, (-0.22, 0.22), (-0.21, 0.21), garment * 0.72)
    if fig.pose.back:
        return
    if p.upper == "jacket":  # open front shows the shirt underneath
        fig.quad(0.17, 0.51, (-0.05, 0.05), (-0.045, 0.045), rgb["inner"])
    elif p.upper == "shirt":  # light collar and button placket
        fig.quad(0.16, 0.20, (-0.10, 0.10), (-0.06, 0.06), garment * 0.5 + 120)
        fig.quad(0.20, 0.51, (-0.012, 0.012), (-0.012, 0.012), garment * 0.6)
    elif p.upper == "coat":
        fig.quad(0.18, 0.75, (-0.012, 0.012), (-0.012, 0.012), garment * 0.6)


def _draw_head(fig: _Figure, p: Person) -> None:
    """Hair (all of the head from behind), face with eyes from the front, hat."""
    fig.ellipse(0.072, 0.074, 0.15, p.rgb["hair"])
    if not fig.pose.back:
        fig.ellipse(0.088, 0.060, 0.12, p.rgb["skin"])
        eyes = p.rgb["skin"] * 0.35
        fig.quad(0.078, 0.088, (-0.07, -0.03), (-0.07, -0.03), eyes)
        fig.quad(0.078, 0.088, (0.03, 0.07), (0.03, 0.07), eyes)
    if p.hat_colour is not None:
        fig.quad(-0.005, 0.045, (-0.13, 0.13), (-0.15, 0.15), p.rgb["hat"])
        fig.quad(0.040, 0.062, (-0.20, 0.20), (-0.20, 0.20), p.rgb["hat"] * 0.85)  # brim


def _draw_bag(fig: _Figure, p: Person) -> None:
    """Backpack (body from behind, straps from the front), handbag, or shoulder bag."""
    bag = p.rgb["bag"]
    if p.bag == "backpack" and fig.pose.back:
        fig.quad(0.19, 0.46, (-0.19, 0.19), (-0.20, 0.20), bag)
        fig.quad(0.19, 0.25, (-0.19, 0.19), (-0.20, 0.20), bag * 0.75)  # flap
    elif p.bag == "backpack":
        for side in (-1.0, 1.0):
            fig.quad(0.16, 0.40, (side * 0.14, side * 0.20), (side * 0.13, side * 0.19), bag)
    elif p.bag == "handbag":
        fig.quad(0.46, 0.50, (0.35, 0.41), (0.35, 0.41), bag * 0.7)  # handle
        fig.quad(0.49, 0.61, (0.30, 0.46), (0.29, 0.47), bag)
    else:  # shoulder bag: strap across the body, bag at the hip
        fig.quad(0.16, 0.50, (-0.22, -0.15), (0.20, 0.27), bag * 0.85)
        fig.quad(0.45, 0.59, (0.22, 0.41), (0.22, 0.42), bag)


def _quad(canvas: np.ndarray, y0: float, y1: float, a0: float, b0: float, a1: float, b1: float,
          colour: np.ndarray) -> None:
    """Fill the region between rows y0..y1 whose x-extent runs linearly from (a0,b0) to (a1,b1)."""
    h, w = canvas.shape[:2]
    r0, r1 = max(int(round(y0)), 0), min(int(round(y1)), h)
    if r1 <= r0:
        return
    if a0 == a1 and b0 == b1:  # rectangle: a slice (pixel centres inside, as below)
        c0, c1 = sorted((int(np.ceil(a0 - 0.5)), int(np.ceil(b0 - 0.5))))
        canvas[r0:r1, max(c0, 0):max(min(c1, w), 0)] = colour
        return
    c0 = max(int(min(a0, a1, b0, b1)), 0)
    c1 = min(int(max(a0, a1, b0, b1)) + 1, w)
    if c1 <= c0:
        return
    t = (np.arange(r0, r1) + 0.5 - y0) / max(y1 - y0, 1e-6)
    ea, eb = a0 + t * (a1 - a0), b0 + t * (b1 - b0)
    left, right = np.minimum(ea, eb), np.maximum(ea, eb)
    cols = np.arange(c0, c1) + 0.5
    mask = (cols >= left[:, None]) & (cols < right[:, None])
    canvas[r0:r1, c0:c1][mask] = colour


def _ellipse(canvas: np.ndarray, cy: float, cx: float, ry: float, rx: float,
             colour: np.ndarray | None, shade: float = 1.0) -> None:
    """Fill an ellipse with `colour`, or (colour None) multiply what is there by `shade`."""
    h, w = canvas.shape[:2]
    r0, r1 = max(int(cy - ry), 0), min(int(cy + ry) + 1, h)
    c0, c1 = max(int(cx - rx), 0), min(int(cx + rx) + 1, w)
    if r1 <= r0 or c1 <= c0:
        return
    ys = (np.arange(r0, r1) + 0.5 - cy)[:, None] / ry
    xs = (np.arange(c0, c1) + 0.5 - cx)[None, :] / rx
    mask = ys ** 2 + xs ** 2 <= 1.0
    region = canvas[r0:r1, c0:c1]
    region[mask] = region[mask] * shade if colour is None else colour


def _photometric(image: np.ndarray, style: DomainStyle, brightness: float,
                 rng: np.random.Generator) -> np.ndarray:
    """Camera and light of the domain: colour transform, blur, noise; returns uint8."""
    matrix = style.gain * brightness * (np.diag(style.colour_cast)
                                        @ _saturation_matrix(style.saturation)
                                        @ _hue_matrix(style.hue_shift))
    image = image @ matrix.T.astype(np.float32)
    image = _blur(image, style.blur_sigma)
    image = image + rng.normal(0.0, style.noise_std, image.shape)
    return np.clip(np.rint(image), 0, 255).astype(np.uint8)


def _hue_matrix(degrees: float) -> np.ndarray:
    """Rotation of RGB about the gray axis: a hue shift that keeps brightness."""
    c, s = np.cos(np.radians(degrees)), np.sin(np.radians(degrees))
    k = np.full((3, 3), 1 / 3)
    cross = np.array([[0, -1, 1], [1, 0, -1], [-1, 1, 0]]) / np.sqrt(3)
    return c * np.eye(3) + (1 - c) * k + s * cross


def _saturation_matrix(saturation: float) -> np.ndarray:
    luma = np.array([0.299, 0.587, 0.114])
    return saturation * np.eye(3) + (1 - saturation) * np.tile(luma, (3, 1))


def _blur(image: np.ndarray, sigma: float) -> np.ndarray:
    """Separable gaussian blur with edge padding (scipy is not a dependency)."""
    if sigma <= 0:
        return image
    radius = max(1, int(np.ceil(2.5 * sigma)))
    kernel = np.exp(-0.5 * (np.arange(-radius, radius + 1) / sigma) ** 2)
    kernel = (kernel / kernel.sum()).tolist()  # python floats keep the image float32
    h, w = image.shape[:2]
    padded = np.pad(image, ((radius, radius), (0, 0), (0, 0)), mode="edge")
    image = sum(k * padded[i:i + h] for i, k in enumerate(kernel))
    padded = np.pad(image, ((0, 0), (radius, radius), (0, 0)), mode="edge")
    return sum(k * padded[:, i:i + w] for i, k in enumerate(kernel))


# ---------------------------------------------------------------- writing a domain


def scaled_ids(count: int, scale: float) -> int:
    """Identities of a split at `scale`; at least 2 so every split can be retrieved from."""
    return max(2, int(round(count * scale)))


def _image_path(fmt: str, split: str, pid: int, k: int) -> str:
    """Image path relative to imgs/, laid out like the published dataset."""
    if fmt == "cuhk-pedes":
        return f"CUHK01/{pid:06d}_{k}.png"
    if fmt == "icfg-pedes":
        return f"{split}/{pid:04d}/{pid:04d}_{k}.png"
    return f"{pid:04d}_c{k + 1}_{k}.png"


def _annotation(fmt: str, split: str, pid: int, rel: str, captions: list[str]) -> dict:
    """One record in the published key order of the format."""
    if fmt == "rstpreid":
        return {"id": pid, "img_path": rel, "captions": captions, "split": split}
    return {"split": split, "captions": captions, "file_path": rel,
            "processed_tokens": [tokens(c) for c in captions], "id": pid}


def _image_captions(person: Person, style: DomainStyle, rng: np.random.Generator) -> list[str]:
    """The captions of one image, all different (as different annotators write)."""
    captions: list[str] = []
    for _ in range(20 * style.captions_per_image):
        text = caption(person, style, rng)
        if text not in captions:
            captions.append(text)
        if len(captions) == style.captions_per_image:
            return captions
    raise RuntimeError(f"could not draw {style.captions_per_image} distinct captions")


def write_domain(folder: Path, name: str, style: DomainStyle, seed: int, scale: float
                 ) -> dict[str, dict[str, int]]:
    """Generate one domain into `folder` (annotation JSON + imgs/).

    Every person and image has its own seeded stream (seed, domain, split, person, image),
    so output does not depend on generation order.

    Args:
        folder: the domain folder to create (must not exist).
        name: domain name (part of the random stream).
        style: the domain's style.
        seed: generator seed.
        scale: multiplies the identity counts.

    Returns:
        split -> {"ids", "images", "captions"} counts.
    """
    (folder / IMAGE_DIR).mkdir(parents=True)
    stream = zlib.crc32(name.encode())
    records, counts, pid = [], {}, 0
    for split, n_ids in style.ids:
        split_no = SPLITS.index(split)
        n = scaled_ids(n_ids, scale)
        for i in range(n):
            pid += 1
            person = sample_person(np.random.default_rng([seed, stream, split_no, i, 0]))
            for k in range(style.images_per_id):
                rel = _image_path(style.fmt, split, pid, k)
                rng = np.random.default_rng([seed, stream, split_no, i, 1, k])
                _save_png(render(person, style, rng), folder / IMAGE_DIR / rel)
                text_rng = np.random.default_rng([seed, stream, split_no, i, 2, k])
                records.append(_annotation(style.fmt, split, pid, rel,
                                           _image_captions(person, style, text_rng)))
        images = n * style.images_per_id
        counts[split] = {"ids": n, "images": images,
                         "captions": images * style.captions_per_image}
    (folder / FORMATS[style.fmt].annotation).write_text(json.dumps(records), encoding="utf-8")
    return counts


def _save_png(pixels: np.ndarray, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(pixels, "RGB").save(path, format="PNG")


def style_digest(styles: Mapping[str, DomainStyle] = DOMAIN_STYLES) -> str:
    """Short hash of the style tables, so editing a number invalidates cached generations."""
    text = repr((sorted(styles.items()), sorted(CAPTION_STYLES.items()), COLOURS, HAIR_COLOURS))
    return hashlib.sha256(text.encode()).hexdigest()[:10]


def generate(out_dir: str | Path, seed: int = 0, scale: float = 1.0, progress: bool = False,
             styles: Mapping[str, DomainStyle] | None = None) -> dict[str, Path]:
    """Write every SynthPEDES domain under `out_dir`, each in its published format.

    Args:
        out_dir: parent folder; ``out_dir/<domain>`` must not exist yet.
        seed: generator seed.
        scale: multiplies every split's identity count (tests use e.g. 0.05).
        progress: print one line per domain (counts and seconds).
        styles: domain table to use instead of `DOMAIN_STYLES` (gap-tuning experiments).

    Returns:
        domain name -> domain folder.
    """
    if scale <= 0:
        raise ValueError(f"scale must be > 0, got {scale}")
    styles = DOMAIN_STYLES if styles is None else styles
    out = Path(out_dir)
    for name in styles:
        if (out / name).exists():
            raise FileExistsError(f"{out / name} already exists")
    folders, manifest = {}, {}
    for name, style in styles.items():
        start = time.perf_counter()
        manifest[name] = write_domain(out / name, name, style, seed, scale)
        folders[name] = out / name
        if progress:
            print(f"{name} ({style.fmt}): {_describe(manifest[name])} "
                  f"in {time.perf_counter() - start:.1f} s", flush=True)
    info = {"generator_version": GENERATOR_VERSION, "seed": seed, "scale": scale,
            "styles": style_digest(styles), "domains": manifest}
    (out / MANIFEST).write_text(json.dumps(info, indent=1), encoding="utf-8")
    return folders


def _describe(counts: Mapping[str, Mapping[str, int]]) -> str:
    return ", ".join(f"{split} {c['ids']} ids/{c['images']} images/{c['captions']} captions"
                     for split, c in counts.items())


def ensure_synthetic(cache: str = "", seed: int = 0, scale: float = 1.0) -> Path:
    """The folder holding the three generated domains, generating them once into a cache.

    The folder name holds GENERATOR_VERSION, seed, scale and a digest of the style tables.
    Generation writes into a temporary folder beside it and renames it into place when
    complete, so a half-written generation is never used and two racing processes are safe
    (the loser discards its copy). Leftover temporary folders of crashed runs are ignored.

    Args:
        cache: cache folder; "" means ~/.cache/gckd_ray/synthpedes.
        seed: generator seed.
        scale: multiplies every split's identity count.

    Returns:
        The generation folder (holding synth-cuhk, synth-icfg, synth-rstp).
    """
    base = Path(cache).expanduser() if cache else Path.home() / ".cache" / "gckd_ray" / \
        "synthpedes"
    final = base / f"v{GENERATOR_VERSION}-seed{seed}-scale{scale:g}-{style_digest()}"
    if (final / MANIFEST).is_file():
        return final
    if final.exists():
        raise RuntimeError(f"{final} exists but holds no complete generation (no {MANIFEST}); "
                           f"delete it to regenerate")
    base.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{final.name}.tmp-", dir=base))
    logging.getLogger(__name__).info("generating SynthPEDES (seed %s, scale %g) into %s",
                                     seed, scale, final)
    try:
        os.chmod(tmp, 0o755)  # a cache folder, not a private temp dir
        generate(tmp, seed, scale)
        try:
            os.replace(tmp, final)
        except OSError:
            if not (final / MANIFEST).is_file():
                raise
            shutil.rmtree(tmp)  # another process finished first: use its copy
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return final


def main(argv: Sequence[str] | None = None) -> int:
    """Command line: write DIR/synth-cuhk, DIR/synth-icfg, DIR/synth-rstp."""
    parser = argparse.ArgumentParser(
        prog="python -m gckd_ray.data.synthetic",
        description="Generate SynthPEDES: three person-retrieval domains written in the "
                    "CUHK-PEDES, ICFG-PEDES and RSTPReid annotation formats.")
    parser.add_argument("--out", required=True, help="output folder (gets one folder per domain)")
    parser.add_argument("--seed", type=int, default=0, help="generator seed (default 0)")
    parser.add_argument("--scale", type=float, default=1.0,
                        help="multiplies the identity counts (default 1.0)")
    parser.add_argument("--overwrite", action="store_true",
                        help="replace existing synth-* folders under --out")
    args = parser.parse_args(argv)
    if args.scale <= 0:
        parser.error("--scale must be > 0")
    out = Path(args.out)
    if args.overwrite:
        for name in DOMAIN_STYLES:
            shutil.rmtree(out / name, ignore_errors=True)
    start = time.perf_counter()
    try:
        generate(out, args.seed, args.scale, progress=True)
    except FileExistsError as err:
        parser.exit(2, f"error: {err} (use --overwrite or another --out)\n")
    print(f"SynthPEDES written to {out} in {time.perf_counter() - start:.1f} s", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
