"""Candidate responses of the online stages (RSO's candidates, INPO's samples): drawn from a policy,
scored by the reward model, and turned into training pairs (`pairs`, `write_pairs`), shared by
`rlhf_jax.pipelines.rso` and `rlhf_jax.pipelines.inpo`."""

from __future__ import annotations

import jax
import numpy as np

from rlhf_jax import sampling
from rlhf_jax.data import pipeline
from rlhf_jax.data import records as rec
from rlhf_jax.pipelines import evaluation
from rlhf_jax.pipelines import workdir as workdir_io


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


def pairs(cand: dict, prompt_idx, chosen_idx, rejected_idx, *, pad_id: int, max_len: int):
    """Candidates as tokenised training pairs: pair i is prompt `prompt_idx[i]` with its candidates
    `chosen_idx[i]` (chosen) and `rejected_idx[i]` (rejected).

    Args:
      cand: `prompt_tokens` [P, Tp], `prompt_lengths` [P], `tokens` [P, N, T], `lengths` [P, N].

    Returns:
      (TokenizedPreference, how many pairs had a response cut to fit `max_len`).
    """
    tok = lambda p, i: cand["tokens"][p, i, : cand["lengths"][p, i]]
    return pipeline.TokenizedPreference.fitted(
        [cand["prompt_tokens"][p, : cand["prompt_lengths"][p]] for p in prompt_idx],
        [tok(p, c) for p, c in zip(prompt_idx, chosen_idx, strict=True)],
        [tok(p, r) for p, r in zip(prompt_idx, rejected_idx, strict=True)],
        np.ones(len(prompt_idx), np.float32), pad_id, max_len,
    )  # fmt: skip


def write_pairs(path: str, data: pipeline.TokenizedPreference, tokenizer) -> None:
    """The pairs as text, one {"prompt", "chosen", "rejected"} per line (JSONL, atomic, process 0): the
    stage's output a user reads, and a preference file `data.preference_path` accepts."""
    text = lambda ids: evaluation.decode_text(tokenizer, ids)
    workdir_io.write_jsonl(
        path,
        (
            {"prompt": text(data.prompt_ids[i]), "chosen": text(data.chosen_ids[i]),
             "rejected": text(data.rejected_ids[i])}
            for i in range(len(data))
        ),
    )  # fmt: skip
