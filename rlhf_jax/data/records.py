"""Record types of the data layer: examples, load statistics and the error raised on bad data.

Every loader returns examples as frozen dataclasses and a `LoadStats` that accounts for every record it
read: for each file, `records == kept + sum(skipped.values())`. Tokenisation adds truncation counts to
the same object, so one `LoadStats.summary()` line says what happened to the data.
"""

from __future__ import annotations

import collections
import dataclasses
from collections.abc import Mapping
from typing import Any

# Reasons a record is skipped (the keys of `FileStats.skipped`).
MALFORMED = "malformed_line"  # not JSON, or not a JSON object
INVALID_UTF8 = "invalid_utf8"  # a JSONL line whose bytes are not UTF-8
LONE_SURROGATE = (
    "lone_surrogate"  # a string that is not Unicode text (JSON "\ud800"): the tokenizer fails on it
)
MISSING_FIELD = "missing_field"  # a required field is absent or null
WRONG_TYPE = "wrong_type"  # a field has the wrong type or an invalid value (e.g. `choice` not 0/1)
EMPTY_PROMPT = "empty_prompt"
EMPTY_RESPONSE = "empty_response"  # a response is empty after cleaning (HH has a few)
IDENTICAL = "identical_responses"  # chosen == rejected after cleaning (HH has a few)
SPLIT_FAILED = "split_failed"  # an HH pair shares no prefix ending at an Assistant turn
UNPARSED_PROMPT = "unparsed_prompt"  # a TL;DR prompt without SUBREDDIT/TITLE/POST fields
NO_FINAL_ANSWER = "no_final_answer"  # a math solution without a `#### N` line or a `\boxed{}` answer
TEMPLATE_ERROR = "template_error"  # the chat template raised on a conversation, or is not prefix-consistent
# Not a skip reason: a record with bad per-token loss weights always raises (`InvalidWeightsError`).
INVALID_WEIGHTS = "invalid_weights"
SKIP_REASONS = (
    MALFORMED,
    INVALID_UTF8,
    LONE_SURROGATE,
    MISSING_FIELD,
    WRONG_TYPE,
    EMPTY_PROMPT,
    EMPTY_RESPONSE,
    IDENTICAL,
    SPLIT_FAILED,
    UNPARSED_PROMPT,
    NO_FINAL_ANSWER,
    TEMPLATE_ERROR,
)


@dataclasses.dataclass(frozen=True)
class PreferenceExample:
    """One preference pair: `prompt + chosen` is preferred to `prompt + rejected`.

    Responses begin with the separator that joins them to the prompt (a space after "TL;DR:" or
    "Assistant:"), so `prompt + chosen` is the full text. `meta` carries optional per-source extras
    (e.g. OpenAI's `confidence`, or gold rewards for the synthetic task); it is not compared or hashed.
    """

    prompt: str
    chosen: str
    rejected: str
    weight: float = 1.0
    meta: Mapping[str, Any] = dataclasses.field(default_factory=dict, compare=False, hash=False)


@dataclasses.dataclass(frozen=True)
class SFTExample:
    """One supervised example: the model learns `completion` given `prompt` (same joining convention).

    A conversation rendered by a chat template (`conversations.py`) also carries `segments`: its text
    as (text, trainable) pieces, `prompt` the pieces before the first trainable one and `completion`
    the rest (later user turns included). Such an example is tokenised as one text, the template's own
    ids (no EOS added), with the loss on the trainable pieces only (`pipeline.tokenize_sft`). Without
    segments the example is the plain pair: prompt untrained, completion + EOS trained.

    `weight_spans` (token-weighted SFT, `token_weights.py`) are (start, end, weight) character spans of
    `completion` (end exclusive, non-overlapping): each completion token takes the largest weight of
    the spans it overlaps, 1 where none does (the EOS too). Empty: every token weighs 1.
    """

    prompt: str
    completion: str
    meta: Mapping[str, Any] = dataclasses.field(default_factory=dict, compare=False, hash=False)
    segments: tuple[tuple[str, bool], ...] = ()
    weight_spans: tuple[tuple[int, int, float], ...] = ()

    def __post_init__(self):
        if self.segments and "".join(t for t, _ in self.segments) != self.prompt + self.completion:
            raise ValueError("SFTExample: the segments must join to prompt + completion")
        if self.segments and self.weight_spans:
            raise ValueError("SFTExample: weight_spans apply to plain examples, not segmented ones")
        for start, end, weight in self.weight_spans:
            if not (0 <= start < end <= len(self.completion) and weight >= 0):
                raise ValueError(f"SFTExample: bad weight span {(start, end, weight)} of a completion "
                                 f"of {len(self.completion)} characters")  # fmt: skip


@dataclasses.dataclass(frozen=True)
class MathExample:
    """One math problem: `prompt` (the rendered question), a worked `solution` and the gold `answer`.

    `solution` follows the joining convention (it starts with the space that joins it to the prompt) and
    ends with its final answer (a `#### N` line, or a `\\boxed{}`); after a prompt rendered by a chat
    template it is the assistant turn instead, closed by the template's end-of-turn marker
    (`conversations.py`). `answer` is the gold final answer as
    text (a number without commas for GSM8K and the arithmetic task, the boxed LaTeX for MATH). A
    demonstration with a deliberate slip has a solution whose final answer differs from `answer`. `meta`
    carries extras (e.g. the raw `question`, the number of steps); it is not compared or hashed.
    """

    prompt: str
    solution: str
    answer: str
    meta: Mapping[str, Any] = dataclasses.field(default_factory=dict, compare=False, hash=False)

    def to_sft(self) -> SFTExample:
        """The supervised view: learn `solution` given `prompt`."""
        return SFTExample(prompt=self.prompt, completion=self.solution, meta=self.meta)


class BadRecordError(Exception):
    """Raised by a parser for a record to skip: carries the reason (one of `SKIP_REASONS`) and field."""

    def __init__(self, reason: str, field: str | None, message: str):
        super().__init__(message)
        self.reason, self.field, self.message = reason, field, message


class InvalidWeightsError(BadRecordError):
    """Per-token loss weights that are wrong (negative, not finite, a span out of range): raised, never
    skipped, since dropping the record or the weights would silently train on another objective."""

    def __init__(self, field: str, message: str):
        super().__init__(INVALID_WEIGHTS, field, message)


class DataError(ValueError):
    """Bad input data, naming the file, the 1-based line (or row) and the field."""

    def __init__(self, path: str, line: int | None, field: str | None, message: str):
        self.path, self.line, self.field = path, line, field
        where = path if line is None else f"{path}:{line}"
        what = "" if field is None else f"field {field!r}: "
        super().__init__(f"{where}: {what}{message}")


@dataclasses.dataclass
class FileStats:
    """What happened to one file's records."""

    path: str
    format: str
    kind: str  # "preference", "sft" or "math"
    records: int = 0
    kept: int = 0
    skipped: collections.Counter = dataclasses.field(default_factory=collections.Counter)

    def summary(self) -> str:
        """One line: format, records, kept and skips by reason."""
        skips = ", ".join(f"{k}={v}" for k, v in sorted(self.skipped.items())) or "none"
        return f"{self.path} [{self.format}]: {self.records} records, {self.kept} kept, skipped: {skips}"


@dataclasses.dataclass
class LoadStats:
    """Per-file statistics of one load, plus truncation counts added at tokenisation.

    `truncated` counts examples (not tokens) whose prompt was cut from the left (`"prompt"`) or whose
    response was cut from the right (`"chosen"`, `"rejected"`, `"completion"`), and preference pairs whose
    responses became identical token sequences after truncation (`"identical_after_truncation"`).
    """

    files: list[FileStats] = dataclasses.field(default_factory=list)
    truncated: collections.Counter = dataclasses.field(default_factory=collections.Counter)

    @property
    def records(self) -> int:
        return sum(f.records for f in self.files)

    @property
    def kept(self) -> int:
        return sum(f.kept for f in self.files)

    @property
    def skipped(self) -> collections.Counter:
        total = collections.Counter()
        for f in self.files:
            total.update(f.skipped)
        return total

    def summary(self) -> str:
        """One line for the log: totals, skips by reason, truncations."""
        skips = ", ".join(f"{k}={v}" for k, v in sorted(self.skipped.items())) or "none"
        trunc = ", ".join(f"{k}={v}" for k, v in sorted(self.truncated.items())) or "none"
        formats = ",".join(sorted({f.format for f in self.files}))
        return (
            f"{len(self.files)} file(s) [{formats}]: {self.records} records, {self.kept} kept; "
            f"skipped: {skips}; truncated: {trunc}"
        )
