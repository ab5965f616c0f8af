"""vLLM worker extension that loads new policy weights into a running engine.

vLLM mixes this class into its worker (`LLM(..., worker_extension_cls=
"tidal.rollout.vllm_ext.WeightLoader")`), so `self` below is the vLLM worker. The engine calls
the methods through `llm.collective_rpc("tidal_load_weights", args=(...))`. Run the engine
in-process (VLLM_ENABLE_V1_MULTIPROCESSING=0): then the arguments arrive as the very objects
passed in (an iterator of tensors), not as pickled lists (docs/platform.md#p-vllm-reload).

Why not `model.load_weights` directly: on the CPU backend the linear layers are repacked
after start-up, and a plain load fails (`'Parameter' object has no attribute
'weight_loader'`). The worker's own `reload_weights(..., is_checkpoint_format=True)` restores
the checkpoint layout, loads, and repacks layer by layer. Tensors of one fused layer (q/k/v,
gate/up) may arrive in different buckets: the whole push therefore goes through ONE
`reload_weights` call, fed by an iterator that pulls bucket after bucket.

The method is deliberately not called `update_weights` (the worker already has one).
"""

from __future__ import annotations

import logging
from typing import Iterable, Iterator

import torch


class _TiedHeadReloadFilter(logging.Filter):
    """vLLM's layer-wise reload warns "ParallelLMHead: Failed to load weights" on every push to a
    model with tied embeddings: the checkpoint-format iterator has no lm_head tensor (the head IS
    the embedding), so vLLM puts the old packed head back - which `_retie_lm_head` then rebuilds
    from the new embedding (tests/test_rollout_vllm.py checks logprobs after an update on a tied
    model). Only that message for that layer is dropped; any other failed layer still warns.

    A partial load (`partial=True`: the layers a LoRA merge or a weight delta changed) leaves the
    other layers out on purpose; vLLM puts their packed weights back and warns for each of them and
    once more for the list - those messages are dropped while `partial` is set."""

    partial = False

    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        if self.partial and (message.endswith(": Failed to load weights")
                             or message.startswith("Following weights were not loaded")):
            return False
        return not (message == "ParallelLMHead: Failed to load weights")


_FILTER = _TiedHeadReloadFilter()
_RELOAD_LOGGERS = ("vllm.model_executor.model_loader.reload.layerwise", "vllm.model_executor.model_loader.reload.inplace")


def _quiet_reload() -> None:
    for name in _RELOAD_LOGGERS:
        log = logging.getLogger(name)
        if _FILTER not in log.filters:
            log.addFilter(_FILTER)


class WeightLoader:
    """Methods added to vLLM's worker; `self` is the worker (model_runner, vllm_config, ...)."""

    def tidal_load_weights(self, named_tensors: Iterable[tuple[str, torch.Tensor]], partial: bool = False) -> int:
        """Load (name, tensor) pairs in HF checkpoint naming; returns how many were loaded.
        `partial`: only some layers come (a LoRA merge, a weight delta); the others keep their weights."""
        from vllm.platforms import current_platform

        counted = _Counter(named_tensors)
        model = self.model_runner.get_model()
        _quiet_reload()
        _FILTER.partial = partial
        try:
            if current_platform.is_cpu():
                self.reload_weights(weights_iterator=iter(counted), is_checkpoint_format=True)
            else:
                model.load_weights(iter(counted))
        finally:
            _FILTER.partial = False
        if counted.n == 0:
            raise ValueError("tidal_load_weights received no tensors; the weight push was empty.")
        _retie_lm_head(model, self.vllm_config.model_config.hf_text_config)
        return counted.n


class _Counter:
    """Iterator wrapper that counts the tensors it passes on."""

    def __init__(self, items: Iterable[tuple[str, torch.Tensor]]):
        self.items, self.n = items, 0

    def __iter__(self) -> Iterator[tuple[str, torch.Tensor]]:
        for name, tensor in self.items:
            self.n += 1
            yield name, tensor


def _retie_lm_head(model: torch.nn.Module, hf_config) -> None:
    """Point a tied lm_head back at the (new) input embedding and redo its CPU packing.

    With tied embeddings the checkpoint has no lm_head tensor; `reload_weights` updates
    `embed_tokens` but the CPU backend keeps a separately packed copy of the head, which then
    still holds the OLD weights (logprobs off by ~7e-2, docs/platform.md#p-vllm-tied-head). Re-tying and re-running
    the head's post-load processing rebuilds the packed copy from the new embedding."""
    if not getattr(hf_config, "tie_word_embeddings", False):
        return
    lm_head = getattr(model, "lm_head", None)
    embed = getattr(getattr(model, "model", None), "embed_tokens", None)
    if lm_head is None or embed is None:
        raise NotImplementedError(
            f"{type(model).__name__} has tied embeddings but no model.embed_tokens / lm_head; "
            f"tidal_load_weights cannot re-tie its output head.")
    lm_head.weight = embed.weight
    quant_method = getattr(lm_head, "quant_method", None)
    if quant_method is not None:
        quant_method.process_weights_after_loading(lm_head)
