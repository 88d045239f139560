"""Inspect data files: detected format, records read, examples kept, skips by reason, token lengths.

  python -m rlhf_jax.data.inspect FILE [FILE...] [--format F] [--tokenizer PATH.model]
                                  [--max_len T --max_prompt_len P]

FILE may be a glob. Token-length percentiles (p50/p90/p99/max, counting BOS with the prompt and EOS with
each response) are printed when a tokenizer is given, and truncation counts when `--max_len` is given too.
The exit status is 1 if some file could not be read.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

import numpy as np

from rlhf_jax.data import loading, pipeline, readers
from rlhf_jax.data import records as rec
from rlhf_jax.data.tokenizer import Tokenizer


def describe_file(
    path: str,
    *,
    format: str | None = None,
    tokenizer: Tokenizer | None = None,
    layout: pipeline.SequenceLayout | None = None,
) -> list[str]:
    """Returns the report lines for one file (see module docstring)."""
    examples, stats = loading.load_file(path, format=format)
    skips = ", ".join(f"{k}={v}" for k, v in sorted(stats.skipped.items())) or "none"
    lines = [
        f"== {path}",
        f"format: {stats.format} ({stats.kind})",
        f"records: {stats.records}  kept: {stats.kept}  skipped: {sum(stats.skipped.values())} ({skips})",
    ]
    if tokenizer is None or not examples:
        return lines
    if stats.kind == "preference":
        fields = ("prompt", "chosen", "rejected")
    else:
        fields = ("prompt", "completion")
    for field in fields:
        texts = [getattr(ex, field) for ex in examples]
        lengths = np.array([len(ids) + 1 for ids in tokenizer.encode_batch(texts)])
        p50, p90, p99, top = np.percentile(lengths, [50, 90, 99, 100]).astype(int)
        lines.append(f"tokens {field:>10}: p50 {p50}  p90 {p90}  p99 {p99}  max {top}")
    if layout is not None:
        load_stats = rec.LoadStats(files=[stats])
        tokenize = pipeline.tokenize_preference if stats.kind == "preference" else pipeline.tokenize_sft
        tokenize(examples, tokenizer, layout, load_stats)
        trunc = ", ".join(f"{k}={v}" for k, v in sorted(load_stats.truncated.items())) or "none"
        lines.append(
            f"truncated at max_len={layout.max_len}, max_prompt_len={layout.max_prompt_len}: {trunc}"
        )
    return lines


def main(argv: Sequence[str] | None = None) -> int:
    """Prints a report per file; returns the exit status."""
    parser = argparse.ArgumentParser(
        prog="python -m rlhf_jax.data.inspect", description=__doc__.split("\n")[0]
    )
    parser.add_argument("files", nargs="+", help="data files or globs")
    parser.add_argument("--format", default=None, help="force a format (default: detect per file)")
    parser.add_argument("--tokenizer", default=None, help="a sentencepiece .model for token lengths")
    parser.add_argument("--max_len", type=int, default=None, help="with --tokenizer: report truncations")
    parser.add_argument("--max_prompt_len", type=int, default=None, help="default: max_len // 2")
    args = parser.parse_args(argv)
    tokenizer = Tokenizer.load(args.tokenizer) if args.tokenizer else None
    layout = None
    if args.max_len is not None:
        layout = pipeline.SequenceLayout(args.max_len, args.max_prompt_len or args.max_len // 2)
    status = 0
    for pattern in args.files:
        try:
            paths = readers.expand_paths([pattern])
        except FileNotFoundError as e:
            print(f"== {pattern}\nerror: {e}")
            status = 1
            continue
        for path in paths:
            try:
                print("\n".join(describe_file(path, format=args.format, tokenizer=tokenizer, layout=layout)))
            except (rec.DataError, OSError) as e:
                print(f"== {path}\nerror: {e}")
                status = 1
    return status


if __name__ == "__main__":
    sys.exit(main())
