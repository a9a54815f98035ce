"""Shared fixtures. Ray stays on loopback: the variable is set before anything imports ray."""

import os

os.environ["RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"] = "0"
os.environ["HF_HUB_OFFLINE"] = "1"
os.environ.pop("RAY_ADDRESS", None)  # tests never join a cluster they did not start

from pathlib import Path  # noqa: E402

import pytest  # noqa: E402
import torch  # noqa: E402

from gckd_ray.config import load_config  # noqa: E402
from helpers import SYNTH_SCALE  # noqa: E402

# Tiny tensors: one thread avoids oversubscribing the 2 shared cores (Ray workers set their own).
torch.set_num_threads(1)



@pytest.fixture(scope="session")
def synth_cache(tmp_path_factory) -> Path:
    """A SynthPEDES cache folder shared by the session's tests (generated on first use)."""
    from gckd_ray.data.synthetic import ensure_synthetic

    cache = tmp_path_factory.mktemp("synth-cache")
    ensure_synthetic(str(cache), seed=0, scale=SYNTH_SCALE)
    return cache


@pytest.fixture(scope="session")
def tiny_config_at(synth_cache):
    """``make(output_dir, *overrides)``: a config for quick end-to-end runs on the small
    SynthPEDES (session-scoped, for fixtures that share one run between tests)."""
    def make(output_dir: Path, *overrides: str):
        return load_config(None, [
            f"data.synth_cache={synth_cache}", f"data.synth_scale={SYNTH_SCALE}",
            f"run.output_dir={output_dir}",
            "train.epochs=1", "train.batch_size=16", "train.instances_per_id=2",
            "model.hidden_size=32", "model.embed_dim=32", "model.num_layers=1",
            "model.num_heads=2", "train.log_every=5", *overrides])
    return make


@pytest.fixture
def tiny_config(tiny_config_at, tmp_path):
    """``make(*overrides)``: as ``tiny_config_at``, writing under the test's own tmp_path."""
    return lambda *overrides: tiny_config_at(tmp_path / "run", *overrides)


@pytest.fixture(scope="session")
def ray_session():
    """One local Ray instance (2 CPUs, loopback only) for the tests that need Ray."""
    import ray

    from gckd_ray.distributed.runtime import init_ray

    init_ray(num_cpus=2)
    yield ray
    ray.shutdown()


@pytest.fixture(scope="session")
def zero3_whole(ray_session, tiny_config_at, tmp_path_factory):
    """A finished 2-worker ZeRO-3 GCKD run of ``helpers.ZERO3_GCKD`` (2 epochs, so 2
    checkpoints): ``(output_dir, results)``. Shared by the ZeRO tests and the search CLI test;
    they read it or copy it, never write into it."""
    from gckd_ray.distributed.launcher import run_training
    from helpers import ZERO3_GCKD

    out = tmp_path_factory.mktemp("zero3-whole")
    return out, run_training(tiny_config_at(out, *ZERO3_GCKD, "deepspeed.zero_stage=3"))


@pytest.fixture(scope="session")
def source_only_run(ray_session, tiny_config_at, tmp_path_factory):
    """A finished 2-worker source-only run of 2 epochs: ``(config, results)``. Shared by the
    end-to-end results test and the reference-run pin (the same config); read only."""
    from gckd_ray.distributed.launcher import run_training

    cfg = tiny_config_at(tmp_path_factory.mktemp("source-only"), "method=source_only",
                         "train.epochs=2")
    return cfg, run_training(cfg)

