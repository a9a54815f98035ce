"""Annotation readers on generated SynthPEDES files and on hand-written bad inputs."""

import json
import os
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from gckd_ray.config import load_config
from gckd_ray.data.datasets import build_split, build_unpaired, load_split, load_unpaired
from gckd_ray.config import DATASET_NAMES
from gckd_ray.data.datasets import load_domain
from gckd_ray.data.formats import (FORMATS, SYNTH_FORMATS, DatasetFormatError, DomainRecords,
                                   Record, read_annotations, read_image)
from gckd_ray.data.tokenizer import WordTokenizer
from gckd_ray.data.synthetic import MANIFEST, ensure_synthetic, generate

SCALE = 0.05
SYNTH = {"synth-cuhk": "cuhk-pedes", "synth-icfg": "icfg-pedes", "synth-rstp": "rstpreid"}


@pytest.fixture(scope="module")
def synth(tmp_path_factory) -> Path:
    """A small generation of the three domains (read-only for these tests)."""
    out = tmp_path_factory.mktemp("synth")
    generate(out, seed=0, scale=SCALE)
    return out


def _manifest(root: Path) -> dict:
    return json.loads((root / MANIFEST).read_text())["domains"]


# ---------------------------------------------------------------- readers on good data


@pytest.mark.parametrize("domain,split", [
    ("synth-cuhk", "train"), ("synth-cuhk", "val"), ("synth-cuhk", "test"),
    ("synth-icfg", "train"), ("synth-icfg", "test"),
    ("synth-rstp", "train"), ("synth-rstp", "val"), ("synth-rstp", "test")])
def test_reader_counts_match_generation(synth, domain, split):
    expected = _manifest(synth)[domain][split]
    got = read_annotations(SYNTH[domain], synth / domain, split, name=domain)
    assert len(got.records) == expected["captions"]
    assert len({r.image_key for r in got.records}) == expected["images"]
    assert len({r.pid for r in got.records}) == expected["ids"]
    assert got.skipped == {}
    assert got.summary() == (f"{domain}/{split}: {expected['captions']} captions, "
                             f"{expected['images']} images, {expected['ids']} ids")
    annotation = synth / domain / FORMATS[SYNTH[domain]].annotation
    for rec in got.records:
        assert rec.split == split and rec.source == str(annotation)
        assert Path(rec.image_path).is_absolute() and Path(rec.image_path).is_file()
        assert rec.caption == rec.caption.strip() and rec.caption
    indices = [r.index for r in got.records]
    assert indices == sorted(indices)  # file order


def test_record_fields_follow_the_file(synth):
    folder = synth / "synth-rstp"
    raw = json.loads((folder / "data_captions.json").read_text())
    got = read_annotations("rstpreid", folder, "train")
    first = raw[got.records[0].index]
    assert got.records[0] == Record(
        image_path=os.path.abspath(folder / "imgs" / first["img_path"]),
        image_key=first["img_path"], caption=first["captions"][0], pid=first["id"],
        split="train", source=str(folder / "data_captions.json"), index=got.records[0].index)


def test_synth_domain_is_readable_under_its_real_format_name(synth):
    for domain, fmt in SYNTH.items():
        got = load_domain(fmt, str(synth / domain), "test")
        assert got.name == fmt
        assert len(got.records) == _manifest(synth)[domain]["test"]["captions"]


def test_load_domain_synth_with_empty_root_uses_the_cache(tmp_path):
    cache = tmp_path / "cache"
    got = load_domain("synth-icfg", "", "test", synth_seed=3, synth_cache=str(cache),
                      synth_scale=SCALE)
    folder = ensure_synthetic(str(cache), seed=3, scale=SCALE)
    assert folder.parent == cache
    assert all(Path(r.image_path).is_relative_to(folder / "synth-icfg") for r in got.records)
    stamp = (folder / MANIFEST).stat().st_mtime_ns
    again = load_domain("synth-icfg", "", "test", synth_seed=3, synth_cache=str(cache),
                        synth_scale=SCALE)
    assert again.records == got.records
    assert (folder / MANIFEST).stat().st_mtime_ns == stamp
    assert [p.name for p in cache.iterdir()] == [folder.name]


def test_config_dataset_names_are_the_readers_formats_and_synth_domains():
    assert DATASET_NAMES == (*FORMATS, *SYNTH_FORMATS)


def test_load_domain_rejects_unknown_names_and_missing_roots():
    with pytest.raises(ValueError, match="unknown dataset 'market'"):
        load_domain("market", "/x", "train")
    with pytest.raises(ValueError, match="needs a root"):
        load_domain("cuhk-pedes", "", "train")
    with pytest.raises(ValueError, match="unknown annotation format"):
        read_annotations("market", "/x", "train")
    with pytest.raises(ValueError, match="on_bad_record"):
        read_annotations("cuhk-pedes", "/x", "train", on_bad_record="ignore")


# ---------------------------------------------------------------- hand-written datasets


def _write_png(path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.full((8, 4, 3), 128, np.uint8)).save(path)


def _record(fmt: str, pid: int, split: str = "train", captions=None) -> dict:
    """A good record whose image file `_make` creates."""
    captions = [f"a person number {pid}.", f"person {pid} walks."] if captions is None \
        else captions
    key = FORMATS[fmt].path_key
    rel = f"{pid:04d}_c1_0.png" if fmt == "rstpreid" else f"{split}/{pid:04d}/{pid:04d}_0.png"
    return {"split": split, "captions": captions, key: rel, "id": pid}


def _make(root: Path, fmt: str, records: list) -> Path:
    """Write an annotation file, and an image for every record with a plain relative path
    except those under missing/."""
    key = FORMATS[fmt].path_key
    for rec in records:
        rel = rec.get(key) if isinstance(rec, dict) else None
        if (isinstance(rel, str) and rel and not rel.startswith(("/", "missing/"))
                and ".." not in rel):
            _write_png(root / "imgs" / rel)
    path = root / FORMATS[fmt].annotation
    path.write_text(json.dumps(records))
    return path


def _dataset_with_bad(tmp_path: Path, fmt: str, bad: dict | list) -> Path:
    """Records 0, 1, 3 good (2 captions each), record 2 = `bad`."""
    records = [_record(fmt, 1), _record(fmt, 2), bad, _record(fmt, 4)]
    return _make(tmp_path, fmt, records)


def _without(rec: dict, key: str) -> dict:
    return {k: v for k, v in rec.items() if k != key}


def _with(rec: dict, **changes) -> dict:
    return {**rec, **changes}


# name -> (make the bad record from a good one, skip cause, error text)
BAD_RECORDS = {
    "not an object": (lambda fmt, r: ["train", 3], "malformed record",
                      "expected an object, got a JSON array"),
    "missing captions": (lambda fmt, r: _without(r, "captions"), "missing key",
                         "missing key 'captions'"),
    "missing id": (lambda fmt, r: _without(r, "id"), "missing key", "missing key 'id'"),
    "missing split": (lambda fmt, r: _without(r, "split"), "missing key", "missing key 'split'"),
    "missing path": (lambda fmt, r: _without(r, FORMATS[fmt].path_key), "missing key",
                     "missing key '{key}'"),
    "captions a string": (lambda fmt, r: _with(r, captions="a man."), "wrong type",
                          "'captions' must be a list of strings, got string"),
    "caption a number": (lambda fmt, r: _with(r, captions=["a man.", 7]), "wrong type",
                         "'captions' item 1 must be a string, got integer"),
    "no captions": (lambda fmt, r: _with(r, captions=[]), "no captions", "'captions' is empty"),
    "id a string": (lambda fmt, r: _with(r, id="3"), "wrong type",
                    "'id' must be an integer, got string"),
    "id a bool": (lambda fmt, r: _with(r, id=True), "wrong type",
                  "'id' must be an integer, got boolean"),
    "id a float": (lambda fmt, r: _with(r, id=3.0), "wrong type",
                   "'id' must be an integer, got number"),
    "path a number": (lambda fmt, r: _with(r, **{FORMATS[fmt].path_key: 5}), "wrong type",
                      "'{key}' must be a string, got integer"),
    "unknown split": (lambda fmt, r: _with(r, split="dev"), "unknown split",
                      "unknown split 'dev' ({fmt} has"),
    "absolute path": (lambda fmt, r: _with(r, **{FORMATS[fmt].path_key: "/etc/passwd"}),
                      "unsafe path", "'/etc/passwd' is not a relative path inside imgs/"),
    "escaping path": (lambda fmt, r: _with(r, **{FORMATS[fmt].path_key: "a/../../x.png"}),
                      "unsafe path", "'a/../../x.png' is not a relative path inside imgs/"),
    "drive path": (lambda fmt, r: _with(r, **{FORMATS[fmt].path_key: "C:\\x.png"}),
                   "unsafe path", "is not a relative path inside imgs/"),
    "missing image": (lambda fmt, r: _with(r, **{FORMATS[fmt].path_key: "missing/3.png"}),
                      "missing image", "image not found: "),
    "duplicate record": (lambda fmt, r: _record(fmt, 1), "duplicate image",
                         "is the image of record 0 already"),
    "duplicate image spelt differently": (
        lambda fmt, r: _with(r, **{FORMATS[fmt].path_key:
                                   "./" + _record(fmt, 1)[FORMATS[fmt].path_key]}),
        "duplicate image", "is the image of record 0 already"),
}


@pytest.mark.parametrize("fmt", list(FORMATS))
@pytest.mark.parametrize("case", list(BAD_RECORDS))
def test_bad_record_error_names_file_and_index(tmp_path, fmt, case):
    make, _, text = BAD_RECORDS[case]
    annotation = _dataset_with_bad(tmp_path, fmt, make(fmt, _record(fmt, 3)))
    with pytest.raises(DatasetFormatError) as err:
        read_annotations(fmt, tmp_path, "train")
    message = str(err.value)
    assert message.startswith(f"{annotation}: record 2: ")
    assert text.format(key=FORMATS[fmt].path_key, fmt=fmt) in message


@pytest.mark.parametrize("fmt", list(FORMATS))
@pytest.mark.parametrize("case", list(BAD_RECORDS))
def test_bad_record_skip_counts_the_cause(tmp_path, fmt, case):
    make, cause, _ = BAD_RECORDS[case]
    _dataset_with_bad(tmp_path, fmt, make(fmt, _record(fmt, 3)))
    got = read_annotations(fmt, tmp_path, "train", on_bad_record="skip", name="toy")
    assert [r.pid for r in got.records] == [1, 1, 2, 2, 4, 4]
    assert got.skipped == {cause: 1}
    assert got.summary() == f"toy/train: 6 captions, 3 images, 3 ids; skipped 1 ({cause}: 1)"


def test_zero_byte_image_both_policies(tmp_path):
    _dataset_with_bad(tmp_path, "cuhk-pedes", _record("cuhk-pedes", 3))
    image = tmp_path / "imgs" / "train" / "0003" / "0003_0.png"
    image.write_bytes(b"")
    with pytest.raises(DatasetFormatError,
                       match=rf"reid_raw.json: record 2: image file is empty \(0 bytes\): .*"
                             rf"{image.name}"):
        read_annotations("cuhk-pedes", tmp_path, "train")
    got = read_annotations("cuhk-pedes", tmp_path, "train", on_bad_record="skip")
    assert got.skipped == {"empty image": 1} and len(got.records) == 6


def test_empty_caption_drops_only_that_caption(tmp_path):
    annotation = _dataset_with_bad(tmp_path, "icfg-pedes",
                                   _record("icfg-pedes", 3, captions=["a man.", "  \n"]))
    with pytest.raises(DatasetFormatError) as err:
        read_annotations("icfg-pedes", tmp_path, "train")
    assert str(err.value) == f"{annotation}: record 2: caption 1 is empty"
    got = read_annotations("icfg-pedes", tmp_path, "train", on_bad_record="skip")
    assert [(r.pid, r.caption) for r in got.records if r.pid == 3] == [(3, "a man.")]
    assert got.skipped == {"empty caption": 1}
    assert got.summary().endswith("; skipped 1 (empty caption: 1)")


def test_summary_orders_causes_by_count(tmp_path):
    records = [_record("rstpreid", 1), _with(_record("rstpreid", 2), img_path="missing/a.png"),
               _record("rstpreid", 3, captions=["a man.", ""]),
               _with(_record("rstpreid", 4), img_path="missing/b.png")]
    _make(tmp_path, "rstpreid", records)
    got = read_annotations("rstpreid", tmp_path, "train", on_bad_record="skip")
    assert got.summary() == ("rstpreid/train: 3 captions, 2 images, 2 ids; "
                             "skipped 3 (missing image: 2, empty caption: 1)")


def test_bad_record_of_another_split(tmp_path):
    bad = _without(_record("cuhk-pedes", 3, split="test"), "captions")
    annotation = _dataset_with_bad(tmp_path, "cuhk-pedes", bad)
    # The whole file is validated: a bad test record fails a train load.
    with pytest.raises(DatasetFormatError, match=f"{annotation}: record 2: missing key"):
        read_annotations("cuhk-pedes", tmp_path, "train")
    # Skipped, it is counted where it belongs; the test split is then empty.
    train = read_annotations("cuhk-pedes", tmp_path, "train", on_bad_record="skip")
    assert train.skipped == {} and len(train.records) == 6
    with pytest.raises(DatasetFormatError, match=r"split 'test' has no usable records .*"
                                                 r"skipped 1 \(missing key: 1\)"):
        read_annotations("cuhk-pedes", tmp_path, "test", on_bad_record="skip")


def test_unreadable_split_is_counted_in_every_load(tmp_path):
    records = [_record("cuhk-pedes", 1), _record("cuhk-pedes", 2, split="test"),
               _with(_record("cuhk-pedes", 3), split=None)]
    _make(tmp_path, "cuhk-pedes", records)
    for split in ("train", "test"):
        got = read_annotations("cuhk-pedes", tmp_path, split, on_bad_record="skip")
        assert got.skipped == {"wrong type": 1}


def test_split_the_format_lacks(tmp_path):
    annotation = _make(tmp_path, "icfg-pedes", [_record("icfg-pedes", 1)])
    with pytest.raises(DatasetFormatError) as err:
        read_annotations("icfg-pedes", tmp_path, "val")
    assert str(err.value) == f"{annotation}: no split 'val'; icfg-pedes has splits train, test"


def test_split_without_records(tmp_path):
    annotation = _make(tmp_path, "rstpreid", [_record("rstpreid", 1)])
    with pytest.raises(DatasetFormatError, match=rf"{annotation}: split 'val' has no usable "
                                                 rf"records .*splits present: train \(1"):
        read_annotations("rstpreid", tmp_path, "val")


# ---------------------------------------------------------------- broken annotation files


@pytest.mark.parametrize("policy", ["error", "skip"])
@pytest.mark.parametrize("content,text", [
    (b'[{"split": "train",\n "captions": ["a"', "invalid JSON at line 2 column"),
    (b'[{"split": "train",\n  "id": 3}, }]', "invalid JSON at line 2 column 13"),
    (b'[{"split": "tr\xe9in"}]', "not UTF-8 at line 1 column 15"),
    (b'{"split": "train"}', "top level is a JSON object, expected a list of records"),
    (b'"hello"', "top level is a JSON string"),
])
def test_broken_annotation_file(tmp_path, policy, content, text):
    annotation = tmp_path / "reid_raw.json"
    annotation.write_bytes(content)
    with pytest.raises(DatasetFormatError) as err:
        read_annotations("cuhk-pedes", tmp_path, "train", on_bad_record=policy)
    assert str(err.value).startswith(f"{annotation}: ")
    assert text in str(err.value)


def test_missing_annotation_file(tmp_path):
    with pytest.raises(DatasetFormatError, match=rf"{tmp_path / 'data_captions.json'}: "
                                                 r"annotation file not found"):
        read_annotations("rstpreid", tmp_path, "train")


def test_domain_records_summary_without_skips():
    recs = [Record("/i/a.png", "a.png", "x", 1, "train", "f.json", 0),
            Record("/i/a.png", "a.png", "y", 1, "train", "f.json", 0),
            Record("/i/b.png", "b.png", "z", 9, "train", "f.json", 1)]
    assert DomainRecords("toy", "train", recs, {}).summary() == \
        "toy/train: 3 captions, 2 images, 2 ids"


# ---------------------------------------------------------------- read_image


def test_read_image_converts_modes_to_rgb_uint8(tmp_path):
    gray = np.arange(48, dtype=np.uint8).reshape(8, 6) * 5
    Image.fromarray(gray, "L").save(tmp_path / "l.png")
    rgba = np.zeros((8, 6, 4), np.uint8)
    rgba[..., 0], rgba[..., 3] = 200, 0
    Image.fromarray(rgba, "RGBA").save(tmp_path / "rgba.png")
    deep = (np.arange(48, dtype=np.uint16).reshape(8, 6) * 1300)
    Image.fromarray(deep).save(tmp_path / "i16.png")
    palette = Image.new("P", (6, 8))
    palette.putpalette([10, 20, 30, 200, 100, 50] + [0] * 762)
    palette.info["transparency"] = 1
    palette.save(tmp_path / "p.png")
    assert Image.open(tmp_path / "i16.png").mode.startswith("I")

    for name in ("l.png", "rgba.png", "i16.png", "p.png"):
        image = read_image(str(tmp_path / name))
        assert image.mode == "RGB" and image.size == (6, 8)
        assert np.asarray(image).dtype == np.uint8
    assert (np.asarray(read_image(str(tmp_path / "l.png")))[..., 1] == gray).all()
    assert (np.asarray(read_image(str(tmp_path / "rgba.png")))[..., 0] == 200).all()
    scaled = np.asarray(read_image(str(tmp_path / "i16.png")))[..., 0].astype(int)
    assert np.abs(scaled - deep / 257).max() <= 0.5 + 1e-9
    assert tuple(np.asarray(read_image(str(tmp_path / "p.png")))[0, 0]) == (10, 20, 30)


@pytest.mark.parametrize("kind,text", [
    ("missing", "cannot read image"), ("zero-byte", "image file is empty (0 bytes)"),
    ("truncated", "cannot decode image"), ("text", "cannot decode image"),
    ("truncated-jpeg", "cannot decode image")])
def test_read_image_bad_files_name_the_path(tmp_path, kind, text):
    path = tmp_path / f"{kind}.png"
    noise = np.random.default_rng(0).integers(0, 256, (64, 64, 3), dtype=np.uint8)
    if kind == "zero-byte":
        path.write_bytes(b"")
    elif kind == "truncated":
        Image.fromarray(noise).save(path)
        path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    elif kind == "text":
        path.write_text("not an image at all")
    elif kind == "truncated-jpeg":
        Image.fromarray(noise).save(path, format="JPEG")
        path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    with pytest.raises(DatasetFormatError) as err:
        read_image(str(path), source="/data/reid_raw.json", index=17)
    message = str(err.value)
    assert message.startswith("/data/reid_raw.json: record 17: ")
    assert text in message and str(path) in message


# ---------------------------------------------------------------- bad images through the datasets


def _spoil(path: Path, kind: str) -> None:
    """Replace an image file with a truncated PNG / JPEG or with text."""
    noise = np.random.default_rng(0).integers(0, 256, (64, 64, 3), dtype=np.uint8)
    if kind == "text":
        path.write_text("not an image at all")
        return
    Image.fromarray(noise).save(path, format="JPEG" if kind == "truncated-jpeg" else "PNG")
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])


def _tokenizer(domain: DomainRecords) -> WordTokenizer:
    return WordTokenizer.build(r.caption for r in domain.records)


@pytest.mark.parametrize("kind", ["truncated-png", "truncated-jpeg", "text"])
@pytest.mark.parametrize("cache", [True, False])
def test_undecodable_image_names_file_and_record(tmp_path, kind, cache):
    annotation = _dataset_with_bad(tmp_path, "cuhk-pedes", _record("cuhk-pedes", 3))
    image = tmp_path / "imgs" / "train" / "0003" / "0003_0.png"
    _spoil(image, kind)
    domain = read_annotations("cuhk-pedes", tmp_path, "train")  # only stat()s the files
    with pytest.raises(DatasetFormatError) as err:
        split = build_split(domain, _tokenizer(domain), 8, (8, 4), cache_images=cache)
        split.images.fetch(torch.arange(len(split.images)))  # lazy decoding fails here
    message = str(err.value)
    assert message.startswith(f"{annotation}: record 2: cannot decode image {image}: ")


@pytest.mark.parametrize("kind", ["truncated-png", "truncated-jpeg", "text"])
def test_undecodable_image_is_skipped_and_counted(tmp_path, kind):
    _dataset_with_bad(tmp_path, "rstpreid", _record("rstpreid", 3))
    _spoil(tmp_path / "imgs" / "0003_c1_0.png", kind)
    got = read_annotations("rstpreid", tmp_path, "train", on_bad_record="skip")
    assert [r.pid for r in got.records] == [1, 1, 2, 2, 4, 4]
    assert got.skipped == {"undecodable image": 1}


def test_grayscale_rgba_and_16_bit_images_are_converted_in_a_split(tmp_path):
    _make(tmp_path, "icfg-pedes", [_record("icfg-pedes", pid) for pid in (1, 2, 3)])
    folder = tmp_path / "imgs" / "train"
    gray = np.arange(32, dtype=np.uint8).reshape(8, 4) * 7
    Image.fromarray(gray, "L").save(folder / "0001" / "0001_0.png")
    Image.fromarray(np.full((8, 4, 4), 90, np.uint8), "RGBA").save(folder / "0002" / "0002_0.png")
    Image.fromarray(np.full((8, 4), 40000, np.uint16)).save(folder / "0003" / "0003_0.png")
    domain = read_annotations("icfg-pedes", tmp_path, "train")
    split = build_split(domain, _tokenizer(domain), 8, (8, 4), cache_images=False)
    images = split.images.fetch(torch.arange(3))
    assert images.shape == (3, 3, 8, 4) and images.dtype == torch.uint8
    assert torch.equal(images[0, 1], torch.from_numpy(gray))
    assert (images[1] == 90).all() and (images[2] == round(40000 / 257)).all()


def _config_at(root: Path, *overrides: str):
    return load_config(None, ["data.source.name=cuhk-pedes", f"data.source.root={root}",
                              "data.target.name=cuhk-pedes", f"data.target.root={root}",
                              "data.text_length=8", *overrides])


def test_long_captions_are_truncated_and_counted_at_start_up(tmp_path, capsys):
    long = "a man in a red coat and blue jeans walks with a black bag."
    _make(tmp_path, "cuhk-pedes", [_record("cuhk-pedes", 1, captions=[long, "a man."]),
                                   _record("cuhk-pedes", 2)])
    cfg = _config_at(tmp_path)
    domain = read_annotations("cuhk-pedes", tmp_path, "train")
    split = load_split(cfg, cfg.data.source, "train", _tokenizer(domain), verbose=True)
    assert len(split.captions) == 4 and split.captions.truncated == 1
    target = load_unpaired(cfg, _tokenizer(domain), verbose=True)
    assert target.captions.truncated == 1
    out = capsys.readouterr().out.splitlines()
    assert out.count("cuhk-pedes/train: 1 captions truncated to 8 tokens") == 2


def test_skip_counts_per_cause_are_printed_at_start_up(tmp_path, capsys):
    records = [_record("cuhk-pedes", 1), _record("cuhk-pedes", 1),
               _with(_record("cuhk-pedes", 2), file_path="../x.png"),
               _record("cuhk-pedes", 3, captions=["a man.", " "]), _record("cuhk-pedes", 4)]
    _make(tmp_path, "cuhk-pedes", records)
    _spoil(tmp_path / "imgs" / "train" / "0004" / "0004_0.png", "truncated-png")
    cfg = _config_at(tmp_path, "data.on_bad_record=skip")
    domain = read_annotations("cuhk-pedes", tmp_path, "train", on_bad_record="skip")
    load_split(cfg, cfg.data.source, "train", _tokenizer(domain), verbose=True)
    load_unpaired(cfg, _tokenizer(domain), verbose=True)
    summary = ("cuhk-pedes/train: 3 captions, 2 images, 2 ids; skipped 4 (duplicate image: 1, "
               "empty caption: 1, undecodable image: 1, unsafe path: 1)")
    assert capsys.readouterr().out.splitlines() == [summary, summary]


# ---------------------------------------------------------------- data.on_bad_image=skip


def _person_with_two_images(tmp_path: Path) -> tuple[Path, Path]:
    """cuhk-pedes train split: persons 1, 2, 4 with one image, person 3 with two; returns
    (person 3's first image, its second)."""
    second = _with(_record("cuhk-pedes", 3), file_path="train/0003/0003_1.png")
    _make(tmp_path, "cuhk-pedes", [_record("cuhk-pedes", 1), _record("cuhk-pedes", 3),
                                   _record("cuhk-pedes", 2), second, _record("cuhk-pedes", 4)])
    folder = tmp_path / "imgs" / "train" / "0003"
    return folder / "0003_0.png", folder / "0003_1.png"


@pytest.mark.parametrize("cache", [True, False])
def test_skip_replaces_a_bad_image_by_the_next_image_of_the_same_person(tmp_path, cache):
    from gckd_ray.data.bad_images import BadImages

    bad_file, stand_in = _person_with_two_images(tmp_path)
    Image.fromarray(np.full((8, 4, 3), 200, np.uint8)).save(stand_in)
    _spoil(bad_file, "truncated-jpeg")
    domain = read_annotations("cuhk-pedes", tmp_path, "train")
    bad = BadImages()
    split = build_split(domain, _tokenizer(domain), 8, (8, 4), cache_images=cache, bad_images=bad)
    rows = torch.arange(len(split.images))
    images = split.images.fetch(rows)
    assert split.images.paths[1] == str(bad_file) and split.images.paths[3] == str(stand_in)
    assert torch.equal(images[1], images[3]) and (images[1] == 200).all()
    assert len(split.images) == 5 and split.image_labels.tolist() == [0, 2, 1, 2, 3]
    assert torch.equal(split.images.fetch(rows), images)  # the same stand-in every time
    assert bad.files() == [str(bad_file)]  # counted once, however often it is read


def test_skip_replaces_a_bad_target_training_image_by_the_next_image(tmp_path):
    from gckd_ray.data.bad_images import BadImages

    _dataset_with_bad(tmp_path, "rstpreid", _record("rstpreid", 3))
    _spoil(tmp_path / "imgs" / "0003_c1_0.png", "text")
    domain = read_annotations("rstpreid", tmp_path, "train")
    bad = BadImages()
    target = build_unpaired(domain, _tokenizer(domain), 8, (8, 4), cache_images=False,
                            bad_images=bad)
    paths = target.images.paths  # sorted by key, no ids: the stand-in is the next image
    row = paths.index(str(tmp_path / "imgs" / "0003_c1_0.png"))
    images = target.images.fetch(torch.arange(len(paths)))
    assert torch.equal(images[row], images[row + 1])
    assert bad.files() == [paths[row]]


def test_skip_fails_when_no_image_of_the_person_decodes(tmp_path):
    from gckd_ray.data.bad_images import BadImages

    bad_file, stand_in = _person_with_two_images(tmp_path)
    _spoil(bad_file, "truncated-png")
    _spoil(stand_in, "text")
    domain = read_annotations("cuhk-pedes", tmp_path, "train")
    bad = BadImages()
    with pytest.raises(DatasetFormatError, match=r"record 1: image .*0003_0.png does not decode, "
                                                 r"nor does any other image of person 3"):
        build_split(domain, _tokenizer(domain), 8, (8, 4), cache_images=True, bad_images=bad)
    assert bad.files() == [str(bad_file), str(stand_in)]


@pytest.mark.parametrize("fmt", list(FORMATS))
def test_a_root_without_imgs_names_the_folders_tried_and_the_layout(tmp_path, fmt):
    _make(tmp_path, fmt, [_record(fmt, 1), _record(fmt, 2)])
    (tmp_path / "imgs").rename(tmp_path / "images")
    for policy in ("error", "skip"):
        with pytest.raises(DatasetFormatError) as err:
            read_annotations(fmt, tmp_path, "train", on_bad_record=policy)
        message = str(err.value)
        assert message.startswith(f"{tmp_path}: no image folder imgs/ (folders tried: "
                                  f"{tmp_path / 'imgs'}, {tmp_path}); {tmp_path} holds: "
                                  f"{', '.join(sorted([FORMATS[fmt].annotation, 'images/']))}. "
                                  f"A {fmt} root holds "
                                  f"{FORMATS[fmt].annotation} and imgs/")
        assert FORMATS[fmt].images in message


def test_a_root_with_the_images_unpacked_beside_the_annotation_says_where_they_are(tmp_path):
    _make(tmp_path, "rstpreid", [_record("rstpreid", 1), _record("rstpreid", 2)])
    for image in (tmp_path / "imgs").iterdir():
        image.rename(tmp_path / image.name)
    (tmp_path / "imgs").rmdir()
    with pytest.raises(DatasetFormatError, match=r"the first record's 0001_c1_0.png is at "
                                                 rf"{tmp_path}/0001_c1_0.png: move the images "
                                                 r"into imgs/"):
        read_annotations("rstpreid", tmp_path, "train")


def test_train_stops_on_a_root_without_imgs_before_ray_starts(tmp_path, capsys):
    import ray

    from gckd_ray.train import main

    _make(tmp_path / "data", "icfg-pedes", [_record("icfg-pedes", p) for p in range(1, 5)])
    (tmp_path / "data" / "imgs").rename(tmp_path / "data" / "pictures")
    ray_before = ray.is_initialized()  # other tests of the session may have started Ray
    code = main(["data.target.name=icfg-pedes", f"data.target.root={tmp_path / 'data'}",
                 f"run.output_dir={tmp_path / 'run'}", "data.on_bad_image=skip"])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1
    assert err[0].startswith(f"data error: {tmp_path / 'data'}: no image folder imgs/ "
                             f"(folders tried: {tmp_path / 'data' / 'imgs'}")
    assert ray.is_initialized() == ray_before and not (tmp_path / "run" / "ray").exists()
