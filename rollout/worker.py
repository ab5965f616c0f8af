"""The rollout worker: one vLLM engine that generates completions and loads new weights.

A plain class; `RolloutPool` runs it as a Ray actor (or in-process in local mode). The engine
runs in the actor's own process (VLLM_ENABLE_V1_MULTIPROCESSING=0: starts in seconds, and the
weight iterator reaches the vLLM worker as tensors, docs/platform.md#p-vllm-reload), with an explicit dtype
(without one vLLM on CPU drops to bf16), the `WeightLoader` extension, and the device options of
`engine_options` (eager on CPU; CUDA graphs, memory share, tensor parallel and sleep mode on GPU).

Actor calls run one at a time, so a generate call never sees a weight change half-way: every
sample of a call carries the one weight version it was generated with.
"""

from __future__ import annotations

import os
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Iterator

import torch

from tidal.actors.devices import enter_device
from tidal.actors.threads import apply_threads
from tidal.actors.weight_delta import DeltaReceiver, PullStats, load_source
from tidal.actors.weights import WeightHandle, WeightTransport, iter_buckets
from tidal.common.config import RolloutConfig
from tidal.common.lora import LoraSpec
from tidal.common.precision import torch_dtype
from tidal.common.types import PromptBatch, RolloutBatch
from tidal.rollout.lora_load import LoraReceiver
from tidal.rollout.sampling import Sampling, truncate_at_eos

WEIGHT_LOADER_EXT = "tidal.rollout.vllm_ext.WeightLoader"

# Engine-process settings (docs/platform.md#p-runtime-env); set before vLLM is imported, unless already set.
ENGINE_ENV = {
    "VLLM_ENABLE_V1_MULTIPROCESSING": "0",
    "VLLM_CPU_OMP_THREADS_BIND": "nobind",
    "RAY_ENABLE_ZERO_COPY_TORCH_TENSORS": "1",
    "TOKENIZERS_PARALLELISM": "false",
}


@dataclass(frozen=True)
class WorkerInfo:
    worker_id: int
    pid: int
    weight_version: int
    backend: str
    num_threads: int = 0


def engine_options(rollout: RolloutConfig, dtype: str, seed: int, on_gpu: bool, lora: LoraSpec | None = None) -> dict:
    """vLLM engine arguments besides the model: the explicit dtype, the logprobs of the distribution
    sampled from, the weight-loader extension, LoRA slots when adapters are loaded as such
    (rollout.lora_load adapter: one adapter, of at least the learner's rank); then per device. CPU:
    eager (graph compilation costs 15-37 s per start there) and a KV cache of rollout.kv_cache_gb.
    GPU: CUDA graphs unless rollout.cuda_graphs is off, rollout.gpu_memory_utilization of each GPU,
    tensor parallel over the actor's rollout.tensor_parallel_size GPUs (child processes of this
    actor, on its bundle's GPUs), and the sleep-mode allocator when rollout.sleep is true."""
    options = dict(dtype=torch_dtype(dtype), max_model_len=rollout.max_model_len, seed=seed,
                   worker_extension_cls=WEIGHT_LOADER_EXT, logprobs_mode="processed_logprobs")
    if lora is not None and lora.load == "adapter":
        options.update(enable_lora=True, max_lora_rank=lora.vllm_max_rank(), max_loras=1)
    if not on_gpu:
        return {**options, "enforce_eager": True, "kv_cache_memory_bytes": int(rollout.kv_cache_gb * 2**30)}
    options.update(enforce_eager=not rollout.cuda_graphs, gpu_memory_utilization=rollout.gpu_memory_utilization,
                   tensor_parallel_size=rollout.tensor_parallel_size, enable_sleep_mode=rollout.sleep)
    if rollout.tensor_parallel_size > 1:
        options["distributed_executor_backend"] = "mp"  # not "ray": its bundles would be one GPU each
    return options


def check_prompts(prompts: PromptBatch, max_model_len: int, max_new_tokens: int) -> None:
    """Raise a clear error for a prompt the engine cannot take (naming it and the fix)."""
    if len(prompts.text) != len(prompts.index) or len(prompts.token_ids) != len(prompts.index):
        raise ValueError(f"PromptBatch fields disagree in length: index {len(prompts.index)}, "
                         f"text {len(prompts.text)}, token_ids {len(prompts.token_ids)}.")
    for idx, ids in zip(prompts.index, prompts.token_ids):
        if not ids:
            raise ValueError(f"prompt {idx} has no tokens; drop empty prompts before generating.")
        if len(ids) + max_new_tokens > max_model_len:
            raise ValueError(
                f"prompt {idx} has {len(ids)} tokens; with rollout.max_new_tokens={max_new_tokens} it "
                f"exceeds rollout.max_model_len={max_model_len}. Raise rollout.max_model_len or lower "
                f"data.max_prompt_tokens.")


def assemble(prompts: PromptBatch, sampling: Sampling, responses: list[list[list[int]]],
             logprobs: list[list[list[float]]], texts: list[list[str]], eos_ids: set[int],
             weight_version: int) -> RolloutBatch:
    """Build the RolloutBatch: rows grouped by prompt (n per prompt, in prompt order), every
    response cut after its first EOS (docs/implementation.md#d4) with its logprobs cut to match.
    responses/logprobs/texts: [prompt][sample] -> tokens / per-token logprobs / text."""
    rows: dict[str, list] = {k: [] for k in ("pi", "pt", "pids", "rt", "rids", "lp", "fr", "ref")}
    for p, idx in enumerate(prompts.index):
        if len(responses[p]) != sampling.n:
            raise RuntimeError(f"engine returned {len(responses[p])} samples for prompt {idx}, expected {sampling.n}")
        for ids, lps, text in zip(responses[p], logprobs[p], texts[p]):
            cut, stopped = truncate_at_eos(list(ids), eos_ids)
            rows["pi"].append(idx)
            rows["pt"].append(prompts.text[p])
            rows["pids"].append(list(prompts.token_ids[p]))
            rows["rt"].append(text)
            rows["rids"].append(cut)
            rows["lp"].append([float(x) for x in lps[: len(cut)]])
            rows["fr"].append("stop" if stopped else "length")
            if prompts.reference:
                rows["ref"].append(prompts.reference[p])
    return RolloutBatch(rows["pi"], rows["pt"], rows["pids"], rows["rt"], rows["rids"], rows["lp"],
                        rows["fr"], [weight_version] * len(rows["pi"]), rows["ref"])


def order_by_prompt(batch: RolloutBatch, prompts: PromptBatch, n: int) -> RolloutBatch:
    """Rows sorted by prompt index (stable: a prompt's samples stay in order), after checking
    that every prompt was answered exactly n times."""
    counts: dict[int, int] = {}
    for i in batch.prompt_index:
        counts[i] = counts.get(i, 0) + 1
    wrong = [i for i in prompts.index if counts.get(i) != n]
    if wrong or len(counts) != len(prompts):
        raise RuntimeError(f"prompts answered the wrong number of times (expected {n}): "
                           f"{[(i, counts.get(i, 0)) for i in wrong[:5]]}")
    order = sorted(range(len(batch)), key=lambda r: batch.prompt_index[r])
    pick = lambda xs: [xs[r] for r in order] if xs else xs  # noqa: E731
    return RolloutBatch(*(pick(getattr(batch, f)) for f in (
        "prompt_index", "prompt_text", "prompt_ids", "response_text", "response_ids",
        "response_logprobs", "finish_reason", "weight_version", "reference", "token_versions")))


def eos_token_ids(model_path: str | Path, tokenizer) -> set[int]:
    """The tokenizer's EOS plus any extra EOS ids of the model's generation config."""
    ids = {tokenizer.eos_token_id} if tokenizer.eos_token_id is not None else set()
    try:
        from transformers import GenerationConfig

        extra = GenerationConfig.from_pretrained(str(model_path)).eos_token_id
        ids |= set(extra if isinstance(extra, list) else [extra] if extra is not None else [])
    except OSError:  # no generation_config.json
        pass
    return ids


class RolloutWorker:
    """A vLLM engine: `generate` (PromptBatch -> RolloutBatch) and `load_weights` (handle)."""

    backend = "vllm"

    def __init__(self, model_path: str, rollout: RolloutConfig, dtype: str = "float32",
                 seed: int = 0, worker_id: int = 0, num_threads: int = 0, lora: LoraSpec | None = None):
        for key, value in ENGINE_ENV.items():
            os.environ.setdefault(key, value)
        # before the engine starts: vLLM's CPU worker disables torch.set_num_threads afterwards
        self.num_threads = apply_threads(num_threads)
        from vllm import LLM

        from tidal.common.models import load_tokenizer

        self.worker_id, self.weight_version, self.rollout = worker_id, 0, rollout
        on_gpu = enter_device(rollout.gpus_per_worker > 0, f"rollout worker {worker_id}").type == "cuda"
        if not on_gpu:  # eager as the model is: no torch.compile of vLLM's sampler helpers (3 s per start)
            torch.compiler.set_stance("force_eager")
        # CPU: vLLM's CPU platform lets VLLM_CPU_KVCACHE_SPACE (whole GB) override the explicit KV-cache
        # size, so it is hidden while the engine is configured.
        saved = None if on_gpu else os.environ.pop("VLLM_CPU_KVCACHE_SPACE", None)
        try:
            self.llm = LLM(model=str(model_path), **engine_options(rollout, dtype, seed, on_gpu, lora))
        finally:
            if saved is not None:
                os.environ["VLLM_CPU_KVCACHE_SPACE"] = saved
        self.tokenizer = load_tokenizer(model_path)
        self.eos_ids = eos_token_ids(model_path, self.tokenizer)
        self.transports: dict[str, WeightTransport] = {}
        self.delta = DeltaReceiver()  # the version it holds, for rollout.weight_delta pushes
        # LoRA (learner.lora_rank > 0): pushes carry adapters; None until the first one (B = 0: the base)
        self.lora = None if lora is None or lora.load == "full" else LoraReceiver(lora, model_path)
        self.lora_request = None
        self.asleep = False
        if rollout.sleep:  # free the GPU before the learners start beside it
            self._sleep()

    # ------------------------------------------------------------------ generation

    def generate(self, prompts: PromptBatch, sampling: Sampling) -> RolloutBatch:
        from vllm import SamplingParams

        check_prompts(prompts, self.rollout.max_model_len, sampling.max_new_tokens)
        params = [SamplingParams(
            n=sampling.n, temperature=sampling.temperature, top_p=sampling.top_p,
            top_k=max(sampling.top_k, 0), max_tokens=sampling.max_new_tokens, logprobs=0,
            seed=sampling.prompt_seed(idx), stop_token_ids=sorted(self.eos_ids),
        ) for idx in prompts.index]
        inputs = [{"prompt_token_ids": list(ids)} for ids in prompts.token_ids]
        with self._awake():
            outputs = self.llm.generate(inputs, params, use_tqdm=False, lora_request=self.lora_request)
        responses, logprobs, texts = [], [], []
        for out in outputs:  # same order as the inputs
            completions = sorted(out.outputs, key=lambda c: c.index)
            responses.append([list(c.token_ids) for c in completions])
            # logprobs=0 returns the sampled token's logprob at every position.
            logprobs.append([[pos[t].logprob for pos, t in zip(c.logprobs, c.token_ids)] for c in completions])
            texts.append([c.text for c in completions])
        return assemble(prompts, sampling, responses, logprobs, texts, self.eos_ids, self.weight_version)

    # ------------------------------------------------------------------ weights

    def load_weights(self, handle: WeightHandle) -> int:
        """Pull `handle` through its transport and load it; returns the new weight version. A delta
        version (rollout.weight_delta) loads only what changed when this worker holds its base."""
        named, partial = load_source(handle, self.transports, self.delta, complete=self.lora is not None)
        if partial and not named:  # nothing changed since the version it holds: no reload to do
            self.weight_version = int(handle.version)
            return self.weight_version
        return self.load_named_tensors(named, handle.version, partial)

    def pull_stats(self) -> PullStats:
        """What the last delta-sync load pulled (full or delta, bytes, why it went full)."""
        return self.delta.last

    def load_named_tensors(self, named_tensors: Iterable[tuple[str, torch.Tensor]], version: int,
                           partial: bool = False) -> int:
        """Load HF-named tensors in place (all of them in one reload, see vllm_ext), then drop
        the prefix cache: cached KV blocks were computed by the old weights (docs/platform.md#p-vllm-prefix-cache).
        With LoRA the tensors are an adapter (tidal.rollout.lora_load); `partial`: only some layers come."""
        if self.lora is not None:
            return self._load_adapter(LoraReceiver.adapter(named_tensors), version)
        return self._reload(named_tensors, version, partial)

    def _reload(self, named_tensors: Iterable[tuple[str, torch.Tensor]], version: int, partial: bool) -> int:
        with self._awake():
            if self.rollout.tensor_parallel_size > 1:
                # the engine's tensor-parallel workers are other processes, which an iterator cannot
                # reach: the push goes to them a bucket at a time (on GPU a partial load is fine)
                for chunk in iter_buckets(named_tensors, self.rollout.weight_bucket_mb):
                    self.llm.collective_rpc("tidal_load_weights", args=(chunk,))
            else:
                self.llm.collective_rpc("tidal_load_weights", args=(named_tensors, partial))
            self.llm.reset_prefix_cache()
        self.weight_version = int(version)
        return self.weight_version

    def _load_adapter(self, adapter: dict[str, torch.Tensor], version: int) -> int:
        """rollout.lora_load: a vLLM LoRA adapter under a new id, or merged into the base's adapted layers."""
        if self.lora.spec.load == "merge":
            return self._reload(self.lora.merged(adapter).items(), version, partial=True)
        from vllm.lora.request import LoRARequest

        old = self.lora_request
        request = LoRARequest(f"tidal-v{version}", (old.lora_int_id + 1) if old else 1,
                              str(self.lora.write(adapter, version)))
        with self._awake():
            if old is not None:
                self.llm.llm_engine.remove_lora(old.lora_int_id)
            self.llm.llm_engine.add_lora(request)  # loads it now: a bad adapter fails the push, not a generate
        self.lora_request, self.weight_version = request, int(version)
        return self.weight_version

    # ------------------------------------------------------------------ sleep mode (rollout.sleep)

    def _sleep(self) -> None:
        """vLLM sleep level 1: weights to host memory, KV cache freed (and the prefix cache with it)."""
        self.llm.sleep(level=1)
        self.asleep = True

    @contextmanager
    def _awake(self) -> Iterator[None]:
        """The engine awake inside the block (all of it: a partly woken engine must not serve), asleep
        again after it when rollout.sleep is true; the learners use the memory in between."""
        if not self.asleep:
            yield
            return
        self.llm.wake_up()
        self.asleep = False
        try:
            yield
        finally:
            self._sleep()

    def join_transport(self, transport: WeightTransport) -> None:
        """Register a receiver-side transport (e.g. a collective group) for later handles."""
        transport.join()
        self.transports[transport.name] = transport

    def load_ipc_bucket(self, bucket) -> int:
        """rollout.weight_transport=ipc: load one bucket shared by the learner rank on this GPU
        (tidal.actors.ipc); the engine wakes at the first and stays awake until finish_ipc."""
        from tidal.actors.ipc import opened

        if self.asleep:
            self.llm.wake_up()
            self.asleep = False
        with opened(bucket) as named:
            return self.llm.collective_rpc("tidal_load_weights", args=(named,))[0]

    def finish_ipc(self, version: int) -> int:
        """Every bucket of `version` is loaded: it is the engine's weights now."""
        self.llm.reset_prefix_cache()
        self.weight_version = int(version)
        if self.rollout.sleep:
            self._sleep()
        return self.weight_version

    # ------------------------------------------------------------------ probes

    def info(self) -> WorkerInfo:
        return WorkerInfo(self.worker_id, os.getpid(), self.weight_version, self.backend, self.num_threads)
