"""Readers for local record files: JSONL, gzipped JSONL, JSON arrays and Parquet.

A file is read by its extension: `.parquet`/`.pq` with pyarrow; `.gz` is decompressed first; any other
file is JSON, read as one array when its first non-blank character is `[` and as JSON Lines otherwise
(the raw OpenAI comparison files are JSON Lines despite their `.json` extension). Records come back with
their 1-based line number (JSONL) or row/element number (Parquet, JSON array), so errors can name them.
Blank lines are not records.

Two kinds of damage are told apart:

  - A bad record: a JSONL line that is not valid JSON or whose bytes are not UTF-8, or a JSON record
    with a string holding a lone surrogate (`"\\ud800"`: it decodes, but is not text and fails in the
    tokenizer), comes back as a `Malformed` marker with its skip reason and, where known, the field, for
    the loader to skip and count, or to raise on in strict mode. Lines are decoded one at a time, so one
    bad line costs one record, not the file.
  - A file that cannot be read to its end: it cannot be opened (a directory, no permission), its gzip
    stream is truncated, fails its CRC or is not gzip at all, its Parquet footer or pages are corrupt, or
    it is a JSON array that is not valid JSON or not UTF-8. This raises `DataError` naming the file and
    how far reading got, in strict and non-strict mode alike: the records past the damage are lost in
    unknown number, so they cannot be counted as skipped, and training on a silently shortened data set
    is worse than stopping. (A gzip CRC is only checked at the end of the stream, so this holds even when
    every line was read.)
"""

from __future__ import annotations

import dataclasses
import glob
import gzip
import json
import os
import re
import zlib
from collections.abc import Iterator, Sequence
from typing import Any

from rlhf_jax.data import records as rec
from rlhf_jax.data.records import DataError

PathsLike = str | os.PathLike | Sequence[str | os.PathLike]
# What reading a (possibly gzipped) file can raise; gzip.BadGzipFile (not gzip, bad CRC) is an OSError,
# a truncated stream raises EOFError and damaged deflate data zlib.error.
_READ_ERRORS = (OSError, EOFError, zlib.error)
# Decoded JSON holds a lone surrogate only where the text has a `\uD800`-`\uDFFF` escape (the UTF-8
# decoder rejects encoded surrogates), so only such text is searched; escaped pairs (`\ud83d\ude00`) pass.
_SURROGATE_ESCAPE = re.compile(r"\\u[dD][89a-fA-F]")


@dataclasses.dataclass(frozen=True)
class Malformed:
    """Stands in for a record the reader found unusable: not UTF-8, not JSON, or text that is not Unicode.

    Attributes:
      error: what is wrong, for the strict-mode error message.
      reason: the skip reason (`records.MALFORMED`, `INVALID_UTF8` or `LONE_SURROGATE`).
      field: the field holding the bad bytes or string, when known.
      record: the decoded record when the line still parses (bad bytes read as lone surrogates), so its
        keys can tell the file's format; it is never parsed into an example.
    """

    error: str
    reason: str = rec.MALFORMED
    field: str | None = None
    record: Any = dataclasses.field(default=None, compare=False, repr=False)


def expand_paths(paths: PathsLike) -> list[str]:
    """Expands a path, a glob, a comma-separated list of either, or a list of them, in order.

    Args:
      paths: e.g. `"a.jsonl"`, `"data/*.parquet"`, `"a.jsonl,b.jsonl.gz"` or `["a.jsonl", "d/*.json"]`.

    Returns:
      The matching file paths; each glob's matches sorted, duplicates dropped.

    Raises:
      FileNotFoundError: a path does not exist or a glob matches nothing.
    """
    if isinstance(paths, str | os.PathLike):
        items = [p for p in os.fspath(paths).split(",") if p.strip()]
    else:
        items = [os.fspath(p) for p in paths]
    out: list[str] = []
    for item in (p.strip() for p in items):
        if glob.has_magic(item):
            matches = sorted(glob.glob(item, recursive=True))
            if not matches:
                raise FileNotFoundError(f"no files match {item!r}")
        elif os.path.exists(item):
            matches = [item]
        else:
            raise FileNotFoundError(f"no such file: {item!r}")
        out.extend(m for m in matches if m not in out)
    if not out:
        raise FileNotFoundError(f"no input files in {paths!r}")
    return out


def iter_records(path: str) -> Iterator[tuple[int, Any]]:
    """Yields `(line_or_row, record)` for every record in one file (1-based numbers).

    A JSONL line that is not UTF-8 or not JSON, or a JSON record with a lone surrogate in a string,
    yields a `Malformed` marker in its place (see module docstring).

    Args:
      path: a JSONL, JSONL.gz, JSON-array (optionally gzipped) or Parquet file.

    Yields:
      The line (JSONL), element (JSON array) or row (Parquet) number and the decoded record.

    Raises:
      DataError: the file as a whole cannot be read (see module docstring); the message names the file
        and the line, element or row reached.
    """
    if path.lower().endswith((".parquet", ".pq")):
        yield from _iter_parquet(path)
        return
    lines = _read_lines(path)
    first = next(((n, raw) for n, raw in lines if raw.strip()), None)  # `lines` resumes after it.
    if first is None:
        return  # Empty or blank.
    number, raw = first
    if raw.lstrip().startswith(b"["):
        # Only the first non-blank line can open an array; a later `[...]` line is a malformed record.
        text = b"".join([raw, *(r for _, r in lines)])
        yield from enumerate(_parse_array(path, text, first_line=number), start=1)
        return
    yield number, _parse_line(raw)
    for number, raw in lines:
        if raw.strip():
            yield number, _parse_line(raw)


def _find_invalid_text(value: Any, *, field: str = "") -> tuple[str, str] | None:
    """Finds the first string in a record that is not valid Unicode text (a lone surrogate).

    JSON's `"\\ud800"` escape decodes to a Python string that no encoder accepts, so it would pass every
    type check and fail later in the tokenizer.

    Args:
      value: a decoded record (dicts, lists, strings, numbers).
      field: the path of `value` inside the record ("" at the top).

    Returns:
      `(field path, description)` of the first bad string or key, e.g. `("summaries[0].text", "lone
      surrogate U+D800 at character 3")`, or None when every string is valid.
    """
    if isinstance(value, str):
        try:
            value.encode("utf-8")
        except UnicodeEncodeError as e:
            return (
                field or "(record)",
                f"lone surrogate U+{ord(value[e.start]):04X} at character {e.start + 1}",
            )
        return None
    if isinstance(value, dict):
        for key, item in value.items():
            # A bad key is named in escaped form: printing the raw surrogate would itself fail.
            name = key.encode("utf-8", "backslashreplace").decode() if isinstance(key, str) else str(key)
            path = f"{field}.{name}" if field else name
            if isinstance(key, str) and _find_invalid_text(key) is not None:
                return path, "the key holds a lone surrogate"
            hit = _find_invalid_text(item, field=path)
            if hit is not None:
                return hit
    elif isinstance(value, list):
        for i, item in enumerate(value):
            hit = _find_invalid_text(item, field=f"{field}[{i}]")
            if hit is not None:
                return hit
    return None


def _read_lines(path: str) -> Iterator[tuple[int, bytes]]:
    """Yields `(1-based line number, raw bytes)`; a read failure raises `DataError` naming the file."""
    gzipped = path.lower().endswith(".gz")
    try:
        f = gzip.open(path, "rb") if gzipped else open(path, "rb")  # Closed by the `with` below.
    except OSError as e:
        raise DataError(path, None, None, f"cannot open the file: {e.strerror or e}") from e
    number = 0
    with f:
        while True:
            try:
                raw = f.readline()
            except _READ_ERRORS as e:
                raise DataError(path, None, None, _read_error(e, gzipped, number)) from e
            if not raw:
                return
            number += 1
            yield number, raw


def _read_error(e: BaseException, gzipped: bool, lines_read: int) -> str:
    """The message for a file that failed partway: what broke, and how far reading got."""
    if isinstance(e, gzip.BadGzipFile) and str(e).startswith("Not a gzipped file"):
        head = str(e).removeprefix("Not a gzipped file ").strip("()")
        return f"not a gzip file despite its .gz name: it starts with {head}"
    if gzipped and isinstance(e, EOFError | zlib.error | gzip.BadGzipFile):
        what = "truncated or corrupt gzip file"
    else:
        what = "cannot read the file"
    detail = e.strerror if isinstance(e, OSError) and e.strerror else e
    return f"{what}, after reading {lines_read} line(s): {detail}"


def _parse_line(raw: bytes) -> Any:
    """Decodes and parses one JSONL line, or returns a `Malformed` marker saying why it cannot be."""
    try:
        line = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        error = f"invalid UTF-8 byte 0x{raw[e.start]:02x} at byte {e.start + 1} of the line"
        try:
            # surrogateescape turns each bad byte into a lone surrogate, which locates the field.
            record = json.loads(raw.decode("utf-8", "surrogateescape"))
        except json.JSONDecodeError:
            return Malformed(error, rec.INVALID_UTF8)
        hit = _find_invalid_text(record)
        return Malformed(error, rec.INVALID_UTF8, None if hit is None else hit[0], record)
    try:
        record = json.loads(line)
    except json.JSONDecodeError as e:
        return Malformed(f"invalid JSON: {e.msg} (column {e.colno})")
    return _check_text(record) if _SURROGATE_ESCAPE.search(line) else record


def _check_text(record: Any) -> Any:
    """Returns the record, or a `Malformed` marker naming the field whose string holds a lone surrogate."""
    hit = _find_invalid_text(record)
    return record if hit is None else Malformed(hit[1], rec.LONE_SURROGATE, hit[0], record)


def _parse_array(path: str, text: bytes, *, first_line: int) -> list:
    """Parses a whole-file JSON array whose text starts at line `first_line` of the file."""
    try:
        decoded = text.decode("utf-8")
    except UnicodeDecodeError as e:
        line = first_line + text.count(b"\n", 0, e.start)
        raise DataError(
            path, line, None, f"JSON array with an invalid UTF-8 byte 0x{text[e.start]:02x}"
        ) from e
    try:
        array = json.loads(decoded)
    except json.JSONDecodeError as e:
        raise DataError(path, first_line - 1 + e.lineno, None, f"not a valid JSON array: {e.msg}") from e
    return [_check_text(r) for r in array] if _SURROGATE_ESCAPE.search(decoded) else array


def _iter_parquet(path: str) -> Iterator[tuple[int, Any]]:
    """Yields `(row, record)` from a Parquet file; a corrupt one raises `DataError` naming the row reached."""
    import pyarrow.parquet as pq  # Imported here: only Parquet users pay for it.

    # pyarrow raises several types for a corrupt file (OSError, ArrowInvalid, ArrowException, ...).
    try:
        parquet = pq.ParquetFile(path)
    except Exception as e:
        raise DataError(path, None, None, f"not a readable Parquet file: {_one_line(e)}") from e
    with parquet:
        batches = parquet.iter_batches(batch_size=1024)
        row = 0
        while True:
            try:
                batch = next(batches, None)
                rows = None if batch is None else batch.to_pylist()
            except Exception as e:
                raise DataError(
                    path, None, None, f"corrupt Parquet data after {row} row(s): {_one_line(e)}"
                ) from e
            if rows is None:
                return
            for record in rows:
                row += 1
                yield row, record


def _one_line(e: BaseException) -> str:
    """An exception's message on one line (pyarrow's span several)."""
    return " ".join(str(e).split())
