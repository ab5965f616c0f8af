"""`tidal label tasks`: labeling tasks sampled from models through the rollout pool, with each
response's source and weight version, plus reference answers; argument errors exit 2 before Ray."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from tidal.commands.args import LabelTasksArgs
from tidal.commands.label_tasks import plan_sources, tasks_from_cli
from tidal.common.config import ConfigError
from tidal.feedback.store import FeedbackStore

REPO = Path(__file__).resolve().parents[1]


def test_sources_are_checked_and_must_fit_a_task():
    assert plan_sources(["sft", "ppo=runs/a", "references"], 2) == [("sft", None), ("ppo", "runs/a"), ("references", None)]
    with pytest.raises(ConfigError, match="--from 'runs/a'"):
        plan_sources(["runs/a"], 2)
    with pytest.raises(ConfigError, match="used twice"):
        plan_sources(["a=x", "a=y"], 2)
    with pytest.raises(ConfigError, match="1 responses per task"):
        plan_sources(["sft"], 1)
    with pytest.raises(ConfigError, match="10 responses per task"):
        plan_sources(["a=x", "b=y"], 5)
    with pytest.raises(ConfigError, match="at least one --from"):
        plan_sources([], 2)


@pytest.mark.parametrize("args, names", [
    (["--from", "sft", "--responses", "1"], ["1 responses per task", "--responses"]),
    (["--from", "nonsense"], ["--from 'nonsense'", "NAME=RUN_DIR"]),
    (["--from", "ppo=missing-run"], ["--from ppo=missing-run", "neither an HF folder"]),
])
def test_bad_arguments_are_one_line_and_exit_2_before_ray(tmp_path, args, names):
    env = {**os.environ, "TMPDIR": str(tmp_path), "WANDB_MODE": "disabled"}
    res = subprocess.run([sys.executable, "-m", "tidal.commands.cli", "label", "tasks", str(tmp_path / "fb"),
                          str(REPO / "configs" / "tiny_grpo.yaml"), *args], capture_output=True, text=True,
                         timeout=60, env=env, cwd=tmp_path)
    assert res.returncode == 2, res.stderr
    lines = res.stderr.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in res.stderr and all(n in lines[0] for n in names), res.stderr
    assert not (tmp_path / "fb").exists()
    assert not any(p.name.startswith("tidal-ray") for p in tmp_path.iterdir())


@pytest.mark.ray
def test_tasks_from_two_models_and_references_keep_sources_and_append(ray_cluster, tiny_model, tmp_path, capsys):
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text("".join(json.dumps({"prompt": f"Say something about the number {i}.",
                                           "reference": f"The number {i} is fine."}) + "\n" for i in range(5)))
    overrides = [f"data.prompts={prompts}", "data.task=null", "rollout.backend=hf", "stages.run=[sft]",
                 f"logging.output_dir={tmp_path}", "data.demonstrations=null"]
    folder = tmp_path / "fb"
    sources = ["sft", f"other={tiny_model}", "references"]
    config = str(REPO / "configs" / "tiny_grpo.yaml")
    rc = tasks_from_cli(LabelTasksArgs(str(folder), config, tuple(overrides), tuple(sources), prompts=3, responses=2,
                                       sft=str(tiny_model), overlap=0.0))
    assert rc == 0, capsys.readouterr().err
    tasks = list(FeedbackStore(folder).tasks().values())
    assert len(tasks) == 3 and all(len(t.responses) == 5 for t in tasks)
    for t in tasks:
        by_source = [r.source for r in t.responses]
        assert by_source == [f"sft:{tiny_model}"] * 2 + [f"other:{tiny_model}"] * 2 + ["references"]
        assert all(r.version != "" for r in t.responses[:4])  # the weight version that wrote it
        number = t.prompt.rsplit(" ", 1)[-1].rstrip(".")
        assert t.responses[4].text == f"The number {number} is fine."
    assert tasks_from_cli(LabelTasksArgs(str(folder), config, tuple(overrides), ("references", "sft"), prompts=2,
                                         responses=1, sft=str(tiny_model))) == 0
    assert len(FeedbackStore(folder).tasks()) == 5  # the earlier tasks stay
