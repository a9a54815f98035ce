"""Cross-key rules: settings that contradict each other, or that another setting makes inert.

``Config.validate`` checks each value on its own (types, ranges) wherever a config is built,
workers included. The rules here depend on what the command will do with the whole config, so
they run once, on the driver, before Ray starts and before anything is written under
``run.output_dir`` (``enforce``, called by the train and tune entry points; the experiment
commands run ``python -m gckd_ray.train``). A rule of severity ``error`` stops the command with
one ``config error: ...`` line (exit 2); a ``warning`` prints one ``warning: ...`` line and the
run goes on. ``rules_markdown`` renders the table for the README, so the two cannot drift.
"""

from __future__ import annotations

import dataclasses
import math
import sys
from collections.abc import Callable, Iterator
from dataclasses import dataclass

from gckd_ray.config import Config, ConfigError, get_key
from gckd_ray.tune_space import first_rung, search_dimensions

COMMANDS = ("train", "tune")

_TINY_MODEL = ("model.embed_dim", "model.hidden_size", "model.num_layers", "model.num_heads",
               "model.patch_size")
_ADAPTATION_WEIGHTS = ("loss.weights.cmkd", "loss.weights.gmp", "loss.weights.itm",
                       "loss.weights.i2i", "loss.weights.csc", "loss.weights.mnf_triplet",
                       "loss.weights.mnf_l1")
_DISTILL_TEMPERATURES = ("distill.tau_s", "distill.tau_t", "distill.alpha")  # CMKD and i2i
_MNF_CSC = ("distill.mnf_hidden", "distill.mnf_margin", "distill.csc_tau0",
            "distill.csc_tau_min", "distill.csc_tau_max", "loss.weights.csc",
            "loss.weights.mnf_triplet", "loss.weights.mnf_l1")
_GRAPH = ("graph.k", "graph.num_layers", "graph.temperature", "loss.weights.gmp",
          "gckd.memory_nodes")
_PSEUDO_REFRESH = ("gckd.pseudo_every", "gckd.pseudo_k", "gckd.pseudo_threshold",
                   "gckd.pseudo_image_k", "gckd.pseudo_center", "gckd.refresh_lag",
                   "gckd.refresh_threads", "gckd.pseudo_exact_pairs", "gckd.pseudo_probes",
                   "gckd.save_pseudo_ids")
_MATCHING = ("matching.hard_negatives", "matching.hidden", "matching.num_heads",
             "matching.num_layers", "matching.rerank_top_k", "matching.rerank_weight",
             "loss.weights.itm")


def _all_keys(section: str) -> tuple[str, ...]:
    return tuple(f"{section}.{f.name}" for f in dataclasses.fields(get_key(Config(), section)))


@dataclass(frozen=True)
class InertGroup:
    """``keys`` cannot change what is trained while ``applies(cfg)``; ``when`` says why."""

    when: str
    applies: Callable[[Config], bool]
    keys: tuple[str, ...]


INERT_GROUPS: tuple[InertGroup, ...] = (
    InertGroup("method is source_only or oracle (no adaptation phase)",
               lambda c: c.method != "gckd",
               _all_keys("gckd") + _all_keys("graph") + _all_keys("distill")
               + _all_keys("matching") + _ADAPTATION_WEIGHTS),
    InertGroup("model.pretrained is set (they shape the tiny random CLIP; a CLIP folder brings "
               "its own)",
               lambda c: bool(c.model.pretrained), _TINY_MODEL),
    InertGroup("gckd.vocab_bridge=false", lambda c: not c.gckd.vocab_bridge,
               ("gckd.bridge_margin",)),
    InertGroup("graph.enabled=false", lambda c: not c.graph.enabled, _GRAPH),
    InertGroup("matching.enabled=false", lambda c: not c.matching.enabled, _MATCHING),
    InertGroup("distill.mode is not cmkd", lambda c: c.distill.mode != "cmkd",
               ("loss.weights.cmkd",)),
    InertGroup("distill.mode is not cmkd and loss.weights.i2i=0",
               lambda c: c.distill.mode != "cmkd" and not c.loss.weights.i2i,
               _DISTILL_TEMPERATURES),
    InertGroup("gckd.use_pseudo_ids=false: no refresh runs",
               lambda c: not c.gckd.use_pseudo_ids, _PSEUDO_REFRESH),
    InertGroup("graph, matching, distillation and i2i are all off: no loss reads the target "
               "students or the memory",
               lambda c: not c.target_losses_on,
               ("gckd.use_memory", "gckd.queue_size", "gckd.snapshot_every",
                "gckd.target_text_grad") + _PSEUDO_REFRESH),
    InertGroup("distill.mode is not mnf_csc", lambda c: c.distill.mode != "mnf_csc", _MNF_CSC),
    InertGroup("gckd.domain_centring=false", lambda c: not c.gckd.domain_centring,
               ("gckd.centring_momentum",)),
    InertGroup("loss.weights.sdm=0", lambda c: c.loss.weights.sdm == 0,
               ("loss.sdm_temperature",)),
    InertGroup("loss.weights.itc=0", lambda c: c.loss.weights.itc == 0,
               ("loss.itc_temperature",)),
    InertGroup("always: the source is paired and labelled", lambda c: True,
               ("data.source.paired",)),
)


def inert_keys(cfg: Config) -> dict[str, str]:
    """Every key that cannot change what ``cfg`` trains -> why (the first group that says so)."""
    out: dict[str, str] = {}
    for group in INERT_GROUPS:
        if group.applies(cfg):
            for key in group.keys:
                out.setdefault(key, group.when)
    return out


def _changed_keys(cfg: Config) -> Iterator[str]:
    """Dotted keys whose value differs from the default (what the user set)."""
    default = Config()
    for key in inert_keys(cfg):
        if get_key(cfg, key) != get_key(default, key):
            yield key


def _sections(keys: tuple[str, ...]) -> list[str]:
    """Keys for the README, a whole section written ``section.*``."""
    out: list[str] = []
    for key in keys:
        section = key.rsplit(".", 1)[0]
        if set(_all_keys(section)) <= set(keys) and section != "loss.weights":
            if f"{section}.*" not in out:
                out.append(f"{section}.*")
        else:
            out.append(key)
    return out


def _fmt(value) -> str:
    return str(value).lower() if isinstance(value, bool) else f"{value:g}" \
        if isinstance(value, float) else str(value)


# ---- the rules: each returns None when it holds, else its one-line message ----------------


def _adaptation_needs_an_epoch(cfg: Config) -> str | None:
    if cfg.method != "gckd" or cfg.gckd.warmup_epochs < cfg.train.epochs:
        return None
    fix = (f"gckd.warmup_epochs={cfg.train.epochs - 1}" if cfg.train.epochs > 1
           else "train.epochs=2 gckd.warmup_epochs=1")
    return (f"gckd.warmup_epochs={cfg.gckd.warmup_epochs} >= train.epochs={cfg.train.epochs}: "
            f"method=gckd would train source-only for all {cfg.train.epochs} epoch(s) and never "
            f"adapt; set {fix} (adaptation runs after the warm-up) or method=source_only")


def _inert_settings(cfg: Config) -> str | None:
    inert = inert_keys(cfg)
    changed = [f"{k}={_fmt(get_key(cfg, k))} ({inert[k]})" for k in _changed_keys(cfg)]
    if not changed:
        return None
    return "settings with no effect: " + "; ".join(changed)


def _stop_after_covers_the_run(cfg: Config) -> str | None:
    if not cfg.run.stop_after_epochs or cfg.run.stop_after_epochs < cfg.train.epochs:
        return None
    return (f"run.stop_after_epochs={cfg.run.stop_after_epochs} >= train.epochs="
            f"{cfg.train.epochs}: the run ends first; it has no effect (0 = run all)")


def _lr_warmup_covers_the_run(cfg: Config) -> str | None:
    if cfg.train.warmup_epochs < cfg.train.epochs:
        return None
    return (f"train.warmup_epochs={_fmt(cfg.train.warmup_epochs)} >= train.epochs="
            f"{cfg.train.epochs}: the learning rate never leaves its linear warm-up (no cosine "
            f"decay); set train.warmup_epochs below train.epochs")


def _eval_every_inside_the_run(cfg: Config) -> str | None:
    if cfg.train.eval_every <= cfg.train.epochs:
        return None
    return (f"train.eval_every={cfg.train.eval_every} > train.epochs={cfg.train.epochs}: only "
            "the final evaluation of the target test split runs (as with train.eval_every=0)")


def _oracle_ranking_sees_every_epoch(cfg: Config) -> str | None:
    if not cfg.tune.oracle_metric or cfg.train.eval_every == 1:
        return None
    return (f"tune.oracle_metric ranks trials by target test R1 at every ASHA rung, but "
            f"train.eval_every={cfg.train.eval_every} scores the test split only on some "
            "epochs; set train.eval_every=1 (or rank by the label-free target_mnn, scored "
            "every epoch)")


def _swept_keys_can_act(cfg: Config) -> str | None:
    inert = inert_keys(cfg)
    dead = [f"{d.key} ({inert[d.key]})" for d in search_dimensions(cfg) if d.key in inert]
    if not dead:
        return None
    return ("tune.search_space sweeps keys that cannot act in these trials, so they would "
            "differ in name only: " + "; ".join(dead) + "; remove them or change the setting")


def _first_rung_inside_the_run(cfg: Config) -> str | None:
    rung = first_rung(cfg)
    if rung < cfg.train.epochs:
        return None
    return (f"ASHA's first rung is at epoch {rung} (tune.grace_epochs={cfg.tune.grace_epochs} "
            f"after the warm-up), not before the last epoch "
            f"(train.epochs={cfg.train.epochs}): no trial can be stopped early and every trial "
            f"runs in full; lower tune.grace_epochs or raise train.epochs")


def _grid_repeats_identical_trials(cfg: Config) -> str | None:
    dims = search_dimensions(cfg)
    if cfg.tune.num_samples == 1 or any(d.kind != "grid" for d in dims):
        return None
    points = math.prod(len(d.values) for d in dims)
    return (f"tune.num_samples={cfg.tune.num_samples} with a grid-only search space runs each "
            f"of its {points} points {cfg.tune.num_samples} times with the same run.seed: "
            f"identical deterministic trials; set tune.num_samples=1 (or --num-samples 1)")


def _frozen_tokens_need_pretrained_ones(cfg: Config) -> str | None:
    if not cfg.model.freeze_token_embeddings or cfg.model.pretrained:
        return None
    return ("model.freeze_token_embeddings=true without model.pretrained would freeze the tiny "
            "CLIP's random token embeddings, so no caption word could be learnt; set "
            "model.pretrained or model.freeze_token_embeddings=false")


@dataclass(frozen=True)
class Rule:
    """One cross-key rule: ``check`` returns its message when the config breaks it."""

    name: str
    severity: str  # "error" | "warning"
    commands: tuple[str, ...]
    keys: str  # the keys it reads, for the README
    check: Callable[[Config], str | None]


RULES: tuple[Rule, ...] = (
    Rule("adaptation needs an epoch", "error", ("train", "tune"),
         "method, gckd.warmup_epochs, train.epochs", _adaptation_needs_an_epoch),
    Rule("swept keys can act", "error", ("tune",),
         "tune.search_space and the settings that make a key inert (below)",
         _swept_keys_can_act),
    Rule("a grid does not repeat identical trials", "error", ("tune",),
         "tune.search_space, tune.num_samples", _grid_repeats_identical_trials),
    Rule("ASHA's first rung lies inside the run", "warning", ("tune",),
         "gckd.warmup_epochs, tune.grace_epochs, train.epochs", _first_rung_inside_the_run),
    Rule("no inert settings", "warning", ("train", "tune"),
         "any key set away from its default that another setting makes inert (below)",
         _inert_settings),
    Rule("run.stop_after_epochs can stop the run", "warning", ("train", "tune"),
         "run.stop_after_epochs, train.epochs", _stop_after_covers_the_run),
    Rule("the learning rate warm-up ends inside the run", "warning", ("train", "tune"),
         "train.warmup_epochs, train.epochs", _lr_warmup_covers_the_run),
    Rule("train.eval_every falls inside the run", "warning", ("train", "tune"),
         "train.eval_every, train.epochs", _eval_every_inside_the_run),
    Rule("an oracle-ranked sweep scores every epoch", "error", ("tune",),
         "tune.oracle_metric, train.eval_every", _oracle_ranking_sees_every_epoch),
    Rule("frozen token embeddings are pretrained ones", "error", ("train", "tune"),
         "model.freeze_token_embeddings, model.pretrained", _frozen_tokens_need_pretrained_ones),
)


def check(cfg: Config, command: str) -> tuple[list[str], list[str]]:
    """(errors, warnings): the messages of the rules of ``command`` that ``cfg`` breaks."""
    if command not in COMMANDS:
        raise ValueError(f"command must be one of {COMMANDS}, got {command!r}")
    found: dict[str, list[str]] = {"error": [], "warning": []}
    for rule in RULES:
        if command in rule.commands:
            message = rule.check(cfg)
            if message is not None:
                found[rule.severity].append(message)
    return found["error"], found["warning"]


def enforce(cfg: Config, command: str) -> list[str]:
    """Raise ConfigError on the first error; print each warning as one ``warning:`` line to
    stderr and return them."""
    errors, warnings = check(cfg, command)
    if errors:
        raise ConfigError(errors[0])
    for message in warnings:
        print(f"warning: {message}", file=sys.stderr, flush=True)
    return warnings


def rules_markdown() -> str:
    """The rules and the inert-key groups as README markdown."""
    lines = ["| rule | severity | commands | keys |", "|---|---|---|---|"]
    lines += [f"| {r.name} | {r.severity} | {', '.join(r.commands)} | {r.keys} |"
              for r in RULES]
    lines += ["", "Keys another setting makes inert (set away from their default: a warning; "
              "swept by tune: an error):", ""]
    lines += ["| when | inert keys |", "|---|---|"]
    lines += [f"| {g.when} | {', '.join(_sections(g.keys))} |" for g in INERT_GROUPS]
    return "\n".join(lines)


README_MARKERS = ("<!-- rules:start -->", "<!-- rules:end -->")


def with_rules_table(readme: str) -> str:
    """``readme`` with the text between its two rules markers replaced by ``rules_markdown``."""
    start, end = README_MARKERS
    if start not in readme or end not in readme:
        raise ValueError(f"the README has no {start} ... {end} section")
    head, rest = readme.split(start, 1)
    return f"{head}{start}\n{rules_markdown()}\n{end}{rest.split(end, 1)[1]}"


def main(argv: list[str] | None = None) -> int:
    import argparse
    from pathlib import Path

    parser = argparse.ArgumentParser(prog="python -m gckd_ray.config_rules",
                                     description="Print the cross-key rules as markdown, or "
                                                 "write them into a README's rules section.")
    parser.add_argument("--readme", help="rewrite this file's rules section in place")
    args = parser.parse_args(argv)
    if args.readme:
        path = Path(args.readme)
        path.write_text(with_rules_table(path.read_text()))
    else:
        print(rules_markdown())
    return 0


if __name__ == "__main__":
    sys.exit(main())
