"""Dataset I/O (jsonl/parquet, schema errors, atomic writes, chat templates, PromptDataset)
and the built-in sentiment task."""

import json
import statistics
import tracemalloc

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from tidal.common.data import (
    ComparisonRecord, DataError, DemonstrationRecord, PromptRecord, RankingRecord, iter_records, read_records,
    ranking_problem, write_records,
)
from tidal.common.prompts import DataState, PromptDataset, render_demonstration, render_prompt

CHAT = [{"role": "system", "content": "Be kind."}, {"role": "user", "content": "Say hi ✓"}]
RECORDS = {
    "prompts": [PromptRecord("The food was"), PromptRecord(CHAT, reference="hi"), PromptRecord("é ünïcode", None)],
    "demonstrations": [DemonstrationRecord("Hello", " world"), DemonstrationRecord(CHAT, "Hi there!")],
    "comparisons": [ComparisonRecord("Q", "good", "bad"), ComparisonRecord(CHAT, "nice", "rude", 1 / 6)],
    "rankings": [RankingRecord("Q", ["a", "b", "c"], [2, 0, 1]), RankingRecord(CHAT, ["x", "y"], [0, 1])],
}
TEMPLATE = ("{% for m in messages %}<|{{ m['role'] }}|> {{ m['content'] }} <|end|>\n{% endfor %}"
            "{% if add_generation_prompt %}<|assistant|>{% endif %}")


def make_tokenizer(add_bos: bool = False):
    """A word-level tokenizer with a chat template (tokens are whitespace-separated words)."""
    from tokenizers import Tokenizer, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    specials = ["<unk>", "<pad>", "<s>", "<|end|>", "<|user|>", "<|system|>", "<|assistant|>"]
    vocab = {w: i for i, w in enumerate(specials + [f"w{i}" for i in range(100)])}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    if add_bos:
        tok.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 2)])
    return PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", pad_token="<pad>", bos_token="<s>",
                                   eos_token="<|end|>", chat_template=TEMPLATE)


# ---------------------------------------------------------------------------- round trips

@pytest.mark.parametrize("fmt", ["jsonl", "parquet"])
@pytest.mark.parametrize("kind", list(RECORDS))
def test_round_trip(tmp_path, kind, fmt):
    path = tmp_path / f"{kind}.{fmt}"
    assert write_records(path, RECORDS[kind]) == len(RECORDS[kind])
    assert read_records(path, kind) == RECORDS[kind]


def test_chat_demonstrations_from_messages(tmp_path):
    path = tmp_path / "sft.jsonl"
    rows = [{"messages": CHAT + [{"role": "assistant", "content": "Hello!"}], "id": 7},
            {"prompt": "2+2=", "response": "4", "extra": [1]}]
    path.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    assert read_records(path, "demonstrations") == [DemonstrationRecord(CHAT, "Hello!"), DemonstrationRecord("2+2=", "4")]
    # Written back, a chat demonstration is one `messages` list ending with the assistant turn.
    write_records(path, read_records(path, "demonstrations"))
    first = json.loads(path.read_text().splitlines()[0])
    assert first == {"messages": CHAT + [{"role": "assistant", "content": "Hello!"}]}


@pytest.mark.parametrize("content", ["", "\n\n"])
def test_empty_jsonl_gives_zero_records(tmp_path, content):
    path = tmp_path / "empty.jsonl"
    path.write_text(content)
    assert read_records(path, "comparisons") == []


def test_empty_parquet_gives_zero_records(tmp_path):
    write_records(tmp_path / "empty.parquet", [])
    assert read_records(tmp_path / "empty.parquet", "rankings") == []


def test_unknown_suffix_and_kind(tmp_path):
    with pytest.raises(DataError, match=r"\.csv.*use a \.jsonl"):
        read_records(tmp_path / "data.csv", "prompts")
    with pytest.raises(ValueError, match="unknown record kind 'pairs'"):
        read_records(tmp_path / "data.jsonl", "pairs")


# ---------------------------------------------------------------------------- streaming

def test_jsonl_streams_lazily_with_bounded_memory(tmp_path):
    n = 200_000
    path = tmp_path / "big.jsonl"
    line = '{"prompt": "p%d", "chosen": "good", "rejected": "bad"}\n'
    with open(path, "w") as f:
        f.writelines(line % i for i in range(n))
        f.write("{not json\n")  # an eager reader would fail before yielding anything
    it = iter_records(path, "comparisons", batch_rows=1000)
    tracemalloc.start()  # traced over the first 20k rows only: tracing is slow
    try:
        assert next(it) == ComparisonRecord("p0", "good", "bad")
        for count, _ in enumerate(it, start=2):
            if count == 20_000:
                break
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < path.stat().st_size / 20, f"peak {peak} B while streaming a {path.stat().st_size} B file"
    with pytest.raises(DataError, match=rf"^big.jsonl:{n + 1}: malformed JSON"):
        for count, _ in enumerate(it, start=count + 1):
            pass
    assert count == n


def test_parquet_streams_by_batches(tmp_path):
    n = 200_000
    path = tmp_path / "big.parquet"
    write_records(path, (PromptRecord(f"prompt number {i}") for i in range(n)))  # row groups of 8192
    table_bytes = pq.read_table(path).nbytes
    base, peak, count = pa.total_allocated_bytes(), 0, 0
    for record in iter_records(path, "prompts", batch_rows=1000):
        if count % 5000 == 0:
            peak = max(peak, pa.total_allocated_bytes() - base)
        count += 1
    assert count == n and record == PromptRecord(f"prompt number {n - 1}")
    assert peak < table_bytes / 5, f"arrow held {peak} B of a {table_bytes} B table"


# ---------------------------------------------------------------------------- schema errors

GOOD = {"comparisons": {"prompt": "p", "chosen": "c", "rejected": "r"},
        "rankings": {"prompt": "p", "responses": ["a", "b"], "ranking": [1, 0]},
        "demonstrations": {"prompt": "p", "response": "r"},
        "prompts": {"prompt": "p"}}
BAD = [  # kind, bad row (JSON text), field named in the error
    ("comparisons", '{"prompt": "p", "chosen": "c"}', "rejected"),
    ("comparisons", '{"prompt": "p", "chosen": null, "rejected": "r"}', "chosen"),
    ("comparisons", '{"prompt": "p", "chosen": 3, "rejected": "r"}', "chosen"),
    ("comparisons", '{"prompt": "p", "chosen": ["c"], "rejected": "r"}', "chosen"),
    ("comparisons", '{"chosen": "c", "rejected": "r"}', "prompt"),
    ("rankings", '{"prompt": "p", "responses": ["a", "b"], "ranking": [0, 0]}', "ranking"),
    ("rankings", '{"prompt": "p", "responses": ["a", "b"], "ranking": [0, 1, 2]}', "ranking"),
    ("rankings", '{"prompt": "p", "responses": ["a"], "ranking": [0]}', "responses"),
    ("rankings", '{"prompt": "p", "responses": ["a", null], "ranking": [0, 1]}', "responses[1]"),
    ("demonstrations", '{"messages": [{"role": "user", "content": "hi"}]}', "messages"),
    ("demonstrations", '{"messages": [{"role": "user"}, {"role": "assistant", "content": "x"}]}', "messages[0]"),
    ("prompts", '{"prompt": "p", "reference": 5}', "reference"),
    ("prompts", '{"prompt": ["not", "messages"]}', "prompt[0]"),
    ("comparisons", '{"prompt": "p", "chosen": "same", "rejected": "same "}', "rejected"),  # teaches nothing
    ("comparisons", '{"prompt": "p", "chosen": "c", "rejected": "r", "weight": 0}', "weight"),
    ("comparisons", '{"prompt": "p", "chosen": "c", "rejected": "r", "weight": "1/6"}', "weight"),
    ("comparisons", '{"prompt": "p", "chosen": "c", "rejected": "r", "weight": true}', "weight"),
    ("rankings", '{"prompt": "p", "responses": ["a", "b", "a"], "ranking": [0, 1, 2]}', "responses[2]"),
    ("rankings", '{"prompt": "p", "responses": ["a", "b", "c"], "ranking": [0, 0, 1]}', "ranking"),  # a tie skips
    ("rankings", '{"prompt": "p", "responses": ["a", "b", "c"], "ranking": [1, 1, 1]}', "ranking"),
    ("rankings", '{"prompt": "p", "responses": ["a", "b", "c"], "ranking": [0, 0, 0]}', "ranking"),  # no preference
    ("rankings", '{"prompt": "p", "responses": ["a", "b"], "ranking": [0, true]}', "ranking"),
]


def test_rankings_may_hold_ties_as_shared_ranks(tmp_path):
    path = tmp_path / "ties.jsonl"
    path.write_text('{"prompt": "p", "responses": ["a", "b", "c"], "ranking": [0, 0, 2]}\n'
                    '{"prompt": "q", "responses": ["a", "b", "c", "d"], "ranking": [3, 1, 0, 1]}\n')
    assert [r.ranking for r in read_records(path, "rankings")] == [[0, 0, 2], [3, 1, 0, 1]]
    assert ranking_problem([2, 0, 1], 3) is None and ranking_problem([0, 1, 1], 3) is None
    assert "share rank 0" in ranking_problem([0, 0], 2)


@pytest.mark.parametrize("kind,bad,field", BAD)
def test_bad_row_names_file_row_and_field(tmp_path, kind, bad, field):
    path = tmp_path / "data.jsonl"
    path.write_text(json.dumps(GOOD[kind]) + "\n\n" + bad + "\n")  # the blank line still counts as a line
    with pytest.raises(DataError) as err:
        read_records(path, kind)
    msg = str(err.value)
    assert msg.startswith(f"data.jsonl:3: field '{field}': "), msg
    assert "needs" in msg  # says what a valid row looks like


@pytest.mark.parametrize("bad,problem", [(b"{oops", "malformed JSON"), (b"[1, 2]", "expected a JSON object, got a list"),
                                         ('{"prompt": "caf\xe9"}'.encode("latin-1"), "not UTF-8")])
def test_bad_json_line_names_file_and_row(tmp_path, bad, problem):
    path = tmp_path / "data.jsonl"
    path.write_bytes(json.dumps(GOOD["comparisons"]).encode() + b"\n" + bad + b"\n")
    with pytest.raises(DataError, match=rf"^data.jsonl:2: {problem}"):
        read_records(path, "comparisons")


def test_parquet_errors_name_row_and_field(tmp_path):
    path = tmp_path / "prefs.parquet"
    pq.write_table(pa.table({"prompt": ["a", "b", "c"], "chosen": ["x", "y", None], "rejected": ["r"] * 3}), path)
    with pytest.raises(DataError, match=r"^prefs.parquet:3: field 'chosen': expected a string \(an empty one is allowed\), got null"):
        read_records(path, "comparisons")
    pq.write_table(pa.table({"prompt": ["a"], "chosen": ["x"]}), path)
    with pytest.raises(DataError, match=r"^prefs.parquet:1: field 'rejected': missing"):
        read_records(path, "comparisons")


# ---------------------------------------------------------------------------- atomic writes

@pytest.mark.parametrize("fmt", ["jsonl", "parquet"])
def test_failed_write_keeps_existing_file(tmp_path, fmt):
    path = tmp_path / f"prefs.{fmt}"
    write_records(path, RECORDS["comparisons"])
    before = path.read_bytes()

    def crashing():
        yield from RECORDS["comparisons"] * 20_000  # past one parquet chunk
        raise RuntimeError("disk on fire")

    with pytest.raises(RuntimeError, match="disk on fire"):
        write_records(path, crashing())
    with pytest.raises(TypeError, match="one kind"):
        write_records(path, [RECORDS["comparisons"][0], RECORDS["prompts"][0]])
    assert path.read_bytes() == before
    assert read_records(path, "comparisons") == RECORDS["comparisons"]
    assert sorted(p.name for p in tmp_path.iterdir()) == [path.name]  # no temp files left behind


# ---------------------------------------------------------------------------- chat templates

def test_render_prompt_and_demonstration():
    tok = make_tokenizer()
    assert render_prompt(tok, "w1 w2", use_chat_template=False) == "w1 w2"
    assert render_prompt(tok, "w1 w2", use_chat_template=True) == "<|user|> w1 w2 <|end|>\n<|assistant|>"
    chat = [{"role": "system", "content": "w0"}, {"role": "user", "content": "w1"}]
    assert render_prompt(tok, chat, True) == "<|system|> w0 <|end|>\n<|user|> w1 <|end|>\n<|assistant|>"

    prompt, response = render_demonstration(tok, DemonstrationRecord(chat, "w5 w6"), use_chat_template=True)
    assert prompt == render_prompt(tok, chat, True)
    assert response == " w5 w6 "  # the end-of-turn (= EOS) is left for the trainer to append
    assert render_demonstration(tok, DemonstrationRecord("w1", " w2"), False) == ("w1", " w2")


# ---------------------------------------------------------------------------- PromptDataset

@pytest.fixture
def prompt_file(tmp_path):
    path = tmp_path / "prompts.jsonl"
    write_records(path, [PromptRecord(f"w{i} w{i + 1}", reference=f"r{i}") for i in range(23)])
    return path


def test_prompt_dataset_order_is_a_seeded_permutation(prompt_file):
    tok = make_tokenizer()
    ds = PromptDataset(prompt_file, tok, max_prompt_tokens=8, use_chat_template=False, seed=3)
    batches = list(ds.batches(5, epoch=0))
    assert [len(b) for b in batches] == [5, 5, 5, 5, 3]
    index = [i for b in batches for i in b.index]
    assert sorted(index) == list(range(23)) and index != list(range(23))
    b = batches[0]
    assert b.text[0] == f"w{b.index[0]} w{b.index[0] + 1}" and b.reference[0] == f"r{b.index[0]}"
    assert b.token_ids[0] == tok(b.text[0])["input_ids"]
    assert ds.state == DataState(1, 0)

    same = PromptDataset(prompt_file, tok, 8, False, seed=3)
    assert [i for b in same.batches(5, 0) for i in b.index] == index
    assert ds.order(1) != ds.order(0)
    assert PromptDataset(prompt_file, tok, 8, False, seed=4).order(0) != ds.order(0)


def test_prompt_dataset_resumes_exactly(prompt_file):
    tok = make_tokenizer()
    ds = PromptDataset(prompt_file, tok, 8, False, seed=0)
    it = ds.batches(4, epoch=0)
    next(it), next(it)
    saved = ds.state
    assert saved == DataState(0, 8)
    rest = [b.index for b in it]

    resumed = PromptDataset(prompt_file, tok, 8, False, seed=0)
    resumed.state = DataState(**json.loads(json.dumps(saved.__dict__)))  # as a checkpoint stores it
    assert [b.index for b in resumed.batches(4, epoch=0)] == rest

    # next_batch: fixed size, runs on into the next epoch's order.
    ds.state = DataState(0, 20)
    b = ds.next_batch(5)
    assert b.index == ds.order(0)[20:] + ds.order(1)[:2] and ds.state == DataState(1, 2)


def test_prompt_dataset_truncates_from_the_left(tmp_path):
    path = tmp_path / "long.jsonl"
    write_records(path, [PromptRecord(" ".join(f"w{i}" for i in range(20)))])
    tok = make_tokenizer(add_bos=True)
    batch = PromptDataset(path, tok, max_prompt_tokens=5, use_chat_template=False).next_batch(1)
    assert batch.token_ids[0] == tok("<s> w16 w17 w18 w19", add_special_tokens=False)["input_ids"]
    assert batch.text[0].split()[-1] == "w19"
    chat = PromptDataset(path, tok, max_prompt_tokens=3, use_chat_template=True).next_batch(1)
    assert tok.convert_ids_to_tokens(chat.token_ids[0]) == ["w19", "<|end|>", "<|assistant|>"]


# ---------------------------------------------------------------------------- sentiment task

@pytest.fixture(scope="module")
def sentiment(tmp_path_factory):
    from tidal.common.sentiment import write_sentiment_task

    paths = write_sentiment_task(tmp_path_factory.mktemp("sentiment"), seed=0)
    return {name: read_records(p, name.split("_")[0]) for name, p in paths.items()}, paths


def test_sentiment_task_files(sentiment):
    data, paths = sentiment
    assert sorted(paths) == sorted(f"{k}_{s}" for k in ("prompts", "demonstrations", "comparisons", "rankings")
                                   for s in ("train", "heldout"))
    for name, path in paths.items():
        assert path.name == f"{name}.jsonl" and len(data[name]) > 100, name
    assert len(data["prompts_train"]) > 10_000 and len(data["comparisons_train"]) > 2000
    for records in data.values():
        for r in records:
            texts = [r.prompt] + [getattr(r, f) for f in ("response", "chosen", "rejected") if hasattr(r, f)]
            for text in texts + getattr(r, "responses", []):
                assert text.isascii() and "http" not in text and text.strip() == " ".join(text.split()), text


def test_sentiment_splits_are_disjoint(sentiment):
    data, _ = sentiment
    tweets = {s: {d.prompt + d.response for d in data[f"demonstrations_{s}"]} for s in ("train", "heldout")}
    assert not tweets["train"] & tweets["heldout"]
    prompts = {s: {p.prompt for p in data[f"prompts_{s}"]} for s in ("train", "heldout")}
    assert not prompts["train"] & prompts["heldout"]
    chosen = {s: {c.chosen for c in data[f"comparisons_{s}"]} for s in ("train", "heldout")}
    assert len(chosen["train"] & chosen["heldout"]) < 0.02 * len(chosen["heldout"])  # only short common endings


def test_sentiment_preferences_follow_vader(sentiment):
    from tidal.common.sentiment import vader_score

    data, _ = sentiment
    cmp = data["comparisons_train"]
    chosen, rejected = vader_score([c.chosen for c in cmp]), vader_score([c.rejected for c in cmp])
    assert statistics.mean(chosen) > statistics.mean(rejected) + 0.2
    assert statistics.mean(c > r for c, r in zip(chosen, rejected)) > 0.6

    ranks = data["rankings_train"]
    assert all(sorted(r.ranking) == [0, 1, 2] and len(r.responses) == 3 for r in ranks)
    assert 0.2 < statistics.mean(r.ranking[0] == 0 for r in ranks) < 0.5  # the best is not always first
    by_rank = [statistics.mean(vader_score([r.responses[r.ranking.index(k)] for r in ranks])) for k in range(3)]
    assert by_rank[0] > by_rank[1] > by_rank[2], by_rank


def test_sentiment_task_is_deterministic_and_capped(tmp_path, sentiment):
    from tidal.common.sentiment import write_sentiment_task

    full, _ = sentiment
    a = write_sentiment_task(tmp_path / "a", seed=0, max_per_split=50)
    b = write_sentiment_task(tmp_path / "b", seed=0, max_per_split=50, fmt="parquet")
    c = write_sentiment_task(tmp_path / "c", seed=1, max_per_split=50)
    for name in a:
        kind = name.split("_")[0]
        assert read_records(a[name], kind) == full[name][:50]
        assert read_records(b[name], kind) == full[name][:50]
    assert a["comparisons_train"].read_bytes() != c["comparisons_train"].read_bytes()


def test_clean_tweet_and_vader():
    from tidal.common.sentiment import clean_tweet, vader_score

    assert clean_tweet("RT @bob: I love   the new seats http://t.co/x &amp; @ann too") == \
        "I love the new seats & @user too"
    assert clean_tweet("@united too short") is None
    assert clean_tweet("caf\xe9 is nice and the staff were great today") is None
    pos, neg, neutral = vader_score(["I love this, great!", "I hate this, awful.", "The plane is blue."])
    assert -1 <= neg < 0 == neutral < pos <= 1


def test_empty_responses_are_real_samples_to_rank(tmp_path):
    """A collect round's empty completion is what a reward model must learn to rank low."""
    path = tmp_path / "c.jsonl"
    path.write_text('{"prompt": "p", "chosen": "fine, thanks", "rejected": ""}\n'
                    '{"prompt": "q", "responses": ["", "ok", "good"], "ranking": [2, 1, 0]}\n'.split("\n")[0] + "\n")
    assert read_records(path, "comparisons")[0].rejected == ""
    rk = tmp_path / "r.jsonl"
    rk.write_text('{"prompt": "q", "responses": ["", "ok", "good"], "ranking": [2, 1, 0]}\n')
    assert read_records(rk, "rankings")[0].responses[0] == ""
