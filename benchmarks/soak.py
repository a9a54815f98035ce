"""Soak: a 2-worker GCKD run on the default protocol for a fixed wall time, memory sampled.

    python -m benchmarks.soak [--minutes 20] [--interval 5] [--max-growth 0.10] [--smoke]
                              [--output-dir DIR] [key=value ...]

Starts ``python -m gckd_ray.train`` (local Ray on loopback, default config, ``train.epochs``
raised so the schedule outlasts the soak) and samples, every ``--interval`` seconds, the RSS of
the driver and of every Ray Train worker, the Train controller and the memory actor (found by
their process titles among the driver's descendants, so other Ray instances on the machine are
never looked at). Once ``--minutes`` have passed it waits for the next epoch's checkpoint and
stops the driver (SIGINT).

Stated bound: no worker, controller, actor or driver grows its peak RSS by more than
``--max-growth`` (default 10%) from the baseline epoch to the last epoch. The baseline epoch is
the second epoch of the adaptation phase (``gckd.warmup_epochs`` + 2: adaptation allocates
the graph and matching-head tensors once, in its first epoch), or the earliest epoch a short
run has. At the end the memory's state in the last checkpoint (which is verified against its
manifest) must be consistent: queues within size and holding both domains, finite features,
domain flags 0/1, source labels >= 0, target labels -1 (the memory never sees target ids),
indices in range, and every target pseudo-id held by at least one image and one caption.

Prints the driver's progress, a table of peak RSS over time per process and a final JSON line;
exits 1 if the bound or the consistency check fails (``--smoke`` checks consistency only: its
tiny run is too short to judge growth).
"""

from __future__ import annotations

import argparse
import json
import os
import re
import signal
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import psutil

from gckd_ray.checkpoint_format import CheckpointError, read_state, verify_checkpoint
from gckd_ray.config import load_config
from gckd_ray.model.centring import SOURCE, TARGET
from gckd_ray.model.memory_bank import MODALITIES

MIB = 1 << 20
# Process titles Ray gives the actors of a Train run (``ray::<class>[.<method>]``).
ROLES = {"RayTrainWorker": "worker", "TrainController": "train controller",
         "MemoryActor": "memory actor"}
EPOCH_LINE = re.compile(r"\[epoch (\d+)/\d+\] target ")
SMOKE = ("data.synth_scale=0.1", "train.batch_size=16", "model.hidden_size=32",
         "model.embed_dim=32", "model.num_layers=1", "model.num_heads=2",
         "gckd.warmup_epochs=1", "gckd.queue_size=256", "gckd.memory_nodes=16",
         "graph.k=5", "matching.rerank_top_k=0", "train.log_every=1000")


@dataclass
class Trace:
    """RSS samples per process and epoch end times, as the soak saw them."""

    start: float = field(default_factory=time.monotonic)
    samples: dict[str, list[tuple[float, float]]] = field(default_factory=dict)  # (t, MiB)
    epoch_ends: dict[int, float] = field(default_factory=dict)

    def add(self, name: str, t: float, mib: float) -> None:
        self.samples.setdefault(name, []).append((t, mib))


def role(cmdline: list[str], pid: int, driver: int) -> str | None:
    """The soak's name for a process, or None for processes it does not follow."""
    if pid == driver:
        return "driver"
    title = " ".join(cmdline)
    for marker, name in ROLES.items():
        if title.startswith(f"ray::{marker}"):
            return name
    return None


def sample(driver: psutil.Process, trace: Trace, seen: dict[int, psutil.Process]) -> None:
    """One RSS sample of the driver and the followed Ray processes below it; ``seen``
    collects every descendant met (to end what the driver leaves behind)."""
    t = time.monotonic() - trace.start
    try:
        family = [driver, *driver.children(recursive=True)]
    except psutil.NoSuchProcess:
        return
    for proc in family:
        seen.setdefault(proc.pid, proc)
        try:
            name = role(proc.cmdline(), proc.pid, driver.pid)
            if name is not None:
                trace.add(f"{name} (pid {proc.pid})", t, proc.memory_info().rss / MIB)
        except (psutil.NoSuchProcess, psutil.AccessDenied, psutil.ZombieProcess):
            continue


def _window_peak(points: list[tuple[float, float]], lo: float, hi: float) -> float | None:
    inside = [mib for t, mib in points if lo < t <= hi]
    return max(inside) if inside else None


def growth(trace: Trace, warmup_epochs: int) -> dict[str, dict]:
    """Per process: peak RSS in the baseline epoch and in the last epoch, and the growth."""
    ends = dict(sorted(trace.epoch_ends.items()))
    epochs = list(ends)
    if len(epochs) < 2:
        return {}
    wanted = warmup_epochs + 2
    base = wanted if wanted in ends and wanted < epochs[-1] else epochs[1]
    last = epochs[-1]

    def window(epoch: int) -> tuple[float, float]:
        previous = max((ends[e] for e in epochs if e < epoch), default=0.0)
        return previous, ends[epoch]

    out = {}
    for name, points in trace.samples.items():
        before, after = _window_peak(points, *window(base)), _window_peak(points, *window(last))
        if before is not None and after is not None:
            out[name] = {"baseline_epoch": base, "baseline_mib": round(before, 1),
                         "last_epoch": last, "last_mib": round(after, 1),
                         "peak_mib": round(max(m for _, m in points), 1),
                         "growth": round(after / before - 1.0, 4)}
    return out


def check_memory_state(state: dict[str, np.ndarray]) -> list[str]:
    """Problems with a memory state (``MemoryBank.state_dict``); empty when consistent."""
    problems = []
    queue = int(state["queue_size"])
    for m in MODALITIES:
        count, ptr = int(state[f"{m}_count"]), int(state[f"{m}_ptr"])
        if not (0 < count <= queue and 0 <= ptr < queue):
            problems.append(f"{m} queue: count {count}, ptr {ptr} for size {queue}")
            continue
        slots = (ptr - count + np.arange(count)) % queue
        feats, domain = state[f"{m}_features"][slots], state[f"{m}_domain"][slots]
        labels, indices = state[f"{m}_labels"][slots], state[f"{m}_indices"][slots]
        if not np.isfinite(feats).all():
            problems.append(f"{m} queue: non-finite features")
        if not np.isin(domain, (SOURCE, TARGET)).all():
            problems.append(f"{m} queue: domain flags other than {SOURCE}/{TARGET}")
        if not ((domain == SOURCE).any() and (domain == TARGET).any()):
            problems.append(f"{m} queue: not both domains present")
        if (labels[domain == SOURCE] < 0).any():
            problems.append(f"{m} queue: negative source labels")
        if (labels[domain == TARGET] != -1).any():
            problems.append(f"{m} queue: a target entry carries a label")
        rows = int(state[f"num_target_{m}s"])
        if (indices < 0).any() or (indices[domain == TARGET] >= rows).any():
            problems.append(f"{m} queue: indices out of range")
        seen = state[f"target_{m}_seen"]
        if not np.isfinite(state[f"target_{m}_features"][seen]).all():
            problems.append(f"target {m} table: non-finite features")
    image_ids, text_ids = (state[f"target_{m}_pseudo_ids"] for m in MODALITIES)
    if set(image_ids[image_ids >= 0].tolist()) != set(text_ids[text_ids >= 0].tolist()):
        problems.append("pseudo-ids: some held by images only or captions only")
    if (image_ids < -1).any() or (text_ids < -1).any():
        problems.append("pseudo-ids: values below -1")
    return problems


def memory_summary(state: dict[str, np.ndarray]) -> dict:
    out = {"queue_size": int(state["queue_size"]), "pushes": int(state["version"]),
           "pseudo_refreshes": int(state["pseudo_version"])}
    for m in MODALITIES:
        count, ptr, queue = int(state[f"{m}_count"]), int(state[f"{m}_ptr"]), out["queue_size"]
        domain = state[f"{m}_domain"][(ptr - count + np.arange(count)) % queue]
        out[f"{m}_filled"] = count
        out[f"{m}_source"], out[f"{m}_target"] = int((domain == SOURCE).sum()), int(
            (domain == TARGET).sum())
        out[f"target_{m}_with_pseudo_id"] = int((state[f"target_{m}_pseudo_ids"] >= 0).sum())
    return out


def _read_output(stream, trace: Trace, echo: bool) -> None:
    for line in stream:
        if echo:
            print(line, end="", flush=True)
        found = EPOCH_LINE.search(line)
        if found:
            trace.epoch_ends[int(found.group(1))] = time.monotonic() - trace.start


def _stop(driver: subprocess.Popen, seen: dict[int, psutil.Process]) -> None:
    """SIGINT the driver (it shuts its local Ray down), then end what it left behind."""
    if driver.poll() is None:
        driver.send_signal(signal.SIGINT)
        try:
            driver.wait(timeout=120)
        except subprocess.TimeoutExpired:
            driver.kill()
            driver.wait(timeout=60)
    for proc in seen.values():  # only processes of this soak's own run, by pid
        try:
            if proc.pid != driver.pid and proc.is_running():
                proc.kill()
        except psutil.NoSuchProcess:
            pass


def run_soak(minutes: float, interval: float, output: Path, overrides: list[str],
             min_epochs: int, echo: bool) -> tuple[Trace, int]:
    """Run the driver until ``minutes`` passed and one more epoch ended; return the trace and
    the driver's exit status."""
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}  # a local instance
    env["RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"] = "0"
    command = [sys.executable, "-m", "gckd_ray.train", "train.num_workers=2",
               f"run.output_dir={output}", *overrides]
    print("soak: " + " ".join(command), flush=True)
    trace = Trace()
    driver = subprocess.Popen(command, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                              text=True, bufsize=1)
    reader = threading.Thread(target=_read_output, args=(driver.stdout, trace, echo), daemon=True)
    reader.start()
    seen: dict[int, psutil.Process] = {}
    handle = psutil.Process(driver.pid)
    deadline_epochs = None
    try:
        while driver.poll() is None:
            sample(handle, trace, seen)
            elapsed = time.monotonic() - trace.start
            done = max(trace.epoch_ends, default=0)
            if elapsed >= minutes * 60 and deadline_epochs is None:
                deadline_epochs = done
            if deadline_epochs is not None and done > deadline_epochs and done >= min_epochs:
                break  # one whole epoch after the deadline: its checkpoint is written
            time.sleep(interval)
    finally:
        _stop(driver, seen)
        reader.join(timeout=30)
    return trace, driver.returncode


def _latest_checkpoint(output: Path) -> Path | None:
    found = sorted(output.glob("ray/*/checkpoint_*/state.json"))
    return found[-1].parent if found else None


def table(trace: Trace, columns: int = 8) -> str:
    """Peak RSS (MiB) per process in ``columns`` equal slices of the sampled time."""
    end = max((t for points in trace.samples.values() for t, _ in points), default=0.0)
    edges = [end * i / columns for i in range(columns + 1)]
    header = f"{'process':<28}" + "".join(f"{f'<={edges[i + 1] / 60:.1f}m':>9}"
                                          for i in range(columns))
    lines = ["peak RSS (MiB) over time", header]
    for name, points in sorted(trace.samples.items()):
        cells = []
        for i in range(columns):
            peak = _window_peak(points, edges[i] - (1e-9 if i == 0 else 0), edges[i + 1])
            cells.append(f"{peak:9.0f}" if peak is not None else f"{'-':>9}")
        lines.append(f"{name:<28}" + "".join(cells))
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.soak",
                                     description=__doc__.split("\n\n")[0])
    parser.add_argument("--minutes", type=float, default=20.0, help="wall time (default 20)")
    parser.add_argument("--interval", type=float, default=5.0, help="seconds between samples")
    parser.add_argument("--max-growth", type=float, default=0.10,
                        help="allowed RSS growth, baseline epoch -> last epoch (default 0.10)")
    parser.add_argument("--epochs", type=int, default=1000,
                        help="train.epochs of the run (enough to outlast --minutes)")
    parser.add_argument("--output-dir", default="", help="run folder (default: a new temp dir)")
    parser.add_argument("--smoke", action="store_true",
                        help="tiny config, a few epochs, consistency check only")
    parser.add_argument("--quiet", action="store_true", help="do not echo the driver's output")
    parser.add_argument("overrides", nargs="*", help="config key=value for the run")
    args = parser.parse_args(argv)
    overrides = [*(SMOKE if args.smoke else ()), f"train.epochs={args.epochs}", *args.overrides]
    cfg = load_config(None, overrides)  # a bad override fails here, before anything starts
    output = Path(args.output_dir or tempfile.mkdtemp(prefix="gckd-soak-"))
    min_epochs = cfg.gckd.warmup_epochs + 3 if args.smoke else 2
    trace, code = run_soak(args.minutes, args.interval, output, overrides, min_epochs,
                           echo=not args.quiet)

    rss = growth(trace, cfg.gckd.warmup_epochs)
    checkpoint = _latest_checkpoint(output)
    problems = [] if checkpoint else ["no checkpoint was written"]
    memory = {}
    if checkpoint:
        try:
            verify_checkpoint(checkpoint)
            state = read_state(checkpoint)
        except (CheckpointError, ValueError, FileNotFoundError) as err:
            problems = [f"last checkpoint: {err}"]
        else:
            problems = check_memory_state(state)
            memory = memory_summary(state)
    growth_ok = bool(rss) and all(p["growth"] <= args.max_growth for p in rss.values())
    followed = {n.split(" (")[0] for n in trace.samples}
    if not {"driver", "worker", "memory actor"} <= followed:
        problems.append(f"processes not found: followed only {sorted(followed)}")
    result = {
        "benchmark": "soak", "smoke": args.smoke, "cpus": os.cpu_count(),
        "wall_minutes": round((time.monotonic() - trace.start) / 60, 2),
        "epochs_completed": max(trace.epoch_ends, default=0), "driver_exit": code,
        "samples": sum(len(p) for p in trace.samples.values()),
        "max_growth": args.max_growth, "rss": rss, "growth_ok": growth_ok,
        "memory": memory, "memory_problems": problems, "memory_ok": not problems,
        "checkpoint": str(checkpoint) if checkpoint else None,
    }
    print(table(trace))
    for name, entry in sorted(rss.items()):
        print(f"{name:<28} epoch {entry['baseline_epoch']}: {entry['baseline_mib']:.0f} MiB -> "
              f"epoch {entry['last_epoch']}: {entry['last_mib']:.0f} MiB "
              f"({100 * entry['growth']:+.1f}%, bound {100 * args.max_growth:.0f}%)")
    print(f"memory at the last checkpoint: {'consistent' if not problems else problems}")
    print(json.dumps(result))
    return result


if __name__ == "__main__":
    outcome = main()
    sys.exit(0 if outcome["memory_ok"] and (outcome["smoke"] or outcome["growth_ok"]) else 1)
