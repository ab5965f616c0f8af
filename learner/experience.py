"""Building an RL `Experience` from a scored rollout: the pure-tensor part.

No ray / deepspeed here. The one experience path (tidal.learner.group.LearnerGroup) is

    rollout, scores = usable_rows(scored, algorithm, n)   # drop rows with invalid rewards
    fwd = group.forward(rollout, pi_old)                   # ForwardPass: pad + old/ref/critic forwards
    exp, metrics = group.assemble(fwd, scores, kl_coef)    # assemble_experience + experience_metrics

(pi_old: the step's tidal.learner.pi_old.PiOldStep.)

Layout (tidal.common.types): [prompt LEFT-padded to P | response RIGHT-padded to R]; per-token
tensors are (B, R), column t belongs to response token t.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from typing import TYPE_CHECKING

from tidal.common.ops import masked_mean, masked_whiten
from tidal.common.types import Experience, RolloutBatch, ScoredBatch
from tidal.learner.kl import kl_estimate

if TYPE_CHECKING:  # the table's updates build on this module: it imports the table only when asked
    from tidal.learner.algorithms import Algorithm


def pad_prompt_response(prompt_ids: list[list[int]], response_ids: list[list[int]],
                        pad_id: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Token lists -> (input_ids (B, P+R) long, attention_mask (B, P+R) long,
    response_mask (B, R) float): prompts left-padded to the longest prompt P, responses
    right-padded to the longest response R, so every response starts at column P."""
    if len(prompt_ids) != len(response_ids):
        raise ValueError(f"{len(prompt_ids)} prompts but {len(response_ids)} responses; they must pair up row by row")
    if not prompt_ids:
        raise ValueError("empty batch: nothing to pad")
    for i, (p, r) in enumerate(zip(prompt_ids, response_ids)):
        if len(p) == 0:
            raise ValueError(f"row {i}: empty prompt; every sample needs at least one prompt token")
        if len(r) == 0:
            raise ValueError(f"row {i}: empty response; drop it (or keep its EOS token) before training")
    P = max(len(p) for p in prompt_ids)
    R = max(len(r) for r in response_ids)
    B = len(prompt_ids)
    input_ids = torch.full((B, P + R), pad_id, dtype=torch.long)
    attention_mask = torch.zeros((B, P + R), dtype=torch.long)
    response_mask = torch.zeros((B, R), dtype=torch.float32)
    for i, (p, r) in enumerate(zip(prompt_ids, response_ids)):
        input_ids[i, P - len(p):P] = torch.tensor(p, dtype=torch.long)
        input_ids[i, P:P + len(r)] = torch.tensor(r, dtype=torch.long)
        attention_mask[i, P - len(p):P + len(r)] = 1
        response_mask[i, :len(r)] = 1.0
    return input_ids, attention_mask, response_mask


def truncate_after_eos(response_ids: list[list[int]], eos_id: int) -> list[list[int]]:
    """Drop every token after the first EOS of each response (docs/implementation.md#d4)."""
    out = []
    for r in response_ids:
        out.append(r[:r.index(eos_id) + 1] if eos_id in r else list(r))
    return out


def pad_rollout(rollout: RolloutBatch, pad_id: int, eos_id: int | None = None
                ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(input_ids (B, P+R), attention_mask (B, P+R), response_mask (B, R)) of a rollout; with
    `eos_id`, tokens after a response's first EOS are cut first."""
    responses = rollout.response_ids if eos_id is None else truncate_after_eos(rollout.response_ids, eos_id)
    return pad_prompt_response(rollout.prompt_ids, responses, pad_id)


def pad_response_floats(values: list[list[float]], response_len: int) -> torch.Tensor:
    """Per-token floats of unequal lengths (e.g. engine logprobs) -> (B, R) float32, zero-padded."""
    out = torch.zeros((len(values), response_len), dtype=torch.float32)
    for i, v in enumerate(values):
        n = min(len(v), response_len)
        out[i, :n] = torch.tensor(v[:n], dtype=torch.float32)
    return out


def max_token_lag(cfg) -> int:
    """Most versions a response token may lag the step that trains it (rollout.partial_max_lag;
    None: algorithm.max_staleness + 1 with partial rollouts, whose carried prefixes lag one more);
    algorithm.max_staleness without partial rollouts, 0 in sync mode."""
    a, r = cfg.algorithm, cfg.rollout
    if a.mode != "async":
        return 0
    if r.partial == "off":
        return a.max_staleness
    return a.max_staleness + 1 if r.partial_max_lag is None else r.partial_max_lag


def pad_response_versions(rollout: RolloutBatch, response_len: int) -> torch.Tensor | None:
    """The weight version of each response token (RolloutBatch.token_versions) -> (B, R) long,
    padding holding the row's version; None when the rollout records no per-token versions."""
    if not rollout.token_versions:
        return None
    out = torch.tensor(rollout.weight_version, dtype=torch.long)[:, None].repeat(1, response_len)  # (B, R)
    for i, v in enumerate(rollout.token_versions):
        n = min(len(v), response_len)
        out[i, :n] = torch.tensor(v[:n], dtype=torch.long)
    return out


def select_rollout(rollout: RolloutBatch, rows: list[int]) -> RolloutBatch:
    """The rollout restricted to `rows` (in that order)."""
    def pick(values: list) -> list:
        return [values[i] for i in rows] if values else []

    return RolloutBatch(pick(rollout.prompt_index), pick(rollout.prompt_text), pick(rollout.prompt_ids),
                        pick(rollout.response_text), pick(rollout.response_ids), pick(rollout.response_logprobs),
                        pick(rollout.finish_reason), pick(rollout.weight_version), pick(rollout.reference),
                        pick(rollout.token_versions))


def valid_rows(scored: ScoredBatch, group_size: int, whole_groups: bool) -> torch.Tensor:
    """Indices (long) of rows to keep: all rows, minus those marked invalid (NaN/inf reward).
    With `whole_groups` (group baselines) a group with any invalid row is dropped entirely,
    since its baseline would be computed over a partial group."""
    B = len(scored.rollout)
    if scored.valid is None:
        return torch.arange(B)
    valid = scored.valid.bool().clone()
    if whole_groups:
        if B % group_size:
            raise ValueError(f"batch of {B} samples is not a multiple of the group size {group_size}")
        valid = valid.view(-1, group_size).all(-1, keepdim=True).expand(-1, group_size).reshape(-1)
    return valid.nonzero().flatten()


@dataclass(frozen=True)
class ForwardPass:
    """What `LearnerGroup.forward` computed for one padded rollout (layout of tidal.common.types)."""

    input_ids: torch.Tensor  # (B, P+R) long
    attention_mask: torch.Tensor  # (B, P+R) long
    response_mask: torch.Tensor  # (B, R) float
    old_logprobs: torch.Tensor | None  # (B, R) pi_old from `pi_old`: the trainer's, the engine's, or None: taken
    # inside the update (tidal.learner.pi_old)
    ref_logprobs: torch.Tensor  # (B, R) frozen reference logprobs
    values: torch.Tensor | None = None  # (B, R) critic values; None without a critic
    # (B, R) engine logprobs of the sampled tokens, beside the trainer's (None when the engine's
    # ARE old_logprobs: there is nothing to compare or correct then)
    rollout_logprobs: torch.Tensor | None = None
    weight_version: torch.Tensor | None = None  # (B,) long, version that generated each row
    pi_old: str = "trainer"  # where old_logprobs come from: "trainer" | "engine" | "update" (tidal.learner.pi_old)
    truncated: torch.Tensor | None = None  # (B,) bool, responses cut at the length budget (finish_reason not "stop")
    token_versions: torch.Tensor | None = None  # (B, R) long, version that sampled each token (rollout.partial)

    @property
    def response_len(self) -> int:
        return self.response_mask.shape[1]

    def logprob_gap(self) -> float | None:
        """Mean |trainer - engine| logprob per response token, None when only one of them exists."""
        if self.rollout_logprobs is None or self.old_logprobs is None:
            return None
        return mean_abs_gap(self.old_logprobs, self.rollout_logprobs, self.response_mask)

    def sequence_kl(self) -> torch.Tensor:
        """(B,) k1 KL of each sampled response to the reference: the sum over its real tokens of
        log pi_old - log pi_ref (the held-out KL, and the KL expert iteration logs)."""
        if self.old_logprobs is None:
            raise ValueError("sequence_kl needs pi_old; this forward pass left it to the update (pi_old source update)")
        return ((self.old_logprobs.float() - self.ref_logprobs.float()) * self.response_mask).sum(-1)

    def kl(self, estimator: str) -> torch.Tensor:
        """Per-token KL estimate policy vs reference, 0 on padding (and everywhere while pi_old is
        still to be taken in the update, where the KL penalty is off). (B, R)."""
        if self.old_logprobs is None:
            return torch.zeros_like(self.response_mask)
        real = self.response_mask.bool()
        return torch.where(real, kl_estimate(self.old_logprobs.float(), self.ref_logprobs.float(), estimator), 0.0)


def assemble_experience(fwd: ForwardPass, scores: torch.Tensor, algorithm: "Algorithm | str", group_size: int,
                        kl_coef: float, kl_estimator: str, gamma: float, lam: float, whiten: bool,
                        overlong_filter: bool = False, oldest_version: int | None = None) -> Experience:
    """Per-token rewards and advantages of one batch, by the algorithm's table entry
    (tidal.learner.algorithms): PPO's KL-penalised token rewards and GAE over the critic's values
    (docs/implementation.md#d5, #d8), or a group baseline plus the KL penalty to go.
    `whiten`: advantages to zero mean / unit variance over real tokens only (#d7), where the
    algorithm allows it (GRPO's advantages are already normalised per group; REINFORCE++ always
    normalises). `overlong_filter`: responses cut at the length budget are left out of the loss
    (Experience.trains 0; DAPO's overlong filtering) after they counted in the baselines.
    `oldest_version`: tokens sampled by an older weight version (fwd.token_versions) are left out of
    the loss (Experience.token_trains 0), after they counted in the rewards. scores (B,)."""
    from tidal.learner.algorithms import algorithm_for  # here, not above: the table's updates import this module

    algo = algorithm_for(algorithm) if isinstance(algorithm, str) else algorithm
    mask = fwd.response_mask.float()
    real = mask.bool()
    # logprobs and values at padded positions are meaningless: zero them (#d10)
    if fwd.old_logprobs is None and kl_coef != 0:
        raise ValueError("pi_old is taken inside the update (pi_old source update), so the rewards cannot carry a KL "
                         f"penalty, but kl_coef is {kl_coef}")
    old_logprobs = None if fwd.old_logprobs is None else torch.where(real, fwd.old_logprobs.float(), 0.0)
    ref_logprobs = torch.where(real, fwd.ref_logprobs.float(), 0.0)
    kl = fwd.kl(kl_estimator)  # (B, R)
    values = None if fwd.values is None else torch.where(real, fwd.values.float(), 0.0)
    advantages, returns = algo.advantages(scores, kl, mask, values, kl_coef, group_size, gamma, lam)
    if algo.whiten == "always" or (whiten and algo.whiten == "option"):
        advantages = masked_whiten(advantages, mask)
    trains = None
    if overlong_filter and fwd.truncated is not None:
        trains = (~fwd.truncated.bool()).float()  # (B,)
    token_trains = None
    if oldest_version is not None and fwd.token_versions is not None:
        token_trains = (fwd.token_versions >= oldest_version).float()  # (B, R)
    return Experience(
        input_ids=fwd.input_ids, attention_mask=fwd.attention_mask, response_mask=mask,
        old_logprobs=old_logprobs, ref_logprobs=ref_logprobs,
        advantages=advantages.detach().float(), returns=returns.detach().float(),
        values=torch.zeros_like(mask) if values is None else values.detach(), scores=scores.float(),
        rollout_logprobs=fwd.rollout_logprobs, weight_version=fwd.weight_version, trains=trains,
        token_trains=token_trains,
    )


def experience_metrics(exp: Experience, kl_estimator: str) -> dict[str, float]:
    """Batch statistics for logs and the adaptive KL controller (KL in nats per sequence). With
    pi_old still to be taken in the update, the KL and the logprob gap come from the update."""
    mask = exp.response_mask
    out = {
        "experience/score_mean": exp.scores.mean().item(),
        "experience/score_std": exp.scores.std().item() if len(exp) > 1 else 0.0,
        "experience/response_len": mask.sum(-1).mean().item(),
        "experience/advantage_mean": masked_mean(exp.advantages, mask).item(),
        "experience/return_mean": masked_mean(exp.returns, mask).item(),
    }
    if exp.trains is not None:
        out["experience/overlong_filtered"] = 1.0 - exp.trains.float().mean().item()
    if exp.token_trains is not None:  # the share of response tokens too stale to train
        out["experience/stale_tokens"] = 1.0 - masked_mean(exp.token_trains, mask).item()
    if exp.old_logprobs is not None:
        out.update(old_logprob_metrics(exp, kl_estimator))
    return out


def old_logprob_metrics(exp: Experience, kl_estimator: str) -> dict[str, float]:
    """What pi_old tells about a batch: its KL to the reference (nats per sequence) and its gap to
    the engine's log-probs."""
    out, gap = {"experience/kl_per_seq": kl_per_seq(exp, kl_estimator)}, engine_gap(exp)
    return out if gap is None else {**out, "rollout/logprob_gap": gap}


def kl_per_seq(exp: Experience, kl_estimator: str) -> float:
    """Mean over rows of pi_old's KL to the reference, summed over each response (nats per sequence)."""
    kl = torch.where(exp.response_mask.bool(), kl_estimate(exp.old_logprobs, exp.ref_logprobs, kl_estimator), 0.0)
    return kl.sum(-1).mean().item()


def engine_gap(exp: Experience) -> float | None:
    """Mean |trainer - engine| logprob of the sampled tokens (docs/implementation.md#c5): the
    sampler and the trainer must agree, or the importance ratio is silently biased. None without
    engine log-probs."""
    if exp.rollout_logprobs is None:
        return None
    return mean_abs_gap(exp.old_logprobs, exp.rollout_logprobs, exp.response_mask)


def mean_abs_gap(a: torch.Tensor, b: torch.Tensor, mask: torch.Tensor) -> float:
    """Mean |a - b| over the real tokens of (B, R) tensors."""
    gap = (a.float() - b.float()).abs() * mask
    return (gap.sum() / mask.sum().clamp(min=1)).item()


def usable_rows(scored: ScoredBatch, algorithm: "Algorithm", group_size: int) -> tuple[RolloutBatch, torch.Tensor]:
    """The rollout rows to train on and their scores (B',): rows with an invalid reward are
    dropped, whole groups when the algorithm uses a group baseline."""
    keep = valid_rows(scored, group_size, whole_groups=algorithm.whole_groups)
    if len(keep) == 0:
        raise ValueError("every sample of the batch has an invalid reward; nothing to train on (see reward/dropped; "
                         "fix the reward, or set reward.on_invalid=error to find the sample)")
    return select_rollout(scored.rollout, keep.tolist()), scored.scores[keep].float()
