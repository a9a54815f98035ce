"""Typed experiment configuration: dataclass defaults, YAML loading, dotted overrides, validation.

Every default of the project lives here. YAML files under ``experiments/configs/`` mirror these
dataclasses; ``key.sub=value`` overrides on the command line are parsed as YAML scalars and
type-checked against the field they target. Errors name the offending key. This module imports
nothing from the rest of the package.
"""

from __future__ import annotations

import dataclasses
import math
import re
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from gckd_ray.errors import InputError

METHODS = ("gckd", "source_only", "oracle")
DISTILL_MODES = ("cmkd", "mnf_csc", "none")
STRONG_VIEWS = ("student", "both", "none")
DATASET_NAMES = ("cuhk-pedes", "icfg-pedes", "rstpreid", "synth-cuhk", "synth-icfg", "synth-rstp")
BAD_RECORD_POLICIES = ("error", "skip")


_SCIENTIFIC = re.compile(r"[-+]?(\d+\.?\d*|\.\d+)[eE][-+]?\d+")


class ConfigError(InputError):
    """A configuration problem; the message names the key."""

    kind = "config"


@dataclass
class DomainConfig:
    """One dataset domain. ``root`` is the folder holding the annotation JSON and ``imgs/``;
    empty for a SynthPEDES domain means the generated cache."""

    name: str = "synth-cuhk"
    root: str = ""
    paired: bool = False


@dataclass
class DataConfig:
    source: DomainConfig = field(default_factory=lambda: DomainConfig(name="synth-cuhk"))
    target: DomainConfig = field(default_factory=lambda: DomainConfig(name="synth-icfg"))
    on_bad_record: str = "error"
    image_height: int = 64
    image_width: int = 32
    text_length: int = 32
    # Seed of the SynthPEDES generator and its cache folder ("" = ~/.cache/gckd_ray/synthpedes).
    synth_seed: int = 0
    synth_cache: str = ""
    # Multiplies SynthPEDES id counts (tests use small fractions).
    synth_scale: float = 1.0
    # Decode every image once into memory (SynthPEDES); off for large real datasets.
    cache_images: bool = True


@dataclass
class ModelConfig:
    """Dual encoder. ``pretrained`` is a local Hugging Face CLIP folder; empty builds the tiny
    random CLIP below (the SynthPEDES default and tests)."""

    pretrained: str = ""
    embed_dim: int = 64
    hidden_size: int = 64
    num_layers: int = 2
    num_heads: int = 4
    patch_size: int = 8


@dataclass
class LossWeights:
    # The tiny from-scratch default learns fastest with ITC; IRRA's SDM is the choice for
    # pretrained CLIP (experiments/configs/real_*.yaml).
    sdm: float = 0.0
    itc: float = 1.0
    id: float = 0.5
    cmkd: float = 1.0
    gmp: float = 0.5
    itm: float = 0.5
    # distill.mode=mnf_csc (model/mnf_csc.py): the CSC loss, and the noise filter's triplet
    # and L1 regularisers (the original adds the triplet unweighted, L1 with weight 1e-3).
    csc: float = 1.0
    mnf_triplet: float = 1.0
    mnf_l1: float = 1e-3


@dataclass
class LossConfig:
    weights: LossWeights = field(default_factory=LossWeights)
    sdm_temperature: float = 0.02
    itc_temperature: float = 0.05


@dataclass
class GCKDConfig:
    """Memory, teacher and target pseudo-labels (DESIGN.md §2)."""

    momentum: float = 0.995
    # Per modality. 8,192 already holds every SynthPEDES target item twice over; the published
    # 65,536 (real-data configs) made CMKD the step's bottleneck here (813 of 1,113 ms forward).
    queue_size: int = 8192
    # Memory features per modality and domain that join a step's graph (C).
    memory_nodes: int = 128
    snapshot_every: int = 5
    pseudo_every: int = 20
    pseudo_k: int = 1
    pseudo_threshold: float = 0.0
    # Centre each modality's target features before the pseudo-id graph (reduces hubs).
    pseudo_center: bool = True
    # faiss OpenMP threads of the memory actor's pseudo-id refresh (0 = faiss' default, every
    # core): 1 keeps the actor off the cores the training workers use.
    refresh_threads: int = 1
    # Times Ray restarts a dead memory actor (it reloads its last per-epoch save).
    memory_max_restarts: int = 3
    # Epochs of source-only training before adaptation losses switch on: a from-scratch
    # teacher has no target structure worth distilling before it has learned the source.
    warmup_epochs: int = 10
    use_pseudo_ids: bool = True
    use_memory: bool = True
    # Remove each (domain, modality) running mean from its embeddings (model/centring.py).
    domain_centring: bool = True
    centring_momentum: float = 0.99
    # Word vocabulary only: alias target-only caption words to the source word found in the
    # same contexts of the unlabelled target captions (data/vocab_bridge.py), when it leads
    # the runner-up by bridge_margin in cosine (0: the most similar one, if similar enough).
    vocab_bridge: bool = True
    bridge_margin: float = 0.0
    # Adaptation phase, data/transforms.py TrainAugment.strong: "student" = the student sees a
    # stronger view (zoom, colour jitter, noise) of each image the teacher sees plainly;
    # "both" = teacher and student see the same strong view (augmentation alone); "none".
    strong_views: str = "student"


@dataclass
class GraphConfig:
    enabled: bool = True
    k: int = 10
    num_layers: int = 2
    temperature: float = 0.07


@dataclass
class DistillConfig:
    mode: str = "cmkd"
    tau_s: float = 0.07
    tau_t: float = 0.07
    alpha: float = 0.4
    # mnf_csc mode (model/mnf_csc.py). Gate MLP width; 0 = half the embedding size, as the
    # original's filter.
    mnf_hidden: int = 0
    mnf_margin: float = 0.2
    # Pair temperature tau_ij = clamp(cos(s_i, t_j) + csc_tau0, csc_tau_min, csc_tau_max);
    # the floor keeps it positive for dissimilar pairs.
    csc_tau0: float = 0.07
    csc_tau_min: float = 0.05
    csc_tau_max: float = 1.0


@dataclass
class MatchingConfig:
    """Cross-domain fine-grained matching head (model/matching.py)."""

    enabled: bool = True
    hard_negatives: bool = True
    hidden: int = 64
    num_heads: int = 4
    num_layers: int = 1
    # Re-rank each query's top-k at evaluation (reported as rerank_* beside the plain metrics).
    rerank_top_k: int = 10
    rerank_weight: float = 1.0


@dataclass
class TrainConfig:
    epochs: int = 30
    # Pairs per worker per step; identity-balanced: batch_size / instances_per_id identities.
    batch_size: int = 64
    instances_per_id: int = 2
    lr: float = 2e-3
    weight_decay: float = 0.02
    warmup_epochs: float = 1.0
    grad_clip: float = 1.0
    num_workers: int = 2
    use_gpu: bool = False
    cpus_per_worker: float = 1.0
    # Worker failures survived by restoring the last checkpoint.
    max_failures: int = 2
    log_every: int = 20
    # Target training images and captions (each drawn independently, no pairing) encoded after
    # every epoch for the label-free selection criterion target_mnn; 0 = off.
    label_free_samples: int = 1000
    # Prepare the next batch (fetch, decode, augment) in a background thread during the step;
    # the batches and the augmentation stream are the same either way. Off by default: where
    # the workers already fill the CPU cores (CPU training) the thread only competes with them
    # (2 workers on 2 cores: 239 against 268 pairs/s, benchmarks/RESULTS.md); turn it on where
    # host cores idle during the step (GPU nodes).
    prefetch: bool = False


@dataclass
class DeepSpeedConfig:
    """The student's DeepSpeed engine (distributed/deepspeed_config.py builds its JSON)."""

    zero_stage: int = 0
    gradient_accumulation_steps: int = 1
    # A DeepSpeed JSON whose entries override the generated config ('' = none).
    config_file: str = ""


@dataclass
class RunConfig:
    seed: int = 0
    output_dir: str = "runs/default"
    resume: bool = False
    # Stop (cleanly, after its checkpoint) once this many epochs ran in this invocation; 0 = run
    # to train.epochs. For time-limited allocations: continue later with run.resume=true.
    stop_after_epochs: int = 0


def _default_search_space() -> dict[str, dict[str, list]]:
    return {"distill.tau_s": {"loguniform": [0.03, 0.2]},
            "distill.tau_t": {"loguniform": [0.03, 0.2]},
            "distill.alpha": {"uniform": [0.2, 0.6]},
            "graph.k": {"grid": [5, 10]}}


@dataclass
class TuneConfig:
    """``python -m gckd_ray.tune``: search space and scheduler; training ignores it.

    ``search_space`` maps a dotted config key to one sampler: ``{grid: [...]}`` (every value,
    times ``num_samples``), ``{choice: [...]}``, ``{uniform: [lo, hi]}``,
    ``{loguniform: [lo, hi]}`` or ``{randint: [lo, hi]}`` (hi exclusive)."""

    search_space: dict = field(default_factory=_default_search_space)
    num_samples: int = 2
    # Trials at a time; 0 = as many as the cluster's CPUs fit.
    max_concurrent_trials: int = 0
    # ASHA: first rung this many epochs after gckd.warmup_epochs (before it, trials that differ
    # only in adaptation knobs are identical), then every reduction_factor x further.
    grace_epochs: int = 2
    reduction_factor: float = 2.0
    # Rank by target test R@1 (research only; needs target labels) instead of target_mnn.
    oracle_metric: bool = False
    max_failures: int = 1


@dataclass
class Config:
    method: str = "gckd"
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    loss: LossConfig = field(default_factory=LossConfig)
    gckd: GCKDConfig = field(default_factory=GCKDConfig)
    graph: GraphConfig = field(default_factory=GraphConfig)
    distill: DistillConfig = field(default_factory=DistillConfig)
    matching: MatchingConfig = field(default_factory=MatchingConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    deepspeed: DeepSpeedConfig = field(default_factory=DeepSpeedConfig)
    run: RunConfig = field(default_factory=RunConfig)
    tune: TuneConfig = field(default_factory=TuneConfig)

    @property
    def protocol(self) -> str:
        return f"{self.data.source.name}->{self.data.target.name}"

    def with_absolute_paths(self) -> "Config":
        """A copy whose non-empty path fields are absolute (for processes in other cwds)."""
        out = config_from_dict(self.to_dict())
        for key in ("run.output_dir", "data.source.root", "data.target.root",
                    "data.synth_cache", "model.pretrained", "deepspeed.config_file"):
            *parents, leaf = key.split(".")
            holder = get_key(out, ".".join(parents))
            if getattr(holder, leaf):
                setattr(holder, leaf, str(Path(getattr(holder, leaf)).expanduser().resolve()))
        return out

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def validate(self) -> "Config":
        """Range checks that types cannot express; raises ConfigError naming the key."""
        _one_of("method", self.method, METHODS)
        _one_of("data.source.name", self.data.source.name, DATASET_NAMES)
        _one_of("data.target.name", self.data.target.name, DATASET_NAMES)
        _one_of("data.on_bad_record", self.data.on_bad_record, BAD_RECORD_POLICIES)
        _one_of("distill.mode", self.distill.mode, DISTILL_MODES)
        _one_of("gckd.strong_views", self.gckd.strong_views, STRONG_VIEWS)
        for key in ("data.image_height", "data.image_width", "data.text_length", "train.epochs",
                    "train.batch_size", "train.instances_per_id", "train.num_workers",
                    "model.embed_dim", "model.hidden_size", "model.num_layers", "model.num_heads",
                    "model.patch_size", "matching.hidden", "matching.num_heads",
                    "matching.num_layers"):
            _positive(key, get_key(self, key))
        if self.deepspeed.zero_stage not in (0, 1, 2, 3):
            raise ConfigError(f"deepspeed.zero_stage: must be one of 0, 1, 2, 3, got "
                              f"{self.deepspeed.zero_stage}")
        _positive("deepspeed.gradient_accumulation_steps",
                  self.deepspeed.gradient_accumulation_steps)
        if self.matching.hidden % self.matching.num_heads:
            raise ConfigError(f"matching.hidden: must be a multiple of matching.num_heads "
                              f"({self.matching.num_heads}), got {self.matching.hidden}")
        for key in ("gckd.queue_size", "gckd.memory_nodes", "gckd.snapshot_every",
                    "gckd.pseudo_every", "gckd.pseudo_k", "graph.k", "graph.num_layers",
                    "graph.temperature", "distill.tau_s", "distill.tau_t",
                    "distill.csc_tau0", "distill.csc_tau_min"):
            _positive(key, get_key(self, key))
        if self.distill.csc_tau_max < self.distill.csc_tau_min:
            raise ConfigError(f"distill.csc_tau_max: must be >= distill.csc_tau_min "
                              f"({self.distill.csc_tau_min}), got {self.distill.csc_tau_max}")
        for key in ("gckd.momentum", "gckd.centring_momentum", "distill.alpha"):
            if not 0 <= get_key(self, key) <= 1:
                raise ConfigError(f"{key}: must be in [0, 1], got {get_key(self, key)}")
        if self.method == "gckd":
            _check_step_sizes(self)
        for key in ("train.lr", "train.cpus_per_worker", "data.synth_scale", "loss.sdm_temperature",
                    "loss.itc_temperature"):
            _positive(key, get_key(self, key))
        for key in ("run.stop_after_epochs", "train.weight_decay", "train.warmup_epochs", "train.grad_clip", "train.max_failures",
                    "gckd.bridge_margin", "loss.weights.sdm", "loss.weights.itc", "loss.weights.id",
                    "loss.weights.cmkd", "loss.weights.gmp", "loss.weights.itm",
                    "loss.weights.csc", "loss.weights.mnf_triplet", "loss.weights.mnf_l1",
                    "distill.mnf_hidden", "distill.mnf_margin",
                    "matching.rerank_top_k", "matching.rerank_weight"):
            if get_key(self, key) < 0:
                raise ConfigError(f"{key}: must be >= 0, got {get_key(self, key)}")
        for key in ("train.label_free_samples", "tune.max_concurrent_trials",
                    "tune.max_failures"):
            if get_key(self, key) < 0:
                raise ConfigError(f"{key}: must be >= 0, got {get_key(self, key)}")
        _positive("tune.num_samples", self.tune.num_samples)
        _positive("tune.grace_epochs", self.tune.grace_epochs)
        if self.tune.reduction_factor <= 1:
            raise ConfigError(f"tune.reduction_factor: must be > 1, got "
                              f"{self.tune.reduction_factor}")
        if self.train.batch_size % self.train.instances_per_id:
            raise ConfigError(f"train.batch_size: must be a multiple of train.instances_per_id "
                              f"({self.train.instances_per_id}), got {self.train.batch_size}")
        if not self.model.pretrained and self.model.hidden_size % self.model.num_heads:
            raise ConfigError(f"model.hidden_size: must be divisible by model.num_heads "
                              f"({self.model.num_heads}), got {self.model.hidden_size}")
        _check_other_ranges(self)
        return self


def _one_of(key: str, value: Any, allowed: tuple[str, ...]) -> None:
    if value not in allowed:
        raise ConfigError(f"{key}: must be one of {', '.join(allowed)}; got {value!r}")


def _positive(key: str, value: float) -> None:
    if value <= 0:
        raise ConfigError(f"{key}: must be > 0, got {value}")


def _check_step_sizes(cfg: Config) -> None:
    """GCKD sizes that depend on the batch: a step's kNN graph and its memory pushes."""
    batch, workers = cfg.train.batch_size, cfg.train.num_workers
    nodes = 4 * batch  # the memory's nodes join only once its queues fill
    if cfg.graph.enabled and cfg.graph.k >= nodes:
        raise ConfigError(f"graph.k: must be in [1, {nodes - 1}] (a step's graph starts with "
                          f"4 x train.batch_size = {nodes} nodes: source and target images and "
                          f"captions), got {cfg.graph.k}")
    pushed = 2 * batch * workers
    if cfg.gckd.queue_size < pushed:
        raise ConfigError(f"gckd.queue_size: must be >= 2 x train.batch_size x "
                          f"train.num_workers = {pushed} (the source and target rows one step "
                          f"pushes into each modality's queue), got {cfg.gckd.queue_size}")


def _check_other_ranges(cfg: Config) -> None:
    """Finite floats, and bounds the checks in ``validate`` leave out."""
    for key, kind, _ in describe_keys(cfg):
        if kind == "float" and not math.isfinite(get_key(cfg, key)):
            raise ConfigError(f"{key}: must be a finite number, got {get_key(cfg, key)}")
    for key in ("run.seed", "data.synth_seed", "gckd.warmup_epochs", "gckd.refresh_threads",
                "gckd.memory_max_restarts"):
        if get_key(cfg, key) < 0:
            raise ConfigError(f"{key}: must be >= 0, got {get_key(cfg, key)}")
    _positive("train.log_every", cfg.train.log_every)
    if cfg.data.text_length < 2:
        raise ConfigError(f"data.text_length: must be >= 2 (bos and eos tokens), got "
                          f"{cfg.data.text_length}")
    if not -1 <= cfg.gckd.pseudo_threshold <= 1:
        raise ConfigError(f"gckd.pseudo_threshold: must be in [-1, 1] (a cosine), got "
                          f"{cfg.gckd.pseudo_threshold}")


def get_key(cfg: Any, dotted: str) -> Any:
    for part in dotted.split("."):
        cfg = getattr(cfg, part)
    return cfg


def _coerce(key: str, value: Any, annotation: Any) -> Any:
    """Check ``value`` against a field's type; ints are accepted where floats are expected."""
    if dataclasses.is_dataclass(annotation):
        if not isinstance(value, dict):
            raise ConfigError(f"{key}: expected a mapping of {annotation.__name__} fields, "
                              f"got {type(value).__name__} {value!r}")
        return _build(annotation, value, key + ".")
    origin = typing.get_origin(annotation)
    if origin in (typing.Union, types.UnionType):
        for option in typing.get_args(annotation):
            try:
                return _coerce(key, value, option)
            except ConfigError:
                continue
        raise ConfigError(f"{key}: expected {annotation}, got {type(value).__name__} {value!r}")
    if annotation is type(None):
        if value is None:
            return None
    elif annotation is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
    elif annotation in (int, bool, str):
        if type(value) is annotation:
            return value
    elif annotation is dict:
        if isinstance(value, dict):
            return value  # free-form (tune.search_space); its user checks the entries
    else:
        raise ConfigError(f"{key}: unsupported field type {annotation}")
    name = getattr(annotation, "__name__", str(annotation))
    raise ConfigError(f"{key}: expected {name}, got {type(value).__name__} {value!r}")


def _build(cls: type, data: dict[str, Any], prefix: str = "") -> Any:
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - names)
    if unknown:
        raise ConfigError(f"{prefix}{unknown[0]}: unknown key (known: {', '.join(sorted(names))})")
    kwargs = {k: _coerce(prefix + k, v, hints[k]) for k, v in data.items()}
    return cls(**kwargs)


def merge_dicts(base: dict[str, Any], update: dict[str, Any]) -> dict[str, Any]:
    """``base`` updated by ``update``, nested mappings merged key by key (neither is changed)."""
    out = dict(base)
    for k, v in update.items():
        out[k] = (merge_dicts(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict)
                  else v)
    return out


def _yaml_problem(err: yaml.YAMLError) -> str:
    """PyYAML's several-line report as one phrase with its line and column."""
    mark = getattr(err, "problem_mark", None)
    problem = getattr(err, "problem", None) or str(err)
    return f"{problem} at line {mark.line + 1}, column {mark.column + 1}" if mark else problem


def parse_override(text: str) -> tuple[str, Any]:
    """``a.b=value`` -> ("a.b", YAML-parsed value)."""
    if "=" not in text or text.startswith("="):
        raise ConfigError(f"{text!r}: an override must look like key.sub=value")
    key, raw = text.split("=", 1)
    try:
        value = yaml.safe_load(raw) if raw.strip() else ""
    except yaml.YAMLError as err:
        raise ConfigError(f"{key}: cannot parse value {raw!r}: {_yaml_problem(err)}") from None
    if isinstance(value, str) and _SCIENTIFIC.fullmatch(value.strip()):
        value = float(value)  # YAML 1.1 reads "1e-4" as a string; users mean a number
    return key.strip(), value


def _nest(dotted: str, value: Any) -> dict[str, Any]:
    out: Any = value
    for part in reversed(dotted.split(".")):
        out = {part: out}
    return out


def load_config(path: str | Path | None = None, overrides: list[str] | tuple[str, ...] = (),
                ) -> Config:
    """Defaults <- YAML file <- ``key=value`` overrides, type-checked and validated."""
    data: dict[str, Any] = {}
    if path:
        path = Path(path)
        if not path.is_file():
            raise ConfigError(f"{path}: config file not found")
        try:
            loaded = yaml.safe_load(path.read_text()) or {}
        except yaml.YAMLError as err:
            raise ConfigError(f"{path}: not valid YAML: {_yaml_problem(err)}") from None
        if not isinstance(loaded, dict):
            raise ConfigError(f"{path}: top level must be a mapping, got {type(loaded).__name__}")
        data = loaded
    return config_from_dict(_apply_overrides(data, overrides))


def _apply_overrides(data: dict[str, Any], overrides: list[str] | tuple[str, ...]) -> dict:
    for text in overrides:
        key, value = parse_override(text)
        data = merge_dicts(data, _nest(key, value))
    return data


def override_config(cfg: Config, overrides: list[str] | tuple[str, ...]) -> Config:
    """``cfg`` with ``key=value`` overrides applied (e.g. on a checkpoint's saved config)."""
    return config_from_dict(_apply_overrides(cfg.to_dict(), overrides))


def config_from_dict(data: dict[str, Any]) -> Config:
    # Merge onto the full defaults so a partial nested mapping keeps its parent's defaults
    # (data.target.root=x must not reset data.target.name to DomainConfig's default).
    _build(Config, data)  # unknown keys and wrong types are reported against the user's input
    merged = merge_dicts(Config().to_dict(), data)
    _replace_free_form(Config, merged, data)
    return _build(Config, merged).validate()


def _replace_free_form(cls: type, merged: dict[str, Any], data: dict[str, Any]) -> None:
    """A free-form mapping field given by the user replaces its default instead of merging
    into it (a search space must be able to leave out a default key)."""
    hints = typing.get_type_hints(cls)
    for name, value in data.items():
        if hints[name] is dict:
            merged[name] = value
        elif dataclasses.is_dataclass(hints[name]) and isinstance(value, dict):
            _replace_free_form(hints[name], merged[name], value)


def save_config(cfg: Config, path: str | Path) -> None:
    Path(path).write_text(yaml.safe_dump(cfg.to_dict(), sort_keys=False))


KEY_HELP: dict[str, str] = {
    "method": "gckd (adapt to the unlabelled target), source_only, or oracle (trains on target "
              "labels: a measurement-only upper bound)",
    "data.source.name": "labelled source dataset",
    "data.source.root": "folder with the annotation JSON and imgs/ ('' = SynthPEDES cache)",
    "data.source.paired": "ignored for the source (always paired and labelled)",
    "data.target.name": "unlabelled target dataset (test split is scored)",
    "data.target.root": "folder with the annotation JSON and imgs/ ('' = SynthPEDES cache)",
    "data.target.paired": "easier variant: target pairs known (ids still unknown)",
    "data.on_bad_record": "error: stop at a bad record; skip: drop it and count per cause",
    "data.image_height": "image height after resizing (384 for real data)",
    "data.image_width": "image width after resizing (128 for real data)",
    "data.text_length": "tokens per caption incl. bos/eos (77 for CLIP); longer are truncated",
    "data.synth_seed": "SynthPEDES generator seed",
    "data.synth_cache": "SynthPEDES cache folder ('' = ~/.cache/gckd_ray/synthpedes)",
    "data.synth_scale": "multiplies SynthPEDES identity counts",
    "data.cache_images": "decode every image once into memory (off for large real datasets)",
    "model.pretrained": "local Hugging Face CLIP folder ('' = tiny random CLIP below)",
    "model.embed_dim": "tiny CLIP: joint embedding size",
    "model.hidden_size": "tiny CLIP: transformer width of both towers",
    "model.num_layers": "tiny CLIP: layers per tower",
    "model.num_heads": "tiny CLIP: attention heads",
    "model.patch_size": "tiny CLIP: image patch size in pixels",
    "loss.weights.sdm": "IRRA similarity-distribution matching on source pairs",
    "loss.weights.itc": "image-text contrastive (InfoNCE) on source pairs",
    "loss.weights.id": "identity classification on source embeddings",
    "loss.weights.cmkd": "contrastive momentum knowledge distillation (gckd)",
    "loss.weights.gmp": "graph-based multi-modal propagation (gckd)",
    "loss.weights.itm": "image-text matching head on source pairs and target pseudo-pairs (gckd)",
    "loss.weights.csc": "contrastive semantic calibration (distill.mode=mnf_csc)",
    "loss.weights.mnf_triplet": "noise filter triplet regulariser (distill.mode=mnf_csc)",
    "loss.weights.mnf_l1": "noise filter L1 sparsity on its MLP weights (distill.mode=mnf_csc)",
    "loss.sdm_temperature": "SDM temperature (IRRA: 0.02)",
    "loss.itc_temperature": "ITC temperature",
    "gckd.momentum": "EMA momentum of the teacher",
    "gckd.queue_size": "memory queue length per modality",
    "gckd.memory_nodes": "memory features per modality and domain in each step's graph",
    "gckd.snapshot_every": "steps between memory snapshot reads",
    "gckd.pseudo_every": "steps between target pseudo-id refreshes",
    "gckd.pseudo_k": "cross-modal neighbours per node in the pseudo-id graph",
    "gckd.pseudo_threshold": "minimum cosine of a pseudo-id graph edge",
    "gckd.pseudo_center": "centre target features per modality before the pseudo-id graph",
    "gckd.refresh_threads": "faiss threads of the memory actor's pseudo-id refresh (0: every "
                            "core)",
    "gckd.memory_max_restarts": "times Ray restarts a dead memory actor",
    "gckd.warmup_epochs": "source-only epochs before the adaptation losses switch on",
    "gckd.use_pseudo_ids": "ablation: target positives from memory pseudo-ids",
    "gckd.use_memory": "ablation: memory queue as CMKD keys and graph nodes",
    "gckd.domain_centring": "ablation: centre embeddings by per-domain, per-modality running "
                            "means (training and target evaluation)",
    "gckd.centring_momentum": "momentum of those running means (per step)",
    "gckd.vocab_bridge": "alias target-only caption words to source words used in the same "
                         "contexts (word vocabulary only)",
    "gckd.bridge_margin": "cosine lead over the runner-up needed to alias a word",
    "gckd.strong_views": "adaptation phase: student (strong view for the student, plain for "
                         "the teacher), both (the same strong view), or none",
    "graph.enabled": "ablation: graph propagation (GMP) on/off",
    "graph.k": "neighbours per node of the step's kNN graph",
    "graph.num_layers": "message-passing layers of the propagation network",
    "graph.temperature": "temperature of graph smoothing and the GMP loss",
    "distill.mode": "cmkd, mnf_csc (noise filter + contrastive semantic calibration, "
                    "model/mnf_csc.py), or none (ablation: no distillation loss)",
    "distill.tau_s": "student temperature of CMKD",
    "distill.tau_t": "teacher temperature of CMKD",
    "distill.alpha": "weight of the teacher distribution vs positives in the CMKD target",
    "distill.mnf_hidden": "mnf_csc: hidden width of the gate MLP (0 = embedding size / 2)",
    "distill.mnf_margin": "mnf_csc: triplet margin (purified teacher closer than raw)",
    "distill.csc_tau0": "mnf_csc: offset of the pair temperature cos(s_i, t_j) + tau0",
    "distill.csc_tau_min": "mnf_csc: lower clamp of the pair temperature",
    "distill.csc_tau_max": "mnf_csc: upper clamp of the pair temperature",
    "matching.enabled": "ablation: cross-domain fine-grained matching head (gckd)",
    "matching.hard_negatives": "ablation: most similar other-id negatives (off: random ones)",
    "matching.hidden": "matching head width",
    "matching.num_heads": "matching head attention heads",
    "matching.num_layers": "matching head cross-attention layers",
    "matching.rerank_top_k": "top-k re-ranked by the head at evaluation, reported as rerank_* "
                             "(0 = off)",
    "matching.rerank_weight": "weight of the match probability added in re-ranking",
    "train.epochs": "epochs (one epoch: every source identity once per worker group)",
    "train.batch_size": "source pairs (and target images/captions) per worker per step",
    "train.instances_per_id": "captions per identity in a source batch",
    "train.lr": "AdamW peak learning rate (linear warm-up, cosine decay)",
    "train.weight_decay": "AdamW weight decay",
    "train.warmup_epochs": "epochs of linear learning-rate warm-up",
    "train.grad_clip": "global gradient-norm clip (0 = off)",
    "train.num_workers": "Ray Train workers (data-parallel ranks)",
    "train.use_gpu": "one GPU per worker, NCCL",
    "train.cpus_per_worker": "CPUs reserved per worker (also its torch threads)",
    "train.max_failures": "worker failures survived by restoring the last checkpoint",
    "train.log_every": "steps between progress lines",
    "train.label_free_samples": "target training images and captions (drawn independently) "
                                "scored each epoch by the label-free criterion target_mnn "
                                "(0 = off)",
    "train.prefetch": "prepare the next batch (fetch, decode, augment) in a background thread "
                      "while the step runs (identical results); worth it where host cores idle "
                      "during the step, e.g. GPU nodes",
    "deepspeed.zero_stage": "ZeRO stage of the student and teacher (0: replicated, 1: optimizer "
                            "states, 2: + gradients, 3: + parameters sharded)",
    "deepspeed.gradient_accumulation_steps": "micro-batches per optimizer step",
    "deepspeed.config_file": "DeepSpeed JSON overriding entries of the generated config",
    "run.stop_after_epochs": "stop after this many epochs of this invocation, checkpointed "
                             "(0 = run all); continue with run.resume=true",
    "run.seed": "seed of initialisation, sampling and augmentation",
    "run.output_dir": "results.json, checkpoints (ray/), tokenizer/ and memory/ go here",
    "run.resume": "continue the last run in run.output_dir from its latest checkpoint",
    "tune.search_space": "gckd_ray.tune: dotted key -> {grid|choice: [values]} or "
                         "{uniform|loguniform|randint: [lo, hi]}",
    "tune.num_samples": "gckd_ray.tune: samples of the space (each grid point this many times)",
    "tune.max_concurrent_trials": "gckd_ray.tune: trials at a time (0 = as many as fit)",
    "tune.grace_epochs": "gckd_ray.tune: ASHA's first rung, in epochs after gckd.warmup_epochs",
    "tune.reduction_factor": "gckd_ray.tune: ASHA reduction factor",
    "tune.oracle_metric": "gckd_ray.tune: rank trials by target test R1 (uses target labels: "
                          "research only) instead of the label-free target_mnn",
    "tune.max_failures": "gckd_ray.tune: retries of a failed trial",
}


def describe_keys(cfg: Any = None, prefix: str = "") -> list[tuple[str, str, Any]]:
    """Every dotted key with its type name and default, for ``--help``."""
    cfg = Config() if cfg is None else cfg
    rows = []
    hints = typing.get_type_hints(type(cfg))
    for f in dataclasses.fields(cfg):
        value = getattr(cfg, f.name)
        if dataclasses.is_dataclass(value):
            rows += describe_keys(value, f"{prefix}{f.name}.")
        else:
            rows.append((prefix + f.name, getattr(hints[f.name], "__name__", str(hints[f.name])),
                         value))
    return rows


def help_epilog() -> str:
    lines = ["configuration keys (override any with key=value; YAML files use the same nesting):"]
    for key, kind, value in describe_keys():
        lines += [f"  {key:<26} {kind:<5} {value!r:<14} {KEY_HELP[key]}"]
    lines += ["", f"methods: {', '.join(METHODS)}", f"datasets: {', '.join(DATASET_NAMES)}"]
    return "\n".join(lines)
