"""The GPU device plan without Ray: what each actor's environment holds, the `auto` settings, the
vLLM engine options per device, the combinations preflight refuses (one line, exit 2, before Ray
starts), the memory arithmetic, and configs/gpu/*.yaml under `tidal config show --check`.
Where the actors of a GPU config land on a cluster of logical GPUs: test_cluster_gpu_plan.py."""

import os
import subprocess
import sys
from pathlib import Path

import pytest

from tidal.actors.devices import actor_env, plan_devices, with_device_env
from tidal.actors.gpu_memory import ModelSizes, bundle_needs, check_gpu_memory, count_params
from tidal.common.config import ConfigError, load_config
from tidal.driver.preflight import check_devices, model_params
from tidal.driver.runtime import worker_env
from tidal.rollout.worker import engine_options
from test_cli_bad_input import assert_user_error

REPO = Path(__file__).resolve().parents[1]
GPU_CONFIGS = sorted((REPO / "configs" / "gpu").glob("*.yaml"))
GPU = ["learner.gpus_per_worker=1", "rollout.gpus_per_worker=1"]
# config.json fields of the models configs/gpu names (their hub configs), for the memory arithmetic
QWEN_05B = dict(hidden_size=896, num_hidden_layers=24, intermediate_size=4864, num_attention_heads=14,
                num_key_value_heads=2, vocab_size=151936, tie_word_embeddings=True)
QWEN_15B = dict(hidden_size=1536, num_hidden_layers=28, intermediate_size=8960, num_attention_heads=12,
                num_key_value_heads=2, vocab_size=151936, tie_word_embeddings=True)
QWEN_7B = dict(hidden_size=3584, num_hidden_layers=28, intermediate_size=18944, num_attention_heads=28,
               num_key_value_heads=4, vocab_size=152064, tie_word_embeddings=False)


def _cfg(*overrides, path=None):
    return load_config(path, list(overrides))


# ----------------------------------------------------------------------------- environment


def test_workers_get_no_device_variables_from_the_job_or_the_submitter(monkeypatch):
    """DS_ACCELERATOR=cpu in the job's env made a GPU learner build a CPU engine; the submitter's
    CUDA_VISIBLE_DEVICES pinned every GPU actor on every node to the submitter's devices."""
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "0")
    monkeypatch.setenv("DS_ACCELERATOR", "cpu")
    env = worker_env()
    assert "DS_ACCELERATOR" not in env and "CUDA_VISIBLE_DEVICES" not in env
    assert env["HF_HUB_OFFLINE"] == "1"  # the rest of the job's environment is still there


def test_each_actor_gets_the_device_variables_of_the_gpus_ray_gives_it():
    assert actor_env(1) == {"DS_ACCELERATOR": "cuda"}  # CUDA_VISIBLE_DEVICES is Ray's to set
    assert actor_env(0.5) == {"DS_ACCELERATOR": "cuda"}
    assert actor_env(0) == {"DS_ACCELERATOR": "cpu", "CUDA_VISIBLE_DEVICES": ""}  # a CPU actor sees no GPU
    opts = with_device_env({"num_cpus": 1, "num_gpus": 1, "runtime_env": {"env_vars": {"X": "1"}}})
    assert opts["runtime_env"]["env_vars"] == {"DS_ACCELERATOR": "cuda", "X": "1"} and opts["num_gpus"] == 1
    assert with_device_env({"num_cpus": 1})["runtime_env"]["env_vars"]["DS_ACCELERATOR"] == "cpu"
    plans = plan_devices(_cfg("learner.gpus_per_worker=1"))
    assert plans["learner"].accelerator == plans["reference"].device == "cuda" and plans["rollout"].device == "cpu"
    assert plans["learner"].dtype == "bfloat16" and plans["rollout"].env == actor_env(0)


# ----------------------------------------------------------------------------- auto settings


def test_model_dtype_auto_is_bf16_where_the_learners_train_on_gpus():
    assert _cfg().model.dtype == "float32"
    assert _cfg("learner.gpus_per_worker=1").model.dtype == "bfloat16"
    assert _cfg("learner.gpus_per_worker=1", "learner.autocast=bf16").model.dtype == "float32"  # autocast's weights
    assert _cfg("learner.gpus_per_worker=1", "model.dtype=float32").model.dtype == "float32"
    assert _cfg("model.dtype=bfloat16").model.dtype == "bfloat16"


def test_rollout_sleep_and_memory_share_follow_the_placement():
    colocated = _cfg(*GPU).rollout
    assert colocated.sleep is True and colocated.gpu_memory_utilization == 0.35
    alone = _cfg(*GPU, "cluster.placement=disaggregated").rollout
    assert alone.sleep is False and alone.gpu_memory_utilization == 0.85
    assert _cfg(*GPU, "rollout.backend=hf").rollout.sleep is False  # sleep mode is vLLM's
    assert _cfg(*GPU, "rollout.sleep=false", "rollout.gpu_memory_utilization=0.5").rollout.gpu_memory_utilization == 0.5
    cpu = _cfg().rollout
    assert cpu.sleep is False and cpu.gpu_memory_utilization is None


def test_engine_options_per_device():
    cpu = engine_options(_cfg("rollout.kv_cache_gb=0.5").rollout, "float32", 3, on_gpu=False)
    assert cpu["enforce_eager"] is True and cpu["kv_cache_memory_bytes"] == 2**29 and cpu["seed"] == 3
    assert "gpu_memory_utilization" not in cpu and "enable_sleep_mode" not in cpu
    gpu = engine_options(_cfg(*GPU, "rollout.gpu_memory_utilization=0.42").rollout, "bfloat16", 0, on_gpu=True)
    assert gpu["enforce_eager"] is False  # CUDA graphs
    assert gpu["gpu_memory_utilization"] == 0.42 and gpu["enable_sleep_mode"] is True
    assert gpu["tensor_parallel_size"] == 1 and "distributed_executor_backend" not in gpu
    assert "kv_cache_memory_bytes" not in gpu  # the share sizes the KV cache on GPU
    eager = engine_options(_cfg(*GPU, "rollout.cuda_graphs=false", "rollout.sleep=false").rollout, "bfloat16", 0, True)
    assert eager["enforce_eager"] is True and eager["enable_sleep_mode"] is False
    tp = engine_options(_cfg("learner.gpus_per_worker=1", "rollout.gpus_per_worker=2", "rollout.tensor_parallel_size=2",
                             "cluster.placement=disaggregated").rollout, "bfloat16", 0, True)
    assert tp["tensor_parallel_size"] == 2 and tp["distributed_executor_backend"] == "mp"


# ----------------------------------------------------------------------------- refused combinations

REFUSED = [
    (["learner.gpus_per_worker=0.5"], "learner.gpus_per_worker=0.5"),
    (["learner.gpus_per_worker=2"], "learner.gpus_per_worker=2"),
    ([*GPU, "rollout.weight_transport=collective"], "NCCL refuses a group with two ranks on one device"),
    (["learner.gpus_per_worker=1", "rollout.weight_transport=collective", "cluster.placement=disaggregated"],
     "needs the rollout workers on GPUs too"),
    (["learner.gpus_per_worker=1", "rollout.gpus_per_worker=0.5", "cluster.placement=disaggregated"],
     "rollout.gpus_per_worker=0.5"),
    (["learner.gpus_per_worker=1", "rollout.gpus_per_worker=1", "rollout.tensor_parallel_size=2"],
     "rollout.gpus_per_worker=1: a vLLM engine owns whole GPUs"),
    (["learner.gpus_per_worker=1", "rollout.gpus_per_worker=2", "rollout.tensor_parallel_size=2"],
     "cluster.placement=disaggregated"),
    ([*GPU, "algorithm.mode=async"], "rollout.sleep=true frees the engines' GPU memory"),
    (["rollout.sleep=true"], "rollout.sleep=true is vLLM's GPU sleep mode"),
    ([*GPU, "cluster.placement=disaggregated", "rollout.weight_transport=ipc"], "rollout.weight_transport=ipc shares"),
    ([*GPU, "rollout.weight_transport=ipc", "rollout.num_workers=2"], "rollout.num_workers (2) must equal"),
]


@pytest.mark.parametrize("overrides, message", REFUSED)
def test_preflight_refuses_what_cannot_work_on_gpus(overrides, message):
    with pytest.raises(ConfigError) as info:
        check_devices(_cfg(*overrides))
    assert message in str(info.value) and "\n" not in str(info.value)


def test_a_refused_combination_exits_2_with_one_line_before_ray_starts(tmp_path):
    line = assert_user_error(tmp_path, ["train", str(REPO / "configs" / "tiny_grpo.yaml"), *GPU,
                                        "rollout.weight_transport=collective"], "rollout.weight_transport=collective")
    assert "ipc" in line  # the fix is named


# ----------------------------------------------------------------------------- memory


def test_parameter_counts_from_config_json(tmp_path, tiny_model):
    assert count_params(QWEN_05B) == pytest.approx(494e6, rel=0.01)  # Qwen2.5-0.5B: 0.49 B
    assert count_params(QWEN_15B) == pytest.approx(1.54e9, rel=0.01)
    assert count_params(QWEN_7B) == pytest.approx(7.62e9, rel=0.01)
    assert count_params({"hidden_size": 8}) is None
    import torch
    from transformers import AutoModelForCausalLM

    exact = sum(p.numel() for p in AutoModelForCausalLM.from_pretrained(tiny_model).parameters())
    assert model_params(str(tiny_model)) == pytest.approx(exact, rel=0.05)
    assert model_params("tiny-random") is None and torch  # a registry name: a tiny CPU model, not counted


def _sizes(path: Path) -> ModelSizes:
    if "0.5b" in path.name:
        return ModelSizes(count_params(QWEN_05B))
    if "ppo" in path.name:
        return ModelSizes(count_params(QWEN_7B), count_params(QWEN_15B))
    return ModelSizes(count_params(QWEN_7B))


@pytest.mark.parametrize("path", GPU_CONFIGS, ids=lambda p: p.stem)
def test_gpu_configs_fit_their_gpus_and_their_comments_say_how(path):
    cfg = load_config(path, [])
    check_gpu_memory(cfg, _sizes(path))
    first = bundle_needs(cfg, _sizes(path))[0][1]
    assert f"{first:.1f} GB" in path.read_text()  # the comment's total is what preflight computes
    assert cfg.model.dtype == "bfloat16"


def test_memory_that_cannot_fit_is_refused_naming_the_bundle_and_the_fixes():
    ppo = REPO / "configs" / "gpu" / "ppo_7b_8gpu.yaml"
    with pytest.raises(ConfigError, match=r"GPU bundle shared\[0\] needs about .* learner.zero_stage"):
        check_gpu_memory(load_config(ppo, ["learner.zero_stage=1"]), _sizes(ppo))  # unpartitioned gradients
    with pytest.raises(ConfigError, match="rollout.gpu_memory_utilization"):
        check_gpu_memory(load_config(ppo, ["rollout.gpu_memory_utilization=0.7"]), _sizes(ppo))
    check_gpu_memory(load_config(ppo, ["learner.zero_stage=1", "learner.offload=true"]), _sizes(ppo))  # host Adam
    two = REPO / "configs" / "gpu" / "grpo_7b_2node.yaml"
    with pytest.raises(ConfigError, match="leaves no KV cache"):
        check_gpu_memory(load_config(two, ["rollout.gpu_memory_utilization=0.15"]), _sizes(two))
    with pytest.raises(ConfigError, match=r"cluster.gpu_memory_gb=24: GPU bundle learner\[0\] needs about 30.5 GB"):
        check_gpu_memory(load_config(two, ["cluster.gpu_memory_gb=24"]), _sizes(two))  # a 24 GB card
    check_gpu_memory(load_config(two, ["cluster.gpu_memory_gb=24"]), ModelSizes(None))  # size unknown: no check


# ----------------------------------------------------------------------------- configs/gpu


def _check(path: Path, offline: bool) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k not in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE")}
    env["HF_HUB_OFFLINE"] = "1" if offline else "0"  # unset is offline too (common/models.py)
    return subprocess.run([sys.executable, "-m", "tidal.commands.cli", "config", "show", str(path), "--check"],
                          capture_output=True, text=True, timeout=300, env=env, cwd=REPO)


def test_gpu_configs_pass_config_show_check():
    """A hub id passes where hub downloads are allowed (only the download can tell whether it
    exists: the preflight's hub-id rule), and is named in one line where they are off."""
    assert {p.stem for p in GPU_CONFIGS} == {"grpo_0.5b_1gpu", "ppo_7b_8gpu", "grpo_7b_2node"}
    for path in GPU_CONFIGS:
        res = _check(path, offline=False)
        assert res.returncode == 0, res.stderr[-2000:]
        assert "gpus_per_worker: 1.0" in res.stdout and "dtype: bfloat16" in res.stdout
    res = _check(GPU_CONFIGS[0], offline=True)
    assert res.returncode == 2 and len(res.stderr.strip().splitlines()) == 1 and "model.policy=" in res.stderr
