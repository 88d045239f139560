"""Several rewards as one: their weighted sum, with each reward's own values kept for logging."""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable, Mapping, Sequence

import numpy as np

from rlhf_jax.rewards import _common


@dataclasses.dataclass(frozen=True, eq=False)
class Combined:
    """The reward R = Σ_k w_k r_k over labelled rewards r_k (build it with `combine`).

    Calling it returns R (float32 [N]), so a `Combined` is itself a reward; `evaluate` returns R and
    every r_k, unweighted, for logging (e.g. as `reward/<label>` metrics). Every r_k is computed, a
    weight of 0 included: weight 0 logs a reward without training on it (the gold reward beside a
    learned reward model's, say).

    Attributes:
      weights: {label: w_k}.
      fns: {label: r_k}, in the order they are evaluated and summed.
    """

    weights: Mapping[str, float]
    fns: Mapping[str, Callable]

    def evaluate(
        self, *, prompts: Sequence[str], completions: Sequence[str], **columns
    ) -> tuple[np.ndarray, dict[str, np.ndarray]]:
        """(R float32 [N], {label: r_k float32 [N]}); every column goes to every reward.

        Raises:
          ValueError: naming the reward, if one returns a shape other than [N] or a non-finite value.
        """
        n = _common.num_rows("combine", prompts, completions)
        values = {}
        for label, fn in self.fns.items():
            r = np.asarray(fn(prompts=prompts, completions=completions, **columns))
            if r.shape != (n,):
                raise ValueError(f"reward {label!r} returned shape {r.shape} for {n} completions, not ({n},)")
            bad = np.flatnonzero(~np.isfinite(r))
            if bad.size:
                raise ValueError(f"reward {label!r} returned {r[bad[0]]} for completion {bad[0]}")
            values[label] = r.astype(np.float32)
        total = np.zeros(n, np.float64)
        for label, r in values.items():
            total += self.weights[label] * r.astype(np.float64)
        return total.astype(np.float32), values

    def __call__(self, *, prompts: Sequence[str], completions: Sequence[str], **columns) -> np.ndarray:
        """R = Σ_k w_k r_k, float32 [N]."""
        return self.evaluate(prompts=prompts, completions=completions, **columns)[0]


def combine(weights: Mapping[str, float], fns: Mapping[str, Callable]) -> Combined:
    """The weighted sum of labelled rewards, R = Σ_k w_k r_k, with each r_k kept for logging.

        fns = {"correct": rewards.make("gsm8k"),
               "overlong": rewards.make("soft_overlong", max_length=256, cache=64)}
        reward = rewards.combine({"correct": 1.0, "overlong": 1.0}, fns)
        R_N, parts = reward.evaluate(prompts=prompts, completions=texts, answer=answers,
                                     completion_lengths=lengths)   # parts["overlong"]: r_k, unweighted

    Labels are free (the same reward may appear twice with different hyperparameters); the sum is taken
    in float64 over the labels in `fns`' order and returned as float32.

    Args:
      weights: {label: w_k}, finite numbers, with exactly the labels of `fns`.
      fns: {label: reward}, each `reward(*, prompts, completions, **columns) -> [N]`.

    Returns:
      A `Combined`: call it for R, or `.evaluate(...)` for (R, {label: r_k}).
    """
    if not fns:
        raise ValueError("combine: no rewards")
    if set(weights) != set(fns):
        raise ValueError(
            f"combine: weights and rewards must name the same labels; weights without a reward: "
            f"{sorted(set(weights) - set(fns))}, rewards without a weight: {sorted(set(fns) - set(weights))}"
        )
    for label, w in weights.items():
        if isinstance(w, bool) or not isinstance(w, (int, float)) or not math.isfinite(w):
            raise ValueError(f"combine: the weight of {label!r} must be a finite number, got {w!r}")
        if not callable(fns[label]):
            raise ValueError(f"combine: reward {label!r} is not callable: {fns[label]!r}")
    return Combined({k: float(weights[k]) for k in fns}, dict(fns))
