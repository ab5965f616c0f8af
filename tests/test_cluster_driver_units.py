"""Fast unit tests of the driver's pure parts: placement bundles, atomic checkpoints."""

import json
import random
import subprocess
import sys

import numpy as np
import pytest
import torch

from tidal.driver import checkpoint as ck
from tidal.driver import run_folder
from tidal.actors.placement import NODE_RESOURCE_SLIVER, plan_placement, role_counts
from tidal.common.config import load_config


# ----------------------------------------------------------------------------- placement


def _cfg(*overrides):
    return load_config(None, list(overrides))


def test_colocated_shares_one_group_and_sizes_bundles_by_what_lands_there():
    cfg = _cfg("learner.num_workers=2", "learner.mini_batch_size=8", "rollout.num_workers=3",
               "rollout.cpus_per_worker=0.5", "learner.cpus_per_worker=1")
    counts = role_counts(cfg, reference=True, reward_model=False)
    plan = plan_placement(cfg, counts)
    assert list(plan.groups) == ["shared"]
    bundles = plan.groups["shared"]
    assert len(bundles) == 3  # max(learners, rollout workers)
    # bundle 0: learner 0, reference, rollout 0; bundle 1: learner 1, rollout 1; bundle 2: rollout 2
    assert [b["CPU"] for b in bundles] == [2.5, 1.5, 0.5]
    assert [s.bundle_index for s in plan.slots["rollout"]] == [0, 1, 2]
    assert [s.bundle_index for s in plan.slots["learner"]] == [0, 1]
    assert plan.total_cpus == pytest.approx(2 * 1 + 1 + 3 * 0.5)
    assert "reward" not in plan.slots


def test_colocated_gpus_are_time_sliced_within_a_bundle():
    cfg = _cfg("learner.gpus_per_worker=1", "rollout.gpus_per_worker=1")
    plan = plan_placement(cfg, role_counts(cfg, reference=False, reward_model=False))
    (bundle,) = plan.groups["shared"]
    assert bundle["GPU"] == 1.0
    assert plan.slots["learner"][0].num_gpus == 0.5 and plan.slots["rollout"][0].num_gpus == 0.5


def test_disaggregated_gives_each_rollout_worker_its_own_group_on_rollout_nodes():
    cfg = _cfg("cluster.placement=disaggregated", "rollout.num_workers=2", "learner.num_workers=2",
               "learner.mini_batch_size=8", "cluster.rollout_node_resource=rollout_node",
               "cluster.learner_node_resource=learner_node", "rollout.gpus_per_worker=1")
    plan = plan_placement(cfg, role_counts(cfg, reference=True, reward_model=True))
    assert set(plan.groups) == {"learner", "rollout-0", "rollout-1"}
    for b in plan.groups["learner"]:
        assert b["learner_node"] == NODE_RESOURCE_SLIVER and "rollout_node" not in b and "GPU" not in b
    for i in range(2):
        (b,) = plan.groups[f"rollout-{i}"]
        assert b == {"CPU": 1.0, "GPU": 1.0, "rollout_node": NODE_RESOURCE_SLIVER}
        assert plan.slots["rollout"][i].group == f"rollout-{i}"
    # the learner group holds the learner ranks, reference and reward model, none of the rollout
    assert sum(b["CPU"] for b in plan.groups["learner"]) == 2 + 1 + 1
    assert plan.rollout_bundle == {"CPU": 1.0, "GPU": 1.0, "rollout_node": NODE_RESOURCE_SLIVER}


def test_plan_rejects_unknown_roles():
    with pytest.raises(ValueError, match="unknown roles"):
        plan_placement(_cfg(), {"learner": 1, "critics": 1})


# ----------------------------------------------------------------------------- checkpoints


def _writer(payload):
    def write(d):
        (d / "payload.json").write_text(json.dumps(payload))
    return write


def test_checkpoint_publishes_atomically_and_keeps_previous(tmp_path):
    ck.write_checkpoint(tmp_path, 2, _writer({"s": 2}), keep=2)
    ck.write_checkpoint(tmp_path, 4, _writer({"s": 4}), keep=2)
    latest = ck.latest_checkpoint(tmp_path)
    assert latest.name == "step-000004" and json.loads((latest / "payload.json").read_text()) == {"s": 4}
    ck.write_checkpoint(tmp_path, 6, _writer({"s": 6}), keep=2)
    names = sorted(p.name for p in (tmp_path / "checkpoints").iterdir())
    assert names == ["latest", "step-000004", "step-000006"]


def test_crash_while_writing_leaves_previous_checkpoint_in_use(tmp_path):
    ck.write_checkpoint(tmp_path, 2, _writer({"s": 2}))

    def crashing(d):
        (d / "payload.json").write_text("{half")
        raise RuntimeError("killed mid-write")

    with pytest.raises(RuntimeError):
        ck.write_checkpoint(tmp_path, 4, crashing)
    latest = ck.latest_checkpoint(tmp_path)
    assert latest.name == "step-000002"
    assert json.loads((latest / "payload.json").read_text()) == {"s": 2}
    # the half-written directory is not mistaken for a checkpoint, and the next write cleans it
    ck.write_checkpoint(tmp_path, 4, _writer({"s": 4}))
    assert ck.latest_checkpoint(tmp_path).name == "step-000004"
    assert not list((tmp_path / "checkpoints").glob(".tmp-*"))


def test_sigkill_during_checkpoint_write_never_corrupts(tmp_path):
    """A real process killed with SIGKILL in the middle of writing a large checkpoint."""
    ck.write_checkpoint(tmp_path, 1, _writer({"s": 1}))
    code = f"""
import sys, time
from pathlib import Path
from tidal.driver import checkpoint as ck
from tidal.driver import run_folder
def write(d):
    (d / 'payload.json').write_text('{{"s": 2}}')
    (d / 'big.bin').write_bytes(b'x' * 1000)
    print('writing', flush=True)
    time.sleep(60)
ck.write_checkpoint({str(tmp_path)!r}, 2, write)
"""
    proc = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True)
    assert proc.stdout.readline().strip() == "writing"
    proc.kill()
    proc.wait()
    latest = ck.latest_checkpoint(tmp_path)
    assert latest.name == "step-000001"
    assert json.loads((latest / "payload.json").read_text()) == {"s": 1}


def test_stale_latest_pointer_falls_back_to_newest_complete(tmp_path):
    ck.write_checkpoint(tmp_path, 3, _writer({}))
    (tmp_path / "checkpoints" / "latest").write_text("step-000009")  # points at nothing
    assert ck.latest_checkpoint(tmp_path).name == "step-000003"
    assert ck.latest_checkpoint(tmp_path / "nope") is None


def test_rewriting_the_same_step_replaces_it(tmp_path):
    ck.write_checkpoint(tmp_path, 5, _writer({"v": 1}))
    ck.write_checkpoint(tmp_path, 5, _writer({"v": 2}))
    assert json.loads((ck.latest_checkpoint(tmp_path) / "payload.json").read_text()) == {"v": 2}


def test_driver_state_round_trip_restores_rng(tmp_path):
    random.seed(1), np.random.seed(1), torch.manual_seed(1)
    state = ck.DriverState(step=7, weight_version=7, kl_controller={"value": 0.1},
                           reward_state={"mean": 0.5}, data_state={"epoch": 1, "position": 3})
    state.save(tmp_path)
    expected = (random.random(), np.random.rand(), torch.rand(1).item())
    random.seed(9), np.random.seed(9), torch.manual_seed(9)
    loaded = ck.DriverState.load(tmp_path)
    assert loaded == state
    assert (random.random(), np.random.rand(), torch.rand(1).item()) == expected


def test_run_state_records_finished_stages(tmp_path):
    assert run_folder.read_run_state(tmp_path) == {"stages": {}}
    run_folder.mark_stage_done(tmp_path, "sft", {"output": "x"})
    run_folder.mark_stage_done(tmp_path, "rm", {"output": "y"})
    assert run_folder.read_run_state(tmp_path)["stages"] == {"sft": {"output": "x"}, "rm": {"output": "y"}}


def test_truncate_jsonl_drops_records_after_the_checkpoint_and_torn_lines(tmp_path):
    path = tmp_path / "m.jsonl"
    path.write_text('{"stage": "rl", "step": 1}\n{"stage": "rl", "step": 2}\n{"stage": "rl", "step": 3}\n{"stage": "r')
    removed = ck.truncate_jsonl(path, lambda r: r["step"] <= 2)
    assert removed == 2
    assert [json.loads(x)["step"] for x in path.read_text().splitlines()] == [1, 2]
    assert ck.truncate_jsonl(tmp_path / "missing.jsonl", lambda r: True) == 0


def test_resume_forgets_unfinished_stages_and_steps_after_the_checkpoint(tmp_path):
    from tidal.driver.job import _forget_unfinished

    lines = [{"stage": "sft", "step": 1}, {"stage": "rm", "step": 1}, {"stage": "rl", "step": 0},
             {"stage": "rl", "step": 1}, {"stage": "rl", "step": 2}, {"stage": "rl", "step": 3}]
    (tmp_path / "metrics.jsonl").write_text("".join(json.dumps(x) + "\n" for x in lines))
    (tmp_path / "rollouts.jsonl").write_text("".join(json.dumps({"step": s}) + "\n" for s in (1, 2, 3)))
    run_folder.mark_stage_done(tmp_path, "sft", {"output": "s"})  # rm was interrupted
    ck.write_checkpoint(tmp_path, 2, _writer({}))
    _forget_unfinished(_cfg("stages.run=[sft,rm,rl]"), tmp_path)
    kept = [json.loads(x) for x in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [(r["stage"], r["step"]) for r in kept] == [("sft", 1), ("rl", 0), ("rl", 1), ("rl", 2)]
    assert [json.loads(x)["step"] for x in (tmp_path / "rollouts.jsonl").read_text().splitlines()] == [1, 2]


def test_summary_table_lists_before_and_after(tmp_path):
    from tidal.driver.job import format_summary

    text = format_summary({"before": {"rm_score": -1.0, "vader": 0.1, "kl": 0.0},
                           "after": {"rm_score": 0.5, "vader": 0.4, "kl": 2.0}, "wall_time_s": 12.0}, tmp_path)
    assert "reward-model score" in text and "-1.000" in text and "0.500" in text and "VADER" in text


# ----------------------------------------------------------------------------- RL loop settings


@pytest.mark.parametrize("overrides, correction", [
    ([], None),  # sync, full softmax: engine and trainer sample the same distribution
    (["algorithm.mode=async"], ("tis", 2.0)),  # off-policy samples
    (["rollout.top_p=0.9"], ("tis", 2.0)),  # truncated distribution: engine logprobs are the filtered ones
    (["rollout.top_k=20", "algorithm.mismatch_threshold=3"], ("tis", 3.0)),
    (["algorithm.mismatch_correction=icepop"], ("icepop", 2.0)),  # chosen: in sync mode too
    (["algorithm.mode=async", "algorithm.mismatch_correction=seq_mask", "algorithm.mismatch_threshold=1.5"],
     ("seq_mask", 1.5)),
    (["algorithm.mode=async", "algorithm.mismatch_correction=none"], None),
])
def test_mismatch_corrections_apply_as_configured(tmp_path, overrides, correction):
    from tidal.driver.rl_loop import RLLoop

    loop = RLLoop(_cfg(*overrides), tmp_path, parts=None, logger=None)
    got = loop.correction and (loop.correction.kind, loop.correction.threshold)
    assert got == correction


def test_ptx_rows_are_a_function_of_the_step():
    from tidal.learner.sft import PtxSource, SFTBatch

    batch = SFTBatch(torch.arange(10)[:, None].repeat(1, 3), torch.ones(10, 3, dtype=torch.long), torch.ones(10, 2))
    src = PtxSource(batch, seed=0)
    assert torch.equal(src.for_step(3, 4).input_ids, PtxSource(batch, seed=0).for_step(3, 4).input_ids)
    assert not torch.equal(src.for_step(3, 10).input_ids, src.for_step(4, 10).input_ids)
    assert len(src.for_step(0, 25)) == 25 and sorted(src.for_step(0, 10).input_ids[:, 0].tolist()) == list(range(10))
    with pytest.raises(Exception, match="ptx_coef > 0 needs PPO-ptx data"):
        _cfg("algorithm.ptx_coef=0.1", "data.task=null", "data.prompts=p.jsonl")


def test_supervised_fit_progress_shows_a_real_rate(tmp_path):
    import io

    from tidal.driver.fit_stages import _FitProgress
    from tidal.common.config import LoggingConfig
    from tidal.common.metrics import MetricsLogger

    times = iter([0.0, 10.0, 20.0, 30.0])
    out = io.StringIO()
    logger = MetricsLogger(tmp_path, LoggingConfig(wandb_mode="disabled"), stream=out, clock=lambda: next(times))
    progress = _FitProgress(logger, "sft")
    history: list[dict] = []
    progress(history, 16)  # before the first window: the bar starts its clock here
    history += [{"losses/sft": 2.0, "step": float(i + 1)} for i in range(8)]
    progress(history, 16)
    history += [{"losses/sft": 1.0, "step": float(i + 9)} for i in range(8)]
    progress(history, 16)
    logger.close()
    lines = out.getvalue().splitlines()
    assert "8/16" in lines[1] and "1.2 s/step" in lines[1] and "? s/step" not in lines[1], lines
    assert "16/16" in lines[2] and "loss=1" in lines[2]
    records = [json.loads(x) for x in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records] == list(range(1, 17)) and all(r["stage"] == "sft" for r in records)


def test_stage_keys_number_repeated_stages_as_rounds():
    from tidal.driver.run_folder import stage_keys

    assert stage_keys(("sft", "rm", "rl", "collect", "rm", "rl")) == [
        ("sft", "sft", 1), ("rm", "rm", 1), ("rl", "rl", 1), ("collect", "collect", 1), ("rm", "rm2", 2), ("rl", "rl2", 2)]


def test_final_table_shows_each_rl_round(tmp_path):
    from tidal.driver.job import format_summary

    r1 = {"before": {"rm_score": -0.2, "vader": 0.05}, "after": {"rm_score": 0.6, "vader": 0.1, "kl": 3.0}}
    r2 = {"before": {"rm_score": -0.1, "vader": 0.1}, "after": {"rm_score": 0.3, "vader": 0.2, "kl": 4.0}}
    text = format_summary({**r2, "rounds": {"rl": r1, "rl2": r2}}, tmp_path)
    assert "rl round" in text and "rl2" in text and "0.600" in text and "0.200" in text


# ----------------------------------------------------------------------------- data folders


def _files(folder):
    return {p.name: p.read_bytes() for p in sorted(folder.iterdir())}


def test_prepare_data_writes_the_task_only_into_an_empty_folder_and_fills_only_missing_files(tmp_path):
    from tidal.driver.job import prepare_data

    folder = tmp_path / "task"
    cfg = load_config(None, [f"data.data_dir={folder}", "data.max_rows=5"])
    data = prepare_data(cfg)  # missing folder: written, with tidal's marker
    assert data.prompts == folder / "prompts_train.jsonl" and (folder / "task.json").is_file()
    (folder / "prompts_train.jsonl").write_text('{"prompt": "edited"}\n')  # the user edits one file ...
    (folder / "rankings_train.jsonl").unlink()  # ... and deletes another
    prepare_data(cfg)
    assert (folder / "prompts_train.jsonl").read_text() == '{"prompt": "edited"}\n'  # kept
    assert len((folder / "rankings_train.jsonl").read_text().splitlines()) == 5  # only the missing one filled


def test_prepare_data_uses_a_folder_without_marker_as_it_is(tmp_path):
    from tidal.driver.job import prepare_data
    from tidal.driver.preflight import PreflightError, check_data

    folder = tmp_path / "mine"  # e.g. made by `tidal data sentiment` and edited by hand
    folder.mkdir()
    (folder / "prompts_train.jsonl").write_text('{"prompt": "one row"}\n')
    before = _files(folder)
    cfg = load_config(None, [f"data.data_dir={folder}"])
    data = prepare_data(cfg)
    assert _files(folder) == before and data.prompts == folder / "prompts_train.jsonl" and data.demonstrations is None
    check_data(load_config(None, [f"data.data_dir={folder}", "algorithm.prompts_per_step=1"]), data)  # rl only: its prompts are there
    sft = load_config(None, [f"data.data_dir={folder}", "stages.run=[sft,rl]"])
    with pytest.raises(PreflightError, match="no demonstrations file of the task.*data.demonstrations=FILE"):
        check_data(sft, prepare_data(sft))
    assert _files(folder) == before


def test_resume_accepts_steps_and_logging_overrides_only(tmp_path):
    from tidal.commands.train import resume_config
    from tidal.common.config import ConfigError, to_yaml

    (tmp_path / "config.yaml").write_text(to_yaml(load_config(None, ["algorithm.steps=4"])))
    cfg = resume_config(tmp_path, ["algorithm.steps=8", "logging.checkpoint_every=2"])
    assert cfg.algorithm.steps == 8 and cfg.logging.checkpoint_every == 2
    with pytest.raises(ConfigError, match="reward.terms.*cannot change on resume"):
        resume_config(tmp_path, ["reward.terms[0].weight=2"])


def test_preflight_wants_a_reward_model_for_a_model_term():
    from tidal.driver.preflight import PreflightError, check_rewards

    with pytest.raises(PreflightError, match=r"reward.terms\[0\] \(kind model\): no reward model"):
        check_rewards(load_config(None, ["stages.run=[rl]"]))
    check_rewards(load_config(None, ["stages.run=[rm,rl]"]))  # the rm stage provides it
