"""Length rewards on token counts: DAPO's soft overlong punishment and the cosine length reward of Yeo et
al. as Light-R1 uses it.

Both read the column `completion_lengths`: integer *token* counts of the completions. The online loop
passes the sampler's lengths (`SampleOutput.lengths_PN` flattened in (p, n) order: tokens including the
EOS when there is one, as TRL counts its completion ids). Never pass character counts: Tunix's overlong
penalty counts characters, which makes its thresholds mean something else for every tokenizer.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from rlhf_jax.rewards import _common, _rules

# Binary rewards `cosine_length` can take its correctness from (correct iff the reward is 1.0).
CORRECTNESS = {"gsm8k": _rules.gsm8k, "math": _rules.math, "exact_match": _rules.exact_match}


def soft_overlong(
    *, prompts: Sequence[str], completions: Sequence[str], completion_lengths: Sequence[int] | None = None,
    max_length: int, cache: int, **columns,
):  # fmt: skip
    """DAPO's soft overlong punishment (Yu et al. 2025, "DAPO", arXiv 2503.14476, Eq. 13), on tokens.

        r(L) = 0                                 if L <= L_max - L_cache
               ((L_max - L_cache) - L) / L_cache  if L_max - L_cache < L <= L_max
               -1                                if L > L_max

    L is the completion's token count, L_max = `max_length`, L_cache = `cache`: the penalty falls
    linearly from 0 to -1 over the last `cache` tokens before `max_length`. With `max_length` equal to
    the sampler's `max_new_tokens`, a truncated sample (L = L_max) gets exactly -1. `cache` = 0 is the
    hard limit: 0 up to L_max, -1 beyond. DAPO uses L_max = 20480 and L_cache = 4096 and adds this to
    the correctness reward (weight 1 in `combine`); TRL's `get_soft_overlong_punishment(
    max_completion_len, soft_punish_cache)` is the same function, cache = 0 included (tested).

    Args:
      prompts: the prompts (unused; one per completion).
      completions: the completions (unused: lengths come from `completion_lengths`).
      completion_lengths: column, integer token counts (module docstring; never characters).
      max_length: L_max >= 1, in tokens.
      cache: L_cache, 0 <= cache <= max_length, in tokens.

    Returns:
      float32 [N] in [-1, 0].
    """
    if isinstance(max_length, bool) or isinstance(cache, bool) or not 0 <= cache <= max_length:
        raise ValueError(
            "reward 'soft_overlong': need 0 <= cache <= max_length, "
            f"got cache={cache}, max_length={max_length}"
        )
    n = _common.num_rows("soft_overlong", prompts, completions)
    L = _common.token_lengths("soft_overlong", completion_lengths, n)
    ramp = (max_length - cache - L) / max(cache, 1)  # cache = 0: no L reaches the ramp
    return _common.output(np.where(L <= max_length - cache, 0.0, np.where(L <= max_length, ramp, -1.0)), n)


def cosine_length(
    *, prompts: Sequence[str], completions: Sequence[str], completion_lengths: Sequence[int] | None = None,
    correct: Sequence | None = None, max_length: int, correctness: str = "gsm8k",
    min_value_correct: float = 1.0, max_value_correct: float = 2.0, min_value_wrong: float = -10.0,
    max_value_wrong: float = 0.0, exceed_penalty: float = -10.0, correct_cap: float | None = None,
    **columns,
):  # fmt: skip
    """The cosine length reward (Yeo et al. 2025, "Demystifying Long Chain-of-Thought Reasoning in LLMs",
    arXiv 2502.03373, Sec. 4, the "Cosine Reward"), with Light-R1's cap for correct answers.

        cos_L = cos(π L / L_max)
        correct:  r = r_c_min + (r_c_max - r_c_min) (1 + cos_L) / 2     (r_c_max at L = 0, r_c_min at L_max)
                  r = min(r, correct_cap)                                  (if correct_cap is set)
        wrong:    r = r_w_max + (r_w_min - r_w_max) (1 + cos_L) / 2     (r_w_min at L = 0, r_w_max at L_max)
        L >= L_max (truncated): r = exceed_penalty, correct or not

    So shorter correct answers earn more, longer wrong ones are punished less (the model may keep
    thinking when it is wrong), and a sample that runs out of room gets `exceed_penalty`. The defaults
    are Yeo et al.'s (their code, `openrlhf/reward/cosine.py`, and their section-4.2 run scripts: r_c
    2 -> 1, r_w -10 -> 0, exceed -10); their code applies the exceed penalty from L + 16 >= L_max (a
    margin against off-by-one lengths), here from L >= L_max, which with L_max = the sampler's
    `max_new_tokens` is exactly "truncated". Light-R1 (Wen et al. 2025, arXiv 2503.10460, Sec. 4) trains
    with "a modified version of [this] length reward with weaker preference for short correct answers"
    without giving the change; `correct_cap` is that weakening as a clip: correct answers short enough
    to earn more than the cap all earn the cap (e.g. 1.5 with the defaults: flat up to L_max / 2, then
    the cosine down to 1). Unset, this is Yeo et al.'s reward exactly.

    Correctness comes from `correctness`: a binary reward's name ("gsm8k", "math", "exact_match"; it
    reads its own columns, e.g. `answer`, from `**columns`; correct iff it returns 1.0), or "column" to
    read the column `correct` (booleans or 0/1 per completion).

    Args:
      prompts, completions: as every reward.
      completion_lengths: column, integer token counts (module docstring; never characters).
      correct: column, read only with correctness="column".
      max_length: L_max >= 1 in tokens: the sampler's `max_new_tokens`.
      correctness: where correctness comes from (above; default "gsm8k").
      min_value_correct, max_value_correct: r_c_min <= r_c_max, a correct answer's reward at L_max and 0.
      min_value_wrong, max_value_wrong: r_w_min <= r_w_max <= 0, a wrong answer's reward at 0 and L_max.
      exceed_penalty: r_e, the reward at L >= L_max.
      correct_cap: None (Yeo et al.) or a cap >= r_c_min on a correct answer's reward (Light-R1).

    Returns:
      float32 [N].
    """
    if correctness != "column" and correctness not in CORRECTNESS:
        raise ValueError(
            f"reward 'cosine_length': correctness must be 'column' or one of {', '.join(CORRECTNESS)}, got "
            f"{correctness!r}"
        )
    if isinstance(max_length, bool) or max_length < 1:
        raise ValueError(f"reward 'cosine_length': max_length must be >= 1, got {max_length!r}")
    if not (min_value_correct <= max_value_correct and min_value_wrong <= max_value_wrong <= 0):
        raise ValueError(
            "reward 'cosine_length': need min_value_correct <= max_value_correct and min_value_wrong <= "
            f"max_value_wrong <= 0, got {min_value_correct}, {max_value_correct}, {min_value_wrong}, "
            f"{max_value_wrong}"
        )
    if correct_cap is not None and correct_cap < min_value_correct:
        raise ValueError(
            f"reward 'cosine_length': correct_cap={correct_cap} is below "
            f"min_value_correct={min_value_correct}"
        )
    n = _common.num_rows("cosine_length", prompts, completions)
    L = _common.token_lengths("cosine_length", completion_lengths, n)
    if correctness == "column":
        is_correct = np.array(
            [float(v) == 1.0 for v in _common.column("cosine_length", "correct", correct, n)]
        )
    else:
        is_correct = CORRECTNESS[correctness](prompts=prompts, completions=completions, **columns) == 1.0
    half_cos = 0.5 * (1.0 + np.cos(np.pi * L / max_length))
    r_correct = min_value_correct + (max_value_correct - min_value_correct) * half_cos
    if correct_cap is not None:
        r_correct = np.minimum(r_correct, correct_cap)
    r_wrong = max_value_wrong + (min_value_wrong - max_value_wrong) * half_cos
    r = np.where(L >= max_length, exceed_penalty, np.where(is_correct, r_correct, r_wrong))
    return _common.output(r, n)
