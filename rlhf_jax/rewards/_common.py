"""Checks every reward shares: the texts, the columns it reads, and its output (float32 [N])."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

# Dataset columns (and caller-supplied columns such as token lengths) a reward may read by keyword; any
# other keyword of a reward's signature is a hyperparameter (`registry.hyperparameters`).
COLUMNS = ("prompts", "completions", "answer", "completion_lengths", "correct", "reference_completions")


def num_rows(reward: str, prompts: Sequence[str], completions: Sequence[str]) -> int:
    """N, the number of completions; raises unless there is one prompt per completion."""
    if len(prompts) != len(completions):
        raise ValueError(
            f"reward {reward!r}: {len(prompts)} prompts for {len(completions)} completions (one prompt per "
            "completion: repeat a prompt for each of its samples)"
        )
    return len(completions)


def column(reward: str, name: str, values, n: int) -> list:
    """The column `name` as a list of n values; raises naming the reward if it is missing or ragged."""
    if values is None:
        raise ValueError(f"reward {reward!r} needs the column {name!r}: one value per completion ({n} here)")
    values = list(values)
    if len(values) != n:
        raise ValueError(f"reward {reward!r}: column {name!r} has {len(values)} values for {n} completions")
    return values


def token_lengths(reward: str, values, n: int) -> np.ndarray:
    """The `completion_lengths` column as int64 [n]: integer token counts, never characters."""
    lengths = np.asarray(column(reward, "completion_lengths", values, n))
    if lengths.size and (lengths.dtype.kind not in "iu" or (lengths < 0).any()):
        raise ValueError(
            f"reward {reward!r}: completion_lengths must be non-negative integer token counts (the sampler's "
            f"lengths), got dtype {lengths.dtype} with values {lengths[:4].tolist()}..."
        )
    return lengths.astype(np.int64).reshape(n)


def output(values, n: int) -> np.ndarray:
    """Rewards as float32 [n]."""
    return np.asarray(values, np.float32).reshape(n)
