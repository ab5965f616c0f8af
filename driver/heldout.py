"""Held-out evaluation, one service for the RL stage's before/after samples, the
over-optimisation monitor, `tidal eval`, and every other place that samples a finished policy
(`tidal generate`, collect rounds, `tidal label tasks`):

  Seeds               which seed each use of sampling gets, in one place
  held-out prompts    the prompt set, split into a reporting set and a selection set
  sample / fresh_pool one sampler of a policy: a pool's current weights, or a fresh pool on an
                      HF folder, closed afterwards; PolicySampler: one pool for several folders
  gold judges         one builder (`build_gold`) for logging.gold_term and feedback.gold
  scores              the proxy's and gold's raw scores, and the KL to a reference: learner-side
                      (`ForwardPass.sequence_kl`, `evaluate_pool`) or by plain HF forward passes
                      (`hf_sequence_kl`, `tidal eval`'s KL to SFT)

Prompt split (data.eval_prompts, or the task's held-out prompts, in file order): the first
logging.eval_samples rows are the *reporting* set (samples_before/after.jsonl, `tidal eval`);
the next logging.gold_samples rows are the *selection* set, which the monitor scores to decide
early stops and the best-gold checkpoint. Disjoint, so the prompts a model was picked on are
never the ones its result is reported on.
"""

from __future__ import annotations

import contextlib
import dataclasses
import typing
from dataclasses import dataclass
from pathlib import Path

import torch

from tidal.common.config import ConfigError, RewardConfig, RewardTerm, TidalConfig
from tidal.common.types import PromptBatch, RolloutBatch, ScoredBatch

EVAL_SEED = 20_231_108


@dataclass(frozen=True)
class Seeds:
    """The seed of every sampling use outside the RL steps (whose own seeds are
    rl_loop.step_sampling), from the config's `seed`. Fixed held-out seeds make every policy
    answer with the same randomness, so two policies' scores differ by the policy alone."""

    base: int  # cfg.seed

    REPORTING = EVAL_SEED  # samples_before/after.jsonl, `tidal eval` (and its best-of-n)
    CALIBRATION = EVAL_SEED + 1  # reward.normalize=reference: samples of the initial policy
    SELECTION = EVAL_SEED + 2  # the over-optimisation monitor

    @property
    def calibration_order(self) -> int:
        """Order of the training prompts the calibration samples (not the RL order)."""
        return self.base + 1

    @property
    def generate(self) -> int:
        return self.base

    def collect(self, round_: int) -> tuple[int, int]:
        """(prompt order, sampling) of collect round `round_`."""
        return self.base + 7_919 * round_, self.base + round_

    @property
    def label_order(self) -> int:
        """Order of the prompts `tidal label tasks` picks."""
        return self.base

    def label_sampling(self, source: int) -> int:
        """Sampling of the `source`-th --from of `tidal label tasks`."""
        return self.base + source


def eval_sampling(cfg: TidalConfig, seed: int, n: int = 1):
    """rollout.* with a fixed seed and n samples per prompt."""
    from tidal.rollout.sampling import Sampling

    return dataclasses.replace(Sampling.from_config(cfg.rollout, seed), n=n)


# ---------------------------------------------------------------------------- held-out prompts

@dataclass(frozen=True)
class HeldOutPrompts:
    reporting: PromptBatch | None  # the first logging.eval_samples rows (None: none)
    selection: PromptBatch | None  # the next logging.gold_samples rows (None: monitor off)


def split_rows(cfg: TidalConfig, rows: int, where: str, selection: bool) -> tuple[range, range]:
    """(reporting rows, selection rows) of a held-out file with `rows` prompts. Reporting takes
    the first eval_samples (fewer when the file is shorter, as before); with `selection` (the
    monitor is on) both sets must fit whole, else one line says which keys to change."""
    lc = cfg.logging
    if not selection:
        return range(min(lc.eval_samples, rows)), range(0)
    need = lc.eval_samples + lc.gold_samples
    if rows < need:
        raise ConfigError(f"{where} has {rows} prompts; the monitor (logging.gold_every) needs {need}: the first "
                          f"logging.eval_samples={lc.eval_samples} for reporting and the next logging.gold_samples="
                          f"{lc.gold_samples} for selection, disjoint. Lower them or give more held-out prompts.")
    return range(lc.eval_samples), range(lc.eval_samples, need)


def heldout_prompts(cfg: TidalConfig, path: Path | None, tokenizer, selection: bool = False) -> HeldOutPrompts:
    """The reporting and selection prompt batches of the held-out file (see the module doc)."""
    from tidal.common.prompts import PromptDataset

    if path is None:
        if selection:
            raise ConfigError("logging.gold_every > 0 scores held-out prompts: set data.eval_prompts "
                              "(or data.task: sentiment), or logging.gold_every=0.")
        return HeldOutPrompts(None, None)
    ds = PromptDataset.from_config(path, tokenizer, cfg.data)
    report, select = split_rows(cfg, len(ds), f"data.eval_prompts {path}", selection)
    return HeldOutPrompts(ds.make_batch(list(report)) if len(report) else None,
                          ds.make_batch(list(select)) if len(select) else None)


# ---------------------------------------------------------------------------- sampling

@contextlib.contextmanager
def fresh_pool(cfg: TidalConfig, policy: str | Path):
    """A rollout pool on the HF folder `policy` (rollout.* settings), shut down on exit."""
    from tidal.rollout.pool import RolloutPool

    pool = RolloutPool(cfg, str(policy))
    try:
        yield pool
    finally:
        pool.shutdown()


class PolicySampler:
    """Samples several HF folders with one rollout pool (`tidal eval`): the first folder starts it,
    each later folder of the same model (config.json and generation_config.json equal but for
    the fields that do not change the network) is loaded into it as a new weight version, and a
    folder of another model gets a pool of its own. One engine start for a whole scoreboard
    instead of one per policy; a load resets the engine's prefix cache, and every request has its
    own seed, so a policy's samples are those of a fresh pool. LoRA runs export merged folders,
    so the pool takes full weights (learner.lora_rank 0). Close it (or use it with `with`)."""

    VOLATILE = ("_name_or_path", "transformers_version", "torch_dtype", "dtype")

    def __init__(self, cfg: TidalConfig):
        self.cfg = dataclasses.replace(cfg, learner=dataclasses.replace(cfg.learner, lora_rank=0))
        self.pool, self.folder, self.engine_starts = None, None, 0

    def __call__(self, policy: str | Path, prompts, sampling):
        folder = Path(policy)
        if self.folder != folder:
            if self.pool is not None and self._same_model(folder) and _safetensors(folder):
                self.pool.load_weights(list(_read_safetensors(folder)))
            else:
                self.close()
                from tidal.rollout.pool import RolloutPool

                self.pool, self.engine_starts = RolloutPool(self.cfg, str(folder)), self.engine_starts + 1
            self.folder = folder
        return self.pool.generate(prompts, sampling)

    def _same_model(self, folder: Path) -> bool:
        return all(_json_without(self.folder / name, self.VOLATILE) == _json_without(folder / name, self.VOLATILE)
                   for name in ("config.json", "generation_config.json"))

    def close(self) -> None:
        if self.pool is not None:
            self.pool.shutdown()
        self.pool, self.folder = None, None

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


def _json_without(path: Path, keys: tuple[str, ...]) -> dict | None:
    import json

    if not path.is_file():
        return None
    return {k: v for k, v in json.loads(path.read_text()).items() if k not in keys}


def _safetensors(folder: Path) -> list[Path]:
    return sorted(folder.glob("model*.safetensors"))  # model.safetensors, or its shards


def _read_safetensors(folder: Path):
    from safetensors.torch import load_file

    for path in _safetensors(folder):
        yield from load_file(str(path)).items()


def sample(policy, prompts, sampling, cfg: TidalConfig | None = None):
    """Completions of `policy` for `prompts`: a RolloutPool answers with its current weights;
    an HF folder (str or Path) gets a fresh pool of cfg's rollout settings, shut down afterwards."""
    if not isinstance(policy, (str, Path)):
        return policy.generate(prompts, sampling)
    if cfg is None:
        raise ValueError(f"sampling the folder {policy} starts a pool: pass the config")
    with fresh_pool(cfg, policy) as pool:
        return pool.generate(prompts, sampling)


# ---------------------------------------------------------------------------- judges and scores

def gold_term(spec: str) -> RewardTerm:
    """logging.gold_term 'KIND' or 'KIND:TARGET' (sentiment, length:8, function:mod:fn, model:FOLDER)."""
    kind, _, target = spec.partition(":")
    kinds = typing.get_args(typing.get_type_hints(RewardTerm)["kind"])
    if kind not in kinds or kind == "remote":
        raise ConfigError(f"logging.gold_term={spec!r}: the kind must be one of "
                          f"{', '.join(k for k in kinds if k != 'remote')}, optionally with ':TARGET'.")
    return RewardTerm(kind=kind, target=target or None)


def feedback_gold_term(cfg: TidalConfig) -> RewardTerm:
    """feedback.gold (a rule kind, with feedback.gold_target, or 'module:function') as a term."""
    from tidal.reward_service.rules import RULES

    fb = cfg.feedback
    return RewardTerm(kind=fb.gold, target=fb.gold_target) if fb.gold in RULES else RewardTerm(kind="function",
                                                                                                target=fb.gold)


def build_gold(cfg: TidalConfig, term: RewardTerm, policy_tokenizer: str | None = None):
    """A gold judge: one reward term the policy never trains on, raw (no normalisation), any
    reward-model worker in-process. Close it after use."""
    from tidal.reward_service.combine import build_reward

    rc = RewardConfig(terms=(term,), normalize="none", on_invalid="error",
                      function_timeout_s=cfg.reward.function_timeout_s)  # a function judge gets the same deadline
    return build_reward(rc, policy_tokenizer=policy_tokenizer, local=True, dtype=cfg.model.dtype)


def raw_total(reward, scored) -> torch.Tensor:
    """(B,) the weighted sum of a reward's terms before normalisation, from `score(raw=True)`."""
    return sum(t.weight * scored.terms[t.name] for t in reward.terms)


def raw_scores(reward, rollout) -> list[float]:
    """The raw weighted sum per completion (what a table can compare across policies)."""
    return raw_total(reward, reward.score(rollout, raw=True)).float().tolist()


@dataclass
class PoolEval:
    """One held-out evaluation of a pool's current policy; per-completion lists, prompt order."""

    rollout: RolloutBatch
    scored: ScoredBatch  # the proxy's, raw=True (its per-term scores)
    proxy: list[float]  # raw weighted sum of the proxy
    gold: list[float] | None  # the gold judge's raw score (None: no gold judge given)
    kl: list[float]  # k1 sequence KL to the reference, sum over response tokens
    response_len: list[float]  # tokens


def evaluate_pool(pool, learners, prompts, sampling, proxy, gold=None) -> PoolEval:
    """Sample the pool's current weights, score with the proxy (and gold), and take the KL to
    the reference from the learners' own forward pass (the RL step's; ForwardPass.sequence_kl)."""
    rollout = sample(pool, prompts, sampling)
    scored = proxy.score(rollout, raw=True)
    fwd = learners.forward(rollout, with_values=False)
    return PoolEval(rollout, scored, raw_total(proxy, scored).float().tolist(),
                    None if gold is None else raw_scores(gold, rollout), fwd.sequence_kl().tolist(),
                    fwd.response_mask.sum(-1).float().tolist())


def hf_sequence_kl(path: str, ref_model, rollout, temperature: float, tokenizer) -> tuple[list[float], list[int]]:
    """(k1 sequence KL of the HF folder `path` to `ref_model`, response length) per completion,
    both log-probs from plain HF forward passes on the driver (common.models.sequence_logprobs):
    a small eval set needs no learner group."""
    from transformers import AutoModelForCausalLM

    from tidal.common.models import sequence_logprobs
    from tidal.learner.experience import pad_rollout

    ids, mask, resp = pad_rollout(rollout, tokenizer.pad_token_id, tokenizer.eos_token_id)  # (B, P+R) x2, (B, R)
    R, t = resp.shape[1], temperature if temperature > 0 else 1.0
    policy = AutoModelForCausalLM.from_pretrained(path, torch_dtype=torch.float32).eval()
    kl = []
    with torch.no_grad():
        for s in range(0, len(ids), 16):
            sl = slice(s, s + 16)
            diff = sequence_logprobs(policy, ids[sl], mask[sl], R, t) - sequence_logprobs(ref_model, ids[sl], mask[sl], R, t)
            kl += (diff * resp[sl]).sum(-1).tolist()
    return kl, resp.sum(-1).long().tolist()
