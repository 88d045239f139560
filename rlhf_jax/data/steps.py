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
