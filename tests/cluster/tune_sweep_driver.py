"""A small Ray Tune sweep shaped like a ``gckd_ray.tune`` sweep, for the autoscaling test, run
on the cluster named by RAY_ADDRESS. Each of 2 concurrent trials is a function trainable with
gckd_ray's trial-driver resources (no CPU, on the head) that runs a Ray Train v2 TorchTrainer
of one 1-CPU worker and forwards its reports to Tune with Train v2's TuneReportCallback, as
``gckd_ray.distributed.sweep.train_trial`` does. Prints one JSON line with the trials' last
metrics.

    python tune_sweep_driver.py STORAGE_DIR [--start-when FILE] [--epochs N] [--sleep-s S]
"""

import argparse
import json
import time
from pathlib import Path

import ray
import ray.train
from ray import tune

from gckd_ray.distributed.sweep import TRIAL_DRIVER_RESOURCES


def train_loop(config: dict) -> None:
    """The Train worker: holds its CPU, and so its worker node, while it "trains"."""
    for epoch in range(1, config["epochs"] + 1):
        time.sleep(config["sleep_s"])
        ray.train.report({"epoch": epoch, "score": config["x"] * epoch})


def trial(config: dict) -> None:
    from ray.train import RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer
    from ray.tune.integration.ray_train import TuneReportCallback

    TorchTrainer(
        train_loop, train_loop_config=config,
        scaling_config=ScalingConfig(num_workers=1, resources_per_worker={"CPU": 1}),
        run_config=RunConfig(name=tune.get_context().get_trial_id(),
                             storage_path=config["train_storage"],
                             callbacks=[TuneReportCallback()]),
    ).fit()


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("storage", type=Path, help="Tune's and Train's storage folder")
    parser.add_argument("--start-when", type=Path,
                        help="wait (imports done) until this file exists, then connect")
    parser.add_argument("--epochs", type=int, default=2)
    parser.add_argument("--sleep-s", type=float, default=1.0, help="per epoch")
    args = parser.parse_args()
    while args.start_when and not args.start_when.exists():
        time.sleep(0.2)
    ray.init()  # joins RAY_ADDRESS
    tuner = tune.Tuner(
        tune.with_resources(trial, TRIAL_DRIVER_RESOURCES),
        param_space={"x": tune.grid_search([1, 2]), "epochs": args.epochs,
                     "sleep_s": args.sleep_s, "train_storage": str(args.storage / "train")},
        tune_config=tune.TuneConfig(max_concurrent_trials=2),
        run_config=tune.RunConfig(storage_path=str(args.storage), name="autoscaling",
                                  verbose=0))
    grid = tuner.fit()
    last = sorted(({k: r.metrics.get(k) for k in ("epoch", "score")}
                   for r in grid if not r.error), key=lambda m: m["score"])
    print(json.dumps({"trials": len(grid), "errors": grid.num_errors, "last": last}))


if __name__ == "__main__":
    main()
