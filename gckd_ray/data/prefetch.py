"""Prepare the next training batches in one background thread while the step computes.

``Prefetcher(items, prepare)`` yields ``prepare(item)`` for each item, in order, exactly as the
plain loop ``for item in items: batch = prepare(item)`` would, but ``prepare`` (fetch, decode,
augment: everything that does not need the model) runs in one thread at most ``depth`` items
ahead of the consumer. Because one thread calls ``prepare`` on the items in order, a random
generator used only inside ``prepare`` (``TrainAugment``'s) makes the same draws in the same
order as without prefetching, so the batches are bit-identical; and since the thread stops at the
end of ``items`` (one epoch), the generator's state after the loop is the plain loop's too, which
keeps checkpoints and exact resume unchanged. An exception raised by ``prepare`` is re-raised in
the consumer's thread when it reaches that item, as the same exception object (same message).

The thread runs torch ops with the consumer's intra-op thread count and, on GPU, on the
consumer's current device (both are per-thread settings), so it adds one thread, not a second
pool. It gains time only where a core is idle during the step (on a GPU node, the host CPU).
"""

from __future__ import annotations

import queue
import threading
from collections.abc import Callable, Iterable, Iterator
from typing import Generic, TypeVar

import torch

T = TypeVar("T")
U = TypeVar("U")


class Prefetcher(Generic[T, U]):
    """Iterate ``prepare(item) for item in items``, prepared up to ``depth`` items ahead.

    Use it as a context manager (leaving the block stops and joins the thread, also after a
    ``break`` or an error in the loop body) and iterate it once::

        with Prefetcher(batches, prepare) as prepared:
            for batch in prepared:
                ...

    Args:
        items: the epoch's items (e.g. index batches), consumed by the thread in order.
        prepare: item -> batch; called from one thread only, in item order.
        depth: prepared batches held ahead of the consumer (1: batch t+1 is prepared while the
            consumer works on batch t).
        enabled: False calls ``prepare`` in the consumer's thread (same results, no thread).
    """

    def __init__(self, items: Iterable[T], prepare: Callable[[T], U], depth: int = 1,
                 enabled: bool = True):
        if depth < 1:
            raise ValueError(f"Prefetcher depth must be >= 1, got {depth}")
        self.enabled = enabled
        self._items, self._prepare = iter(items), prepare
        self._ready: queue.SimpleQueue = queue.SimpleQueue()  # ("batch" | "error" | "end", x)
        self._slots = threading.Semaphore(depth)  # one per batch prepared but not yet taken
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._torch_threads = torch.get_num_threads()
        self._cuda_device = torch.cuda.current_device() if torch.cuda.is_initialized() else None

    def __enter__(self) -> Prefetcher[T, U]:
        if self.enabled:
            self._thread = threading.Thread(target=self._run, name="gckd-prefetch", daemon=True)
            self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def close(self) -> None:
        """Stop the thread after the item it is preparing, if any, and wait for it."""
        self._stop.set()
        self._slots.release()  # wakes the thread if it waits for a free slot
        if self._thread is not None:
            self._thread.join()

    def _run(self) -> None:
        # Per-thread settings a new thread does not inherit reliably: match the consumer's.
        torch.set_num_threads(self._torch_threads)
        if self._cuda_device is not None:
            torch.cuda.set_device(self._cuda_device)
        try:
            for item in self._items:
                self._slots.acquire()
                if self._stop.is_set():
                    return
                self._ready.put(("batch", self._prepare(item)))
        except BaseException as err:  # handed to the consumer, raised there
            self._ready.put(("error", err))
            return
        self._ready.put(("end", None))

    def __iter__(self) -> Iterator[U]:
        if not self.enabled:
            for item in self._items:
                yield self._prepare(item)
            return
        if self._thread is None:
            raise RuntimeError("iterate a Prefetcher inside its `with` block")
        while True:
            kind, value = self._ready.get()
            if kind == "end":
                return
            if kind == "error":
                raise value
            self._slots.release()  # the thread may start on the next item now
            yield value
