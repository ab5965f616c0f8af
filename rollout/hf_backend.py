"""The transformers rollout backend (`rollout.backend: hf`): the same interface as the vLLM
worker, for machines or models vLLM cannot serve. Slower (no paged KV cache, no continuous
batching), but it needs nothing beyond transformers.

Logprobs are recomputed with one forward pass over [prompt | response] after generation:
`sequence_logprobs` (the trainer's own function) when no top-k/top-p filter is set, else
`filtered_logprobs` on the same logits, so both backends report the probability of the
distribution actually sampled from (see tidal.rollout.sampling).

Seeding: transformers samples a whole batch from one RNG, so each call is seeded from the
sampling seed and its first prompt index; a prompt's samples then depend on the chunk it
lands in (the vLLM backend seeds each prompt independently).
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Iterable

import torch

from tidal.actors.weight_delta import DeltaReceiver, PullStats, load_source
from tidal.actors.weights import WeightHandle, WeightTransport
from tidal.common.config import RolloutConfig
from tidal.common.lora import LoraSpec
from tidal.common.precision import torch_dtype
from tidal.common.types import PromptBatch, RolloutBatch
from tidal.rollout.lora_load import LoraReceiver
from tidal.rollout.sampling import Sampling, filtered_logprobs
from tidal.rollout.worker import WorkerInfo, assemble, check_prompts, eos_token_ids

class HFRolloutWorker:
    """transformers.generate with the RolloutWorker interface."""

    backend = "hf"

    def __init__(self, model_path: str, rollout: RolloutConfig, dtype: str = "float32",
                 seed: int = 0, worker_id: int = 0, num_threads: int = 0, lora: LoraSpec | None = None):
        from tidal.actors.devices import enter_device
        from tidal.actors.threads import apply_threads
        from tidal.common.models import load_causal_lm, load_tokenizer

        self.num_threads = apply_threads(num_threads)
        self.worker_id, self.weight_version, self.rollout, self.seed = worker_id, 0, rollout, seed
        self.device = enter_device(rollout.gpus_per_worker > 0, f"rollout worker {worker_id}")  # tidal.actors.devices
        self.model = load_causal_lm(model_path, torch_dtype(dtype)).to(self.device)
        self.tokenizer = load_tokenizer(model_path)
        self.eos_ids = eos_token_ids(Path(model_path), self.tokenizer)
        self.transports: dict[str, WeightTransport] = {}
        self.delta = DeltaReceiver()  # the version it holds, for rollout.weight_delta pushes
        # LoRA pushes carry adapters, merged into the base copy (rollout.lora_load merge: tidal.rollout.lora_load)
        self.lora = None if lora is None or lora.load == "full" else LoraReceiver(lora, model_path)

    @torch.no_grad()
    def generate(self, prompts: PromptBatch, sampling: Sampling) -> RolloutBatch:
        check_prompts(prompts, self.rollout.max_model_len, sampling.max_new_tokens)
        pad = self.tokenizer.pad_token_id
        rows = [list(ids) for ids in prompts.token_ids for _ in range(sampling.n)]  # grouped by prompt
        P = max(len(r) for r in rows)
        input_ids = torch.tensor([[pad] * (P - len(r)) + r for r in rows], device=self.device)  # (B, P)
        mask = (torch.arange(P, device=self.device) >= torch.tensor(
            [P - len(r) for r in rows], device=self.device)[:, None]).long()  # (B, P)
        if sampling.seed is not None:
            torch.manual_seed(sampling.prompt_seed(prompts.index[0]) if len(prompts) else sampling.seed)
        out = self.model.generate(input_ids=input_ids, attention_mask=mask,
                                  generation_config=self._generation_config(sampling))
        responses = out[:, P:]  # (B, R), pad after EOS
        lengths = self._lengths(responses)  # (B,) tokens up to and including the first EOS
        logprobs = self._logprobs(out, torch.cat([mask, torch.ones_like(responses)], 1), responses.shape[1], sampling)
        n = sampling.n
        ids = [responses[i, : lengths[i]].tolist() for i in range(len(rows))]
        lps = [logprobs[i, : lengths[i]].tolist() for i in range(len(rows))]
        texts = [self.tokenizer.decode(r, skip_special_tokens=True) for r in ids]
        group = lambda xs: [xs[p * n:(p + 1) * n] for p in range(len(prompts))]  # noqa: E731
        return assemble(prompts, sampling, group(ids), group(lps), group(texts), self.eos_ids, self.weight_version)

    def _generation_config(self, sampling: Sampling):
        """Fully explicit, so no default of the model's generation_config.json (top_k=50,
        repetition penalties, ...) changes the sampling distribution behind our back."""
        from transformers import GenerationConfig

        sample = not sampling.greedy
        return GenerationConfig(
            max_new_tokens=sampling.max_new_tokens, do_sample=sample,
            temperature=sampling.temperature if sample else 1.0, top_p=sampling.top_p if sample else 1.0,
            top_k=max(sampling.top_k, 0) if sample else 0, repetition_penalty=1.0,
            pad_token_id=self.tokenizer.pad_token_id, eos_token_id=sorted(self.eos_ids))

    def _lengths(self, responses: torch.Tensor) -> list[int]:
        is_eos = torch.zeros_like(responses, dtype=torch.bool)
        for e in self.eos_ids:
            is_eos |= responses == e
        R = responses.shape[1]
        first = torch.where(is_eos.any(1), is_eos.float().argmax(1) + 1, torch.full_like(responses[:, 0], R))
        return first.tolist()

    def _logprobs(self, seq: torch.Tensor, mask: torch.Tensor, R: int, sampling: Sampling) -> torch.Tensor:
        """(B, R) logprobs of the generated tokens under the sampling distribution."""
        from tidal.common.models import response_logits, sequence_logprobs

        if R == 0:
            return torch.zeros(seq.shape[0], 0)
        # Tokens after EOS are padding: the mask above marks them real, which only changes
        # the (discarded) logprobs after the first EOS, never those before it (causal model).
        if not sampling.filtered:
            return sequence_logprobs(self.model, seq, mask, R, sampling.temperature or 1.0).float().cpu()
        logits = response_logits(self.model, seq, mask, R)  # (B, R, V)
        return filtered_logprobs(logits, seq[:, -R:], sampling.temperature, sampling.top_k, sampling.top_p).cpu()

    # ------------------------------------------------------------------ weights

    def load_weights(self, handle: WeightHandle) -> int:
        named, _ = load_source(handle, self.transports, self.delta, complete=self.lora is not None)
        return self.load_named_tensors(named, handle.version)  # load_state_dict takes a part as it is

    def pull_stats(self) -> PullStats:
        return self.delta.last

    @torch.no_grad()
    def load_named_tensors(self, named_tensors: Iterable[tuple[str, torch.Tensor]], version: int) -> int:
        """load_state_dict of the given tensors (strict about names, not about completeness);
        a tied lm_head follows its embedding automatically (same Parameter)."""
        state = dict(named_tensors)
        if self.lora is not None:
            state = self.lora.merged(LoraReceiver.adapter(state.items()))
        own = dict(self.model.state_dict())
        unknown = sorted(set(state) - set(own))
        if unknown:
            raise KeyError(f"weights not in the model: {unknown[:5]}{' ...' if len(unknown) > 5 else ''}")
        self.model.load_state_dict(state, strict=False)
        self.weight_version = int(version)
        return self.weight_version

    def join_transport(self, transport: WeightTransport) -> None:
        transport.join()
        self.transports[transport.name] = transport

    def load_ipc_bucket(self, bucket) -> int:
        """rollout.weight_transport=ipc: one bucket shared by the learner rank on this GPU."""
        from tidal.actors.ipc import opened

        with opened(bucket) as named:
            self.load_named_tensors(named, self.weight_version)  # the version changes at finish_ipc
        return len(bucket.names)

    def finish_ipc(self, version: int) -> int:
        self.weight_version = int(version)
        return self.weight_version

    def info(self) -> WorkerInfo:
        return WorkerInfo(self.worker_id, os.getpid(), self.weight_version, self.backend, self.num_threads)
