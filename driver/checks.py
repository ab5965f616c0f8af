"""Preflight checks of run settings, model folders and the embedded cluster's size: what would
otherwise fail after Ray, vLLM and the learners are up (a traceback after 10-300 s), found in a
second before anything starts. `tidal.driver.preflight.preflight` runs them; each raises
`PreflightError` naming the key, the file and the fix.

  settings  stages.run not empty; the sampling settings the engine takes (top_p in (0, 1],
            top_k); greedy decoding (temperature 0) with n_samples > 1 (identical samples, no
            group to compare); data.max_prompt_tokens + rollout.max_new_tokens within
            rollout.max_model_len; the targets of length and match reward terms
  models    a model folder (or a registry model already built): config.json parses, weights
            exist (a .safetensors file whose header and length agree, or a .bin), the tokenizer's
            ids fit the model's embedding, and rollout.max_model_len fits the policy's context
  cluster   an embedded cluster's cluster.num_cpus holds what the placement plan reserves
            (otherwise the placement group waits forever for CPUs that never come)
"""

from __future__ import annotations

import json
import math
import os
from pathlib import Path

from tidal.common.config import TidalConfig
from tidal.driver.preflight import PreflightError


def check_settings(cfg: TidalConfig) -> None:
    from tidal.rollout.sampling import Sampling

    if not cfg.stages.run:
        raise PreflightError("stages.run is empty: the run would do nothing; list the stages, e.g. stages.run=[rl] "
                             "(or [sft, rm, rl]).")
    r, d = cfg.rollout, cfg.data
    try:
        Sampling.from_config(r)
    except ValueError as e:  # 'Sampling.top_p=0.0: expected in (0, 1].'
        raise PreflightError(f"rollout.{str(e).removeprefix('Sampling.')} Set it in the config or as an override.") from None
    if r.temperature == 0 and r.n_samples > 1:
        raise PreflightError(f"rollout.temperature=0 is greedy decoding: the rollout.n_samples={r.n_samples} samples of "
                             f"a prompt would all be the same; set rollout.temperature > 0 (e.g. 1.0) or "
                             f"rollout.n_samples=1.")
    if "rl" in cfg.stages.run and d.max_prompt_tokens + r.max_new_tokens > r.max_model_len:
        raise PreflightError(f"data.max_prompt_tokens={d.max_prompt_tokens} + rollout.max_new_tokens={r.max_new_tokens} "
                             f"is more than rollout.max_model_len={r.max_model_len}, the engine's token budget for "
                             f"prompt + response; raise rollout.max_model_len or lower one of the two.")
    for i, term in enumerate(cfg.reward.terms):
        _check_rule_target(f"reward.terms[{i}]", term.kind, term.target)


def _check_rule_target(key: str, kind: str, target: str | None) -> None:
    if kind == "length":
        try:
            n = float(target) if target is not None else 0.0
        except ValueError:
            n = 0.0
        if not (math.isfinite(n) and n > 0):
            raise PreflightError(f"{key}.target={target!r}: a length term's target is the response length in tokens "
                                 f"it rewards, a positive number, e.g. target: '32'.")
    if kind == "match" and target not in (None, "exact", "overlap"):
        raise PreflightError(f"{key}.target={target!r}: a match term's target is 'exact' or 'overlap'.")


# ----------------------------------------------------------------------------- model folders


def model_folder(name: str) -> Path | None:
    """The folder a model name stands for when it is on disk: a folder, or a registry model
    already built in the cache (one not built yet is not built here: that can take a minute)."""
    from tidal.common import model_builds
    from tidal.common.models import SMOLLM2_VERSION, TINY_VERSION, _parse_tiny

    try:
        seed = _parse_tiny(name)
    except ValueError:
        return None
    cached = {"smollm2-135m": f"smollm2-135m-{SMOLLM2_VERSION}", "smollm2-135m-2l": f"smollm2-135m-2l-{SMOLLM2_VERSION}"}
    if seed is not None or name in cached:
        folder = model_builds.cache_root() / "models" / (f"tiny-random-s{seed}-{TINY_VERSION}" if seed is not None
                                                         else cached[name])
        return folder if folder.is_dir() else None
    path = Path(name).expanduser()
    return path if (path / "config.json").is_file() else None


def check_model_files(key: str, name: str, cfg: TidalConfig | None = None, tokenizer: bool = True) -> None:
    """The files of a model folder load: see the module doc. cfg: the policy's, whose context
    must hold rollout.max_model_len."""
    from tidal.driver.checkpoint import file_problem

    folder = model_folder(name)
    if folder is None:
        return
    try:
        config = json.loads((folder / "config.json").read_text(encoding="utf-8"))
    except (ValueError, OSError) as e:
        raise PreflightError(f"{key}={name}: {folder / 'config.json'} is not readable JSON ({e}); restore the "
                             f"model folder (save_pretrained writes it).") from None
    if not isinstance(config, dict):
        raise PreflightError(f"{key}={name}: {folder / 'config.json'} is not a JSON object; restore the model folder.")
    weights = sorted(folder.glob("*.safetensors")) + sorted(folder.glob("*.bin"))
    if not weights:
        raise PreflightError(f"{key}={name}: the folder has no weights (model.safetensors or pytorch_model.bin); "
                             f"point it at a complete model folder (save_pretrained output).")
    for w in weights:
        problem = file_problem(w, deep=False)
        if problem:
            raise PreflightError(f"{key}={name}: {w} cannot be read ({problem}); the file is damaged or was cut "
                                 f"short: copy the model folder again.")
    vocab = config.get("vocab_size") or config.get("text_config", {}).get("vocab_size")
    ids = _tokenizer_ids(folder) if tokenizer else None
    if isinstance(vocab, int) and ids is not None and ids > vocab:
        raise PreflightError(f"{key}={name}: the tokenizer has {ids} token ids but the model's embedding only "
                             f"vocab_size={vocab}: the tokenizer belongs to another model; save the model's own "
                             f"tokenizer into {folder}.")
    context = config.get("max_position_embeddings")
    if cfg is not None and isinstance(context, int) and cfg.rollout.max_model_len > context:
        raise PreflightError(f"rollout.max_model_len={cfg.rollout.max_model_len} is longer than the context of "
                             f"{key}={name} (max_position_embeddings={context}); set rollout.max_model_len <= {context}.")


def _tokenizer_ids(folder: Path) -> int | None:
    """How many token ids a tokenizer folder's files use (largest id + 1), from tokenizer.json or
    vocab.json without loading it; None when neither is there or readable."""
    try:
        if (folder / "tokenizer.json").is_file():
            tok = json.loads((folder / "tokenizer.json").read_text(encoding="utf-8"))
            vocab = tok.get("model", {}).get("vocab") or {}
            ids = list(vocab.values()) if isinstance(vocab, dict) else list(range(len(vocab)))
            ids += [t["id"] for t in tok.get("added_tokens", [])]
        elif (folder / "vocab.json").is_file():
            ids = list(json.loads((folder / "vocab.json").read_text(encoding="utf-8")).values())
        else:
            return None
        return max(int(i) for i in ids) + 1 if ids else None
    except (ValueError, TypeError, KeyError, OSError):
        return None  # the tokenizer's own loader says what is wrong with it


# ----------------------------------------------------------------------------- the embedded cluster


def reward_learner_cpus(cfg: TidalConfig) -> float:
    """feedback.mode=online: the CPUs of the reward learner's own bundle (tidal.driver.reward_learner)."""
    return cfg.learner.cpus_per_worker if cfg.feedback.mode == "online" else 0.0


def check_cluster(cfg: TidalConfig) -> None:
    """cluster.num_cpus of an embedded cluster holds the CPUs the rl roles' placement reserves."""
    from tidal.actors.placement import plan_placement, role_counts

    c = cfg.cluster
    if c.num_cpus is None or c.address is not None or "RAY_ADDRESS" in os.environ or "rl" not in cfg.stages.run:
        return
    need = plan_placement(cfg, role_counts(cfg, reference=True)).total_cpus + reward_learner_cpus(cfg)
    if need > c.num_cpus:
        raise PreflightError(f"cluster.num_cpus={c.num_cpus} is fewer than the {need:g} logical CPUs the run's roles "
                             f"reserve (learners, reference, rollout and reward workers: *.cpus_per_worker x "
                             f"num_workers; online feedback's reward learner: learner.cpus_per_worker); "
                             f"set cluster.num_cpus >= {math.ceil(need)} or leave it unset.")
