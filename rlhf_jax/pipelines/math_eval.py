"""Evaluation of a policy on held-out math problems, against the SFT policy on the same problems.

* `accuracy`: greedy pass@1, the share of problems whose greedy answer the checker (`correct`, e.g.
  the `gsm8k` reward) accepts, with a 95% bootstrap interval over problems (`accuracy_ci95`);
  `accuracy_sft` the same for the SFT policy, and `accuracy_gain` = accuracy - accuracy_sft with a
  paired bootstrap interval (the same problems resampled for both);
* `pass_at_k`: the share of problems with at least one accepted answer among k samples at the
  evaluation temperature (with n = k samples this is the unbiased estimator of Chen et al. 2021);
* `mean_response_length` (greedy, tokens incl. EOS) and `kl_to_sft`, the mean of
  log π(y|x) - log π_sft(y|x) over samples of the policy at temperature 1;
* `mean_length_correct`, `mean_length_wrong`: the mean length (tokens incl. EOS) of the policy's k
  samples at the evaluation temperature that the checker accepts / rejects (None when there are none),
  the quantity of Dr. GRPO's claim (Liu et al. 2025, Sec. 3.1) that GRPO's per-sequence normalisation
  lengthens wrong answers;
* `distinct_correct`: the mean over problems of the number of *distinct* accepted texts among the k
  samples at the evaluation temperature (texts compared after stripping surrounding whitespace), with a
  bootstrap interval (`distinct_correct_ci95`): the diversity of correct solutions, the quantity
  GFlowNet trajectory balance claims to raise over reward maximisation (GFlowVLM, arXiv 2503.06514).
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable

import jax
import numpy as np

from rlhf_jax import sampling, scoring
from rlhf_jax.data import pipeline
from rlhf_jax.data import records as rec
from rlhf_jax.pipelines.evaluation import bootstrap_ci, decode_completions, format_value, render_table

RESULT_KEYS = (
    "accuracy",
    "accuracy_ci95",
    "accuracy_sft",
    "pass_at_k",
    "mean_response_length",
    "kl_to_sft",
    "wall_time_s",
)


@dataclasses.dataclass(frozen=True)
class MathEvalConfig:
    """Attributes: num_problems (held-out problems used, 0 = all), k (samples for pass@k and the KL),
    temperature (of those samples), max_new_tokens, bootstrap resamples, prompts_per_batch (problems
    sampled in one call, bounding the KV cache at prompts_per_batch · k rows; 0 = all at once). Every
    problem's samples are seeded by its index, so the batching does not change which samples are drawn."""

    num_problems: int = 256
    k: int = 4
    temperature: float = 1.0
    max_new_tokens: int = 48
    bootstrap: int = 1000
    prompts_per_batch: int = 0

    def __post_init__(self):
        if self.num_problems < 0 or self.prompts_per_batch < 0 or self.k < 1:
            raise ValueError(
                f"eval: need num_problems >= 0, prompts_per_batch >= 0 and k >= 1, got {self.num_problems}, "
                f"{self.prompts_per_batch}, {self.k}"
            )


def _answers(model, params, tokenizer, pb, config: sampling.SamplingConfig, n: int, seed: int, chunk: int):
    """n samples of every prompt of `pb`, `chunk` prompts per sampling call (0: all), each prompt seeded
    by its index; returns the `SampleOutput` and the decoded texts [P][n]."""
    P = len(pb["prompt_lengths"])
    chunk = chunk or P
    parts = [
        sampling.sample(
            model,
            params,
            pb["prompt_tokens"][i : i + chunk],
            pb["prompt_lengths"][i : i + chunk],
            config=config,
            num_samples=n,
            rng=jax.random.key(seed),
            eos_id=tokenizer.eos_ids,
            pad_id=tokenizer.pad_id,
            prompt_ids=np.arange(i, min(i + chunk, P)),
        )  # fmt: skip
        for i in range(0, P, chunk)
    ]
    out = sampling.SampleOutput(*(np.concatenate(xs) for xs in zip(*parts, strict=True)))
    return out, decode_completions(tokenizer, out.tokens_PNT, out.lengths_PN)


def evaluate_math(
    *,
    model,
    policy_params,
    sft_params,
    tokenizer,
    problems: list[rec.MathExample],
    correct: Callable[..., np.ndarray],
    config: MathEvalConfig,
    seed: int,
    max_prompt_len: int,
    batch_size: int = 64,
) -> dict:
    """The module docstring's metrics of `policy_params` (and `sft_params`) on `problems`.

    Args:
      correct: a reward `(prompts=, completions=, answer=) -> [N]` that is 1 for an accepted answer.
    """
    problems = problems[: config.num_problems] if config.num_problems else problems
    P, k = len(problems), config.k
    pb = pipeline.tokenize_prompts([p.prompt for p in problems], tokenizer, max_prompt_len).batch(
        np.arange(P), max_prompt_len
    )
    prompts = [p.prompt for p in problems]

    def score(texts, n):
        flat = [t for row in texts for t in row]
        answers = [p.answer for p in problems for _ in range(n)]
        return np.asarray(
            correct(prompts=[q for q in prompts for _ in range(n)], completions=flat, answer=answers),
            np.float64,
        ).reshape(P, n)

    greedy = sampling.SamplingConfig(max_new_tokens=config.max_new_tokens, greedy=True)
    draw = functools.partial(_answers, model, tokenizer=tokenizer, pb=pb, chunk=config.prompts_per_batch)
    pol, pol_text = draw(policy_params, config=greedy, n=1, seed=seed)
    _, sft_text = draw(sft_params, config=greedy, n=1, seed=seed)
    acc_P, acc_sft_P = score(pol_text, 1)[:, 0], score(sft_text, 1)[:, 0]
    tempered = sampling.SamplingConfig(max_new_tokens=config.max_new_tokens, temperature=config.temperature)
    many, many_text = draw(policy_params, config=tempered, n=k, seed=seed + 1)
    many_ok_PN = score(many_text, k) > 0
    distinct_P = distinct_correct(many_text, many_ok_PN)
    plain = sampling.SamplingConfig(max_new_tokens=config.max_new_tokens)
    kl, _ = draw(policy_params, config=plain, n=k, seed=seed + 2)
    rows = scoring.completions_to_batch(
        pb["prompt_tokens"], pb["prompt_lengths"], kl.tokens_PNT, kl.lengths_PN, pad_id=tokenizer.pad_id
    )
    sft_logps = scoring.sequence_logps(model, sft_params, rows, batch_size=batch_size).reshape(P, k)
    return {
        "eval_problems": P,
        "accuracy": float(acc_P.mean()),
        "accuracy_ci95": bootstrap_ci(acc_P, resamples=config.bootstrap, seed=seed),
        "accuracy_sft": float(acc_sft_P.mean()),
        "accuracy_sft_ci95": bootstrap_ci(acc_sft_P, resamples=config.bootstrap, seed=seed),
        "accuracy_gain": float((acc_P - acc_sft_P).mean()),
        "accuracy_gain_ci95": bootstrap_ci(acc_P - acc_sft_P, resamples=config.bootstrap, seed=seed),
        "pass_at_k": float(many_ok_PN.any(axis=1).mean()),
        "mean_length_correct": _mean_or_none(many.lengths_PN[many_ok_PN]),
        "mean_length_wrong": _mean_or_none(many.lengths_PN[~many_ok_PN]),
        "distinct_correct": float(distinct_P.mean()),
        "distinct_correct_ci95": bootstrap_ci(distinct_P, resamples=config.bootstrap, seed=seed),
        "k": k,
        "mean_response_length": float(pol.lengths_PN.mean()),
        "kl_to_sft": float(np.mean(kl.logps_PN - sft_logps)),
    }


def distinct_correct(texts_PN: list[list[str]], ok_PN: np.ndarray) -> np.ndarray:
    """Per problem, the number of distinct accepted texts (whitespace-stripped) among its samples [P]."""
    return np.asarray(
        [
            len({t.strip() for t, ok in zip(row, oks, strict=True) if ok})
            for row, oks in zip(texts_PN, ok_PN, strict=True)
        ],
        np.float64,
    )


def _mean_or_none(values: np.ndarray) -> float | None:
    return float(values.mean()) if values.size else None


def format_table(results: dict, title: str) -> str:
    """A plain-text table of the headline numbers."""
    fmt = functools.partial(format_value, results)
    return render_table(
        title,
        [
            ("held-out accuracy, greedy (policy)", fmt("accuracy")),
            ("held-out accuracy, greedy (SFT)", fmt("accuracy_sft")),
            ("accuracy gain over SFT (paired)", fmt("accuracy_gain")),
            (f"pass@{results.get('k', 'k')} (policy)", fmt("pass_at_k")),
            (f"distinct correct of {results.get('k', 'k')} samples (policy)", fmt("distinct_correct")),
            ("mean response length (tokens)", fmt("mean_response_length")),
            (
                "  of sampled correct / wrong answers",
                " / ".join(map(fmt, ("mean_length_correct", "mean_length_wrong"))),
            ),
            ("KL(policy || SFT), nats per response", fmt("kl_to_sft")),
            ("wall time (s)", fmt("wall_time_s")),
        ],
    )
