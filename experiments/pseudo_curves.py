"""Offline audit: how right were a GCKD run's target pseudo-ids, refresh by refresh? (reads
target labels)

    python -m experiments.pseudo_curves RUN_DIR [RUN_DIR ...] [--out pseudo_curves.png]
                                        [--json pseudo_curves.jsonl]

For runs trained with ``gckd.save_pseudo_ids=true`` (each applied refresh's ids are in
``RUN_DIR/pseudo_ids/step_*.npz``). The run's config comes from its newest checkpoint; the
target training split is read again with its person ids, in the memory's row order
(``datasets.target_order``). Per refresh: ``pair_precision`` (of all image-caption pairs that
share a pseudo-id, the share that show one person: what the pseudo-positive losses pull
together; null without such pairs), ``image_pair_precision`` (the same for image-image pairs)
and ``image_coverage`` / ``text_coverage`` (rows with a pseudo-id). Prints one JSON line per
refresh, writes them all to ``--json`` and draws precision and coverage against step, one
line per run, to ``--out``.
Ground-truth target ids are read here and only here: training never sees them.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from collections import Counter
from pathlib import Path

import numpy as np

from gckd_ray.checkpoint_format import load_checkpoint_config, newest_checkpoint
from gckd_ray.data.datasets import load_records, target_order
from gckd_ray.distributed.metrics_log import PSEUDO_IDS_DIR


def target_person_ids(run_dir: Path) -> tuple[np.ndarray, np.ndarray]:
    """(person id per target image row, per target caption row) of the run's target training
    split, in the memory's row order."""
    found = [c for c in (newest_checkpoint(d) for d in sorted(run_dir.glob("ray/*"))) if c]
    if not found:
        raise FileNotFoundError(f"{run_dir}: no checkpoint under ray/*/ to read the config from")
    cfg = load_checkpoint_config(max(found, key=lambda c: c[0].name)[0])
    records = load_records(cfg, cfg.data.target, "train")
    keys, captions = target_order(records.records)
    pid_of_key = {r.image_key: r.pid for r in records.records}
    return (np.array([pid_of_key[k] for k in keys], np.int64),
            np.array([r.pid for r in captions], np.int64))


def _counts(groups: np.ndarray, pids: np.ndarray) -> dict[tuple[int, int], int]:
    """Rows per (pseudo-id, person id), over rows with a pseudo-id."""
    keep = groups >= 0
    keys, n = np.unique(np.stack([groups[keep], pids[keep]], 1), axis=0, return_counts=True)
    return {(int(g), int(p)): int(c) for (g, p), c in zip(keys, n)}


def _per_group(counts: dict[tuple[int, int], int]) -> Counter:
    total: Counter = Counter()
    for (group, _), n in counts.items():
        total[group] += n
    return total


def score_refresh(image_ids: np.ndarray, text_ids: np.ndarray, image_pids: np.ndarray,
                  text_pids: np.ndarray) -> dict[str, float]:
    """Precision and coverage of one refresh's pseudo-ids against the person ids."""
    images, texts = _counts(image_ids, image_pids), _counts(text_ids, text_pids)
    images_per_group, texts_per_group = _per_group(images), _per_group(texts)
    pairs = sum(n * texts_per_group[g] for g, n in images_per_group.items())
    right = sum(n * texts.get(key, 0) for key, n in images.items())
    image_pairs = sum(n * (n - 1) // 2 for n in images_per_group.values())
    image_right = sum(n * (n - 1) // 2 for n in images.values())
    return {"pairs": pairs, "pair_precision": right / pairs if pairs else None,
            "image_pairs": image_pairs,
            "image_pair_precision": image_right / image_pairs if image_pairs else None,
            "image_coverage": float((image_ids >= 0).mean()) if len(image_ids) else 0.0,
            "text_coverage": float((text_ids >= 0).mean()) if len(text_ids) else 0.0}


def score_run(run_dir: Path) -> list[dict[str, float]]:
    files = sorted((run_dir / PSEUDO_IDS_DIR).glob("step_*.npz"))
    if not files:
        raise FileNotFoundError(f"{run_dir / PSEUDO_IDS_DIR}: no step_*.npz (train with "
                                "gckd.save_pseudo_ids=true)")
    image_pids, text_pids = target_person_ids(run_dir)
    rows = []
    for path in files:
        with np.load(path) as saved:
            image_ids, text_ids = saved["image"], saved["text"]
        if (len(image_ids), len(text_ids)) != (len(image_pids), len(text_pids)):
            raise ValueError(f"{path}: {len(image_ids)} x {len(text_ids)} target rows, the "
                             f"run's target split has {len(image_pids)} x {len(text_pids)}")
        rows.append({"run": str(run_dir), "step": int(path.stem.split("_")[1]),
                     **score_refresh(image_ids, text_ids, image_pids, text_pids)})
    return rows


def plot(rows: list[dict[str, float]], out: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = [(key, title) for key, title in (
        ("pair_precision", "image-caption pair precision"),
        ("image_pair_precision", "image-image pair precision"),
        ("text_coverage", "caption coverage"))
        if any(r[key] is not None for r in rows)]  # no image-image pairs: no panel
    fig, axes = plt.subplots(1, len(panels), figsize=(5 * len(panels), 4), squeeze=False)
    axes = axes[0]
    for run in dict.fromkeys(r["run"] for r in rows):
        mine = [r for r in rows if r["run"] == run]
        for ax, (key, _) in zip(axes, panels):
            ax.plot([r["step"] for r in mine],
                    [math.nan if r[key] is None else r[key] for r in mine], label=Path(run).name)
    for ax, (_, title) in zip(axes, panels):
        ax.set_title(title)
        ax.set_xlabel("step")
        ax.set_ylim(0, 1)
    axes[0].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(out, dpi=100)
    plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m experiments.pseudo_curves",
                                     description=__doc__.split("\n\n")[0])
    parser.add_argument("runs", nargs="+", type=Path, help="run.output_dir of each run")
    parser.add_argument("--out", type=Path, default=Path("pseudo_curves.png"))
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args(argv)
    rows = [row for run in args.runs for row in score_run(run)]
    for row in rows:
        print(json.dumps(row), flush=True)
    if args.json:
        args.json.write_text("".join(json.dumps(r) + "\n" for r in rows))
    plot(rows, args.out)
    print(f"wrote {args.out}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
