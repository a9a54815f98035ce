"""cluster/: the launcher YAMLs pass Ray's own schema validation (as ``ray up`` runs it), scale
GPU workers from 0, install the project with its constraints, mount the data and model volumes
and start Ray with token auth and a private dashboard; the KubeRay manifests carry the fields the
ray.io/v1 CRDs need, the same guarantees, the two volumes on every pod, no token, and the RayJob
runs a real protocol from the mounted paths (DESIGN.md sections 7 and 8)."""

import copy
import re
import shlex
from pathlib import Path

import jsonschema
import pytest
import yaml
from ray.autoscaler._private.util import prepare_config, validate_config

from gckd_ray.config import load_config

CLUSTER = Path(__file__).resolve().parents[2] / "cluster"
LAUNCHERS = ["aws.yaml", "gcp.yaml", "local.yaml"]
CLOUD_LAUNCHERS = ["aws.yaml", "gcp.yaml"]
TOKEN_DIR = "~/.gckd-ray-auth"
IMAGE_REPO_ROOT = "/home/ray/gckd-ray"  # where cluster/Dockerfile installs the checkout
# The data volume and the model volume, where experiments/configs/real_*.yaml look.
VOLUMES = {"/data": "gckd-ray-data", "/models": "gckd-ray-models"}


def _launcher(name: str) -> tuple[dict, dict]:
    """The YAML as written and as ``ray up`` prepares and validates it."""
    raw = yaml.safe_load((CLUSTER / name).read_text())
    prepared = prepare_config(copy.deepcopy(raw))
    validate_config(prepared)
    return raw, prepared


def _manifests(name: str) -> list[dict]:
    return [doc for doc in yaml.safe_load_all((CLUSTER / name).read_text()) if doc]


def _worker_types(prepared: dict) -> dict:
    return {name: t for name, t in prepared["available_node_types"].items()
            if name != prepared["head_node_type"]}


@pytest.mark.parametrize("name", LAUNCHERS)
def test_launcher_yaml_passes_rays_schema_validation(name):
    raw, prepared = _launcher(name)
    assert prepared["cluster_name"] == raw["cluster_name"]
    # The validator is live: a misspelt node-type field is rejected.
    broken = copy.deepcopy(prepared)
    next(iter(broken["available_node_types"].values()))["min_worker"] = 0
    with pytest.raises(jsonschema.ValidationError, match="min_worker"):
        validate_config(broken)


@pytest.mark.parametrize("name", CLOUD_LAUNCHERS)
def test_cloud_gpu_workers_scale_from_zero_under_a_cpu_head(name):
    _, prepared = _launcher(name)
    head = prepared["available_node_types"][prepared["head_node_type"]]
    assert head["resources"].get("GPU", 0) == 0 and head["max_workers"] == 0
    gpu_types = {n: t for n, t in _worker_types(prepared).items() if t["resources"].get("GPU")}
    assert gpu_types and gpu_types.keys() == _worker_types(prepared).keys()
    for node_type, spec in gpu_types.items():
        assert spec["min_workers"] == 0, node_type
        assert 0 < spec["max_workers"] <= prepared["max_workers"], node_type


def test_local_workers_start_only_on_demand():
    _, prepared = _launcher("local.yaml")
    node = prepared["available_node_types"]["local.cluster.node"]
    assert node["min_workers"] == 0
    assert node["max_workers"] == len(prepared["provider"]["worker_ips"]) > 0


@pytest.mark.parametrize("name", LAUNCHERS)
def test_idle_workers_time_out(name):
    raw, _ = _launcher(name)
    assert raw["idle_timeout_minutes"] > 0  # set here, not left to Ray's default


@pytest.mark.parametrize("name", LAUNCHERS)
def test_every_node_installs_the_project_with_its_constraints(name):
    _, prepared = _launcher(name)
    install = re.compile(r"cd ~/gckd-ray && \S*pip install .*-c constraints\.txt .*-e \.$")
    for role in ("head_setup_commands", "worker_setup_commands"):
        assert any(install.search(cmd) for cmd in prepared[role]), (role, prepared[role])
    assert prepared["file_mounts"]["~/gckd-ray"] == "."  # the checkout `ray up` runs from
    # The CPU head takes the CPU build of the pinned torch; GPU workers PyPI's CUDA build.
    assert any("download.pytorch.org/whl/cpu" in c for c in prepared["head_setup_commands"])
    assert not any("whl/cpu" in c for c in prepared["worker_setup_commands"])


@pytest.mark.parametrize("name", CLOUD_LAUNCHERS)
def test_cloud_containers_mount_the_data_and_model_volumes_read_only(name):
    _, prepared = _launcher(name)
    options = prepared["docker"]["run_options"]
    for path in VOLUMES:
        assert f"-v /mnt{path}:{path}:ro" in options, (path, options)
        assert any("mkdir -p" in c and f"/mnt{path}" in c
                   for c in prepared["initialization_commands"]), path


def test_local_machines_are_checked_for_the_data_and_model_volumes():
    _, prepared = _launcher("local.yaml")
    assert any("/data /models" in c and "test -d" in c for c in prepared["setup_commands"])


@pytest.mark.parametrize("name", LAUNCHERS)
def test_ray_starts_with_token_auth_and_a_loopback_dashboard(name):
    _, prepared = _launcher(name)
    starts = {role: [c for c in prepared[role] if "ray start" in c]
              for role in ("head_start_ray_commands", "worker_start_ray_commands")}
    assert all(starts.values()), starts
    for cmd in starts["head_start_ray_commands"] + starts["worker_start_ray_commands"]:
        assert "RAY_AUTH_MODE=token" in cmd, cmd
        assert f"RAY_AUTH_TOKEN_PATH=$HOME/{TOKEN_DIR[2:]}/auth_token" in cmd, cmd
    head = " ".join(starts["head_start_ray_commands"])
    assert "--dashboard-host=127.0.0.1" in head
    # The token reaches every node as a synced file from a folder the user creates.
    assert prepared["file_mounts"][TOKEN_DIR] == TOKEN_DIR


@pytest.mark.parametrize("name", sorted(p.name for p in CLUSTER.glob("*.yaml")))
def test_no_token_no_open_dashboard_and_no_loopback_pin(name):
    text = (CLUSTER / name).read_text()
    assert "0.0.0.0" not in text or name == "kuberay-rayjob.yaml"  # why: see its header
    assert not re.search(r"RAY_AUTH_TOKEN=\S", text)  # the token is never a literal value
    # Pins every Ray socket to 127.0.0.1: right for one machine, fatal for a cluster.
    assert "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER" not in text
    for doc in yaml.safe_load_all(text):
        if isinstance(doc, dict) and doc.get("kind") == "Secret":
            assert doc["stringData"] == {"auth_token": ""}


def _check_cluster_spec(spec: dict) -> None:
    """What both KubeRay manifests need: autoscaling from 0 GPU pods, token auth everywhere."""
    assert spec["enableInTreeAutoscaling"] is True
    assert spec["autoscalerOptions"]["idleTimeoutSeconds"] > 0
    assert spec["authOptions"]["mode"] == "token"
    secret = spec["authOptions"]["secretName"]
    head = spec["headGroupSpec"]
    assert isinstance(head["rayStartParams"], dict)
    assert head.get("serviceType", "ClusterIP") == "ClusterIP" and not head.get("enableIngress")
    for container in head["template"]["spec"]["containers"]:
        assert "nvidia.com/gpu" not in container["resources"]["limits"]
        _check_auth_env(container, secret)
    assert spec["workerGroupSpecs"]
    _check_volumes(head["template"]["spec"])
    for group in spec["workerGroupSpecs"]:
        assert group["groupName"] and isinstance(group["rayStartParams"], dict)
        assert group["minReplicas"] == 0 and group.get("replicas", 0) == 0
        assert group["maxReplicas"] > 0
        _check_volumes(group["template"]["spec"])
        for container in group["template"]["spec"]["containers"]:
            assert int(container["resources"]["limits"]["nvidia.com/gpu"]) > 0
            _check_auth_env(container, secret)


def _check_volumes(pod: dict) -> None:
    """Every container mounts the data and model claims read-only at /data and /models."""
    claims = {v["name"]: v["persistentVolumeClaim"] for v in pod["volumes"]
              if "persistentVolumeClaim" in v}
    for container in pod["containers"]:
        mounts = {m["mountPath"]: m for m in container["volumeMounts"]}
        for path, claim in VOLUMES.items():
            assert mounts[path]["readOnly"] is True, (container["name"], path)
            assert claims[mounts[path]["name"]] == {"claimName": claim, "readOnly": True}


def _check_auth_env(container: dict, secret: str) -> None:
    env = {e["name"]: e for e in container["env"]}
    assert env["RAY_AUTH_MODE"]["value"] == "token"
    ref = env["RAY_AUTH_TOKEN"]["valueFrom"]["secretKeyRef"]
    assert ref == {"name": secret, "key": "auth_token"} and "value" not in env["RAY_AUTH_TOKEN"]


def test_kuberay_raycluster_manifest():
    (cluster,) = _manifests("kuberay-raycluster.yaml")
    assert cluster["apiVersion"] == "ray.io/v1" and cluster["kind"] == "RayCluster"
    assert cluster["metadata"]["name"]
    _check_cluster_spec(cluster["spec"])
    # Reached through kubectl port-forward, which connects to the pod's loopback.
    assert cluster["spec"]["headGroupSpec"]["rayStartParams"]["dashboard-host"] == "127.0.0.1"


def test_kuberay_rayjob_manifest_runs_training_the_config_accepts():
    (job,) = _manifests("kuberay-rayjob.yaml")
    assert job["apiVersion"] == "ray.io/v1" and job["kind"] == "RayJob"
    assert job["metadata"]["name"]
    assert job["spec"]["shutdownAfterJobFinishes"] is True
    _check_cluster_spec(job["spec"]["rayClusterSpec"])
    argv = shlex.split(job["spec"]["entrypoint"])
    assert argv[:3] == ["python", "-m", "gckd_ray.train"]
    assert argv[3] == "--config"
    config = Path(argv[4].replace(IMAGE_REPO_ROOT, str(CLUSTER.parent)))
    cfg = load_config(config, argv[5:])  # the job would not stop on a config error
    assert cfg.train.use_gpu is True
    # A real protocol (not SynthPEDES) read from the data and model volumes.
    assert config.name.startswith("real_") and cfg.method == "gckd"
    assert cfg.data.source.name == "cuhk-pedes" and cfg.data.target.name == "icfg-pedes"
    for path in (cfg.data.source.root, cfg.data.target.root, cfg.model.pretrained):
        assert any(path.startswith(volume + "/") for volume in VOLUMES), path
    # Each worker fills one 8-CPU GPU pod, its CPUs the loader processes.
    for group in job["spec"]["rayClusterSpec"]["workerGroupSpecs"]:
        for container in group["template"]["spec"]["containers"]:
            assert cfg.train.cpus_per_worker == float(container["resources"]["limits"]["cpu"])
    assert cfg.run.output_dir.startswith("/mnt/shared/")  # on the claim every pod mounts
    groups = job["spec"]["rayClusterSpec"]["workerGroupSpecs"]
    assert cfg.train.num_workers <= sum(g["maxReplicas"] for g in groups)


def test_kuberay_auth_secret_example_has_the_expected_shape():
    (secret,) = _manifests("kuberay-auth-secret.example.yaml")
    (cluster,) = _manifests("kuberay-raycluster.yaml")
    assert secret["apiVersion"] == "v1" and secret["kind"] == "Secret"
    assert secret["metadata"]["name"] == cluster["spec"]["authOptions"]["secretName"]
    assert list(secret["stringData"]) == ["auth_token"]
