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
    assert len({r["rollout/push_mb"] for r in off + on}) == 1 and off[0]["rollout/push_mb"] > 0  # the whole model, each push
    print("learner wait (s) off", [round(r["time/wait_rollout_s"], 2) for r in off],
          "continue", [round(r["time/wait_rollout_s"], 2) for r in on], "decode steps", off_waited, on_waited)


@pytest.mark.slow
@pytest.mark.parametrize("mode", ["continue", "abort"])
def test_partial_rollouts_learn_and_a_worker_killed_at_a_weight_load_loses_no_prompt(ray_cluster, tmp_path,
                                                                                     monkeypatch, mode):
    """Slow (two 10-step RL runs on two rollout workers, ~1.5 min each): whether each mode learns
    the tiny task needs the steps. One rollout worker is SIGKILLed as a push starts (3rd or later),
    while responses are paused in flight: the pool restarts it with the new weights, and every prompt
    taken from the data is trained exactly once or still in flight at the end."""
    import os
    import signal
    import torch

    from tidal.common.models import resolve_model
    from tidal.common.prompts import PromptDataset
    from tidal.driver import rl_loop
    from tidal.driver.job import prepare_data

    killed = []
    real_push = rl_loop.RLLoop._push

    def push_after_a_kill(self, handle, version):
        # on the rollout thread: no slice runs now; the first push from the 3rd on with responses paused
        paused = sum(bool(s.tokens) and not s.finish for g in self.partial.groups for s in g.seqs)
        if version >= 3 and paused and not killed:
            killed.append((self.parts.pool.worker_infos()[0].pid, version, paused))
            os.kill(killed[0][0], signal.SIGKILL)
        return real_push(self, handle, version)

    monkeypatch.setattr(rl_loop.RLLoop, "_push", push_after_a_kill)
    model = uneven_model(tmp_path / "uneven", stop_every=8)
    cfg = load_config(REPO / "configs" / "tiny_grpo.yaml", tiny_overrides(
        tmp_path, mode, f"model.policy={model}", "algorithm.mode=async", "algorithm.steps=10",
        "rollout.num_workers=2", "rollout.max_new_tokens=32", f"rollout.partial={mode}", "rollout.partial_tokens=8",
        "rollout.partial_spare=4"))
    summary = run_pipeline(cfg, tmp_path / mode)
    recs = rl_records(tmp_path / mode)
    assert killed and killed[0][1] < cfg.algorithm.steps  # the pool restarts it with the new weights
    # learned: the held-out samples' reward (the trained rows' is biased towards the responses that end first)
    before, after = summary["before"]["reward"], summary["after"]["reward"]
    assert after > before + 0.1, (before, after)
    mixed = sum(r["rollout/partial_mixed"] for r in recs)
    assert mixed > 0 if mode == "continue" else mixed == 0  # abort: every response of one version
    # no prompt lost or trained twice: the trained groups and those in flight are the data's first prompts
    trained = [i for rec in read_jsonl(tmp_path / mode / "rollouts.jsonl") for i in rec["prompt_index"][::4]]
    ckpt = tmp_path / mode / "checkpoints" / (tmp_path / mode / "checkpoints" / "latest").read_text().strip()
    in_flight = [g["index"] for g in torch.load(ckpt / "partial.pt", weights_only=False)["groups"]]
    ds = PromptDataset.from_config(prepare_data(cfg).prompts, resolve_model(cfg.model.policy), cfg.data, seed=cfg.seed)
    assert sorted(trained + in_flight) == sorted(ds.next_batch(len(trained) + len(in_flight)).index)
    assert len(trained) == 10 * cfg.algorithm.prompts_per_step
