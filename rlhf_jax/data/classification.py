"""Classification as generation (GenCLS++, arXiv 2504.19898): label sets, examples, readers, a synthetic
k-class task, and prompt strategies as pure data transforms.

    labels = classification.LabelSet(("negative", "positive"))
    examples, labels, stats = classification.load_classification("SST-2/train.tsv")
    splits = classification.synthetic_splits(seed=0, num_classes=4, num_train=512, num_eval=128)
    prompt = classification.render(example, labels, classification.Strategy("fewshot", shots=2),
                                   demos=demos)
    target = classification.target(example, labels, strategy)      # the SFT completion (EOS added later)

Readers (`load_classification`): GLUE-style TSV with a header row, detected from its columns (SST-2
`sentence`/`label`; MNLI `sentence1`/`sentence2`/`gold_label` with entailment/neutral/contradiction;
RTE `sentence1`/`sentence2`/`label` with entailment/not_entailment; STS-B `sentence1`/`sentence2`/`score`,
a float target), and JSONL records `text` (optional `text_b`) and `label` (a name or an index). Bad records
(a wrong column count, an unknown label, an empty text) are skipped and counted per reason, and logged
with their file and line, like the other loaders (`records.LoadStats`); `strict` raises `DataError`
naming them.

Prompt strategies (`STRATEGIES`; train-time and inference-time ones are chosen independently):
  plain        the label names and the text;
  fewshot      `shots` demonstrations (text and label) before the text (in-context learning);
  definitions  each label with its definition;
  uncertain    an extra answer "uncertain" offered for unsure cases (never a gold label);
  numeric      semantically irrelevant numeric labels "1".."k" instead of the names;
  reason       asks for a short reason first, then "Answer: <label>" (the direct-vs-reasoning study).
"""

from __future__ import annotations

import csv
import dataclasses
import io
import logging
import re

import numpy as np

from rlhf_jax.data import readers
from rlhf_jax.data import records as rec

log = logging.getLogger("rlhf_jax")

UNCERTAIN = "uncertain"
STRATEGIES = ("plain", "fewshot", "definitions", "uncertain", "numeric", "reason")
ANSWER_MARK = "Answer:"  # the "reason" strategy's answer follows the last one

UNKNOWN_LABEL = "unknown_label"  # a skip reason of this loader: a label outside the label set
COLUMN_COUNT = "column_count"  # a TSV row with fewer fields than its header


# ----------------------------------------------------------------------------------------------------
# Labels and examples.


def normalize(text: str) -> str:
    """Lower case, punctuation dropped, whitespace collapsed: "  Positive!" -> "positive"."""
    text = re.sub(r"[^\w\s]", " ", str(text).lower()).replace("_", " ")
    return " ".join(text.split())


@dataclasses.dataclass(frozen=True)
class LabelSet:
    """A dataset's verbaliser: label names (index order), optional definitions, numeric aliases.

    Attributes:
      names: the label strings, e.g. ("negative", "positive").
      definitions: one sentence per label for the "definitions" strategy (empty: none).
      numeric: whether the aliases "1".."k" are accepted for the labels (the "numeric" strategy).
    """

    names: tuple[str, ...]
    definitions: tuple[str, ...] = ()
    numeric: bool = True

    def __post_init__(self):
        object.__setattr__(self, "names", tuple(str(n) for n in self.names))
        object.__setattr__(self, "definitions", tuple(str(d) for d in self.definitions))
        if len(self.names) < 2:
            raise ValueError(f"a label set needs at least 2 labels, got {self.names!r}")
        keys = [normalize(n) for n in self.names]
        if len(set(keys)) != len(keys) or not all(keys):
            raise ValueError(
                f"label names must be distinct and non-empty after normalisation: {self.names!r}"
            )
        if self.definitions and len(self.definitions) != len(self.names):
            raise ValueError(f"{len(self.definitions)} definitions for {len(self.names)} labels")

    @property
    def aliases(self) -> tuple[str, ...]:
        """The numeric aliases "1".."k"."""
        return tuple(str(i + 1) for i in range(len(self.names)))

    def index(self, answer: str) -> int | None:
        """The label index an answer names after `normalize` (a name, or an alias when `numeric`), or
        None when it names none."""
        key = normalize(answer)
        for i, name in enumerate(self.names):
            if key == normalize(name):
                return i
        if self.numeric and key in self.aliases:
            return self.aliases.index(key)
        return None


@dataclasses.dataclass(frozen=True)
class Example:
    """One classification example: a text (and a second text for pairs), the gold label index, and for
    regression (STS-B) a float `target` (then `label` is its rounded value's class, for reporting)."""

    text: str
    label: int
    text_b: str | None = None
    target: float | None = None
    rationale: str = ""  # the synthetic task's "reason" (its cue words), for the reason strategy


@dataclasses.dataclass(frozen=True)
class Splits:
    """The train and held-out examples of a task with its label set."""

    train: list[Example]
    eval: list[Example]
    labels: LabelSet


# ----------------------------------------------------------------------------------------------------
# Readers.

# GLUE formats: (required columns, text column(s), label column, label set or None for given names).
SST2_LABELS = LabelSet(("negative", "positive"))
MNLI_LABELS = LabelSet(("entailment", "neutral", "contradiction"))
RTE_LABELS = LabelSet(("entailment", "not_entailment"))
STSB_LABELS = LabelSet(("0", "1", "2", "3", "4", "5"), numeric=False)
FORMATS = ("sst2", "mnli", "rte", "stsb", "jsonl")


def detect_format(columns) -> str:
    """The GLUE format of a TSV header (or JSONL keys): sst2, mnli, rte, stsb or jsonl; raises ValueError."""
    cols = set(columns)
    if {"sentence1", "sentence2", "gold_label"} <= cols:
        return "mnli"
    if {"sentence1", "sentence2", "score"} <= cols:
        return "stsb"
    if {"sentence1", "sentence2", "label"} <= cols:
        return "rte"
    if {"sentence", "label"} <= cols:
        return "sst2"
    if {"text", "label"} <= cols:
        return "jsonl"
    raise ValueError(
        f"cannot detect the classification format from the columns {sorted(cols)}: expected SST-2 "
        "(sentence, label), MNLI (sentence1, sentence2, gold_label), RTE (sentence1, sentence2, label), "
        "STS-B (sentence1, sentence2, score) or JSONL (text, [text_b], label)"
    )


def _label_index(value, labels: LabelSet | None, names: list[str]) -> int:
    """The index of a label value: a 0-based integer index (SST-2's 0/1), else a name of `labels` (with
    no fixed label set: the order in which `names` were first seen)."""
    text = str(value).strip()
    if not text:
        raise rec.BadRecordError(rec.MISSING_FIELD, "label", "empty label")
    if labels is None:
        if text not in names:
            names.append(text)
        return names.index(text)
    if re.fullmatch(r"\d+", text):
        if int(text) < len(labels.names):
            return int(text)
    else:
        key = normalize(text)
        for i, name in enumerate(labels.names):
            if key == normalize(name):
                return i
    raise rec.BadRecordError(UNKNOWN_LABEL, "label", f"{text!r} is not one of {labels.names}")


def _parse(fmt: str, row: dict, labels: LabelSet | None, names: list[str]) -> Example:
    """One record (a TSV row as a dict, or a JSON object) as an Example; raises BadRecordError."""
    if not isinstance(row, dict):
        raise rec.BadRecordError(rec.MALFORMED, None, "not a JSON object")
    text_key, pair_key, label_key = {
        "sst2": ("sentence", None, "label"),
        "mnli": ("sentence1", "sentence2", "gold_label"),
        "rte": ("sentence1", "sentence2", "label"),
        "stsb": ("sentence1", "sentence2", "score"),
        "jsonl": ("text", "text_b", "label"),
    }[fmt]
    for key in (text_key, label_key) + ((pair_key,) if pair_key and fmt != "jsonl" else ()):
        if row.get(key) is None:
            raise rec.BadRecordError(rec.MISSING_FIELD, key, "missing")
    text = str(row[text_key]).strip()
    text_b = row.get(pair_key) if pair_key else None
    text_b = str(text_b).strip() if text_b is not None else None
    if not text or text_b == "":
        raise rec.BadRecordError(rec.EMPTY_PROMPT, text_key if not text else pair_key, "empty text")
    if fmt == "stsb":
        try:
            target = float(row[label_key])
        except ValueError:
            raise rec.BadRecordError(
                rec.WRONG_TYPE, label_key, f"{row[label_key]!r} is not a number"
            ) from None
        if not 0.0 <= target <= 5.0:
            raise rec.BadRecordError(rec.WRONG_TYPE, label_key, f"{target} outside [0, 5]")
        return Example(text=text, text_b=text_b, label=int(round(target)), target=target)
    return Example(text=text, text_b=text_b, label=_label_index(row[label_key], labels, names))


def _tsv_records(path: str):
    """(line, record) of a TSV file with a header; a row of the wrong width is a `readers.Malformed`."""
    with open(path, encoding="utf-8", newline="") as f:
        lines = f.read().splitlines()
    if not lines:
        return [], []
    header = lines[0].split("\t")
    out = []
    for number, line in enumerate(lines[1:], start=2):
        if not line.strip():
            continue
        fields = next(csv.reader(io.StringIO(line), delimiter="\t", quoting=csv.QUOTE_NONE))
        if len(fields) < len(header):
            out.append(
                (number, readers.Malformed(f"{len(fields)} fields, header has {len(header)}", COLUMN_COUNT))
            )
        else:
            out.append((number, dict(zip(header, fields, strict=False))))
    return header, out


def load_classification(
    paths: readers.PathsLike, *, labels: LabelSet | None = None, strict: bool = False
) -> tuple[list[Example], LabelSet, rec.LoadStats]:
    """Loads classification examples from GLUE-style TSV or JSONL files (module docstring).

    Args:
      paths: a file, glob or comma-separated list; `.tsv` files are read as TSV with a header, others
        as JSONL (`readers.iter_records`).
      labels: the label set (default: the GLUE format's, or for JSONL the label names in first-seen
        order, or `0..k-1` indices as given).
      strict: raise `DataError` on the first bad record instead of skipping and counting it.

    Returns:
      (examples, label set, load statistics of kind "classification").
    """
    stats = rec.LoadStats()
    examples: list[Example] = []
    names: list[str] = []
    for path in readers.expand_paths(paths):
        if path.lower().endswith(".tsv"):
            header, records = _tsv_records(path)
        else:
            records = list(readers.iter_records(path))
            first = next((r for _, r in records if isinstance(r, dict)), {})
            header = list(first)
        try:
            fmt = detect_format(header)
        except ValueError as e:
            raise rec.DataError(path, 1, None, str(e)) from None
        if labels is None:
            labels = {"sst2": SST2_LABELS, "mnli": MNLI_LABELS, "rte": RTE_LABELS, "stsb": STSB_LABELS}.get(
                fmt
            )
        file_stats = rec.FileStats(path=path, format=fmt, kind="classification")
        stats.files.append(file_stats)
        for number, record in records:
            file_stats.records += 1
            try:
                if isinstance(record, readers.Malformed):
                    raise rec.BadRecordError(record.reason, record.field, record.error)
                examples.append(_parse(fmt, record, labels, names))
                file_stats.kept += 1
            except rec.BadRecordError as e:
                if strict:
                    raise rec.DataError(path, number, e.field, e.message) from None
                file_stats.skipped[e.reason] += 1
                log.warning("%s:%d: skipped (%s): %s", path, number, e.reason, e.message)
        log.info("loaded classification data: %s", file_stats.summary())
    if labels is None:
        if all(re.fullmatch(r"\d+", n) for n in names):  # integer labels: class i is "i"... in index order
            order = sorted(names, key=int)
            examples = [dataclasses.replace(e, label=order.index(names[e.label])) for e in examples]
            names = order
        if len(names) < 2:
            raise ValueError(
                f"{paths!r}: found {len(names)} distinct label(s); a classification task needs 2+"
            )
        labels = LabelSet(tuple(names))
    return examples, labels, stats


# ----------------------------------------------------------------------------------------------------
# The synthetic k-class task.

# Each class: a name, a definition, and cue words; shared filler words carry no class.
SYNTHETIC_CLASSES = (
    ("sports", "games, teams and athletes",
     ("goal", "team", "coach", "match", "score", "league", "player", "stadium")),
    ("food", "cooking, meals and eating",
     ("recipe", "soup", "bread", "kitchen", "dinner", "spice", "oven", "salad")),
    ("weather", "rain, wind, heat and forecasts",
     ("rain", "storm", "cloud", "wind", "forecast", "snow", "sunny", "thunder")),
    ("music", "songs, bands and concerts",
     ("song", "guitar", "band", "concert", "melody", "drum", "album", "singer")),
    ("travel", "trips, flights and hotels",
     ("flight", "hotel", "airport", "luggage", "passport", "train", "beach", "map")),
    ("money", "prices, banks and savings",
     ("bank", "loan", "price", "budget", "salary", "coin", "tax", "savings")),
)  # fmt: skip
FILLERS = ("the", "a", "today", "we", "talked", "about", "my", "friend", "said", "it", "was", "really",
           "again", "this", "week", "and", "then", "some", "new", "old")  # fmt: skip


def synthetic_labels(num_classes: int) -> LabelSet:
    """The synthetic task's first `num_classes` classes (2..6) as a label set with definitions."""
    if not 2 <= num_classes <= len(SYNTHETIC_CLASSES):
        raise ValueError(f"num_classes must be in [2, {len(SYNTHETIC_CLASSES)}], got {num_classes}")
    chosen = SYNTHETIC_CLASSES[:num_classes]
    return LabelSet(tuple(c[0] for c in chosen), tuple(c[1] for c in chosen))


def synthetic_example(rng: np.random.Generator, num_classes: int, *, ambiguous_rate: float) -> Example:
    """One item: 2-3 cue words of its class among fillers; an ambiguous item (prob. `ambiguous_rate`)
    mixes 2 cue words of its class with 1 of another's (its label: the class with more cues)."""
    label = int(rng.integers(num_classes))
    cues = list(rng.choice(SYNTHETIC_CLASSES[label][2], size=int(rng.integers(2, 4)), replace=False))
    if rng.random() < ambiguous_rate:
        other = int((label + 1 + rng.integers(num_classes - 1)) % num_classes)
        cues = cues[:2] + [str(rng.choice(SYNTHETIC_CLASSES[other][2]))]
    words = list(rng.choice(FILLERS, size=int(rng.integers(3, 7)), replace=True))
    for cue in cues:  # cues stay in order, at random positions among the fillers
        words.insert(int(rng.integers(len(words) + 1)), str(cue))
    placed = [w for w in words if w in cues]
    rationale = "the text mentions " + ", ".join(placed)
    return Example(text=" ".join(words), label=label, rationale=rationale)


def synthetic_splits(
    *,
    seed: int,
    num_classes: int = 4,
    num_train: int = 1024,
    num_eval: int = 256,
    ambiguous_rate: float = 0.3,
    noise_rate: float = 0.1,
) -> Splits:
    """The embedded synthetic task: train and held-out items from (seed, sizes) alone.

    Training labels are flipped to a uniformly drawn other class with probability `noise_rate` (label
    noise); held-out labels are clean, so held-out accuracy measures the rule, not the noise.
    """
    if not 0.0 <= noise_rate < 1.0 or not 0.0 <= ambiguous_rate <= 1.0:
        raise ValueError(
            f"need noise_rate in [0, 1) and ambiguous_rate in [0, 1], got {noise_rate}, {ambiguous_rate}"
        )
    labels = synthetic_labels(num_classes)
    rng = np.random.default_rng([seed, 18])
    train = [synthetic_example(rng, num_classes, ambiguous_rate=ambiguous_rate) for _ in range(num_train)]
    held = [synthetic_example(rng, num_classes, ambiguous_rate=ambiguous_rate) for _ in range(num_eval)]
    flip = rng.random(num_train) < noise_rate
    shift = rng.integers(1, num_classes, size=num_train)
    train = [
        dataclasses.replace(e, label=int((e.label + s) % num_classes)) if f else e
        for e, f, s in zip(train, flip, shift, strict=True)
    ]
    return Splits(train=train, eval=held, labels=labels)


# ----------------------------------------------------------------------------------------------------
# Prompt strategies.


@dataclasses.dataclass(frozen=True)
class Strategy:
    """A prompt strategy (module docstring): `name` in STRATEGIES; `shots` demonstrations for
    "fewshot"."""

    name: str = "plain"
    shots: int = 2

    def __post_init__(self):
        if self.name not in STRATEGIES:
            raise ValueError(f"prompt strategy must be one of {STRATEGIES}, got {self.name!r}")
        if self.name == "fewshot" and self.shots < 1:
            raise ValueError(f"the fewshot strategy needs shots >= 1, got {self.shots}")


def label_strings(labels: LabelSet, strategy: Strategy) -> tuple[str, ...]:
    """The candidate answers under `strategy`: "1".."k" for numeric, the names plus "uncertain" for
    uncertain, else the names (perplexity decoding scores these)."""
    if strategy.name == "numeric":
        return labels.aliases
    if strategy.name == "uncertain":
        return (*labels.names, UNCERTAIN)
    return labels.names


def _body(example: Example) -> str:
    if example.text_b is None:
        return f"Text: {example.text}\n"
    return f"Text A: {example.text}\nText B: {example.text_b}\n"


def target(example: Example, labels: LabelSet, strategy: Strategy) -> str:
    """The SFT completion of an example under `strategy` (the tokenizer adds EOS): its label string, or
    for "reason" its rationale (if any) then "Answer: <label>"."""
    answer = label_strings(labels, strategy)[example.label]
    if strategy.name == "reason":
        return (
            f"{example.rationale}. {ANSWER_MARK} {answer}" if example.rationale else f"{ANSWER_MARK} {answer}"
        )
    return answer


def render(example: Example, labels: LabelSet, strategy: Strategy, *, demos: tuple[Example, ...] = ()) -> str:
    """The prompt of `example` under `strategy` (module docstring); "fewshot" uses the first
    `strategy.shots` of `demos` as demonstrations."""
    options = ", ".join(label_strings(labels, strategy))
    head = f"Classify the text as one of: {options}.\n"
    if strategy.name == "definitions":
        defs = labels.definitions or labels.names
        head += "".join(f"- {n}: {d}\n" for n, d in zip(labels.names, defs, strict=True))
    elif strategy.name == "uncertain":
        head += f"Answer {UNCERTAIN} if unsure.\n"
    elif strategy.name == "reason":
        head += f"Give a short reason, then {ANSWER_MARK} and the label.\n"
    elif strategy.name == "fewshot":
        if len(demos) < strategy.shots:
            raise ValueError(f"fewshot with shots={strategy.shots} needs as many demos, got {len(demos)}")
        plain = Strategy("plain")
        head += "".join(f"{_body(d)}Label: {target(d, labels, plain)}\n\n" for d in demos[: strategy.shots])
    return head + _body(example) + ("Reason:" if strategy.name == "reason" else "Label:")


def demonstrations(train: list[Example], num_classes: int, shots: int, *, seed: int) -> tuple[Example, ...]:
    """`shots` fixed demonstrations from the training split, cycling over the classes (seeded)."""
    order = np.random.default_rng([seed, 41]).permutation(len(train))
    by_class: dict[int, list[Example]] = {}
    for i in order:
        by_class.setdefault(train[i].label, []).append(train[i])
    out, k = [], 0
    while len(out) < shots and any(by_class.values()):
        pool = by_class.get(k % num_classes)
        if pool:
            out.append(pool.pop(0))
        k += 1
    return tuple(out)


def parse_answer(completion: str, labels: LabelSet, *, extra: tuple[str, ...] = ()) -> int | None:
    """The label index a generated answer names (text after the last "Answer:" when present; a name
    or numeric alias after `normalize`); len(labels.names) + j for `extra[j]` (e.g. "uncertain");
    None when unparseable."""
    text = completion.rsplit(ANSWER_MARK, 1)[1] if ANSWER_MARK in completion else completion
    i = labels.index(text)
    if i is not None:
        return i
    key = normalize(text)
    for j, e in enumerate(extra):
        if key == normalize(e):
            return len(labels.names) + j
    return None


__all__ = [
    "ANSWER_MARK", "Example", "FORMATS", "LabelSet", "STRATEGIES", "Splits", "Strategy", "UNCERTAIN",
    "demonstrations", "detect_format", "label_strings", "load_classification", "normalize", "parse_answer",
    "render", "synthetic_labels", "synthetic_splits", "target",
]  # fmt: skip
