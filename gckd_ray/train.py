"""``python -m gckd_ray.train``: train a retriever on Ray Train (thin entry point).

Starts a local Ray instance, or joins the cluster named by RAY_ADDRESS (``ray job submit``).
"""

from __future__ import annotations

import argparse
import sys

from gckd_ray.distributed.runtime import use_loopback_if_local

use_loopback_if_local()  # before anything imports ray

from gckd_ray.config import help_epilog, load_config  # noqa: E402
from gckd_ray.config_rules import enforce as enforce_rules  # noqa: E402
from gckd_ray.errors import run_command  # noqa: E402
from gckd_ray.model.pretrained_folder import check_pretrained_folder  # noqa: E402


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m gckd_ray.train",
        description="Train a text-to-image person retriever with Ray Train. Defaults run "
                    "SynthPEDES synth-cuhk -> synth-icfg on 2 CPU workers.",
        epilog=help_epilog(), formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", help="YAML file (e.g. experiments/configs/default.yaml)")
    parser.add_argument("--verbose", action="store_true",
                        help="also show Ray's and the workers' own output (run.verbose=true)")
    parser.add_argument("overrides", nargs="*", metavar="key=value",
                        help="dotted overrides, e.g. train.epochs=3 data.target.name=synth-rstp")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return run_command(lambda: _train(args))


def _train(args: argparse.Namespace) -> None:
    cfg = load_config(args.config, [*args.overrides, *(["run.verbose=true"] if args.verbose
                                                         else [])])
    enforce_rules(cfg, "train")  # before Ray starts and before anything is written
    check_pretrained_folder(cfg)
    from gckd_ray.distributed.launcher import run_training

    run_training(cfg)  # fails early on unplaceable workers and on bad data


if __name__ == "__main__":
    sys.exit(main())
