"""Rewards for online RL, computed on the host from text: answer checks, format, length, reward models.

A reward is a function

    reward(*, prompts: list[str], completions: list[str], **columns) -> np.ndarray float32 [N]

(TRL's reward-function convention): one prompt per completion (a prompt repeated for each of its
samples), and the dataset's other fields as columns, lists of N values (`answer`), plus columns the
caller computes (`completion_lengths`: token counts from the sampler). A reward reads the columns it
needs by keyword and ignores the rest.

    from rlhf_jax import rewards
    correct = rewards.make("gsm8k")                                  # by name, hyperparameters checked
    r_N = correct(prompts=prompts, completions=texts, answer=answers)
    reward = rewards.combine(
        {"correct": 1.0, "overlong": 1.0},
        {"correct": correct, "overlong": rewards.make("soft_overlong", max_length=256, cache=64)},
    )
    R_N, parts = reward.evaluate(prompts=prompts, completions=texts, answer=answers,
                                 completion_lengths=lengths_N)       # parts: each reward, for logging
    rm = rewards.reward_model(model=rm_module, params=rm_params, tokenizer=tok, layout=layout)

Registered rewards (`names()`): gsm8k, math (math-verify), exact_match, format, numeric_tolerance
(Reason-RFT), soft_overlong (DAPO), cosine_length (Yeo et al. / Light-R1), tldr_gold (the synthetic
task's gold reward), label_match and sts_regression (classification as generation: GenCLS++,
PPO for NLU) and reward_model (a factory of objects: build it with `reward_model(...)`, not
`make`). Each docstring gives the formula and the paper. `final_number` and `last_boxed` are the answer
extractors the checks use.
"""

from rlhf_jax.rewards import registry
from rlhf_jax.rewards._answers import final_number, last_boxed
from rlhf_jax.rewards._classify import label_match, sts_regression
from rlhf_jax.rewards._combine import Combined, combine
from rlhf_jax.rewards._length import cosine_length, soft_overlong
from rlhf_jax.rewards._model import reward_model
from rlhf_jax.rewards._rules import (
    FORMAT_PRESETS,
    exact_match,
    format,
    gsm8k,
    math,
    numeric_tolerance,
    tldr_gold,
)
from rlhf_jax.rewards.registry import COLUMNS, get, hyperparameters, make, names, required_hyperparameters

__all__ = [
    # the rewards
    "cosine_length",
    "exact_match",
    "format",
    "gsm8k",
    "label_match",
    "math",
    "numeric_tolerance",
    "reward_model",
    "soft_overlong",
    "sts_regression",
    "tldr_gold",
    "FORMAT_PRESETS",
    # answer extraction
    "final_number",
    "last_boxed",
    # combining
    "Combined",
    "combine",
    # the registry
    "registry",
    "COLUMNS",
    "get",
    "hyperparameters",
    "make",
    "names",
    "required_hyperparameters",
]
