"""Rewards for classification as generation: exact label match, and STS-B-style regression.

    label_match   r = right if the parsed label equals the gold one, wrong if it names another,
                  unparseable if it names none (GenCLS++, arXiv 2504.19898: +1 / 0; PPO for NLU,
                  arXiv 2410.11020, Sec. 3: +1 / -1 / -3)
    sts_regression r = 2.5 - |ŷ - y|, ŷ the completion's number, y the gold score in [0, 5]
                  (PPO for NLU's STS-B reward), unparseable when there is no number

The gold label is the `answer` column (a label string, or its index as an int); answers are compared
after `classification.normalize` (case, whitespace, punctuation), the numeric aliases "1".."k" accepted
when `numeric`, and for "reason first" completions the text after the last "Answer:" is the answer.
"""

from __future__ import annotations

from collections.abc import Sequence

from rlhf_jax.data import classification
from rlhf_jax.rewards import _answers, _common


def label_match(
    *,
    prompts: Sequence[str],
    completions: Sequence[str],
    answer: Sequence | None = None,
    labels: tuple = (),
    numeric: bool = True,
    right: float = 1.0,
    wrong: float = 0.0,
    unparseable: float = 0.0,
    **columns,
):
    """Exact label match after normalisation (module docstring).

        r = right        if parse(completion) == gold
            wrong        if parse(completion) is another label of `labels` (or "uncertain")
            unparseable  if it names no label

    Args:
      prompts: the prompts (unused; one per completion).
      completions: the completions.
      answer: column, the gold label per completion (a name of `labels`, or its 0-based index).
      labels: the label names (required, at least 2).
      numeric: accept "1".."k" for the k labels.
      right, wrong, unparseable: the three values (GenCLS++: 1, 0, 0; PPO for NLU: 1, -1, -3).

    Returns:
      float32 [N].
    """
    if len(labels) < 2:
        raise ValueError(f"reward 'label_match': hyperparameter labels needs 2+ label names, got {labels!r}")
    label_set = classification.LabelSet(tuple(labels), numeric=numeric)
    n = _common.num_rows("label_match", prompts, completions)
    gold = _common.column("label_match", "answer", answer, n)
    out = []
    for i, (c, g) in enumerate(zip(completions, gold, strict=True)):
        want = g if isinstance(g, int) else label_set.index(str(g))
        if want is None or not 0 <= want < len(labels):
            raise ValueError(f"reward 'label_match': row {i}: gold label {g!r} is not one of {labels}")
        got = classification.parse_answer(c, label_set, extra=(classification.UNCERTAIN,))
        out.append(unparseable if got is None else right if got == want else wrong)
    return _common.output(out, n)


def sts_regression(
    *,
    prompts: Sequence[str],
    completions: Sequence[str],
    answer: Sequence | None = None,
    unparseable: float = 0.0,
    **columns,
):
    """STS-B regression reward (PPO for NLU, arXiv 2410.11020): r = 2.5 - |ŷ - y|.

    ŷ is the completion's number (`_answers.final_number`, after the last "Answer:" when present), y
    the gold similarity in [0, 5] (column `answer`); a completion without a number scores `unparseable`.
    r lies in [-2.5, 2.5] for ŷ in [0, 5].

    Returns:
      float32 [N].
    """
    n = _common.num_rows("sts_regression", prompts, completions)
    gold = _common.column("sts_regression", "answer", answer, n)
    out = []
    for c, g in zip(completions, gold, strict=True):
        text = c.rsplit(classification.ANSWER_MARK, 1)[1] if classification.ANSWER_MARK in c else c
        value = _answers.final_number(text)
        out.append(unparseable if value is None else 2.5 - abs(float(value) - float(g)))
    return _common.output(out, n)
