"""Preflight: everything `tidal train` can check without a cluster, checked before Ray starts.

A user mistake found after Ray, vLLM and the learners are up costs a minute and arrives as a
traceback; found here it costs a second and arrives as one line naming the file, row, field or
key and the fix (`PreflightError`, a `ConfigError`, so the CLI prints it and exits 2). Checked:

  data     every file the configured stages read, every row against its schema
  models   model.policy / model.reward / model.critic / stages.rm.base / model reward terms:
           a registry name, a folder with config.json (and a tokenizer where one is loaded), or
           a hub id already in the Hugging Face cache (runs are offline; HF_HUB_OFFLINE=0 lets
           tidal download it instead)
  rewards  `kind: function` terms import and accept (prompts, completions, **meta)
  algorithm  what the algorithm table's entry cannot run (group sizes, expert iteration's
           selection) and where pi_old may not come from (tidal.learner.algorithms /
           tidal.learner.pi_old check_config: they read the table, which the config cannot import)
  devices  the device plan's combinations that cannot work (fractional GPUs for DeepSpeed ranks,
           NCCL between two actors on one GPU, tensor parallel without its GPUs, sleep mode in
           async mode, ...) and whether each GPU holds its share before activations
           (tidal.actors.devices, tidal.actors.gpu_memory; model sizes from config.json)
  settings, model files, cluster size: tidal.driver.checks (empty stages.run, sampling
           settings, token budgets, rule targets, weights and tokenizers of model folders, the
           embedded cluster's cluster.num_cpus)
  resume   the checkpoint a resume loads has readable files: an unreadable newest one (a
           truncated torch/safetensors file, bad JSON, a missing file) is named in a warning and
           the one before it is used; when none reads back, that is the error

Each check returns what it checked, one line each (`tidal config show --check` prints them).
Nothing here writes; the built-in task folder is judged by `task_folder_state` (see
`tidal.driver.job.prepare_data`, which is the one place that writes task files).
"""

from __future__ import annotations

import inspect
import json
from dataclasses import dataclass
from pathlib import Path

from tidal.common.config import ConfigError, TidalConfig

TASK_MARKER = "task.json"
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model", "vocab.json")


class PreflightError(ConfigError):
    """A user input that would fail the run later; the message names it and the fix."""

    kind = "preflight"


@dataclass(frozen=True)
class DataPaths:
    prompts: Path | None
    eval_prompts: Path | None
    demonstrations: Path | None
    comparisons: Path | None
    comparisons_heldout: Path | None
    rankings: Path | None
    rankings_heldout: Path | None
    ptx: Path | None = None  # PPO-ptx demonstrations (algorithm.ptx_coef > 0)


def task_marker(cfg: TidalConfig) -> dict:
    return {"task": cfg.data.task, "seed": 0, "max_rows": cfg.data.max_rows}


def task_folder_state(cfg: TidalConfig) -> str:
    """What data.data_dir is for the built-in task: 'none' (no task), 'generate' (missing or
    empty: tidal writes it), 'owned' (tidal's marker: missing files are filled in, existing ones
    kept), 'user' (files without the marker: used exactly as they are, never written)."""
    if cfg.data.task is None:
        return "none"
    folder = Path(cfg.data.data_dir)
    if not folder.is_dir() or not any(folder.iterdir()):
        return "generate"
    marker = folder / TASK_MARKER
    if not marker.is_file():
        return "user"
    try:
        found = json.loads(marker.read_text())
    except ValueError:
        found = None
    if found != task_marker(cfg):
        raise PreflightError(f"data.data_dir={folder} holds the task built with {marker.read_text().strip()}, not "
                             f"{task_marker(cfg)}; point data.data_dir at another folder for this data.max_rows.")
    return "owned"


def data_paths(cfg: TidalConfig) -> DataPaths:
    """Every dataset path of the config: data.* files as given, the task's files where they exist."""
    task: dict[str, Path] = {}
    if cfg.data.task == "sentiment":
        from tidal.common.sentiment import sentiment_paths

        task = {k: p for k, p in sentiment_paths(cfg.data.data_dir).items() if p.is_file()}
    d = cfg.data

    def pick(explicit: str | None, name: str) -> Path | None:
        return Path(explicit) if explicit is not None else task.get(name)

    return DataPaths(pick(d.prompts, "prompts_train"), pick(d.eval_prompts, "prompts_heldout"),
                     pick(d.demonstrations, "demonstrations_train"), pick(d.comparisons, "comparisons_train"),
                     task.get("comparisons_heldout"), pick(d.rankings, "rankings_train"), task.get("rankings_heldout"),
                     pick(d.ptx or d.demonstrations, "demonstrations_train") if cfg.algorithm.ptx_coef > 0 else None)


def _stage_files(cfg: TidalConfig, data: DataPaths) -> list[tuple[str, str, str, Path | None, bool]]:
    """(stage, config key, record kind, path, required) of each file the configured stages read."""
    out = []
    if "sft" in cfg.stages.run:
        out.append(("sft", "data.demonstrations", "demonstrations", data.demonstrations, True))
    if "rl" in cfg.stages.run and cfg.algorithm.ptx_coef > 0:
        out.append(("rl", "data.ptx", "demonstrations", data.ptx, True))
    if "rm" in cfg.stages.run:
        kind = "comparisons" if cfg.stages.rm.loss == "pairwise" else "rankings"
        out.append(("rm", f"data.{kind}", kind, getattr(data, kind), True))
        out.append(("rm", f"data.data_dir ({kind}_heldout)", kind, getattr(data, f"{kind}_heldout"), False))
    if "rl" in cfg.stages.run:
        out.append(("rl", "data.prompts", "prompts", data.prompts, True))
        out.append(("rl", "data.eval_prompts", "prompts", data.eval_prompts, False))
    return out


def check_data(cfg: TidalConfig, data: DataPaths | None = None) -> list[str]:
    """Every row of every file the stages read. Task files still to be generated are skipped.
    Returns one line per file: what was read, or that the built-in task will write it."""
    from tidal.common.data import DataError, iter_records

    state = task_folder_state(cfg)
    data = data or data_paths(cfg)
    checked = []
    for stage, key, kind, path, required in _stage_files(cfg, data):
        if path is None:
            if required and state not in ("generate", "owned"):  # those two get the file written
                where = (f"data.data_dir={cfg.data.data_dir} has no {kind} file of the task (it holds files tidal did not "
                         f"write, so it is used as is)" if state == "user" else f"{key} is not set")
                raise PreflightError(f"{where}; the {stage} stage input is missing: set {key}=FILE, "
                                     f"or point data.data_dir at an empty folder to have the built-in task written there.")
            if state in ("generate", "owned"):
                checked.append(f"{key}: the built-in {cfg.data.task} task writes it into {cfg.data.data_dir} ({stage})")
            continue
        if not path.is_file():
            raise PreflightError(f"{key}={path}: no such file (check the data.* paths).")
        try:
            count = sum(1 for _ in iter_records(path, kind))
        except DataError as e:
            raise PreflightError(f"{key}: {path.parent}/{e}") from None  # DataError names the file only
        if count == 0 and required:
            raise PreflightError(f"{key}={path}: no rows; the stage needs at least one {kind} row.")
        if key == "data.prompts" and count < cfg.algorithm.prompts_per_step:  # a step's prompts are distinct rows
            raise PreflightError(f"{key}={path}: {count} row{'' if count == 1 else 's'}, fewer than the algorithm.prompts_per_step="
                                 f"{cfg.algorithm.prompts_per_step} distinct prompts an rl step takes; add rows or set "
                                 f"algorithm.prompts_per_step <= {count}.")
        if key == "data.eval_prompts" and cfg.logging.gold_every > 0:  # reporting + selection prompts fit
            from tidal.driver.heldout import split_rows

            split_rows(cfg, count, f"{key}={path}", selection=True)
        checked.append(f"{key}: {path}, {count} rows of {kind} ({stage})")
    return checked


def check_model(key: str, name: str, tokenizer: bool = True) -> str:
    """A registry name (not built here: that can take a minute), a local HF folder, or a hub id
    in the Hugging Face cache (or one tidal may download: HF_HUB_OFFLINE=0). Returns what it is."""
    from tidal.common import model_builds
    from tidal.common.models import REGISTRY_NAMES, hub_cached, hub_downloads_allowed, hub_hint, _parse_tiny

    try:
        if _parse_tiny(name) is not None:
            return "registry name"
        if name in ("smollm2-135m", "smollm2-135m-2l"):
            model_builds.smollm2_gguf()
            return "registry name"
    except (ValueError, RuntimeError) as e:
        raise PreflightError(f"{key}: {e}") from None
    path = Path(name).expanduser()
    if path.is_dir():
        if not (path / "config.json").is_file():
            raise PreflightError(f"{key}={name}: the folder has no config.json; point it at a HF model folder "
                                 f"(save_pretrained output) or a registry name ({', '.join(REGISTRY_NAMES)}).")
        if tokenizer and not any((path / f).is_file() for f in TOKENIZER_FILES):
            raise PreflightError(f"{key}={name}: the folder has no tokenizer ({' / '.join(TOKENIZER_FILES)}); "
                                 f"save the tokenizer into it (tokenizer.save_pretrained).")
        return "HF folder"
    if name.startswith((".", "/", "~")) or name.count("/") > 1:
        raise PreflightError(f"{key}={name}: no such model folder, and not a registry name ({', '.join(REGISTRY_NAMES)}).")
    # A hub id (name or org/name). A run never downloads behind the user's back (the driver and
    # its workers run with HF_HUB_OFFLINE=1), so it must be in the cache now, or allowed to be fetched.
    if hub_cached(name) is not None:
        return "hub id, in the Hugging Face cache"
    if hub_downloads_allowed():
        return "hub id, downloaded at first use (HF_HUB_OFFLINE=0)"
    raise PreflightError(f"{key}={name}: not a local folder or registry name, and not in the Hugging Face cache; "
                         f"{hub_hint(name)}.")


def check_models(cfg: TidalConfig) -> list[str]:
    """Every model the config names, and its files (weights, tokenizer: tidal.driver.checks);
    returns 'key=name (what it is)' for each."""
    from tidal.driver.checks import check_model_files

    models = [("model.policy", cfg.model.policy, True), ("model.reward", cfg.model.reward, True),
              ("model.critic", cfg.model.critic, False),
              ("stages.rm.base", cfg.stages.rm.base if "rm" in cfg.stages.run else None, True),
              *((f"reward.terms[{i}].target", t.target, True) for i, t in enumerate(cfg.reward.terms)
                if t.kind == "model")]
    checked = []
    for key, name, tokenizer in models:
        if name:
            checked.append(f"{key}={name} ({check_model(key, name, tokenizer)})")
            check_model_files(key, name, cfg if key == "model.policy" else None, tokenizer=tokenizer)
    return checked


def check_reward_function(key: str, target: str | None) -> None:
    """Importable, and callable as fn(prompts, completions, **meta) (meta keys: docs/rewards.md)."""
    from tidal.reward_service.rules import load_function

    if not target:
        raise PreflightError(f"{key}: set it to the function's import path 'module:function' (`tidal reward template`).")
    try:
        fn = load_function(target)
    except ValueError as e:
        raise PreflightError(f"{key}: {e}") from None
    try:
        sig = inspect.signature(fn)
    except (TypeError, ValueError):
        return  # a builtin or C callable without a signature: trust it
    kinds = [p.kind for p in sig.parameters.values()]
    try:
        sig.bind(["p"], ["c"], references=[None], target=None)
    except TypeError as e:
        raise PreflightError(f"{key}={target}: cannot be called as {fn.__name__}(prompts, completions, **meta) ({e}); "
                             f"write it as `def {fn.__name__}(prompts, completions, **meta) -> list[float]` "
                             f"(see docs/rewards.md or `tidal reward template`).") from None
    if inspect.Parameter.VAR_KEYWORD not in kinds:
        raise PreflightError(f"{key}={target}: {fn.__name__} has no **meta parameter, but tidal passes keyword "
                             f"arguments (references, response_lengths, target, token_ids, ended); add **meta to it.")


def check_rewards(cfg: TidalConfig) -> list[str]:
    """User functions import and take the signature; a model term has a reward model. Returns
    one line per term."""
    checked = []
    for i, term in enumerate(cfg.reward.terms):
        checked.append(f"reward.terms[{i}]: {term.kind}" + (f" {term.target}" if term.target else "")
                       + (" (imported, signature ok)" if term.kind == "function" else "")
                       + (f" ({_reward_model_source(cfg)})" if term.kind == "model" and not term.target else ""))
        if term.kind == "function":
            check_reward_function(f"reward.terms[{i}].target", term.target)
        no_model = not term.target and not cfg.model.reward and "rm" not in cfg.stages.run
        if term.kind == "model" and "rl" in cfg.stages.run and no_model:
            raise PreflightError(f"reward.terms[{i}] (kind model): no reward model; set reward.terms[{i}].target or "
                                 f"model.reward to a reward-model folder, or add rm to stages.run before rl.")
    if "collect" in cfg.stages.run and cfg.feedback.labeler == "simulated":
        from tidal.reward_service.rules import RULES

        if cfg.feedback.gold not in RULES:  # the simulated labeler's gold judge: a rule kind or a user function
            check_reward_function("feedback.gold", cfg.feedback.gold)
            checked.append(f"feedback.gold: {cfg.feedback.gold} (imported, signature ok)")
    return checked


def _reward_model_source(cfg: TidalConfig) -> str:
    if cfg.model.reward:
        return f"model.reward={cfg.model.reward}"
    return "the reward model the rm stage trains" if "rm" in cfg.stages.run else "no reward model"


def check_resume(run_dir: Path, cfg: TidalConfig | None = None) -> None:
    """Each unfinished rl stage of the run has a checkpoint to continue from that reads back: the
    newest, or (with a warning naming the unreadable file) the one before it. With `cfg`, the
    checkpoints of every unfinished rl round; without, those of the run directory."""
    from tidal.driver import checkpoint as ck

    dirs = [run_dir]
    if cfg is not None:
        from tidal.driver.run_folder import read_run_state, rl_dir, stage_keys

        done = read_run_state(run_dir)["stages"]
        dirs = [rl_dir(run_dir, r) for stage, key, r in stage_keys(cfg.stages.run) if stage == "rl" and key not in done]
    for d in dirs:
        ck.resume_checkpoint(d)  # raises CheckpointError (a ConfigError: one line, exit 2) when none reads back


def check_algorithm(cfg: TidalConfig) -> list[str]:
    from tidal.learner import algorithms, pi_old

    from tidal.driver import partial

    algorithms.check_config(cfg)
    pi_old.check_config(cfg)
    partial.check_config(cfg)
    a = cfg.algorithm
    return [f"stages.run: {', '.join(cfg.stages.run)}",
            f"algorithm.name={a.name}: {a.steps} steps, {a.prompts_per_step} prompts x {cfg.rollout.n_samples} "
            f"samples per step, {a.mode} mode"]


def model_params(name: str | None) -> int | None:
    """Parameter count of a model from its config.json: a local folder, or a hub id already in the
    local hub cache (no download). None for registry names (tiny CPU models) and unknown models."""
    from tidal.actors.gpu_memory import count_params

    if not name:
        return None
    path = Path(name).expanduser() / "config.json"
    if not path.is_file():
        try:
            from huggingface_hub import try_to_load_from_cache

            found = try_to_load_from_cache(name, "config.json") if name.count("/") == 1 else None
        except Exception:  # noqa: BLE001 - not a valid repo id: nothing cached
            found = None
        if not isinstance(found, str):
            return None
        path = Path(found)
    try:
        return count_params(json.loads(path.read_text()))
    except (OSError, ValueError):
        return None


def check_devices(cfg: TidalConfig) -> None:
    """The device plan (raises the ConfigError of the keys that cannot work together), then the
    GPU memory arithmetic where any role has GPUs and the policy's size is known."""
    from tidal.actors.devices import check_devices as check_plan
    from tidal.actors.gpu_memory import ModelSizes, check_gpu_memory
    from tidal.learner.algorithms import algorithm_for

    check_plan(cfg)
    if cfg.learner.gpus_per_worker == 0 and cfg.rollout.gpus_per_worker == 0:
        return
    policy = model_params(cfg.model.policy)
    critic = None
    if algorithm_for(cfg).uses_critic:
        critic = model_params(cfg.model.critic or cfg.model.reward) or policy
    rewards = [model_params(t.target or cfg.model.reward) for t in cfg.reward.terms if t.kind == "model"]
    reward = max((n for n in rewards if n), default=None)
    check_gpu_memory(cfg, ModelSizes(policy, critic, reward))


def preflight(cfg: TidalConfig, data: DataPaths | None = None, resume_dir: Path | None = None,
              files: bool = True) -> list[str]:
    """Every check above, cheapest first; raises PreflightError (or the ConfigError of a config
    key) on the first problem. files=False leaves the data rows out (the driver checks them after
    writing the task). Returns what was checked, one line each (`tidal config show --check`)."""
    from tidal.driver import checks

    checks.check_settings(cfg)
    checked = check_algorithm(cfg)
    check_devices(cfg)
    checked += [*check_rewards(cfg), *check_models(cfg)]
    checks.check_cluster(cfg)
    if resume_dir is not None:
        check_resume(resume_dir, cfg)
        checked.append(f"resume: the checkpoints of {resume_dir} read back")
    if files:
        checked += check_data(cfg, data)
    return checked
