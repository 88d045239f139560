"""Batch sampling from the KV-cached policy.

(Over 400 lines: the sampling policies' maths, with the chunked top-k's proof, and the decode loop.)

    policy = sampling.SamplingConfig(max_new_tokens=64, temperature=0.7, top_k=40)   # RSO's setting
    out = sampling.sample(model, params, prompt_tokens_PT, prompt_lengths_P, config=policy,
                          num_samples=8, rng=jax.random.key(0), eos_id=tok.eos_id, pad_id=tok.pad_id)
    out.tokens_PNT        # [P, N, T] completions, T = max_new_tokens, PAD after EOS
    batch = scoring.completions_to_batch(prompt_tokens_PT, prompt_lengths_P, out.tokens_PNT,
                                         out.lengths_PN, pad_id=tok.pad_id)   # P*N rows, (p, n) order

Decoding is one jitted function: each prompt is prefilled once, its cache repeated N times, and a
`lax.while_loop` of `models.decode_step` runs over an explicit `SamplerState` until every row has
emitted EOS or `max_new_tokens` tokens are out. Rows are (prompt, sample) pairs in p-major order.

Randomness: sample n of the prompt with id p uses the key fold_in(fold_in(rng, p), n), and its step t
fold_in(that, t), so what a prompt gets depends on neither its batch, its row nor the mesh.

Log-probs: `logps_PN` is log π(y | x) under the model's own distribution (untempered, untruncated),
summed over the completion tokens including EOS: the trainer's `steps.sequence_logps` of the rows that
`scoring.completions_to_batch` builds, up to float32 reduction order (tests/test_sampling.py states the
tolerance). `sampling_logps_PN` is the log-prob under the distribution actually sampled from (after
temperature, top-k and top-p; 0 for greedy decoding). With `SamplingConfig(entropy=True)`,
`entropy_PN` sums each sampled position's entropy of softmax(logits / temperature) (untruncated), the
trainer's `completion_logps(..., return_entropy=True)` of the same rows: an online loop that logs the
policy's entropy can take it from here instead of from an extra reduction in its training forward.

Samples become training rows, and get rewards, in `rlhf_jax.scoring`; its old names here
(`completions_to_batch`, `score_pointwise`, `ranking_batch`, `score_pairwise`) are re-exports.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from collections.abc import Sequence
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from flax import linen as nn

from rlhf_jax import models, scoring, sharding

# Moved to rlhf_jax.scoring; kept for existing callers.
from rlhf_jax.scoring import completions_to_batch, ranking_batch, score_pairwise, score_pointwise

__all__ = [
    "SampleOutput",
    "SamplerState",
    "SamplingConfig",
    "choose",
    "decode",
    "init_state",
    "jitted_generate",
    "log_prob",
    "sample",
    "top_k",
    # moved to rlhf_jax.scoring; kept for existing callers
    "completions_to_batch",
    "ranking_batch",
    "score_pairwise",
    "score_pointwise",
]


@dataclasses.dataclass(frozen=True)
class SamplingConfig:
    """A sampling policy: greedy, or temperature with optional top-k and top-p (nucleus) truncation.

    Attributes:
      max_new_tokens: the most tokens generated per sample (EOS included).
      temperature: logits are divided by it before sampling (> 0).
      top_k: sample among the k most likely tokens only; 0 = no limit.
      top_p: sample from the smallest set of most likely tokens whose (tempered) mass reaches top_p;
        1.0 = no limit. Applied after top-k.
      greedy: take the most likely token (temperature, top_k and top_p are ignored).
      entropy: also sum, per sample, the entropy −Σ_v p_v log p_v of p = softmax(logits / temperature)
        (before top-k / top-p; temperature 1 when greedy) at each sampled position, EOS included
        (`SampleOutput.entropy_PN`; zeros when False, which costs nothing).
    """

    max_new_tokens: int
    temperature: float = 1.0
    top_k: int = 0
    top_p: float = 1.0
    greedy: bool = False
    entropy: bool = False

    def __post_init__(self):
        if self.max_new_tokens < 1:
            raise ValueError(f"SamplingConfig.max_new_tokens={self.max_new_tokens} must be >= 1")
        if not self.temperature > 0:
            raise ValueError(f"SamplingConfig.temperature={self.temperature} must be > 0 (greedy=True)")
        if self.top_k < 0:
            raise ValueError(f"SamplingConfig.top_k={self.top_k} must be >= 0 (0 = no limit)")
        if not 0 < self.top_p <= 1:
            raise ValueError(f"SamplingConfig.top_p={self.top_p} must be in (0, 1]")

    def next_token(self, logits_BV: jax.Array, keys_B: jax.Array) -> tuple[jax.Array, jax.Array, jax.Array]:
        """Draws one token per row.

        Args:
          logits_BV: float32 next-token logits.
          keys_B: one PRNG key per row; row b's draw depends only on keys_B[b] and logits_BV[b].

        Returns:
          (tokens_B, logps_B, sampling_logps_B): int32 tokens, their log-probs under softmax(logits)
          (the model's distribution) and under the distribution sampled from.
        """
        logits_BV = logits_BV.astype(jnp.float32)
        if self.greedy:
            tokens_B = jnp.argmax(logits_BV, axis=-1).astype(jnp.int32)
            sampling_logps_B = jnp.zeros(tokens_B.shape, jnp.float32)
        else:
            scaled_BV = logits_BV / self.temperature
            V = scaled_BV.shape[-1]
            k = min(self.top_k or V, V)
            if k < V or self.top_p < 1:
                # A: candidate tokens, sorted by probability (the top k, or all V for top-p alone).
                cand_BA, index_BA = top_k(scaled_BV, k)
            else:
                cand_BA, index_BA = scaled_BV, None
            if self.top_p < 1:
                probs_BA = jax.nn.softmax(cand_BA, axis=-1)
                mass_before_BA = jnp.cumsum(probs_BA, axis=-1) - probs_BA
                cand_BA = jnp.where(mass_before_BA < self.top_p, cand_BA, -jnp.inf)
            choice_B = jax.vmap(jax.random.categorical)(keys_B, cand_BA).astype(jnp.int32)
            sampling_logps_B = _take(jax.nn.log_softmax(cand_BA, axis=-1), choice_B)
            tokens_B = choice_B if index_BA is None else _take(index_BA, choice_B)
        return tokens_B, log_prob(logits_BV, tokens_B), sampling_logps_B

    def entropy_of(self, logits_BV: jax.Array) -> jax.Array:
        """float32 [B]: the entropy of softmax(logits / temperature) per row (temperature 1 when greedy),
        as the trainer's fused head computes it: lse − Σ_v p_v · z_v with z = logits / temperature."""
        z_BV = logits_BV.astype(jnp.float32)
        if not self.greedy and self.temperature != 1.0:
            z_BV = z_BV / self.temperature
        max_B1 = jnp.max(z_BV, axis=-1, keepdims=True)
        e_BV = jnp.exp(z_BV - max_B1)
        sum_B = jnp.sum(e_BV, axis=-1)
        return max_B1[:, 0] + jnp.log(sum_B) - jnp.sum(e_BV * z_BV, axis=-1) / sum_B


def top_k(x_BV: jax.Array, k: int) -> tuple[jax.Array, jax.Array]:
    """Exactly `jax.lax.top_k(x_BV, k)`: the k largest values of each row, descending, and their int32
    indices (equal values in index order), found through chunk maxima; much faster on CPU for k << V.

    XLA:CPU's top-k costs time per element of the row (measurements in bench/README.md). Here each row
    is cut into I chunks of C elements (C ~ sqrt(V / k), a power of two); the k chunks with the largest
    maxima hold every top-k element, so the exact top-k runs over those k·C values only (after one over
    the I chunk maxima), which is faster on CPU the larger V / k.

    Why the k chunks suffice: let e be a top-k element, in chunk c. Every chunk ranked above c (larger
    maximum, or an equal one and a lower index) holds an element ranked above e (its maximum: larger
    than e, or equal and at a lower index, chunks being contiguous), and fewer than k elements rank
    above e, so c is among the top k chunks. The chosen chunks are gathered in index order, so ties
    among the candidates still go to the lower index. Rows are padded with -inf to whole chunks; a
    padded element never outranks a real one (it has a higher index). Inputs should be NaN-free.

    Args:
      x_BV: float [B, V].
      k: how many, 1 <= k <= V.

    Returns:
      (values_BA, indices_BA), A = k, as `jax.lax.top_k`.
    """
    B, V = x_BV.shape
    C = min(2 ** round(math.log2(math.sqrt(V / k))), V // k)  # ~sqrt(V / k), and at least k chunks
    if C < 2 or 2 * k * C > V:  # no gain: the direct top-k
        return jax.lax.top_k(x_BV, k)
    I = -(-V // C)  # noqa: E741 - the dimension key's letter for chunks
    if I * C > V:
        x_BV = jnp.pad(x_BV, ((0, 0), (0, I * C - V)), constant_values=-jnp.inf)
    x_BIC = x_BV.reshape(B, I, C)
    _, chunks_BA = jax.lax.top_k(jnp.max(x_BIC, axis=-1), k)
    chunks_BA = jnp.sort(chunks_BA, axis=-1)
    cand_BAC = jnp.take_along_axis(x_BIC, chunks_BA[:, :, None], axis=1)
    values_BA, pos_BA = jax.lax.top_k(cand_BAC.reshape(B, k * C), k)
    indices_BA = jnp.take_along_axis(chunks_BA, pos_BA // C, axis=1) * C + pos_BA % C
    return values_BA, indices_BA.astype(jnp.int32)


def log_prob(logits_BV: jax.Array, tokens_B: jax.Array) -> jax.Array:
    """log softmax(logits)[token], as the trainer computes it: logit - (max + log Σ exp(logit - max))."""
    max_B1 = jnp.max(logits_BV, axis=-1, keepdims=True)
    lse_B = max_B1[:, 0] + jnp.log(jnp.sum(jnp.exp(logits_BV - max_B1), axis=-1))
    return _take(logits_BV, tokens_B) - lse_B


def _take(x_BV: jax.Array, index_B: jax.Array) -> jax.Array:
    return jnp.take_along_axis(x_BV, index_B[:, None], axis=-1)[:, 0]


class SamplerState(NamedTuple):
    """Everything the decode loop carries; rows are (prompt, sample) pairs.

    Attributes:
      step: int32 scalar, tokens chosen so far (the next one is written at column `step`).
      tokens_BT: int32 [B, max_new_tokens] chosen tokens, PAD after EOS and beyond `step`.
      done_B: row has emitted EOS.
      lengths_B: int32 tokens chosen per row, EOS included.
      logps_B: float32 summed log-probs under the model's distribution.
      sampling_logps_B: float32 summed log-probs under the sampling distribution.
      entropy_B: float32 summed per-position entropies (`SamplingConfig.entropy`; else zeros).
      keys_B: per-row PRNG keys (step t draws with fold_in(key, t)).
      cache: the KV cache, holding prompt and chosen tokens up to `step - 1`.
    """

    step: jax.Array
    tokens_BT: jax.Array  # noqa: N815 (shape-suffixed names, see rlhf_jax/__init__.py)
    done_B: jax.Array  # noqa: N815
    lengths_B: jax.Array  # noqa: N815
    logps_B: jax.Array  # noqa: N815
    sampling_logps_B: jax.Array  # noqa: N815
    entropy_B: jax.Array  # noqa: N815
    keys_B: jax.Array  # noqa: N815
    cache: models.KVCache


def init_state(keys_B: jax.Array, cache: models.KVCache, max_new_tokens: int, pad_id: int) -> SamplerState:
    """A state with nothing chosen yet, over a prefilled cache."""
    B = keys_B.shape[0]
    zeros_B = jnp.zeros((B,), jnp.float32)
    return SamplerState(
        step=jnp.zeros((), jnp.int32),
        tokens_BT=jnp.full((B, max_new_tokens), pad_id, jnp.int32),
        done_B=jnp.zeros((B,), bool),
        lengths_B=jnp.zeros((B,), jnp.int32),
        logps_B=zeros_B,
        sampling_logps_B=zeros_B,
        entropy_B=zeros_B,
        keys_B=keys_B,
        cache=cache,
    )


def choose(
    state: SamplerState,
    logits_BV: jax.Array,
    *,
    config: SamplingConfig,
    eos_id: int | jax.Array | None,
    pad_id: int,
) -> SamplerState:
    """Draws the token at column `state.step` from `logits_BV`; rows already done get PAD.

    Args:
      state: the current state.
      logits_BV: next-token logits of every row.
      config: the sampling policy.
      eos_id: the token that ends a sample, or an int array of several (any of them ends it; -1 entries
        match nothing), or None to always generate `max_new_tokens`.
      pad_id: the filler after EOS.

    Returns:
      The state one step on (the cache is untouched).
    """
    keys_B = jax.vmap(jax.random.fold_in, in_axes=(0, None))(state.keys_B, state.step)
    tokens_B, logps_B, sampling_logps_B = config.next_token(logits_BV, keys_B)
    live_B = ~state.done_B
    tokens_B = jnp.where(live_B, tokens_B, pad_id)
    if eos_id is None:
        done_B = state.done_B
    else:  # one id or several (-1 matches no token)
        eos_E = jnp.atleast_1d(jnp.asarray(eos_id, tokens_B.dtype))
        done_B = state.done_B | jnp.any(tokens_B[:, None] == eos_E[None, :], axis=-1)
    return state._replace(
        step=state.step + 1,
        tokens_BT=jax.lax.dynamic_update_slice(state.tokens_BT, tokens_B[:, None], (0, state.step)),
        done_B=done_B,
        lengths_B=state.lengths_B + live_B,
        logps_B=state.logps_B + jnp.where(live_B, logps_B, 0.0),
        sampling_logps_B=state.sampling_logps_B + jnp.where(live_B, sampling_logps_B, 0.0),
        entropy_B=(
            state.entropy_B + jnp.where(live_B, config.entropy_of(logits_BV), 0.0)
            if config.entropy
            else state.entropy_B
        ),
    )


def decode(
    model: nn.Module,
    params,
    state: SamplerState,
    *,
    config: SamplingConfig,
    eos_id: int | jax.Array | None,
    pad_id: int,
) -> SamplerState:
    """Feeds the last chosen token and draws the next until every row is done or the buffer is full.

    Args:
      model: a `Transformer`.
      params: its parameters.
      state: a state with at least one token chosen (`choose` on the prefill logits).
      config: the sampling policy.
      eos_id: the token that ends a sample, or None (no early stop).
      pad_id: the filler after EOS.

    Returns:
      The final state.
    """

    def not_finished(s: SamplerState) -> jax.Array:
        return (s.step < config.max_new_tokens) & ~jnp.all(s.done_B)

    def one_step(s: SamplerState) -> SamplerState:
        last_B = jax.lax.dynamic_index_in_dim(s.tokens_BT, s.step - 1, axis=1, keepdims=False)
        logits_BV, cache = models.decode_step(model, params, last_B, s.cache)
        return choose(s._replace(cache=cache), logits_BV, config=config, eos_id=eos_id, pad_id=pad_id)

    return jax.lax.while_loop(not_finished, one_step, state)


class SampleOutput(NamedTuple):
    """Samples of P prompts, N each, as host numpy arrays.

    Attributes:
      tokens_PNT: int32 [P, N, max_new_tokens] completion tokens (EOS included), PAD after EOS.
      lengths_PN: int32 completion lengths, EOS included.
      logps_PN: float32 log π(completion | prompt) under the model's untempered distribution.
      sampling_logps_PN: float32 log-prob under the sampling distribution (tempered, truncated).
      finished_PN: bool, the sample ended with EOS (else it was cut at max_new_tokens).
      entropy_PN: float32 sum over the completion's positions (EOS included) of the entropy of
        softmax(logits / temperature), untruncated (`SamplingConfig.entropy`; zeros without it).
    """

    tokens_PNT: np.ndarray  # noqa: N815
    lengths_PN: np.ndarray  # noqa: N815
    logps_PN: np.ndarray  # noqa: N815
    sampling_logps_PN: np.ndarray  # noqa: N815
    finished_PN: np.ndarray  # noqa: N815
    entropy_PN: np.ndarray  # noqa: N815


def _generate(
    params,
    prompt_tokens_PT,
    prompt_lengths_P,
    prompt_ids_P,
    rng,
    eos_id,
    *,
    model,
    config,
    num_samples,
    pad_id,
    shared_prefix=True,
):
    """The jitted body of `sample`: prefill once per prompt, decode N samples of each (EOS -1: none).

    With N > 1 and `shared_prefix`, a prompt's N samples read its prefilled keys and values from one
    shared prefix (`models.share_prefix`; each sample caches only its own tokens); otherwise the
    prompt's cache is repeated N times. The two compute the same attention up to the order of float32
    additions (`tests/test_sampling.py`)."""
    P, T = prompt_tokens_PT.shape
    N = num_samples
    model, params = _unrolled(model, params)
    shared = shared_prefix and N > 1
    cache = models.init_cache(model.config, P, T if shared else T + config.max_new_tokens)
    logits_PV, cache = models.prefill(model, params, prompt_tokens_PT, prompt_lengths_P, cache)
    if shared:
        cache = models.share_prefix(cache, P * N, config.max_new_tokens, model.config)
    else:
        cache = jax.tree.map(lambda x: jnp.repeat(x, N, axis=0), cache)  # every sample of a prompt
    if model.mesh is not None:
        shardings = models.cache_shardings(model.mesh, model.rules, model.config, prefix=shared)
        cache = jax.lax.with_sharding_constraint(cache, shardings)
    prompt_keys_P = jax.vmap(jax.random.fold_in, in_axes=(None, 0))(rng, prompt_ids_P)
    keys_PN = jax.vmap(jax.vmap(jax.random.fold_in, in_axes=(None, 0)), in_axes=(0, None))(
        prompt_keys_P, jnp.arange(N, dtype=jnp.int32)
    )
    state = init_state(keys_PN.reshape(P * N), cache, config.max_new_tokens, pad_id)
    kwargs = dict(config=config, eos_id=eos_id, pad_id=pad_id)
    state = choose(state, jnp.repeat(logits_PV, N, axis=0), **kwargs)
    state = decode(model, params, state, **kwargs)
    return (
        state.tokens_BT, state.lengths_B, state.logps_B, state.sampling_logps_B, state.done_B, state.entropy_B
    )  # fmt: skip


def _unrolled(model: nn.Module, params) -> tuple[nn.Module, object]:
    """The model with unrolled layers and its params: its cache is one buffer per layer, which each decode
    step updates in place (a stacked cache goes through the layer scan and is copied at every step)."""
    if not model.config.scan_layers:
        return model, params
    config = dataclasses.replace(model.config, scan_layers=False)
    return model.clone(config=config), models.unstack_layers(params, config.num_layers)


@functools.lru_cache(maxsize=32)
def jitted_generate(
    model: nn.Module, config: SamplingConfig, num_samples: int, pad_id: int, shared_prefix: bool = True
):
    """The jitted body of `sample`, `(params, prompt_tokens_PT, prompt_lengths_P, prompt_ids_P, rng,
    eos_id) -> (tokens, lengths, logps, sampling_logps, done, entropy)` over P·N rows (eos_id -1: none), for
    profiling and ahead-of-time compilation (`bench.sample`); cached per (model, config, N, pad,
    shared_prefix). `shared_prefix=False` repeats each prompt's cache N times instead of sharing it (the
    layout before the shared prefix, kept for comparisons)."""
    fn = functools.partial(
        _generate, model=model, config=config, num_samples=num_samples, pad_id=pad_id,
        shared_prefix=shared_prefix,
    )  # fmt: skip
    return jax.jit(fn)


def sample(
    model: nn.Module,
    params,
    prompt_tokens_PT,
    prompt_lengths_P,
    *,
    config: SamplingConfig,
    num_samples: int,
    rng: jax.Array,
    eos_id: int | Sequence[int] | None,
    pad_id: int,
    prompt_ids=None,
    shared_prefix: bool = True,
) -> SampleOutput:
    """Samples `num_samples` completions of each prompt (jitted; sharded over `model.mesh` if it has one).

    One compilation per (model, config, num_samples, pad_id) and prompt shape; in a multi-process run
    every process passes the same prompts and gets all the samples.

    Args:
      model: a `Transformer`; with a mesh, rows are split over its batch axes (`scoring.map_chunks`
        pads the prompts with copies of the first to a multiple of the batch shards, and drops them).
      params: its parameters (sharded as `models.param_shardings(model)` when there is a mesh).
      prompt_tokens_PT: int prompts (BOS + prompt) right-padded, e.g. `pipeline` prompt batches.
      prompt_lengths_P: their true lengths, each >= 1.
      config: the sampling policy.
      num_samples: N, samples per prompt.
      rng: a PRNG key.
      eos_id: the token that ends a sample, or several (a tokenizer's `eos_ids`, e.g. Llama 3 Instruct's
        `<|eot_id|>` and `<|end_of_text|>`: the first of them to be drawn ends it); None generates
        exactly `max_new_tokens` tokens. The stop ids are an argument of the compiled program, not a
        constant: one compilation per number of ids.
      pad_id: the filler after EOS.
      prompt_ids: int [P] ids that seed each prompt's samples (default 0 .. P-1); give stable ids
        (e.g. `example_ids`) for results that do not depend on how prompts are batched.
      shared_prefix: with num_samples > 1, a prompt's samples read its prefilled cache once, shared
        (default); False repeats the prompt's cache for every sample (the earlier layout: the same
        samples up to float32 rounding, more memory and cache reads).

    Returns:
      A SampleOutput of host arrays [P, N, ...].
    """
    prompt_tokens_PT = np.asarray(prompt_tokens_PT, np.int32)
    prompt_lengths_P = np.asarray(prompt_lengths_P, np.int32)
    P, T = prompt_tokens_PT.shape
    prompt_ids_P = np.arange(P) if prompt_ids is None else np.asarray(prompt_ids)
    if prompt_lengths_P.shape != (P,) or prompt_ids_P.shape != (P,):
        raise ValueError(
            f"prompt_tokens {prompt_tokens_PT.shape} needs prompt_lengths and prompt_ids of shape ({P},), "
            f"got {prompt_lengths_P.shape} and {prompt_ids_P.shape}"
        )
    if P < 1:
        raise ValueError("sample needs at least one prompt")
    if prompt_lengths_P.min() < 1 or prompt_lengths_P.max() > T:
        raise ValueError(
            f"prompt lengths must be in [1, {T}], got {prompt_lengths_P.min()}..{prompt_lengths_P.max()}"
        )
    if num_samples < 1:
        raise ValueError(f"num_samples={num_samples} must be >= 1")
    inputs = [prompt_tokens_PT, prompt_lengths_P, prompt_ids_P.astype(np.int32)]
    # EOS is an argument, not a constant, so one compilation serves every EOS id (-1: never stop early).
    scalars = [rng, np.atleast_1d(np.asarray(-1 if eos_id is None else eos_id, np.int32))]
    if model.mesh is not None:
        scalars = sharding.put(scalars, sharding.replicated(model.mesh))
    generate = jitted_generate(model, config, num_samples, pad_id, shared_prefix)
    # One chunk of all P prompts; its N outputs per prompt come back as P*N rows.
    outs = scoring.map_chunks(
        lambda chunk: generate(params, *chunk, *scalars), inputs, batch_size=P, mesh=model.mesh,
        rules=model.rules,
    )  # fmt: skip
    return SampleOutput(*(x.reshape(P, num_samples, *x.shape[1:]) for x in outs))


def with_prefix(
    prompt_tokens_PT, prompt_lengths_P, prefix_tokens_PT, prefix_lengths_P
) -> tuple[np.ndarray, np.ndarray]:
    """Joins each prompt with a prefix of its completion (token ids, not re-tokenised text) into one
    right-padded prompt: the state s = prompt + previous steps of a step-level method.

    Returns:
      (tokens [P, Tp + Tq], lengths [P]) host int32 arrays, padded with the prompts' own filler (zeros).
    """
    prompt_PT, lengths_P = np.asarray(prompt_tokens_PT, np.int32), np.asarray(prompt_lengths_P, np.int32)
    prefix_PT, plen_P = np.asarray(prefix_tokens_PT, np.int32), np.asarray(prefix_lengths_P, np.int32)
    P = prompt_PT.shape[0]
    if prefix_PT.shape[0] != P or plen_P.shape != (P,) or lengths_P.shape != (P,):
        raise ValueError(
            f"with_prefix needs P={P} rows everywhere, got prefix {prefix_PT.shape}, lengths "
            f"{lengths_P.shape}, prefix lengths {plen_P.shape}"
        )
    if (plen_P < 0).any() or (plen_P > prefix_PT.shape[1]).any():
        raise ValueError(f"prefix lengths must be in [0, {prefix_PT.shape[1]}], got {plen_P.tolist()}")
    out_PT = np.zeros((P, prompt_PT.shape[1] + prefix_PT.shape[1]), np.int32)
    for p in range(P):
        n, m = lengths_P[p], plen_P[p]
        out_PT[p, :n] = prompt_PT[p, :n]
        out_PT[p, n : n + m] = prefix_PT[p, :m]
    return out_PT, lengths_P + plen_P


def continue_prefix(
    model: nn.Module, params, prompt_tokens_PT, prompt_lengths_P, prefix_tokens_PT, prefix_lengths_P, **kwargs
) -> SampleOutput:
    """Samples continuations of prompt + prefix (`with_prefix`), e.g. N completions from a state s, or M
    next steps a_j ~ π(·|s) when `eos_id` also holds the newline tokens (`stop_at_first` then cuts a
    step at its first newline). `kwargs` are `sample`'s; the output holds the continuations only."""
    tokens_PT, lengths_P = with_prefix(prompt_tokens_PT, prompt_lengths_P, prefix_tokens_PT, prefix_lengths_P)
    return sample(model, params, tokens_PT, lengths_P, **kwargs)


def stop_at_first(tokens_PNT, lengths_PN, stop_ids) -> np.ndarray:
    """Post-hoc truncation: lengths cut just after the first token in `stop_ids` (kept lengths if none)."""
    tokens_PNT, lengths_PN = np.asarray(tokens_PNT), np.asarray(lengths_PN)
    T = tokens_PNT.shape[-1]
    hit_PNT = np.isin(tokens_PNT, np.asarray(stop_ids)) & (np.arange(T) < lengths_PN[..., None])
    first_PN = np.where(hit_PNT.any(-1), hit_PNT.argmax(-1) + 1, lengths_PN)
    return first_PN.astype(np.int32)
