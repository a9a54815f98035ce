"""SynthPEDES: layout in the real formats, determinism, the cache, captions, domain gap."""

import hashlib
import json
import multiprocessing
import re
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from gckd_ray.data import synthetic
from gckd_ray.data.formats import FORMATS
from gckd_ray.data.synthetic import (CAPTION_STYLES, DOMAIN_STYLES, GENERATOR_VERSION, MANIFEST,
                                     ensure_synthetic, generate)

SCALE = 0.05


@pytest.fixture(scope="module")
def synth(tmp_path_factory) -> Path:
    """A small generation of the three domains (read-only for these tests)."""
    out = tmp_path_factory.mktemp("synth")
    generate(out, seed=0, scale=SCALE)
    return out


def _annotations(root: Path, domain: str) -> list[dict]:
    fmt = DOMAIN_STYLES[domain].fmt
    return json.loads((root / domain / FORMATS[fmt].annotation).read_text())


def _path_key(domain: str) -> str:
    return FORMATS[DOMAIN_STYLES[domain].fmt].path_key


def _tree_digest(root: Path) -> dict[str, str]:
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*")) if p.is_file()}


# ---------------------------------------------------------------- layout


@pytest.mark.parametrize("domain", list(DOMAIN_STYLES))
def test_domain_written_in_its_real_format(synth, domain):
    style = DOMAIN_STYLES[domain]
    records = _annotations(synth, domain)
    key = _path_key(domain)
    expected_keys = ({"id", "img_path", "captions", "split"} if style.fmt == "rstpreid"
                     else {"split", "captions", "file_path", "processed_tokens", "id"})
    assert all(set(r) == expected_keys for r in records)
    counts = json.loads((synth / MANIFEST).read_text())["domains"][domain]
    assert list(counts) == [split for split, _ in style.ids]
    for split, n_ids in style.ids:
        split_records = [r for r in records if r["split"] == split]
        assert counts[split]["ids"] == synthetic.scaled_ids(n_ids, SCALE)
        assert len({r["id"] for r in split_records}) == counts[split]["ids"]
        assert len(split_records) == counts[split]["images"] == \
            counts[split]["ids"] * style.images_per_id
    for r in records:
        assert len(r["captions"]) == style.captions_per_image
        assert len(set(r["captions"])) == len(r["captions"])  # captions of an image differ
        if "processed_tokens" in r:
            assert r["processed_tokens"] == [synthetic.tokens(c) for c in r["captions"]]
        with Image.open(synth / domain / "imgs" / r[key]) as image:
            assert image.mode == "RGB" and image.size == (style.width, style.height)
    # ids are unique per person across splits (each id in exactly one split)
    split_of = {}
    for r in records:
        assert split_of.setdefault(r["id"], r["split"]) == r["split"]


def test_paths_look_like_the_published_datasets(synth):
    cuhk = _annotations(synth, "synth-cuhk")
    assert all(re.fullmatch(r"CUHK01/\d{6}_\d\.png", r["file_path"]) for r in cuhk)
    assert sorted({r["id"] for r in cuhk}) == list(range(1, len({r["id"] for r in cuhk}) + 1))
    icfg = _annotations(synth, "synth-icfg")
    assert all(re.fullmatch(rf"{r['split']}/(\d{{4}})/\1_\d\.png", r["file_path"]) for r in icfg)
    rstp = _annotations(synth, "synth-rstp")
    assert all(re.fullmatch(r"\d{4}_c\d+_\d\.png", r["img_path"]) for r in rstp)


def test_generate_refuses_to_overwrite(synth):
    with pytest.raises(FileExistsError, match="synth-cuhk"):
        generate(synth, seed=0, scale=SCALE)


# ---------------------------------------------------------------- determinism


def test_same_seed_same_bytes_different_seed_different(synth, tmp_path):
    generate(tmp_path / "again", seed=0, scale=SCALE)
    generate(tmp_path / "other", seed=1, scale=SCALE)
    first, again, other = (_tree_digest(synth), _tree_digest(tmp_path / "again"),
                           _tree_digest(tmp_path / "other"))
    assert first == again
    for domain in DOMAIN_STYLES:
        annotation = f"{domain}/{FORMATS[DOMAIN_STYLES[domain].fmt].annotation}"
        assert first[annotation] != other[annotation]
    shared_images = [k for k in first if k.endswith(".png") and k in other]
    assert shared_images and all(first[k] != other[k] for k in shared_images)


def test_a_larger_scale_keeps_the_first_people(synth, tmp_path):
    # Every person has its own random stream, so scale only adds people.
    generate(tmp_path, seed=0, scale=SCALE * 2)
    small, large = _annotations(synth, "synth-rstp"), _annotations(tmp_path, "synth-rstp")
    train = [r for r in small if r["split"] == "train"]
    assert [r for r in large if r["split"] == "train"][:len(train)] == train


# ---------------------------------------------------------------- cache


def test_ensure_synthetic_reuses_cache_and_ignores_leftover_temp(tmp_path):
    name = f"v{GENERATOR_VERSION}-seed5-scale0.03-{synthetic.style_digest()}"
    leftover = tmp_path / f".{name}.tmp-crashed"
    (leftover / "synth-cuhk").mkdir(parents=True)  # a crashed run's half-written copy
    folder = ensure_synthetic(str(tmp_path), seed=5, scale=0.03)
    assert folder == tmp_path / name
    assert {p.name for p in folder.iterdir()} == {*DOMAIN_STYLES, MANIFEST}
    stamps = {p: p.stat().st_mtime_ns for p in folder.rglob("*")}
    assert ensure_synthetic(str(tmp_path), seed=5, scale=0.03) == folder
    assert {p: p.stat().st_mtime_ns for p in folder.rglob("*")} == stamps
    assert {p.name for p in tmp_path.iterdir()} == {name, leftover.name}


def test_ensure_synthetic_refuses_an_incomplete_folder(tmp_path):
    name = f"v{GENERATOR_VERSION}-seed0-scale0.03-{synthetic.style_digest()}"
    (tmp_path / name / "synth-cuhk").mkdir(parents=True)
    with pytest.raises(RuntimeError, match="no complete generation"):
        ensure_synthetic(str(tmp_path), seed=0, scale=0.03)


def _ensure(cache: str) -> str:
    return str(ensure_synthetic(cache, seed=2, scale=0.03))


def test_ensure_synthetic_racing_processes_agree(tmp_path):
    with multiprocessing.get_context("spawn").Pool(2) as pool:
        folders = pool.map(_ensure, [str(tmp_path)] * 2)
    assert folders[0] == folders[1]
    assert [p.name for p in tmp_path.iterdir()] == [Path(folders[0]).name]  # loser cleaned up
    assert (Path(folders[0]) / MANIFEST).is_file()


# ---------------------------------------------------------------- captions


def _person(**wanted) -> synthetic.Person:
    """The first sampled person with the `wanted` attributes; by default one with every
    attribute present (lower garment, bag, hat)."""
    rng = np.random.default_rng(0)
    for _ in range(10_000):
        p = synthetic.sample_person(rng)
        if (all(getattr(p, k) == v for k, v in wanted.items()) if wanted
                else p.lower and p.bag and p.hat_colour):
            return p
    raise AssertionError(f"no person with {wanted}")


@pytest.mark.parametrize("style_name", list(CAPTION_STYLES))
def test_templates_mention_each_attribute_once(style_name):
    slots = {a: f"<{a}>" for a in synthetic.ATTRIBUTES}
    slots.update(worn="<upper> <lower> <shoes> <hat>", Subj="S", Pron="P", poss="q", obj="o")
    for template in CAPTION_STYLES[style_name].templates:
        text = synthetic.fill_template(template, slots)
        for attr in synthetic.ATTRIBUTES:
            assert text.count(f"<{attr}>") == 1, (template, attr)
        minimal = synthetic.fill_template(template, {k: v for k, v in slots.items()
                                                      if k not in ("hair", "lower", "shoes",
                                                                   "bag", "hat")}
                                          | {"worn": "<upper>"})
        assert "<upper>" in minimal and not re.search(r"[\[\]{}]|  |\.\.", minimal)


@pytest.mark.parametrize("prob,expected", [(0.0, 3), (1.0, 6)])
def test_caption_mentions_at_least_three_attributes(prob, expected):
    style = replace(DOMAIN_STYLES["synth-cuhk"], mention_prob=prob, synonym_prob=0.0)
    person = _person()
    words = {"hair": "hair", "upper": person.upper, "lower": person.lower, "shoes": "shoes",
             "bag": person.bag, "hat": " hat"}
    for seed in range(20):
        text = synthetic.caption(person, style, np.random.default_rng(seed))
        assert sum(w in text for w in words.values()) == expected, text
        assert person.upper_colour in text and text.endswith(".") and text[0].isupper()


def test_dress_has_no_lower_garment_phrase():
    person = _person(upper="dress")
    assert person.lower is None and person.gender == "woman"
    style = DOMAIN_STYLES["synth-rstp"]
    for seed in range(20):
        text = synthetic.caption(person, style, np.random.default_rng(seed))
        assert not re.search(r"[\[\]{}]", text)


# ---------------------------------------------------------------- domain gap


def _test_images(root: Path, domain: str) -> list[np.ndarray]:
    key = _path_key(domain)
    paths = [root / domain / "imgs" / r[key] for r in _annotations(root, domain)
             if r["split"] == "test"]
    return [np.asarray(Image.open(p), dtype=np.float64) for p in paths]


def test_images_differ_between_domains(synth):
    stats = {}
    for domain in DOMAIN_STYLES:
        images = _test_images(synth, domain)
        corners = np.stack([im[:4, :4].reshape(-1, 3) for im in images])  # background
        stats[domain] = (np.mean([im.mean() for im in images]), corners.mean(),
                         np.mean([im[:, :4].std() for im in images]))
    # cuhk: plain light background; icfg: dimmer, low-contrast clutter; rstp: sky/road gradient.
    assert stats["synth-cuhk"][1] > 200 > stats["synth-icfg"][1] + 30
    assert stats["synth-cuhk"][0] > stats["synth-icfg"][0] + 30
    assert stats["synth-icfg"][2] > 2 * stats["synth-cuhk"][2]
    assert stats["synth-rstp"][2] > 2 * stats["synth-cuhk"][2]


def test_captions_use_domain_vocabulary(synth):
    vocab = {}
    for domain in DOMAIN_STYLES:
        vocab[domain] = {t for r in _annotations(synth, domain) for c in r["captions"]
                         for t in synthetic.tokens(c)}
    synonyms = {d: {w for words in CAPTION_STYLES[style.caption_style].synonyms.values()
                    for s in words for w in synthetic.tokens(s)}
                for d, style in DOMAIN_STYLES.items()}
    icfg_only = (vocab["synth-icfg"] - vocab["synth-cuhk"]) & synonyms["synth-icfg"]
    rstp_only = (vocab["synth-rstp"] - vocab["synth-cuhk"]) & synonyms["synth-rstp"]
    assert len(icfg_only) >= 10 and len(rstp_only) >= 10
    assert {"crimson", "navy"} & icfg_only and not icfg_only & vocab["synth-cuhk"]
    assert len(icfg_only - vocab["synth-rstp"]) >= 10  # the two targets differ too


def test_images_of_one_person_differ_but_keep_colours(synth):
    records = [r for r in _annotations(synth, "synth-cuhk") if r["split"] == "test"]
    first, second = records[0], records[1]
    assert first["id"] == second["id"]
    a, b = (np.asarray(Image.open(synth / "synth-cuhk" / "imgs" / r["file_path"]))
            for r in (first, second))
    assert not np.array_equal(a, b)


# ---------------------------------------------------------------- command line


def test_cli_writes_domains_and_reports_progress(tmp_path, capsys):
    assert synthetic.main(["--out", str(tmp_path), "--seed", "1", "--scale", "0.02"]) == 0
    out = capsys.readouterr().out.splitlines()
    assert [line.split(" ")[0] for line in out[:3]] == list(DOMAIN_STYLES)
    assert all(re.search(r"train \d+ ids/\d+ images/\d+ captions.* in \d+\.\d s$", line)
               for line in out[:3])
    assert {p.name for p in tmp_path.iterdir()} == {*DOMAIN_STYLES, MANIFEST}
    with pytest.raises(SystemExit) as exit_:
        synthetic.main(["--out", str(tmp_path), "--seed", "1", "--scale", "0.02"])
    assert exit_.value.code == 2
    assert synthetic.main(["--out", str(tmp_path), "--seed", "1", "--scale", "0.02",
                           "--overwrite"]) == 0
    with pytest.raises(SystemExit) as exit_:
        synthetic.main(["--help"])
    assert exit_.value.code == 0 and "--scale" in capsys.readouterr().out
