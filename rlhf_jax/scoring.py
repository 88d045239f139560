"""Scoring rows with a model: samples as training rows, reward and ranking scores, trainer log-probs.

    rows = scoring.completions_to_batch(prompt_tokens_PT, prompt_lengths_P, out.tokens_PNT,
                                        out.lengths_PN, pad_id=tok.pad_id)   # P*N rows, (p, n) order
    rewards_B = scoring.score_pointwise(reward_model, params, rows, batch_size=64)   # r(x, y)
    logps_B = scoring.sequence_logps(model, params, rows, batch_size=64)            # log π(y | x)
    logits_K = scoring.pairwise_logits(ranking_model, params, tok, prompts, a, b,
                                       layout=layout, batch_size=64)   # logit P(a ≻ b), both orders

Every forward goes through `map_chunks`, the one padded-chunk runner (`sampling.sample` uses it too):
rows in chunks of one fixed row count (the last one padded: one compilation), each split over the mesh's
batch axes, outputs gathered to every host without the padding rows. A row's score depends on its chunk
or the mesh by float32 reduction order only (tests/test_scoring.py).
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable, Sequence

import jax
import numpy as np
from flax import linen as nn
from jax.experimental import multihost_utils
from jax.sharding import Mesh

from rlhf_jax import sharding
from rlhf_jax.data import pipeline
from rlhf_jax.data import records as rec
from rlhf_jax.train import steps

__all__ = [
    "batch_shards",
    "completions_to_batch",
    "map_chunks",
    "pairwise_logits",
    "ranking_batch",
    "score_pairwise",
    "score_pointwise",
    "sequence_logps",
    "to_host",
]

LOGP_KEYS = ("tokens", "targets", "loss_mask", "segment_ids")  # the inputs of `steps.sequence_logps`


# ----------------------------------------------------------------------------------------------------
# The padded-chunk runner.


def batch_shards(mesh: Mesh | None, rules=sharding.LOGICAL_RULES) -> int:
    """How many ways the batch axis is split on `mesh` (1 without one)."""
    if mesh is None:
        return 1
    axes = sharding.batch_sharding(mesh, rules).spec[0]
    axes = () if axes is None else (axes,) if isinstance(axes, str) else axes
    return math.prod(mesh.shape[a] for a in axes)


def to_host(x) -> np.ndarray:
    """The whole array on this host (gathered from every process when it spans several)."""
    if not isinstance(x, jax.Array) or x.is_fully_addressable:
        return np.asarray(x)
    return np.asarray(multihost_utils.process_allgather(x, tiled=True))


def _slice_rows(rows, start: int, n: int, size: int, fill):
    """Rows [start, start + n) of each array in `rows`, padded to `size` rows with copies of the first
    (`fill` None) or `fill` (a number, or a pytree of numbers like `rows`)."""

    def pad(x, value):
        x = np.asarray(x[start : start + n])
        if value is None:
            return np.concatenate([x, np.repeat(x[:1], size - n, axis=0)])
        return np.concatenate([x, np.full((size - n, *x.shape[1:]), value, x.dtype)])

    if fill is None or np.isscalar(fill):
        return jax.tree.map(lambda x: pad(x, fill), rows)
    return jax.tree.map(pad, rows, fill)


def _trim(y: np.ndarray, size: int, n: int) -> np.ndarray:
    """The rows of the first n inputs of a chunk of `size` in an output with k rows per input row."""
    k, rest = divmod(y.shape[0], size)
    if rest or not k:
        raise ValueError(f"map_chunks: {y.shape[0]} output rows, not a multiple of the chunk's {size}")
    return y[: k * n]


def map_chunks(
    fn: Callable,
    rows,
    *,
    batch_size: int,
    mesh: Mesh | None = None,
    rules=sharding.LOGICAL_RULES,
    fill=None,
    num_rows: int | None = None,
):
    """Runs `fn` over `rows` in chunks of one fixed row count; returns its outputs for every row, on host.

    Each chunk has `size` rows: `batch_size` rounded up to a multiple of the mesh's batch shards. The
    last chunk is padded to `size` as well, so `fn` sees one shape (one compilation). With a mesh, every
    process passes all the rows, each chunk is placed split over the batch axes (`sharding.put`), and
    every process gets all the outputs.

    Args:
      fn: called once per chunk as `fn(chunk)`, `chunk` having the structure of `rows` with `size` rows
        per leaf (global arrays with a mesh, numpy without); usually a jitted function with its
        parameters bound. It returns a pytree of arrays whose leading axis holds k rows per input row,
        in row-major order (k = 1 for a score per row; k = N for N samples per prompt).
      rows: a pytree (dict, list, ...) of host arrays sharing a leading axis of B rows; or a function
        `ids -> pytree of host arrays` that builds the rows with int ids `ids` (-1 for a padding row),
        e.g. `lambda ids: data.batch(ids, data.max_len)` for data too large to build at once (give
        `num_rows`).
      batch_size: rows per chunk, before rounding up to the batch shards.
      mesh: the mesh, or None (no placement; on one device).
      rules: logical-axis rules (which mesh axes split the batch).
      fill: how padding rows are made when `rows` holds arrays: None copies the chunk's first row; a
        number (or a pytree of numbers with the structure of `rows`) fills them with that value.
      num_rows: B, when `rows` is a function.

    Returns:
      `fn`'s outputs with its structure, numpy, each leaf's leading axis k·B (padding rows dropped).
      With no rows, `fn` is traced abstractly (`jax.eval_shape`) for the shapes of the empty outputs.
    """
    if batch_size < 1:
        raise ValueError(f"batch_size={batch_size} must be >= 1")
    shards = batch_shards(mesh, rules)
    size = -(-batch_size // shards) * shards
    if callable(rows):
        if num_rows is None:
            raise ValueError("map_chunks needs num_rows when rows is a function")
        B = num_rows
    else:
        lengths = {len(x) for x in jax.tree.leaves(rows)}
        if len(lengths) != 1:
            raise ValueError(f"map_chunks needs arrays with one row count, got {sorted(lengths)}")
        B = lengths.pop()

    def chunk_at(start: int, n: int, fill):
        if callable(rows):
            return rows(np.concatenate([np.arange(start, start + n), np.full(size - n, -1)]))
        return _slice_rows(rows, start, n, size, fill)

    if B == 0:  # nothing to run: the outputs' shapes, from a chunk of padding rows
        shapes = jax.eval_shape(fn, chunk_at(0, 0, 0))
        return jax.tree.map(lambda s: np.zeros((0, *s.shape[1:]), s.dtype), shapes)
    outs = []
    for start in range(0, B, size):
        n = min(size, B - start)
        chunk = chunk_at(start, n, fill)
        if mesh is not None:
            chunk = sharding.put(chunk, sharding.batch_sharding(mesh, rules))
        outs.append(jax.tree.map(lambda y, n=n: _trim(to_host(y), size, n), fn(chunk)))
    return jax.tree.map(lambda *ys: np.concatenate(ys), *outs)


# ----------------------------------------------------------------------------------------------------
# Samples as training rows, and the trainer's log-probs of them.


def map_rows(fn: Callable, params, rows: dict, *, batch_size: int, mesh: Mesh | None = None) -> np.ndarray:
    """`fn(params, chunk)` over the `LOGP_KEYS` of pipeline-layout rows in padded chunks (`map_chunks`,
    padding rows all 0), e.g. per-token log-probs or a critic's values [R, T]; the outputs on the host."""
    return np.asarray(
        map_chunks(
            lambda chunk: fn(params, chunk),
            {k: rows[k] for k in LOGP_KEYS},
            batch_size=batch_size,
            mesh=mesh,
            fill=0,
        )  # fmt: skip
    )


def completions_to_batch(
    prompt_tokens_PT,
    prompt_lengths_P,
    completion_tokens,
    completion_lengths,
    *,
    pad_id: int,
    max_len: int | None = None,
) -> dict[str, np.ndarray]:
    """Rows of prompt + completion in the pipeline's SFT layout (`rlhf_jax.data.pipeline`).

    Args:
      prompt_tokens_PT: prompts (BOS + prompt) right-padded.
      prompt_lengths_P: their lengths.
      completion_tokens: [P, N, Tc] (or [P, Tc]) completions, e.g. `SampleOutput.tokens_PNT`; the EOS,
        when there is one, is the last of the `completion_lengths` tokens.
      completion_lengths: [P, N] (or [P]) completion lengths, EOS included.
      pad_id: the padding id.
      max_len: the row width; default the prompt width plus the completion width.

    Returns:
      numpy `tokens`, `targets`, `segment_ids` [P*N, max_len] int32, `loss_mask` [P*N, max_len]
      float32, `prompt_lengths` and `lengths` [P*N] int32; rows in (p, n) order. Raises ValueError if a
      row does not fit in `max_len`.
    """
    prompts_PT = np.asarray(prompt_tokens_PT, np.int32)
    completions = np.asarray(completion_tokens, np.int32)
    P, Tp = prompts_PT.shape
    N = completions.shape[1] if completions.ndim == 3 else 1
    completions_BT = completions.reshape(P * N, completions.shape[-1])
    lengths_B = np.asarray(completion_lengths, np.int32).reshape(P * N)
    prompt_lengths_B = np.repeat(np.asarray(prompt_lengths_P, np.int32), N)
    prompts_BT = np.repeat(prompts_PT, N, axis=0)
    max_len = Tp + completions_BT.shape[1] if max_len is None else max_len
    total_B = prompt_lengths_B + lengths_B
    if (total_B > max_len).any():
        b = int(np.argmax(total_B > max_len))
        raise ValueError(
            f"row {b}: prompt {prompt_lengths_B[b]} + completion {lengths_B[b]} > max_len {max_len}"
        )
    j_T = np.arange(max_len)[None, :]
    in_prompt_BT = j_T < prompt_lengths_B[:, None]
    in_completion_BT = ~in_prompt_BT & (j_T < total_B[:, None])
    from_prompt_BT = np.take_along_axis(prompts_BT, np.minimum(j_T, Tp - 1).repeat(P * N, 0), axis=1)
    c_index_BT = np.clip(j_T - prompt_lengths_B[:, None], 0, completions_BT.shape[1] - 1)
    from_completion_BT = np.take_along_axis(completions_BT, c_index_BT, axis=1)
    tokens_BT = np.where(in_prompt_BT, from_prompt_BT, np.where(in_completion_BT, from_completion_BT, pad_id))
    targets_BT = np.full_like(tokens_BT, pad_id)
    targets_BT[:, :-1] = np.where(j_T[:, 1:] < total_B[:, None], tokens_BT[:, 1:], pad_id)
    loss_BT = (j_T >= prompt_lengths_B[:, None] - 1) & (j_T < total_B[:, None] - 1)
    return {
        "tokens": tokens_BT.astype(np.int32),
        "targets": targets_BT.astype(np.int32),
        "loss_mask": loss_BT.astype(np.float32),
        "segment_ids": (in_prompt_BT | in_completion_BT).astype(np.int32),
        "prompt_lengths": prompt_lengths_B,
        "lengths": lengths_B,
    }


@functools.lru_cache(maxsize=16)
def _jitted_logps(model: nn.Module):
    """`steps.sequence_logps` of a batch dict, jitted; outputs replicated on the model's mesh."""
    fn = lambda params, b: steps.sequence_logps(model, params, *(b[k] for k in LOGP_KEYS))
    return jax.jit(fn, out_shardings=None if model.mesh is None else sharding.replicated(model.mesh))


def sequence_logps(model: nn.Module, params, batch: dict, *, batch_size: int = 64) -> np.ndarray:
    """The trainer's log π(y | x) (`steps.sequence_logps`) of pipeline-layout rows, on the model's mesh.

    Args:
      model: a `Transformer`.
      params: its parameters.
      batch: a dict with `tokens`, `targets`, `loss_mask` and `segment_ids` [B, T] (e.g. from
        `completions_to_batch`).
      batch_size: rows per forward (rounded up to a multiple of the mesh's batch shards; the last chunk
        is padded with empty rows, which have no loss tokens).

    Returns:
      float32 summed log-probs of the loss-masked targets [B] on the host.
    """
    logps = _jitted_logps(model)
    rows = {k: batch[k] for k in LOGP_KEYS}
    return map_chunks(
        lambda chunk: logps(params, chunk), rows, batch_size=batch_size, mesh=model.mesh, rules=model.rules,
        fill=0,
    )  # fmt: skip


# ----------------------------------------------------------------------------------------------------
# Reward and ranking-model scores.


@functools.lru_cache(maxsize=16)
def _jitted_reward(model: nn.Module):
    return jax.jit(
        lambda params, tokens_BT, segment_ids_BT: model.apply({"params": params}, tokens_BT, segment_ids_BT)
    )


def score_pointwise(reward_model: nn.Module, params, batch: dict, *, batch_size: int = 64) -> np.ndarray:
    """Rewards r(x, y) of pipeline-layout rows (`completions_to_batch`), `batch_size` rows at a time.

    Args:
      reward_model: a `RewardModel` (it reads each row's last non-padding token); sharded over its mesh.
      params: its parameters.
      batch: a dict with `tokens` and `segment_ids` [B, T].
      batch_size: rows per forward (rounded up to a multiple of the mesh's batch shards; the last chunk
        is padded with copies of its first row).

    Returns:
      float32 rewards [B] on the host.
    """
    apply = _jitted_reward(reward_model)
    rows = [np.asarray(batch["tokens"], np.int32), np.asarray(batch["segment_ids"], np.int32)]
    return map_chunks(
        lambda chunk: apply(params, *chunk), rows, batch_size=batch_size, mesh=reward_model.mesh,
        rules=reward_model.rules,
    )  # fmt: skip


def ranking_batch(
    tokenizer,
    prompts: Sequence[str],
    responses_a: Sequence[str],
    responses_b: Sequence[str],
    layout: pipeline.RankingLayout,
    stats: rec.LoadStats | None = None,
) -> dict[str, np.ndarray]:
    """Inputs of RSO's pairwise ranking model in its ranking layout (`pipeline.tokenize_ranking`).

    The ranking-model stage (`rlhf_jax.pipelines.reward`) trains on the same `tokenize_ranking` rows, so
    at scoring the template, the truncation of each response and the final EOS (the token whose hidden
    state the head reads) are those of training.

    Args:
      tokenizer: the tokenizer (`rlhf_jax.data.tokenizer.Tokenizer`).
      prompts: prompt texts.
      responses_a: response A of each row (the one whose preference is scored).
      responses_b: response B of each row.
      layout: the ranking layout the model was trained with.
      stats: if given, rows with a response cut are counted in `stats.truncated["ranking_response"]`.

    Returns:
      The pipeline's SFT batch dict, one row per prompt, `layout.max_len` wide.
    """
    data = pipeline.tokenize_ranking(prompts, responses_a, responses_b, tokenizer, layout, stats)
    return data.batch(np.arange(len(data)), layout.max_len)


def score_pairwise(
    ranking_model: nn.Module,
    params,
    tokenizer,
    prompts: Sequence[str],
    responses: Sequence[str],
    baselines: Sequence[str],
    *,
    layout: pipeline.RankingLayout,
    batch_size: int = 64,
    stats: rec.LoadStats | None = None,
) -> np.ndarray:
    """RSO's reward from a pairwise ranking model, in one A/B order: r(x, y) = logit P(y ≻ y_b | x).

    Liu et al. 2024, "Statistical Rejection Sampling Improves Preference Optimization", Sec. 3: the
    pairwise reward-ranking model compares each candidate y (as response A) with a baseline SFT sample
    y_b (as B) of the same prompt; its output is the logit that A is preferred. `pairwise_logits`
    averages both orders.

    Args:
      ranking_model: a `RewardModel` trained as the ranking model (`steps.ranking_objective`).
      params: its parameters.
      tokenizer: the tokenizer.
      prompts: prompt texts, one per candidate.
      responses: the candidates y.
      baselines: the baseline y_b of each candidate's prompt.
      layout: the ranking layout the model was trained with.
      batch_size: rows per forward.
      stats: if given, rows with a response cut are counted in `stats.truncated["ranking_response"]`.

    Returns:
      float32 rewards [len(prompts)].
    """
    batch = ranking_batch(tokenizer, prompts, responses, baselines, layout, stats)
    return score_pointwise(ranking_model, params, batch, batch_size=batch_size)


def pairwise_logits(
    ranking_model: nn.Module,
    params,
    tokenizer,
    prompts: Sequence[str],
    a_texts: Sequence[str],
    b_texts: Sequence[str],
    *,
    layout: pipeline.RankingLayout,
    batch_size: int = 64,
    stats: rec.LoadStats | None = None,
    what: str = "ranking-model scoring",
) -> np.ndarray:
    """The ranking model's logit of P(a ≻ b | x), averaged over both A/B orders: [K].

        logit(a ≻ b) = (s(x, a, b) - s(x, b, a)) / 2,   s(x, A, B) = the model's logit that A is preferred

    A ranking model reads its two responses in fixed slots and can favour one slot whatever the
    responses; a constant bias c (s = s* + c) cancels in the difference, and the average is exactly
    antisymmetric: logit(a ≻ b) = -logit(b ≻ a), so a tie scores 0 and a win rate of a against itself is
    one half.

    Args:
      ranking_model: a `RewardModel` trained as the ranking model (`steps.ranking_objective`).
      params: its parameters.
      tokenizer: the tokenizer.
      prompts: prompt texts x, one per comparison.
      a_texts: response a of each comparison.
      b_texts: response b of each comparison.
      layout: the ranking layout the model was trained with.
      batch_size: rows per forward.
      stats: if given, comparisons with a response cut to fit the layout are added (once each) to
        `stats.truncated["ranking_response"]`.
      what: names the caller in the warning logged when more than `pipeline.RANKING_TRUNCATION_WARN`
        (5%) of the comparisons have a response cut.

    Returns:
      float32 logits [len(prompts)].
    """
    cut = rec.LoadStats()
    score = functools.partial(
        score_pairwise, ranking_model, params, tokenizer, layout=layout, batch_size=batch_size
    )
    ab = score(prompts, a_texts, b_texts, stats=cut)
    ba = score(prompts, b_texts, a_texts)  # the same cuts: both responses of a row share one budget
    pipeline.ranking_truncated_fraction(cut, len(prompts), what)
    if stats is not None:
        stats.truncated.update(cut.truncated)
    return 0.5 * (ab - ba)
