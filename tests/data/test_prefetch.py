"""The background prefetcher: the plain loop's batches and augmentation stream, bounded look-ahead,
and errors raised in the consumer with their own message."""

import threading
import time

import numpy as np
import pytest
import torch
from PIL import Image

from gckd_ray.data.datasets import ImageSource
from gckd_ray.data.formats import DatasetFormatError
from gckd_ray.data.prefetch import Prefetcher
from gckd_ray.data.transforms import TrainAugment, normalize

N_IMAGES = 12


def _png_source(tmp_path, bad: int | None = None) -> ImageSource:
    """PNG files decoded per fetch by ImageSource's thread pool (``cache=False``), as real
    datasets are; image ``bad`` is a text file."""
    rng = np.random.default_rng(0)
    paths = []
    for i in range(N_IMAGES):
        path = tmp_path / f"{i}.png"
        if i == bad:
            path.write_text("not an image")
        else:
            Image.fromarray(rng.integers(0, 256, (20, 10, 3), dtype=np.uint8)).save(path)
        paths.append(str(path))
    return ImageSource(paths, [("ann.json", i) for i in range(N_IMAGES)], (16, 8), cache=False)


def _epoch(epoch: int) -> list[torch.Tensor]:
    return list(torch.randperm(N_IMAGES, generator=torch.Generator().manual_seed(epoch)).split(4))


def _preparer(source: ImageSource, augment: TrainAugment):
    def prepare(idx):  # decode, plain view, strong view: both draw from the generator
        plain = augment(source.fetch(idx))
        return idx, normalize(plain), normalize(augment.strong(plain))
    return prepare


def test_prefetched_batches_and_augment_stream_equal_the_plain_loop(tmp_path):
    runs = {}
    for prefetch in (False, True):
        source, augment = _png_source(tmp_path), TrainAugment(seed=3)
        prepare, batches, states = _preparer(source, augment), [], []
        for epoch in range(2):
            if prefetch:
                with Prefetcher(_epoch(epoch), prepare) as prepared:
                    batches += list(prepared)
            else:
                batches += [prepare(idx) for idx in _epoch(epoch)]
            states.append(augment.state_dict()["generator"])  # what a checkpoint saves
        runs[prefetch] = batches, states
    (plain, plain_states), (fetched, fetched_states) = runs[False], runs[True]
    assert len(fetched) == len(plain) == 6
    for a, b in zip(plain, fetched):
        assert all(torch.equal(x, y) for x, y in zip(a, b))
    assert all(torch.equal(a, b) for a, b in zip(plain_states, fetched_states))
    assert not torch.equal(*plain_states)  # the stream moved on in the second epoch


def test_bad_image_error_reaches_the_consumer_with_its_message(tmp_path):
    source, augment = _png_source(tmp_path, bad=5), TrainAugment(seed=0)
    items = [torch.tensor([0, 1]), torch.tensor([4, 5]), torch.tensor([6, 7])]
    got = []
    prefetcher = Prefetcher(items, _preparer(source, augment))
    with pytest.raises(DatasetFormatError) as err:
        with prefetcher as prepared:
            for batch in prepared:
                got.append(batch)
    assert str(err.value).startswith(f"ann.json: record 5: cannot decode image "
                                     f"{tmp_path / '5.png'}: ")
    assert [b[0].tolist() for b in got] == [[0, 1]]  # the batch before the bad one arrived
    assert not prefetcher._thread.is_alive()


@pytest.mark.parametrize("depth", [1, 2])
def test_look_ahead_is_bounded_and_leaving_early_stops_the_thread(depth):
    started = []

    def prepare(i):
        started.append(i)
        return i

    prefetcher = Prefetcher(range(20), prepare, depth=depth)
    with prefetcher as prepared:
        for i in prepared:
            time.sleep(0.01)  # room for the thread to run ahead if it were unbounded
            # taken: 0..i; prepared but not taken: at most `depth`
            assert len(started) <= i + 1 + depth
            if i == 4:
                break
    assert not prefetcher._thread.is_alive()
    assert len(started) <= 5 + depth


def test_disabled_prefetcher_runs_in_the_callers_thread():
    caller = threading.get_ident()
    with Prefetcher(range(3), lambda i: (i, threading.get_ident()), enabled=False) as prepared:
        assert list(prepared) == [(0, caller), (1, caller), (2, caller)]
    with Prefetcher(range(3), lambda i: threading.get_ident()) as prepared:
        assert caller not in set(prepared)
