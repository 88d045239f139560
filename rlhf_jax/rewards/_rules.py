"""Rule-based rewards: GSM8K and MATH answer checks, exact match, format, Reason-RFT's numeric tolerance,
and the synthetic TL;DR task's gold reward.

Each is `fn(*, prompts, completions, <columns it reads>, <hyperparameters>, **columns) -> float32 [N]`
(TRL's reward-function convention; columns it does not read are ignored). Hyperparameters are checked
at the top of the body, so `registry.make` can check them by calling the reward on zero rows.
"""

from __future__ import annotations

import functools
import logging
import re
import threading
from collections.abc import Sequence

import numpy as np

from rlhf_jax.data import synthetic_tldr
from rlhf_jax.rewards import _answers, _common

log = logging.getLogger("rlhf_jax")


def _gold_number(reward: str, i: int, gold) -> object:
    """The gold answer of row i as an exact number; a gold answer without one is bad data: raise."""
    value = _answers.final_number(gold)
    if value is None:
        raise ValueError(f"reward {reward!r}: row {i}: no number in the gold answer {str(gold)[-80:]!r}")
    return value


def gsm8k(*, prompts: Sequence[str], completions: Sequence[str], answer: Sequence | None = None, **columns):
    """GSM8K correctness: 1.0 if the completion's final answer equals the gold number, else 0.0.

        r = 1[ v(completion) == v(answer) ],   v = `final_number`: the first number after the last `####`,
                                               else the last number; `$`, commas and `<<...>>` dropped

    compared as exact rationals, so "1,000" == "1000.0" and "3/4" == "0.75" (`_answers`). A completion
    with no number, or a `####` followed by no number, scores 0. The answer format is GSM8K's (Cobbe et
    al. 2021, "Training Verifiers to Solve Math Word Problems": solutions end in `#### N`).

    Args:
      prompts: the prompts (unused; one per completion).
      completions: the completions.
      answer: column, per completion a full GSM8K solution (`... #### 72`) or a bare number; a gold
        answer without a number raises ValueError naming its row.

    Returns:
      float32 [N] of 0.0 and 1.0.
    """
    n = _common.num_rows("gsm8k", prompts, completions)
    gold = _common.column("gsm8k", "answer", answer, n)
    return _common.output(
        [
            _answers.final_number(c) == _gold_number("gsm8k", i, g)
            for i, (c, g) in enumerate(zip(completions, gold, strict=True))
        ],
        n,
    )


_warned_thread = []


def _math_gold_text(answer) -> str:
    """A MATH gold answer as LaTeX: the last `\\boxed{}` of a solution, else the whole (bare) answer."""
    text = str(answer)
    boxed = _answers.last_boxed(text)
    return boxed if boxed is not None else text.strip().strip("$")


def math(
    *, prompts: Sequence[str], completions: Sequence[str], answer: Sequence | None = None, timeout_s: int = 5,
    **columns,
):  # fmt: skip
    """MATH correctness: 1.0 if the completion's last `\\boxed{...}` is equivalent to the gold answer.

        r = 1[ verify(parse(gold), parse(last_boxed(completion))) ]

    with HuggingFace's `math-verify` (`parse`, `verify`): symbolic and numeric equivalence, so
    `\\boxed{\\frac{1}{2}}` matches `0.5`, `1,000` matches `1000`, `\\{1,2\\}` matches `\\{2,1\\}`. The
    completion's answer is the content of its last balanced `\\boxed{}` (nested braces included); with
    none, the reward is 0. The gold answer is the last `\\boxed{}` of `answer` when it has one (a full
    MATH solution, Hendrycks et al. 2021), else `answer` itself (a final answer such as `\\frac{1}{2}`
    or `0.5`). Each distinct gold answer is parsed once per call.

    Timeouts: math-verify bounds each parse and comparison by `timeout_s` seconds with `signal.alarm`,
    which works only in the main thread. Called from any other thread, the checks run without a
    timeout (math-verify's `parsing_timeout=None`), and a warning says so once; a pathological
    expression can then take long. `timeout_s=0` turns the timeout off everywhere.

    Args:
      prompts: the prompts (unused; one per completion).
      completions: the completions.
      answer: column, per completion a final answer or a full solution with `\\boxed{}`.
      timeout_s: seconds per math-verify parse and comparison, in the main thread (default 5, its own).

    Returns:
      float32 [N] of 0.0 and 1.0.
    """
    if isinstance(timeout_s, bool) or not isinstance(timeout_s, int) or timeout_s < 0:
        raise ValueError(
            f"reward 'math': timeout_s must be an integer >= 0 (0: no timeout), got {timeout_s!r}"
        )
    n = _common.num_rows("math", prompts, completions)
    gold = _common.column("math", "answer", answer, n)
    import math_verify  # a runtime dependency (setup.py), imported when a math reward is made or runs

    if n == 0:
        return _common.output([], 0)

    timeout = timeout_s or None
    if timeout is not None and threading.current_thread() is not threading.main_thread():
        if not _warned_thread:
            _warned_thread.append(True)
            log.warning("reward 'math' outside the main thread: math-verify's signal timeouts are off")
        timeout = None
    parse = functools.lru_cache(maxsize=None)(
        lambda latex: math_verify.parse(f"${latex}$", parsing_timeout=timeout)
    )
    out = []
    for c, g in zip(completions, gold, strict=True):
        predicted = _answers.last_boxed(c)
        if predicted is None:
            out.append(0.0)
            continue
        want, got = parse(_math_gold_text(g)), parse(predicted)
        out.append(float(bool(want) and bool(got) and math_verify.verify(want, got, timeout_seconds=timeout)))
    return _common.output(out, n)


def exact_match(
    *, prompts: Sequence[str], completions: Sequence[str], answer: Sequence | None = None,
    normalize: bool = False, **columns,
):  # fmt: skip
    """1.0 if the completion equals `answer` after stripping surrounding whitespace, else 0.0.

        r = 1[ s(completion) == s(answer) ],   s = str.strip, or with `normalize` casefold and every run
                                               of whitespace made one space

    Args:
      prompts: the prompts (unused; one per completion).
      completions: the completions.
      answer: column, the expected text per completion.
      normalize: also ignore case and the amount of whitespace (default False).

    Returns:
      float32 [N] of 0.0 and 1.0.
    """
    n = _common.num_rows("exact_match", prompts, completions)
    gold = _common.column("exact_match", "answer", answer, n)
    key = (lambda s: " ".join(str(s).split()).casefold()) if normalize else (lambda s: str(s).strip())
    return _common.output([key(c) == key(g) for c, g in zip(completions, gold, strict=True)], n)


# Presets of `format`'s pattern, matched against the whole stripped completion (re.DOTALL).
FORMAT_PRESETS = {
    # DeepSeek-R1's template (Guo et al. 2025, Table 1; TRL's and Open-R1's format rewards): reasoning in
    # one <think> block, then the answer in one <answer> block, nothing around them.
    "think_answer": r"<think>(?:(?!</?think>).)*</think>\s*<answer>(?:(?!</?answer>).)*</answer>",
    # GSM8K's solution format: the last line is `#### N`, N a number (`$`, sign and commas allowed).
    "gsm8k": r"(?:.*\n)?[ \t]*####[ \t]*\$?[-\u2212]?\$?\d(?:[\d,]*\d)?(?:\.\d+)?[ \t]*",
}


@functools.lru_cache(maxsize=64)
def _format_regex(pattern: str) -> re.Pattern:
    try:
        return re.compile(FORMAT_PRESETS.get(pattern, pattern), re.DOTALL)
    except re.error as e:
        raise ValueError(
            f"reward 'format': pattern {pattern!r} is neither a preset ({', '.join(FORMAT_PRESETS)}) nor a "
            f"valid regular expression: {e}"
        ) from None


def format(*, prompts: Sequence[str], completions: Sequence[str], pattern: str = "think_answer", **columns):
    """1.0 if the completion has the required structure, else 0.0.

        r = 1[ re.fullmatch(pattern, completion.strip(), re.DOTALL) ]

    Presets (`FORMAT_PRESETS`): "think_answer", `<think>…</think>` then `<answer>…</answer>` and nothing
    else, each tag once (DeepSeek-R1's template, as in TRL's and Open-R1's format rewards; when the
    prompt already ends in `<think>`, prepend it to the completion first or use a custom pattern);
    "gsm8k", the last line is `#### N` with N a number. Any other string is a custom regular
    expression, matched against the whole stripped completion with `.` matching newlines.

    Args:
      prompts: the prompts (unused; one per completion).
      completions: the completions.
      pattern: a preset name or a regular expression (default "think_answer").

    Returns:
      float32 [N] of 0.0 and 1.0.
    """
    regex = _format_regex(pattern)
    n = _common.num_rows("format", prompts, completions)
    return _common.output([regex.fullmatch(c.strip()) is not None for c in completions], n)


_ANSWER_TAG = re.compile(r"<answer>(.*?)</answer>", re.DOTALL)


def numeric_tolerance(
    *, prompts: Sequence[str], completions: Sequence[str], answer: Sequence | None = None,
    low: float = 0.05, high: float = 0.2, **columns,
):  # fmt: skip
    """Reason-RFT's numeric accuracy reward: 1 within `low` relative error, 0 beyond `high`, a cosine between.

        e = |v - v*| / |v*|
        r = 1                                    if e <= low
            (1 + cos(π (e - low) / (high - low))) / 2   if low < e < high
            0                                    if e >= high

    (Tan et al. 2025, "Reason-RFT", arXiv 2503.20752; `math_accuracy_reward` in its train/stage_rl/
    reward.py, with ε1 = 0.05 and ε2 = 0.2.) The ramp is continuous: 1 at e = low, 0.5 halfway, 0 at
    e = high. v is the number in the completion's last `<answer>…</answer>` block when it has one, else
    its final number as in `gsm8k` (after `####`, else the last); v* is the gold number read the same
    way. A gold answer of 0 gives 1 for an exact 0 and 0 otherwise (the relative error is undefined;
    Reason-RFT's code divides by zero there and scores 0). No number in the completion: 0.

    Args:
      prompts: the prompts (unused; one per completion).
      completions: the completions.
      answer: column, the gold number (or a GSM8K-style solution) per completion.
      low: relative error up to which the reward is 1 (default 0.05).
      high: relative error from which the reward is 0 (default 0.2); 0 <= low < high.

    Returns:
      float32 [N] in [0, 1].
    """
    if not 0 <= low < high:
        raise ValueError(f"reward 'numeric_tolerance': need 0 <= low < high, got low={low}, high={high}")
    n = _common.num_rows("numeric_tolerance", prompts, completions)
    gold = _common.column("numeric_tolerance", "answer", answer, n)
    out = []
    for i, (c, g) in enumerate(zip(completions, gold, strict=True)):
        want = _gold_number("numeric_tolerance", i, g)
        tags = _ANSWER_TAG.findall(c)
        got = _answers.final_number(tags[-1] if tags else c)
        if got is None:
            out.append(0.0)
        elif want == 0:
            out.append(float(got == 0))
        else:
            e = float(abs(got - want) / abs(want))
            ramp = 0.5 * (1.0 + np.cos(np.pi * (e - low) / (high - low)))
            out.append(1.0 if e <= low else 0.0 if e >= high else ramp)
    return _common.output(out, n)


def tldr_gold(*, prompts: Sequence[str], completions: Sequence[str], **columns):
    """The synthetic TL;DR task's gold reward r*(prompt, completion) (`data.synthetic_tldr.gold_reward`).

        r* = 2 (c - (n - c)) / n - h - min(2, 0.25 k) - min(2, 0.1 max(0, w - 20))   <= 2

    (c of the post's n facts covered, h hallucinated facts, k repeated bigrams, w words; see
    `rlhf_jax.data.synthetic_tldr`). The prompt must be the post's TL;DR prompt: the facts are read
    from it. This is the task's ground truth: train on it for an oracle run, or give it weight 0 in
    `combine` to log it beside a learned reward model's reward (the over-optimisation curve).

    Returns:
      float32 [N].
    """
    n = _common.num_rows("tldr_gold", prompts, completions)
    return _common.output(
        [synthetic_tldr.gold_reward(p, c) for p, c in zip(prompts, completions, strict=True)], n
    )
