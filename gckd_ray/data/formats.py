"""Readers for the three published text-based person search annotation formats.

CUHK-PEDES (``reid_raw.json``), ICFG-PEDES (``ICFG-PEDES.json``) and RSTPReid
(``data_captions.json``) are lists of per-image records under a ``root`` that also holds
``imgs/``. `read_annotations` validates every record of the file, then flattens one split into
`Record`s, one per caption. Bad input raises `DatasetFormatError` naming the file and the record
index or, under ``on_bad_record="skip"``, is dropped and counted by cause so that nothing
disappears silently. Under ``"error"`` images are only checked for existence and size here
(real datasets hold 40k+ images) and `read_image` decodes them when a dataset asks, failing
with the file and record index; under ``"skip"`` every image is decoded once here, so that
truncated or non-image files are dropped and counted too.
"""

from __future__ import annotations

import json
import os
import posixpath
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path, PureWindowsPath
from types import MappingProxyType
from typing import Any, Mapping

import numpy as np
from PIL import Image

from gckd_ray.errors import InputError

IMAGE_DIR = "imgs"
BAD_RECORD_POLICIES = ("error", "skip")


@dataclass(frozen=True)
class FormatSpec:
    """Layout of one published annotation format."""

    annotation: str           # annotation file name inside the dataset root
    path_key: str             # record key holding the image path, relative to <root>/imgs/
    splits: tuple[str, ...]   # split values the format uses
    images: str               # how the published dataset lays out imgs/ (for error messages)


FORMATS: Mapping[str, FormatSpec] = MappingProxyType({
    "cuhk-pedes": FormatSpec("reid_raw.json", "file_path", ("train", "val", "test"),
                             "one folder per source camera set, e.g. imgs/CUHK01/0363004.png"),
    "icfg-pedes": FormatSpec("ICFG-PEDES.json", "file_path", ("train", "test"),
                             "imgs/train/<id>/... and imgs/test/<id>/..."),
    "rstpreid": FormatSpec("data_captions.json", "img_path", ("train", "val", "test"),
                           "a flat folder of image files, e.g. imgs/3901_c14_0004.jpg"),
})

# Each SynthPEDES domain is written in, and read back with, one real format.
SYNTH_FORMATS: Mapping[str, str] = MappingProxyType({
    "synth-cuhk": "cuhk-pedes", "synth-icfg": "icfg-pedes", "synth-rstp": "rstpreid",
})


class DatasetFormatError(InputError):
    """Bad dataset input; the message names the file, and the record index when there is one."""

    kind = "data"


@dataclass(frozen=True)
class Record:
    """One (image, caption) pair of an annotation file."""

    image_path: str   # absolute path of the image file
    image_key: str    # the image path exactly as written in the annotation (unique per image)
    caption: str      # stripped, non-empty
    pid: int          # person id as in the annotation
    split: str        # "train" | "val" | "test"
    source: str       # annotation file path (for error messages)
    index: int        # record index in that annotation file (for error messages)


@dataclass
class DomainRecords:
    """One split of one dataset: its records and what was skipped reading it."""

    name: str
    split: str
    records: list[Record]
    skipped: dict[str, int] = field(default_factory=dict)

    def summary(self) -> str:
        """One line: captions, images, ids, and skipped items by cause."""
        images = len({r.image_key for r in self.records})
        ids = len({r.pid for r in self.records})
        line = (f"{self.name}/{self.split}: {len(self.records)} captions, {images} images, "
                f"{ids} ids")
        if self.skipped:
            causes = sorted(self.skipped.items(), key=lambda kv: (-kv[1], kv[0]))
            detail = ", ".join(f"{cause}: {n}" for cause, n in causes)
            line += f"; skipped {sum(self.skipped.values())} ({detail})"
        return line


class _BadRecord(Exception):
    """A record that fails validation: `cause` is the skip counter, `detail` the message."""

    def __init__(self, cause: str, detail: str) -> None:
        super().__init__(detail)
        self.cause = cause
        self.detail = detail


@dataclass(frozen=True)
class _Checked:
    split: str
    key: str
    pid: int
    captions: list[str]
    image_path: str


def read_annotations(fmt: str, root: str | Path, split: str, on_bad_record: str = "error",
                     name: str | None = None) -> DomainRecords:
    """Read one split of a dataset in a published annotation format.

    Every record of the file is validated (so a bad test record fails a train load under
    ``"error"``); then the records of ``split`` are flattened to one `Record` per caption, in
    file order. Under ``"skip"`` a bad record (for an empty caption, just that caption) is
    dropped and counted by cause in ``skipped``; records of another valid split are not
    counted, records whose split cannot be read are counted in every split's load. A record
    whose image file an earlier record already annotated is bad ("duplicate image"). Under
    ``"skip"`` the split's images are also decoded, and records whose image does not decode
    are dropped ("undecodable image", one per image).

    Args:
        fmt: "cuhk-pedes" | "icfg-pedes" | "rstpreid".
        root: folder holding the annotation JSON and ``imgs/``.
        split: "train" | "val" | "test" (must be one the format has).
        on_bad_record: "error" | "skip".
        name: dataset name for summaries; defaults to ``fmt``.

    Returns:
        The split's records and skip counts.

    Raises:
        DatasetFormatError: unreadable or malformed annotation file, a bad record under
            ``"error"``, a split the format lacks, or a split left with no records.
    """
    spec = _format_spec(fmt)
    if on_bad_record not in BAD_RECORD_POLICIES:
        raise ValueError(f"on_bad_record must be one of {BAD_RECORD_POLICIES}, "
                         f"got {on_bad_record!r}")
    source = Path(root) / spec.annotation
    if split not in spec.splits:
        raise DatasetFormatError(f"{source}: no split {split!r}; {fmt} has splits "
                                 f"{', '.join(spec.splits)}")
    items = _load_json_list(source, spec)
    image_root = os.path.abspath(Path(root) / IMAGE_DIR)
    _check_image_root(Path(root), image_root, spec, fmt, items)
    records: list[Record] = []
    skipped: Counter[str] = Counter()
    first_use: dict[str, int] = {}  # image file -> index of the record that annotated it
    for index, item in enumerate(items):
        try:
            rec = _check_record(item, spec, fmt, image_root)
            _check_unique(rec, spec, index, first_use)
        except _BadRecord as bad:
            if on_bad_record == "error":
                raise DatasetFormatError(f"{source}: record {index}: {bad.detail}") from None
            if _readable_split(item, spec) in (None, split):
                skipped[bad.cause] += 1
            continue
        captions = _kept_captions(rec.captions, on_bad_record, f"{source}: record {index}")
        if rec.split != split:
            continue
        skipped["empty caption"] += len(rec.captions) - len(captions)
        records.extend(Record(rec.image_path, rec.key, caption, rec.pid, split, str(source),
                              index) for caption in captions)
    if on_bad_record == "skip":
        records = _decodable(records, skipped)
    domain = DomainRecords(name or fmt, split, records, {k: v for k, v in skipped.items() if v})
    if not records:
        raise DatasetFormatError(f"{source}: split {split!r} has no usable records "
                                 f"({domain.summary()}; splits present: "
                                 f"{_split_counts(items)})")
    return domain


def read_image(path: str, source: str = "", index: int = -1) -> Image.Image:
    """Fully decode an image file as 8-bit RGB.

    Grayscale, palette, RGBA and 16-bit images are converted; 32-bit integer ("I") images
    are read as 16-bit data when any value exceeds 255 (how 16-bit PNGs sometimes open).

    Args:
        path: image file.
        source, index: annotation file and record index, for the error message.

    Returns:
        A decoded RGB image, its file closed.

    Raises:
        DatasetFormatError: missing, zero-byte, truncated or non-image file; the message
            names ``source``, ``index`` and ``path``.
    """
    where = f"{source}: " if source else ""
    where += f"record {index}: " if index >= 0 else ""
    try:
        size = os.stat(path).st_size
    except OSError as err:
        raise DatasetFormatError(f"{where}cannot read image {path}: "
                                 f"{err.strerror or err}") from None
    if size == 0:
        raise DatasetFormatError(f"{where}image file is empty (0 bytes): {path}")
    try:
        with Image.open(path) as image:
            image.load()
            return _to_rgb(image)
    except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as err:
        # PIL reports truncation and garbage as OSError/SyntaxError/ValueError alike.
        raise DatasetFormatError(f"{where}cannot decode image {path}: {err}") from None


def _format_spec(fmt: str) -> FormatSpec:
    if fmt not in FORMATS:
        raise ValueError(f"unknown annotation format {fmt!r}; known: {', '.join(FORMATS)}")
    return FORMATS[fmt]


def _load_json_list(source: Path, spec: FormatSpec) -> list[Any]:
    """Parse the annotation file; errors name the file and the line/column."""
    try:
        data = source.read_bytes()
    except FileNotFoundError:
        raise DatasetFormatError(f"{source}: annotation file not found (the root should hold "
                                 f"{spec.annotation} and {IMAGE_DIR}/)") from None
    except OSError as err:
        raise DatasetFormatError(f"{source}: cannot read: {err.strerror or err}") from None
    try:
        text = data.decode("utf-8-sig")
    except UnicodeDecodeError as err:
        line = data.count(b"\n", 0, err.start) + 1
        column = err.start - (data.rfind(b"\n", 0, err.start) + 1) + 1
        raise DatasetFormatError(f"{source}: not UTF-8 at line {line} column {column}: "
                                 f"{err.reason}") from None
    try:
        items = json.loads(text)
    except json.JSONDecodeError as err:
        raise DatasetFormatError(f"{source}: invalid JSON at line {err.lineno} column "
                                 f"{err.colno}: {err.msg}") from None
    except RecursionError:
        raise DatasetFormatError(f"{source}: JSON nested too deeply") from None
    if not isinstance(items, list):
        raise DatasetFormatError(f"{source}: top level is a JSON {_json_type(items)}, "
                                 f"expected a list of records")
    return items


def _check_image_root(root: Path, image_root: str, spec: FormatSpec, fmt: str,
                      items: list[Any]) -> None:
    """A root without its image folder fails once, naming the folders tried and the layout
    the format expects, instead of once per record ("image not found") or, under
    ``on_bad_record=skip``, as a split with every record skipped."""
    if os.path.isdir(image_root):
        return
    tried = [image_root]
    found = ""
    first = next((item[spec.path_key] for item in items if isinstance(item, dict)
                  and isinstance(item.get(spec.path_key), str) and item[spec.path_key]), None)
    if first is not None:  # images unpacked straight into the root, without imgs/?
        tried.append(os.path.abspath(root))
        if os.path.isfile(root / first):
            found = f"; the first record's {first} is at {root / first}: move the images into " \
                    f"{IMAGE_DIR}/"
    entries = sorted(p.name + ("/" if p.is_dir() else "") for p in root.iterdir())
    holds = ", ".join(entries[:10]) + (f", ... ({len(entries)} entries)"
                                      if len(entries) > 10 else "")
    raise DatasetFormatError(
        f"{root}: no image folder {IMAGE_DIR}/ (folders tried: {', '.join(tried)}{found}); "
        f"{root} holds: {holds}. A {fmt} root holds {spec.annotation} and {IMAGE_DIR}/, "
        f"each record's {spec.path_key!r} relative to {IMAGE_DIR}/ ({spec.images})")


def _check_record(item: Any, spec: FormatSpec, fmt: str, image_root: str) -> _Checked:
    """Validate one record; raise `_BadRecord` naming the first problem found."""
    if not isinstance(item, dict):
        raise _BadRecord("malformed record", f"expected an object, got a JSON {_json_type(item)}")
    for key in ("id", "captions", spec.path_key, "split"):
        if key not in item:
            raise _BadRecord("missing key", f"missing key {key!r}")
    pid, captions, split, rel = item["id"], item["captions"], item["split"], item[spec.path_key]
    if not isinstance(pid, int) or isinstance(pid, bool):
        raise _BadRecord("wrong type", f"'id' must be an integer, got {_json_type(pid)}")
    if not isinstance(captions, list):
        raise _BadRecord("wrong type", f"'captions' must be a list of strings, "
                                       f"got {_json_type(captions)}")
    for i, caption in enumerate(captions):
        if not isinstance(caption, str):
            raise _BadRecord("wrong type", f"'captions' item {i} must be a string, "
                                           f"got {_json_type(caption)}")
    if not isinstance(split, str):
        raise _BadRecord("wrong type", f"'split' must be a string, got {_json_type(split)}")
    if not isinstance(rel, str):
        raise _BadRecord("wrong type", f"{spec.path_key!r} must be a string, "
                                       f"got {_json_type(rel)}")
    if split not in spec.splits:
        raise _BadRecord("unknown split", f"unknown split {split!r} ({fmt} has "
                                          f"{', '.join(spec.splits)})")
    if not captions:
        raise _BadRecord("no captions", "'captions' is empty")
    return _Checked(split, rel, pid, captions, _image_file(rel, spec, image_root))


def _image_file(rel: str, spec: FormatSpec, image_root: str) -> str:
    """Absolute path of an annotated image, which must stay inside imgs/, exist and be non-empty."""
    norm = posixpath.normpath(rel.replace("\\", "/")) if rel else ""
    if (not rel or rel.startswith(("/", "\\")) or PureWindowsPath(rel).drive
            or norm in (".", "..") or norm.startswith("../")):
        raise _BadRecord("unsafe path", f"{spec.path_key} {rel!r} is not a relative path inside "
                                        f"{IMAGE_DIR}/")
    path = os.path.join(image_root, *norm.split("/"))
    try:
        stat = os.stat(path)
    except OSError:
        raise _BadRecord("missing image", f"image not found: {path}") from None
    if not os.path.isfile(path):
        raise _BadRecord("missing image", f"image is not a file: {path}")
    if stat.st_size == 0:
        raise _BadRecord("empty image", f"image file is empty (0 bytes): {path}")
    return path


def _check_unique(rec: _Checked, spec: FormatSpec, index: int,
                  first_use: dict[str, int]) -> None:
    """Each image file belongs to one record: a repeat would count its captions twice and
    could give one image two person ids."""
    first = first_use.setdefault(rec.image_path, index)
    if first != index:
        raise _BadRecord("duplicate image", f"{spec.path_key} {rec.key!r} is the image of "
                                            f"record {first} already")


def _kept_captions(captions: list[str], on_bad_record: str, where: str) -> list[str]:
    """Stripped non-empty captions; an empty one is an error unless skipping."""
    kept = []
    for i, caption in enumerate(captions):
        if caption.strip():
            kept.append(caption.strip())
        elif on_bad_record == "error":
            raise DatasetFormatError(f"{where}: caption {i} is empty")
    return kept


def _decodable(records: list[Record], skipped: Counter[str]) -> list[Record]:
    """The records whose image decodes; each image that does not is counted once."""
    decodes: dict[str, bool] = {}
    for rec in records:
        if rec.image_path not in decodes:
            try:
                read_image(rec.image_path)
                decodes[rec.image_path] = True
            except DatasetFormatError:
                decodes[rec.image_path] = False
                skipped["undecodable image"] += 1
    return [rec for rec in records if decodes[rec.image_path]]


def _readable_split(item: Any, spec: FormatSpec) -> str | None:
    """The record's split when it is a valid one, else None (for skip accounting)."""
    split = item.get("split") if isinstance(item, dict) else None
    return split if isinstance(split, str) and split in spec.splits else None


def _split_counts(items: list[Any]) -> str:
    counts = Counter(str(item.get("split")) for item in items if isinstance(item, dict))
    return ", ".join(f"{split} ({n} records)" for split, n in sorted(counts.items())) or "none"


def _json_type(value: Any) -> str:
    names = {bool: "boolean", int: "integer", float: "number", str: "string", list: "array",
             dict: "object", type(None): "null"}
    return names.get(type(value), type(value).__name__)


def _to_rgb(image: Image.Image) -> Image.Image:
    """8-bit RGB copy of a decoded image."""
    if image.mode.startswith("I") or image.mode == "F":
        return Image.fromarray(_to_uint8(np.asarray(image), image.mode)).convert("RGB")
    if image.mode == "PA" or (image.mode == "P" and "transparency" in image.info):
        # Via RGBA, so palette transparency is dropped the way PIL documents.
        image = image.convert("RGBA")
    return image.convert("RGB")


def _to_uint8(pixels: np.ndarray, mode: str) -> np.ndarray:
    """Scale 16/32-bit integer or float grayscale pixels to 0..255."""
    values = pixels.astype(np.float64)
    if mode.startswith("I;16") or (mode == "I" and values.max(initial=0) > 255):
        values = np.clip(values, 0, 65535) / 257.0
    elif mode == "F" and values.max(initial=0) <= 1.0:
        values = values * 255.0
    return np.clip(np.rint(values), 0, 255).astype(np.uint8)
