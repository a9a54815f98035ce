"""Run source-only, GCKD and GCKD+MNF/CSC over the six SynthPEDES protocols, several seeds;
tabulate, plot, and regenerate the protocols section of experiments/RESULTS.md.

    python -m experiments.run_protocols [--seeds 0 1 2] [--jobs 2] [--runs DIR] \\
        [--variants source_only gckd gckd_mnf_csc] [--protocols C2I C2R ...] \\
        [--recorded earlier_protocols.json ...] [key=value ...]

Every run is ``python -m gckd_ray.train`` in its own process (``run_table.run_one``: a finished
run is reused, so an interrupted table resumes), under ``<runs>/<protocol>/``. Under the
default ``<runs>``, inside the repository, git keeps only each run's results.json, so the
committed finished runs are reused on any machine and a table can be finished across sessions.
``--recorded`` also reuses the final metrics of (protocol, variant, seed) runs that an earlier
protocols JSON recorded, and the table says so. Writes
``experiments/results/protocols.{md,json}``, ``protocols.png`` (R@1 per protocol and method)
and ``protocols_curves.png`` (target R@1 per epoch), and replaces the text between the
``protocols`` markers of experiments/RESULTS.md. The reported model of every run is its last
epoch: no target labels select anything.
"""

from __future__ import annotations

import argparse
import concurrent.futures
import json
import os
import statistics
import sys
import threading
import time
from pathlib import Path

from experiments.run_table import (METRICS, VARIANTS, parse_with_recorded, recorded_finals,
                                   refuse_contradictions, reused_note, run_one)
from gckd_ray.results import SELECTION

PROTOCOLS: dict[str, tuple[str, str]] = {
    "C2I": ("synth-cuhk", "synth-icfg"), "C2R": ("synth-cuhk", "synth-rstp"),
    "I2C": ("synth-icfg", "synth-cuhk"), "I2R": ("synth-icfg", "synth-rstp"),
    "R2C": ("synth-rstp", "synth-cuhk"), "R2I": ("synth-rstp", "synth-icfg"),
}
DEFAULT_VARIANTS = ("source_only", "gckd", "gckd_mnf_csc")
RESULTS_DOC = Path("experiments/RESULTS.md")
RUNS = Path("experiments/results/protocol_runs")
# Published IRRA R@1 (shared/DESIGN.md section 6) on the real datasets these protocols mimic:
# direct transfer (trained on the source, tested on the target) and in-domain (the target's own
# training split). Published numbers, not reproduced here.
PUBLISHED_IRRA_DIRECT = {"C2I": 43.04, "C2R": 52.55, "I2C": 33.90, "I2R": 47.45, "R2C": 35.25,
                         "R2I": 33.58}
PUBLISHED_IRRA_IN_DOMAIN = {"cuhk": 73.38, "icfg": 63.46, "rstp": 60.20}
BEGIN, END = "<!-- protocols:begin -->", "<!-- protocols:end -->"
# Two Ray local clusters starting in the same minute on 2 loaded cores can time out.
STAGGER_S = 90.0


def protocol_overrides(protocol: str) -> list[str]:
    source, target = PROTOCOLS[protocol]
    return [f"data.source.name={source}", f"data.target.name={target}"]


def load_recorded(paths: list[str]) -> dict[tuple[str, str, int], dict]:
    """(protocol, variant, seed) -> a results-like dict from earlier protocols JSON files."""
    recorded = {}
    for path in paths:
        for protocol, rows in json.loads(Path(path).read_text()).items():
            recorded.update({(protocol, *key): result
                             for key, result in recorded_finals(rows, path).items()})
    return recorded


def run_all(protocols, variants, seeds, root: Path, extra, jobs: int,
            recorded: dict | None = None, config: str = "") -> dict:
    """``{protocol: {variant: [results.json per seed]}}``; ``jobs`` runs at a time, each from
    the YAML ``config`` if given. A run with no results.json under ``root`` but a
    ``recorded`` final is not rerun."""
    recorded = recorded or {}
    tasks = [(p, v, s) for p in protocols for v in variants for s in seeds]
    lock, last_start = threading.Lock(), [0.0]

    def stagger():  # only before a new run: a reused one needs no wait
        with lock:
            time.sleep(max(0.0, last_start[0] + STAGGER_S - time.monotonic()))
            last_start[0] = time.monotonic()

    def one(task):
        protocol, variant, seed = task
        folder = root / protocol
        folder.mkdir(parents=True, exist_ok=True)
        return run_one(variant, seed, folder, [*protocol_overrides(protocol), *extra],
                       recorded.get(task), stagger, config=config)

    with concurrent.futures.ThreadPoolExecutor(jobs) as pool:
        results = list(pool.map(one, tasks))
    table: dict = {p: {v: [] for v in variants} for p in protocols}
    for (protocol, variant, _), result in zip(tasks, results):
        table[protocol][variant].append(result)
    return table


def _stats(runs: list[dict], metric: str) -> tuple[float, float]:
    values = [r["final"][metric] for r in runs]
    return statistics.mean(values), statistics.pstdev(values)


def _cell(runs: list[dict], metric: str) -> str:
    mean, std = _stats(runs, metric)
    return f"{mean:.2f}" if len(runs) == 1 else f"{mean:.2f} ± {std:.2f}"  # no std of one run


def markdown(table: dict, seeds, extra, config: str = "") -> str:
    runs = [r for variants in table.values() for seed_runs in variants.values() for r in seed_runs]
    selection = next((r["selection"] for r in runs if "selection" in r), SELECTION)
    lines = [f"{len(seeds)} seed(s) ({', '.join(map(str, seeds))}), mean ± std of the final model; "
             f"selection: {selection}. Config: `{config or '(defaults)'}`; overrides: "
             f"`{' '.join(extra) or '(none)'}`.",
             *reused_note(runs), "",
             "| protocol | variant | " + " | ".join(METRICS) + " |",
             "|---" * (len(METRICS) + 2) + "|"]
    for protocol, variants in table.items():
        source, target = PROTOCOLS[protocol]
        for variant, runs in variants.items():
            cells = " | ".join(_cell(runs, m) for m in METRICS)
            lines.append(f"| {protocol} ({source} -> {target}) | {variant} | {cells} |")
    return "\n".join(lines) + "\n"


def r1_summary(table: dict) -> str:
    """R@1 per protocol (mean over seeds) side by side, with each variant's gain over
    source-only and MNF/CSC's difference from CMKD where those variants ran."""
    variants = list(next(iter(table.values())))
    gains = [v for v in variants if v != "source_only"] if "source_only" in variants else []
    mnf = "gckd" in variants and "gckd_mnf_csc" in variants
    header = [*variants, *(f"{v} − source_only" for v in gains)]
    header += ["gckd_mnf_csc − gckd"] if mnf else []
    lines = ["| protocol | " + " | ".join(header) + " |", "|---" * (len(header) + 1) + "|"]
    rows = {p: {v: _stats(runs, "R1")[0] for v, runs in vs.items()} for p, vs in table.items()}
    rows["mean"] = {v: statistics.mean(r[v] for r in rows.values()) for v in variants}
    for protocol, r1 in rows.items():
        cells = [f"{r1[v]:.2f}" for v in variants]
        cells += [f"{r1[v] - r1['source_only']:+.2f}" for v in gains]
        if mnf:
            cells.append(f"{r1['gckd_mnf_csc'] - r1['gckd']:+.2f}")
        lines.append(f"| {protocol} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def published_table(protocols) -> str:
    lines = ["Published reference numbers for the real protocols (IRRA, as published; **not "
             "reproduced here**), R@1:", "",
             "| protocol | IRRA direct transfer | IRRA in-domain on the target |", "|---|---|---|"]
    for protocol in protocols:
        source, target = (name.removeprefix("synth-") for name in PROTOCOLS[protocol])
        lines.append(f"| {protocol} ({source} -> {target}) | {PUBLISHED_IRRA_DIRECT[protocol]:.2f}"
                     f" | {PUBLISHED_IRRA_IN_DOMAIN[target]:.2f} |")
    lines += ["", "GCKD's own published per-protocol numbers (arXiv 2501.15052) were not "
              "available in the sources this project can read, so they are not listed."]
    return "\n".join(lines) + "\n"


def plot_bars(table: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    protocols = list(table)
    variants = list(next(iter(table.values())))
    width = 0.8 / len(variants)
    fig, ax = plt.subplots(figsize=(1.6 * len(protocols) + 2, 3.4))
    for i, variant in enumerate(variants):
        stats = [_stats(table[p][variant], "R1") for p in protocols]
        xs = [j + (i - (len(variants) - 1) / 2) * width for j in range(len(protocols))]
        ax.bar(xs, [m for m, _ in stats], width, yerr=[s for _, s in stats], capsize=2,
               label=variant)
    ax.set_xticks(range(len(protocols)), protocols)
    ax.set_ylabel("target R@1 (%)")
    ax.set_title("SynthPEDES protocols: target text-to-image R@1 (final model)", fontsize=9)
    ax.legend(fontsize=7)
    ax.grid(axis="y", alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def plot_curves(table: dict, path: Path) -> None:
    """Target R@1 after every scored epoch, mean over the seeds whose runs kept a history
    (recorded finals have none), one panel per protocol."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(2, 3, figsize=(11, 6), squeeze=False)
    for ax in axes.flat[len(table):]:
        ax.set_visible(False)
    for ax, (protocol, variants) in zip(axes.flat, table.items()):
        seeds = 0
        for variant, all_runs in variants.items():
            runs = [r for r in all_runs if "history" in r]
            if not runs:
                continue
            seeds = max(seeds, len(runs))
            # epochs every seed scored (train.eval_every can leave some out)
            scored = [{h["epoch"]: h["R1"] for h in r["history"] if "R1" in h} for r in runs]
            epochs = sorted(set.intersection(*(set(s) for s in scored)))
            mean = [statistics.mean(s[e] for s in scored) for e in epochs]
            ax.plot(epochs, mean, label=variant)
        if not seeds:
            ax.text(0.5, 0.5, "no per-epoch history\n(recorded finals only)", ha="center",
                    va="center", transform=ax.transAxes, fontsize=8)
            ax.set_xticks([])  # an empty 0-1 scale would read as data
            ax.set_yticks([])
        ax.set_title(f"{protocol} (mean of {seeds} seed(s) with a history)", fontsize=9)
        ax.set_xlabel("epoch")
        ax.set_ylabel("target R@1 (%)")
        ax.grid(alpha=0.3)
        if seeds and not fig.legends:
            handles, labels = ax.get_legend_handles_labels()
            fig.legend(handles, labels, loc="upper center", ncol=len(labels), fontsize=8)
    fig.tight_layout(rect=(0, 0, 1, 0.95))  # room for the legend above the panels
    fig.savefig(path, dpi=110)
    plt.close(fig)


def update_results_doc(doc: Path, section: str) -> None:
    """Replace the text between the markers (appending them at the end the first time)."""
    text = doc.read_text() if doc.is_file() else "# Results\n"
    block = f"{BEGIN}\n{section}{END}"
    if BEGIN in text and END in text:
        head, rest = text.split(BEGIN, 1)
        text = head + block + rest.split(END, 1)[1]
    else:
        text = text.rstrip("\n") + "\n\n" + block + "\n"
    doc.write_text(text)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m experiments.run_protocols",
                                     description=__doc__.split("\n\n")[0])
    parser.add_argument("--protocols", nargs="+", default=list(PROTOCOLS), choices=list(PROTOCOLS))
    parser.add_argument("--variants", nargs="+", default=list(DEFAULT_VARIANTS),
                        choices=list(VARIANTS))
    parser.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    parser.add_argument("--jobs", type=int, default=2, help="runs at a time")
    parser.add_argument("--runs", default=str(RUNS), help="folder for the runs (git keeps "
                        "only their results.json under the default)")
    parser.add_argument("--out", default="experiments/results/protocols.md")
    parser.add_argument("--doc", default=str(RESULTS_DOC), help="markdown file whose protocols "
                        "section is regenerated")
    args = parse_with_recorded(parser, argv,
                               "earlier protocols JSON: their (protocol, variant, seed)")
    for protocol in args.protocols:
        refuse_contradictions(parser, args.variants, [*protocol_overrides(protocol),
                                                      *args.overrides], args.config)
    table = run_all(args.protocols, args.variants, args.seeds, Path(args.runs), args.overrides,
                    args.jobs, load_recorded(args.recorded), args.config)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    text = markdown(table, args.seeds, args.overrides, args.config)
    out.write_text(text)
    out.with_suffix(".json").write_text(json.dumps(
        {p: {v: [{"seed": s, **r["final"]} for s, r in zip(args.seeds, runs)]
             for v, runs in variants.items()} for p, variants in table.items()}, indent=1))
    bars, curves = out.with_suffix(".png"), out.with_name(out.stem + "_curves.png")
    plot_bars(table, bars)
    plot_curves(table, curves)
    command = " ".join(["python -m experiments.run_protocols", *(argv or sys.argv[1:])])
    doc = Path(args.doc)
    links = [os.path.relpath(p, doc.parent) for p in (bars, curves)]
    summary = r1_summary(table)
    section = (f"```bash\n{command}\n```\n\n{text}\nR@1 per protocol (mean over seeds):\n\n"
               f"{summary}\n![R@1 per protocol]({links[0]})\n"
               f"![target R@1 per epoch]({links[1]})\n\n{published_table(args.protocols)}")
    update_results_doc(doc, section)
    print(text + "\n" + summary)
    return 0


if __name__ == "__main__":
    sys.exit(main())
