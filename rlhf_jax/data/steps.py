"""Reasoning steps of a completion: one step per line, as step-level methods (Direct Advantage Policy
Optimization, arXiv 2412.18279) define actions.

A step is one line including its newline; the state before step k is the prompt plus steps 0..k-1, so
``"".join(split_steps(text)) == text`` always holds. Lines that are empty or only whitespace are not
steps of their own (they carry no reasoning): they join the step before them, or the first step when
they lead. A final line without a newline (e.g. ``#### 12``) is a step too.
"""

from __future__ import annotations


def split_steps(text: str) -> list[str]:
    """Splits a completion into steps (module docstring); ``[]`` for text that is empty or all blank."""
    steps: list[str] = []
    pending = ""  # blank lines before the first real step
    for line in text.splitlines(keepends=True):
        if line.strip():
            steps.append(pending + line)
            pending = ""
        elif steps:
            steps[-1] += line
        else:
            pending += line
    if pending and steps:
        steps[-1] += pending
    return steps


def states_and_actions(prompt: str, completion: str) -> list[tuple[str, str]]:
    """Returns [(s_k, a_k)]: s_k = prompt + steps before k, a_k = step k."""
    pairs, state = [], prompt
    for step in split_steps(completion):
        pairs.append((state, step))
        state += step
    return pairs


def token_step_ends(ids, *, newline_ids, decode) -> list[int]:
    """`split_steps` on token ids: the token count at which each step of `ids` ends.

    A line ends just after a token of `newline_ids` (the tokenizer's newline piece); a line whose
    `decode(line_ids)` is blank joins the step before it, or the first step when it leads, exactly as
    `split_steps` treats blank lines, so ``[decode(ids[a:b]) for a, b in zip([0, *ends][:-1], ends)]`` equals
    ``split_steps(decode(ids))`` whenever decoding is additive over pieces. A final line without a newline
    (e.g. ``#### 12`` + EOS) is a step. Returns ``[]`` when every line is blank.
    """
    newline = set(int(i) for i in newline_ids)
    lines, start = [], 0
    for t, token in enumerate(ids):
        if int(token) in newline:
            lines.append((start, t + 1))
            start = t + 1
    if start < len(ids):
        lines.append((start, len(ids)))
    ends: list[int] = []
    for a, b in lines:
        if decode(ids[a:b]).strip():
            ends.append(b)
        elif ends:
            ends[-1] = b
    return ends
