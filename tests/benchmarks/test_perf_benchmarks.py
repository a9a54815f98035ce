"""Smoke runs of the performance benchmarks (issues 8 and 25) on tiny sizes: every phase,
pipeline and figure they report is produced by the real code path. No timing is asserted."""

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from helpers import SYNTH_SCALE

ROOT = Path(__file__).resolve().parents[2]


@pytest.mark.slow
def test_step_breakdown_smoke_times_every_phase(ray_session, capsys):
    from benchmarks import step_breakdown

    result = step_breakdown.main(["--smoke"])
    ms = result["ms_per_step"]
    for phase in ("student_forward", "teacher_forward", "knn_graph", "propagation", "cmkd",
                  "matching", "backward", "optimizer_step", "ema", "memory_push",
                  "snapshot_read", "pseudo_id_refresh"):
        assert ms[phase] > 0, phase
    # 13 shares (12 phases + "other"), each rounded to 4 decimals: their sum is 1 within 6.5e-4
    assert sum(result["share_of_step"].values()) == pytest.approx(1.0, abs=2e-3)
    assert 0 < result["memory_and_graph_share"] < 1
    assert result["engine"] == "deepspeed" and result["graph_nodes"] == 4 * 4 + 4 * 4
    assert not torch.distributed.is_initialized()  # its one-rank group is gone
    assert json.loads(capsys.readouterr().out.strip().splitlines()[-1]) == result


@pytest.mark.slow
def test_pseudo_refresh_smoke_applies_each_refresh_lag_steps_after_its_start(ray_session,
                                                                            capsys):
    from benchmarks import pseudo_refresh

    result = pseudo_refresh.main(["--smoke"])
    assert result["search"].startswith("clustered") and result["refresh_lag"] == 4
    assert [(int(r["started_step"]), r["applied_step"]) for r in result["refreshes"]] == \
        [(4, 8), (8, 12)]
    assert all(r["num_nodes"] == 120 + 240 and r["seconds"] > 0 for r in result["refreshes"])
    assert result["refresh_s"] > 0 and 0 <= result["wait_fraction"] < 1
    assert result["read_ms"]["control"]["total"] > 0 and result["reads"] == 7
    assert result["wait_s"] == sum(r["wait_seconds"] for r in result["refreshes"]) >= 0
    assert "interference_fraction" in result and set(result["overrun_s"]) == {"control",
                                                                               "refresh"}
    assert result["actor_rss_mib"] > 0 and result["refresh_threads"] >= 1
    line = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert line == {k: result[k] for k in ("size", "refresh_s", "wait_fraction",
                                           "actor_rss_mib")}


def test_mfu_smoke_runs_without_ray_deepspeed_and_faiss():
    # The GPU image lacks Ray, DeepSpeed and faiss: block them and run the benchmark.
    code = ("import sys\n"
            "for name in ('ray', 'deepspeed', 'faiss'):\n"
            "    sys.modules[name] = None\n"
            "from benchmarks import mfu\n"
            "mfu.main(['--smoke'])\n")
    done = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True,
                          text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    result = json.loads(done.stdout.strip().splitlines()[-1])
    assert not result["gpu"] and "measured fp32 matmul" in result["peak_source"]
    parts = result["forward_tflop_by_part"]
    assert parts["encoder"] > 0 and parts["teacher"] > 0 and parts["matching"] > 0
    assert parts["other"] >= 0 and result["backward_tflop"] > parts["encoder"]
    forward = sum(parts.values())
    assert result["model_tflop_per_step"] == pytest.approx(forward + result["backward_tflop"])
    assert 0 < result["mfu"] < 1 and result["step_ms"] > 0


def test_mfu_counts_cpu_attention_kernels():
    from torch.utils.flop_counter import FlopCounterMode

    from benchmarks.mfu import _cpu_sdpa_formulas

    q = torch.randn(2, 4, 16, 8, requires_grad=True)

    def flops(**mapping):
        counter = FlopCounterMode(display=False, **mapping)
        with counter:
            torch.nn.functional.scaled_dot_product_attention(q, q, q).sum().backward()
        return counter.get_total_flops()

    # forward: two (16 x 8) @ (8 x 16)-size bmms per (batch, head); backward: five (torch's
    # formula recomputes the scores)
    bmm = 2 * 4 * 16 * 16 * 8 * 2
    assert flops() == 0
    assert flops(custom_mapping=_cpu_sdpa_formulas()) == (2 + 5) * bmm


def test_scaling_steady_rate_skips_warm_up_and_the_time_between_epochs():
    from benchmarks.scaling import steady_rate, windows

    stamped = [(10.0, 1, 2), (11.0, 1, 4), (13.0, 1, 8), (30.0, 2, 2), (31.0, 2, 4),
               (32.0, 2, 8)]
    # epoch 1: steps 4 -> 8 in 2 s; epoch 2: 4 -> 8 in 1 s; 13 s .. 31 s (eval) not counted
    assert steady_rate(stamped, skip_steps=2) == (8 / 3, 8)
    assert windows(stamped, skip_steps=2) == [(11.0, 13.0), (31.0, 32.0)]
    with pytest.raises(RuntimeError, match="two progress lines"):
        steady_rate(stamped[:2], skip_steps=2)


def test_scaling_cpu_accounting_sees_this_process():
    import os

    from benchmarks.scaling import cpu_seconds_by_role

    sum(i * i for i in range(200_000))  # some CPU time of our own
    used = cpu_seconds_by_role()
    assert used["other processes"] > 0 and all(v >= 0 for v in used.values())
    assert os.times().user <= sum(used.values()) + 1


def test_scaling_projection_smoke():
    from benchmarks import scaling

    p = scaling.main(["--project", "2", "--gpus-per-node", "4", "--smoke"])["projection"]
    ranks, b, d = 8, p["batch_per_rank"], p["embed_dim"]
    assert p["ranks"] == ranks and p["trainable_parameters"] > p["teacher_parameters"] > 0
    zero = {stage: z["bytes_per_rank"] for stage, z in p["zero"].items()}
    assert zero[0] == zero[2] < zero[3]
    assert p["queue_push_bytes_per_step"] == 4 * b * (4 * d + 16) * ranks
    assert p["model_tflop_per_rank_step"] > 0 and p["compute_s"] > 0


def test_scaling_parses_the_trainers_progress_lines():
    # The throughput runs time-stamp exactly these lines (the trainer's own log format).
    from benchmarks.scaling import PROGRESS
    from gckd_ray.distributed.metrics_log import console_line

    line = console_line({"kind": "train", "epoch": 1, "epochs": 2, "epoch_step": 5,
                         "epoch_steps": 31, "losses": {"loss": 5.0, "itc": 2.5}, "stats": {},
                         "lr": 1e-3, "steps_per_s": 2.0, "eta_s": 30.0})
    match = PROGRESS.search(line)
    assert match is not None and (match[1], match[2], match[3]) == ("1", "5", "31")


def test_data_loading_smoke(synth_cache, tmp_path):
    from benchmarks import data_loading
    from gckd_ray.config import load_config
    from gckd_ray.data.datasets import load_domain

    overrides = [f"data.synth_cache={synth_cache}", f"data.synth_scale={SYNTH_SCALE}"]
    roots = data_loading.write_real_format(load_config(None, overrides), tmp_path, 2.0, 12)
    target = load_domain("icfg-pedes", str(roots["target"]), "train").records
    assert len(target) == 12 and all(r.image_path.endswith(".jpg") for r in target)
    assert load_domain("cuhk-pedes", str(roots["source"]), "train").records[0].image_path \
        .endswith(".png")

    result = data_loading.main(["--smoke", *overrides])
    for name in ("synthpedes", "real_format"):
        pipeline = result["pipelines"][name]
        assert pipeline["losses_identical"], name  # prefetching changes no value
        for mode in data_loading.MODES:
            assert pipeline[mode]["images_per_s"] > 0, (name, mode)
            assert 0 < pipeline[mode]["wait_share"] < 1, (name, mode)
    assert result["torch_threads"] == 1  # as a Ray Train worker with train.cpus_per_worker=1


def test_data_loading_loaders_smoke_against_the_h100_need(synth_cache):
    from benchmarks import data_loading

    result = data_loading.main(["--loaders", "--smoke", "--processes", "0,1",
                                f"data.synth_cache={synth_cache}",
                                f"data.synth_scale={SYNTH_SCALE}"])
    assert set(result["samples_per_s"]) == {"0", "1"}
    assert all(rate > 0 for rate in result["samples_per_s"].values())
    h100 = result["h100"]
    counted = h100["counted_tflop"]
    assert counted["8"] > counted["4"] > 0 and h100["step_tflop"] == pytest.approx(counted["8"])
    assert h100["samples_per_s_needed"] == pytest.approx(
        989e12 * 0.4 / (h100["gflop_per_sample"] * 1e9))
    assert result["processes_needed_at_one_process_rate"] >= 1


def test_checkpoint_size_smoke_compares_the_old_and_the_lean_checkpoint(capsys):
    from benchmarks import checkpoint_size

    result = checkpoint_size.main(["--smoke", "--repeats", "1"])
    before, after = result["checkpoint_bytes"]["before"], result["checkpoint_bytes"]["after"]
    # the old layout carried the pretrained folder on top (state.json's references and the
    # manifest's entries differ by a few hundred bytes)
    assert before - after > 0.9 * result["pretrained_folder_bytes"]
    assert "tokenizer" not in result["checkpoint_files_after"]
    assert set(result["checkpoint_files_after"]) >= {"model.pt", "rank000.pt", "state.json"}
    assert result["once_per_run"]["final_model_bytes"] > 0
    assert json.loads(capsys.readouterr().out.strip().splitlines()[-1]) == result


@pytest.mark.slow
def test_framework_tax_smoke_times_plain_and_ray_steps(capsys):
    # Both sides of both methods run their real code path; no timing is asserted.
    from benchmarks import framework_tax

    result = framework_tax.main(["--smoke", "--epochs", "2"])
    assert set(result["methods"]) == {"source_only", "gckd"}
    for m in result["methods"].values():
        assert m["plain_steps_per_s"] > 0 and m["gckd_ray_steps_per_s"] > 0
        assert m["ratio"] == pytest.approx(m["plain_steps_per_s"] / m["gckd_ray_steps_per_s"])
    last = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert {"plain_steps_per_s", "gckd_ray_steps_per_s", "ratio"} <= set(last)
    assert last["ratio"] == pytest.approx(result["ratio"]) and result["ratio"] > 0
