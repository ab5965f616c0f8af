"""The three-stage pipeline (sft -> rm -> rl) on the tiny model, interrupted at a stage
boundary and resumed: finished stages are not redone, the next stage runs all of its steps."""

import pytest

from e2e_support import DATA_DIR, REPO, read_jsonl
from tidal.driver.run_folder import read_run_state
from tidal.driver import rl_stage
from tidal.driver.job import run_pipeline
from tidal.common.config import load_config

pytestmark = [pytest.mark.slow, pytest.mark.ray]


def test_three_stages_feed_each_other_and_resume_at_the_boundary(ray_cluster, tmp_path, monkeypatch):
    cfg = load_config(REPO / "configs" / "tiny_ppo.yaml", [
        f"logging.output_dir={tmp_path}", "logging.run_name=p", f"data.data_dir={DATA_DIR}",
        "logging.wandb_mode=disabled", "logging.progress=false", "stages.run=[sft, rm, rl]",
        "stages.sft.max_steps=4", "stages.rm.max_steps=4", "stages.rm.lr=1e-3", "algorithm.steps=3",
        "reward.terms=[{kind: model}]", "reward.normalize=reference", "logging.eval_samples=8"])
    run_dir = tmp_path / "p"

    def crash(*args, **kwargs):
        raise RuntimeError("driver lost right after the rm stage")

    monkeypatch.setattr(rl_stage, "run_rl", crash)
    with pytest.raises(RuntimeError, match="right after the rm stage"):
        run_pipeline(cfg, run_dir)
    assert set(read_run_state(run_dir)["stages"]) == {"sft", "rm"}
    monkeypatch.undo()

    summary = run_pipeline(cfg, run_dir, resume=True)
    stages = read_run_state(run_dir)["stages"]
    assert stages["sft"]["output"] == str(run_dir / "sft") and stages["rm"]["output"] == str(run_dir / "reward_model")
    records = read_jsonl(run_dir / "metrics.jsonl")
    steps = lambda key: [r["step"] for r in records if key in r]  # noqa: E731
    assert steps("losses/sft") == [1, 2, 3, 4]  # trained once, not again on resume
    assert steps("losses/reward") == [1, 2, 3, 4]
    assert steps("time/step_s") == [1, 2, 3]  # the rl stage ran all of its steps after the boundary
    sft = [r["losses/sft"] for r in records if "losses/sft" in r]
    assert sft[-1] < sft[0]  # SFT learned
    assert any("rm/eval_accuracy" in r for r in records)
    # the SFT model is the reference and initial policy: no KL before RL; the RM scores the samples
    assert summary["before"]["kl"] == pytest.approx(0.0, abs=1e-4)
    assert summary["before"]["rm_score"] is not None and summary["after"]["rm_score"] is not None
    assert all(s["rm_score"] is not None for s in read_jsonl(run_dir / "samples_after.jsonl"))
    # reference normalization was calibrated before step 1 (docs/implementation.md#d6)
    assert any("reward/ref_mean" in r for r in records if r["stage"] == "rl")
    assert (run_dir / "policy" / "config.json").is_file()
