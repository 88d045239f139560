"""Loading examples from files: read, detect the format, parse, skip and count bad records.

`load_preference` and `load_sft` read the formats of `formats.py`, `load_math` those of `math_formats.py`
(GSM8K and MATH-style problems with gold answers). Each file's format is detected from the first record
whose keys identify one, or taken from `format=`. A bad record (malformed line, a line that is not UTF-8,
a string holding a lone surrogate, missing field, wrong type, empty response, chosen identical to
rejected, failed HH split, a math solution without a final answer, a conversation the chat template
rejects) is skipped and counted by reason in
the file's `FileStats`; bad per-token loss weights (`weight_spans`, `token_weights.py`) raise in both
modes; with `strict=True` any bad record raises `DataError` naming the file, the 1-based line (row,
for Parquet and JSON arrays) and the field instead. A file that cannot be read to its end (truncated or
corrupt gzip, corrupt Parquet, unreadable) raises `DataError` naming it in both modes (see `readers.py`).
The load's one-line summary is logged at INFO.
"""

from __future__ import annotations

import functools
import logging

from rlhf_jax.data import formats, math_formats, readers
from rlhf_jax.data import records as rec
from rlhf_jax.data.chat_template import ChatTemplate

_log = logging.getLogger(__name__)
# How many leading records may lack recognisable keys before format detection gives up.
_DETECT_WINDOW = 100


def load_file(
    path: str, *, format: str | None = None, strict: bool = False, template: ChatTemplate | None = None
) -> tuple[list[rec.PreferenceExample] | list[rec.SFTExample], rec.FileStats]:
    """Loads one file of either kind.

    Args:
      path: a JSONL, JSONL.gz, JSON-array or Parquet file.
      format: a name from `formats.FORMATS`, or None to detect it.
      strict: raise on the first bad record instead of skipping it.
      template: the chat template conversational records are rendered with (`conversations.py`), or
        None to render them as HH-style text.

    Returns:
      The examples (preference or SFT, by the format's kind) and the file's statistics.

    Raises:
      DataError: the format cannot be detected, the file cannot be read to its end (in either mode), or
        (strict) a record is bad.
    """
    records = list(readers.iter_records(path))
    if not records:
        _log.warning("%s: no records", path)
        kind = formats.kind_of(format) if format else "empty"
        return [], rec.FileStats(path=path, format=format or "empty", kind=kind)
    format_name = format or _detect(path, records)
    kind = formats.kind_of(format_name)
    parse = formats.parse_preference if kind == "preference" else formats.parse_sft
    return _parse_records(
        path, records, functools.partial(parse, template=template), format_name, kind, strict
    )


def _parse_records(path: str, records: list, parse, format_name: str, kind: str, strict: bool):
    """Parses one file's `(line, record)` pairs with `parse(record, format_name)`: bad records are
    skipped and counted, or (strict) raise `DataError` naming the file, line and field."""
    stats = rec.FileStats(path=path, format=format_name, kind=kind, records=len(records))
    examples = []
    for line, record in records:
        try:
            if isinstance(record, readers.Malformed):
                raise formats.BadRecordError(record.reason, record.field, record.error)
            if not isinstance(record, dict):
                raise formats.BadRecordError(
                    rec.MALFORMED, None, f"expected a JSON object, got {type(record).__name__}"
                )
            examples.append(parse(record, format_name))
        except formats.BadRecordError as bad:
            if strict or isinstance(bad, rec.InvalidWeightsError):
                raise rec.DataError(path, line, bad.field, f"{bad.reason}: {bad.message}") from None
            stats.skipped[bad.reason] += 1
    stats.kept = len(examples)
    return examples, stats


def load_preference(
    paths: readers.PathsLike,
    *,
    format: str | None = None,
    strict: bool = False,
    template: ChatTemplate | None = None,
) -> tuple[list[rec.PreferenceExample], rec.LoadStats]:
    """Loads preference pairs from files of any preference format.

    Args:
      paths: a file, a glob, a comma-separated list, or a list of these.
      format: force one format for every file (a name from `formats.PREFERENCE_FORMATS`), or None to
        detect each file's.
      strict: raise `DataError` on the first bad record instead of skipping and counting it.
      template: the chat template message-list records are rendered with (`conversations.py`: the
        prompt with the generation prompt, each response as the assistant turn that follows), or None
        for HH-style text (`formats.py`).

    Returns:
      The pairs, in file order, and the load statistics.

    Raises:
      DataError: a file holds SFT examples, its format cannot be detected, it cannot be read to its end
        (truncated or corrupt gzip or Parquet, unreadable; in either mode), or (strict) a record is bad.
      FileNotFoundError: a path or glob matches nothing.
    """
    return _load(paths, "preference", format, strict, template)


def load_sft(
    paths: readers.PathsLike,
    *,
    format: str | None = None,
    strict: bool = False,
    template: ChatTemplate | None = None,
) -> tuple[list[rec.SFTExample], rec.LoadStats]:
    """Loads SFT examples (prompt, completion; a templated conversation with its loss segments);
    arguments and errors as in `load_preference`."""
    return _load(paths, "sft", format, strict, template)


def load_math(
    paths: readers.PathsLike,
    *,
    format: str | None = None,
    strict: bool = False,
    template: ChatTemplate | None = None,
) -> tuple[list[rec.MathExample], rec.LoadStats]:
    """Loads math problems (GSM8K or MATH-style records, see `math_formats.py`) with gold answers.

    Args:
      paths: a file, a glob, a comma-separated list, or a list of these (JSONL, JSONL.gz, JSON arrays,
        Parquet).
      format: "gsm8k", "math" or "prompt_answer" for every file, or None to detect each file's from
        its keys.
      strict: raise `DataError` on the first bad record instead of skipping and counting it.
      template: the chat template prompts are rendered with (a question as one user message), or None
        for the canonical text prompt (`math_formats.py`).

    Returns:
      The problems, in file order, and the load statistics (files of kind "math").

    Raises:
      DataError: a file's format cannot be detected, it cannot be read to its end (in either mode), or
        (strict) a record is bad.
      FileNotFoundError: a path or glob matches nothing.
      ValueError: `format` is not a math format.
    """
    if format is not None and format not in math_formats.MATH_FORMATS:
        raise ValueError(f"unknown math format {format!r}; known: {', '.join(math_formats.MATH_FORMATS)}")
    stats = rec.LoadStats()
    examples = []
    for path in readers.expand_paths(paths):
        records = list(readers.iter_records(path))
        if not records:
            _log.warning("%s: no records", path)
            stats.files.append(rec.FileStats(path=path, format=format or "empty", kind="math"))
            continue
        format_name = format or _detect(path, records, math_formats.detect_format, math_formats.MATH_FORMATS)
        parse = functools.partial(math_formats.parse, template=template)
        file_examples, file_stats = _parse_records(path, records, parse, format_name, "math", strict)
        examples.extend(file_examples)
        stats.files.append(file_stats)
    _log.info("loaded math data: %s", stats.summary())
    return examples, stats


def _load(paths: readers.PathsLike, kind: str, format: str | None, strict: bool, template):
    if format is not None and formats.kind_of(format) != kind:
        raise ValueError(f"format {format!r} holds {formats.kind_of(format)} examples, not {kind}")
    stats = rec.LoadStats()
    examples = []
    for path in readers.expand_paths(paths):
        file_examples, file_stats = load_file(path, format=format, strict=strict, template=template)
        if file_stats.kind not in (kind, "empty"):
            raise rec.DataError(
                path,
                None,
                None,
                f"detected format {file_stats.format!r} holds {file_stats.kind} examples, "
                f"not {kind}; pass format= to override",
            )
        examples.extend(file_examples)
        stats.files.append(file_stats)
    _log.info("loaded %s data: %s", kind, stats.summary())
    return examples, stats


def _detect(path: str, records: list, detect=formats.detect_format, known=formats.FORMATS) -> str:
    for _, record in records[:_DETECT_WINDOW]:
        format_name = detect(_decoded(record))
        if format_name is not None:
            return format_name
    first = next((_decoded(r) for _, r in records if isinstance(_decoded(r), dict)), None)
    keys = sorted(first) if first is not None else "no JSON objects"
    raise rec.DataError(
        path, None, None, f"cannot detect the format from keys {keys}; pass format= one of {known}"
    )


def _decoded(record):
    """The record, or what a `Malformed` line decoded to: a record skipped for bad text still shows the
    file's format by its keys."""
    return record.record if isinstance(record, readers.Malformed) else record
