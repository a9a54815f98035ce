"""Can the label-free selection score be trusted? Rank correlation between ``target_mnn`` and
target test R@1 over finished runs (reads their metrics.jsonl; R@1 is reporting only)

    python -m experiments.selection_check RUN_DIR [RUN_DIR ...] [--out selection.md]

Every epoch that scored the target test split (``train.eval_every``) gives a point
(``target_mnn``, R1). Reported, with Spearman's rho (average ranks for ties):

- per run, over its epochs: would picking the epoch with the best ``target_mnn`` pick a good
  checkpoint? (and the R1 of the epoch it picks against the best and the last epoch's);
- across runs, their last epochs: would ranking runs (Tune trials, variants) by ``target_mnn``
  rank them as R1 does?

Prints a markdown table, writes it to ``--out`` if given, and ends with one JSON line.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from pathlib import Path

import numpy as np

from gckd_ray.distributed.metrics_log import METRICS_FILE, read_records


def spearman(x: list[float], y: list[float]) -> float | None:
    """Spearman's rank correlation (average ranks for ties); None for fewer than 3 points or a
    constant side."""
    if len(x) < 3:
        return None
    rx, ry = _ranks(np.asarray(x, float)), _ranks(np.asarray(y, float))
    if rx.std() == 0 or ry.std() == 0:
        return None
    return float(np.corrcoef(rx, ry)[0, 1])


def _ranks(values: np.ndarray) -> np.ndarray:
    order = np.argsort(values, kind="stable")
    ranks = np.empty(len(values))
    ranks[order] = np.arange(len(values), dtype=float)
    for value in np.unique(values):  # ties share their mean rank
        tied = values == value
        ranks[tied] = ranks[tied].mean()
    return ranks


def scored_epochs(run_dir: Path) -> list[tuple[int, float, float]]:
    """(epoch, target_mnn, R1) of every epoch that scored both, in epoch order."""
    path = run_dir / METRICS_FILE
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no metrics.jsonl (is {run_dir} a run.output_dir?)")
    points = {r["epoch"]: (r["metrics"]["target_mnn"], r["metrics"]["R1"])
              for r in read_records(path) if r.get("kind") == "eval"
              and {"target_mnn", "R1"} <= set(r.get("metrics", {}))}
    return [(epoch, *points[epoch]) for epoch in sorted(points)]


def check(run_dirs: list[Path]) -> dict:
    runs = []
    for run_dir in run_dirs:
        points = scored_epochs(run_dir)
        if not points:
            raise ValueError(f"{run_dir / METRICS_FILE}: no epoch with both target_mnn and R1")
        _, mnn, r1 = zip(*points)
        picked = int(np.argmax(mnn))
        runs.append({"run": str(run_dir), "epochs": len(points), "rho": spearman(mnn, r1),
                     "picked_epoch": points[picked][0], "picked_R1": r1[picked],
                     "best_R1": max(r1), "last_R1": r1[-1], "last_mnn": mnn[-1]})
    rhos = [r["rho"] for r in runs if r["rho"] is not None]
    return {"runs": runs,
            "mean_rho_within_runs": float(np.mean(rhos)) if rhos else None,
            "rho_across_runs": spearman([r["last_mnn"] for r in runs],
                                        [r["last_R1"] for r in runs]),
            "picked_minus_last_R1": float(np.mean([r["picked_R1"] - r["last_R1"]
                                                   for r in runs]))}


def markdown(result: dict) -> str:
    def fmt(value) -> str:
        return "-" if value is None or (isinstance(value, float) and math.isnan(value)) \
            else f"{value:.2f}"

    lines = ["| run | epochs scored | rho (target_mnn, R1) over epochs | epoch picked by "
             "target_mnn | its R1 | best R1 | last R1 |", "|---|---|---|---|---|---|---|"]
    for r in result["runs"]:
        lines.append(f"| {r['run']} | {r['epochs']} | {fmt(r['rho'])} | {r['picked_epoch']} | "
                     f"{fmt(r['picked_R1'])} | {fmt(r['best_R1'])} | {fmt(r['last_R1'])} |")
    lines += ["", f"Mean rho within runs: {fmt(result['mean_rho_within_runs'])}; rho across "
              f"runs (last epochs): {fmt(result['rho_across_runs'])}; picking each run's epoch "
              f"by target_mnn instead of the last: {result['picked_minus_last_R1']:+.2f} R1 on "
              "average."]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m experiments.selection_check",
                                     description=__doc__.split("\n\n")[0])
    parser.add_argument("runs", nargs="+", type=Path, help="run.output_dir of each run")
    parser.add_argument("--out", type=Path, default=None, help="write the table here too")
    args = parser.parse_args(argv)
    result = check(args.runs)
    text = markdown(result)
    print(text)
    if args.out:
        args.out.write_text(text)
    print(json.dumps({k: result[k] for k in ("mean_rho_within_runs", "rho_across_runs",
                                             "picked_minus_last_R1")}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
