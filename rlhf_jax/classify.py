"""Perplexity decoding: classify by the log-probability of every candidate label (GenCLS++, arXiv
2504.19898, Sec. 3: "perplexity-based decoding" picks the label the policy finds most likely rather
than parsing a free generation).

    scores = classify.score_labels(params, prompts, ("negative", "positive"), model=model,
                                   tokenizer=tok, max_prompt_len=100)
    scores.sum_NK, scores.mean_NK      # log π(label_k | prompt_n): summed, and per label token
    scores.prediction_N                # argmax of the mean (by="sum": of the sum)

For prompt x_n and label y_k = (y_k1 .. y_kL_k) (the tokenizer's ids of the label string, as the SFT
stage encodes a completion; with `with_eos` the EOS too):

    sum_nk  = Σ_l log π(y_kl | x_n, y_k<l)          mean_nk = sum_nk / L_k

The N·K (prompt, label) rows are laid out like sampled completions (`scoring.completions_to_batch`) and
scored in one jitted pass of the trainer's fused log-probs (`scoring.sequence_logps`). The mean removes
the sum's preference for short labels when the label strings differ in token count.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence

import numpy as np

from rlhf_jax import scoring
from rlhf_jax.data import pipeline

BY = ("mean", "sum")


@dataclasses.dataclass(frozen=True)
class LabelScores:
    """Per (prompt, label) log-probs: `sum_NK`, `mean_NK` (float32 [N, K]), `lengths_K` (label tokens),
    and `prediction_N` (int [N], argmax of the chosen score)."""

    sum_NK: np.ndarray
    mean_NK: np.ndarray
    lengths_K: np.ndarray
    prediction_N: np.ndarray


def label_ids(tokenizer, label_strings: Sequence[str], *, with_eos: bool = False) -> list[list[int]]:
    """The token ids of each label string (as a completion is encoded; EOS appended with `with_eos`)."""
    out = []
    for label, ids in zip(label_strings, tokenizer.encode_batch(list(label_strings)), strict=True):
        ids = list(ids) + ([tokenizer.eos_id] if with_eos else [])
        if not ids:
            raise ValueError(f"label {label!r} encodes to no tokens")
        out.append(ids)
    return out


def label_rows(prompt_batch: dict, ids_K: list[list[int]], *, pad_id: int) -> dict:
    """The N·K rows (prompt n, label k) in (n, k) order, pipeline layout (`completions_to_batch`)."""
    N, K = len(prompt_batch["prompt_lengths"]), len(ids_K)
    width = max(len(ids) for ids in ids_K)
    labels_KT = np.full((K, width), pad_id, np.int32)
    for k, ids in enumerate(ids_K):
        labels_KT[k, : len(ids)] = ids
    lengths_K = np.array([len(ids) for ids in ids_K], np.int32)
    return scoring.completions_to_batch(
        prompt_batch["prompt_tokens"], prompt_batch["prompt_lengths"],
        np.broadcast_to(labels_KT, (N, K, width)), np.broadcast_to(lengths_K, (N, K)), pad_id=pad_id,
    )  # fmt: skip


def score_labels(
    params,
    prompts: Sequence[str],
    label_strings: Sequence[str],
    *,
    model,
    tokenizer,
    max_prompt_len: int,
    by: str = "mean",
    with_eos: bool = False,
    batch_size: int = 0,
) -> LabelScores:
    """Log-probs of every candidate label for every prompt (module docstring).

    Args:
      params: the policy's parameters.
      prompts: N prompt texts (each keeps its last `max_prompt_len - 1` tokens after BOS).
      label_strings: K candidate labels, e.g. `classification.label_strings(labels, strategy)`.
      model: the `Transformer`.
      tokenizer: the run's tokenizer.
      max_prompt_len: the prompt width.
      by: "mean" (the default: per label token) or "sum", the score `prediction_N` maximises.
      with_eos: score EOS after the label too (the label as a whole answer).
      batch_size: rows per forward; 0 (the default) scores all N·K rows in one pass.

    Returns:
      `LabelScores` with `sum_NK`, `mean_NK`, `lengths_K` and `prediction_N`.
    """
    if by not in BY:
        raise ValueError(f"by must be one of {BY}, got {by!r}")
    N, K = len(prompts), len(label_strings)
    ids_K = label_ids(tokenizer, label_strings, with_eos=with_eos)
    pb = pipeline.tokenize_prompts(list(prompts), tokenizer, max_prompt_len).batch(
        np.arange(N), max_prompt_len
    )
    rows = label_rows(pb, ids_K, pad_id=tokenizer.pad_id)
    sum_NK = scoring.sequence_logps(model, params, rows, batch_size=batch_size or N * K).reshape(N, K)
    lengths_K = np.array([len(ids) for ids in ids_K], np.int32)
    mean_NK = sum_NK / lengths_K[None, :]
    prediction_N = np.argmax(mean_NK if by == "mean" else sum_NK, axis=1)
    return LabelScores(
        sum_NK=sum_NK.astype(np.float32), mean_NK=mean_NK.astype(np.float32), lengths_K=lengths_K,
        prediction_N=prediction_N,
    )  # fmt: skip
