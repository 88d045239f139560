"""Candidate responses of the online stages (RSO's candidates, INPO's samples): drawn from a policy,
scored by the reward model, and turned into training pairs (`pairs`, `write_pairs`), shared by
`rlhf_jax.pipelines.rso` and `rlhf_jax.pipelines.inpo`."""

from __future__ import annotations

import jax
import numpy as np

from rlhf_jax import sampling, scoring
from rlhf_jax.data import pipeline
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

    def sample(chunk):
        prompt_tokens, prompt_lengths, prompt_ids = chunk
        out = sampling.sample(
            model, params, prompt_tokens, prompt_lengths, config=config, num_samples=num_samples,
            rng=jax.random.key(seed), eos_id=tokenizer.eos_ids, pad_id=tokenizer.pad_id,
            prompt_ids=prompt_ids,
        )  # fmt: skip
        return out.tokens_PNT, out.lengths_PN, out.logps_PN, out.sampling_logps_PN

    # `sample` places its chunk on the model's mesh itself (no mesh here); [P, N, ...] come back.
    out = scoring.map_chunks(
        sample, [pb["prompt_tokens"], pb["prompt_lengths"], np.arange(P)],
        batch_size=max(1, min(P, 2048 // num_samples)),
    )  # fmt: skip
    return tuple(np.asarray(x) for x in out)


def pointwise_rewards(
    proxy: evaluation.Proxy, pb: dict, tokens_PNT, lengths_PN, *, pad_id: int, batch_size: int
):
    """Reward-model scores r(x, y) of every candidate: [P, N]."""
    P, N = lengths_PN.shape
    rows = scoring.completions_to_batch(pb["prompt_tokens"], pb["prompt_lengths"], tokens_PNT, lengths_PN,
                                        pad_id=pad_id)  # fmt: skip
    return scoring.score_pointwise(proxy.model, proxy.params, rows, batch_size=batch_size).reshape(P, N)


def pairwise_logits(
    proxy: evaluation.Proxy, tokenizer, prompts, a_texts, b_texts, *, batch_size: int, stats=None
):
    """The ranking model `proxy`'s logits of P(a ≻ b), averaged over both A/B orders
    (`scoring.pairwise_logits`, in the layout it was trained with): [K]."""
    return scoring.pairwise_logits(
        proxy.model, proxy.params, tokenizer, prompts, a_texts, b_texts, layout=proxy.layout,
        batch_size=batch_size, stats=stats,
    )  # fmt: skip


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
