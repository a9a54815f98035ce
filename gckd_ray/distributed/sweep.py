"""Ray Tune sweeps: the search space from config, one Ray Train run per trial, ASHA, restore.

Ray 2.60 runs Train v2, where ``Tuner(TorchTrainer(...))`` is not supported: each trial is a
Tune function trainable (``train_trial``) that runs an ordinary ``run_training`` with Train v2's
``TuneReportCallback``, so every per-epoch report of the run (losses, target metrics,
``target_mnn``) reaches Tune and its scheduler. A trial writes a normal training run under
``<run.output_dir>/trials/<trial id>`` with ``run.resume=true``: a trial that Tune restarts
(after a failure or ``Tuner.restore``) continues from its last checkpoint.

Trials are ranked by the label-free ``target_mnn`` (cross-modal mutual nearest neighbours on
unlabelled, unpaired target training data) unless ``tune.oracle_metric`` asks for target test
R@1, which needs target labels and is for research only.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from gckd_ray.config import Config, ConfigError, config_from_dict, override_config
from gckd_ray.tune_space import (LABEL_FREE_METRIC, Dimension, describe_metric, first_rung,
                                 num_trials, ranking_metric, search_dimensions)

EXPERIMENT = "sweep"
# A trial's own driver only waits on its Train run: no CPU, on the head node. Train v2 puts a
# detached coordinator actor on the driver's node, which would keep an autoscaled worker node
# from ever going idle; a resource request of CPU alone (0) Tune refuses.
TRIAL_DRIVER_RESOURCES = {"CPU": 0, "node:__internal_head__": 0.001}


def param_space(dims: list[Dimension]) -> dict[str, Any]:
    from ray import tune

    make = {"grid": lambda v: tune.grid_search(list(v)), "choice": lambda v: tune.choice(list(v)),
            "uniform": lambda v: tune.uniform(*v), "loguniform": lambda v: tune.loguniform(*v),
            "randint": lambda v: tune.randint(*v)}
    return {d.key: make[d.kind](d.values) for d in dims}


def trial_config(base: Config, params: dict[str, Any], trial_id: str) -> Config:
    """The training config of one trial: ``base`` with the sampled values, its own folder and
    ``run.resume`` on (a restarted trial continues from its last checkpoint)."""
    output = Path(base.run.output_dir) / "trials" / trial_id
    overrides = [f"{k}={json.dumps(v)}" for k, v in params.items()]
    return override_config(base, [*overrides, f"run.output_dir={output}", "run.resume=true"])


def train_trial(params: dict[str, Any], base: dict[str, Any]) -> None:
    """Tune function trainable: one full Ray Train (+ DeepSpeed) run; Train v2's callback
    forwards each epoch's report to Tune."""
    import ray.tune
    from ray.tune.integration.ray_train import TuneReportCallback

    from gckd_ray.distributed.launcher import run_training

    cfg = trial_config(config_from_dict(base), params, ray.tune.get_context().get_trial_id())
    run_training(cfg, callbacks=[TuneReportCallback()])


def trial_cpus(cfg: Config) -> float:
    return cfg.train.num_workers * cfg.train.cpus_per_worker


def concurrent_trials(cfg: Config, cluster_cpus: float, local: bool) -> int:
    """``tune.max_concurrent_trials``, or as many trials as the cluster's CPUs hold. On a
    local cluster (no autoscaler) a trial that cannot fit is an error, not a silent hang."""
    need = trial_cpus(cfg)
    if local and need > cluster_cpus + 1e-9:
        raise ConfigError(
            f"train.cpus_per_worker: one trial needs {need:g} CPUs (train.num_workers "
            f"{cfg.train.num_workers} x train.cpus_per_worker {cfg.train.cpus_per_worker:g}) but "
            f"this cluster has {cluster_cpus:g}; lower train.num_workers or "
            f"train.cpus_per_worker (e.g. {cluster_cpus / cfg.train.num_workers:g})")
    if cfg.tune.max_concurrent_trials:
        return cfg.tune.max_concurrent_trials
    if cluster_cpus < need:
        raise ConfigError(f"tune.max_concurrent_trials: the cluster has {cluster_cpus:g} CPUs now "
                          f"and a trial needs {need:g}; on an autoscaling cluster set it "
                          "explicitly")
    return max(1, int(cluster_cpus // need))


def asha(cfg: Config):
    from gckd_ray.distributed.resumable_asha import ResumableASHA

    grace = min(cfg.train.epochs, first_rung(cfg))
    # max_t one past the schedule: ASHA stops a trial that reaches max_t at once, before its
    # run has shut down and written results.json; a full-length trial should end by itself.
    return ResumableASHA(time_attr="epoch", max_t=cfg.train.epochs + 1, grace_period=grace,
                         reduction_factor=cfg.tune.reduction_factor)


def experiment_path(cfg: Config) -> Path:
    return Path(cfg.run.output_dir) / "tune" / EXPERIMENT


def build_tuner(cfg: Config, dims: list[Dimension], max_concurrent: int, resume: bool):
    """A fresh Tuner, or (``resume``) the interrupted sweep restored from its experiment
    folder: finished trials are kept, unfinished and errored ones continue."""
    from ray import tune

    trainable = tune.with_resources(tune.with_parameters(train_trial, base=cfg.to_dict()),
                                    TRIAL_DRIVER_RESOURCES)
    path = experiment_path(cfg)
    if resume:
        if not tune.Tuner.can_restore(str(path)):
            raise ConfigError(f"--resume: no sweep to resume in {path}")
        return tune.Tuner.restore(str(path), trainable=trainable, resume_unfinished=True,
                                  resume_errored=True)
    if path.exists():
        raise ConfigError(f"run.output_dir: {path} already holds a sweep; pass --resume to "
                          "continue it or choose another run.output_dir")
    metric = ranking_metric(cfg)
    return tune.Tuner(
        trainable, param_space=param_space(dims),
        tune_config=tune.TuneConfig(metric=metric, mode="max", scheduler=asha(cfg),
                                    num_samples=cfg.tune.num_samples,
                                    max_concurrent_trials=max_concurrent),
        run_config=tune.RunConfig(name=EXPERIMENT, storage_path=str(path.parent),
                                  failure_config=tune.FailureConfig(
                                      max_failures=cfg.tune.max_failures),
                                  verbose=1))


def trial_rows(results, cfg: Config, dims: list[Dimension]) -> list[dict[str, Any]]:
    """One row per trial of a ResultGrid: swept values, epochs run, how it ended, metrics."""
    metric = ranking_metric(cfg)
    rows = []
    for result in results:
        last = result.metrics or {}
        epochs = int(last.get("epoch", 0))
        if result.error is not None:
            status = "error"
        elif epochs < cfg.train.epochs:
            status = "stopped early (ASHA)"
        else:
            status = "completed"
        rows.append({"trial_id": last.get("trial_id", Path(result.path).name),
                     **{d.key: result.config.get(d.key) for d in dims},
                     "epochs": epochs, "status": status, "ranked_by": metric,
                     "selection": last.get(metric), "R1": last.get("R1"),
                     "mAP": last.get("mAP"), "target_mnn": last.get(LABEL_FREE_METRIC)})
    return rows


def run_sweep(cfg: Config, resume: bool = False) -> Path:
    """Validate the space, start or join Ray, run (or resume) the sweep, write its report.

    Returns the best config's path."""
    dims = search_dimensions(cfg)  # before Ray starts: a bad space costs nothing
    metric = ranking_metric(cfg)
    if metric == LABEL_FREE_METRIC and not cfg.train.label_free_samples:
        raise ConfigError("train.label_free_samples: must be > 0 to rank by target_mnn "
                          "(or pass --oracle-metric)")
    import os

    import ray

    from gckd_ray.distributed.runtime import init_ray
    from gckd_ray.distributed.sweep_report import write_report

    init_ray(verbose=cfg.run.verbose)
    local = not os.environ.get("RAY_ADDRESS")
    max_concurrent = concurrent_trials(cfg, ray.cluster_resources().get("CPU", 0.0), local)
    print(f"sweep: {num_trials(cfg, dims)} trials of {', '.join(d.key for d in dims)}, "
          f"{max_concurrent} at a time, ASHA on epochs, ranked by {describe_metric(metric)}",
          flush=True)
    results = build_tuner(cfg, dims, max_concurrent, resume).fit()
    return write_report(cfg, trial_rows(results, cfg, dims), dims)
