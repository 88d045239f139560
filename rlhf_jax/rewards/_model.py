"""A trained reward model as a reward: r(x, y) of prompt + completion text, optionally relative to a
reference answer's score.

The library takes the objects (module, parameters, tokenizer, layout); loading them from a reward-model
stage's directory is the pipeline's job. So `reward_model` is a factory, not a reward: it is registered
under "reward_model" so that `names()` lists it, and `registry.make("reward_model")` raises, pointing
here.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import numpy as np

from rlhf_jax import models, scoring
from rlhf_jax.data import pipeline
from rlhf_jax.data import records as rec
from rlhf_jax.rewards import _common


def reward_model(
    *,
    model: models.RewardModel,
    params,
    tokenizer,
    layout: pipeline.SequenceLayout,
    batch_size: int = 64,
    relative: bool = False,
    stats: rec.LoadStats | None = None,
) -> Callable[..., np.ndarray]:
    """Builds the reward `fn(*, prompts, completions, reference_completions=None, **columns) -> float32 [N]`.

        r(x, y)                      (relative=False)
        r(x, y) - r(x, y_ref)        (relative=True; y_ref from the column `reference_completions`)

    r is the reward model's scalar on the row BOS + prompt + completion + EOS, tokenised exactly as the
    reward-model stage trained it (`pipeline.tokenize_sft`: the same prompt and response encoding,
    truncation and final EOS, whose hidden state the head reads), scored by `scoring.score_pointwise`
    (sharded over the model's mesh, `batch_size` rows per forward). The text is re-encoded, as TRL does
    for reward models; a loop that holds the sampled tokens can score them without the round trip
    (`scoring.completions_to_batch` + `scoring.score_pointwise`). The relative form scores a completion
    against a reference answer for the same prompt, so prompts of different difficulty share one scale
    (the reward-model reward of VLAA-Thinker, Chen et al. 2025, arXiv 2504.11468, as issue 16 describes
    it); each distinct (prompt, reference) pair is scored once per call. The result does not depend on
    how rows are chunked, up to float32 reduction order.

    Args:
      model: a `models.RewardModel` trained as a pointwise reward model (not RSO's ranking model, whose
        rows hold two responses).
      params: its parameters.
      tokenizer: the tokenizer it was trained with.
      layout: the sequence layout it was trained with (`max_len`, `max_prompt_len`).
      batch_size: rows per forward (default 64).
      relative: subtract the score of the column `reference_completions` (default False).
      stats: if given, truncated prompts and completions are counted in `stats.truncated` ("prompt",
        "completion"; reference answers included).

    Returns:
      The reward function; it raises ValueError if `relative` and the column is missing.
    """
    if not isinstance(model, models.RewardModel):
        raise ValueError(
            f"reward 'reward_model': model must be a models.RewardModel, got {type(model).__name__}"
        )
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"reward 'reward_model': batch_size must be an integer >= 1, got {batch_size!r}")

    def score(prompts: Sequence[str], completions: Sequence[str]) -> np.ndarray:
        examples = [rec.SFTExample(p, c) for p, c in zip(prompts, completions, strict=True)]
        data = pipeline.tokenize_sft(examples, tokenizer, layout, stats)
        batch = data.batch(np.arange(len(data)), layout.max_len)
        return scoring.score_pointwise(model, params, batch, batch_size=batch_size)

    def reward(
        *, prompts: Sequence[str], completions: Sequence[str],
        reference_completions: Sequence[str] | None = None, **columns,
    ) -> np.ndarray:  # fmt: skip
        n = _common.num_rows("reward_model", prompts, completions)
        if relative:
            references = _common.column("reward_model", "reference_completions", reference_completions, n)
        if n == 0:
            return _common.output([], 0)
        r = score(prompts, completions)
        if relative:
            pairs = list(dict.fromkeys(zip(prompts, references, strict=True)))
            baseline = dict(zip(pairs, score([p for p, _ in pairs], [y for _, y in pairs]), strict=True))
            r = r - np.array([baseline[k] for k in zip(prompts, references, strict=True)], np.float32)
        return _common.output(r, n)

    return reward
