"""``data.on_bad_image=skip``: an image that fails to decode during a run is replaced and counted.

Under ``error`` (the default) such an image stops the run with its one ``data error:`` line.
Under ``skip`` `ImageSource` takes a stand-in instead: the next row of the same group, in the
split's own row order and wrapping around, whose image decodes. The group is the person in a
labelled split (source training pairs, the target test split) and every image of the target's
unpaired training images, which carry no ids. The stand-in depends only on the files, never on
timing, threads or rank, so a run stays deterministic and a row count never changes (the driver,
the memory actor and every worker agree on them). Each bad file is counted once per run; the
worker reports the count after every epoch and ``results.json`` carries it with the files.

Unlike ``data.on_bad_record=skip``, which decodes every image of a split once at load time and
drops the records of those that fail, nothing is decoded up front: a dataset of 40k images
pays only for the images it actually reads.
"""

from __future__ import annotations

import threading
from collections.abc import Iterator

class BadImages:
    """The image files of one process that failed to decode, with why (thread-safe: the image
    decoding pool adds to it)."""

    def __init__(self) -> None:
        self._why: dict[str, str] = {}
        self._lock = threading.Lock()

    def add(self, path: str, why: str) -> None:
        with self._lock:
            self._why.setdefault(path, why)

    def __contains__(self, path: str) -> bool:
        return path in self._why

    def files(self) -> list[str]:
        """The bad files, sorted."""
        with self._lock:
            return sorted(self._why)


def stand_in_rows(row: int, groups: list[int] | None, rows_of: dict[int, list[int]],
                  count: int) -> Iterator[int]:
    """``row``, then the other rows of its group after it in row order, wrapping around.

    Args:
        row: the row whose image is wanted.
        groups: group per row (person ids), or None: all ``count`` rows are one group.
        rows_of: group -> its rows in ascending order (unused when ``groups`` is None).
        count: rows of the split.
    """
    if groups is None:
        yield from range(row, count)
        yield from range(row)
        return
    members = rows_of[groups[row]]
    at = members.index(row)
    yield from members[at:]
    yield from members[:at]
