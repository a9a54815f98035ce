"""``<run.output_dir>/metrics.jsonl`` and ``curves.png``: the training reports of a run.

Rank 0 appends one JSON object per report. A progress report (every ``train.log_every`` steps,
next to the printed progress line)::

    {"kind": "train", "step": <global step>, "epoch": <1-based>, "epoch_step": <step in epoch>,
     "losses": {<name>: running mean over the epoch so far}, "stats": {<step statistic>: mean},
     "lr": <learning rate>, "steps_per_s": ..., "samples_per_s": <source pairs, all workers>}

after each epoch's target evaluation ``{"kind": "eval", "step", "epoch", "metrics":
{"R1", "R5", "R10", "mAP", "mINP", ..., "target_mnn"}}`` (the test split's metrics only on
the epochs ``train.eval_every`` scores; ``target_mnn`` every epoch; no record when an epoch
scored nothing), after which ``curves.png`` is redrawn (from the train and eval records), and
with ``method=gckd`` after each target pseudo-id refresh of the memory, where it is applied,
``{"kind": "refresh", "step": <steps done before it>, "epoch", "num_clusters",
"image_coverage", "text_coverage", "mean_cluster_size", "num_nodes", "num_edges", "seconds",
"started_step", "wait_seconds"}`` (``MemoryBank.refresh_on_schedule``: computed from the memory
at ``started_step``, ``gckd.refresh_lag`` steps earlier), and with ``data.on_bad_image=skip``
after each epoch ``{"kind": "skipped_images", "step", "epoch", "epochs", "count": <bad image
files met so far, all workers>, "files": [...]}``. Steps count the epoch loop's batches
(micro-batches under gradient accumulation) from the start of the run. With
``gckd.save_pseudo_ids`` each applied refresh's pseudo-ids also go to
``pseudo_ids/step_<step>.npz`` (``MetricsLog.pseudo_ids``), for ``experiments.pseudo_curves``.

Resume (``run.resume`` or Ray Train's restart after a failure) starts from a checkpoint after
some epoch: the records of later epochs, written before the interruption, are dropped so that
the file never holds a step twice. A fresh run starts an empty file.
"""

from __future__ import annotations

import json
import os
import threading
import time
from pathlib import Path
from typing import Any, Iterable

import numpy as np

METRICS_FILE = "metrics.jsonl"
CURVES_FILE = "curves.png"
PSEUDO_IDS_DIR = "pseudo_ids"


def read_records(path: str | Path) -> list[dict[str, Any]]:
    """The records of a metrics.jsonl; a torn last line (a write cut short) is left out."""
    records = []
    for line in Path(path).read_text().splitlines():
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError:
            continue
    return records


class MetricsLog:
    """Appends a run's reports to metrics.jsonl and redraws curves.png (rank 0 only).

    Args:
        output_dir: ``run.output_dir``.
        restored_epoch: epochs already done by the checkpoint this run starts from (0: fresh).
        steps_per_epoch: batches per epoch and worker.
        epochs: ``train.epochs`` (for the printed progress line).
        samples_per_step: source pairs per step over all workers.
    """

    def __init__(self, output_dir: str | Path, restored_epoch: int, steps_per_epoch: int,
                 epochs: int, samples_per_step: int):
        self.path = Path(output_dir) / METRICS_FILE
        self.curves = Path(output_dir) / CURVES_FILE
        self.steps_per_epoch, self.epochs = steps_per_epoch, epochs
        self.samples_per_step = samples_per_step
        self.path.parent.mkdir(parents=True, exist_ok=True)
        kept = ([r for r in read_records(self.path) if r.get("epoch", 0) <= restored_epoch]
                if restored_epoch and self.path.is_file() else [])
        tmp = self.path.with_name(self.path.name + ".tmp")
        tmp.write_text("".join(json.dumps(r) + "\n" for r in kept))
        os.replace(tmp, self.path)
        self.records = kept

    def progress(self, epoch: int, step: int, steps: int, sums: dict[str, float], lr: float,
                 start: float, loss_names: Iterable[str]) -> None:
        """Print the progress line (0-based ``epoch`` and ``step``; ``sums`` of the epoch so
        far) and append its record; ``loss_names``: which keys of ``sums`` are losses (the
        others are step statistics)."""
        rate = (step + 1) / (time.perf_counter() - start)
        names = set(loss_names)
        means = {k: v / (step + 1) for k, v in sums.items()}
        done = epoch * self.steps_per_epoch + step + 1
        self._append({"kind": "train", "step": done, "epoch": epoch + 1, "epoch_step": step + 1,
                      "epochs": self.epochs, "epoch_steps": steps,
                      "losses": {k: v for k, v in means.items() if k in names},
                      "stats": {k: v for k, v in means.items() if k not in names},
                      "lr": lr, "steps_per_s": rate, "samples_per_s": rate * self.samples_per_step,
                      "eta_s": (self.epochs * self.steps_per_epoch - done) / rate,
                      "time": time.time()})

    def note(self, epoch: int, text: str) -> None:
        """A line for the console (resumed, stopped early) after ``epoch`` (1-based) epochs."""
        self._append({"kind": "note", "step": epoch * self.steps_per_epoch, "epoch": epoch,
                      "text": text, "time": time.time()})

    def refresh(self, epoch: int, step: int, stats: dict[str, float]) -> None:
        """Append what a pseudo-id refresh did, applied at the read before step ``step`` of
        ``epoch`` (both 0-based, as ``progress``); ``stats`` as
        ``MemoryBank.refresh_on_schedule`` returns."""
        self._append({"kind": "refresh", "step": epoch * self.steps_per_epoch + step,
                      "epoch": epoch + 1, **stats, "time": time.time()})

    def pseudo_ids(self, epoch: int, step: int, image_ids: np.ndarray,
                   text_ids: np.ndarray) -> Path:
        """Write the target pseudo-ids applied at the read before step ``step`` of ``epoch``
        (0-based) to ``pseudo_ids/step_<global step>.npz`` (``image``, ``text``: int32 per
        target row, -1 = none), atomically (``gckd.save_pseudo_ids``)."""
        global_step = epoch * self.steps_per_epoch + step
        path = self.path.parent / PSEUDO_IDS_DIR / f"step_{global_step:07d}.npz"
        path.parent.mkdir(exist_ok=True)
        tmp = path.with_name(path.stem + ".tmp.npz")
        np.savez_compressed(tmp, image=image_ids.astype(np.int32), text=text_ids.astype(np.int32))
        os.replace(tmp, path)
        return path

    def skipped_images(self, epoch: int, files: list[str]) -> None:
        """Append the image files that did not decode and were replaced so far, after ``epoch``
        (1-based) epochs (``data.on_bad_image=skip``)."""
        self._append({"kind": "skipped_images", "step": epoch * self.steps_per_epoch,
                      "epoch": epoch, "epochs": self.epochs, "count": len(files),
                      "files": files, "time": time.time()})

    def evaluation(self, epoch: int, metrics: dict[str, float], split: str = "") -> None:
        """Append the target metrics of ``split`` after ``epoch`` (1-based) epochs; redraw
        curves.png."""
        self._append({"kind": "eval", "step": epoch * self.steps_per_epoch, "epoch": epoch,
                      "epochs": self.epochs, "split": split, "metrics": metrics,
                      "time": time.time()})
        from gckd_ray.plots import plot_curves  # matplotlib only where curves are drawn

        plot_curves(self.records, self.curves)

    def _append(self, record: dict[str, Any]) -> None:
        with self.path.open("a") as f:
            f.write(json.dumps(record) + "\n")
        self.records.append(record)


def console_line(record: dict[str, Any]) -> str | None:
    """The console line of a metrics.jsonl record (None: the record is not shown)."""
    if record["kind"] == "train":
        terms = " ".join(f"{k}={v:.4f}" for k, v in {**record["losses"],
                                                     **record["stats"]}.items())
        eta = int(record["eta_s"])
        return (f"[epoch {record['epoch']}/{record['epochs']}] step {record['epoch_step']}/"
                f"{record['epoch_steps']} {terms} lr={record['lr']:.2e} "
                f"{record['steps_per_s']:.1f} it/s ETA {eta // 3600}:{eta // 60 % 60:02d}:"
                f"{eta % 60:02d}")
    if record["kind"] == "eval":
        return (f"[epoch {record['epoch']}/{record['epochs']}] target {record['split']}: "
                + " ".join(f"{k}={v:.2f}" for k, v in record["metrics"].items()
                           if not k.startswith("num_")))
    if record["kind"] == "skipped_images":
        shown = ", ".join(record["files"][:3]) + (", ..." if record["count"] > 3 else "")
        return (f"[epoch {record['epoch']}/{record['epochs']}] skipped images "
                f"(data.on_bad_image=skip): {record['count']}" + (f" ({shown})" if shown else ""))
    if record["kind"] == "note":
        return record["text"]
    return None


class ConsoleTail:
    """Driver side: prints the console line of every record a run appends to its
    metrics.jsonl (the workers print nothing; Ray does not forward their output unless
    ``run.verbose``). Records are told apart by their time stamps, so a resumed run that
    rewrites the file shorter shows neither a kept record again nor misses a new one."""

    def __init__(self, output_dir: str | Path, every_s: float = 0.5):
        self.path, self.every_s = Path(output_dir) / METRICS_FILE, every_s
        self._last = max((r.get("time", 0.0) for r in self._records()), default=0.0)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="console-tail", daemon=True)

    def __enter__(self) -> "ConsoleTail":
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()
        self._show()  # what the last poll missed

    def _records(self) -> list[dict[str, Any]]:
        return read_records(self.path) if self.path.is_file() else []

    def _run(self) -> None:
        while not self._stop.wait(self.every_s):
            self._show()

    def _show(self) -> None:
        for record in self._records():
            if record.get("time", 0.0) > self._last:
                self._last = record["time"]
                line = console_line(record)
                if line is not None:
                    print(line, flush=True)
