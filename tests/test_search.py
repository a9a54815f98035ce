"""The search CLI end to end on a SynthPEDES GCKD checkpoint: ranked list, PNG grid, the same
top-1 as evaluation's ranking, the cached index, folder galleries and clear errors."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest
import torch
from PIL import Image

from gckd_ray.checkpoint_format import checkpoint_tokenizer_dir, load_checkpoint_config
from gckd_ray.config import DomainConfig
from gckd_ray.data.datasets import load_split
from gckd_ray.data.tokenizer import load_tokenizer
from gckd_ray.evaluate import encode_split, load_encoder, retrieval_metrics
from gckd_ray.search import main as search_main

pytestmark = pytest.mark.slow  # reads the session's ZeRO-3 run (2 Ray workers)

QUERY_INDEX = 3


@pytest.fixture(scope="module")
def checkpoint(zero3_whole) -> Path:
    return max(zero3_whole[0].glob("ray/*/checkpoint_*/state.json")).parent


@pytest.fixture(scope="module")
def target_root(synth_cache) -> Path:
    return next(synth_cache.glob("*/synth-icfg"))


def _ranked(out: str) -> list[list[str]]:
    """Rows of the printed ranking: rank, score, id, match, image path."""
    lines = out.splitlines()
    start = next(i for i, line in enumerate(lines) if line.split()[:2] == ["rank", "score"])
    rows = []
    for line in lines[start + 1:]:
        parts = line.split(None, 4)
        if not parts or not parts[0].isdigit():
            break
        rows.append(parts)
    return rows


def _valid_png(path: Path) -> None:
    assert path.stat().st_size > 0
    with Image.open(path) as png:
        assert png.format == "PNG" and png.size[0] > 50


def test_dataset_gallery_ranks_as_evaluation_and_caches_the_index(checkpoint, target_root,
                                                                   tmp_path, capsys):
    args = ["--checkpoint", str(checkpoint), "--gallery", str(target_root),
            "--dataset", "synth-icfg", "--split", "test", "--cache", str(tmp_path / "cache")]
    out_png = tmp_path / "result.png"
    assert search_main([*args, "--query-index", str(QUERY_INDEX), "--top", "5",
                        "--out", str(out_png), "--device", "cpu"]) == 0
    out = capsys.readouterr().out
    assert "index built" in out and "(person id " in out
    ranked = _ranked(out)
    assert [int(r[0]) for r in ranked] == [1, 2, 3, 4, 5]
    scores = [float(r[1]) for r in ranked]
    assert scores == sorted(scores, reverse=True)
    _valid_png(out_png)

    # The same query through evaluation's embedding and ranking (ties: lower gallery index).
    cfg = load_checkpoint_config(checkpoint)
    tokenizer = load_tokenizer(checkpoint_tokenizer_dir(checkpoint))
    split = load_split(cfg, DomainConfig(name="synth-icfg", root=str(target_root)), "test",
                       tokenizer)
    images, texts = encode_split(load_encoder(checkpoint, cfg, tokenizer), split,
                                 torch.device("cpu"))
    row = texts[QUERY_INDEX] @ images.T  # (G,)
    best = int(torch.argsort(-row, stable=True)[0])
    assert ranked[0][4] == split.images.paths[best]
    # the CLI prints scores with 4 decimals (error <= 5e-5); float32 scoring adds ~1e-7
    assert float(ranked[0][1]) == pytest.approx(float(row[best]), abs=1e-4)
    r1 = retrieval_metrics(row[None], split.labels[QUERY_INDEX:QUERY_INDEX + 1],
                           split.image_labels)["R1"]
    assert (ranked[0][3] == "yes") == (r1 == 100.0)

    # Second call, free text: the index is read from the cache; ids of the query unknown.
    index_file = next((tmp_path / "cache").glob("*/index.faiss"))
    mtime = index_file.stat().st_mtime_ns
    assert search_main([*args, "--query", "a man in a black jacket and blue jeans",
                        "--out", str(tmp_path / "free.png")]) == 0
    out = capsys.readouterr().out
    assert "index cached" in out and "index built" not in out
    assert index_file.stat().st_mtime_ns == mtime
    assert {r[3] for r in _ranked(out)} == {"-"} and len(_ranked(out)) == 10
    _valid_png(tmp_path / "free.png")


def test_folder_gallery_skips_unreadable_files_and_rebuilds_when_files_change(
        checkpoint, target_root, tmp_path, capsys):
    folder = tmp_path / "photos"
    folder.mkdir()
    for i, src in enumerate(sorted((target_root / "imgs").rglob("*.png"))[:4]):
        shutil.copy(src, folder / f"p{i}.png")
    (folder / "broken.jpg").write_bytes(b"not an image")
    args = ["--checkpoint", str(checkpoint), "--gallery", str(folder), "--query",
            "a woman in a red coat", "--top", "10", "--out", str(tmp_path / "r.png"),
            "--cache", str(tmp_path / "cache")]
    assert search_main(args) == 0
    out = capsys.readouterr().out
    assert "skipped 1 unreadable image(s)" in out and "broken.jpg" in out
    assert "index built" in out and len(_ranked(out)) == 4  # --top larger than the gallery
    _valid_png(tmp_path / "r.png")
    os.utime(folder / "p0.png", ns=(1, 1))  # a gallery file changed: the cache is stale
    assert search_main(args) == 0
    assert "index built" in capsys.readouterr().out


def test_clear_errors(checkpoint, target_root, tmp_path, capsys):
    base = ["--query", "a man", "--out", str(tmp_path / "x.png"), "--cache", str(tmp_path)]
    assert search_main(["--checkpoint", str(tmp_path / "none"), "--gallery", str(tmp_path),
                        *base]) == 2
    assert "checkpoint" in capsys.readouterr().err
    (tmp_path / "empty").mkdir()
    assert search_main(["--checkpoint", str(checkpoint), "--gallery", str(tmp_path / "empty"),
                        *base]) == 2
    assert "no image files" in capsys.readouterr().err
    assert search_main(["--checkpoint", str(checkpoint), "--gallery", str(target_root),
                        "--dataset", "synth-icfg", "--query-index", "100000",
                        "--out", str(tmp_path / "x.png"), "--cache", str(tmp_path)]) == 2
    assert "--query-index must be in [0, " in capsys.readouterr().err
    assert not (tmp_path / "x.png").exists()


def test_an_unavailable_cuda_device_is_refused_in_one_line(tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert search_main(["--checkpoint", str(tmp_path), "--gallery", str(tmp_path), "--query",
                        "a man", "--device", "cuda", "--out", str(tmp_path / "x.png")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("input error: --device cuda: CUDA is not available on this machine")
    assert err.count("\n") == 1 and not (tmp_path / "x.png").exists()
