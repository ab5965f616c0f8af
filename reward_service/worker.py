"""The learned reward model as a worker, and a pool of such workers on Ray.

`RewardWorker` is a plain class: it loads a reward-model folder (a value model saved by
`save_value_model`: backbone + scalar head + tokenizer + metadata), scores sequences in
micro-batches, reading the head at the last real token (docs/implementation.md#d1), and applies the
reward normalization saved with the model (`reward_mean` / `reward_std` in its metadata).

What the model reads (documented choice): prompt + response exactly as the policy saw them,
ending with EOS when the response ended with EOS, which is also how the rm stage trains it
([prompt | response + EOS], learner/reward_model.py).
 - `RewardInput.token_ids` given (the rollout's prompt_ids + response_ids, EOS included when
   the policy emitted it): used as they are. The pool's owner passes them only when the reward
   model's tokenizer is the policy's (same `tokenizer_fingerprint`).
 - otherwise the text: tokenizer(prompt) + tokenizer(completion, no special tokens) + EOS for
   rows that `ended` (finish_reason "stop"; every row when `ended` is None, as for bare text
   sent to the reward server, which holds finished responses).
Sequences longer than the model's context keep their LAST tokens (the score is read at the end).
Rows are right-padded per micro-batch; the model is causal, so padding after the last real
token cannot change its score.

`RewardPool` runs N workers on the one actor layer (`local=True`: one worker in this process),
splits a batch into per-worker chunks before `ray.put`, waits with a timeout, and restarts a
worker that died, scoring its chunk again.
"""

from __future__ import annotations

import hashlib
import json
import math
from dataclasses import dataclass
from pathlib import Path

import torch

from tidal.actors.actor_group import ActorGroup, call_error, is_actor_death


class RewardWorkerError(RuntimeError):
    """A reward worker died, timed out or failed; the message names the worker."""


@dataclass(frozen=True)
class RewardInput:
    """A batch to score: texts always, token ids when the policy's tokenizer is shared."""

    prompts: list[str]  # (B,)
    completions: list[str]  # (B,)
    token_ids: list[list[int]] | None = None  # (B, *) prompt + response ids, unpadded
    ended: list[bool] | None = None  # (B,) response ended with EOS (None: all did); text path only

    def __len__(self) -> int:
        return len(self.prompts)

    def slice(self, start: int, stop: int) -> "RewardInput":
        ids = self.token_ids[start:stop] if self.token_ids is not None else None
        ended = self.ended[start:stop] if self.ended is not None else None
        return RewardInput(self.prompts[start:stop], self.completions[start:stop], ids, ended)


def tokenizer_fingerprint(tokenizer) -> str:
    """Hash of vocabulary and special tokens: equal fingerprints mean token ids can be shared."""
    payload = json.dumps([sorted(tokenizer.get_vocab().items()), tokenizer.eos_token_id,
                          tokenizer.bos_token_id, type(tokenizer).__name__])
    return hashlib.sha256(payload.encode()).hexdigest()[:16]


class RewardWorker:
    """Scores (prompt, completion) pairs with one reward model. Plain class; see module doc."""

    def __init__(self, model_path: str, micro_batch_size: int = 16, dtype: str = "float32",
                 device: str | None = None, num_threads: int = 0):
        from tidal.actors.threads import apply_threads
        from tidal.common.models import VALUE_HEAD_FILE, load_tokenizer, load_value_model, read_value_model_meta
        from tidal.common.precision import torch_dtype

        apply_threads(num_threads)  # tidal.actors.threads

        path = Path(model_path)
        if not (path / VALUE_HEAD_FILE).is_file():
            raise FileNotFoundError(
                f"{path} is not a reward-model folder (no {VALUE_HEAD_FILE}); point the model term at the "
                f"output of the rm stage or a folder written by save_value_model.")
        try:
            self.tokenizer = load_tokenizer(path)
        except (OSError, ValueError) as e:
            raise FileNotFoundError(
                f"reward-model folder {path} has no usable tokenizer ({e}); save it with "
                f"save_value_model(..., tokenizer=tokenizer).") from e
        # None: the GPU when this process sees one (a Ray actor sees one only if it reserved it).
        self.device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
        self.model = load_value_model(path, dtype=torch_dtype(dtype)).to(self.device)
        self.micro_batch_size = micro_batch_size
        self.max_len = int(getattr(self.model.config, "max_position_embeddings", 0) or 1 << 30)
        meta = read_value_model_meta(path)
        self.reward_mean = float(meta.get("reward_mean", 0.0))
        self.reward_std = float(meta.get("reward_std", 1.0))
        if not (math.isfinite(self.reward_mean) and math.isfinite(self.reward_std) and self.reward_std > 0):
            raise ValueError(f"{path}: metadata reward_mean={self.reward_mean}, reward_std={self.reward_std} "
                             f"cannot normalize (std must be finite and > 0).")
        self.version = int(meta.get("version", 0))  # online RLHF: the reward-model version it scores with
        self.pad_id = self.tokenizer.pad_token_id
        self.fallback_id = self.tokenizer.eos_token_id if self.tokenizer.eos_token_id is not None else self.pad_id

    def ready(self) -> str:
        """The tokenizer fingerprint; a cheap call that proves the worker is up."""
        return tokenizer_fingerprint(self.tokenizer)

    def encode(self, batch: RewardInput) -> list[list[int]]:
        """Token ids of each row (see module doc), truncated to the context from the left."""
        if batch.token_ids is not None:
            seqs = [list(s) for s in batch.token_ids]
        else:
            prompt_ids = self.tokenizer(batch.prompts)["input_ids"]
            completion_ids = self.tokenizer(batch.completions, add_special_tokens=False)["input_ids"]
            ended = batch.ended if batch.ended is not None else [True] * len(batch)
            eos = [self.tokenizer.eos_token_id] if self.tokenizer.eos_token_id is not None else []
            seqs = [p + c + (eos if e else []) for p, c, e in zip(prompt_ids, completion_ids, ended)]
        # An empty prompt with an empty completion has no token to read a score at.
        return [s[-self.max_len:] if s else [self.fallback_id] for s in seqs]

    @torch.inference_mode()
    def _forward(self, batch: RewardInput, fn) -> torch.Tensor:
        """fn(input_ids (b, T), attention_mask (b, T)) -> (b, ...) over the batch in micro-batches,
        rows back in batch order: (B, ...) float32 on the CPU."""
        seqs = self.encode(batch)
        out: torch.Tensor | None = None
        # Longest first, so rows of similar length share a micro-batch and padding stays small.
        order = sorted(range(len(seqs)), key=lambda i: -len(seqs[i]))
        for start in range(0, len(order), self.micro_batch_size):
            rows = order[start:start + self.micro_batch_size]
            width = len(seqs[rows[0]])
            input_ids = torch.full((len(rows), width), self.pad_id, dtype=torch.long)  # (b, T)
            attention_mask = torch.zeros((len(rows), width), dtype=torch.long)  # (b, T)
            for r, i in enumerate(rows):
                input_ids[r, :len(seqs[i])] = torch.tensor(seqs[i])
                attention_mask[r, :len(seqs[i])] = 1
            values = fn(input_ids.to(self.device), attention_mask.to(self.device)).float().cpu()  # (b, ...)
            if out is None:
                out = torch.empty((len(seqs), *values.shape[1:]), dtype=torch.float32)
            out[rows] = values
        return out if out is not None else torch.empty(0, dtype=torch.float32)

    def score(self, batch: RewardInput) -> torch.Tensor:
        """(B,) float32 normalized reward-model scores."""
        return (self._forward(batch, self.model.score) - self.reward_mean) / self.reward_std

    def features(self, batch: RewardInput) -> torch.Tensor:
        """(B, H) float32 trunk features at each row's last token (what the head reads)."""
        return self._forward(batch, self.model.features)

    def load_weights(self, handle, reward_mean: float, reward_std: float) -> int:
        """Hot swap (online RLHF): the reward model's tensors of a published version, pulled
        through its weight transport (tidal.actors.weights), with that version's normalisation.
        Called between scoring calls; returns the version now scored with."""
        from tidal.actors.weights import pull

        dtype = next(self.model.parameters()).dtype
        state = {name: t.to(self.device, dtype) for name, t in pull(handle)}
        self.model.load_state_dict(state, strict=True)
        self.reward_mean, self.reward_std = float(reward_mean), float(reward_std)
        self.version = handle.version
        return self.version


class RewardPool:
    """N reward workers on the actor layer (tidal.actors.actor_group.ActorGroup); `local=True`:
    one worker in this process, no Ray.

    `options_fn`: per-worker Ray options, e.g. `Placement.actor_options("reward")` so the
    workers take their bundles from the run's placement plan. A batch is cut into one chunk per
    healthy worker before `ray.put`. A worker that dies (or does not answer within `timeout_s`)
    is restarted and its chunk is scored again by the workers left, up to `max_restarts` rounds;
    a worker whose method raised is an error naming it (the same input would fail again)."""

    def __init__(self, model_path: str | Path, num_workers: int = 1, micro_batch_size: int = 16,
                 dtype: str = "float32", timeout_s: float = 300.0, num_cpus_per_worker: float = 1.0,
                 num_gpus_per_worker: float = 0.0, *, options_fn=None, local: bool = False, max_restarts: int = 2,
                 num_threads: int = 0):
        if num_workers < 1:
            raise ValueError(f"RewardPool needs num_workers >= 1, got {num_workers} (local=True runs one in-process)")
        self.model_path, self.timeout_s, self.max_restarts = str(model_path), timeout_s, max_restarts
        # a worker restarted after a hot swap loads the newest version's folder (`load_version`)
        self.group = ActorGroup(
            RewardWorker, 1 if local else num_workers,
            args=lambda i: (self.model_path, micro_batch_size, dtype, None, num_threads),
            options={"num_cpus": num_cpus_per_worker, "num_gpus": num_gpus_per_worker, "max_restarts": 0},
            options_fn=options_fn, local=local, name="reward", label=lambda i: f"reward worker {i}",
            call_timeout_s=timeout_s)
        try:
            # Model loading errors surface here, at construction, not at the first score().
            started = self.group.start(lambda a: a.ready.remote())
            self.fingerprint = self.group.collect_or_raise(started, f"reward model {self.model_path}: start",
                                                           RewardWorkerError)[0]
        except BaseException:
            self.group.shutdown()
            raise

    @property
    def num_workers(self) -> int:
        return self.group.num_actors

    def score(self, batch: RewardInput) -> torch.Tensor:
        """(B,) scores; the batch is split into one contiguous chunk per healthy worker."""
        if len(batch) == 0:
            return torch.empty(0, dtype=torch.float32)
        self.group.restore()  # workers lost in an earlier call come back first
        n = max(1, min(self.group.num_healthy, len(batch)))
        bounds = [len(batch) * k // n for k in range(n + 1)]
        # Each chunk is put once; a worker receives only its own chunk.
        todo = {k: self.group.put(batch.slice(bounds[k], bounds[k + 1])) for k in range(n)}
        done: dict[int, torch.Tensor] = {}
        for attempt in range(self.max_restarts + 1):
            if attempt:
                self.group.restore()
            while todo and self.group.num_healthy:  # waves: one chunk per healthy worker each
                wave = dict(zip(self.group.healthy_actor_ids(), sorted(todo)))  # worker -> chunk
                started = self.group.start_each({w: (lambda a, c=todo[k]: a.score.remote(c)) for w, k in wave.items()})
                for r in self.group.collect(started, timeout_s=self.timeout_s):
                    if r.ok:
                        done[wave[r.actor_id]] = r.value
                        del todo[wave[r.actor_id]]
                    elif not is_actor_death(r.error):  # the same input would fail again: no retry
                        raise call_error(f"reward model {self.model_path}: score", [r], RewardWorkerError,
                                         self.timeout_s)
            if not todo:
                self.group.restore()  # a worker lost in this call restarts now (its model loads meanwhile)
                return torch.cat([done[k] for k in range(n)])
        raise RewardWorkerError(f"reward workers ({self.model_path}) died or did not answer within {self.timeout_s:.0f} s "
                                f"in {self.max_restarts + 1} rounds of restarts; check their logs (e.g. out of memory).")

    def features(self, batch: RewardInput) -> torch.Tensor:
        """(B, H) trunk features of the current version (one worker: a selector's few candidates)."""
        self.group.restore()
        (result,) = self.group.call(lambda a: a.features.remote(self.group.put(batch)),
                                    actor_ids=self.group.healthy_actor_ids()[:1], timeout_s=self.timeout_s)
        if not result.ok:
            raise call_error(f"reward model {self.model_path}: features", [result], RewardWorkerError, self.timeout_s)
        return result.value

    def load_version(self, handle, path: str, reward_mean: float, reward_std: float) -> int:
        """Every worker hot-swaps to the published version `handle` (its folder: `path`, which a
        restarted worker loads). A worker that fails is restarted on the folder, so no worker
        scores with an older version afterwards. Returns the version."""
        self.model_path = str(path)
        results = self.group.call(lambda a: a.load_weights.remote(handle, reward_mean, reward_std),
                                  timeout_s=self.timeout_s)
        for r in results:
            if not r.ok:
                self.group.mark_unhealthy(r.actor_id)
        self.group.restore()  # the failed ones start again from `path`
        return handle.version

    def shutdown(self) -> None:
        self.group.shutdown()
