"""Decontamination: drop training problems that overlap an evaluation set.

The rule is Light-R1's (Wen et al. 2025, arXiv 2503.10460, "thorough decontamination with exact matching
(excluding digits) and N-gram (N=32) matching"). A training problem is contaminated when either

  - digit-insensitive exact match: its question equals an evaluation question after lower-casing,
    deleting every digit and collapsing whitespace (so "Tom has 3 apples" matches "Tom has 5 apples", the
    numbers-changed copies MATH-500 is known to hold), or
  - n-gram overlap: it shares at least one word n-gram (default n = 32) with an evaluation question.
    Words are the lower-cased `\\w+` runs of the text; a question with fewer than n words has no n-grams
    and is caught only by the exact rule.

The question is the record's "question" (GSM8K), else "problem" (MATH), else a string "prompt".

    python -m rlhf_jax.data.decontaminate --train train.jsonl --eval test.jsonl [--eval more.jsonl] \\
        --out train.clean.jsonl --report report.json [--ngram 32]

writes the training file with the contaminated records dropped (the others in order, re-serialised as
JSON Lines) and a JSON report: counts per rule and per evaluation file and up to `--examples` examples
(training line, evaluation file and line, the rule, the shared n-gram). A record that is not JSON, not an
object or has no question string raises `DataError` naming the file and line.
"""

from __future__ import annotations

import argparse
import json
import re
from collections.abc import Sequence

from rlhf_jax.data import readers
from rlhf_jax.data.records import DataError

QUESTION_FIELDS = ("question", "problem", "prompt")
_WORD = re.compile(r"\w+")
_DIGIT = re.compile(r"\d")
_SPACE = re.compile(r"\s+")


def digitless(text: str) -> str:
    """The text lower-cased with digits deleted and whitespace collapsed (Light-R1's exact-match key)."""
    return _SPACE.sub(" ", _DIGIT.sub("", text.lower())).strip()


def ngrams(text: str, n: int) -> set[tuple[str, ...]]:
    """The set of word n-grams of the text (lower-cased `\\w+` words); empty with fewer than n words."""
    words = _WORD.findall(text.lower())
    return {tuple(words[i : i + n]) for i in range(len(words) - n + 1)}


def question_of(record, path: str, line: int) -> str:
    """The question text of one record; raises `DataError` naming the file and line when there is none."""
    if isinstance(record, readers.Malformed):
        raise DataError(path, line, record.field, record.error)
    if not isinstance(record, dict):
        raise DataError(path, line, None, f"expected a JSON object, got {type(record).__name__}")
    for key in QUESTION_FIELDS:
        if isinstance(record.get(key), str):
            return record[key]
    raise DataError(path, line, None, f"no question: none of {list(QUESTION_FIELDS)} is a string")


def find_overlaps(
    train: Sequence[str], evals: Sequence[str], *, n: int = 32
) -> list[tuple[int, int, str, str]]:
    """Finds the contaminated training questions.

    Args:
      train: training questions.
      evals: evaluation questions.
      n: the n-gram length.

    Returns:
      One `(train_index, eval_index, rule, detail)` per contaminated training question (the first match;
      `rule` is "exact_digitless" or "ngram", `detail` the shared n-gram for "ngram"), in training order.
    """
    exact = {}
    grams = {}
    for j, q in enumerate(evals):
        exact.setdefault(digitless(q), j)
        for g in ngrams(q, n):
            grams.setdefault(g, j)
    found = []
    for i, q in enumerate(train):
        key = digitless(q)
        if key in exact:
            found.append((i, exact[key], "exact_digitless", ""))
            continue
        for g in sorted(ngrams(q, n)):
            if g in grams:
                found.append((i, grams[g], "ngram", " ".join(g)))
                break
    return found


def _read(path: str) -> list[tuple[int, dict, str]]:
    return [(line, r, question_of(r, path, line)) for line, r in readers.iter_records(path)]


def decontaminate(
    train_path: str, eval_paths: Sequence[str], out_path: str, *, n: int = 32, examples: int = 20
) -> dict:
    """Writes `train_path` without its contaminated records to `out_path`; returns the report dict."""
    train = _read(train_path)
    evals = [(p, line, q) for p in eval_paths for line, _, q in _read(p)]
    found = find_overlaps([q for _, _, q in train], [q for _, _, q in evals], n=n)
    dropped = {i for i, *_ in found}
    with open(out_path, "w", encoding="utf-8") as f:
        for i, (_, record, _) in enumerate(train):
            if i not in dropped:
                f.write(json.dumps(record, ensure_ascii=False) + "\n")
    by_rule = {"exact_digitless": 0, "ngram": 0}
    by_eval = {p: 0 for p in eval_paths}
    for _, j, rule, _ in found:
        by_rule[rule] += 1
        by_eval[evals[j][0]] += 1
    return {
        "train": train_path,
        "eval": list(eval_paths),
        "ngram": n,
        "train_records": len(train),
        "eval_records": len(evals),
        "dropped": len(dropped),
        "kept": len(train) - len(dropped),
        "by_rule": by_rule,
        "by_eval_file": by_eval,
        "examples": [
            {
                "train_line": train[i][0],
                "train_question": train[i][2],
                "eval_file": evals[j][0],
                "eval_line": evals[j][1],
                "eval_question": evals[j][2],
                "rule": rule,
                "ngram": detail,
            }
            for i, j, rule, detail in found[:examples]
        ],
        "out": out_path,
    }


def main(argv: Sequence[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--train", required=True)
    p.add_argument("--eval", required=True, action="append")
    p.add_argument("--out", required=True)
    p.add_argument("--report", default=None, help="JSON report path (default: printed only)")
    p.add_argument("--ngram", type=int, default=32)
    p.add_argument("--examples", type=int, default=20)
    a = p.parse_args(argv)
    if a.ngram < 1:
        p.error(f"--ngram must be >= 1, got {a.ngram}")
    report = decontaminate(a.train, a.eval, a.out, n=a.ngram, examples=a.examples)
    text = json.dumps(report, indent=2, ensure_ascii=False)
    if a.report:
        with open(a.report, "w", encoding="utf-8") as f:
            f.write(text + "\n")
    print(
        f"{report['dropped']} of {report['train_records']} training records dropped "
        f"({report['by_rule']}); {report['kept']} written to {a.out}"
    )


if __name__ == "__main__":
    main()
