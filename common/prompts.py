"""Prompts as the model sees them: `render_prompt` / `render_demonstration` (the chat template,
or the text itself), and `PromptDataset`: the prompts of a file served as deterministic,
resumable batches (the RL driver's data side). Reading and validating the file is
tidal.common.data's job."""

from __future__ import annotations

import random
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

from tidal.common.data import DataError, DemonstrationRecord, Message, Prompt, PromptRecord, read_records
from tidal.common.types import PromptBatch


def _as_messages(prompt: Prompt) -> list[Message]:
    return prompt if isinstance(prompt, list) else [{"role": "user", "content": prompt}]


def render_prompt(tokenizer, prompt: Prompt, use_chat_template: bool) -> str:
    """Prompt text for generation: the tokenizer's chat template with the generation prompt
    appended, or (without template) the string itself / the chat turns' contents joined."""
    if use_chat_template:
        return tokenizer.apply_chat_template(_as_messages(prompt), add_generation_prompt=True, tokenize=False)
    return prompt if isinstance(prompt, str) else "\n".join(m["content"] for m in prompt)


def render_demonstration(tokenizer, record: DemonstrationRecord, use_chat_template: bool) -> tuple[str, str]:
    """(prompt_text, response_text) such that prompt_text + response_text is the full training
    text; SFT masks the prompt tokens. The response text never ends with EOS: the trainer
    appends the EOS token id (with a template, a trailing end-of-turn equal to EOS is removed
    so it is not doubled)."""
    prompt_text = render_prompt(tokenizer, record.prompt, use_chat_template)
    if not use_chat_template:
        return prompt_text, record.response
    full = tokenizer.apply_chat_template(
        _as_messages(record.prompt) + [{"role": "assistant", "content": record.response}], tokenize=False)
    if not full.startswith(prompt_text):
        # Some templates render earlier turns differently once an answer follows; fall back to
        # the raw response after the generation prompt, which is what the policy will see.
        return prompt_text, record.response
    response_text = full[len(prompt_text):].rstrip()
    eos = tokenizer.eos_token
    if eos and response_text.endswith(eos):
        response_text = response_text[: -len(eos)]
    return prompt_text, response_text


@dataclass(frozen=True)
class DataState:
    """Where a PromptDataset stands: `position` rows of epoch `epoch`'s order are consumed."""

    epoch: int = 0
    position: int = 0


class PromptDataset:
    """Prompts of a file, served in a shuffled order fixed by (seed, epoch), resumable exactly.

    The records are held in memory (prompt files are small next to the rollouts they feed);
    rendering and tokenizing happen per batch. `PromptBatch.index` is the file row (0-based).
    Prompts longer than `max_prompt_tokens` are truncated from the LEFT, keeping their end
    (the words the model continues; a leading BOS is kept) - with a chat template this can
    cut the system turn, so keep prompts short or raise the limit."""

    def __init__(self, path: str | Path | list[PromptRecord], tokenizer, max_prompt_tokens: int,
                 use_chat_template: bool, seed: int = 0):
        # `path` may also be the records themselves (prompts read from stdin by `tidal generate`).
        self.records: list[PromptRecord] = list(path) if isinstance(path, list) else read_records(path, "prompts")
        if not self.records:
            where = "the prompts given" if isinstance(path, list) else Path(path).name
            raise DataError(f"{where}: no prompts; at least one prompt row is needed.")
        self.tokenizer, self.max_prompt_tokens = tokenizer, max_prompt_tokens
        self.use_chat_template, self.seed = use_chat_template, seed
        self.state = DataState()
        self._order: tuple[int, list[int]] = (-1, [])  # cached (epoch, order)

    @classmethod
    def from_config(cls, source: str | Path | list[PromptRecord], tokenizer, data, seed: int = 0) -> "PromptDataset":
        """The one way tidal builds a dataset: rendered and cut as data.* (a DataConfig) says.
        `tokenizer`: a loaded tokenizer, or the model folder/name to load it from."""
        if isinstance(tokenizer, (str, Path)):
            from tidal.common.models import load_tokenizer

            tokenizer = load_tokenizer(tokenizer)
        return cls(source, tokenizer, data.max_prompt_tokens, data.chat_template, seed=seed)

    def __len__(self) -> int:
        return len(self.records)

    def order(self, epoch: int) -> list[int]:
        """Row order of `epoch`; the same (seed, epoch) always gives the same order."""
        if self._order[0] != epoch:
            rows = list(range(len(self.records)))
            random.Random(self.seed * 1_000_003 + epoch).shuffle(rows)
            self._order = (epoch, rows)
        return self._order[1]

    def make_batch(self, rows: list[int]) -> PromptBatch:
        texts, ids = [], []
        for r in rows:
            text = render_prompt(self.tokenizer, self.records[r].prompt, self.use_chat_template)
            # A chat template writes its own special tokens; a plain prompt gets the tokenizer's.
            tok = self.tokenizer(text, add_special_tokens=not self.use_chat_template)["input_ids"]
            if len(tok) > self.max_prompt_tokens:
                tok = _truncate_left(tok, self.max_prompt_tokens, self.tokenizer.bos_token_id)
                text = self.tokenizer.decode(tok)
            texts.append(text)
            ids.append(tok)
        return PromptBatch(list(rows), texts, ids, [self.records[r].reference for r in rows])

    def batches(self, batch_size: int, epoch: int) -> Iterator[PromptBatch]:
        """Batches of one epoch (the last may be short), from `state.position` when `state` is
        at this epoch, else from its start; `state` advances after each batch is yielded."""
        order = self.order(epoch)
        start = self.state.position if self.state.epoch == epoch else 0
        for i in range(start, len(order), batch_size):
            batch = self.make_batch(order[i:i + batch_size])
            done = i + len(batch)
            self.state = DataState(epoch + 1, 0) if done == len(order) else DataState(epoch, done)
            yield batch

    def next_batch(self, batch_size: int) -> PromptBatch:
        """Exactly `batch_size` prompts from the current state, running on into the next epoch
        (a new order) when this one ends: the RL driver's step-by-step view of the data."""
        rows: list[int] = []
        while len(rows) < batch_size:
            epoch, pos = self.state.epoch, self.state.position
            take = self.order(epoch)[pos:pos + batch_size - len(rows)]
            rows += take
            pos += len(take)
            self.state = DataState(epoch + 1, 0) if pos == len(self.records) else DataState(epoch, pos)
        return self.make_batch(rows)


def _truncate_left(ids: list[int], max_tokens: int, bos_id: int | None) -> list[int]:
    if bos_id is not None and ids[0] == bos_id and max_tokens > 1:
        return [bos_id] + ids[len(ids) - (max_tokens - 1):]
    return ids[len(ids) - max_tokens:]
