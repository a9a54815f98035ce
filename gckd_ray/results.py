"""``results.json``: the run's final metrics and per-epoch history (DESIGN.md §9).

History rows of epochs whose target test split was not scored (``train.eval_every``) hold
their losses (and the label-free ``target_mnn``) but no R1 etc.; the final metrics are those
of the last scored epoch, which is the last epoch (``final_epoch`` says which). With
``data.on_bad_image=skip`` every history row holds ``skipped_images`` (bad image files met so
far) and the results hold ``skipped_images: {"count", "files"}`` of the whole run."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Any

from gckd_ray.checkpoint_format import atomic_write_text
from gckd_ray.config import Config, LossWeights

METRIC_KEYS = ("R1", "R5", "R10", "mAP", "mINP")
SELECTION = "last epoch (fixed schedule; no target labels used for selection)"
LOSS_NAMES = tuple(f.name for f in dataclasses.fields(LossWeights))


def results_path(cfg: Config) -> Path:
    return Path(cfg.run.output_dir) / "results.json"


def evaluated(history: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The history rows of epochs whose target test split was scored."""
    return [row for row in history if all(k in row for k in METRIC_KEYS)]


def write_results(cfg: Config, history: list[dict[str, Any]],
                  skipped_images: list[str] | None = None) -> dict[str, Any]:
    """``skipped_images``: the run's image files replaced under ``data.on_bad_image=skip``."""
    scored = evaluated(history)
    if not scored:
        raise ValueError("no epoch of the history scored the target test split")
    final = scored[-1]
    results = {
        "protocol": cfg.protocol,
        "method": cfg.method,
        "selection": SELECTION,
        "final_epoch": final["epoch"],
        "final": {k: final[k] for k in METRIC_KEYS},
        "phases": phases(cfg, history),
        "history": history,
    }
    if cfg.data.on_bad_image == "skip":
        files = sorted(skipped_images or [])
        results["skipped_images"] = {"count": len(files), "files": files}
    if "rerank_R1" in final:  # matching-head re-ranking, reported beside, never instead
        results["final_rerank"] = {k: final[f"rerank_{k}"] for k in METRIC_KEYS}
    path = results_path(cfg)
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_text(path, json.dumps(results, indent=1))
    return results


def phases(cfg: Config, history: list[dict[str, Any]]) -> dict[str, dict[str, Any]]:
    """What ran: per phase (``source``: before GCKD's adaptation starts, or a method without
    one; ``adaptation``), its epochs and the loss terms its epochs reported."""
    out: dict[str, dict[str, Any]] = {}
    for row in history:
        adapting = cfg.method == "gckd" and row["epoch"] > cfg.gckd.warmup_epochs
        phase = out.setdefault("adaptation" if adapting else "source",
                               {"epochs": 0, "losses": []})
        phase["epochs"] += 1
        phase["losses"] = [n for n in LOSS_NAMES if n in phase["losses"] or n in row]
    return out


def _phases_line(results: dict[str, Any]) -> str:
    return "phases: " + "; ".join(
        f"{name} {p['epochs']} epoch(s) ({', '.join(p['losses'])})"
        for name, p in results["phases"].items())


def format_table(results: dict[str, Any]) -> str:
    header = f"{'protocol':<24} {'method':<12} " + " ".join(f"{k:>7}" for k in METRIC_KEYS)
    row = (f"{results['protocol']:<24} {results['method']:<12} "
           + " ".join(f"{results['final'][k]:7.2f}" for k in METRIC_KEYS))
    lines = [header, row]
    if "final_rerank" in results:
        lines.append(f"{'':<24} {'+ re-rank':<12} "
                     + " ".join(f"{results['final_rerank'][k]:7.2f}" for k in METRIC_KEYS))
    if "skipped_images" in results:
        lines.append(f"skipped images (data.on_bad_image=skip): "
                     f"{results['skipped_images']['count']}")
    return "\n".join(lines + [_phases_line(results)]) + f"\nselection: {results['selection']}"
