"""Load an epoch's batches in loader processes (``train.loader_processes``), in item order.

A step's batch is made in two halves (``distributed/loop.py``): ``load(item)``, the host half
(read, decode and resize images, take token rows: no random draws, so its result depends on
the item alone, whichever process runs it), and ``prepare``, the device half (copy to the
device, augmentation from the run's one generator, normalisation), which stays in the training
process and sees the loaded batches in item order. So the augmentation generator makes the same
draws in the same order with any number of loader processes, and the batches are bit-identical
to the in-process path. Loader processes only pay off where host cores would otherwise idle
during the step (GPU nodes): decoding 384x128 images is the work one process cannot keep up
with there.

An ``InputError`` raised by ``load`` in a loader process (a truncated image, say) is handed back
as the error object and raised in the training process unchanged, so a run still stops with
its one ``data error: <file>: <what>`` line (torch's own re-raise would rewrite the message into
a multi-line traceback text under a new exception).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch.utils.data import DataLoader, Dataset

from gckd_ray.errors import InputError


@dataclass
class _Failed:
    """A loader process's ``InputError``, carried back as a value (it pickles: one message)."""

    error: InputError


class _Loaded(Dataset):
    """Item ``i`` of the epoch -> ``load(items[i])``, or ``_Failed`` for an input error."""

    def __init__(self, items: Sequence[Any], load: Callable[[Any], Any]):
        self.items, self.load = items, load

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, i: int) -> Any:
        try:
            return self.load(self.items[i])
        except InputError as err:
            return _Failed(err)


def _as_loaded(batch: Any) -> Any:
    # batch_size=None hands each item's result over as it is (torch's default_convert would
    # turn tuples into lists).
    return batch


def load_batches(items: Sequence[Any], load: Callable[[Any], Any], processes: int,
                 pin_memory: bool = False) -> Iterator[Any]:
    """Yield ``load(item)`` for each item, in order, from ``processes`` loader processes.

    Args:
        items: the epoch's items (e.g. index batches).
        load: item -> host tensors; must not draw random numbers (each process has its own
            generators). ``processes=0`` calls it in the caller's thread, as a plain loop.
        processes: loader processes (0: none).
        pin_memory: put the loaded tensors in page-locked memory (a GPU's asynchronous copy).

    Close the generator (``contextlib.closing``) to stop the processes when an epoch ends early.
    """
    if processes == 0:
        for item in items:
            yield load(item)
        return
    loader = DataLoader(
        _Loaded(items, load), batch_size=None, num_workers=processes, collate_fn=_as_loaded,
        pin_memory=pin_memory,
        # Fork: the processes inherit `load` and the datasets it reads (image cache, paths)
        # instead of unpickling them; the children only decode into CPU tensors (no CUDA).
        multiprocessing_context="fork",
        # Its own generator: DataLoader otherwise draws its workers' base seed from the global
        # torch generator, which would shift the run's random stream (and its checkpoints).
        generator=torch.Generator())
    batches = iter(loader)
    try:
        for batch in batches:
            if isinstance(batch, _Failed):
                raise batch.error
            yield batch
    finally:
        del batches  # the last reference: its processes shut down now, not at garbage collection
