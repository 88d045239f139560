"""Drawing and scoring candidate responses for the online stages (RSO's candidates, INPO's samples)."""

from __future__ import annotations

import jax
import numpy as np

from rlhf_jax import models, sampling
from rlhf_jax.data import pipeline
from rlhf_jax.data import records as rec
from rlhf_jax.pipelines import common, evaluation
from rlhf_jax.pipelines.config import StageConfig


def training_prompts(cfg: StageConfig, task: common.TaskData, tokenizer, num_prompts: int, *, salt: int = 5):
    """Distinct prompts of the preference split in a seeded order (the first `num_prompts`; 0 = all).

    Returns:
      (prompts, prompt batch with `prompt_tokens` [P, Tp] and `prompt_lengths` [P]).
    """
    prompts = list(dict.fromkeys(p.prompt for p in task.preference))
    order = np.random.default_rng([cfg.seed, salt]).permutation(len(prompts))
    if num_prompts:
        order = order[:num_prompts]
    prompts = [prompts[i] for i in order]
    tokenized = pipeline.tokenize_prompts(prompts, tokenizer, cfg.data.max_prompt_len)
    return prompts, tokenized.batch(np.arange(len(prompts)), cfg.data.max_prompt_len)


def load_lm(workdir: str, mesh) -> tuple[models.Transformer, object]:
    """The language model finished in a stage's `workdir` (its model.json and final params)."""
    saved = common.load_model_json(workdir)
    saved.pop("kind")
    lm = models.Transformer(models.ModelConfig(**saved), mesh=mesh)
    return lm, common.load_params(workdir, models.init_params(lm, jax.random.key(0)))


def draw(model, params, pb: dict, *, num_samples: int, config: sampling.SamplingConfig, seed: int, tokenizer):
    """`num_samples` completions per prompt, sampled in chunks of prompts (bounded memory, one shape).

    Returns:
      tokens [P, N, T], lengths [P, N], logps [P, N] (log-probs under `params`, untempered: log π) and
      sampling_logps [P, N] (log-probs under the distribution sampled from, tempered and truncated by
      `config`: log q).
    """
    P = pb["prompt_tokens"].shape[0]
    chunk = max(1, min(P, 2048 // num_samples))
    tokens, lengths, logps, sampling_logps = [], [], [], []
    for start in range(0, P, chunk):
        ids = np.arange(start, min(start + chunk, P))
        rows = np.concatenate([ids, np.full(chunk - len(ids), ids[-1])])  # pad the last chunk
        out = sampling.sample(
            model, params, pb["prompt_tokens"][rows], pb["prompt_lengths"][rows], config=config,
            num_samples=num_samples, rng=jax.random.key(seed), eos_id=tokenizer.eos_id,
            pad_id=tokenizer.pad_id, prompt_ids=rows,
        )  # fmt: skip
        tokens.append(out.tokens_PNT[: len(ids)])
        lengths.append(out.lengths_PN[: len(ids)])
        logps.append(out.logps_PN[: len(ids)])
        sampling_logps.append(out.sampling_logps_PN[: len(ids)])
    return tuple(map(np.concatenate, (tokens, lengths, logps, sampling_logps)))


def pointwise_rewards(
    proxy: evaluation.Proxy, pb: dict, tokens_PNT, lengths_PN, *, pad_id: int, batch_size: int
):
    """Reward-model scores r(x, y) of every candidate: [P, N]."""
    P, N = lengths_PN.shape
    rows = sampling.completions_to_batch(pb["prompt_tokens"], pb["prompt_lengths"], tokens_PNT, lengths_PN,
                                         pad_id=pad_id)  # fmt: skip
    return sampling.score_pointwise(proxy.model, proxy.params, rows, batch_size=batch_size).reshape(P, N)


def pairwise_logits(
    proxy: evaluation.Proxy, tokenizer, prompts, a_texts, b_texts, *, batch_size: int, stats=None
):
    """Ranking-model logits of P(a ≻ b), averaged over both A/B orders (cancels position bias): [K].

    Inputs are built in the ranking layout the model was trained with (`proxy.layout`); rows with a
    response cut are added to `stats.truncated["ranking_response"]` when `stats` is given, and a warning
    is logged when they are more than 5% of the K.
    """
    cut = rec.LoadStats()
    kw = dict(layout=proxy.layout, batch_size=batch_size)
    ab = np.asarray(
        sampling.score_pairwise(
            proxy.model, proxy.params, tokenizer, prompts, a_texts, b_texts, stats=cut, **kw
        )
    )
    # The swapped rows have the same cuts (both responses of a row share one budget).
    ba = np.asarray(
        sampling.score_pairwise(proxy.model, proxy.params, tokenizer, prompts, b_texts, a_texts, **kw)
    )
    pipeline.ranking_truncated_fraction(cut, len(prompts), "ranking-model scoring")
    if stats is not None:
        stats.truncated.update(cut.truncated)
    return 0.5 * (ab - ba)
