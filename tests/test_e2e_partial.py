"""Partial rollouts on the real engines (rollout.partial; tidal.driver.partial): a tiny async run
whose responses end at uneven lengths, with and without them."""

import pytest

from e2e_support import REPO, read_jsonl, rl_records, tiny_overrides, uneven_model
from tidal.common.config import load_config
from tidal.driver.job import run_pipeline

pytestmark = [pytest.mark.ray]

UNEVEN = ("algorithm.mode=async", "algorithm.max_staleness=1", "rollout.max_new_tokens=32", "rollout.n_samples=2",
          "algorithm.prompts_per_step=8", "learner.mini_batch_size=16", "learner.micro_batch_size=16")
PARTIAL = ("rollout.partial_tokens=8", "rollout.partial_spare=8")


def _run(tmp, name, model, *extra):
    cfg = load_config(REPO / "configs" / "tiny_grpo.yaml", tiny_overrides(tmp, name, f"model.policy={model}",
                                                                           *UNEVEN, *extra))
    run_pipeline(cfg, tmp / name)
    return rl_records(tmp / name), read_jsonl(tmp / name / "rollouts.jsonl")


def test_with_uneven_lengths_a_step_no_longer_waits_for_the_longest_response(ray_cluster, tmp_path):
    """The same seeded run, rollout.partial off and continue: off, every step's generate call runs
    until its longest response ends; continue, a step returns at the slice where its first 8 of 16
    groups are done, the rest go on under the next weights (versions per token reach the batch)."""
    model = uneven_model(tmp_path / "uneven")
    off, _ = _run(tmp_path, "plain", model, "algorithm.steps=4")
    on, rollouts = _run(tmp_path, "sliced", model, "algorithm.steps=4", "rollout.partial=continue", *PARTIAL)
    # off: a step's engine runs as many decode steps as its longest response has tokens
    off_waited = [r["rl/response_len_max"] for r in off]
    # continue: as many as its slices hold
    on_waited = [r["rollout/partial_slices"] * 8 for r in on]
    assert sum(on_waited) < sum(off_waited), (on_waited, off_waited)
    assert sum(r["rollout/partial_carried"] for r in on) > 0  # unfinished responses went on to a later step
    assert sum(r["rollout/partial_mixed"] for r in on) > 0  # ... under the newer weights
    # the per-token versions reach the loss: the learner leaves out the share the driver counts as stale
    assert all(r["experience/stale_tokens"] == pytest.approx(r["rl/tokens_stale"], abs=1e-6) for r in on)
    assert all(r["rl/staleness_max"] <= 2 for r in on)  # a row's newest token lags at most max_staleness + 1
    print("learner wait (s) off", [round(r["time/wait_rollout_s"], 2) for r in off],
          "continue", [round(r["time/wait_rollout_s"], 2) for r in on], "decode steps", off_waited, on_waited)
