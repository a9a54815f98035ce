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
EPOCH_UNITS = ("identities", "captions")


_SCIENTIFIC = re.compile(r"[-+]?(\d+\.?\d*|\.\d+)[eE][-+]?\d+")


class ConfigError(InputError):
    """A configuration problem; the message names the key."""

    kind = "config"


def option(default: Any, help: str) -> Any:
    """A config field's default and its ``--help`` text (the one place a key is documented)."""
    return field(default=default, metadata={"help": help})


@dataclass
class DomainConfig:
    """One dataset domain. ``root`` is the folder holding the annotation JSON and ``imgs/``;
    empty for a SynthPEDES domain means the generated cache."""

    name: str = option("synth-cuhk",
                       "dataset: data.source labelled, data.target unlabelled (its test split is "
                       "scored)")
    root: str = option("", "folder with the annotation JSON and imgs/ ('' = SynthPEDES cache)")
    paired: bool = option(False,
                          "target only: easier variant with target pairs known (ids still "
                          "unknown); the source is always paired")


@dataclass
class DataConfig:
    source: DomainConfig = field(default_factory=lambda: DomainConfig(name="synth-cuhk"))
    target: DomainConfig = field(default_factory=lambda: DomainConfig(name="synth-icfg"))
    on_bad_record: str = option("error",
                                "error: stop at a bad record; skip: drop it and count per cause")
    # Images are decoded when a batch or evaluation first reads them (data/bad_images.py).
    on_bad_image: str = option("error",
                               "error: stop at an image that does not decode; skip: use the next "
                               "decodable image of the same person instead (target training "
                               "images: the next image), counted after each epoch and in "
                               "results.json")
    image_height: int = option(64, "image height after resizing (384 for real data)")
    image_width: int = option(32, "image width after resizing (128 for real data)")
    text_length: int = option(32, "tokens per caption incl. bos/eos (77 for CLIP); longer are "
                                  "truncated")
    synth_seed: int = option(0, "SynthPEDES generator seed")
    synth_cache: str = option("", "SynthPEDES cache folder ('' = ~/.cache/gckd_ray/synthpedes)")
    synth_scale: float = option(1.0, "multiplies SynthPEDES identity counts")
    cache_images: bool = option(True,
                                "decode every image once into memory (off for large real datasets)")
    # IRRA erases a random rectangle (2-40% of the image, aspect 0.3-3.3) with the mean pixel
    # in half the training images; 0 keeps the from-scratch default's augmentation stream.
    random_erasing: float = option(0.0, "probability that a training image gets one random "
                                        "rectangle erased to the mean pixel (IRRA: 0.5)")


@dataclass
class ModelConfig:
    """Dual encoder. ``pretrained`` is a local Hugging Face CLIP folder; empty builds the tiny
    random CLIP below (the SynthPEDES default and tests)."""

    pretrained: str = option("", "local Hugging Face CLIP folder ('' = tiny random CLIP below)")
    # A pretrained text tower knows words the source captions never use (target synonyms,
    # other vocabularies); GCKD's target losses, trained on imperfect pseudo-supervision, move
    # those words' embeddings and lose that knowledge (experiments/RESULTS.md). Frozen, only
    # the layers above them adapt. From scratch the embeddings must learn: keep it off.
    freeze_token_embeddings: bool = option(False,
                                           "keep the text tower's token embeddings as loaded "
                                           "(pretrained regime)")
    embed_dim: int = option(64, "tiny CLIP: joint embedding size")
    hidden_size: int = option(64, "tiny CLIP: transformer width of both towers")
    num_layers: int = option(2, "tiny CLIP: layers per tower")
    num_heads: int = option(4, "tiny CLIP: attention heads")
    patch_size: int = option(8, "tiny CLIP: image patch size in pixels")


@dataclass
class LossWeights:
    # The tiny from-scratch default learns fastest with ITC; IRRA's SDM is the choice for
    # pretrained CLIP (experiments/configs/real_*.yaml).
    sdm: float = option(0.0, "IRRA similarity-distribution matching on source pairs")
    itc: float = option(1.0, "image-text contrastive (InfoNCE) on source pairs")
    id: float = option(0.5, "identity classification on source embeddings")
    cmkd: float = option(1.0, "contrastive momentum knowledge distillation (gckd)")
    gmp: float = option(0.5, "graph-based multi-modal propagation (gckd)")
    itm: float = option(0.5,
                        "image-text matching head on source pairs and target pseudo-pairs (gckd)")
    # Within the image modality: student images against teacher image keys, positives its own
    # teacher view and its (pseudo-)id's images (gckd.pseudo_image_k groups target images).
    i2i: float = option(0.0, "image-image momentum distillation with (pseudo-)id positives "
                             "(gckd)")
    # distill.mode=mnf_csc (model/mnf_csc.py): the CSC loss, and the noise filter's triplet
    # and L1 regularisers (the original adds the triplet unweighted, L1 with weight 1e-3).
    csc: float = option(1.0, "contrastive semantic calibration (distill.mode=mnf_csc)")
    mnf_triplet: float = option(1.0, "noise filter triplet regulariser (distill.mode=mnf_csc)")
    mnf_l1: float = option(1e-3,
                           "noise filter L1 sparsity on its MLP weights (distill.mode=mnf_csc)")


@dataclass
class LossConfig:
    weights: LossWeights = field(default_factory=LossWeights)
    sdm_temperature: float = option(0.02, "SDM temperature (IRRA: 0.02)")
    itc_temperature: float = option(0.05, "ITC temperature")


@dataclass
class GCKDConfig:
    """Memory, teacher and target pseudo-labels (DESIGN.md §2)."""

    momentum: float = option(0.995, "EMA momentum of the teacher")
    # Per modality. 8,192 already holds every SynthPEDES target item twice over; the published
    # 65,536 (real-data configs) made CMKD the step's bottleneck here (813 of 1,113 ms forward).
    queue_size: int = option(8192, "memory queue length per modality")
    # Memory features per modality and domain that join a step's graph (C).
    memory_nodes: int = option(128, "memory features per modality and domain in each step's graph")
    snapshot_every: int = option(5, "steps between memory snapshot reads")
    pseudo_every: int = option(20, "steps between target pseudo-id refreshes")
    pseudo_k: int = option(1, "cross-modal neighbours per node in the pseudo-id graph")
    pseudo_threshold: float = option(0.0, "minimum cosine of a pseudo-id graph edge")
    # Image-image mutual neighbours join the pseudo-id graph: a pretrained teacher's nearest
    # image is far more often the same person than its nearest caption (58% against 8-9% on
    # the stand-in, experiments/RESULTS.md); 0 keeps image-caption edges only.
    pseudo_image_k: int = option(0, "image-image mutual neighbours per image joined in the "
                                    "pseudo-id graph (0 = image-caption edges only)")
    # Centre each modality's target features before the pseudo-id graph (reduces hubs).
    pseudo_center: bool = option(True,
                                 "centre target features per modality before the pseudo-id graph")
    # Pipelined refresh (DESIGN.md §10): a refresh starts at a memory read on the tables as they
    # are then, computes in the actor's background thread and is applied at the first read
    # refresh_lag steps later (a fixed lag: runs stay deterministic and resume exactly); the
    # read waits only if it is still computing. 20 steps = pseudo_every: a refresh has until
    # the next one starts (10 s at 500 ms steps; a CUHK-PEDES-size refresh computed in 3.8 s
    # on an idle 2-core machine, 12-44 s when other jobs took its cores: benchmarks/RESULTS.md).
    refresh_lag: int = option(20, "steps from a pseudo-id refresh's start to the memory read "
                                  "that applies it (0 = synchronous: applied at the read that "
                                  "starts it)")
    # 0: every CPU Ray counts on the actor's node. The refresh runs a few seconds every
    # pseudo_every steps in the background; on a GPU node its cores are mostly idle then.
    refresh_threads: int = option(0, "CPU threads of the memory actor's pseudo-id refresh "
                                     "(0 = all the CPUs Ray counts on the actor's node)")
    # Exact kNN costs Ni x Nt x D twice (CUHK-PEDES: 2 x 1.2 TMAC); above this many
    # image-caption pairs the clustered search (model/knn.py) compares each image with the
    # captions of pseudo_probes of the ~sqrt(Nt) caption clusters.
    pseudo_exact_pairs: int = option(1 << 24, "largest target images x captions product whose "
                                              "pseudo-id graph uses the exact kNN search")
    pseudo_probes: int = option(16, "caption clusters each target image is compared with above "
                                    "gckd.pseudo_exact_pairs (0 = exact search at every size)")
    # For measurement only: experiments.pseudo_curves scores the saved ids against the target
    # annotation's person ids offline; training never reads them.
    save_pseudo_ids: bool = option(False, "write the target pseudo-ids of each applied refresh "
                                          "to <run.output_dir>/pseudo_ids/ (offline audit)")
    memory_max_restarts: int = option(3, "times Ray restarts a dead memory actor (it reloads "
                                         "its last per-epoch save)")
    # Epochs of source-only training before adaptation losses switch on: a from-scratch
    # teacher has no target structure worth distilling before it has learned the source.
    warmup_epochs: int = option(10, "source-only epochs before the adaptation losses switch on")
    use_pseudo_ids: bool = option(True, "ablation: target positives from memory pseudo-ids")
    use_memory: bool = option(True, "ablation: memory queue as CMKD keys and graph nodes")
    # Remove each (domain, modality) running mean from its embeddings (model/centring.py).
    domain_centring: bool = option(True,
                                   "ablation: centre embeddings by per-domain, per-modality "
                                   "running means (training and target evaluation)")
    centring_momentum: float = option(0.99, "momentum of those running means (per step)")
    # Alias target-only caption words to the source word found in the same contexts of the
    # unlabelled target captions (data/vocab_bridge.py), when it leads the runner-up by
    # bridge_margin in cosine (0: the most similar one, if similar enough). A word vocabulary
    # encodes the alias's id; CLIP's BPE gets the word rewritten before tokenizing.
    vocab_bridge: bool = option(True,
                                "alias target-only caption words to source words used in the same "
                                "contexts")
    bridge_margin: float = option(0.0, "cosine lead over the runner-up needed to alias a word")
    # Ablation: the adaptation losses reach the text tower through the target captions'
    # student embeddings; false keeps those captions as inputs only. On the stand-in it changed
    # nothing (experiments/RESULTS.md, pretrained regime): the target-word loss there came
    # from source fine-tuning, which the lexical bridge addresses.
    target_text_grad: bool = option(True,
                                    "target captions' student embeddings carry gradients in the "
                                    "adaptation losses (false: detached, the text tower learns "
                                    "from source captions only)")
    # Adaptation phase, data/transforms.py TrainAugment.strong: "student" = the student sees a
    # stronger view (zoom, colour jitter, noise) of each image the teacher sees plainly;
    # "both" = teacher and student see the same strong view (augmentation alone); "none".
    strong_views: str = option("student",
                               "adaptation phase: student (strong view for the student, plain for "
                               "the teacher), both (the same strong view), or none")


@dataclass
class GraphConfig:
    enabled: bool = option(True, "ablation: graph propagation (GMP) on/off")
    k: int = option(10, "neighbours per node of the step's kNN graph")
    num_layers: int = option(2, "message-passing layers of the propagation network")
    temperature: float = option(0.07, "temperature of graph smoothing and the GMP loss")


@dataclass
class DistillConfig:
    mode: str = option("cmkd",
                       "cmkd, mnf_csc (noise filter + contrastive semantic calibration, "
                       "model/mnf_csc.py), or none (ablation: no distillation loss)")
    tau_s: float = option(0.07, "student temperature of CMKD")
    tau_t: float = option(0.07, "teacher temperature of CMKD")
    alpha: float = option(0.4, "weight of the teacher distribution vs positives in the CMKD target")
    # mnf_csc mode (model/mnf_csc.py). Gate MLP width; 0 = half the embedding size, as the
    # original's filter.
    mnf_hidden: int = option(0, "mnf_csc: hidden width of the gate MLP (0 = embedding size / 2)")
    mnf_margin: float = option(0.2, "mnf_csc: triplet margin (purified teacher closer than raw)")
    # Pair temperature tau_ij = clamp(cos(s_i, t_j) + csc_tau0, csc_tau_min, csc_tau_max);
    # the floor keeps it positive for dissimilar pairs.
    csc_tau0: float = option(0.07, "mnf_csc: offset of the pair temperature cos(s_i, t_j) + tau0")
    csc_tau_min: float = option(0.05, "mnf_csc: lower clamp of the pair temperature")
    csc_tau_max: float = option(1.0, "mnf_csc: upper clamp of the pair temperature")


@dataclass
class MatchingConfig:
    """Cross-domain fine-grained matching head (model/matching.py)."""

    enabled: bool = option(True, "ablation: cross-domain fine-grained matching head (gckd)")
    hard_negatives: bool = option(True,
                                  "ablation: most similar other-id negatives (off: random ones)")
    hidden: int = option(64, "matching head width")
    num_heads: int = option(4, "matching head attention heads")
    num_layers: int = option(1, "matching head cross-attention layers")
    # Re-rank each query's top-k at evaluation (reported as rerank_* beside the plain metrics).
    rerank_top_k: int = option(10,
                               "top-k re-ranked by the head at evaluation, reported as rerank_* "
                               "(0 = off)")
    rerank_weight: float = option(1.0, "weight of the match probability added in re-ranking")


@dataclass
class TrainConfig:
    # 20 = 10 source + 10 adaptation epochs: the default job fits 5 minutes on 2 CPU cores
    # (issue 26). The source epochs are the cheap ones and the ones the gain needs most: 5 + 15
    # scored 21.25 R@1, 10 + 10 29.00 (seed 0). 30 epochs: experiments/configs/synth_full.yaml.
    epochs: int = option(20, "epochs (one epoch: see train.epoch_unit)")
    # identities: each identity once with instances_per_id captions (the from-scratch default,
    # fast epochs); captions: every training caption once (IRRA's epoch), still in
    # identity-balanced batches. On CUHK-PEDES an identity epoch is 22k of 68k captions.
    epoch_unit: str = option("identities",
                             "what one epoch covers: identities (each once, instances_per_id "
                             "captions) or captions (every training caption once, IRRA)")
    # Pairs per worker per step; identity-balanced: batch_size / instances_per_id identities.
    batch_size: int = option(64, "source pairs (and target images/captions) per worker per step")
    instances_per_id: int = option(2, "captions per identity in a source batch")
    lr: float = option(2e-3, "AdamW peak learning rate (linear warm-up, cosine decay)")
    weight_decay: float = option(0.02, "AdamW weight decay")
    # IRRA trains the CLIP towers at lr and the modules it adds at 5 x lr: fresh heads need
    # larger steps than pretrained weights can take. Pretrained = the CLIP model's parameters
    # (model.encoder.clip); new = everything else (ID classifier, propagation, matching, MNF).
    new_module_lr_scale: float = option(1.0, "learning rate of the modules added to CLIP (ID "
                                             "classifier, graph, matching, MNF) as a multiple of "
                                             "train.lr (IRRA: 5)")
    warmup_epochs: float = option(1.0, "epochs of linear learning-rate warm-up")
    grad_clip: float = option(1.0, "global gradient-norm clip (0 = off)")
    num_workers: int = option(2, "Ray Train workers (data-parallel ranks)")
    use_gpu: bool = option(False, "one GPU per worker, NCCL")
    cpus_per_worker: float = option(1.0, "CPUs reserved per worker (also its torch threads)")
    # Worker failures survived by restoring the last checkpoint.
    max_failures: int = option(2, "worker failures survived by restoring the last checkpoint")
    log_every: int = option(20, "steps between progress lines")
    # Reporting only: nothing is selected on the test split. The last epoch is always scored
    # (its metrics are results.json's final ones); the label-free target_mnn is scored every
    # epoch whatever this says (Tune's ASHA ranks trials on it at any epoch).
    eval_every: int = option(1,
                             "score the target test split every N epochs and after the last "
                             "(0 = after the last only); reporting only, never selection")
    # Target training images and captions (each drawn independently, no pairing) encoded after
    # every epoch for the label-free selection criterion target_mnn; 0 = off.
    label_free_samples: int = option(1000,
                                     "target training images and captions (drawn independently) "
                                     "scored each epoch by the label-free criterion target_mnn (0 "
                                     "= off)")
    # Prepare the next batch (fetch, decode, augment) in a background thread during the step;
    # the batches and the augmentation stream are the same either way. Off by default: where
    # the workers already fill the CPU cores (CPU training) the thread only competes with them
    # (2 workers on 2 cores: 239 against 268 pairs/s, benchmarks/RESULTS.md); turn it on where
    # host cores idle during the step (GPU nodes).
    prefetch: bool = option(False,
                            "prepare the next batch (fetch, decode, augment) in a background "
                            "thread while the step runs (identical results); worth it where host "
                            "cores idle during the step, e.g. GPU nodes")
    # Loader processes per worker for the host half of each batch (read, decode, resize; the
    # augmentation stays in the worker, so batches are identical with any count). -1 = auto:
    # train.cpus_per_worker processes under train.use_gpu (one thread cannot decode 384x128
    # images as fast as a GPU trains: benchmarks/RESULTS.md), none on CPU, where the workers'
    # torch threads already fill the reserved cores and loader processes would compete with them.
    loader_processes: int = option(-1,
                                   "loader processes per worker that read and decode images "
                                   "(identical batches with any count); -1 = "
                                   "train.cpus_per_worker under train.use_gpu, else 0; 0 = in "
                                   "the worker")


@dataclass
class DeepSpeedConfig:
    """The student's DeepSpeed engine (distributed/deepspeed_config.py builds its JSON)."""

    zero_stage: int = option(0,
                             "ZeRO stage of the student and teacher (0: replicated, 1: optimizer "
                             "states, 2: + gradients, 3: + parameters sharded)")
    gradient_accumulation_steps: int = option(1, "micro-batches per optimizer step")
    # A DeepSpeed JSON whose entries override the generated config ('' = none).
    config_file: str = option("", "DeepSpeed JSON overriding entries of the generated config")


@dataclass
class RunConfig:
    seed: int = option(0, "seed of initialisation, sampling and augmentation")
    output_dir: str = option("runs/default",
                             "results.json, checkpoints (ray/), tokenizer/ and memory/ go here")
    resume: bool = option(False,
                          "continue the last run in run.output_dir from its latest checkpoint")
    verbose: bool = option(False, "also show Ray's and the workers' own output (debugging); "
                                  "the console otherwise shows this project's lines only")
    # Stop (cleanly, after its checkpoint) once this many epochs ran in this invocation; 0 = run
    # to train.epochs. For time-limited allocations: continue later with run.resume=true.
    stop_after_epochs: int = option(0,
                                    "stop after this many epochs of this invocation, checkpointed "
                                    "(0 = run all); continue with run.resume=true")
    # Two: the newest, and the one before it should the newest be cut off mid-write.
    keep_checkpoints: int = option(2, "per-epoch checkpoints kept under ray/ (0 = every one, "
                                      "e.g. for offline audits of each epoch)")


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

    search_space: dict = field(default_factory=_default_search_space, metadata={
        "help": "gckd_ray.tune: dotted key -> {grid|choice: [values]} or "
                "{uniform|loguniform|randint: [lo, hi]}"})
    num_samples: int = option(2,
                              "gckd_ray.tune: samples of the space (each grid point this many "
                              "times)")
    # Trials at a time; 0 = as many as the cluster's CPUs fit.
    max_concurrent_trials: int = option(0, "gckd_ray.tune: trials at a time (0 = as many as fit)")
    # ASHA: first rung this many epochs after gckd.warmup_epochs (before it, trials that differ
    # only in adaptation knobs are identical), then every reduction_factor x further.
    grace_epochs: int = option(2,
                               "gckd_ray.tune: ASHA's first rung, in epochs after "
                               "gckd.warmup_epochs")
    reduction_factor: float = option(2.0, "gckd_ray.tune: ASHA reduction factor")
    # Rank by target test R@1 (research only; needs target labels) instead of target_mnn.
    oracle_metric: bool = option(False,
                                 "gckd_ray.tune: rank trials by target test R1 (uses target "
                                 "labels: research only) instead of the label-free target_mnn")
    max_failures: int = option(1, "gckd_ray.tune: retries of a failed trial")


@dataclass
class Config:
    method: str = option("gckd",
                         "gckd (adapt to the unlabelled target), source_only, or oracle (trains "
                         "on target labels: a measurement-only upper bound)")
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

    @property
    def target_losses_on(self) -> bool:
        """Whether an adaptation loss reads the target batch's student embeddings and the
        memory: graph propagation, the matching head, a distillation mode or i2i. Without one,
        GCKD's adaptation is its domain centring and lexical bridge: the step skips the target
        student forward, the memory reads and pushes, and the pseudo-id refreshes."""
        return (self.graph.enabled or self.matching.enabled or self.distill.mode != "none"
                or bool(self.loss.weights.i2i))

    @property
    def uses_memory(self) -> bool:
        """Whether the run has a GCKD memory actor: only a target loss reads the memory, so
        without one none is started, fed, autosaved or checkpointed."""
        return self.method == "gckd" and self.target_losses_on

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
        _one_of("data.on_bad_image", self.data.on_bad_image, BAD_RECORD_POLICIES)
        _one_of("distill.mode", self.distill.mode, DISTILL_MODES)
        _one_of("gckd.strong_views", self.gckd.strong_views, STRONG_VIEWS)
        _one_of("train.epoch_unit", self.train.epoch_unit, EPOCH_UNITS)
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
                    "loss.itc_temperature", "train.new_module_lr_scale"):
            _positive(key, get_key(self, key))
        for key in ("run.stop_after_epochs", "run.keep_checkpoints", "train.weight_decay",
                    "train.warmup_epochs", "train.grad_clip", "train.max_failures",
                    "train.eval_every",
                    "gckd.bridge_margin", "loss.weights.sdm", "loss.weights.itc", "loss.weights.id",
                    "loss.weights.cmkd", "loss.weights.gmp", "loss.weights.itm", "loss.weights.i2i",
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
    for doc in describe_keys(cfg):
        if doc.type_name == "float" and not math.isfinite(doc.value):
            raise ConfigError(f"{doc.key}: must be a finite number, got {doc.value}")
    for key in ("run.seed", "data.synth_seed", "gckd.warmup_epochs", "gckd.refresh_threads",
                "gckd.refresh_lag", "gckd.pseudo_exact_pairs", "gckd.pseudo_probes",
                "gckd.memory_max_restarts", "gckd.pseudo_image_k"):
        if get_key(cfg, key) < 0:
            raise ConfigError(f"{key}: must be >= 0, got {get_key(cfg, key)}")
    _positive("train.log_every", cfg.train.log_every)
    if cfg.train.loader_processes < -1:
        raise ConfigError(f"train.loader_processes: must be >= -1 (-1 = auto), got "
                          f"{cfg.train.loader_processes}")
    if cfg.data.text_length < 2:
        raise ConfigError(f"data.text_length: must be >= 2 (bos and eos tokens), got "
                          f"{cfg.data.text_length}")
    if not 0 <= cfg.data.random_erasing <= 1:
        raise ConfigError(f"data.random_erasing: must be in [0, 1] (a probability), got "
                          f"{cfg.data.random_erasing}")
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


class KeyDoc(typing.NamedTuple):
    key: str        # dotted, as on the command line
    type_name: str
    value: Any      # in the described config (the default for ``describe_keys()``)
    help: str


def describe_keys(cfg: Any = None, prefix: str = "") -> list[KeyDoc]:
    """Every dotted key with its type name, default and help text, for ``--help``."""
    cfg = Config() if cfg is None else cfg
    rows = []
    hints = typing.get_type_hints(type(cfg))
    for f in dataclasses.fields(cfg):
        value = getattr(cfg, f.name)
        if dataclasses.is_dataclass(value):
            rows += describe_keys(value, f"{prefix}{f.name}.")
        else:
            rows.append(KeyDoc(prefix + f.name,
                               getattr(hints[f.name], "__name__", str(hints[f.name])), value,
                               f.metadata.get("help", "")))
    return rows


def help_epilog() -> str:
    lines = ["configuration keys (override any with key=value; YAML files use the same nesting):"]
    for doc in describe_keys():
        lines += [f"  {doc.key:<26} {doc.type_name:<5} {doc.value!r:<14} {doc.help}"]
    lines += ["", f"methods: {', '.join(METHODS)}", f"datasets: {', '.join(DATASET_NAMES)}"]
    return "\n".join(lines)
