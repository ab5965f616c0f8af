"""A rollout worker's side of LoRA (learner.lora_rank > 0, docs/rollout.md#lora): every push
carries the adapter matrices only (tidal.common.lora), and the worker loads them one of two ways
(rollout.lora_load, resolved in LoraSpec.load):

* adapter - as a vLLM LoRA adapter: the tensors are written as a peft adapter folder in the
  worker's private scratch folder, registered with the engine under a new id (the old one is
  removed), and every later request names it. The engine applies B @ A per token; its prefix
  cache is keyed by the adapter, so no cached block of an older adapter is reused.
* merge - into the worker's own copy of the base: W = W_base + B @ A * alpha / r for every adapted
  layer, reloaded into the engine (only those layers). The base copy is the model folder itself,
  read through safetensors' memory map on each push (the page cache holds it; nothing is kept in
  the process), so the merge never compounds onto an earlier merge.
"""

from __future__ import annotations

import json
import shutil
import tempfile
from pathlib import Path
from typing import Iterable

import torch

from tidal.common.lora import LoraSpec, is_adapter_name, merged_weights, write_adapter


class BaseWeights:
    """The base model's tensors by HF name, read on demand from its safetensors file(s)."""

    def __init__(self, model_path: str | Path):
        folder = Path(model_path)
        index = folder / "model.safetensors.index.json"
        if index.is_file():
            weight_map = json.loads(index.read_text())["weight_map"]
            self.files = {name: folder / f for name, f in weight_map.items()}
        else:
            from safetensors import safe_open

            single = folder / "model.safetensors"
            if not single.is_file():
                raise FileNotFoundError(f"{folder} holds no safetensors weights; rollout.lora_load=merge reads its "
                                        "base weights from them")
            with safe_open(str(single), "pt") as f:
                self.files = {name: single for name in f.keys()}

    def get(self, names: Iterable[str]) -> dict[str, torch.Tensor]:
        from safetensors import safe_open

        by_file: dict[Path, list[str]] = {}
        for name in names:
            if name not in self.files:
                raise KeyError(f"the base model has no tensor {name!r} for the LoRA merge")
            by_file.setdefault(self.files[name], []).append(name)
        out = {}
        for path, wanted in by_file.items():
            with safe_open(str(path), "pt") as f:
                out.update({n: f.get_tensor(n) for n in wanted})
        return out


class LoraReceiver:
    """Turns a pushed adapter into what the worker's engine loads (see module docstring)."""

    def __init__(self, spec: LoraSpec, model_path: str | Path):
        if spec.load not in ("adapter", "merge"):
            raise ValueError(f"LoraReceiver loads adapters as 'adapter' or 'merge', not {spec.load!r}")
        self.spec, self.model_path = spec, str(model_path)
        self.base = BaseWeights(model_path) if spec.load == "merge" else None
        self.scratch = Path(tempfile.mkdtemp(prefix="tidal-lora-")) if spec.load == "adapter" else None
        self.folder: Path | None = None  # adapter mode: the folder of the loaded adapter

    @staticmethod
    def adapter(named_tensors: Iterable[tuple[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
        """The pushed tensors, refused unless every one is a LoRA matrix under peft's names."""
        adapter = dict(named_tensors)
        stray = sorted(k for k in adapter if not is_adapter_name(k))
        if stray or not adapter:
            raise ValueError(f"a LoRA worker receives adapter matrices only (learner.lora_rank > 0), got "
                             f"{stray[:3] or 'no tensors'}; the learner and the pool disagree about LoRA")
        return adapter

    def merged(self, adapter: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """merge: the adapted layers' weights, base + B @ A * scaling, under HF names, with the base
        weights of the layers fused with them (a partial reload needs whole fused groups)."""
        from tidal.common.lora import adapter_modules, fused_siblings

        names = {sib for module in adapter_modules(adapter) for sib in fused_siblings(f"{module}.weight")}
        base = self.base.get(sorted(names))
        return {**base, **merged_weights(base, adapter, self.spec.scaling)}

    def write(self, adapter: dict[str, torch.Tensor], version: int) -> Path:
        """adapter: a fresh peft folder for `version`; the previous one is deleted."""
        old, self.folder = self.folder, write_adapter(self.scratch / f"v{version}", adapter, self.spec, self.model_path)
        if old is not None and old != self.folder:
            shutil.rmtree(old, ignore_errors=True)
        return self.folder

    def close(self) -> None:
        if self.scratch is not None:
            shutil.rmtree(self.scratch, ignore_errors=True)
