"""``python -m gckd_ray.tune``: a Ray Tune sweep of training runs (thin entry point).

Each trial is a full Ray Train + DeepSpeed run of ``python -m gckd_ray.train``'s config with
the sampled values; ASHA stops weak trials early (epochs as time); trials are ranked by the
label-free ``target_mnn`` unless ``--oracle-metric``. Starts a local Ray instance, or joins
the cluster named by RAY_ADDRESS (``ray job submit``).
"""

from __future__ import annotations

import argparse
import sys

from gckd_ray.distributed.runtime import use_loopback_if_local

use_loopback_if_local()  # before anything imports ray

from gckd_ray.config import help_epilog, load_config, override_config  # noqa: E402
from gckd_ray.config_rules import enforce as enforce_rules  # noqa: E402
from gckd_ray.model.pretrained_folder import check_pretrained_folder  # noqa: E402
from gckd_ray.errors import run_command  # noqa: E402


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m gckd_ray.tune",
        description="Sweep training hyper-parameters (default: distill.tau_s, distill.tau_t, "
                    "distill.alpha, graph.k; see tune.search_space) with Ray Tune and ASHA. "
                    "Writes sweep.csv, best_config.yaml, sweep.png and the Tune experiment "
                    "(tune/) under run.output_dir.",
        epilog=help_epilog(), formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", help="YAML file (e.g. experiments/configs/tune.yaml)")
    parser.add_argument("--num-samples", type=int, help="overrides tune.num_samples")
    parser.add_argument("--resume", action="store_true",
                        help="continue the interrupted sweep in run.output_dir")
    parser.add_argument("--oracle-metric", action="store_true",
                        help="rank trials by target test R1 (uses target labels: research "
                             "only); default: the label-free target_mnn")
    parser.add_argument("--verbose", action="store_true",
                        help="also show Ray's and the workers' own output (run.verbose=true)")
    parser.add_argument("overrides", nargs="*", metavar="key=value",
                        help="dotted overrides, e.g. train.epochs=12 tune.num_samples=4")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return run_command(lambda: _tune(args))


def _tune(args: argparse.Namespace) -> None:
    cfg = load_config(args.config, args.overrides)
    flags = [f"tune.num_samples={args.num_samples}"] if args.num_samples is not None else []
    if args.oracle_metric:
        flags.append("tune.oracle_metric=true")
    if args.verbose:
        flags.append("run.verbose=true")
    cfg = override_config(cfg, flags).with_absolute_paths()
    enforce_rules(cfg, "tune")  # before Ray starts and before anything is written
    check_pretrained_folder(cfg)
    from gckd_ray.distributed.sweep import run_sweep

    run_sweep(cfg, resume=args.resume)


if __name__ == "__main__":
    sys.exit(main())
