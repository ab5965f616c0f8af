"""LoRA that pays, on a real DeepSpeed rank in-process: the reference is the policy's own base with
the adapters off (no reference worker, the same log-probs as a separate reference copy), the push
carries adapter matrices only, the target modules are configurable, and the adapter exported on its
own loads with peft on the base in plain transformers."""

from __future__ import annotations

import pytest
import torch
from transformers import AutoModelForCausalLM

from tidal.common.config import load_config
from tidal.common.data import DemonstrationRecord
from tidal.common.lora import ADAPTER_CONFIG, ADAPTER_FILE, is_adapter_name, merged_weights, spec_from_config
from tidal.common.models import sequence_logprobs
from tidal.learner.group import LearnerGroup
from tidal.learner.reference import ReferenceWorker
from tidal.learner.sft import build_sft_batch

BASE = ["learner.num_workers=1", "learner.zero_stage=2", "learner.mini_batch_size=4", "learner.micro_batch_size=2",
        "learner.lr=5e-3", "learner.lr_schedule=constant", "learner.lora_rank=4", "learner.lora_alpha=8"]


@pytest.fixture(scope="module", autouse=True)
def _leave_no_process_group():
    yield
    import torch.distributed as dist

    if dist.is_initialized():
        import deepspeed.comm

        deepspeed.comm.destroy_process_group()


def _trained(tiny_model, *overrides, reference=True):
    """A LoRA group whose adapters moved away from zero (B starts at 0: base == policy before)."""
    cfg = load_config(None, BASE + list(overrides))
    g = LearnerGroup(cfg, tiny_model, reference_path=tiny_model if reference else None, local=True)
    demos = build_sft_batch(g.tokenizer, [DemonstrationRecord(f"Say {i}", "It was lovely.") for i in range(8)],
                            32, 16, False)
    g.fit_sft(demos, epochs=2)
    return cfg, g, demos


def test_the_reference_is_the_policys_base_with_the_adapters_off(tiny_model):
    cfg, g, demos = _trained(tiny_model)
    try:
        assert g.reference_in_policy and g.reference is None  # no second model anywhere
        R = demos.response_len
        ours = g.compute_ref_logprobs(demos.input_ids, demos.attention_mask, R, 0.7)
        separate = ReferenceWorker(cfg, str(tiny_model)).compute_logprobs(demos.input_ids, demos.attention_mask, R, 0.7)
        assert torch.allclose(ours, separate, atol=1e-6), (ours - separate).abs().max()
        policy = g.compute_logprobs(demos.input_ids, demos.attention_mask, R, 0.7)
        assert (policy - ours).abs().max() > 1e-2  # the adapters did move the policy: the reference is not it
    finally:
        g.shutdown()


def test_a_reference_other_than_the_base_keeps_its_worker(tiny_model, tmp_path):
    from tidal.learner.lora import uses_own_base

    assert uses_own_base(4, tiny_model, tiny_model)
    assert not uses_own_base(4, tiny_model, tmp_path)  # e.g. a second RL round anchored to the SFT model
    assert not uses_own_base(0, tiny_model, tiny_model)  # full fine-tuning: the policy moves, the reference may not


def test_the_push_carries_adapters_only_and_the_adapter_exports_for_peft(tiny_model, tmp_path):
    cfg, g, demos = _trained(tiny_model)
    try:
        rank = g.ranks.actor(0).obj
        pushed = dict(rank.weights_out.tensors())
        merged = dict(rank.iter_named_weights())
        assert pushed and all(is_adapter_name(k) for k in pushed)
        adapter_bytes = sum(t.numel() * t.element_size() for t in pushed.values())
        full_bytes = sum(t.numel() * t.element_size() for t in merged.values())
        assert adapter_bytes < full_bytes / 10
        # what a merging worker rebuilds from the adapter and its base copy is the learner's merge
        plain = AutoModelForCausalLM.from_pretrained(tiny_model)
        rebuilt = merged_weights(plain.state_dict(), pushed, spec_from_config(cfg).scaling)
        for name, w in rebuilt.items():
            assert torch.allclose(w, merged[name], atol=1e-6), name

        out = g.save_pretrained(tmp_path / "policy")
        adapter_dir = tmp_path / "policy_adapter"
        assert (adapter_dir / ADAPTER_FILE).is_file() and (adapter_dir / ADAPTER_CONFIG).is_file()
        from peft import PeftModel

        peft_model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tiny_model), adapter_dir).eval()
        R = demos.response_len
        with torch.no_grad():
            via_peft = sequence_logprobs(peft_model, demos.input_ids, demos.attention_mask, R)
            via_merged = sequence_logprobs(AutoModelForCausalLM.from_pretrained(out).eval(), demos.input_ids,
                                           demos.attention_mask, R)
        ours = g.compute_logprobs(demos.input_ids, demos.attention_mask, R, 1.0)
        assert torch.allclose(via_peft, ours, atol=1e-4) and torch.allclose(via_merged, ours, atol=1e-4)
    finally:
        g.shutdown()


def test_target_modules_choose_the_adapted_layers(tiny_model):
    g = LearnerGroup(load_config(None, BASE + ["learner.lora_target_modules=[q_proj, v_proj]"]), tiny_model,
                     local=True)
    try:
        adapted = {k.split(".")[-3] for k, _ in g.ranks.actor(0).obj.weights_out.tensors()}
        assert adapted == {"q_proj", "v_proj"}
    finally:
        g.shutdown()


def test_rank_0_publishes_delta_versions_with_rollout_weight_delta(tiny_model, ray_cluster):
    """learner/weights_out.py reads rollout.weight_delta: rank 0 keeps the version chain, so an
    export after no update is a delta of nothing (ignored: a plain full handle, no delta)."""
    from tidal.actors.weight_delta import DeltaReceiver

    cfg, g, _ = _trained(tiny_model, "rollout.weight_delta=buckets")
    try:
        first, second = g.export_weights(1), g.export_weights(2)
        assert first.delta.base_version == -1 and second.delta.base_version == 1
        assert second.delta.delta_bytes() == 0 < second.delta.full_bytes() == first.num_bytes
        rx = DeltaReceiver(keep=True)
        pushed = dict(rx.pull(first, complete=True))
        assert pushed and all(is_adapter_name(k) for k in pushed)  # LoRA: the chain is of adapter buckets
        assert sorted(dict(rx.pull(second, complete=True))) == sorted(pushed) and not rx.last.full
    finally:
        g.shutdown()
