"""DeepSpeed ZeRO in the real training path: stages agree, and ZeRO-3's shard-local EMA is exact.

The stage comparison runs the whole GCKD step (student, teacher, memory actor, graph, CMKD,
matching head) through Ray Train with 2 CPU workers (gloo, fp32) at ZeRO-0, 2 and 3.
"""

import json
import os
import shutil

import pytest
import torch
import torch.multiprocessing as mp

from gckd_ray.checkpoint_format import verify_checkpoint
from gckd_ray.distributed.launcher import run_training
from gckd_ray.distributed.metrics_log import read_records
from gckd_ray.evaluate import main as evaluate_main
from helpers import ZERO3_GCKD as GCKD, free_port

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def zero3_stopped(ray_session, tiny_config_at, tmp_path_factory):
    """A ZeRO-3 run stopped after epoch 1: the stage comparison's ZeRO-3 epoch and the resume
    test's first half (one run serves both). It prepares batches with the prefetch thread, the
    resumed half without it: the checkpointed augmentation stream must be the same."""
    out = tmp_path_factory.mktemp("zero3-stopped")
    results = run_training(tiny_config_at(out, *GCKD, "deepspeed.zero_stage=3",
                                          "run.stop_after_epochs=1", "train.prefetch=true"))
    assert [h["epoch"] for h in results["history"]] == [1]
    return out, results


# zero3_whole, the same run uninterrupted, is a session fixture (conftest.py): the search CLI
# test reads its checkpoints too.


def _losses(history):
    return {k: v for k, v in history[0].items() if k not in ("epoch",)}


def test_zero_2_and_3_match_zero_0(tiny_config, zero3_stopped, tmp_path):
    runs = {stage: run_training(tiny_config(*GCKD, f"deepspeed.zero_stage={stage}",
                                            f"run.output_dir={tmp_path / f'zero{stage}'}",
                                            "run.stop_after_epochs=1"))
            for stage in (0, 2)}
    runs[3] = zero3_stopped[1]
    reference = _losses(runs[0]["history"])
    assert {"itc", "id", "cmkd", "gmp", "itm"} <= set(reference)
    # Epoch means of 12 fp32 steps: ZeRO-0 all-reduces gradients, ZeRO-2/3 reduce-scatter them
    # (another summation order), and the kNN graph amplifies last-bit differences most
    # (measured: total loss 3e-7, gmp 1e-4 relative; ZeRO-2 vs 3: equal to 1e-7).
    for stage in (2, 3):
        got = _losses(runs[stage]["history"])
        assert got.keys() == reference.keys()
        assert got["loss"] == pytest.approx(reference["loss"], rel=1e-5)
        for key in ("itc", "id", "cmkd", "gmp", "itm"):
            assert got[key] == pytest.approx(reference[key], rel=5e-4), (stage, key)
    zero2, zero3 = (_losses(runs[s]["history"]) for s in (2, 3))
    assert all(zero3[k] == pytest.approx(zero2[k], rel=1e-5) for k in ("loss", "cmkd", "gmp"))


def _ema_worker(rank: int, world: int, port: int, out: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank),
                      WORLD_SIZE=str(world), LOCAL_RANK=str(rank), DS_ACCELERATOR="cpu")
    torch.distributed.init_process_group("gloo", rank=rank, world_size=world)
    import deepspeed

    from gckd_ray.config import load_config
    from gckd_ray.data.tokenizer import WordTokenizer
    from gckd_ray.distributed.deepspeed_config import build_engine
    from gckd_ray.model.gckd import build_gckd

    cfg = load_config(None, ["model.hidden_size=32", "model.embed_dim=16", "model.num_layers=1",
                             "model.num_heads=2", "deepspeed.zero_stage=3"])
    torch.manual_seed(0)
    module = build_gckd(cfg, WordTokenizer.build(["a man in red"]), num_classes=3)
    engine, _ = build_engine(module, cfg, lambda step: 1.0, on_gpu=False)
    model = engine.module

    def gathered(prefix):
        params = [p for n, p in model.named_parameters() if n.startswith(prefix)]
        with deepspeed.zero.GatheredParameters(params, modifier_rank=None):
            return [p.detach().clone() for p in params]

    with torch.no_grad():  # move the student away from the teacher, shard by shard
        for p in model.encoder.parameters():
            p.ds_tensor.add_(torch.randn(p.ds_tensor.shape, generator=torch.Generator()
                                         .manual_seed(rank)))
    teacher, student = gathered("teacher.module."), gathered("encoder.")
    model.ema_step()  # shard-local: no collective inside
    after = gathered("teacher.module.")
    m = cfg.gckd.momentum
    err = max((a - (m * t + (1 - m) * s)).abs().max().item()
              for a, t, s in zip(after, teacher, student))
    moved = max((a - t).abs().max().item() for a, t in zip(after, teacher))
    partitioned = all(p.ds_tensor.numel() < p.ds_numel or p.ds_numel < world
                      for p in model.parameters())
    if rank == 0:
        with open(out, "w") as f:
            json.dump({"err": err, "moved": moved, "partitioned": partitioned,
                       "count": len(after)}, f)
    torch.distributed.destroy_process_group()


def test_zero3_shard_local_ema_equals_full_parameter_ema(tmp_path):
    out = tmp_path / "ema.json"
    mp.start_processes(_ema_worker, args=(2, free_port(), str(out)), nprocs=2,
                       start_method="spawn")
    result = json.loads(out.read_text())
    assert result["partitioned"] and result["count"] > 10
    assert result["moved"] > 1e-4  # the update did something ...
    # ... and it is the full-parameter EMA. float32 math: the shard-local update and the check's
    # m t + (1 - m) s round differently, by at most ~2 ulp of |t| <= 2.7 (logit_scale), 4.8e-7
    assert result["err"] < 1e-6


def test_stop_and_resume_continues_exactly(tiny_config, zero3_stopped, zero3_whole):
    """Epoch 2 of a run stopped after epoch 1 and resumed (ZeRO-3 partitions, optimizer, LR
    schedule, RNG and augmentation streams, memory queues and pseudo-ids all restored) equals
    epoch 2 of the uninterrupted run."""
    split_dir, stopped = zero3_stopped
    whole = zero3_whole[1]
    # float32 training replayed step for step: equal up to float32 rounding (rel 1e-6 ~ 8 ulp)
    assert whole["history"][0] == pytest.approx(stopped["history"][0], rel=1e-6)
    # A record of epoch 2 as a run killed after the epoch-1 checkpoint would have left it.
    with (split_dir / "metrics.jsonl").open("a") as f:
        f.write(json.dumps({"kind": "train", "step": 13, "epoch": 2, "losses": {}}) + "\n")
    resumed = run_training(tiny_config(*GCKD, "deepspeed.zero_stage=3",
                                       f"run.output_dir={split_dir}", "run.resume=true"))
    assert [h["epoch"] for h in resumed["history"]] == [1, 2]
    expected, got = whole["history"][1], resumed["history"][1]
    assert {"cmkd", "gmp", "itm"} <= set(expected)
    for key, value in expected.items():
        assert got[key] == pytest.approx(value, rel=1e-6, abs=1e-9), key
    # metrics.jsonl holds each step once, the same steps as the uninterrupted run's.
    records, uninterrupted = (read_records(d / "metrics.jsonl") for d in (split_dir,
                                                                           zero3_whole[0]))
    # (notes are console lines, not steps: the stop and the resume each leave one)
    steps = [(r["kind"], r["step"]) for r in records if r["kind"] != "note"]
    assert len(steps) == len(set(steps)) and steps == [(r["kind"], r["step"])
                                                       for r in uninterrupted]
    assert [r["text"].split(" ")[0] for r in records if r["kind"] == "note"] == [
        "stopping", "resumed"]
    assert [r["epoch"] for r in records if r["kind"] == "eval"] == [1, 2]


def test_resume_passes_over_a_corrupted_latest_checkpoint(tiny_config, zero3_whole, tmp_path,
                                                          capsys):
    """A copy of the finished run whose latest checkpoint has one flipped byte in model.pt:
    evaluation refuses it naming the file, and a resume falls back to the epoch-1 checkpoint
    and trains epoch 2 again, exactly as the uninterrupted run did."""
    run = tmp_path / "copy"
    shutil.copytree(zero3_whole[0], run)
    first, latest = sorted(p.parent for p in run.glob("ray/*/checkpoint_*/state.json"))
    model = latest / "model.pt"
    data = bytearray(model.read_bytes())
    data[len(data) // 2] ^= 0xFF
    model.write_bytes(bytes(data))
    assert evaluate_main(["--checkpoint", str(latest)]) == 2
    assert capsys.readouterr().err == (f"checkpoint error: {model}: corrupted (its sha256 differs from the "
                                       "one in manifest-rank000.json)\n")

    resumed = run_training(tiny_config(*GCKD, "deepspeed.zero_stage=3", f"run.output_dir={run}",
                                       "run.resume=true"))
    rerun = max(p.parent for p in run.glob("ray/*/checkpoint_*/state.json"))
    assert rerun.name > latest.name  # epoch 2 was trained again from the epoch-1 checkpoint
    assert verify_checkpoint(rerun)["epoch"] == 2
    expected, got = zero3_whole[1]["history"][1], resumed["history"][1]
    for key, value in expected.items():
        assert got[key] == pytest.approx(value, rel=1e-6, abs=1e-9), key


def test_zero_memory_benchmark_smoke():
    from benchmarks import zero_memory

    result = zero_memory.main(["--smoke"])
    ratios = result["ratio_to_zero0"]
    assert ratios[0] == 1.0 and ratios[2] < 1.0  # ZeRO-2 shards gradients and Adam states
    assert set(result["mib_per_worker"]) == {0, 2, 3}
