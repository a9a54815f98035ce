"""Config: defaults, YAML + dotted overrides, errors that name the key, every YAML loads."""

import subprocess
import sys
from pathlib import Path

import pytest

from gckd_ray.config import (Config, ConfigError, describe_keys, load_config,
                             save_config)

REPO = Path(__file__).resolve().parents[1]
CONFIG_DIR = REPO / "experiments" / "configs"


def test_defaults_are_the_default_protocol():
    cfg = load_config()
    assert cfg.protocol == "synth-cuhk->synth-icfg"
    assert cfg.train.num_workers == 2 and cfg.data.target.paired is False


def test_overrides_are_typed_and_nested():
    cfg = load_config(None, ["train.epochs=3", "data.target.name=rstpreid", "train.lr=1e-4",
                             "train.cpus_per_worker=1"])
    assert cfg.train.epochs == 3 and cfg.data.target.name == "rstpreid"
    assert cfg.train.lr == pytest.approx(1e-4) and isinstance(cfg.train.cpus_per_worker, float)
    # A partial nested override keeps the sibling defaults of its parent.
    cfg = load_config(None, ["data.target.root=/x"])
    assert cfg.data.target.name == "synth-icfg" and cfg.data.target.root == "/x"


def test_yaml_then_overrides(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("train: {epochs: 7, lr: 0.01}\nmethod: oracle\n")
    cfg = load_config(path, ["train.epochs=2"])
    assert (cfg.train.epochs, cfg.train.lr, cfg.method) == (2, 0.01, "oracle")


@pytest.mark.parametrize("override, message", [
    (["train.epochz=3"], "train.epochz: unknown key"),
    (["trian.epochs=3"], "trian: unknown key"),
    (["train.epochs=three"], "train.epochs: expected int, got str"),
    (["train.epochs=2.5"], "train.epochs: expected int, got float"),
    (["train.use_gpu=1"], "train.use_gpu: expected bool, got int"),
    (["train={a: 1}"], "train.a: unknown key"),
    (["train=3"], "train: expected a mapping of TrainConfig fields"),
    (["method=gckdd"], "method: must be one of"),
    (["data.source.name=market"], "data.source.name: must be one of"),
    (["data.on_bad_record=ignore"], "data.on_bad_record: must be one of error, skip"),
    (["train.epochs=0"], "train.epochs: must be > 0"),
    (["loss.sdm_temperature=-0.1"], "loss.sdm_temperature: must be > 0"),
    (["train.batch_size=30", "train.instances_per_id=4"], "train.batch_size: must be a multiple"),
    (["epochs"], "must look like key.sub=value"),
    (["gckd.centring_momentum=1.5"], "gckd.centring_momentum: must be in [0, 1]"),
    (["distill.mode=kd"], "distill.mode: must be one of cmkd, mnf_csc, none"),
    (["distill.csc_tau_min=0"], "distill.csc_tau_min: must be > 0"),
    (["distill.csc_tau_max=0.01"], "distill.csc_tau_max: must be >= distill.csc_tau_min"),
    (["gckd.strong_views=teacher"], "gckd.strong_views: must be one of student, both, none"),
    (["distill.alpha=1.5"], "distill.alpha: must be in [0, 1]"),
    (["graph.k=0"], "graph.k: must be > 0"),
    (["gckd.queue_size=255"], "gckd.queue_size: must be >= 2 x train.batch_size x "
                              "train.num_workers = 256 (the source and target rows one step"),
    (["train.batch_size=16", "train.num_workers=4", "gckd.queue_size=100"],
     "gckd.queue_size: must be >= 2 x train.batch_size x train.num_workers = 128"),
    (["train.batch_size=4", "graph.k=16"], "graph.k: must be in [1, 15] (a step's graph starts "
                                           "with 4 x train.batch_size = 16 nodes"),
    (["graph.k=-3"], "graph.k: must be > 0, got -3"),
    (["distill.tau_s=-0.07"], "distill.tau_s: must be > 0, got -0.07"),
    (["distill.tau_t=0"], "distill.tau_t: must be > 0, got 0.0"),
    (["graph.temperature=-1"], "graph.temperature: must be > 0, got -1.0"),
    (["loss.itc_temperature=-0.05"], "loss.itc_temperature: must be > 0, got -0.05"),
    (["distill.tau_s=.nan"], "distill.tau_s: must be a finite number, got nan"),
    (["train.lr=.inf"], "train.lr: must be a finite number, got inf"),
    (["deepspeed.zero_stage=4"], "deepspeed.zero_stage: must be one of 0, 1, 2, 3, got 4"),
    (["train.num_workers=0"], "train.num_workers: must be > 0, got 0"),
    (["train.cpus_per_worker=-1"], "train.cpus_per_worker: must be > 0, got -1.0"),
    (["train.log_every=0"], "train.log_every: must be > 0, got 0"),
    (["train.loader_processes=-2"], "train.loader_processes: must be >= -1 (-1 = auto), got -2"),
    (["run.seed=-1"], "run.seed: must be >= 0, got -1"),
    (["train.eval_every=-1"], "train.eval_every: must be >= 0, got -1"),
    (["data.text_length=1"], "data.text_length: must be >= 2 (bos and eos tokens), got 1"),
    (["gckd.pseudo_threshold=1.5"], "gckd.pseudo_threshold: must be in [-1, 1] (a cosine)"),
    (["train.batch_size=[64]"], "train.batch_size: expected int, got list"),
    (["data.target.paired=yes please"], "data.target.paired: expected bool, got str"),
])
def test_errors_name_the_key(override, message):
    with pytest.raises(ConfigError) as err:
        load_config(None, override)
    assert message in str(err.value)


def test_errors_are_one_line():
    for override in (["gckd.queue_size=1"], ["graph.k=1000"], ["bad.key=1"]):
        with pytest.raises(ConfigError) as err:
            load_config(None, override)
        assert "\n" not in str(err.value)


def test_gckd_sizes_do_not_bind_other_methods():
    cfg = load_config(None, ["method=source_only", "gckd.queue_size=8", "graph.k=1000"])
    assert cfg.gckd.queue_size == 8
    assert load_config(None, ["graph.enabled=false", "graph.k=1000"]).graph.k == 1000


def _train_cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "gckd_ray.train", *args],
                          capture_output=True, text=True, timeout=120, cwd=REPO)


def test_cli_prints_config_error_and_exits_2():
    run = _train_cli("bad.key=1")
    assert run.returncode == 2 and run.stdout == ""
    assert run.stderr.startswith("config error: bad: unknown key (known: ")
    assert run.stderr.count("\n") == 1


def test_cli_prints_yaml_and_data_errors_as_one_line(tmp_path):
    run = _train_cli("train.epochs=[1")
    assert run.returncode == 2 and run.stderr == (
        "config error: train.epochs: cannot parse value '[1': expected ',' or ']', but got "
        "'<stream end>' at line 1, column 3\n")
    (tmp_path / "imgs").mkdir()
    (tmp_path / "reid_raw.json").write_text('[{"id": 1, "file_path"')  # truncated
    run = _train_cli("data.source.name=cuhk-pedes", f"data.source.root={tmp_path}",
                     f"run.output_dir={tmp_path / 'run'}")
    assert run.returncode == 2 and run.stderr == (
        f"data error: {tmp_path}/reid_raw.json: invalid JSON at line 1 column 23: Expecting "
        "':' delimiter\n")


def test_file_errors(tmp_path):
    with pytest.raises(ConfigError, match="config file not found"):
        load_config(tmp_path / "missing.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("train: [1, 2\n")
    with pytest.raises(ConfigError, match="bad.yaml: not valid YAML"):
        load_config(bad)
    bad.write_text("- 1\n- 2\n")
    with pytest.raises(ConfigError, match="top level must be a mapping"):
        load_config(bad)


def test_save_load_round_trip(tmp_path):
    cfg = load_config(None, ["train.epochs=4", "data.target.paired=true"])
    save_config(cfg, tmp_path / "c.yaml")
    assert load_config(tmp_path / "c.yaml") == cfg


def test_absolute_paths(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    cfg = load_config(None, ["run.output_dir=out", "data.source.root=src"]).with_absolute_paths()
    assert cfg.run.output_dir == str(tmp_path / "out")
    assert cfg.data.source.root == str(tmp_path / "src") and cfg.data.target.root == ""


@pytest.mark.parametrize("path", sorted(CONFIG_DIR.glob("*.yaml")), ids=lambda p: p.name)
def test_every_experiment_yaml_loads(path):
    assert isinstance(load_config(path), Config)


def test_help_lists_and_explains_every_key():
    rows = describe_keys()
    keys = [row.key for row in rows]
    assert [row.key for row in rows if not row.help] == []
    assert "train.epochs" in keys and "data.target.paired" in keys
    assert len(keys) == len(set(keys))
