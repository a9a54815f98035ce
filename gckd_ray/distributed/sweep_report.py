"""What a sweep leaves behind: the trial table (CSV and printed), the best config, the plot.

Works on plain rows (``sweep.trial_rows``), so it needs no Ray. Every output names the metric
that ranked the trials. The best trial is the highest-ranked one among those that ran the full
schedule (ASHA-stopped trials were compared at an earlier epoch); only when none did is it the
highest-ranked of all.
"""

from __future__ import annotations

import csv
import io
import json
from pathlib import Path
from typing import Any

import yaml

from gckd_ray.checkpoint_format import atomic_write_text
from gckd_ray.config import Config, override_config
from gckd_ray.tune_space import Dimension, describe_metric

CSV_NAME = "sweep.csv"
BEST_CONFIG = "best_config.yaml"
PLOT_NAME = "sweep.png"


def _value(row: dict[str, Any], key: str) -> float:
    value = row.get(key)
    return float("-inf") if value is None else float(value)


def ranked(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Rows by selection value, best first (trials without one last)."""
    return sorted(rows, key=lambda r: -_value(r, "selection"))


def best_row(rows: list[dict[str, Any]]) -> dict[str, Any]:
    scored = [r for r in rows if r.get("selection") is not None]
    if not scored:
        raise RuntimeError("no trial reported the selection metric; see the trial logs under "
                           "tune/")
    full = [r for r in scored if r["status"] == "completed"]
    return ranked(full or scored)[0]


def tied_with(rows: list[dict[str, Any]], row: dict[str, Any]) -> list[str]:
    """Trial ids of the other rows with exactly ``row``'s selection value."""
    if row.get("selection") is None:
        return []
    return [r["trial_id"] for r in rows
            if r is not row and r.get("selection") == row["selection"]]


def write_csv(rows: list[dict[str, Any]], path: Path) -> None:
    out = io.StringIO()
    writer = csv.DictWriter(out, fieldnames=list(rows[0]))
    writer.writeheader()
    writer.writerows(ranked(rows))
    atomic_write_text(path, out.getvalue())


def format_table(rows: list[dict[str, Any]], dims: list[Dimension]) -> str:
    metric = rows[0]["ranked_by"]
    keys = [d.key for d in dims]
    header = ["trial", *keys, "epochs", "status", "selection", "R1", "mAP"]
    lines = [f"trials ranked by {describe_metric(metric)}; R1/mAP: target test split, final "
             "model of each trial (reported, not used to rank unless oracle)"]
    table = [header] + [[r["trial_id"], *(_fmt(r[k]) for k in keys), str(r["epochs"]),
                         r["status"], _fmt(r["selection"]) + (" (tie)" if tied_with(rows, r)
                                                              else ""),
                         _fmt(r["R1"]), _fmt(r["mAP"])]
                        for r in ranked(rows)]
    widths = [max(len(row[i]) for row in table) for i in range(len(header))]
    lines += ["  ".join(cell.ljust(w) for cell, w in zip(row, widths)) for row in table]
    return "\n".join(lines)


def _fmt(value: Any) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:.4g}" if abs(value) < 1 else f"{value:.2f}"
    return str(value)


def _tie_note(prefix: str, best: dict[str, Any], ties: list[str]) -> str:
    if not ties:
        return ""
    return (f"{prefix}A tie: trial(s) {', '.join(ties)} have the same selection value "
            f"({_fmt(best['selection'])}); the sweep does not tell these apart.\n")


def write_best_config(base: Config, best: dict[str, Any], dims: list[Dimension],
                      path: Path, ties: list[str] = ()) -> Config:
    """``base`` with the best trial's values, as a YAML ``python -m gckd_ray.train --config``
    reads; its own output folder, no resume."""
    values = [f"{d.key}={json.dumps(best[d.key])}" for d in dims]
    out = Path(base.run.output_dir) / "best"
    cfg = override_config(base, [*values, f"run.output_dir={out}", "run.resume=false"])
    header = (f"# Best trial {best['trial_id']} of the sweep in {base.run.output_dir}, ranked by "
              f"{describe_metric(best['ranked_by'])} = {_fmt(best['selection'])}.\n"
              + _tie_note("# ", best, ties)
              + f"# Train it: python -m gckd_ray.train --config {path}\n")
    atomic_write_text(path, header + yaml.safe_dump(cfg.to_dict(), sort_keys=False))
    return cfg


def plot_sweep(rows: list[dict[str, Any]], dims: list[Dimension], path: Path) -> None:
    """Target R@1 of each trial's final model against each numeric swept key."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    numeric = [d for d in dims if all(isinstance(r[d.key], (int, float)) for r in rows)]
    fig, axes = plt.subplots(1, max(1, len(numeric)), figsize=(3.6 * max(1, len(numeric)), 3.2),
                             squeeze=False)
    for ax, dim in zip(axes[0], numeric):
        for status, marker in (("completed", "o"), ("stopped early (ASHA)", "x"),
                               ("error", "s")):
            pts = [(r[dim.key], r["R1"]) for r in rows if r["status"] == status
                   and r["R1"] is not None]
            if pts:
                ax.scatter(*zip(*pts), marker=marker, label=status)
        if dim.kind == "loguniform":
            ax.set_xscale("log")
        ax.set_xlabel(dim.key)
        ax.set_ylabel("target R@1 (%)")
        ax.grid(alpha=0.3)
    axes[0][0].legend(fontsize=7)
    fig.suptitle(f"ranked by {describe_metric(rows[0]['ranked_by'])}", fontsize=8)
    fig.tight_layout()
    tmp = path.with_name(path.name + ".tmp.png")
    fig.savefig(tmp, dpi=110)
    plt.close(fig)
    tmp.replace(path)


def write_report(base: Config, rows: list[dict[str, Any]], dims: list[Dimension]) -> Path:
    """CSV, best config and plot under ``run.output_dir``; prints the table. Returns the best
    config's path."""
    output = Path(base.run.output_dir)
    write_csv(rows, output / CSV_NAME)
    best = best_row(rows)
    ties = tied_with(rows, best)
    best_path = output / BEST_CONFIG
    write_best_config(base, best, dims, best_path, ties)
    plot_sweep(rows, dims, output / PLOT_NAME)
    print(format_table(rows, dims), flush=True)
    print(f"best trial: {best['trial_id']} ({best['status']}) "
          + " ".join(f"{d.key}={_fmt(best[d.key])}" for d in dims), flush=True)
    print(_tie_note("", best, ties), end="", flush=True)
    print(f"table: {output / CSV_NAME}\nbest config: {best_path}\nplot: {output / PLOT_NAME}\n"
          f"tune experiment: {output / 'tune'}", flush=True)
    return best_path
