"""Run named variants x seeds through ``python -m gckd_ray.train`` and tabulate target metrics.

    python -m experiments.run_table --variants source_only oracle --seeds 0 1 2 \\
        --out experiments/results/gap.md [key=value ...]

Each run is a separate ``python -m gckd_ray.train`` process (exactly what a user runs) with
its own output folder; a finished run (results.json present) is reused, so an interrupted table
resumes. ``--recorded FILE ...`` also reuses the final metrics of (variant, seed) pairs that an
earlier table's JSON recorded (runs are deterministic per seed), and the table says so. Writes
a markdown table (mean ± std over seeds) and a JSON file beside it.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time
from pathlib import Path

from gckd_ray.config import load_config
from gckd_ray.config_rules import check
from gckd_ray.errors import InputError
from gckd_ray.results import SELECTION

METRICS = ("R1", "R5", "R10", "mAP", "mINP")

# Variant name -> overrides. Ablations of GCKD switch one component off each.
VARIANTS: dict[str, tuple[str, ...]] = {
    "source_only": ("method=source_only",),
    "oracle": ("method=oracle",),
    "gckd": ("method=gckd",),
    "gckd_no_graph": ("method=gckd", "graph.enabled=false"),
    "gckd_no_cmkd": ("method=gckd", "distill.mode=none"),
    "gckd_no_pseudo_ids": ("method=gckd", "gckd.use_pseudo_ids=false"),
    "gckd_no_matching": ("method=gckd", "matching.enabled=false"),
    "gckd_no_hard_negatives": ("method=gckd", "matching.hard_negatives=false"),
    "gckd_no_centring": ("method=gckd", "gckd.domain_centring=false"),
    "gckd_no_bridge": ("method=gckd", "gckd.vocab_bridge=false"),
    "gckd_no_strong_views": ("method=gckd", "gckd.strong_views=none"),
    # Augmentation alone: teacher and student see the same strong view.
    "gckd_strong_views_both": ("method=gckd", "gckd.strong_views=both"),
    # Plain self-training: the teacher's own distribution over in-batch keys; no graph, no
    # memory, no pseudo-ids, no matching head, no domain centring, no lexical bridge, one view
    # (CMKD named, as a config with distillation off would leave nothing to train on).
    "self_training": ("method=gckd", "distill.mode=cmkd", "graph.enabled=false", "gckd.use_memory=false",
                      "gckd.use_pseudo_ids=false", "matching.enabled=false",
                      "gckd.domain_centring=false", "gckd.vocab_bridge=false",
                      "gckd.strong_views=none", "distill.alpha=0.0"),
    # The easier variant: target pairs known (ids still unknown).
    "gckd_paired": ("method=gckd", "data.target.paired=true"),
    # The second distillation mode (model/mnf_csc.py) in place of CMKD, with the pseudo-ids
    # its target positives and partners come from (pretrained.yaml turns them off; without
    # them every target row would be a negative only).
    "gckd_mnf_csc": ("method=gckd", "distill.mode=mnf_csc", "gckd.use_pseudo_ids=true"),
}


def variant_overrides(variant: str, extra: list[str]) -> list[str]:
    """A table's ``key=value`` overrides set the base every variant starts from, so the
    variant's own switches come last and win (``gckd_no_graph`` stays graphless when the table
    turns the graph on for all)."""
    return [*extra, *VARIANTS[variant]]


def run_one(variant: str, seed: int, root: Path, extra: list[str], recorded: dict | None = None,
            before_start=lambda: None, config: str = "") -> dict:
    """The results of ``root/<variant>-seed<seed>``: the finished run there, else ``recorded``
    (a final an earlier table recorded), else a new ``python -m gckd_ray.train`` run (from the
    YAML ``config`` if given, then the ``extra`` and the variant's overrides), started after
    ``before_start()`` returns."""
    out = root / f"{variant}-seed{seed}"
    results = out / "results.json"
    if results.is_file():
        return json.loads(results.read_text())
    if recorded is not None:
        return recorded
    before_start()
    cmd = [sys.executable, "-m", "gckd_ray.train", *(["--config", config] if config else []),
           *variant_overrides(variant, extra), f"run.seed={seed}", f"run.output_dir={out}"]
    print(f"[{time.strftime('%H:%M:%S')}] {variant} seed {seed}: {' '.join(cmd[1:])}", flush=True)
    start = time.perf_counter()
    with open(root / f"{variant}-seed{seed}.log", "w") as log:
        subprocess.run(cmd, check=True, stdout=log, stderr=subprocess.STDOUT)
    print(f"  done in {time.perf_counter() - start:.0f} s", flush=True)
    return json.loads(results.read_text())


def recorded_finals(rows: dict[str, list[dict]], path) -> dict[tuple[str, int], dict]:
    """(variant, seed) -> a results-like dict from one table's ``{variant: [row per seed]}``."""
    return {(variant, row["seed"]): {"final": {m: row[m] for m in METRICS},
                                     "recorded_in": str(path)}
            for variant, seed_rows in rows.items() for row in seed_rows}


def load_recorded(paths: list[str]) -> dict[tuple[str, int], dict]:
    """(variant, seed) -> a results-like dict from earlier tables' JSON files."""
    recorded = {}
    for path in paths:
        recorded.update(recorded_finals(json.loads(Path(path).read_text()), path))
    return recorded


def reused_note(runs: list[dict]) -> list[str]:
    """The sentence saying which runs are recorded finals rather than runs of this command."""
    reused = sorted({r["recorded_in"] for r in runs if "recorded_in" in r})
    if not reused:
        return []
    count = sum("recorded_in" in r for r in runs)
    return [f"{count} of {len(runs)} runs reused from the recorded finals of: "
            f"{', '.join(f'`{p}`' for p in reused)}."]


def parse_with_recorded(parser: argparse.ArgumentParser, argv, what: str) -> argparse.Namespace:
    """Add ``--config``, ``--recorded`` and the trailing overrides, parse, and refuse what
    cannot be reused."""
    parser.add_argument("--config", default="",
                        help="YAML every run starts from (e.g. experiments/configs/"
                             "pretrained.yaml); the variant's overrides apply on top")
    parser.add_argument("--recorded", nargs="*", default=[], metavar="JSON",
                        help=f"{what} finals are reused instead of rerun (only without overrides)")
    parser.add_argument("overrides", nargs="*", metavar="key=value",
                        help="the base every variant starts from; its own switches win")
    args = parser.parse_args(argv)
    if args.recorded and (args.overrides or args.config):
        parser.error("--recorded finals were measured without --config or overrides")
    if missing := [path for path in args.recorded if not Path(path).is_file()]:
        parser.error(f"--recorded: no such file: {', '.join(missing)}")
    return args


def refuse_contradictions(parser: argparse.ArgumentParser, variants: list[str],
                          overrides: list[str], config: str = "") -> None:
    """Stop before any run starts when a variant's config breaks a cross-key rule (the same
    check each ``python -m gckd_ray.train`` run would fail on, once per run)."""
    for variant in variants:
        try:
            errors, _ = check(load_config(config or None, variant_overrides(variant, overrides)),
                              "train")
        except InputError as err:
            errors = [str(err)]
        if errors:
            parser.error(f"variant {variant}: config error: {errors[0]}")


def summarise(rows: dict[str, list[dict]]) -> dict[str, dict[str, tuple[float, float]]]:
    return {v: {m: (statistics.mean(r["final"][m] for r in runs),
                    statistics.pstdev(r["final"][m] for r in runs)) for m in METRICS}
            for v, runs in rows.items()}


def _target_setting(variant: str) -> str:
    overrides = VARIANTS[variant]
    if "method=oracle" in overrides:
        return "labelled (upper bound)"
    if "method=source_only" in overrides:
        return "not used"
    return "paired, no ids" if "data.target.paired=true" in overrides else "unpaired, no ids"


def markdown(summary, rows, extra: list[str], config: str = "") -> str:
    run = next((r for runs in rows.values() for r in runs if "protocol" in r),
               {"protocol": "as recorded", "selection": SELECTION})
    selection, protocol = run["selection"], run["protocol"]
    lines = [f"Protocol `{protocol}`, {len(next(iter(rows.values())))} seeds, mean ± std of the "
             f"final model; selection: {selection}.",
             f"Config: `{config or '(defaults)'}`; overrides: `{' '.join(extra) or '(none)'}`."]
    lines += reused_note([r for runs in rows.values() for r in runs])
    lines += ["",
             "| variant | target training data | " + " | ".join(METRICS) + " |",
             "|---" * (len(METRICS) + 2) + "|"]
    for variant, stats in summary.items():
        cells = " | ".join(f"{mean:.2f} ± {std:.2f}" for mean, std in stats.values())
        lines.append(f"| {variant} | {_target_setting(variant)} | {cells} |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m experiments.run_table",
                                     description=__doc__.split("\n\n")[0])
    parser.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=list(VARIANTS))
    parser.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    parser.add_argument("--runs", default="runs/table", help="folder for the runs")
    parser.add_argument("--out", default="experiments/results/table.md")
    args = parse_with_recorded(parser, argv, "earlier tables' JSON: their (variant, seed)")
    refuse_contradictions(parser, args.variants, args.overrides, args.config)
    root = Path(args.runs)
    root.mkdir(parents=True, exist_ok=True)
    recorded = load_recorded(args.recorded)

    rows = {v: [run_one(v, s, root, args.overrides, recorded.get((v, s)), config=args.config)
                for s in args.seeds] for v in args.variants}
    summary = summarise(rows)
    text = markdown(summary, rows, args.overrides, args.config)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(text)
    out.with_suffix(".json").write_text(json.dumps(
        {v: [{"seed": s, **r["final"]} for s, r in zip(args.seeds, runs)]
         for v, runs in rows.items()}, indent=1))
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
