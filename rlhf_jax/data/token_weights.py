"""Per-token loss weights for SFT, written in the data as character spans of the completion.

Token-weighted SFT (TL-Training's "prioritizing key tokens", Ye et al. 2024, arXiv 2412.15495, Sec. 4.2)
scales each completion token's NLL by a weight w_t >= 0. A JSONL record of the `sft` format (string
completion) writes them as

  {"prompt": "...", "completion": "...", "weight_spans": [[start, end, weight], ...]}

`start`/`end` are character offsets (Python string indices: Unicode code points, end exclusive) into the
`completion` string *as written in the record*; the spans must not overlap. After the joining rule of
`formats.py` (leading blanks of the completion dropped, one space added after a prompt not ending in a
newline) the spans are moved with the text; a span over dropped blanks only is dropped. Tokenisation
(`pipeline.tokenize_sft`) turns them into one weight per completion token: the largest weight of the
spans the token's characters overlap, 1 where it overlaps none, and 1 on the appended EOS. Tokens cut by
truncation lose their weights with them. The weights ride in the batch's float `loss_mask`, so the
objective is the weighted per-token mean over the whole batch (`train.steps.sft_objective`),

  L = Σ_t w_t · (−log π(y_t | x, y_<t)) / Σ_t w_t,

TL-Training's reduction (its released code divides by the sum of the weights). With every weight 1 the
`loss_mask` is the plain one, so the loss and the gradients are plain SFT's, bit for bit.

Bad spans (not a list of [start, end, weight] triples, a weight negative or not finite, start/end not
integers, out of the completion's range, or overlapping) raise `records.InvalidWeightsError`, which the
loaders turn into a `DataError` naming the file, line and field in both strict and lenient modes.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import numpy as np

from rlhf_jax.data import records as rec

FIELD = "weight_spans"


def parse_weight_spans(value: Any, raw: str, completion: str) -> tuple[tuple[int, int, float], ...]:
    """Validates a record's `weight_spans` over its raw completion `raw` and moves them onto `completion`
    (the text after the joining rule: `raw` with its leading blanks dropped, possibly one space first).

    Raises:
      InvalidWeightsError: naming the bad span (`weight_spans[i]`).
    """
    if not isinstance(value, list):
        kind = type(value).__name__
        raise rec.InvalidWeightsError(FIELD, f"expected a list of [start, end, weight], got {kind}")
    spans = []
    for i, span in enumerate(value):
        field = f"{FIELD}[{i}]"
        if not isinstance(span, list) or len(span) != 3:
            raise rec.InvalidWeightsError(field, f"expected [start, end, weight], got {span!r}")
        start, end, weight = span
        if not all(isinstance(x, int) and not isinstance(x, bool) for x in (start, end)):
            raise rec.InvalidWeightsError(field, f"start and end must be integers, got {start!r}, {end!r}")
        if isinstance(weight, bool) or not isinstance(weight, int | float):
            raise rec.InvalidWeightsError(field, f"the weight must be a number, got {weight!r}")
        if not math.isfinite(weight) or weight < 0:
            raise rec.InvalidWeightsError(field, f"the weight must be finite and >= 0, got {weight!r}")
        if not 0 <= start < end <= len(raw):
            raise rec.InvalidWeightsError(
                field, f"span [{start}, {end}) is out of range for a completion of {len(raw)} characters"
            )
        spans.append((start, end, float(weight), field))
    spans.sort()
    for (_, end_a, _, field_a), (start_b, _, _, field_b) in zip(spans, spans[1:], strict=False):
        if start_b < end_a:
            raise rec.InvalidWeightsError(field_b, f"overlaps {field_a}")
    stripped = raw.lstrip(" \t")
    if not completion.endswith(stripped) or len(completion) - len(stripped) > 1:
        raise ValueError(f"completion {completion!r} is not the joined form of {raw!r}")
    lead, added = len(raw) - len(stripped), len(completion) - len(stripped)
    moved = []
    for start, end, weight, _ in spans:
        if end > lead:
            moved.append((max(start - lead, 0) + added, end - lead + added, weight))
    return tuple(moved)


def char_offsets(tokenizer, text: str) -> tuple[list[int], np.ndarray]:
    """The ids of `text` (as `tokenizer.encode_batch`) and each token's [start, end) character span [X, 2].

    A token of no characters of its own (a byte-fallback piece that starts a multi-byte character) gets
    the span of the character it starts.
    """
    ids, offsets = tokenizer.char_offsets(text)
    return list(ids), np.asarray(offsets, np.int64).reshape(-1, 2)


def token_weights(spans_X2: np.ndarray, weight_spans: Sequence[tuple[int, int, float]]) -> np.ndarray:
    """Per-token weights [X] float32 from token character spans: the largest weight of the spans a token
    overlaps, 1 where it overlaps none (module docstring)."""
    weights_X = np.ones(len(spans_X2), np.float32)
    hit_X = np.zeros(len(spans_X2), bool)
    for start, end, weight in weight_spans:
        overlap_X = (spans_X2[:, 0] < end) & (spans_X2[:, 1] > start)
        weights_X = np.where(overlap_X & hit_X, np.maximum(weights_X, weight), weights_X)
        weights_X = np.where(overlap_X & ~hit_X, np.float32(weight), weights_X)
        hit_X |= overlap_X
    return weights_X.astype(np.float32)


def weight_spans_of_tokens(spans_X2: np.ndarray, weights_X: np.ndarray) -> list[list]:
    """The `weight_spans` field (JSON-ready [start, end, weight] lists) that gives the tokens with
    character spans `spans_X2` the weights `weights_X`: one span per token whose weight is not 1."""
    out = []
    for (start, end), weight in zip(spans_X2.tolist(), weights_X.tolist(), strict=True):
        if weight == 1.0 or end <= start:
            continue
        if out and start < out[-1][1]:  # byte pieces of one character share its span: merge them
            out[-1] = [out[-1][0], max(end, out[-1][1]), max(weight, out[-1][2])]
        else:
            out.append([start, end, weight])
    return out
