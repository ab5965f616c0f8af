"""The config tree: YAML + dotted overrides, validation errors that name the key and the fix."""

import dataclasses
import os
import shutil
import tempfile
from pathlib import Path

import pytest

from tidal.common.config import ConfigError, TidalConfig, describe, load_config, to_yaml

REPO = Path(__file__).resolve().parents[1]
CONFIG_FILES = sorted((REPO / "configs").glob("**/*.y*ml"))


def write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "cfg.yaml"
    path.write_text(text)
    return path


def test_defaults_without_a_file():
    assert load_config() == TidalConfig()


def test_load_from_yaml(tmp_path):
    cfg = load_config(write(tmp_path, """
seed: 7
learner: {lr: 3.0e-6, zero_stage: 3}
algorithm: {name: grpo}
rollout: {n_samples: 4}
reward:
  terms:
    - {kind: sentiment, weight: 0.5}
    - {kind: length, weight: -0.1, target: "20"}
stages: {run: [sft, rm, rl], rm: {loss: ranking}}
"""))
    assert cfg.seed == 7 and cfg.learner.lr == 3e-6 and cfg.learner.zero_stage == 3
    assert cfg.algorithm.name == "grpo" and cfg.rollout.n_samples == 4
    assert [(t.kind, t.weight, t.target) for t in cfg.reward.terms] == [("sentiment", 0.5, None), ("length", -0.1, "20")]
    assert cfg.stages.run == ("sft", "rm", "rl") and cfg.stages.rm.loss == "ranking"
    assert cfg.learner.micro_batch_size == 4  # untouched fields keep their defaults


def test_exponent_floats_without_a_dot(tmp_path):
    # PyYAML (YAML 1.1) reads `1e-5` as a string; the loader must read it as a number.
    cfg = load_config(write(tmp_path, "learner: {lr: 1e-5, critic_lr: 2E+0}\n"), ["algorithm.kl_coef=5e-2"])
    assert cfg.learner.lr == 1e-5 and cfg.learner.critic_lr == 2.0 and cfg.algorithm.kl_coef == 0.05
    assert load_config(None, ["learner.lr=1e-6"]).learner.lr == 1e-6


def test_dotted_overrides_nested_lists_and_null(tmp_path):
    path = write(tmp_path, "model: {reward: some/folder}\nlearner: {lr: 1.0e-5}\n")
    cfg = load_config(path, ["learner.lr=2.5e-6", "stages.rm.loss=ranking", "stages.run=[sft,rm,rl]",
                             "model.reward=null", "data.max_rows=", "logging.progress=false"])
    assert cfg.learner.lr == 2.5e-6
    assert cfg.stages.rm.loss == "ranking" and cfg.stages.run == ("sft", "rm", "rl")
    assert cfg.model.reward is None and cfg.data.max_rows is None and cfg.logging.progress is False


def test_override_into_empty_section(tmp_path):
    # `stages:` with nothing under it reads as null; an override must still reach stages.rm.loss.
    cfg = load_config(write(tmp_path, "stages:\n"), ["stages.rm.loss=ranking"])
    assert cfg.stages.rm.loss == "ranking"


def test_override_later_wins_and_beats_file(tmp_path):
    cfg = load_config(write(tmp_path, "learner: {lr: 1.0e-5}\n"), ["learner.lr=1e-4", "learner.lr=1e-3"])
    assert cfg.learner.lr == 1e-3


@pytest.mark.parametrize("override, key, suggestion", [
    ("lerner.lr=1e-6", "'lerner'", "learner"),
    ("learner.lrr=1e-6", "'learner.lrr'", "learner.lr"),
    ("stages.rm.los=ranking", "'stages.rm.los'", "stages.rm.loss"),
    ("algorithm.kl_coeff=0.1", "'algorithm.kl_coeff'", "algorithm.kl_coef"),
])
def test_unknown_key_names_path_and_closest(override, key, suggestion):
    with pytest.raises(ConfigError) as err:
        load_config(None, [override])
    msg = str(err.value)
    assert f"unknown key {key}" in msg and f"Did you mean '{suggestion}'?" in msg


def test_unknown_key_inside_a_list_entry(tmp_path):
    with pytest.raises(ConfigError, match=r"reward\.terms\[1\]\.wieght.*Did you mean 'reward\.terms\[1\]\.weight'"):
        load_config(write(tmp_path, "reward: {terms: [{kind: sentiment}, {kind: length, wieght: 1}]}\n"))


def test_unknown_key_with_nothing_close_lists_valid_keys():
    with pytest.raises(ConfigError) as err:
        load_config(None, ["learner.zzzzzz=1"])
    assert "Did you mean" not in str(err.value) and "Valid keys here:" in str(err.value) and "mini_batch_size" in str(err.value)


@pytest.mark.parametrize("override, match", [
    ("learner.lr=fast", r"learner\.lr: expected a number, got 'fast'"),
    ("algorithm.steps=2.5", r"algorithm\.steps: expected an integer, got 2\.5"),
    ("algorithm.steps=true", r"algorithm\.steps: expected an integer, got True"),
    ("logging.progress=1", r"logging\.progress: expected true or false, got 1"),
    ("model.policy=[a,b]", r"model\.policy: expected a string"),
    ("stages.run=rl", r"stages\.run: expected a list, got 'rl'"),
    ("learner=3", r"learner: expected a mapping of LearnerConfig fields, got 3"),
])
def test_wrong_type(override, match):
    with pytest.raises(ConfigError, match=match):
        load_config(None, [override])


@pytest.mark.parametrize("override, match", [
    ("learner.zero_stage=4", r"learner\.zero_stage: 4 is out of range; expected a value between 0 and 3"),
    ("learner.lr=-1e-5", r"learner\.lr: -1e-05 is out of range; expected a value >= 0\.0"),
    ("rollout.top_p=1.5", r"rollout\.top_p: 1\.5 is out of range"),
    ("data.max_rows=0", r"data\.max_rows: 0 is out of range"),
])
def test_out_of_range(override, match):
    with pytest.raises(ConfigError, match=match):
        load_config(None, [override])


@pytest.mark.parametrize("override, match", [
    ("algorithm.name=grop", r"algorithm\.name: 'grop' is not one of 'ppo', 'grpo', 'rloo', 'reinforce', 'reinforce_pp', 'dr_grpo', 'gspo', 'cispo', 'expert_iteration'\. Did you mean 'grpo'\?"),
    ("stages.run=[sft,rll]", r"stages\.run\[1\]: 'rll' is not one of 'sft', 'rm', 'rl', 'collect', 'dpo'\. Did you mean 'rl'\?"),
    ("logging.wandb_mode=ofline", r"Did you mean 'offline'\?"),
])
def test_literal_misspelling_suggests(override, match):
    with pytest.raises(ConfigError, match=match):
        load_config(None, [override])


def test_preflight_checks_every_algorithms_minimum_group_size():
    from tidal.driver.preflight import check_algorithm
    from tidal.learner.algorithms import ALGORITHMS

    for algo in ALGORITHMS.values():  # the check reads the algorithm table (the config cannot import it)
        extra = ["algorithm.ei_threshold=0.5"] if algo.selects else []  # a selection that selects
        check_algorithm(load_config(None, [f"algorithm.name={algo.name}", f"rollout.n_samples={algo.min_samples}",
                                           *extra]))
        if algo.min_samples > 1:
            with pytest.raises(ConfigError, match="needs a group"):
                check_algorithm(load_config(None, [f"algorithm.name={algo.name}",
                                                   f"rollout.n_samples={algo.min_samples - 1}"]))


@pytest.mark.parametrize("name", ["grpo", "rloo"])
def test_group_algorithms_need_several_samples(name):
    from tidal.driver.preflight import check_algorithm

    with pytest.raises(ConfigError, match=rf"algorithm\.name={name} needs a group: rollout\.n_samples must be >= 2 \(got 1\)"):
        check_algorithm(load_config(None, [f"algorithm.name={name}"]))
    check_algorithm(load_config(None, [f"algorithm.name={name}", "rollout.n_samples=2"]))


@pytest.mark.parametrize("where", ["file", "override"])
def test_a_renamed_key_names_its_new_name(tmp_path, where):
    path = tmp_path / "old.yaml"
    path.write_text("algorithm:\n  ppo_epochs: 2\n" if where == "file" else "algorithm:\n  steps: 2\n")
    with pytest.raises(ConfigError, match="'algorithm.ppo_epochs' was renamed to 'algorithm.update_epochs'") as e:
        load_config(path, [] if where == "file" else ["algorithm.ppo_epochs=2"])
    assert "algorithm.update_epochs=2" in str(e.value) and "\n" not in str(e.value)
    assert load_config(None, ["algorithm.update_epochs=2"]).algorithm.update_epochs == 2


def test_mini_batch_must_split_into_micro_batches_over_ranks():
    with pytest.raises(ConfigError, match=r"learner\.mini_batch_size \(8\) must be a multiple of .* \(4 x 3\); e\.g\. set learner\.mini_batch_size=12"):
        load_config(None, ["learner.num_workers=3"])
    assert load_config(None, ["learner.num_workers=2"]).learner.num_workers == 2
    with pytest.raises(ConfigError, match="mini_batch_size"):
        load_config(None, ["learner.mini_batch_size=6", "learner.micro_batch_size=4"])


@pytest.mark.parametrize("loss", ["ipo", "ipo_mean"])
def test_dpo_label_smoothing_is_for_the_sigmoid_loss_only(loss):
    with pytest.raises(ConfigError, match=rf"stages\.dpo\.label_smoothing=0\.1 applies to stages\.dpo\.loss=sigmoid only \(got {loss}\)"):
        load_config(None, [f"stages.dpo.loss={loss}", "stages.dpo.label_smoothing=0.1"])
    assert load_config(None, [f"stages.dpo.loss={loss}"]).stages.dpo.loss == loss


def test_custom_data_needs_prompts_for_rl():
    with pytest.raises(ConfigError, match="data.prompts is required"):
        load_config(None, ["data.task=null"])
    assert load_config(None, ["data.task=null", "stages.run=[sft]"]).data.task is None


def test_bad_override_syntax_and_file_errors(tmp_path):
    with pytest.raises(ConfigError, match=r"must look like key\.path=value"):
        load_config(None, ["learner.lr"])
    with pytest.raises(ConfigError, match="learner.lr is not a section"):
        load_config(None, ["learner.lr=1e-5", "learner.lr.x=1"])
    with pytest.raises(ConfigError, match="config file not found"):
        load_config(tmp_path / "missing.yaml")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(write(tmp_path, "learner: {lr: [\n"))
    with pytest.raises(ConfigError, match="top level must be a mapping"):
        load_config(write(tmp_path, "- a\n- b\n"))


def test_frozen():
    cfg = load_config()
    with pytest.raises(dataclasses.FrozenInstanceError):
        cfg.learner.lr = 1.0
    with pytest.raises(dataclasses.FrozenInstanceError):
        cfg.seed = 1


def test_replace_revalidates():
    cfg = load_config()
    with pytest.raises(ConfigError, match="stop_at_kl"):
        dataclasses.replace(cfg, algorithm=dataclasses.replace(cfg.algorithm, early_stop="kl"))


def test_yaml_round_trip(tmp_path):
    cfg = load_config(None, ["learner.lr=1e-6", "stages.run=[sft,rm,rl]", "algorithm.name=rloo", "rollout.n_samples=4",
                             "reward.terms=[{kind: sentiment}, {kind: match, weight: 2, target: exact}]"])
    assert load_config(write(tmp_path, to_yaml(cfg))) == cfg


def test_describe_documents_every_leaf():
    lines = describe()
    keys = [line.split(" = ", 1)[0] for line in lines]
    assert len(keys) == len(set(keys))
    for line in lines:
        assert "  # " in line and line.split("  # ", 1)[1].strip(), f"no documentation: {line}"
    assert {"learner.lr", "stages.rm.loss", "reward.terms", "reward.terms[0].kind", "reward.terms[0].weight"} <= set(keys)
    # one line per leaf of the default tree (list entries under their index)
    leaves = _leaf_keys(TidalConfig)
    assert leaves <= set(keys)


def _leaf_keys(cls, prefix=""):
    import typing

    keys = set()
    for f in dataclasses.fields(cls):
        tp = typing.get_type_hints(cls)[f.name]
        key = f"{prefix}{f.name}"
        keys |= _leaf_keys(tp, key + ".") if dataclasses.is_dataclass(tp) else {key}
    return keys


@pytest.mark.skipif(not CONFIG_FILES, reason="no YAML files under configs/ yet")
@pytest.mark.parametrize("path", CONFIG_FILES, ids=[str(p.relative_to(REPO)) for p in CONFIG_FILES])
def test_every_shipped_config_loads(path):
    assert isinstance(load_config(path), TidalConfig)


def test_describe_shows_resolved_values_and_the_default_they_replace():
    lines = describe(load_config(None, ["learner.lr=1e-6", "reward.terms=[{kind: sentiment}, {kind: length, target: '8'}]"]))
    assert "learner.lr = 1e-06  (default 1e-05)  # Policy learning rate." in lines
    assert any(line.startswith("learner.critic_lr = 1e-05  # ") for line in lines)  # unchanged: no default note
    assert any(line.startswith("reward.terms[1].kind = 'length'") for line in lines)


def test_list_index_overrides_in_both_notations(tmp_path):
    cfg = load_config(None, ["reward.terms.0.weight=0.5", "reward.terms[1].kind=length", "reward.terms[1].target='8'"])
    assert [(t.kind, t.weight, t.target) for t in cfg.reward.terms] == [("model", 0.5, None), ("length", 1.0, "8")]
    path = write(tmp_path, "reward:\n  terms:\n    - {kind: sentiment}\n    - {kind: match, target: exact}\n")
    assert load_config(path, ["reward.terms[1].weight=2"]).reward.terms[1].weight == 2.0
    with pytest.raises(ConfigError, match=r"reward.terms is a list of 2 entries; index it with 0..1"):
        load_config(path, ["reward.terms.5.weight=1"])


def test_empty_yaml_is_an_error(tmp_path):
    with pytest.raises(ConfigError, match="the file is empty"):
        load_config(write(tmp_path, "# only a comment\n"))


def test_duplicate_yaml_key_names_key_and_lines(tmp_path):
    with pytest.raises(ConfigError, match=r"line 4: duplicate key 'lr' \(first at line 2\)"):
        load_config(write(tmp_path, "learner:\n  lr: 1.0e-5\n  zero_stage: 2\n  lr: 2.0e-5\n"))
    with pytest.raises(ConfigError, match="duplicate key 'learner'"):
        load_config(write(tmp_path, "learner: {lr: 1.0e-5}\nlearner: {zero_stage: 1}\n"))


def test_list_index_override_of_a_plain_list_starts_from_its_default():
    assert load_config(None, ["stages.run[1]=rl", "stages.run[0]=sft"]).stages.run == ("sft", "rl")


def test_a_ray_temp_dir_too_long_for_unix_sockets_is_refused():
    assert load_config(None, ["cluster.ray_temp_dir=/tmp/tr-abc"]).cluster.ray_temp_dir == "/tmp/tr-abc"
    with pytest.raises(ConfigError, match=r"cluster\.ray_temp_dir=.* too long for Ray's unix sockets"):
        load_config(None, ["cluster.ray_temp_dir=/tmp/" + "x" * 60])


def test_the_embedded_cluster_moves_to_tmp_when_tmpdir_is_long(tmp_path, monkeypatch):
    from tidal.driver.runtime import _embedded_temp_dir
    from tidal.common.config import RAY_TEMP_DIR_MAX

    long_dir = tmp_path / ("y" * 60)
    long_dir.mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(long_dir))
    made = _embedded_temp_dir()
    try:
        assert made.startswith("/tmp/tidal-ray-") and len(made) <= RAY_TEMP_DIR_MAX
    finally:
        os.rmdir(made)
    short_dir = tempfile.mkdtemp(prefix="t-", dir="/tmp")
    monkeypatch.setattr(tempfile, "tempdir", short_dir)
    made = _embedded_temp_dir()
    assert os.path.dirname(made) == short_dir
    shutil.rmtree(short_dir)
