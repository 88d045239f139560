"""Sample-based evaluation of a policy against the SFT policy: win rates, length, KL.

On held-out prompts, S samples per prompt are drawn from the trained policy and from the SFT policy
(same sampling settings and keys). Sample s of the policy is compared with sample s of the SFT policy:

  * by the **gold reward** r*(x, y) when the task has one (the synthetic TL;DR task);
  * by the **proxy**: a pointwise reward model (compare r(x, y)), or RSO's pairwise ranking model
    (compare the logit of P(policy ≻ SFT), averaged over both A/B orders to cancel position bias:
    `scoring.pairwise_logits`);

a win counts 1, a tie 1/2. Win rates are means over prompts of the per-prompt mean, with 95% intervals
from a bootstrap over prompts (1,000 resamples, seeded). Also: the win rate against the reference
summaries by the gold reward, the mean response length (tokens, EOS included), and the KL divergence
to the SFT policy, estimated as the mean of log π(y|x) - log π_sft(y|x) over separate samples drawn
from the policy at temperature 1 without truncation (samples cut at max_new_tokens count as they are).

`results.json` keys (null where not applicable): win_rate_vs_sft_gold, win_rate_vs_sft_gold_ci95,
win_rate_vs_sft_proxy, win_rate_vs_sft_proxy_ci95, win_rate_vs_reference_gold, mean_response_length,
kl_to_sft, wall_time_s, plus gold_reward_policy / gold_reward_sft, proxy_reward_policy / _sft,
mean_response_length_sft and, with a ranking-model proxy, proxy_ranking_truncated_fraction (the share
of its inputs with a response cut to fit its layout).
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

RESULT_KEYS = (
    "win_rate_vs_sft_gold",
    "win_rate_vs_sft_gold_ci95",
    "win_rate_vs_sft_proxy",
    "win_rate_vs_sft_proxy_ci95",
    "win_rate_vs_reference_gold",
    "mean_response_length",
    "kl_to_sft",
    "wall_time_s",
)
# The numbers of a point of an over-optimisation curve (`eval_curve.jsonl` of the preference and online RL
# stages with `train.eval_every`).
CURVE_KEYS = ("win_rate_vs_sft_gold", "win_rate_vs_sft_proxy", "gold_reward_policy", "proxy_reward_policy",
              "kl_to_sft", "mean_response_length")  # fmt: skip


@dataclasses.dataclass(frozen=True)
class EvalConfig:
    """Attributes: prompts (held-out prompts used, 0 = all), samples_per_prompt, the sampling policy
    (temperature, top_k, max_new_tokens) and bootstrap resamples."""

    num_prompts: int = 128
    samples_per_prompt: int = 2
    temperature: float = 0.7
    top_k: int = 40
    max_new_tokens: int = 48
    bootstrap: int = 1000

    def sampling(self) -> sampling.SamplingConfig:
        return sampling.SamplingConfig(
            max_new_tokens=self.max_new_tokens, temperature=self.temperature, top_k=self.top_k
        )


@dataclasses.dataclass(frozen=True)
class Proxy:
    """The proxy judge: a pointwise reward model ("pointwise") or a pairwise ranking model ("pairwise",
    with the `RankingLayout` it was trained with)."""

    kind: str
    model: object
    params: object
    layout: pipeline.SequenceLayout | pipeline.RankingLayout


def win_rate(a, b) -> np.ndarray:
    """Per-comparison wins of a over b: 1, 1/2 for a tie, 0."""
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return (a > b) + 0.5 * (a == b)


def bootstrap_ci(per_prompt: np.ndarray, *, resamples: int, seed: int) -> list[float]:
    """95% percentile interval of the mean over prompts, resampling prompts with replacement."""
    rng = np.random.default_rng(seed)
    n = len(per_prompt)
    means = per_prompt[rng.integers(0, n, size=(resamples, n))].mean(axis=1)
    return [float(np.percentile(means, 2.5)), float(np.percentile(means, 97.5))]


def decode_text(tokenizer, ids) -> str:
    """Text of token ids without BOS/EOS; ids past the tokenizer's vocabulary (a pretrained checkpoint's
    embedding can have more rows than its tokenizer has pieces) are dropped."""
    drop = (*tokenizer.eos_ids, tokenizer.bos_id)
    return tokenizer.decode([int(t) for t in ids if t not in drop and 0 <= t < tokenizer.vocab_size])


def decode_completions(tokenizer, tokens_PNT: np.ndarray, lengths_PN: np.ndarray) -> list[list[str]]:
    """Texts of sampled completions (EOS dropped), [P][N]."""
    return [
        [decode_text(tokenizer, tokens_PNT[p, n, : lengths_PN[p, n]]) for n in range(tokens_PNT.shape[1])]
        for p in range(tokens_PNT.shape[0])
    ]


def evaluate_against_sft(
    *,
    model,
    policy_params,
    sft_params,
    tokenizer,
    prompts: list[rec.SFTExample],
    config: EvalConfig,
    seed: int,
    proxy: Proxy | None = None,
    gold: Callable[[str, str], float] | None = None,
    max_prompt_len: int,
    batch_size: int = 64,
) -> dict:
    """Samples from both policies on `prompts` and compares them (module docstring).

    Args:
      model: the LM (`Transformer`, with the run's mesh).
      policy_params, sft_params: the trained and the SFT policy.
      tokenizer: the run's tokenizer.
      prompts: held-out prompts with their reference completions.
      config: evaluation settings.
      seed: sampling and bootstrap seed.
      proxy: the proxy judge, or None (proxy keys are then null).
      gold: the gold reward r*(prompt, summary), or None (gold keys are then null).
      max_prompt_len: prompt truncation (the training layout's).
      batch_size: rows per forward when scoring.

    Returns:
      A dict with the RESULT_KEYS (but wall_time_s) and the extra keys of the module docstring.
    """
    prompts = prompts[: config.num_prompts] if config.num_prompts else prompts
    tokenized = pipeline.tokenize_prompts([p.prompt for p in prompts], tokenizer, max_prompt_len)
    pb = tokenized.batch(np.arange(len(prompts)), max_prompt_len)
    S = config.samples_per_prompt
    rng = jax.random.key(seed)
    kw = dict(
        config=config.sampling(), num_samples=S, rng=rng, eos_id=tokenizer.eos_ids, pad_id=tokenizer.pad_id
    )
    pol = sampling.sample(model, policy_params, pb["prompt_tokens"], pb["prompt_lengths"], **kw)
    ref = sampling.sample(model, sft_params, pb["prompt_tokens"], pb["prompt_lengths"], **kw)
    pol_text = decode_completions(tokenizer, pol.tokens_PNT, pol.lengths_PN)
    sft_text = decode_completions(tokenizer, ref.tokens_PNT, ref.lengths_PN)
    P = len(prompts)
    out: dict = {k: None for k in RESULT_KEYS if k != "wall_time_s"}
    out["eval_prompts"] = P
    out["samples_per_prompt"] = S
    out["mean_response_length"] = float(pol.lengths_PN.mean())
    out["mean_response_length_sft"] = float(ref.lengths_PN.mean())

    # KL(π || π_sft) = E_{y~π}[log π(y|x) - log π_sft(y|x)]: the expectation is over the policy itself,
    # so it gets its own untempered, untruncated samples (the tempered ones above would bias it).
    prompts_and_lengths = (pb["prompt_tokens"], pb["prompt_lengths"])
    plain = sampling.SamplingConfig(max_new_tokens=config.max_new_tokens)
    kl = sampling.sample(model, policy_params, *prompts_and_lengths, **{**kw, "config": plain})
    kl_rows = scoring.completions_to_batch(
        *prompts_and_lengths, kl.tokens_PNT, kl.lengths_PN, pad_id=tokenizer.pad_id
    )
    sft_logps = scoring.sequence_logps(model, sft_params, kl_rows, batch_size=batch_size).reshape(P, S)
    out["kl_to_sft"] = float(np.mean(kl.logps_PN - sft_logps))
    rows = scoring.completions_to_batch(
        *prompts_and_lengths, pol.tokens_PNT, pol.lengths_PN, pad_id=tokenizer.pad_id
    )

    def summarize(name, wins_PS):
        per_prompt = wins_PS.mean(axis=1)
        out[name] = float(per_prompt.mean())
        out[name + "_ci95"] = bootstrap_ci(per_prompt, resamples=config.bootstrap, seed=seed)

    if gold is not None:
        g_pol = np.array([[gold(prompts[p].prompt, pol_text[p][s]) for s in range(S)] for p in range(P)])
        g_sft = np.array([[gold(prompts[p].prompt, sft_text[p][s]) for s in range(S)] for p in range(P)])
        g_ref = np.array([gold(p.prompt, p.completion) for p in prompts])
        summarize("win_rate_vs_sft_gold", win_rate(g_pol, g_sft))
        out["win_rate_vs_reference_gold"] = float(win_rate(g_pol, g_ref[:, None]).mean())
        out["gold_reward_policy"], out["gold_reward_sft"] = float(g_pol.mean()), float(g_sft.mean())
        out["gold_reward_reference"] = float(g_ref.mean())

    if proxy is not None:
        if proxy.kind == "pointwise":
            sft_rows = scoring.completions_to_batch(
                *prompts_and_lengths, ref.tokens_PNT, ref.lengths_PN, pad_id=tokenizer.pad_id
            )
            score = lambda r: scoring.score_pointwise(proxy.model, proxy.params, r, batch_size=batch_size)
            r_pol, r_sft = score(rows).reshape(P, S), score(sft_rows).reshape(P, S)
            summarize("win_rate_vs_sft_proxy", win_rate(r_pol, r_sft))
            out["proxy_reward_policy"], out["proxy_reward_sft"] = float(r_pol.mean()), float(r_sft.mean())
        else:
            flat_prompts = [p.prompt for p in prompts for _ in range(S)]
            a = [t for row in pol_text for t in row]
            b = [t for row in sft_text for t in row]
            cut = rec.LoadStats()
            logit = scoring.pairwise_logits(
                proxy.model, proxy.params, tokenizer, flat_prompts, a, b, layout=proxy.layout,
                batch_size=batch_size, stats=cut, what="evaluation (ranking-model proxy)",
            ).reshape(P, S)  # fmt: skip
            summarize("win_rate_vs_sft_proxy", win_rate(logit, 0.0))
            out["proxy_ranking_truncated_fraction"] = cut.truncated["ranking_response"] / len(flat_prompts)
    return out


def format_value(results: dict, key: str) -> str:
    """`results[key]` to 3 decimals with its `_ci95` interval when it has one ("n/a" when absent)."""
    v = results.get(key)
    if v is None:
        return "n/a"
    ci = results.get(key + "_ci95")
    return f"{v:.3f}" + (f"  [{ci[0]:.3f}, {ci[1]:.3f}]" if ci else "")


def render_table(title: str, rows: list[tuple[str, str]]) -> str:
    """A titled plain-text table of (label, value) rows."""
    width = max(len(r[0]) for r in rows)
    return "\n".join([title, "-" * (width + 30)] + [f"{k.ljust(width)}  {v}" for k, v in rows])


def format_table(results: dict, title: str) -> str:
    """A plain-text table of the headline numbers."""
    fmt = functools.partial(format_value, results)
    rows = [
        ("win rate vs SFT (gold reward)", fmt("win_rate_vs_sft_gold")),
        ("win rate vs SFT (proxy reward model)", fmt("win_rate_vs_sft_proxy")),
        ("win rate vs reference summaries (gold)", fmt("win_rate_vs_reference_gold")),
        (
            "gold reward: policy / SFT",
            f"{results.get('gold_reward_policy', float('nan')):.3f} / "
            f"{results.get('gold_reward_sft', float('nan')):.3f}",
        ),  # fmt: skip
        (
            "mean response length (tokens): policy / SFT",
            f"{results.get('mean_response_length', 0):.1f} / "
            f"{results.get('mean_response_length_sft', 0):.1f}",
        ),  # fmt: skip
        ("KL(policy || SFT), nats per response", fmt("kl_to_sft")),
        ("wall time (s)", fmt("wall_time_s")),
    ]
    return render_table(title, rows)
