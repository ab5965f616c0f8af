"""Iterative RLHF on the tiny model: rm -> rl -> collect -> rm -> rl, with the collect round
labeled by people (here: the simulated labeler through the same store API, while the run
waits) - the run stops at the collect stage, resumes once labels are in, and the second reward
model is trained on the first policy's samples."""

from __future__ import annotations

import pytest

from e2e_support import REPO, read_jsonl
from tidal.driver.run_folder import read_run_state
from tidal.driver.collect import WaitingForLabels, gold_judge
from tidal.driver.job import run_pipeline
from tidal.common.config import load_config
from tidal.feedback.simulated import SimulatedLabeler
from tidal.feedback.store import FeedbackStore

pytestmark = [pytest.mark.slow, pytest.mark.ray]


def test_two_rounds_wait_for_labels_resume_and_refresh_the_reward_model(ray_cluster, tmp_path):
    from e2e_support import tiny_overrides

    overrides = [o for o in tiny_overrides(tmp_path, "loop") if not o.startswith("reward.terms")] + [
        "stages.run=[rm,rl,collect,rm,rl]", "reward.terms=[{kind: model}]", "stages.rm.max_steps=4",
        "algorithm.steps=2", "algorithm.prompts_per_step=8", "logging.eval_samples=4",
        "feedback.labeler=human", "feedback.prompts=6", "feedback.responses=3", "feedback.min_labels=6"]
    cfg = load_config(REPO / "configs" / "tiny_ppo.yaml", overrides)
    run_dir = tmp_path / "loop"
    with pytest.raises(WaitingForLabels, match="tidal label serve"):
        run_pipeline(cfg, run_dir)
    assert set(read_run_state(run_dir)["stages"]) == {"rm", "rl"}  # stopped at the collect stage
    store = FeedbackStore(run_dir / "feedback-1")
    tasks = store.tasks().values()
    assert len(tasks) == 6 and all(r.source == f"collect:{run_dir / 'policy'}" for t in tasks for r in t.responses)
    SimulatedLabeler(gold_judge(cfg), temperature=0.1, seed=0).label(store)  # the people, meanwhile

    summary = run_pipeline(cfg, run_dir, resume=True)
    stages = read_run_state(run_dir)["stages"]
    assert list(stages) == ["rm", "rl", "collect", "rm2", "rl2"]
    assert stages["collect"]["labels"] == 6 and stages["rm2"]["output"].endswith("reward_model-2")
    records = read_jsonl(run_dir / "metrics.jsonl")
    rm2 = [r for r in records if r["stage"] == "rm2" and "rm/new_labels" in r]
    new_pairs = read_jsonl(run_dir / "feedback-1" / "comparisons.jsonl")  # C(3, 2) per task, equal samples dropped
    assert 0 < len(new_pairs) <= 6 * 3 and rm2 and rm2[-1]["rm/new_labels"] == len(new_pairs)
    for probe in ("empty", "punctuation", "emoticons", "plain"):  # what the refreshed model makes of exploits
        assert {f"rm/exploit_before/{probe}", f"rm/exploit_after/{probe}"} <= set(rm2[-1])
    assert [r["step"] for r in records if r["stage"] == "rl2" and "rl/kl" in r] == [1, 2]
    assert (run_dir / "round-2" / "policy" / "config.json").is_file()
    assert set(summary["rounds"]) == {"rl", "rl2"}
