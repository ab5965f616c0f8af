"""Dataset I/O for RLHF records: jsonl/parquet readers and writers with per-row schema checks,
and chat-template rendering (prompt batches for the RL driver: tidal.common.prompts).

Record kinds and their row fields (unknown extra fields are ignored):
  prompts         prompt | messages, [reference]
  demonstrations  prompt + response, or messages whose last turn is the assistant's (= response)
  comparisons     prompt | messages, chosen, rejected, [weight] (> 0, default 1: a pair's share
                  of its prompt; `tidal label export --format comparisons` writes 1 / C(K, 2) for
                  each pair of a K-wise ranking, as the InstructGPT ranking loss weighs them)
  rankings        prompt | messages, responses (K >= 2, all different), ranking (ranking[i] =
                  rank of responses[i], 0 = best; ties share a rank: `ranking_problem`)
`prompt` is a string; `messages` is a chat list of {role, content} (the prompt conversation).
Files are chosen by suffix: .jsonl / .json (JSON lines) or .parquet.
"""

from __future__ import annotations

import json
import math
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Iterator, Union

import pyarrow as pa
import pyarrow.parquet as pq

from tidal.common.errors import UserError


Message = dict[str, str]
Prompt = Union[str, list[Message]]  # plain text or a chat conversation


class DataError(UserError):
    """A dataset file that does not match its record schema (message: FILE:ROW: field: fix)."""

    kind = "data error"


@dataclass(frozen=True)
class PromptRecord:
    prompt: Prompt
    reference: str | None = None


@dataclass(frozen=True)
class DemonstrationRecord:
    prompt: Prompt
    response: str


@dataclass(frozen=True)
class ComparisonRecord:
    prompt: Prompt
    chosen: str
    rejected: str
    weight: float = 1.0  # the pair's weight in the rm and dpo losses' weighted means


@dataclass(frozen=True)
class RankingRecord:
    prompt: Prompt
    responses: list[str]
    ranking: list[int]  # ranking[i] = rank of responses[i], 0 = best


Record = Union[PromptRecord, DemonstrationRecord, ComparisonRecord, RankingRecord]

_MESSAGES = pa.list_(pa.struct([("role", pa.string()), ("content", pa.string())]))
_PROMPT_FIELDS = [("prompt", pa.string()), ("messages", _MESSAGES)]
SCHEMAS: dict[str, pa.Schema] = {
    "prompts": pa.schema(_PROMPT_FIELDS + [("reference", pa.string())]),
    "demonstrations": pa.schema(_PROMPT_FIELDS + [("response", pa.string())]),
    "comparisons": pa.schema(_PROMPT_FIELDS + [("chosen", pa.string()), ("rejected", pa.string()),
                                               ("weight", pa.float64())]),
    "rankings": pa.schema(_PROMPT_FIELDS + [("responses", pa.list_(pa.string())), ("ranking", pa.list_(pa.int64()))]),
}
_KIND_OF = {PromptRecord: "prompts", DemonstrationRecord: "demonstrations",
            ComparisonRecord: "comparisons", RankingRecord: "rankings"}
_HINTS = {
    "prompts": "Each prompt row needs 'prompt' (a string) or 'messages' (a list of {role, content}); 'reference' is optional.",
    "demonstrations": "Each demonstration row needs 'prompt' and 'response' strings, or 'messages' whose last turn is the assistant's response.",
    "comparisons": "Each comparison row needs prompt (or messages), chosen and rejected; 'weight' (a number > 0, default 1) is optional.",
    "rankings": "Each ranking row needs prompt (or messages), 'responses' (K >= 2 different strings) and 'ranking' (rank of each response, 0 = best: a permutation of 0..K-1, tied responses sharing a rank as in [0, 0, 2]).",
}


# ---------------------------------------------------------------------------- validation

class _Row:
    """One raw row being validated; knows where it came from (`where`, e.g. FILE:ROW) so errors
    can say so, and what to tell the user about the row's format (`hint`)."""

    def __init__(self, where: str, kind: str, data: dict, hint: str | None = None):
        self.where, self.kind, self.data = where, kind, data
        self.hint = _HINTS[kind] if hint is None else hint

    def fail(self, field: str, problem: str) -> DataError:
        return DataError(f"{self.where}: field '{field}': {problem}. {self.hint}")

    def text(self, field: str) -> str:
        if field not in self.data:
            raise self.fail(field, "missing")
        return self.check_text(field, self.data[field])

    def check_text(self, field: str, value) -> str:
        if not isinstance(value, str) or not value.strip():
            raise self.fail(field, f"expected a non-empty string, got {_describe(value)}")
        return value

    def response(self, field: str, value) -> str:
        """A model response to rank: any string, the empty one included (an empty completion is
        a real sample a reward model must learn to rank, e.g. from a collect round)."""
        if not isinstance(value, str):
            raise self.fail(field, f"expected a string (an empty one is allowed), got {_describe(value)}")
        return value

    def messages(self, field: str, value) -> list[Message]:
        if not isinstance(value, list) or not value:
            raise self.fail(field, f"expected a non-empty list of {{role, content}} messages, got {_describe(value)}")
        out = []
        for i, m in enumerate(value):
            if not isinstance(m, dict) or not isinstance(m.get("role"), str) or not m["role"] \
                    or not isinstance(m.get("content"), str):
                raise self.fail(f"{field}[{i}]", f"expected {{'role': str, 'content': str}}, got {_describe(m)}")
            out.append({"role": m["role"], "content": m["content"]})  # extra message keys dropped
        return out

    def prompt(self, allow_assistant_last: bool = False) -> Prompt:
        value = self.data.get("prompt")
        if value is None and self.data.get("messages") is not None:
            msgs = self.messages("messages", self.data["messages"])
            if msgs[-1]["role"] == "assistant" and not allow_assistant_last:
                raise self.fail("messages", "the last message is from the assistant; a prompt conversation must end with the user's turn")
            return msgs
        if value is None:
            raise self.fail("prompt", "missing (and no 'messages')" if "prompt" not in self.data
                            else "expected a non-empty string or a list of messages, got null")
        return self.messages("prompt", value) if isinstance(value, list) else self.check_text("prompt", value)


def _describe(value) -> str:
    if value is None:
        return "null"
    if isinstance(value, str):
        return "an empty string" if not value.strip() else f"the string {value[:40]!r}"
    names = {bool: "a boolean", int: "a number", float: "a number", list: "a list", dict: "an object"}
    return names.get(type(value), type(value).__name__)


def _parse_prompt(row: _Row) -> PromptRecord:
    ref = row.data.get("reference")
    if ref is not None and not isinstance(ref, str):
        raise row.fail("reference", f"expected a string or null, got {_describe(ref)}")
    return PromptRecord(row.prompt(), ref)


def _parse_demonstration(row: _Row) -> DemonstrationRecord:
    if row.data.get("prompt") is None and row.data.get("messages") is not None:
        msgs = row.messages("messages", row.data["messages"])
        if len(msgs) < 2 or msgs[-1]["role"] != "assistant":
            raise row.fail("messages", "the last message must be the assistant's response, after at least one prompt message")
        return DemonstrationRecord(msgs[:-1], row.check_text(f"messages[{len(msgs) - 1}].content", msgs[-1]["content"]))
    return DemonstrationRecord(row.prompt(), row.text("response"))


def _parse_comparison(row: _Row) -> ComparisonRecord:
    for field in ("chosen", "rejected"):
        if field not in row.data:
            raise row.fail(field, "missing")
    weight = row.data.get("weight")
    weight = 1.0 if weight is None else weight  # parquet files without weights read as null
    number = type(weight) in (int, float)
    if not number or not math.isfinite(weight) or weight <= 0:
        raise row.fail("weight", f"expected a finite number > 0 (omit it for 1), got {weight if number else _describe(weight)}")
    record = ComparisonRecord(row.prompt(), row.response("chosen", row.data["chosen"]),
                              row.response("rejected", row.data["rejected"]), float(weight))
    if record.chosen.strip() == record.rejected.strip():  # a pair that teaches nothing, most likely a copy slip
        raise row.fail("rejected", "the same text as 'chosen'; a comparison needs two different responses (fix or drop the row)")
    return record


def ranking_problem(ranking, k: int) -> str | None:
    """Why `ranking` is not a ranking of k responses, or None. ranking[i] = rank of response i,
    0 = best: a permutation of 0..k-1, or with ties the standard competition ranking ([0, 0, 2]:
    tied responses share a rank, the next skips their places). Not all k tied (no preference).
    The one rule for ranking files and the feedback store's labels and gold rankings."""
    if not isinstance(ranking, list) or len(ranking) != k or not all(type(r) is int for r in ranking):
        return f"expected {k} integer ranks, one per response, got {ranking if isinstance(ranking, list) else _describe(ranking)}"
    ranks = sorted(ranking)
    if any(r != i and (i == 0 or r != ranks[i - 1]) for i, r in enumerate(ranks)):
        return (f"expected a permutation of 0..{k - 1}, or tied responses sharing a rank with the next rank skipping "
                f"their places (as in [0, 0, 2]), got {ranking}")
    if ranks[-1] == 0:
        return f"all {k} responses share rank 0, so the row prefers nothing (drop it)"
    return None


def _parse_ranking(row: _Row) -> RankingRecord:
    prompt = row.prompt()
    responses, ranking = row.data.get("responses"), row.data.get("ranking")
    if not isinstance(responses, list) or len(responses) < 2:
        raise row.fail("responses", f"expected a list of at least 2 strings, got {_describe(responses)}"
                       + (f" of length {len(responses)}" if isinstance(responses, list) else ""))
    responses = [row.response(f"responses[{i}]", r) for i, r in enumerate(responses)]
    first: dict[str, int] = {}
    for i, r in enumerate(responses):  # two equal responses are one response ranked twice
        if r.strip() in first:
            raise row.fail(f"responses[{i}]", f"the same text as responses[{first[r.strip()]}]; "
                                              f"each ranked response must be different (drop the duplicate and its rank)")
        first[r.strip()] = i
    problem = ranking_problem(ranking, len(responses))
    if problem is not None:
        raise row.fail("ranking", problem)
    return RankingRecord(prompt, responses, list(ranking))


_PARSERS = {"prompts": _parse_prompt, "demonstrations": _parse_demonstration,
            "comparisons": _parse_comparison, "rankings": _parse_ranking}


# ---------------------------------------------------------------------------- reading

def _format(path: Path) -> str:
    suffix = path.suffix.lower()
    if suffix in (".jsonl", ".json"):
        return "jsonl"
    if suffix == ".parquet":
        return "parquet"
    raise DataError(f"{path}: unknown dataset format {suffix!r}; use a .jsonl (JSON lines) or .parquet file.")


def _check_kind(kind: str) -> None:
    if kind not in _PARSERS:
        raise ValueError(f"unknown record kind {kind!r}; expected one of {', '.join(_PARSERS)}.")


def _jsonl_rows(path: Path) -> Iterator[tuple[int, object]]:
    with open(path, "rb") as f:
        yield from _json_lines(f, path.name)


def _json_lines(lines: Iterable[bytes], name: str) -> Iterator[tuple[int, object]]:
    # Line by line with the json module rather than pyarrow.json: pyarrow infers one schema
    # per block, turns a missing field into null and reports type conflicts without a row
    # number, while every row has to become Python objects for validation anyway.
    for number, line in enumerate(lines, start=1):
        if not line.strip():
            continue  # blank lines (e.g. a trailing newline) are not rows
        try:
            yield number, json.loads(_utf8(line, name, number))
        except json.JSONDecodeError as e:
            raise DataError(f"{name}:{number}: malformed JSON ({e.msg} at column {e.colno}). "
                            f"Each line must be one complete JSON object.") from None


def _utf8(line: bytes, name: str, number: int) -> str:
    try:
        return line.decode("utf-8")
    except UnicodeDecodeError as e:
        raise DataError(f"{name}:{number}: not UTF-8 ({e.reason} at byte {e.start}). Save the file as UTF-8.") from None


def _parquet_rows(path: Path, kind: str, batch_rows: int) -> Iterator[tuple[int, object]]:
    # pre_buffer=False: with pre-buffering, pyarrow reads ahead across row groups and memory
    # grows with the file (measured 7 MB held for a 6.7 MB file vs 0.6 MB without).
    try:
        f = pq.ParquetFile(path, pre_buffer=False)
    except (pa.ArrowInvalid, OSError) as e:  # e.g. "Parquet magic bytes not found": not a parquet file
        raise DataError(f"{path.name}: not a readable parquet file ({e}); write it with pandas/pyarrow "
                        f"(to_parquet) or give a .jsonl file.") from None
    columns = [name for name in SCHEMAS[kind].names if name in f.schema_arrow.names]
    number = 0
    for batch in f.iter_batches(batch_size=batch_rows, columns=columns):  # one batch in memory at a time
        for data in batch.to_pylist():
            number += 1
            yield number, data


def iter_records(path: str | Path, kind: str, batch_rows: int = 1024) -> Iterator[Record]:
    """Stream validated records of `kind` from a jsonl or parquet file without loading it whole.

    Raises DataError naming the file, the 1-based row (jsonl: line) number and the field."""
    path = Path(path)
    _check_kind(kind)
    if batch_rows < 1:
        raise ValueError(f"batch_rows must be >= 1, got {batch_rows}")
    rows = _jsonl_rows(path) if _format(path) == "jsonl" else _parquet_rows(path, kind, batch_rows)
    for number, data in rows:
        yield validate_row(data, kind, f"{path.name}:{number}")


def validate_row(data, kind: str, where: str, hint: str | None = None) -> Record:
    """One row (a parsed JSON object) checked by the rules a file of `kind` is read with; DataError
    names `where` (e.g. FILE:ROW) and the field, then `hint` (default: the kind's format)."""
    _check_kind(kind)
    if not isinstance(data, dict):
        raise DataError(f"{where}: expected a JSON object, got {_describe(data)}. {_HINTS[kind] if hint is None else hint}")
    return _PARSERS[kind](_Row(where, kind, data, hint))


def read_records(path: str | Path, kind: str) -> list[Record]:
    """All records of a (small) file; use iter_records for large ones."""
    return list(iter_records(path, kind))


def read_prompt_lines(lines: Iterable[bytes], name: str, fmt: str) -> list[PromptRecord]:
    """Prompts from the lines of a stream that is not a file with a suffix (stdin, a .txt file):
    fmt 'jsonl': rows as in a prompts file, validated the same way (errors name `name`:line);
    fmt 'txt': one prompt per line, the line break removed, blank lines skipped."""
    if fmt == "jsonl":
        records = []
        for number, data in _json_lines(lines, name):
            records.append(validate_row(data, "prompts", f"{name}:{number}"))
        return records
    if fmt != "txt":
        raise ValueError(f"unknown prompt line format {fmt!r}; expected 'jsonl' or 'txt'.")
    texts = (_utf8(line, name, number).rstrip("\r\n") for number, line in enumerate(lines, start=1))
    return [PromptRecord(text) for text in texts if text.strip()]


# ---------------------------------------------------------------------------- writing

def _to_row(record: Record) -> dict:
    row = dict(record.__dict__)
    prompt = row.pop("prompt")
    if isinstance(prompt, list):
        if isinstance(record, DemonstrationRecord):  # chat demonstrations: the response is the last turn
            return {"messages": prompt + [{"role": "assistant", "content": row.pop("response")}]}
        return {"messages": prompt, **row}
    return {"prompt": prompt, **row}


def _rows_of_one_kind(records: Iterable[Record], name: str) -> Iterator[tuple[str, dict]]:
    kind = None
    for n, record in enumerate(records, start=1):
        k = _KIND_OF.get(type(record))
        if k is None or (kind is not None and k != kind):
            raise TypeError(f"write_records({name}): record {n} is a {type(record).__name__}; "
                            f"a file holds records of one kind ({kind or 'a tidal record type'}).")
        kind = k
        yield kind, _to_row(record)


def _write_parquet(f, rows: Iterator[tuple[str, dict]], chunk_rows: int) -> int:
    count, kind, chunk, writer = 0, "prompts", [], None
    try:
        for kind, row in rows:
            chunk.append(row)
            count += 1
            if len(chunk) >= chunk_rows:  # one row group per chunk
                writer = writer or pq.ParquetWriter(f, SCHEMAS[kind])
                writer.write_table(pa.Table.from_pylist(chunk, schema=SCHEMAS[kind]))
                chunk = []
        writer = writer or pq.ParquetWriter(f, SCHEMAS[kind])
        if chunk:
            writer.write_table(pa.Table.from_pylist(chunk, schema=SCHEMAS[kind]))
    finally:
        if writer is not None:
            writer.close()  # also on error, while `f` is still open (the temp file is dropped anyway)
    return count


def write_records(path: str | Path, records: Iterable[Record], chunk_rows: int = 8192) -> int:
    """Write records (all of one kind) to .jsonl or .parquet; returns the row count.

    Atomic: rows go to a temporary file next to `path`, which replaces `path` only when
    complete, so a crash or a bad record never leaves a corrupt existing dataset."""
    path = Path(path)
    fmt = _format(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    rows = _rows_of_one_kind(records, path.name)
    try:
        with open(tmp, "wb") as f:
            if fmt == "parquet":
                count = _write_parquet(f, rows, chunk_rows)
            else:
                count = 0
                for _, row in rows:
                    f.write((json.dumps(row, ensure_ascii=False) + "\n").encode("utf-8"))
                    count += 1
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException as e:
        tmp.unlink(missing_ok=True)
        if isinstance(e, OSError) and e.filename is None:  # a full disk: name the file being written
            raise OSError(e.errno, e.strerror, str(path)) from None
        raise
    return count
