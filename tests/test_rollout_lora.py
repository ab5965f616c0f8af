"""LoRA pushes into real rollout workers (Ray actors): only adapter matrices travel, and the engine
samples from base + B @ A * alpha / r whether it loads them as a vLLM LoRA adapter or merges them
into its base copy (rollout.lora_load), on vLLM and on the hf backend; a second push replaces the
first (no compounding), and full weights sent to a LoRA worker are refused."""

from __future__ import annotations

import pytest
import torch

from tidal.common.lora import is_adapter_name
from tidal.common.models import load_causal_lm

from test_rollout_vllm import make_pool, make_variant, max_gap, prompts



def _cfg(*overrides):
    from tidal.common.config import load_config

    return load_config(None, ["learner.lora_rank=4", *overrides])


def test_lora_load_decides_what_the_engine_is_built_with():
    from tidal.common.lora import spec_from_config
    from tidal.rollout.worker import engine_options

    def options(*overrides):
        cfg = _cfg(*overrides)
        return engine_options(cfg.rollout, "float32", 0, on_gpu=False, lora=spec_from_config(cfg))

    assert options("rollout.lora_load=adapter")["enable_lora"] and options("rollout.gpus_per_worker=1")["max_lora_rank"] == 8
    assert "enable_lora" not in options("rollout.lora_load=merge")  # merged into the base: a plain engine
    assert "enable_lora" not in options()  # auto on CPU: merged (vLLM's adapter path is slower there)
    assert spec_from_config(_cfg("rollout.gpus_per_worker=1")).load == "adapter"  # auto on GPU
    assert spec_from_config(_cfg("rollout.backend=hf")).load == "merge"
    assert spec_from_config(_cfg("rollout.weight_transport=ipc")).load == "full"  # device-local: the merged model
    assert spec_from_config(_cfg("learner.lora_rank=0")) is None


def test_an_adapter_the_hf_backend_cannot_load_is_refused():
    from tidal.common.config import ConfigError

    with pytest.raises(ConfigError, match="rollout.lora_load=adapter needs rollout.backend=vllm"):
        _cfg("rollout.backend=hf", "rollout.lora_load=adapter")


@pytest.fixture(scope="module")
def sharp_model(tiny_model, tmp_path_factory):
    return make_variant(tiny_model, tmp_path_factory.mktemp("sharp-lora"), tie=True, head_scale=8.0)


def random_adapter(path, seed: int, targets=("q_proj", "v_proj", "down_proj")):
    """(peft-named adapter tensors, the merged HF model they make) for the model at `path`."""
    from peft import LoraConfig, get_peft_model, get_peft_model_state_dict

    model = get_peft_model(load_causal_lm(path), LoraConfig(r=4, lora_alpha=8, target_modules=list(targets)))
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_" in name:
                p.copy_(torch.randn(p.shape, generator=g) * 0.3)
    adapter = get_peft_model_state_dict(model)
    assert adapter and all(is_adapter_name(k) for k in adapter)
    return adapter, model.merge_and_unload().eval()


@pytest.mark.ray
@pytest.mark.parametrize("backend, load", [("vllm", "adapter"), ("vllm", "merge"), ("hf", "merge")])
def test_adapter_pushes_sample_from_the_merged_model(ray_cluster, sharp_model, backend, load):
    pool = make_pool(sharp_model, **{"rollout.backend": backend, "rollout.lora_load": load, "learner.lora_rank": 4,
                                     "learner.lora_alpha": 8, "rollout.max_new_tokens": 8})
    try:
        batch = prompts(sharp_model)
        for version, seed in ((1, 0), (2, 1)):  # the second adapter replaces the first
            adapter, merged = random_adapter(sharp_model, seed)
            pool.load_weights(list(adapter.items()), version)
            out = pool.generate(batch)
            assert set(out.weight_version) == {version}
            assert max_gap(merged, out, 1.0) < 2e-3
        base = load_causal_lm(sharp_model).eval()
        assert max_gap(base, out, 1.0) > 5e-2  # the adapter really changed the sampling distribution
        with pytest.raises(Exception, match="adapter matrices only"):
            pool.load_weights(list(base.state_dict().items()), 3)
    finally:
        pool.shutdown()
