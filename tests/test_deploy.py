"""The deploy manifests parse, validate against their schemas, and run the same `tidal train`."""

import shlex
from pathlib import Path

import yaml

from tidal.common.config import load_config

ROOT = Path(__file__).resolve().parents[1]
DEPLOY = ROOT / "deploy"
IMAGE = "tidal:0.1.0"


def _train_command(cmd: str) -> tuple[str, list[str]]:
    """(config path, overrides) of a `tidal train CONFIG overrides...` command line."""
    words = shlex.split(cmd)
    i = words.index("tidal")
    assert words[i + 1] == "train", cmd
    return words[i + 2], words[i + 3:]


def test_dockerfile_builds_tidal_and_runs_train():
    text = (DEPLOY / "Dockerfile").read_text()
    lines = [ln.strip() for ln in text.splitlines() if ln.strip() and not ln.strip().startswith("#")]
    assert any(ln.startswith("FROM ") for ln in lines)
    assert any("pip install" in ln and "torch==2.13.0" in ln for ln in lines)  # pinned first (docs/platform.md#p-install)
    cmd = [ln for ln in lines if ln.startswith("CMD ")][-1]
    assert cmd == 'CMD ["tidal", "train", "configs/demo.yaml"]'
    assert (ROOT / "configs" / "demo.yaml").is_file()


def test_rayjob_manifest_runs_tidal_train_with_a_valid_config():
    job = yaml.safe_load((DEPLOY / "rayjob.yaml").read_text())
    assert job["apiVersion"] == "ray.io/v1" and job["kind"] == "RayJob"
    config, overrides = _train_command(job["spec"]["entrypoint"])
    cfg = load_config(ROOT / config, overrides)  # the command's overrides are valid
    assert cfg.cluster.placement == "disaggregated"
    spec = job["spec"]["rayClusterSpec"]
    images = [c["image"] for c in spec["headGroupSpec"]["template"]["spec"]["containers"]]
    for group in spec["workerGroupSpecs"]:
        images += [c["image"] for c in group["template"]["spec"]["containers"]]
    assert images and set(images) == {IMAGE}
    # the worker groups advertise the node resources the placement overrides ask for
    resources = " ".join(g["rayStartParams"]["resources"] for g in spec["workerGroupSpecs"])
    assert cfg.cluster.rollout_node_resource in resources and cfg.cluster.learner_node_resource in resources
    assert job["spec"]["shutdownAfterJobFinishes"] is True


def test_cluster_launcher_yaml_passes_rays_schema_and_names_the_image():
    from ray.autoscaler._private.util import prepare_config, validate_config

    raw = yaml.safe_load((DEPLOY / "ray-cluster.yaml").read_text())
    validate_config(prepare_config(raw))  # Ray's own JSON schema for cluster-launcher files
    assert raw["docker"]["image"] == IMAGE
    resources = {name: t.get("resources", {}) for name, t in raw["available_node_types"].items()}
    assert any("rollout_node" in r for r in resources.values())
    assert any("learner_node" in r for r in resources.values())
    # the documented job command is the same tidal train command, with valid overrides
    cmd = next(ln for ln in (DEPLOY / "ray-cluster.yaml").read_text().splitlines() if "tidal train" in ln)
    config, overrides = _train_command(cmd.split('"')[1].split("&&")[-1])
    load_config(ROOT / config, overrides)
