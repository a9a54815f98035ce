"""A sweep's search space and ranking metric, Ray-free: parsed and checked from config before
Ray starts (``gckd_ray.tune``, the cross-key rules), and read by the sweep and its report.
"""

from __future__ import annotations

import dataclasses
import json
import math
from dataclasses import dataclass
from typing import Any

from gckd_ray.config import Config, ConfigError, get_key, override_config

SAMPLERS = ("grid", "choice", "uniform", "loguniform", "randint")
LABEL_FREE_METRIC = "target_mnn"
ORACLE_METRIC = "R1"


@dataclass(frozen=True)
class Dimension:
    """One swept key: ``kind`` in SAMPLERS and its values (grid/choice) or bounds."""

    key: str
    kind: str
    values: tuple


def ranking_metric(cfg: Config) -> str:
    return ORACLE_METRIC if cfg.tune.oracle_metric else LABEL_FREE_METRIC


def describe_metric(metric: str) -> str:
    if metric == ORACLE_METRIC:
        return "R1 (oracle: target test labels, research only)"
    return f"{LABEL_FREE_METRIC} (label-free: no target ids or pairs)"


def _flatten(cfg: Config, space: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """``{graph: {k: {grid: ...}}}`` and ``{graph.k: {grid: ...}}`` alike -> dotted keys."""
    out: dict[str, Any] = {}
    for name, spec in space.items():
        key = f"{prefix}{name}"
        try:
            section = dataclasses.is_dataclass(get_key(cfg, key))
        except AttributeError:
            section = False
        if section and isinstance(spec, dict):
            out.update(_flatten(cfg, spec, f"{key}."))
        else:
            out[key] = spec
    return out


def search_dimensions(cfg: Config) -> list[Dimension]:
    """The validated search space of ``cfg.tune``; ConfigError names the offending entry.

    Every grid/choice value and both bounds of a range are applied to the config, so a value
    the trial would reject (wrong type, out of range) fails here, before Ray starts."""
    space = _flatten(cfg, cfg.tune.search_space)
    if not space:
        raise ConfigError("tune.search_space: empty; give at least one key to sweep")
    dims = []
    for key, spec in space.items():
        where = f"tune.search_space.{key}"
        if key.split(".")[0] in ("tune", "run"):
            raise ConfigError(f"{where}: {key.split('.')[0]}.* keys cannot be swept")
        try:
            get_key(cfg, key)
        except AttributeError:
            raise ConfigError(f"{where}: not a config key (see python -m gckd_ray.train "
                              "--help)") from None
        if not isinstance(spec, dict) or len(spec) != 1 or next(iter(spec)) not in SAMPLERS:
            raise ConfigError(f"{where}: must be one of {{{': [...]}, {'.join(SAMPLERS)}: "
                              f"[...]}}, got {spec!r}")
        kind, values = next(iter(spec.items()))
        dims.append(_check_dimension(cfg, key, kind, values, where))
    return dims


def _check_dimension(cfg: Config, key: str, kind: str, values: Any, where: str) -> Dimension:
    if not isinstance(values, list) or not values:
        raise ConfigError(f"{where}.{kind}: expected a non-empty list, got {values!r}")
    if kind in ("uniform", "loguniform", "randint"):
        if len(values) != 2 or not all(isinstance(v, (int, float)) and not isinstance(v, bool)
                                       for v in values) or not values[0] < values[1]:
            raise ConfigError(f"{where}.{kind}: expected [low, high] numbers with low < high, "
                              f"got {values!r}")
        if kind == "loguniform" and values[0] <= 0:
            raise ConfigError(f"{where}.loguniform: bounds must be > 0, got {values!r}")
        if kind == "randint" and not all(isinstance(v, int) for v in values):
            raise ConfigError(f"{where}.randint: bounds must be integers, got {values!r}")
    if kind in ("uniform", "loguniform") and isinstance(get_key(cfg, key), int):
        raise ConfigError(f"{where}.{kind}: {key} is an integer key; use randint, grid or "
                          "choice")
    probes = [values[0], values[1] - 1] if kind == "randint" else values
    for value in probes:
        try:
            override_config(cfg, [f"{key}={json.dumps(value)}"])
        except ConfigError as err:
            raise ConfigError(f"{where}: value {value!r} is rejected: {err}") from None
    return Dimension(key, kind, tuple(values))


def num_trials(cfg: Config, dims: list[Dimension]) -> int:
    grid = math.prod(len(d.values) for d in dims if d.kind == "grid")
    return grid * cfg.tune.num_samples


def first_rung(cfg: Config) -> int:
    """ASHA's first comparison epoch: ``tune.grace_epochs`` after the GCKD warm-up (before it,
    trials that differ only in adaptation knobs are identical)."""
    warmup = cfg.gckd.warmup_epochs if cfg.method == "gckd" else 0
    return warmup + cfg.tune.grace_epochs
