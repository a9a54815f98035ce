"""The stand-in's pretraining corpus: a seeded, web-like mix of synthetic images and captions.

This is the "web data" of the CPU stand-in for CLIP (``experiments/pretrain_standin.py``),
deliberately broader than any one person-retrieval domain and not SynthPEDES (its own figure
renderer, scenes, colour vocabulary and caption language):

* **scenes**: one person (full figure, or an upper-body close-up), two people side by side,
  product shots of a single garment, bag or hat, and coloured shapes;
* **pictures**: seven backgrounds (plain, street, brick wall, indoors, park, night, clutter),
  lighting gain and colour temperature, saturation, blur and noise levels, figure scale and
  position, front or back view, walking or standing; each image is drawn on a canvas of its own
  aspect ratio and resized to one of a few sizes (:data:`BUCKETS`, multiples of the patch size),
  so the encoder sees squashed and stretched content as real pipelines produce it;
* **people**: gender and age words, build, hair, eleven upper garments, five lower garments,
  shoes, bags, hats, glasses and scarves; garments solid, striped, plaid or with a logo;
* **colours**: every garment colour is an entry of a real colour-name table (matplotlib's XKCD
  survey names and CSS4 names, :func:`colour_table`); captions name it by its own name, its basic
  colour term (Berlin & Kay's eleven, from the nearest prototype in CIELAB), or another table
  name within a small CIELAB distance, so "crimson", "scarlet" and "red" all meet red pixels;
* **captions**: alt-text, tag lists, multi-sentence descriptions and product titles, with
  synonyms for every noun (:data:`GARMENT_WORDS`, :data:`SUBJECT_WORDS`) and optional scene,
  lighting and image-quality phrases.

Every item has its own generator, ``np.random.default_rng([seed, split, index])``, so the corpus
does not depend on generation order or size. Bump :data:`CORPUS_VERSION` when the output for a
seed changes (it is part of the stand-in's cache key).
"""

from __future__ import annotations

import functools
import re
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Mapping, Sequence

import numpy as np
from PIL import Image

CORPUS_VERSION = 1

# (height, width) of the stored images: multiples of the patch size 8 (and of 16), with 64 the
# pretraining side. Which scenes use which sizes: SCENES.
BUCKETS: tuple[tuple[int, int], ...] = ((64, 32), (64, 40), (64, 48), (64, 64), (48, 64),
                                        (40, 64))
SUPERSAMPLE = 2  # drawn at 2x, then resized down: anti-aliased edges


@dataclass(frozen=True)
class SceneKind:
    weight: float                       # share of the corpus
    buckets: Mapping[tuple[int, int], float]  # output size -> probability


SCENES: Mapping[str, SceneKind] = MappingProxyType({
    "person": SceneKind(0.5, {(64, 32): 0.4, (64, 40): 0.25, (64, 48): 0.2, (64, 64): 0.15}),
    "two_people": SceneKind(0.1, {(64, 64): 0.4, (48, 64): 0.4, (40, 64): 0.2}),
    "product": SceneKind(0.2, {(64, 64): 0.5, (64, 48): 0.3, (48, 64): 0.2}),
    "shapes": SceneKind(0.2, {b: 1 / len(BUCKETS) for b in BUCKETS}),
})

# ---------------------------------------------------------------- colour names

BASIC_PROTOTYPES: Mapping[str, tuple[tuple[int, int, int], ...]] = MappingProxyType({
    "black": ((18, 18, 20),),
    "white": ((246, 246, 246), (250, 244, 228)),
    "grey": ((128, 128, 128), (80, 80, 82), (192, 192, 190)),
    "red": ((200, 30, 30), (135, 12, 20), (220, 20, 60)),
    "pink": ((240, 150, 190), (255, 105, 180), (250, 200, 212)),
    "orange": ((240, 130, 30), (255, 165, 90)),
    "yellow": ((240, 220, 40), (250, 240, 140), (255, 250, 200)),
    "green": ((40, 150, 50), (20, 80, 30), (140, 205, 100), (110, 140, 40), (200, 240, 200)),
    "blue": ((30, 70, 190), (12, 22, 100), (110, 160, 230), (30, 140, 200), (200, 225, 245)),
    "purple": ((120, 50, 150), (70, 20, 90), (180, 130, 210)),
    "brown": ((120, 75, 40), (80, 50, 25), (170, 120, 70)),
})
BASIC_TERMS = tuple(BASIC_PROTOTYPES)
ACHROMATIC = frozenset({"black", "white", "grey"})
# Words dropped from the XKCD survey names (crude, or not colours).
_EXCLUDED_WORDS = frozenset({"shit", "puke", "vomit", "barf", "booger", "poo", "poop", "snot",
                             "diarrhea", "pee", "piss", "ugly", "nasty", "gross", "sick",
                             "bland", "boring", "dirty", "dull"})
# CSS4 names are run together ("darkslateblue"); these split them with the XKCD words.
_CSS_WORDS = ("alice", "antique", "blanched", "almond", "burly", "wood", "cadet", "corn",
              "flower", "silk", "dodger", "fire", "brick", "floral", "ghost", "gainsboro",
              "goldenrod", "honey", "dew", "hot", "indian", "lawn", "lemon", "chiffon", "medium",
              "midnight", "mint", "cream", "misty", "navajo", "old", "lace", "drab", "papaya",
              "whip", "puff", "powder", "rebecca", "rosy", "royal", "saddle", "sandy", "sea",
              "shell", "sky", "slate", "smoke", "spring", "steel", "dim", "light", "dark",
              "deep", "pale", "orchid", "violet", "white", "blue", "green", "yellow")
SYNONYM_DELTA_E = 10.0  # CIELAB distance under which two table names are synonyms
MAX_SYNONYMS = 6


@dataclass(frozen=True)
class ColourName:
    """One entry of a colour-name table."""

    name: str                          # display words, e.g. "dusty rose"
    rgb: tuple[float, float, float]    # 0..255
    basic: str                         # basic colour term, e.g. "pink"
    synonyms: tuple[str, ...]          # other names within SYNONYM_DELTA_E, nearest first


def srgb_to_lab(rgb: np.ndarray) -> np.ndarray:
    """(..., 3) sRGB in 0..255 -> CIELAB (D65)."""
    c = np.asarray(rgb, np.float64) / 255.0
    lin = np.where(c <= 0.04045, c / 12.92, ((c + 0.055) / 1.055) ** 2.4)
    xyz = lin @ np.array([[0.4124, 0.3576, 0.1805], [0.2126, 0.7152, 0.0722],
                          [0.0193, 0.1192, 0.9505]]).T
    xyz = xyz / np.array([0.95047, 1.0, 1.08883])
    f = np.where(xyz > (6 / 29) ** 3, np.cbrt(xyz), xyz / (3 * (6 / 29) ** 2) + 4 / 29)
    return np.stack([116 * f[..., 1] - 16, 500 * (f[..., 0] - f[..., 1]),
                     200 * (f[..., 1] - f[..., 2])], axis=-1)


def _segment(word: str, vocabulary: frozenset[str]) -> str:
    """Split a run-together CSS name into vocabulary words (fewest words), else keep it."""
    best: list[list[str] | None] = [[]] + [None] * len(word)
    for end in range(1, len(word) + 1):
        for start in range(end):
            piece = word[start:end]
            if best[start] is not None and piece in vocabulary and (
                    best[end] is None or len(best[start]) + 1 < len(best[end])):
                best[end] = best[start] + [piece]
    return " ".join(best[-1]) if best[-1] else word


@functools.lru_cache(maxsize=1)
def colour_table() -> tuple[ColourName, ...]:
    """XKCD (minus crude names) and CSS4 colour names with basic terms and synonyms."""
    import matplotlib.colors as mcolors  # only the tables are used

    raw: list[tuple[str, str]] = []
    for key, hexcode in mcolors.XKCD_COLORS.items():
        name = key.removeprefix("xkcd:").replace("/", " ")
        if not set(name.split()) & _EXCLUDED_WORDS:
            raw.append((name, hexcode))
    vocabulary = frozenset(w for name, _ in raw for w in name.split()) | frozenset(_CSS_WORDS)
    for key, hexcode in mcolors.CSS4_COLORS.items():
        raw.append((_segment(key, vocabulary - {key}) if len(key) > 7 else key, hexcode))
    rgb = np.array([mcolors.to_rgb(h) for _, h in raw]) * 255.0
    lab = srgb_to_lab(rgb)
    protos = [(term, p) for term, ps in BASIC_PROTOTYPES.items() for p in ps]
    proto_lab = srgb_to_lab(np.array([p for _, p in protos], np.float64))
    dist2 = ((lab[:, None] - proto_lab[None]) ** 2).sum(-1)  # (names, prototypes)
    # Nearest prototype, but a clearly chromatic colour never gets black/white/grey and a
    # nearly neutral one never gets a hue (teal is not grey, off-white is not yellow).
    chroma = np.hypot(lab[:, 1], lab[:, 2])[:, None]
    neutral = np.array([term in ACHROMATIC for term, _ in protos])[None]
    dist2 = np.where((neutral & (chroma > 12)) | (~neutral & (chroma < 6)), np.inf, dist2)
    basic = [protos[i][0] for i in np.argmin(dist2, axis=1)]
    dist = np.sqrt(((lab[:, None] - lab[None]) ** 2).sum(-1))
    names = [n for n, _ in raw]
    table = []
    for i, name in enumerate(names):
        near = [names[j] for j in np.argsort(dist[i], kind="stable")
                if dist[i, j] < SYNONYM_DELTA_E and names[j] != name]
        synonyms = tuple(dict.fromkeys(near))[:MAX_SYNONYMS]
        table.append(ColourName(name, tuple(float(v) for v in rgb[i]), basic[i], synonyms))
    return tuple(table)


@functools.lru_cache(maxsize=1)
def _by_basic() -> Mapping[str, tuple[ColourName, ...]]:
    return MappingProxyType({term: tuple(c for c in colour_table() if c.basic == term)
                             for term in BASIC_TERMS})


def sample_colour(rng: np.random.Generator) -> ColourName:
    """A basic term uniformly, then one of its table entries: every hue family equally."""
    family = _by_basic()[BASIC_TERMS[rng.integers(len(BASIC_TERMS))]]
    return family[rng.integers(len(family))]


def colour_word(colour: ColourName, rng: np.random.Generator) -> str:
    """How a caption names a colour: its basic term, its own name, or a near synonym."""
    u = rng.random()
    if u < 0.45:
        word = colour.basic
    elif u < 0.8 or not colour.synonyms:
        word = colour.name
    else:
        word = colour.synonyms[rng.integers(len(colour.synonyms))]
    if rng.random() < 0.5:  # both spellings are common
        word = re.sub(r"\bgrey\b", "gray", word) if "grey" in word else \
            re.sub(r"\bgray\b", "grey", word)
    return word


# ---------------------------------------------------------------- people

UPPER = ("t-shirt", "shirt", "blouse", "jacket", "coat", "sweater", "hoodie", "dress",
         "tank top", "suit jacket", "polo shirt")
LONG_SLEEVES = frozenset({"shirt", "blouse", "jacket", "coat", "sweater", "hoodie",
                          "suit jacket"})
WOMEN_ONLY = frozenset({"blouse", "dress", "skirt", "leggings", "handbag"})
LOWER = ("trousers", "jeans", "shorts", "skirt", "leggings")
SHOES = ("shoes", "sneakers", "boots")
BAGS = ("backpack", "handbag", "shoulder bag", "suitcase")
HATS = ("cap", "beanie", "hat")
PATTERNS = ("solid", "striped", "plaid", "logo")
HAIR = {"black": (22, 20, 20), "brown": (92, 58, 30), "blonde": (218, 188, 118),
        "red": (150, 58, 26), "grey": (158, 158, 156), "white": (226, 226, 222)}
SKIN = ((242, 208, 182), (224, 176, 140), (188, 132, 92), (140, 92, 60), (96, 64, 44))
# Every noun with the words captions use for it (first = plain word).
GARMENT_WORDS: Mapping[str, tuple[str, ...]] = MappingProxyType({
    "t-shirt": ("t-shirt", "tee", "tee shirt", "short-sleeved shirt", "top"),
    "shirt": ("shirt", "button-up shirt", "collared shirt", "long-sleeved shirt"),
    "blouse": ("blouse", "shirt", "top"),
    "jacket": ("jacket", "windbreaker", "zip-up jacket", "bomber jacket"),
    "coat": ("coat", "overcoat", "long coat", "trench coat", "parka"),
    "sweater": ("sweater", "jumper", "pullover", "knit sweater", "cardigan"),
    "hoodie": ("hoodie", "hooded sweatshirt", "sweatshirt"),
    "dress": ("dress", "frock", "sundress", "long dress"),
    "tank top": ("tank top", "sleeveless top", "vest top"),
    "suit jacket": ("suit jacket", "blazer", "suit"),
    "polo shirt": ("polo shirt", "polo", "short-sleeved shirt"),
    "trousers": ("trousers", "pants", "slacks", "long pants", "chinos"),
    "jeans": ("jeans", "denim jeans", "denims", "denim pants"),
    "shorts": ("shorts", "short pants", "bermuda shorts"),
    "skirt": ("skirt", "miniskirt", "pleated skirt", "midi skirt"),
    "leggings": ("leggings", "tights", "yoga pants"),
    "shoes": ("shoes", "loafers", "flats"),
    "sneakers": ("sneakers", "trainers", "running shoes", "sports shoes"),
    "boots": ("boots", "ankle boots", "high boots"),
    "backpack": ("backpack", "rucksack", "knapsack", "school bag", "daypack"),
    "handbag": ("handbag", "purse", "tote bag", "hand bag"),
    "shoulder bag": ("shoulder bag", "messenger bag", "satchel", "crossbody bag", "sling bag"),
    "suitcase": ("suitcase", "rolling suitcase", "luggage", "trolley case"),
    "cap": ("cap", "baseball cap", "peaked cap"),
    "beanie": ("beanie", "knit hat", "woolly hat", "winter hat"),
    "hat": ("hat", "sun hat", "wide-brimmed hat", "fedora"),
})
PLURAL = frozenset({"trousers", "jeans", "shorts", "leggings", "shoes", "sneakers", "boots"})
SUBJECT_WORDS: Mapping[tuple[str, str], tuple[str, ...]] = MappingProxyType({
    ("man", "adult"): ("man", "guy", "gentleman", "male", "young man", "adult man", "person",
                       "pedestrian", "fellow"),
    ("woman", "adult"): ("woman", "lady", "female", "young woman", "adult woman", "person",
                         "pedestrian", "girl"),
    ("man", "child"): ("boy", "kid", "child", "little boy", "young boy"),
    ("woman", "child"): ("girl", "kid", "child", "little girl", "young girl"),
    ("man", "old"): ("old man", "elderly man", "older man", "senior", "grandfather"),
    ("woman", "old"): ("old woman", "elderly woman", "older lady", "senior", "grandmother"),
})


@dataclass(frozen=True)
class Garment:
    kind: str                 # key of GARMENT_WORDS
    colour: ColourName
    pattern: str = "solid"    # one of PATTERNS (upper garments only)
    second: ColourName | None = None   # stripe / plaid / logo colour


@dataclass(frozen=True)
class Person:
    gender: str               # "man" | "woman"
    age: str                  # "adult" | "child" | "old"
    build: float              # shoulder width factor
    skin: tuple[int, int, int]
    hair: str                 # key of HAIR
    hair_length: str          # "short" | "long" | "bald"
    upper: Garment
    lower: Garment | None     # None under a dress
    shoes: Garment
    bag: Garment | None
    hat: Garment | None
    glasses: bool
    scarf: Garment | None


def sample_person(rng: np.random.Generator) -> Person:
    """One person: attributes drawn independently (a web corpus has no identities)."""
    gender = "woman" if rng.random() < 0.5 else "man"
    age = str(rng.choice(("adult", "child", "old"), p=(0.8, 0.1, 0.1)))

    def allowed(options):
        return [o for o in options if gender == "woman" or o not in WOMEN_ONLY]

    upper_kind = str(rng.choice(allowed(UPPER)))
    pattern = str(rng.choice(PATTERNS, p=(0.7, 0.13, 0.1, 0.07)))
    upper = Garment(upper_kind, sample_colour(rng), pattern,
                    sample_colour(rng) if pattern != "solid" else None)
    lower = None
    if upper_kind != "dress":
        kind = str(rng.choice(allowed(LOWER)))
        lower = Garment(kind, _denim(rng) if kind == "jeans" else sample_colour(rng))
    hair = ("grey", "white")[rng.integers(2)] if age == "old" and rng.random() < 0.7 else \
        str(rng.choice(("black", "brown", "blonde", "red"), p=(0.45, 0.32, 0.17, 0.06)))
    long_p = 0.75 if gender == "woman" else 0.08
    hair_length = "long" if rng.random() < long_p else (
        "bald" if gender == "man" and age != "child" and rng.random() < 0.08 else "short")
    bag_kind = rng.choice((None, *allowed(BAGS)))
    hat_kind = rng.choice((None, *HATS), p=(0.75, 0.1, 0.08, 0.07))
    return Person(
        gender=gender, age=age, build=float(rng.uniform(0.85, 1.15)),
        skin=SKIN[rng.integers(len(SKIN))], hair=hair, hair_length=hair_length,
        upper=upper, lower=lower, shoes=Garment(str(rng.choice(SHOES)), sample_colour(rng)),
        bag=None if bag_kind is None else Garment(str(bag_kind), sample_colour(rng)),
        hat=None if hat_kind is None else Garment(str(hat_kind), sample_colour(rng)),
        glasses=bool(rng.random() < 0.12),
        scarf=Garment("scarf", sample_colour(rng)) if rng.random() < 0.1 else None)


def _denim(rng: np.random.Generator) -> ColourName:
    """Jeans are mostly blue: a blue entry with probability 0.6."""
    if rng.random() < 0.6:
        family = _by_basic()["blue"]
        return family[rng.integers(len(family))]
    return sample_colour(rng)


# ---------------------------------------------------------------- drawing primitives


@dataclass
class Paint:
    """A fill: solid colour, or stripes / plaid / a chest logo in a second colour."""

    rgb: np.ndarray
    pattern: str = "solid"
    second: np.ndarray | None = None
    period: float = 6.0       # stripe period in canvas pixels

    def colours(self, rows: np.ndarray, cols: np.ndarray) -> np.ndarray:
        """(n, 3) colours of the pixels at (rows, cols)."""
        out = np.broadcast_to(self.rgb, (len(rows), 3)).copy()
        if self.pattern == "striped":
            out[(rows // (self.period / 2)) % 2 == 1] = self.second
        elif self.pattern == "plaid":
            band = ((rows // (self.period / 2)) % 2 == 1) | ((cols // (self.period / 2)) % 2 == 1)
            out[band] = 0.5 * out[band] + 0.5 * self.second
        return out


class Canvas:
    """A float32 (H, W, 3) picture with anti-aliasing-free fills (it is drawn supersampled)."""

    def __init__(self, pixels: np.ndarray):
        self.pixels = pixels
        self.h, self.w = pixels.shape[:2]

    def _fill(self, r0, r1, c0, c1, mask_fn, paint) -> None:
        r0, r1 = max(int(np.floor(r0)), 0), min(int(np.ceil(r1)) + 1, self.h)
        c0, c1 = max(int(np.floor(c0)), 0), min(int(np.ceil(c1)) + 1, self.w)
        if r1 <= r0 or c1 <= c0:
            return
        ys = np.arange(r0, r1, dtype=np.float32)[:, None] + 0.5
        xs = np.arange(c0, c1, dtype=np.float32)[None, :] + 0.5
        mask = mask_fn(ys, xs)
        if not mask.any():
            return
        region = self.pixels[r0:r1, c0:c1]
        if isinstance(paint, Paint):
            rows, cols = np.nonzero(mask)
            region[mask] = paint.colours(rows + r0, cols + c0)
        elif isinstance(paint, float):  # shade what is there
            region[mask] *= paint
        else:
            region[mask] = paint

    def polygon(self, pts: Sequence[tuple[float, float]], paint) -> None:
        """Fill a polygon of (x, y) points (even-odd rule; any simple polygon)."""
        px = np.array([p[0] for p in pts], np.float32)
        py = np.array([p[1] for p in pts], np.float32)

        def inside(ys, xs):
            mask = np.zeros(np.broadcast_shapes(ys.shape, xs.shape), bool)
            for i in range(len(px)):
                x0, y0, x1, y1 = px[i - 1], py[i - 1], px[i], py[i]
                if y0 == y1:
                    continue
                crosses = (y0 > ys) != (y1 > ys)
                x_at = x0 + (ys - y0) * (x1 - x0) / (y1 - y0)
                mask ^= crosses & (xs < x_at)
            return mask
        self._fill(py.min(), py.max(), px.min(), px.max(), inside, paint)

    def ellipse(self, cx: float, cy: float, rx: float, ry: float, paint) -> None:
        self._fill(cy - ry, cy + ry, cx - rx, cx + rx,
                   lambda ys, xs: ((xs - cx) / rx) ** 2 + ((ys - cy) / ry) ** 2 <= 1.0, paint)

    def capsule(self, p0: tuple[float, float], p1: tuple[float, float], r: float,
                paint) -> None:
        """A thick segment with round ends (limbs, straps)."""
        (x0, y0), (x1, y1) = p0, p1
        dx, dy = x1 - x0, y1 - y0
        length2 = max(dx * dx + dy * dy, 1e-6)

        def inside(ys, xs):
            t = np.clip(((xs - x0) * dx + (ys - y0) * dy) / length2, 0, 1)
            return (xs - x0 - t * dx) ** 2 + (ys - y0 - t * dy) ** 2 <= r * r
        self._fill(min(y0, y1) - r, max(y0, y1) + r, min(x0, x1) - r, max(x0, x1) + r,
                   inside, paint)

    def annulus(self, cx: float, cy: float, r_out: float, r_in: float, paint) -> None:
        self._fill(cy - r_out, cy + r_out, cx - r_out, cx + r_out,
                   lambda ys, xs: (r_in ** 2 <= (xs - cx) ** 2 + (ys - cy) ** 2)
                   & ((xs - cx) ** 2 + (ys - cy) ** 2 <= r_out ** 2), paint)

    def rect(self, x0: float, y0: float, x1: float, y1: float, paint) -> None:
        self.polygon([(x0, y0), (x1, y0), (x1, y1), (x0, y1)], paint)


@dataclass(frozen=True)
class Pose:
    """Where a figure stands: canvas pixels of its head top and height, body axis and view."""

    top: float
    height: float
    centre: float
    stride: float       # -1..1 leg swing; |stride| > 0.45 reads as walking
    back: bool          # seen from behind
    mirror: int         # +1 / -1: which side bags hang on


class Figure:
    """Draws in figure coordinates: y in figure heights from the head top (feet at 1), x in
    figure heights from the body axis."""

    def __init__(self, canvas: Canvas, pose: Pose):
        self.c, self.pose = canvas, pose

    def p(self, x: float, y: float) -> tuple[float, float]:
        return (self.pose.centre + self.pose.mirror * x * self.pose.height,
                self.pose.top + y * self.pose.height)

    def s(self, length: float) -> float:
        return length * self.pose.height

    def polygon(self, pts, paint) -> None:
        self.c.polygon([self.p(x, y) for x, y in pts], paint)

    def capsule(self, a, b, r, paint) -> None:
        self.c.capsule(self.p(*a), self.p(*b), self.s(r), paint)

    def ellipse(self, x, y, rx, ry, paint) -> None:
        cx, cy = self.p(x, y)
        self.c.ellipse(cx, cy, self.s(rx), self.s(ry), paint)


def _rgb(colour: ColourName, rng: np.random.Generator) -> np.ndarray:
    return np.clip(np.array(colour.rgb, np.float32) + rng.uniform(-8, 8, 3), 0, 255)


def _paint(g: Garment, rng: np.random.Generator, fig: Figure) -> Paint:
    second = None if g.second is None else _rgb(g.second, rng)
    return Paint(_rgb(g.colour, rng), g.pattern if g.pattern != "logo" else "solid", second,
                 period=max(3.0, fig.s(0.035)))


PARTS = ("body", "upper", "lower", "shoes", "bag", "hat", "scarf")


def draw_person(fig: Figure, p: Person, rng: np.random.Generator,
                parts: frozenset[str] = frozenset(PARTS)) -> None:
    """Draw a person back to front; ``parts`` limits it to some garments (product shots draw
    one garment on an invisible body)."""
    body = "body" in parts
    skin = np.array(p.skin, np.float32)
    hair = np.array(HAIR[p.hair], np.float32) + rng.uniform(-6, 6, 3)
    sh = 0.105 * p.build * (0.93 if p.gender == "woman" else 1.0)   # shoulder half-width
    hip = 0.085 * (1.1 if p.gender == "woman" else 1.0) * p.build
    st = 0.08 * fig.pose.stride
    upper = _paint(p.upper, rng, fig)
    if body and p.hair_length == "long" and not fig.pose.back:
        fig.polygon([(-0.07, 0.05), (0.07, 0.05), (0.085, 0.26), (-0.085, 0.26)], hair)
    if "bag" in parts and p.bag and p.bag.kind == "suitcase":
        bag = _rgb(p.bag.colour, rng)
        fig.polygon([(0.17, 0.66), (0.33, 0.66), (0.33, 0.97), (0.17, 0.97)], bag)
        fig.capsule((0.25, 0.52), (0.25, 0.66), 0.008, bag * 0.6)  # handle
    # legs: skin, then the lower garment over them
    knees = [(-0.05 - st * 0.4, 0.73), (0.05 + st * 0.4, 0.73)]
    ankles = [(-0.05 - st, 0.94), (0.05 + st, 0.94)]
    hips = [(-0.048, 0.5), (0.048, 0.5)]
    if body:
        for h, k, a in zip(hips, knees, ankles):
            fig.capsule(h, k, 0.033, skin)
            fig.capsule(k, a, 0.027, skin)
    if "lower" in parts and p.lower is not None:
        low = _paint(p.lower, rng, fig)
        kind = p.lower.kind
        fig.polygon([(-hip, 0.46), (hip, 0.46), (hip + 0.005, 0.54), (-hip - 0.005, 0.54)], low)
        if kind == "skirt":
            fig.polygon([(-hip, 0.46), (hip, 0.46), (hip + 0.05, 0.68), (-hip - 0.05, 0.68)], low)
        else:
            for h, k, a in zip(hips, knees, ankles):
                r = 0.026 if kind == "leggings" else 0.038
                fig.capsule(h, k, r, low)
                if kind == "shorts":
                    continue
                fig.capsule(k, a, r * 0.85, low)
                if kind == "jeans":  # seam
                    fig.capsule(k, a, 0.004, low.rgb * 0.75)
    if "shoes" in parts:
        shoe = _rgb(p.shoes.colour, rng)
        for a in ankles:
            if p.shoes.kind == "boots":
                fig.capsule((a[0], a[1] - 0.07), a, 0.03, shoe)
            fig.ellipse(a[0] + 0.012, a[1] + 0.025, 0.04, 0.022, shoe)
            if p.shoes.kind == "sneakers":
                fig.ellipse(a[0] + 0.012, a[1] + 0.04, 0.04, 0.008, np.full(3, 235, np.float32))
    if "upper" in parts:
        _draw_upper(fig, p, upper, sh, hip, skin, body)
    if body:
        fig.capsule((0, 0.11), (0, 0.17), 0.024, skin)  # neck
        _draw_head(fig, p, skin, hair)
    if "scarf" in parts and p.scarf is not None:
        fig.capsule((-0.045, 0.165), (0.045, 0.165), 0.02, _rgb(p.scarf.colour, rng))
    if "hat" in parts and p.hat is not None:
        _draw_hat(fig, p.hat.kind, _rgb(p.hat.colour, rng))
    if "bag" in parts and p.bag is not None and p.bag.kind != "suitcase":
        _draw_bag(fig, p.bag.kind, _rgb(p.bag.colour, rng), sh)


def _draw_upper(fig: Figure, p: Person, paint: Paint, sh: float, hip: float,
                skin: np.ndarray, body: bool) -> None:
    kind, swing = p.upper.kind, 0.05 * fig.pose.stride
    bottom = {"coat": 0.7, "dress": 0.74, "suit jacket": 0.55}.get(kind, 0.52)
    flare = {"dress": 0.08, "coat": 0.03}.get(kind, 0.0)
    torso = [(-sh, 0.175), (sh, 0.175), (hip + 0.01 + flare, bottom), (-hip - 0.01 - flare, bottom)]
    fig.polygon(torso, paint)
    for side in (-1, 1):  # arms: shoulder -> elbow -> wrist
        shoulder, elbow = (side * sh, 0.19), (side * (sh + 0.02) + side * swing * 0.3, 0.34)
        wrist = (side * (sh + 0.025) + swing * side, 0.47)
        if kind == "tank top":
            if body:
                fig.capsule(shoulder, elbow, 0.024, skin)
                fig.capsule(elbow, wrist, 0.021, skin)
        elif kind in LONG_SLEEVES:
            fig.capsule(shoulder, elbow, 0.029, paint)
            fig.capsule(elbow, wrist, 0.026, paint)
        else:  # short sleeves
            fig.capsule(shoulder, ((shoulder[0] + elbow[0]) / 2, 0.265), 0.031, paint)
            if body:
                fig.capsule(((shoulder[0] + elbow[0]) / 2, 0.27), elbow, 0.022, skin)
                fig.capsule(elbow, wrist, 0.021, skin)
        if body:
            fig.ellipse(wrist[0], wrist[1] + 0.015, 0.017, 0.02, skin)  # hand
    if fig.pose.back:
        if kind == "hoodie":
            fig.ellipse(0, 0.16, 0.06, 0.03, paint.rgb * 0.85)
        return
    dark = paint.rgb * 0.55
    if kind in ("jacket", "coat", "suit jacket"):   # open front: a lighter inner layer
        fig.polygon([(-0.025, 0.18), (0.025, 0.18), (0.02, bottom - 0.02),
                     (-0.02, bottom - 0.02)], np.full(3, 225, np.float32) if kind ==
                    "suit jacket" else paint.rgb * 0.7 + 60)
    elif kind in ("shirt", "blouse", "polo shirt"):  # collar
        fig.polygon([(-0.05, 0.17), (0.05, 0.17), (0.0, 0.215)], paint.rgb * 0.6 + 90)
    elif kind == "hoodie":  # pocket and strings
        fig.polygon([(-0.06, 0.4), (0.06, 0.4), (0.07, 0.49), (-0.07, 0.49)], paint.rgb * 0.85)
        fig.capsule((-0.015, 0.18), (-0.015, 0.25), 0.004, dark)
        fig.capsule((0.015, 0.18), (0.015, 0.25), 0.004, dark)
    if p.upper.pattern == "logo" and p.upper.second is not None:
        fig.polygon([(-0.035, 0.26), (0.035, 0.26), (0.035, 0.31), (-0.035, 0.31)],
                    np.array(p.upper.second.rgb, np.float32))


def _draw_head(fig: Figure, p: Person, skin: np.ndarray, hair: np.ndarray) -> None:
    fig.ellipse(0, 0.068, 0.052, 0.066, skin)
    if p.hair_length != "bald":
        if fig.pose.back:
            fig.ellipse(0, 0.062, 0.055, 0.066, hair)
            if p.hair_length == "long":
                fig.polygon([(-0.055, 0.06), (0.055, 0.06), (0.065, 0.25), (-0.065, 0.25)], hair)
        else:
            fig.ellipse(0, 0.035, 0.056, 0.036, hair)
    if not fig.pose.back:
        eye = skin * 0.3
        for side in (-1, 1):
            fig.ellipse(side * 0.021, 0.07, 0.007, 0.006, eye)
        if p.glasses:
            fig.capsule((-0.035, 0.07), (0.035, 0.07), 0.006, np.full(3, 25, np.float32))


def _draw_hat(fig: Figure, kind: str, rgb: np.ndarray) -> None:
    if kind == "cap":
        fig.ellipse(0, 0.03, 0.057, 0.035, rgb)
        fig.ellipse(0.04, 0.045, 0.045, 0.01, rgb * 0.8)
    elif kind == "beanie":
        fig.ellipse(0, 0.025, 0.058, 0.045, rgb)
        fig.polygon([(-0.058, 0.035), (0.058, 0.035), (0.058, 0.05), (-0.058, 0.05)], rgb * 0.85)
    else:
        fig.ellipse(0, 0.045, 0.11, 0.016, rgb * 0.85)
        fig.polygon([(-0.05, -0.015), (0.05, -0.015), (0.056, 0.045), (-0.056, 0.045)], rgb)


def _draw_bag(fig: Figure, kind: str, rgb: np.ndarray, sh: float) -> None:
    if kind == "backpack" and fig.pose.back:
        fig.polygon([(-0.085, 0.2), (0.085, 0.2), (0.095, 0.44), (-0.095, 0.44)], rgb)
        fig.polygon([(-0.085, 0.2), (0.085, 0.2), (0.09, 0.27), (-0.09, 0.27)], rgb * 0.75)
    elif kind == "backpack":
        for side in (-1, 1):
            fig.capsule((side * (sh - 0.025), 0.18), (side * (sh - 0.03), 0.38), 0.011, rgb)
    elif kind == "handbag":
        fig.capsule((sh + 0.015, 0.46), (sh + 0.055, 0.46), 0.005, rgb * 0.7)
        fig.polygon([(sh - 0.005, 0.47), (sh + 0.075, 0.47), (sh + 0.085, 0.56),
                     (sh - 0.015, 0.56)], rgb)
    else:  # shoulder bag: strap across the body, bag at the hip
        fig.capsule((-sh + 0.02, 0.18), (sh, 0.46), 0.008, rgb * 0.8)
        fig.polygon([(sh - 0.03, 0.44), (sh + 0.06, 0.44), (sh + 0.06, 0.54),
                     (sh - 0.03, 0.54)], rgb)


# ---------------------------------------------------------------- scenes

BACKGROUNDS = ("plain", "street", "wall", "indoor", "park", "night", "clutter")
SCENE_PHRASES: Mapping[str, tuple[str, ...]] = MappingProxyType({
    "street": ("on the street", "outdoors", "on a sidewalk", "in the city", "crossing a road"),
    "wall": ("in front of a brick wall", "by a wall", "against a brick wall"),
    "indoor": ("indoors", "in a hallway", "inside a building", "in a corridor"),
    "park": ("in a park", "on the grass", "outside on a lawn"),
    "night": ("at night", "on a street at night", "in the evening"),
    "clutter": ("in a busy place", "in a shopping area", "in a crowded street"),
})


@dataclass(frozen=True)
class Photo:
    """Camera and light of one image (what captions may mention about them)."""

    background: str
    background_colour: ColourName | None   # plain backgrounds
    gain: float
    warmth: float        # -1 cool .. 1 warm
    saturation: float
    blur: float          # gaussian sigma, output pixels
    noise: float         # std, 0..255


def sample_photo(rng: np.random.Generator, backgrounds: Sequence[str] = BACKGROUNDS,
                 weights: Sequence[float] | None = None) -> Photo:
    background = str(rng.choice(backgrounds, p=weights))
    gain = float(rng.uniform(0.45, 0.8) if background == "night" else rng.uniform(0.6, 1.35))
    blur = float(rng.choice((0.0, rng.uniform(0.3, 0.8), rng.uniform(0.8, 1.6)), p=(0.3, 0.5, 0.2)))
    noise = float(rng.choice((rng.uniform(0, 3), rng.uniform(3, 8), rng.uniform(8, 14)),
                             p=(0.5, 0.35, 0.15)))
    return Photo(background, sample_colour(rng) if background == "plain" else None, gain,
                 float(rng.uniform(-1, 1)), float(rng.uniform(0.75, 1.15)), blur, noise)


def _background(photo: Photo, h: int, w: int, rng: np.random.Generator) -> np.ndarray:
    """(h, w, 3) float32 background of the photo's kind."""
    kind = photo.background
    canvas = np.empty((h, w, 3), np.float32)
    rows = np.arange(h, dtype=np.float32)[:, None, None] / h
    if kind == "plain":
        canvas[:] = np.array(photo.background_colour.rgb, np.float32)
        canvas *= (1.0 - 0.08 * rows)  # soft studio falloff
    elif kind in ("street", "park", "night"):
        horizon = rng.uniform(0.35, 0.65)
        sky = {"night": rng.uniform(10, 45, 3), "park": rng.uniform(150, 235, 3) *
               np.array([0.85, 0.95, 1.1])}.get(kind, rng.uniform(160, 235, 3))
        ground = {"park": np.array([60, 130, 50]) + rng.uniform(-25, 25, 3),
                  "night": rng.uniform(25, 60, 3)}.get(kind, rng.uniform(80, 140) +
                                                        rng.uniform(-10, 10, 3))
        t = np.clip((rows - horizon) * 6, 0, 1)
        canvas[:] = (1 - t) * sky + t * ground
        if kind == "park":
            canvas += (rng.random((h, w, 1)) * 30 - 15).astype(np.float32) * t
        if kind == "night":
            for _ in range(int(rng.integers(1, 4))):  # street lamps
                cx, cy, r = rng.uniform(0, w), rng.uniform(0, horizon * h), rng.uniform(2, 6) * \
                    h / 64
                Canvas(canvas).ellipse(cx, cy, r, r, np.array([250, 225, 160], np.float32))
        if kind == "street":  # buildings on the horizon
            c = Canvas(canvas)
            x = 0.0
            while x < w:
                bw = rng.uniform(0.15, 0.4) * w
                top = rng.uniform(0.05, horizon) * h
                c.rect(x, top, x + bw, horizon * h, rng.uniform(90, 200) + rng.uniform(-15, 15, 3))
                x += bw
    elif kind == "wall":
        brick = np.array([150, 70, 50]) + rng.uniform(-30, 30, 3)
        canvas[:] = brick
        mortar = rng.uniform(170, 215)
        bh = max(2, int(rng.uniform(0.05, 0.09) * h))
        for r in range(0, h, bh):
            canvas[r:r + max(1, bh // 5)] = mortar
            offset = (r // bh % 2) * bh
            for c in range(offset, w, 2 * bh):
                canvas[r:r + bh, c:c + max(1, bh // 5)] = mortar
        canvas[int(0.88 * h):] = rng.uniform(90, 140)
    elif kind == "indoor":
        wall = rng.uniform(150, 235) + rng.uniform(-15, 15, 3)
        floor = rng.uniform(70, 160) + rng.uniform(-20, 20, 3)
        line = rng.uniform(0.7, 0.85)
        canvas[:] = np.where(rows < line, wall, floor)
        tile = max(2, int(rng.uniform(0.06, 0.12) * w))
        canvas[int(line * h):, ::tile] *= 0.85
    elif kind == "clutter":
        canvas[:] = rng.uniform(100, 200) + rng.uniform(-15, 15, 3)
        c = Canvas(canvas)
        for _ in range(int(rng.integers(6, 14))):
            x0, y0 = rng.uniform(-0.1, 1) * w, rng.uniform(-0.1, 1) * h
            c.rect(x0, y0, x0 + rng.uniform(0.1, 0.4) * w, y0 + rng.uniform(0.1, 0.4) * h,
                   np.array(sample_colour(rng).rgb, np.float32) * rng.uniform(0.5, 0.9))
    else:
        raise ValueError(f"unknown background {kind!r}")
    return canvas


def _finish(canvas: np.ndarray, photo: Photo, size: tuple[int, int],
            rng: np.random.Generator) -> np.ndarray:
    """Light and camera: colour transform, resize to ``size`` (aspect change included), blur,
    noise. Returns (3, H, W) uint8."""
    luma = canvas @ np.array([0.299, 0.587, 0.114], np.float32)
    canvas = luma[..., None] + photo.saturation * (canvas - luma[..., None])
    cast = np.array([1 + 0.08 * photo.warmth, 1.0, 1 - 0.08 * photo.warmth], np.float32)
    canvas = np.clip(canvas * photo.gain * cast, 0, 255).astype(np.uint8)
    height, width = size
    image = Image.fromarray(canvas, "RGB").resize((width, height), Image.Resampling.BOX)
    out = _blur(np.asarray(image, np.float32), photo.blur)
    out = out + rng.normal(0.0, photo.noise, out.shape).astype(np.float32)
    return np.clip(np.rint(out), 0, 255).astype(np.uint8).transpose(2, 0, 1)


def _blur(image: np.ndarray, sigma: float) -> np.ndarray:
    """Separable gaussian blur with edge padding."""
    if sigma <= 0:
        return image
    radius = max(1, int(np.ceil(2.5 * sigma)))
    kernel = np.exp(-0.5 * (np.arange(-radius, radius + 1) / sigma) ** 2)
    kernel = (kernel / kernel.sum()).astype(np.float32)
    h, w = image.shape[:2]
    padded = np.pad(image, ((radius, radius), (0, 0), (0, 0)), mode="edge")
    image = sum(k * padded[i:i + h] for i, k in enumerate(kernel))
    padded = np.pad(image, ((0, 0), (radius, radius), (0, 0)), mode="edge")
    return sum(k * padded[:, i:i + w] for i, k in enumerate(kernel))


def _canvas_size(size: tuple[int, int], rng: np.random.Generator) -> tuple[int, int]:
    """Supersampled drawing size: the output's aspect times a random squash in [0.8, 1.25]."""
    height, width = size
    aspect = width / height * float(np.exp(rng.uniform(np.log(0.8), np.log(1.25))))
    h = height * SUPERSAMPLE
    return h, max(8, int(round(h * aspect)))


def _person_pose(rng: np.random.Generator, h: int, w: int, close_up: bool,
                 centre: float | None = None, scale: float | None = None) -> Pose:
    if close_up:  # head and torso fill the frame, legs cropped
        height = rng.uniform(1.6, 2.1) * h
        top = rng.uniform(0.03, 0.12) * h
    else:
        height = (scale if scale is not None else rng.uniform(0.55, 0.97)) * h
        height = min(height, 3.2 * w)  # a figure about 0.3 heights wide must fit
        top = h - height - rng.uniform(0.0, 0.04) * h
    if centre is None:
        slack = max(0.0, w / 2 - 0.22 * height)
        centre = w / 2 + rng.uniform(-1, 1) * min(slack, 0.2 * w)
    return Pose(top=top, height=height, centre=centre, stride=float(rng.uniform(-1, 1)),
                back=bool(rng.random() < 0.35), mirror=1 if rng.random() < 0.5 else -1)


# ---------------------------------------------------------------- captions


def _article(phrase: str) -> str:
    return ("an " if phrase[:1] in "aeiou" else "a ") + phrase


def _noun(kind: str, rng: np.random.Generator) -> str:
    words = GARMENT_WORDS[kind]
    return words[0] if rng.random() < 0.5 else words[rng.integers(len(words))]


def garment_phrase(g: Garment, rng: np.random.Generator, article: bool = True) -> str:
    """'a crimson striped t-shirt', 'navy blue jeans', 'a pair of white sneakers'."""
    colour = colour_word(g.colour, rng)
    noun = _noun(g.kind, rng)
    if g.pattern == "striped":
        text = f"{colour} striped {noun}" if rng.random() < 0.5 else \
            f"{colour} {noun} with {colour_word(g.second, rng)} stripes"
    elif g.pattern == "plaid":
        text = f"{colour} {('plaid', 'checked', 'checkered')[rng.integers(3)]} {noun}"
    elif g.pattern == "logo":
        text = f"{colour} {noun} with a {colour_word(g.second, rng)} logo"
    else:
        text = f"{colour} {noun}"
    if not article:
        return text
    if g.kind in PLURAL:  # every word for a PLURAL kind is plural, the others singular
        pair = g.kind in ("shoes", "sneakers", "boots") and rng.random() < 0.4
        return f"a pair of {text}" if pair else text
    return _article(text)


def _subject(p: Person, rng: np.random.Generator) -> str:
    words = SUBJECT_WORDS[(p.gender, p.age)]
    return words[0] if rng.random() < 0.4 else words[rng.integers(len(words))]


def _hair_phrase(p: Person, rng: np.random.Generator) -> str | None:
    if p.hair_length == "bald":
        return "a bald head"
    word = {"grey": ("grey", "gray", "silver")[rng.integers(3)],
            "red": ("red", "ginger", "auburn")[rng.integers(3)],
            "blonde": ("blonde", "blond", "fair")[rng.integers(3)]}.get(p.hair, p.hair)
    return f"{p.hair_length} {word} hair"


def _pronouns(p: Person) -> tuple[str, str]:
    return ("He", "his") if p.gender == "man" else ("She", "her")


def person_phrases(p: Person, visible: frozenset[str], rng: np.random.Generator
                   ) -> dict[str, str]:
    """Phrase per visible attribute (the upper garment is always there)."""
    out = {"upper": garment_phrase(p.upper, rng)}
    if p.lower is not None and "lower" in visible:
        out["lower"] = garment_phrase(p.lower, rng)
    if "shoes" in visible:
        out["shoes"] = garment_phrase(p.shoes, rng)
    if p.bag is not None and "bag" in visible:
        out["bag"] = garment_phrase(p.bag, rng)
    if p.hat is not None:
        out["hat"] = garment_phrase(p.hat, rng)
    hair = _hair_phrase(p, rng)
    if hair and p.hat is None:
        out["hair"] = hair
    if p.glasses:
        out["glasses"] = ("glasses", "sunglasses", "eyeglasses")[rng.integers(3)]
    if p.scarf is not None:
        out["scarf"] = _article(f"{colour_word(p.scarf.colour, rng)} scarf")
    return out


def _join(items: Sequence[str], rng: np.random.Generator) -> str:
    """'a', 'a and b', 'a, b and c' or 'a, b, and c'."""
    if len(items) < 3:
        return " and ".join(items)
    return ", ".join(items[:-1]) + (", and " if rng.random() < 0.5 else " and ") + items[-1]


def _photo_prefix(photo: Photo, rng: np.random.Generator) -> str:
    """'a blurry photo of', 'a photo of', '' ... (with its article)."""
    if photo.blur > 1.1 and rng.random() < 0.5:
        return ("a blurry photo of ", "a blurred picture of ", "an out of focus photo of ")[
            rng.integers(3)]
    if photo.noise > 8 and rng.random() < 0.5:
        return ("a grainy photo of ", "a noisy picture of ", "a low quality photo of ")[
            rng.integers(3)]
    return ("", "", "a photo of ", "an image of ", "a picture of ", "a street photo of ",
            "a surveillance camera image of ", "a low resolution photo of ")[rng.integers(8)]


def _on_background(photo: Photo, rng: np.random.Generator) -> str:
    return "on " + _article(f"{colour_word(photo.background_colour, rng)} background")


def _scene_phrase(photo: Photo, rng: np.random.Generator) -> str | None:
    if rng.random() > 0.35:
        return None
    if photo.gain < 0.7 and photo.background != "night" and rng.random() < 0.5:
        return ("in dim light", "in low light", "in the shade")[rng.integers(3)]
    if photo.gain > 1.25 and rng.random() < 0.5:
        return ("in bright sunlight", "on a sunny day", "in bright light")[rng.integers(3)]
    if photo.background == "plain":
        return _on_background(photo, rng)
    phrases = SCENE_PHRASES[photo.background]
    return phrases[rng.integers(len(phrases))]


def person_caption(p: Person, pose: Pose, photo: Photo, visible: frozenset[str],
                   rng: np.random.Generator) -> str:
    """One caption of a person picture, in one of six styles."""
    ph = person_phrases(p, visible, rng)
    optional = [k for k in ("lower", "shoes", "bag", "hat", "hair", "glasses", "scarf")
                if k in ph and rng.random() < 0.6]
    worn = [ph["upper"]] + [ph[k] for k in ("lower", "shoes", "hat", "scarf", "glasses")
                            if k in optional]
    subj = _subject(p, rng)
    he, his = _pronouns(p)
    walking = abs(pose.stride) > 0.45
    action = (("walking", "walking along", "strolling") if walking else
              ("standing", "waiting", "standing still"))[rng.integers(3)]
    scene = _scene_phrase(photo, rng)
    style = int(rng.integers(6))
    if style == 0:  # alt text
        verb = ("wearing", "in", "dressed in", "who is wearing", "clad in")[rng.integers(5)]
        text = f"{_photo_prefix(photo, rng)}{_article(subj)} {verb} {_join(worn, rng)}"
        if "bag" in optional:
            text += f" and carrying {ph['bag']}" if rng.random() < 0.5 else f" with {ph['bag']}"
        if "hair" in optional:
            text += f", with {ph['hair']}"
        text += f" {scene}" if scene else ""
    elif style == 1:  # action first
        text = f"{_article(subj)} {action} in {_join(worn, rng)}"
        if "bag" in optional:
            text += f", carrying {ph['bag']}"
        text += f" {scene}" if scene else ""
    elif style == 2:  # several sentences
        sentences = [f"The {subj} is wearing {_join(worn[:2], rng)}."]
        if len(worn) > 2:
            sentences.append(f"{he} also wears {_join(worn[2:], rng)}.")
        if "hair" in optional:
            sentences.append(f"{he} has {ph['hair']}.")
        if "bag" in optional:
            where = f" on {his} back" if p.bag.kind == "backpack" and rng.random() < 0.5 else ""
            sentences.append(f"{he} is carrying {ph['bag']}{where}.")
        if pose.back and rng.random() < 0.5:
            sentences.append(f"{he} is seen from behind.")
        text = " ".join(sentences)
    elif style == 3:  # tags
        tags = [subj, garment_phrase(p.upper, rng, article=False)]
        tags += [garment_phrase(g, rng, article=False) for key, g in
                 (("lower", p.lower), ("bag", p.bag)) if key in optional]
        tags += [ph[key] for key in ("hair", "glasses") if key in optional]
        text = ", ".join(tags + ([scene] if scene else []))
    elif style == 4:  # garment first
        text = f"{_join(worn, rng)} on {_article(subj)}"
        if pose.back and rng.random() < 0.5:
            text += ", seen from behind"
        elif walking and rng.random() < 0.5:
            text += " walking"
        text += f" {scene}" if scene else ""
    else:  # "this person" description
        text = (f"This {subj} has {ph['hair']} and wears {_join(worn, rng)}" if "hair" in optional
                else f"This {subj} wears {_join(worn, rng)}")
        if "bag" in optional:
            text += f". {he} has {ph['bag']}"
        text += "."
    return _tidy(text, rng)


def _tidy(text: str, rng: np.random.Generator) -> str:
    text = " ".join(text.split())
    if rng.random() < 0.6:
        text = text[0].upper() + text[1:]
    if rng.random() < 0.5 and not text.endswith("."):
        text += "."
    return text


def product_caption(g: Garment, photo: Photo, rng: np.random.Generator) -> str:
    phrase = garment_phrase(g, rng)
    style = int(rng.integers(4))
    if style == 0:
        text = f"{('a product photo of ', 'a photo of ', 'an image of ', '')[rng.integers(4)]}" \
               f"{phrase}"
    elif style == 1:
        text = garment_phrase(g, rng, article=False)
    elif style == 2:
        text = f"{phrase} for sale"
    else:
        text = f"{('new', 'classic', 'casual', 'simple')[rng.integers(4)]} " \
               f"{garment_phrase(g, rng, article=False)}"
    if photo.background == "plain" and rng.random() < 0.5:
        text += " " + _on_background(photo, rng)
    return _tidy(text, rng)


SHAPES = ("circle", "square", "triangle", "diamond", "ring", "star", "cross", "bar")


@dataclass(frozen=True)
class Shape:
    kind: str
    colour: ColourName
    size: str            # "small" | "large"
    cx: float            # centre, fractions of the canvas
    cy: float


def draw_shape(c: Canvas, s: Shape, rng: np.random.Generator) -> None:
    side = min(c.h, c.w) * (0.18 if s.size == "small" else 0.34)
    cx, cy, r = s.cx * c.w, s.cy * c.h, side
    rgb = _rgb(s.colour, rng)
    if s.kind == "circle":
        c.ellipse(cx, cy, r, r, rgb)
    elif s.kind == "ring":
        c.annulus(cx, cy, r, r * 0.55, rgb)
    elif s.kind == "square":
        c.rect(cx - r, cy - r, cx + r, cy + r, rgb)
    elif s.kind == "triangle":
        c.polygon([(cx, cy - r), (cx + r, cy + r * 0.8), (cx - r, cy + r * 0.8)], rgb)
    elif s.kind == "diamond":
        c.polygon([(cx, cy - r), (cx + r * 0.75, cy), (cx, cy + r), (cx - r * 0.75, cy)], rgb)
    elif s.kind == "star":
        angles = np.pi / 2 + np.arange(10) * np.pi / 5
        radii = np.where(np.arange(10) % 2 == 0, r, r * 0.45)
        c.polygon([(cx + q * np.cos(a), cy - q * np.sin(a)) for a, q in zip(angles, radii)], rgb)
    elif s.kind == "cross":
        c.rect(cx - r, cy - r * 0.3, cx + r, cy + r * 0.3, rgb)
        c.rect(cx - r * 0.3, cy - r, cx + r * 0.3, cy + r, rgb)
    else:  # bar
        c.rect(cx - r * 1.2, cy - r * 0.25, cx + r * 1.2, cy + r * 0.25, rgb)


def shapes_caption(shapes: Sequence[Shape], photo: Photo, rng: np.random.Generator) -> str:
    def one(s: Shape) -> str:
        size = f"{s.size} " if rng.random() < 0.5 else ""
        return _article(f"{size}{colour_word(s.colour, rng)} {s.kind}")
    parts = [one(s) for s in shapes]
    count = ("one", "two", "three")[len(shapes) - 1]
    style = int(rng.integers(3))
    if style == 0 or len(shapes) == 1:
        text = _join(parts, rng)
    elif style == 1:
        text = f"{count} shapes: {', '.join(parts)}"
    else:
        text = f"{parts[0]} next to {_join(parts[1:], rng)}"
    if photo.background == "plain" and rng.random() < 0.6:
        text += " " + _on_background(photo, rng)
    elif rng.random() < 0.3:
        text = ("clip art of ", "a drawing of ", "an illustration of ")[rng.integers(3)] + text
    return _tidy(text, rng)


# ---------------------------------------------------------------- items


@dataclass
class Item:
    """One corpus entry: a (3, H, W) uint8 image and its distinct captions."""

    image: np.ndarray
    captions: list[str]
    scene: str = field(default="")


def _distinct(make, count: int) -> list[str]:
    out: list[str] = []
    for _ in range(20 * count):
        text = make()
        if text not in out:
            out.append(text)
        if len(out) == count:
            break
    return out


def make_item(seed: int, split: int, index: int, captions_per_image: int) -> Item:
    """The corpus item ``index`` of ``split`` (0 train, 1 held-out) for ``seed``."""
    rng = np.random.default_rng([seed, split, index])
    kinds = tuple(SCENES)
    scene = kinds[rng.choice(len(kinds), p=[SCENES[k].weight for k in kinds])]
    sizes = list(SCENES[scene].buckets)
    size = sizes[rng.choice(len(sizes), p=list(SCENES[scene].buckets.values()))]
    h, w = _canvas_size(size, rng)
    if scene in ("person", "two_people"):
        photo = sample_photo(rng)
        canvas = _background(photo, h, w, rng)
        count = 1 if scene == "person" else 2
        close_up = scene == "person" and rng.random() < 0.12
        people, poses = [sample_person(rng) for _ in range(count)], []
        scale = float(rng.uniform(0.55, 0.95))
        for k, person in enumerate(people):
            centre = None if count == 1 else w * (0.28 + 0.44 * k + rng.uniform(-0.04, 0.04))
            pose = _person_pose(rng, h, w, close_up, centre, None if count == 1 else scale)
            draw_person(Figure(Canvas(canvas), pose), person, rng)
            poses.append(pose)
        visible = frozenset({"upper", "hat"} if close_up else PARTS)

        def make() -> str:
            if count == 1:
                text = person_caption(people[0], poses[0], photo, visible, rng)
                if close_up and rng.random() < 0.5:
                    text = ("Upper body of: ", "Portrait: ", "Close-up: ")[rng.integers(3)] + text
                return text
            a, b = (person_phrases(q, visible, rng)["upper"] for q in people)
            sa, sb = (_subject(q, rng) for q in people)
            style = int(rng.integers(3))
            if style == 0:
                return _tidy(f"two people: {_article(sa)} in {a} and {_article(sb)} in {b}", rng)
            if style == 1:
                return _tidy(f"{_article(sa)} in {a} walking next to {_article(sb)} in {b}", rng)
            return _tidy(f"{_photo_prefix(photo, rng)}two people, one wearing {a}, the other "
                         f"wearing {b}", rng)
    elif scene == "product":
        photo = sample_photo(rng, ("plain", "indoor"), (0.8, 0.2))
        canvas = _background(photo, h, w, rng)
        person = sample_person(rng)
        part = str(rng.choice(("upper", "lower", "shoes", "bag", "hat"),
                              p=(0.4, 0.25, 0.12, 0.13, 0.1)))
        garment = {"upper": person.upper, "lower": person.lower, "shoes": person.shoes,
                   "bag": person.bag, "hat": person.hat}[part]
        if garment is None:  # that person has none: show the top
            part, garment = "upper", person.upper
        # the item's extent in figure coordinates (y0, y1, width, x centre) fills 80% of
        # the canvas
        key = garment.kind if part == "bag" else part
        y0, y1, width, x = {
            "upper": (0.15, {"coat": 0.72, "dress": 0.76}.get(person.upper.kind, 0.54), 0.45,
                      0.0),
            "lower": (0.45, 0.97, 0.3, 0.0), "shoes": (0.86, 0.98, 0.2, 0.0),
            "hat": (-0.02, 0.09, 0.24, 0.0), "backpack": (0.18, 0.46, 0.22, 0.0),
            "handbag": (0.44, 0.58, 0.12, 0.15), "shoulder bag": (0.16, 0.56, 0.36, 0.0),
            "suitcase": (0.5, 0.98, 0.18, 0.25)}[key]
        height = min(0.8 * h / (y1 - y0), 0.8 * w / width)
        pose = Pose(top=h * 0.5 - height * (y0 + y1) / 2, height=height,
                    centre=w / 2 - x * height, stride=float(rng.uniform(-0.3, 0.3)),
                    back=key == "backpack", mirror=1)
        draw_person(Figure(Canvas(canvas), pose), person, rng, frozenset({part}))

        def make() -> str:
            return product_caption(garment, photo, rng)
    else:
        photo = sample_photo(rng, ("plain", "street", "indoor", "clutter"), (0.7, 0.1, 0.1, 0.1))
        canvas = _background(photo, h, w, rng)
        n = int(rng.choice((1, 2, 3), p=(0.45, 0.35, 0.2)))
        slots = rng.permutation([(0.3, 0.3), (0.7, 0.3), (0.3, 0.72), (0.7, 0.72),
                                 (0.5, 0.5)])[:n] if n > 1 else [(0.5, 0.5)]
        shapes = [Shape(str(rng.choice(SHAPES)), sample_colour(rng),
                        "large" if n == 1 or rng.random() < 0.3 else "small",
                        float(x + rng.uniform(-0.05, 0.05)), float(y + rng.uniform(-0.05, 0.05)))
                  for x, y in slots]
        for s in shapes:
            draw_shape(Canvas(canvas), s, rng)

        def make() -> str:
            return shapes_caption(shapes, photo, rng)
    image = _finish(canvas, photo, size, rng)
    return Item(image, _distinct(make, captions_per_image), scene)
