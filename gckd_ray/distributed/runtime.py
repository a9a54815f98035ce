"""Starting or joining Ray with this project's safety defaults (DESIGN.md §7, §8)."""

from __future__ import annotations

import os
import stat
from pathlib import Path

LOOPBACK_ENV = "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"


def use_loopback_if_local() -> None:
    """Keep every Ray socket on 127.0.0.1 for a local run. Must run before ``import ray``:
    Ray reads the variable at import time. Under ``ray job submit`` RAY_ADDRESS is set and the
    cluster's own network settings apply."""
    if "RAY_ADDRESS" not in os.environ:
        os.environ.setdefault(LOOPBACK_ENV, "0")


def worker_env() -> dict[str, str]:
    # Train v2 patches print() into its logger and also tees it when stdout is wrapped, which
    # in a Ray worker it always is: every progress line would appear twice.
    env = {"HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false",
           "RAY_TRAIN_ENABLE_PRINT_PATCH": "0"}
    if LOOPBACK_ENV in os.environ:
        env[LOOPBACK_ENV] = os.environ[LOOPBACK_ENV]
    return env


def init_ray() -> None:
    """Join the cluster named by RAY_ADDRESS (``ray job submit``), else start a local one."""
    import ray

    if ray.is_initialized():
        return
    runtime_env = {"env_vars": worker_env()}
    if os.environ.get("RAY_ADDRESS"):
        ray.init(runtime_env=runtime_env)
    else:
        # address="local": a stale /tmp/ray/ray_current_cluster must not make us join a dead one.
        # The dashboard hosts the state API that Train's placement-group cleaner polls; it
        # listens on loopback only.
        ray.init(address="local", dashboard_host="127.0.0.1", runtime_env=runtime_env,
                 logging_level="WARNING")
    _tighten_token_file()


def _tighten_token_file() -> None:
    # A local ray.init writes the auth token world-readable; it is a credential.
    token = Path.home() / ".ray" / "auth_token"
    if token.is_file() and token.stat().st_mode & (stat.S_IRWXG | stat.S_IRWXO):
        token.chmod(0o600)
