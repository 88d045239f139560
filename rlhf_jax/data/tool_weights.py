"""TL-Training's key-token weights for tool calls ("prioritizing key tokens", PKT; arXiv 2412.15495).

Ye et al. (2024, Sec. 4.2) find that a tool call's outcome is decided at a few tokens: the first token of
the tool's name, and, where another available tool's name shares a prefix with it, the token at which
the two names part. PKT up-weights those key tokens in the SFT loss. As in the released code
(Junjie-Ye/TL-Training `code/pkt/utils.py`), with K key tokens among the completion's N tokens every key
token weighs

  w_key = min((N − K) / K, max_weight)   if K < N − K, else 1,        max_weight = 9 by default,

and every other token 1, so the key tokens together weigh about as much as all the others (the loss is
then divided by Σ w: `token_weights.py`). Differences from the released code, which reads CodeLlama's
`Function: name(...)` text by token strings: names are found in JSON tool calls (`"name": "..."`, any
number of calls, each one's name a key); the part point is found on characters (the token holding the
first character at which the two names differ, or the token right after the name when the other name
extends it), not on token lists; and N counts every token of the completion text (the released code
leaves its parameter-boundary tokens out of the N − K others).

`tool_name_token_weights` gives the weights of the completion's tokens; `token_weights.
weight_spans_of_tokens` turns them into the `weight_spans` field of an `sft` record.
"""

from __future__ import annotations

import json
import re
from collections.abc import Sequence

import numpy as np

from rlhf_jax.data import token_weights

MAX_WEIGHT = 9.0  # the released code's `max_weight`
_NAME_RE = re.compile(r'"name"\s*:\s*"((?:[^"\\]|\\.)*)"')


def tool_names_in(text: str) -> list[tuple[int, int, str]]:
    """(start, end, name) of every JSON `"name": "..."` value in `text`: the character span of the name
    inside its quotes, and the decoded name."""
    return [(m.start(1), m.end(1), json.loads(f'"{m.group(1)}"')) for m in _NAME_RE.finditer(text)]


def tool_name_token_weights(
    completion: str, tokenizer, *, tool_names: Sequence[str] = (), max_weight: float = MAX_WEIGHT
) -> np.ndarray:
    """PKT weights [X] float32 of the tokens of `completion` (its `tokenizer.encode` ids, no EOS).

    Args:
      completion: the assistant text holding one or more JSON tool calls (`{"name": "get_weather", ...}`).
      tokenizer: the tokenizer the model is trained with (needs `char_offsets`).
      tool_names: the tools available in the prompt; each one sharing a prefix with a called name adds
        the token where the two part as a key token.
      max_weight: the cap on a key token's weight.

    Returns:
      1 on every token but the key ones (module docstring); all 1 when the text holds no tool call.
    """
    if max_weight < 1:
        raise ValueError(f"max_weight must be >= 1, got {max_weight}")
    _, spans_X2 = token_weights.char_offsets(tokenizer, completion)
    key_chars = set()
    for start, end, name in tool_names_in(completion):
        if end <= start:
            continue
        key_chars.add(start)
        for other in tool_names:
            shared = _common_prefix(completion[start:end], other)  # on the text: escapes keep positions
            if other != name and shared > 0:
                key_chars.add(start + shared if shared < end - start else end)
    key_X = np.zeros(len(spans_X2), bool)
    for char in key_chars:
        holding = np.flatnonzero((spans_X2[:, 0] <= char) & (spans_X2[:, 1] > char))
        if len(holding):
            key_X[holding[0]] = True
    weights_X = np.ones(len(spans_X2), np.float32)
    keys, others = int(key_X.sum()), int((~key_X).sum())
    if 0 < keys < others:
        weights_X[key_X] = min(others / keys, max_weight)
    return weights_X


def _common_prefix(a: str, b: str) -> int:
    """Length of the longest common prefix of two strings."""
    n = 0
    for x, y in zip(a, b, strict=False):
        if x != y:
            break
        n += 1
    return n
