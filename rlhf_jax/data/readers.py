"""Readers for local record files: JSONL, gzipped JSONL, JSON arrays and Parquet.

A file is read by its extension: `.parquet`/`.pq` with pyarrow; `.gz` is decompressed first; any other
file is JSON, read as one array when its first non-blank character is `[` and as JSON Lines otherwise
(the raw OpenAI comparison files are JSON Lines despite their `.json` extension). Records come back with
their 1-based line number (JSONL) or row/element number (Parquet, JSON array), so errors can name them.
A JSONL line that is not valid JSON is returned as a `Malformed` marker for the loader to count; blank
lines are not records.
"""

from __future__ import annotations

import dataclasses
import glob
import gzip
import io
import json
import os
from collections.abc import Iterator, Sequence
from typing import Any

from rlhf_jax.data.records import DataError

PathsLike = str | os.PathLike | Sequence[str | os.PathLike]


@dataclasses.dataclass(frozen=True)
class Malformed:
    """Stands in for a line that could not be parsed as JSON."""

    error: str


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

    Raises:
      DataError: the file as a whole cannot be read (a broken JSON array or Parquet file).
    """
    lower = path.lower()
    if lower.endswith((".parquet", ".pq")):
        yield from _iter_parquet(path)
        return
    opener = gzip.open if lower.endswith(".gz") else open
    with opener(path, "rt", encoding="utf-8") as f:
        head = _first_char(f)
        if head == "[":
            try:
                array = json.load(f)
            except json.JSONDecodeError as e:
                raise DataError(path, e.lineno, None, f"not a valid JSON array: {e.msg}") from e
            yield from enumerate(array, start=1)
            return
        for number, line in enumerate(f, start=1):
            if not line.strip():
                continue
            try:
                yield number, json.loads(line)
            except json.JSONDecodeError as e:
                yield number, Malformed(f"invalid JSON: {e.msg} (column {e.colno})")


def _first_char(f: io.TextIOBase) -> str:
    """Returns the first non-blank character of a text file and rewinds it."""
    while True:
        chunk = f.read(4096)
        if not chunk:
            f.seek(0)
            return ""
        stripped = chunk.lstrip()
        if stripped:
            f.seek(0)
            return stripped[0]


def _iter_parquet(path: str) -> Iterator[tuple[int, Any]]:
    import pyarrow.parquet as pq  # Imported here: only Parquet users pay for it.

    try:
        parquet = pq.ParquetFile(path)
    except Exception as e:  # pyarrow raises several types for a corrupt file.
        raise DataError(path, None, None, f"not a readable Parquet file: {e}") from e
    row = 0
    for batch in parquet.iter_batches(batch_size=1024):
        for record in batch.to_pylist():
            row += 1
            yield row, record
