"""Loader processes: the plain loop's batches in item order, no draw from the global generator,
an input error raised in a loader process surfaces unchanged (its one ``data error`` line), and
closing early stops the processes."""

import multiprocessing

import numpy as np
import pytest
import torch
from PIL import Image

from gckd_ray.data.datasets import ImageSource
from gckd_ray.data.formats import DatasetFormatError
from gckd_ray.data.loader import load_batches
from gckd_ray.errors import one_line

N_IMAGES = 12


def _png_source(tmp_path, bad: int | None = None) -> ImageSource:
    """PNG files decoded per fetch (``cache=False``), as real datasets are; image ``bad`` is a
    truncated file."""
    rng = np.random.default_rng(0)
    paths = []
    for i in range(N_IMAGES):
        path = tmp_path / f"{i}.png"
        Image.fromarray(rng.integers(0, 256, (20, 10, 3), dtype=np.uint8)).save(path)
        if i == bad:
            path.write_bytes(path.read_bytes()[:60])
        paths.append(str(path))
    return ImageSource(paths, [("ann.json", i) for i in range(N_IMAGES)], (16, 8), cache=False)


def _items() -> list[torch.Tensor]:
    return list(torch.randperm(N_IMAGES, generator=torch.Generator().manual_seed(1)).split(3))


def _load(source: ImageSource):
    return lambda idx: (idx, {"images": source.fetch(idx), "rows": idx * 2})


@pytest.mark.parametrize("processes", [1, 2])
def test_loader_processes_yield_the_plain_loops_batches_in_order(tmp_path, processes):
    source = _png_source(tmp_path)
    plain = list(load_batches(_items(), _load(source), 0))  # starts the parent's decode pool
    rng = torch.get_rng_state()
    loaded = list(load_batches(_items(), _load(source), processes))
    assert torch.equal(torch.get_rng_state(), rng)  # the global generator made no draw
    assert len(loaded) == len(plain) == 4
    for (idx, batch), (idx2, batch2) in zip(plain, loaded):
        assert isinstance(batch2, dict) and torch.equal(idx, idx2)
        assert torch.equal(batch["images"], batch2["images"])
        assert torch.equal(batch["rows"], batch2["rows"])


def test_an_input_error_in_a_loader_process_surfaces_as_its_one_line(tmp_path):
    source = _png_source(tmp_path, bad=7)
    items = [torch.tensor([0, 1]), torch.tensor([2, 7]), torch.tensor([3])]
    with pytest.raises(DatasetFormatError) as plain:
        list(load_batches(items, _load(source), 0))
    got = []
    with pytest.raises(DatasetFormatError) as loaded:
        for batch in load_batches(items, _load(source), 2):
            got.append(batch)
    assert len(got) == 1  # the batches before the bad one arrive first, in order
    assert str(loaded.value) == str(plain.value)
    line = one_line(loaded.value)
    assert line == one_line(plain.value) and "\n" not in line
    assert line.startswith("data error: ann.json: record 7: ") and str(tmp_path / "7.png") in line
    assert not multiprocessing.active_children()  # the processes stopped with the error


def test_closing_early_stops_the_loader_processes(tmp_path):
    source = _png_source(tmp_path)
    batches = load_batches(_items(), _load(source), 2)
    next(batches)
    assert multiprocessing.active_children()
    batches.close()
    assert not multiprocessing.active_children()
