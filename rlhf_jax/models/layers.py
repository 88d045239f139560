"""The pieces of one decoder layer: RMSNorm, rotary embeddings, grouped-query attention, gated MLP.

Options of the Gemma 2 / Gemma 3 / Qwen3 / Mistral families (`ModelConfig`): q/k RMSNorms, sandwich
norms, a query_pre_attn_scalar score scale, tanh soft-capping of the attention scores, sliding-window
layers and a local rotary base. What differs between layers (window, rotary table) arrives as per-layer
*values* (`Block`'s `layer` argument), scanned with the layer stack, never as Python branches on the
layer index, so a scanned and an unrolled stack compute the same thing.

Every parameter is declared with its logical axes (`nn.with_logical_partitioning`); `rlhf_jax.sharding`
maps them to the mesh. Weights are stored in `param_dtype` and cast to the compute dtype at use.
"""

import functools

import jax
import jax.numpy as jnp
import numpy as np
from flax import linen as nn
from jax.sharding import Mesh

from rlhf_jax import sharding
from rlhf_jax.models.config import ModelConfig, sliding_layers


def fan_in(in_axis, out_axis):
    """Variance-scaling (LeCun) init for a kernel whose input dimensions are `in_axis`."""
    return nn.initializers.variance_scaling(
        1.0, "fan_in", "truncated_normal", in_axis=in_axis, out_axis=out_axis
    )


class RMSNorm(nn.Module):
    """x / rms(x) * scale, computed in float32 and returned in the compute dtype."""

    config: ModelConfig

    @nn.compact
    def __call__(self, x_BTD: jax.Array) -> jax.Array:
        scale_D = self.param(
            "scale", nn.with_logical_partitioning(nn.initializers.ones, ("norm",)), (x_BTD.shape[-1],),
            jnp.dtype(self.config.param_dtype),
        )  # fmt: skip
        x32_BTD = x_BTD.astype(jnp.float32)
        inv_rms_BT1 = jax.lax.rsqrt(
            jnp.mean(jnp.square(x32_BTD), axis=-1, keepdims=True) + self.config.norm_eps
        )
        scale_11D = scale_D.astype(jnp.float32).reshape((1,) * (x_BTD.ndim - 1) + (-1,))
        return (x32_BTD * inv_rms_BT1 * scale_11D).astype(self.config.dtype)


def rope_inv_freq(head_dim: int, theta: float, scaling: tuple = ()) -> np.ndarray:
    """float32 [K/2] rotary frequencies theta^(-2i/K), with the frequency scaling `scaling` if set.

    Linear (`rope_type="linear"`, position interpolation, Chen et al. 2023; Gemma 3's global layers):
    every frequency divided by `factor`, as transformers' `_compute_linear_scaling_rope_parameters`.

    Llama 3.1 (`rope_type="llama3"`, as `transformers`' `_compute_llama3_parameters`): with wavelength
    λ_i = 2π / f_i, L = original_max_position_embeddings, low = L / low_freq_factor and
    high = L / high_freq_factor, a frequency is kept where λ_i < high, divided by `factor` where λ_i > low,
    and in between interpolated, f_i ((1 - s) / factor + s) with s = (L / λ_i - low_freq_factor) /
    (high_freq_factor - low_freq_factor). Computed in float64 on the host, then cast.
    """
    half = head_dim // 2
    inv_freq = float(theta) ** (-np.arange(half, dtype=np.float64) / half)
    if scaling and dict(scaling)["rope_type"] == "linear":
        inv_freq = inv_freq / float(dict(scaling)["factor"])
    elif scaling:
        c = dict(scaling)
        factor, low_f, high_f = float(c["factor"]), float(c["low_freq_factor"]), float(c["high_freq_factor"])
        old_len = float(c["original_max_position_embeddings"])
        wavelen = 2 * np.pi / inv_freq
        scaled = np.where(wavelen > old_len / low_f, inv_freq / factor, inv_freq)
        smooth = (old_len / wavelen - low_f) / (high_f - low_f)
        medium = (wavelen >= old_len / high_f) & (wavelen <= old_len / low_f)
        inv_freq = np.where(medium, (1 - smooth) * scaled / factor + smooth * scaled, scaled)
    return inv_freq.astype(np.float32)


def rope_tables(
    positions_BT: jax.Array, head_dim: int, theta: float, scaling: tuple = ()
) -> tuple[jax.Array, jax.Array]:
    """float32 (sin_BTk, cos_BTk), k = head_dim / 2, of the rotary angles positions * f_i
    (`rope_inv_freq`: theta^(-2i/K), Llama 3.1-scaled when `scaling` is set).

    Computed once per forward and shared by every layer.
    """
    inv_freq_k = jnp.asarray(rope_inv_freq(head_dim, theta, scaling))
    angle_BTk = positions_BT[..., None].astype(jnp.float32) * inv_freq_k[None, None, :]
    return jnp.sin(angle_BTk), jnp.cos(angle_BTk)


def rope(x_BTHK: jax.Array, sin_BTk: jax.Array, cos_BTk: jax.Array) -> jax.Array:
    """Rotary position embedding (Su et al. 2021), in the rotate-half layout of Llama/Gemma/Qwen2 checkpoints.

    Rotates the pair (i, i + K/2) of every head by the angle of frequency i.
    """
    sin_BT1k, cos_BT1k = sin_BTk[:, :, None], cos_BTk[:, :, None]
    x1, x2 = jnp.split(x_BTHK.astype(jnp.float32), 2, axis=-1)
    out = jnp.concatenate([x1 * cos_BT1k - x2 * sin_BT1k, x2 * cos_BT1k + x1 * sin_BT1k], axis=-1)
    return out.astype(x_BTHK.dtype)


def _write(cache_BGSK: jax.Array, new_BTGK: jax.Array, start_B: jax.Array) -> jax.Array:
    """Writes each row's T new entries into its [G, S, K] cache at slot start_B[b]."""
    new_BGTK = jnp.swapaxes(new_BTGK, 1, 2).astype(cache_BGSK.dtype)
    write_row = lambda c, n, s: jax.lax.dynamic_update_slice_in_dim(c, n, s, axis=1)
    return jax.vmap(write_row)(cache_BGSK, new_BGTK, start_B)


def _softcap(x: jax.Array, cap: float | None) -> jax.Array:
    """cap · tanh(x / cap) (Gemma 2's logit soft-capping), or x when cap is None."""
    return x if cap is None else cap * jnp.tanh(x / cap)


def _weighted_values(probs_BGQTS: jax.Array, v_BGSK: jax.Array) -> jax.Array:
    """out[b, t, g, q] = Σ_s probs[b, g, q, t, s] v[b, g, s] as [B, T, G, Q, K].

    With one query per (row, kv head) (Q·T = 1: a decode step without grouped heads) this is a
    vector-matrix product per (row, kv head), which XLA:CPU runs as a dot at ~3.5 GFLOP/s; written as a
    broadcast multiply and a sum over s it is one fused loop, about 2x faster on a [64, 4, 192, 64]
    cache in a one-off probe (0.34 against 0.66 ms; in `bench.sample --profile` the four value dots
    are replaced by fusions with the output projection). Otherwise one einsum."""
    B, G, Q, T, S = probs_BGQTS.shape
    if Q * T == 1:
        out_BGK = jnp.sum(probs_BGQTS[:, :, 0, 0, :, None] * v_BGSK, axis=2)
        return out_BGK.reshape(B, 1, G, 1, v_BGSK.shape[-1])
    return jnp.einsum("BGQTS,BGSK->BTGQK", probs_BGQTS, v_BGSK)


def _cached_attention(
    q_BTHK: jax.Array,
    k_BGSK: jax.Array,
    v_BGSK: jax.Array,
    mask_B1TS: jax.Array,
    scale: float | None = None,
    softcap: float | None = None,
):
    """Grouped-query attention of T queries over a cache laid out [B, G, S, K] (float32 softmax).

    Scores are scaled by `scale` (default K^-1/2) and soft-capped by `softcap` (if set) before the mask.

    The same maths as `jax.nn.dot_product_attention`, on the cache's own layout: each (row, kv head) is
    one contiguous [S, K] matrix, so the score and value matmuls read the cache without transposing it
    (on CPU that per-step transpose dominated decoding; bench/README.md, "Measured timings").
    """
    B, T, H, K = q_BTHK.shape
    G = k_BGSK.shape[1]
    q_BTGQK = q_BTHK.reshape(B, T, G, H // G, K)
    scores_BGQTS = jnp.einsum("BTGQK,BGSK->BGQTS", q_BTGQK, k_BGSK, preferred_element_type=jnp.float32)
    scores_BGQTS = _softcap(scores_BGQTS * (K**-0.5 if scale is None else scale), softcap)
    scores_BGQTS = jnp.where(mask_B1TS[:, :, None], scores_BGQTS, jnp.finfo(jnp.float32).min)
    probs_BGQTS = jax.nn.softmax(scores_BGQTS, axis=-1).astype(v_BGSK.dtype)
    out_BTGQK = _weighted_values(probs_BGQTS, v_BGSK)
    return out_BTGQK.reshape(B, T, H, K)


def _shared_prefix_attention(
    q_BTHK: jax.Array,
    k_PGSK: jax.Array,
    v_PGSK: jax.Array,
    k_BGJK: jax.Array,
    v_BGJK: jax.Array,
    mask_B1TC: jax.Array,
    scale: float | None = None,
    softcap: float | None = None,
):
    """`_cached_attention` over a cache in two parts: a prefix shared by groups of N = B / P consecutive
    rows (row b reads prefix row b // N, e.g. the prompt of b's G samples) and each row's own slots.

    Row b's slots are the prefix's S slots followed by its own J (C = S + J, the columns of `mask_B1TC`);
    one softmax over all C, so this is `_cached_attention` over the concatenated cache, up to the order of
    float32 additions. The prefix part is one matmul per (prompt, kv head) with the group's N·Q·T query
    rows, instead of a matrix-vector product per row over N copies of the prompt's keys and values.
    """
    B, T, H, K = q_BTHK.shape
    P, G, S, _ = k_PGSK.shape
    N, Q = B // P, H // G
    scale = K**-0.5 if scale is None else scale
    q_PNTGQK = q_BTHK.reshape(P, N, T, G, Q, K)
    pre_PNGQTS = jnp.einsum("PNTGQK,PGSK->PNGQTS", q_PNTGQK, k_PGSK, preferred_element_type=jnp.float32)
    own_BGQTJ = jnp.einsum(
        "BTGQK,BGJK->BGQTJ", q_BTHK.reshape(B, T, G, Q, K), k_BGJK, preferred_element_type=jnp.float32
    )
    scores_BGQTC = jnp.concatenate([pre_PNGQTS.reshape(B, G, Q, T, S), own_BGQTJ], axis=-1)
    scores_BGQTC = _softcap(scores_BGQTC * scale, softcap)
    scores_BGQTC = jnp.where(mask_B1TC[:, :, None], scores_BGQTC, jnp.finfo(jnp.float32).min)
    probs_BGQTC = jax.nn.softmax(scores_BGQTC, axis=-1).astype(v_BGJK.dtype)
    pre_PNGQTS = probs_BGQTC[..., :S].reshape(P, N, G, Q, T, S)
    out_PNTGQK = jnp.einsum("PNGQTS,PGSK->PNTGQK", pre_PNGQTS, v_PGSK)
    out_BTGQK = _weighted_values(probs_BGQTC[..., S:], v_BGJK)
    return (out_PNTGQK.reshape(B, T, G, Q, K) + out_BTGQK).reshape(B, T, H, K)


# Cache slots per iteration of `bounded_cached_attention` (a multiple of the TPU's 128-lane tiles).
_DECODE_CHUNK = 256


def decode_kernel(config: ModelConfig, platform: str) -> str:
    """The attention over a KV cache: "full" (`_cached_attention`, every slot of the buffer) or "bounded"
    (`bounded_cached_attention`, the filled slots only), from `config.decode_attention` and the target
    platform; None: "full" on the CPU, "bounded" on a TPU or GPU."""
    if config.decode_attention is not None:
        return config.decode_attention
    return "full" if platform == "cpu" else "bounded"


def _online_softmax_chunks(scores_fn, values_fn, k_XGSK, v_XGSK, mask_B1TS, num_slots, chunk, state, dtype):
    """Flash-decoding over the first `num_slots` (traced) slots of a [X, G, S, K] cache, `chunk` slots
    per iteration of a while loop, so the slots past the last chunk that holds a filled slot are never
    read; each chunk is cast to `dtype` (the compute dtype) after it is sliced. `state` = (acc_BGQTK,
    max_BGQT, sum_BGQT), float32, updated as in an online softmax:
    m' = max(m, max_c s), l' = l·e^(m−m') + Σ_c e^(s−m'), acc' = acc·e^(m−m') + Σ_c e^(s−m')·v.
    A last chunk that would run past S starts at S − chunk; its columns below the chunk's own start were
    counted by the previous chunk and are masked."""
    S = k_XGSK.shape[2]
    C = min(chunk, S)
    num_chunks = (num_slots + C - 1) // C
    neg = jnp.finfo(jnp.float32).min

    def body(i, state):
        acc_BGQTK, max_BGQT, sum_BGQT = state
        start = jnp.minimum(i * C, S - C)
        # Cast after slicing: a cache stored in another dtype is converted chunk by chunk, never whole.
        k_XGCK = jax.lax.dynamic_slice_in_dim(k_XGSK, start, C, axis=2).astype(dtype)
        v_XGCK = jax.lax.dynamic_slice_in_dim(v_XGSK, start, C, axis=2).astype(dtype)
        mask_B1TC = jax.lax.dynamic_slice_in_dim(mask_B1TS, start, C, axis=3)
        fresh_C = start + jnp.arange(C) >= i * C
        scores_BGQTC = scores_fn(k_XGCK)
        scores_BGQTC = jnp.where(
            mask_B1TC[:, :, None] & fresh_C[None, None, None, None, :], scores_BGQTC, neg
        )
        new_max_BGQT = jnp.maximum(max_BGQT, jnp.max(scores_BGQTC, axis=-1))
        rescale_BGQT = jnp.exp(max_BGQT - new_max_BGQT)
        probs_BGQTC = jnp.exp(scores_BGQTC - new_max_BGQT[..., None])
        sum_BGQT = sum_BGQT * rescale_BGQT + jnp.sum(probs_BGQTC, axis=-1)
        acc_BGQTK = acc_BGQTK * rescale_BGQT[..., None] + values_fn(probs_BGQTC.astype(v_XGCK.dtype), v_XGCK)
        return acc_BGQTK, new_max_BGQT, sum_BGQT

    return jax.lax.fori_loop(0, num_chunks, body, state)


def bounded_cached_attention(
    q_BTHK: jax.Array,
    k_BGSK: jax.Array,
    v_BGSK: jax.Array,
    mask_B1TS: jax.Array,
    num_slots: jax.Array,
    scale: float | None = None,
    softcap: float | None = None,
    prefix: tuple | None = None,
    chunk: int = _DECODE_CHUNK,
):
    """`_cached_attention` (or `_shared_prefix_attention` with `prefix`) that reads the cache only up to
    its last filled slot: a loop over chunks of `chunk` slots with an online softmax (Milakov & Gimelshein
    2018; flash-decoding), float32 accumulators, the same scaling, soft-capping and mask.

    Args:
      q_BTHK, k_BGSK, v_BGSK, mask_B1TS, scale, softcap: as in `_cached_attention` (the cache in any
        dtype: each chunk is cast to q's); with `prefix`, the mask's columns are the prefix's R slots, then
        the row's own S.
      num_slots: int32 scalar, the row slots any query may attend to (max over rows of the filled
        slots, the new tokens' included); slots from the first chunk past it on are not read.
      prefix: None, or (k_PGRK, v_PGRK, num_prefix_slots): a prefix shared by groups of B / P
        consecutive rows (`KVCache.prefix_k`), read up to num_prefix_slots.
      chunk: slots per iteration.

    Returns:
      [B, T, H, K], equal to the full read up to the order of float32 additions.
    """
    B, T, H, K = q_BTHK.shape
    G = k_BGSK.shape[1]
    Q = H // G
    scale = K**-0.5 if scale is None else scale
    q_BTGQK = q_BTHK.reshape(B, T, G, Q, K)
    state = (
        jnp.zeros((B, G, Q, T, K), jnp.float32),
        jnp.full((B, G, Q, T), jnp.finfo(jnp.float32).min, jnp.float32),
        jnp.zeros((B, G, Q, T), jnp.float32),
    )
    if prefix is not None:
        k_PGRK, v_PGRK, num_prefix_slots = prefix
        P, R = k_PGRK.shape[0], k_PGRK.shape[2]
        q_PNTGQK = q_BTGQK.reshape(P, B // P, T, G, Q, K)

        def prefix_scores(k_PGCK):
            s_PNGQTC = jnp.einsum("PNTGQK,PGCK->PNGQTC", q_PNTGQK, k_PGCK, preferred_element_type=jnp.float32)
            return _softcap(s_PNGQTC.reshape(B, G, Q, T, -1) * scale, softcap)

        def prefix_values(p_BGQTC, v_PGCK):
            p_PNGQTC = p_BGQTC.reshape(P, B // P, G, Q, T, -1)
            out = jnp.einsum("PNGQTC,PGCK->PNGQTK", p_PNGQTC, v_PGCK, preferred_element_type=jnp.float32)
            return out.reshape(B, G, Q, T, K)

        state = _online_softmax_chunks(
            prefix_scores, prefix_values, k_PGRK, v_PGRK, mask_B1TS[..., :R], num_prefix_slots, chunk, state,
            q_BTHK.dtype,
        )  # fmt: skip
        mask_B1TS = mask_B1TS[..., R:]

    def scores(k_BGCK):
        s_BGQTC = jnp.einsum("BTGQK,BGCK->BGQTC", q_BTGQK, k_BGCK, preferred_element_type=jnp.float32)
        return _softcap(s_BGQTC * scale, softcap)

    def values(p_BGQTC, v_BGCK):
        return jnp.einsum("BGQTC,BGCK->BGQTK", p_BGQTC, v_BGCK, preferred_element_type=jnp.float32)

    acc_BGQTK, _, sum_BGQT = _online_softmax_chunks(
        scores, values, k_BGSK, v_BGSK, mask_B1TS, num_slots, chunk, state, q_BTHK.dtype
    )
    out_BGQTK = acc_BGQTK / sum_BGQT[..., None]
    return jnp.einsum("BGQTK->BTGQK", out_BGQTK).reshape(B, T, H, K).astype(q_BTHK.dtype)


# Query rows per block of `causal_attention`: the fastest block size measured on CPU (bench/README.md).
_ATTENTION_BLOCK = 64


def attention_block(T: int) -> int:
    """The query rows per block of `causal_attention` at length T: the largest divisor of T that is at
    most _ATTENTION_BLOCK (one block if there is none >= 16)."""
    for c in range(min(T, _ATTENTION_BLOCK), 15, -1):
        if T % c == 0:
            return c
    return T


def _block_scores(q_BGQCK, k_BGSK, mask_B1CS, start: int, scale: float, softcap: float | None):
    """Scaled (and soft-capped) float32 scores [B, G, Q, C, S] of the query block at `start` against keys
    0..S-1, masked causally and by `mask_B1CS` (or None), and the soft-cap's derivative
    d capped / d scaled = 1 - tanh² (None without a cap)."""
    C, S = q_BGQCK.shape[3], k_BGSK.shape[2]
    scores = jnp.einsum("BGQCK,BGSK->BGQCS", q_BGQCK, k_BGSK, preferred_element_type=jnp.float32) * scale
    dcap = None
    if softcap is not None:
        tanh = jnp.tanh(scores / softcap)
        scores, dcap = softcap * tanh, 1.0 - jnp.square(tanh)
    allowed_CS = (start + jnp.arange(C))[:, None] >= jnp.arange(S)[None, :]
    allowed = (
        allowed_CS[None, None, None]
        if mask_B1CS is None
        else allowed_CS[None, None, None] & mask_B1CS[:, :, None]
    )
    return jnp.where(allowed, scores, jnp.finfo(jnp.float32).min), dcap


def _heads_major(x_BTHK, G: int):
    """[B, T, H, K] → [B, G, Q, T, K] (Q = H / G query heads per kv head): every (row, head) one
    contiguous [T, K] matrix, so each block's matmuls are plain batched ones."""
    B, T, H, K = x_BTHK.shape
    return x_BTHK.reshape(B, T, G, H // G, K).transpose(0, 2, 3, 1, 4)


def _tokens_major(x_BGQTK):
    """[B, G, Q, T, K] → [B, T, H, K]."""
    B, G, Q, T, K = x_BGQTK.shape
    return x_BGQTK.transpose(0, 3, 1, 2, 4).reshape(B, T, G * Q, K)


def _add_prefix(acc_BGSK, part_BGEK):
    """acc[:, :, :E] += part, as an in-place slice update (`.at[].add` would lower to a scatter)."""
    E = part_BGEK.shape[2]
    return jax.lax.dynamic_update_slice_in_dim(acc_BGSK, acc_BGSK[:, :, :E] + part_BGEK, 0, axis=2)


def causal_attention(q_BTHK, k_BSGK, v_BSGK, mask_B1TS, block: int, scale=None, softcap=None):
    """Causal grouped-query attention in query blocks, with a recomputing (FlashAttention-2) backward.

    The same maths as `jax.nn.dot_product_attention(q, k, v, mask=mask_B1TS, is_causal=True)`. Query
    block i (of `block` rows) attends to keys 0 .. (i+1)·block - 1 only, so the masked upper triangle
    is never computed (T/block blocks do (1 + block/T)/2 of the full square's work); the forward keeps
    only the output and the log-sum-exp, and the backward recomputes each block's probabilities instead
    of storing [B, H, T, T] of them. Queries, keys and values are transposed once to a heads-major
    layout ([B, G, Q, T, K]), so every block's slices and matmuls are contiguous; with the tokens-major
    layout XLA:CPU copied each block, which made attention the largest part of a CPU train step
    (bench/README.md, "Measured timings").

    Args:
      q_BTHK: queries (H = G·Q heads).
      k_BSGK, v_BSGK: keys and values, S = T.
      mask_B1TS: bool mask and-ed with the causal one (same segment), or None.
      block: query rows per block; divides T.
      scale: the score scale; default K^-1/2.
      softcap: soft-capping of the scaled scores, s -> softcap · tanh(s / softcap) (Gemma 2), or None.

    Returns:
      [B, T, H, K] attention output, in the dtype of `v`.
    """
    scale = q_BTHK.shape[-1] ** -0.5 if scale is None else float(scale)
    softcap = None if softcap is None else float(softcap)
    return _causal_attention(q_BTHK, k_BSGK, v_BSGK, mask_B1TS, block, scale, softcap)


@functools.partial(jax.custom_vjp, nondiff_argnums=(4, 5, 6))
def _causal_attention(q_BTHK, k_BSGK, v_BSGK, mask_B1TS, block, scale, softcap):
    return _causal_attention_fwd(q_BTHK, k_BSGK, v_BSGK, mask_B1TS, block, scale, softcap)[0]


def _attention_forward(q_BGQTK, k_BGSK, v_BGSK, mask_B1TS, block, scale, softcap):
    T = q_BGQTK.shape[3]
    outs, lses = [], []
    for start in range(0, T, block):
        end = start + block
        mask = None if mask_B1TS is None else mask_B1TS[:, :, start:end, :end]
        scores_BGQCS, _ = _block_scores(
            q_BGQTK[:, :, :, start:end], k_BGSK[:, :, :end], mask, start, scale, softcap
        )
        max_BGQC1 = jnp.max(scores_BGQCS, axis=-1, keepdims=True)
        exp_BGQCS = jnp.exp(scores_BGQCS - max_BGQC1)
        sum_BGQC1 = jnp.sum(exp_BGQCS, axis=-1, keepdims=True)
        probs_BGQCS = (exp_BGQCS / sum_BGQC1).astype(v_BGSK.dtype)
        outs.append(jnp.einsum("BGQCS,BGSK->BGQCK", probs_BGQCS, v_BGSK[:, :, :end]))
        lses.append((max_BGQC1 + jnp.log(sum_BGQC1))[..., 0])
    return jnp.concatenate(outs, axis=3), jnp.concatenate(lses, axis=-1)


def _causal_attention_fwd(q_BTHK, k_BSGK, v_BSGK, mask_B1TS, block, scale, softcap):
    G = k_BSGK.shape[2]
    q_BGQTK = _heads_major(q_BTHK, G)
    k_BGSK, v_BGSK = jnp.swapaxes(k_BSGK, 1, 2), jnp.swapaxes(v_BSGK, 1, 2)
    out_BGQTK, lse_BGQT = _attention_forward(q_BGQTK, k_BGSK, v_BGSK, mask_B1TS, block, scale, softcap)
    return _tokens_major(out_BGQTK), (q_BGQTK, k_BGSK, v_BGSK, mask_B1TS, out_BGQTK, lse_BGQT)


def _causal_attention_bwd(block, scale, softcap, residuals, d_out_BTHK):
    q_BGQTK, k_BGSK, v_BGSK, mask_B1TS, out_BGQTK, lse_BGQT = residuals
    T = q_BGQTK.shape[3]
    f32 = jnp.float32
    do_BGQTK = _heads_major(d_out_BTHK, k_BGSK.shape[1])
    # delta = rowsum(dO ∘ O), the softmax backward's correction term.
    delta_BGQT = jnp.einsum("BGQTK,BGQTK->BGQT", do_BGQTK.astype(f32), out_BGQTK.astype(f32))
    dq_blocks = []
    dk_BGSK = jnp.zeros(k_BGSK.shape, f32)
    dv_BGSK = jnp.zeros(v_BGSK.shape, f32)
    for start in range(0, T, block):
        end = start + block
        mask = None if mask_B1TS is None else mask_B1TS[:, :, start:end, :end]
        q_BGQCK, do_BGQCK = q_BGQTK[:, :, :, start:end], do_BGQTK[:, :, :, start:end]
        k_BGEK, v_BGEK = k_BGSK[:, :, :end], v_BGSK[:, :, :end]
        scores_BGQCS, dcap_BGQCS = _block_scores(q_BGQCK, k_BGEK, mask, start, scale, softcap)
        probs_BGQCS = jnp.exp(scores_BGQCS - lse_BGQT[..., start:end, None])
        dv_BGSK = _add_prefix(
            dv_BGSK,
            jnp.einsum(
                "BGQCS,BGQCK->BGSK", probs_BGQCS.astype(do_BGQCK.dtype), do_BGQCK, preferred_element_type=f32
            ),
        )
        dp_BGQCS = jnp.einsum("BGQCK,BGSK->BGQCS", do_BGQCK, v_BGEK, preferred_element_type=f32)
        ds_BGQCS = probs_BGQCS * (dp_BGQCS - delta_BGQT[..., start:end, None])
        if dcap_BGQCS is not None:  # through s = c·tanh(a / c): ds/da = 1 - tanh²
            ds_BGQCS = ds_BGQCS * dcap_BGQCS
        ds_BGQCS = (ds_BGQCS * scale).astype(q_BGQTK.dtype)
        dq_blocks.append(jnp.einsum("BGQCS,BGSK->BGQCK", ds_BGQCS, k_BGEK, preferred_element_type=f32))
        dk_BGSK = _add_prefix(
            dk_BGSK, jnp.einsum("BGQCS,BGQCK->BGSK", ds_BGQCS, q_BGQCK, preferred_element_type=f32)
        )
    dq_BTHK = _tokens_major(jnp.concatenate(dq_blocks, axis=3))
    return (
        dq_BTHK.astype(q_BGQTK.dtype),
        jnp.swapaxes(dk_BGSK, 1, 2).astype(k_BGSK.dtype),
        jnp.swapaxes(dv_BGSK, 1, 2).astype(v_BGSK.dtype),
        None,
    )


_causal_attention.defvjp(_causal_attention_fwd, _causal_attention_bwd)


def lora_delta(module: nn.Module, kernel: str, x_RI: jax.Array, target: int = 0) -> jax.Array | None:
    """x_RI A B for the LoRA adapter of `kernel` when the params hold one (`rlhf_jax.lora.attach`), else None.

    A [*in, r] and B (already scaled by α / r) [r, *out] are flattened to [I, r] and [r, O]; with the
    module's dropout key and rate present (training), x is dropped out per element (inverted scaling)
    before A, with a key folded from the target index `target`. Computed in the module's compute dtype.
    """
    if not module.has_variable("params", kernel + "_lora_a"):
        return None
    dtype = module.config.dtype
    a = module.get_variable("params", kernel + "_lora_a")
    b = module.get_variable("params", kernel + "_lora_b")
    r = b.shape[0]
    x = x_RI
    if module.has_variable("params", "lora_dropout_key"):
        key = jax.random.fold_in(
            jax.random.wrap_key_data(module.get_variable("params", "lora_dropout_key")), target
        )
        rate = module.get_variable("params", "lora_dropout_rate").astype(jnp.float32)
        keep = jax.random.uniform(key, x.shape) >= rate
        x = jnp.where(keep, x.astype(jnp.float32) / (1.0 - rate), 0.0).astype(x.dtype)
    h_Rr = jnp.dot(x, a.reshape(-1, r).astype(dtype))
    return jnp.dot(h_Rr, b.reshape(r, -1).astype(dtype))


def _plus(y, delta):
    return y if delta is None else y + delta


def target_platform(mesh: Mesh | None) -> str:
    """The platform ("cpu", "tpu", "gpu") the program is compiled for: that of the mesh's devices (a TPU
    topology's devices when compiling for a TPU from a CPU host), else `jax.default_backend()`."""
    return mesh.devices.flat[0].platform if mesh is not None else jax.default_backend()


def attention_kernel(config: ModelConfig, platform: str, seq_len: int) -> str:
    """The kernel of the uncached attention forward: "blockwise" (`causal_attention`), "xla" or "cudnn"
    (`jax.nn.dot_product_attention`), "splash" (`splash_attention`) or "cpu_ffi" (`cpu_ffi_attention`),
    from `config.attention_impl`, the target platform ("cpu", "gpu", "tpu") and the sequence length.

    None: blockwise on the CPU, XLA elsewhere. "xla", "cudnn": that implementation. "auto": blockwise on
    the CPU; cuDNN flash attention on a GPU when the compute dtype is bf16 (XLA for float32,
    which cuDNN does not take); splash on a TPU unless the model has sliding windows (the window is a
    per-layer traced value; splash takes a static one) or `seq_len` is not a multiple of 128 (its
    smallest block), where it is XLA. "cpu_ffi": the optional native kernel on the CPU when the compute
    dtype is float32 and the model has neither soft-capping nor sliding windows (the kernel's mask is
    causal and by segment only); otherwise what None chooses. Soft-capped scores (`attn_softcap`) need
    blockwise or splash.
    """
    impl, softcap = config.attention_impl, config.attn_softcap is not None
    if impl == "cpu_ffi":
        native = jnp.dtype(config.dtype) == jnp.float32 and config.sliding_window is None
        if platform == "cpu" and native and not softcap:
            return "cpu_ffi"
        impl = None
    if impl == "auto":
        if platform == "tpu" and config.sliding_window is None and seq_len % 128 == 0:
            return "splash"
        if platform == "gpu" and jnp.dtype(config.dtype) == jnp.bfloat16 and not softcap:
            return "cudnn"
        impl = None if platform == "cpu" else "xla"
    if softcap or (impl is None and platform == "cpu"):
        return "blockwise"
    return impl or "xla"


def _splash_block(T: int) -> int:
    """The largest of 512, 256, 128 that divides T."""
    return next(b for b in (512, 256, 128) if T % b == 0)


def splash_attention(
    q_BTHK, k_BTGK, v_BTGK, segment_ids_BT, *, scale: float, softcap=None, mesh=None,
    rules=sharding.LOGICAL_RULES, interpret: bool = False,
):  # fmt: skip
    """Causal grouped-query attention through the Pallas TPU splash-attention kernel.

    out[b, t, h] = Σ_s softmax_s(cap(scale · q[b, t, h] · k[b, s, g(h)])) v[b, s, g(h)] over s ≤ t with
    segment_ids[b, s] == segment_ids[b, t] (packed sequences; padding, id 0, attends among itself as in
    the masked reference), g(h) = h // (H / G), cap(x) = softcap · tanh(x / softcap) when `softcap` is
    set. Each kv head's H/G query heads go through the kernel's multi-query form; rows by vmap. Under a
    mesh the kernel runs per shard (`jax.shard_map`): rows split over the logical `batch` axes, heads
    and kv heads over `heads`/`kv_heads` (these must map to the same mesh axes, so each shard holds whole
    groups). T must be a multiple of 128. `interpret=True` runs the kernel in Pallas' interpreter (any
    platform; the tests compare it with `jax.nn.dot_product_attention`, forward and gradient).

    Args:
      q_BTHK, k_BTGK, v_BTGK: queries, keys, values (tokens-major, as `Attention` computes them).
      segment_ids_BT: int segment ids, or None for one sequence per row.
      scale: the score scale (the kernel itself does not scale: queries are multiplied first).
      softcap: tanh soft-capping of the scores (Gemma 2), or None.
      mesh, rules: the mesh and logical rules the inputs are sharded by, or mesh None.
      interpret: run in Pallas' interpreter.

    Returns:
      [B, T, H, K] outputs.
    """
    from jax.experimental.pallas.ops.tpu.splash_attention import splash_attention_kernel as sk
    from jax.experimental.pallas.ops.tpu.splash_attention import splash_attention_mask as sm

    B, T, H, K = q_BTHK.shape
    if T % 128:
        raise ValueError(f"splash_attention needs a sequence length that is a multiple of 128, got {T}")
    if segment_ids_BT is None:
        segment_ids_BT = jnp.ones((B, T), jnp.int32)
    segment_ids_BT = segment_ids_BT.astype(jnp.int32)

    def local(q_BTHK, k_BTGK, v_BTGK, seg_BT):
        b, h, g = q_BTHK.shape[0], q_BTHK.shape[2], k_BTGK.shape[2]
        Q = h // g
        blk = _splash_block(T)
        blocks = sk.BlockSizes(
            block_q=blk, block_kv=blk, block_kv_compute=blk, block_q_dkv=blk, block_kv_dkv=blk,
            block_kv_dkv_compute=blk, block_q_dq=blk, block_kv_dq=blk,
        )  # fmt: skip
        mask = sm.MultiHeadMask([sm.CausalMask((T, T)) for _ in range(Q)])
        kernel = sk.make_splash_mqa(
            mask, block_sizes=blocks, head_shards=1, q_seq_shards=1, attn_logits_soft_cap=softcap,
            interpret=interpret,
        )  # fmt: skip
        q_BGQTK = (q_BTHK * jnp.asarray(scale, q_BTHK.dtype)).reshape(b, T, g, Q, K).transpose(0, 2, 3, 1, 4)
        k_BGTK, v_BGTK = k_BTGK.transpose(0, 2, 1, 3), v_BTGK.transpose(0, 2, 1, 3)

        def row(q_GQTK, k_GTK, v_GTK, seg_T):
            ids = sk.SegmentIds(q=seg_T, kv=seg_T)
            return jax.vmap(lambda q, k, v: kernel(q, k, v, segment_ids=ids))(q_GQTK, k_GTK, v_GTK)

        out_BGQTK = jax.vmap(row)(q_BGQTK, k_BGTK, v_BGTK, seg_BT)
        return out_BGQTK.transpose(0, 3, 1, 2, 4).reshape(b, T, h, K).astype(q_BTHK.dtype)

    if mesh is None:
        return local(q_BTHK, k_BTGK, v_BTGK, segment_ids_BT)
    return _per_shard(local, mesh, rules, "splash_attention")(q_BTHK, k_BTGK, v_BTGK, segment_ids_BT)


def _per_shard(local, mesh: Mesh, rules, name: str):
    """`local(q_BTHK, k_BTGK, v_BTGK, segment_ids_BT) -> out_BTHK` run per shard of `mesh`
    (`jax.shard_map`): rows split over the logical `batch` axes, heads and kv heads over `heads`/`kv_heads`,
    which must map to the same mesh axes so that each shard holds whole groups of query heads."""
    q_spec = sharding.logical_to_spec(("batch", None, "heads", None), rules)
    kv_spec = sharding.logical_to_spec(("batch", None, "kv_heads", None), rules)
    if q_spec[2] != kv_spec[2]:
        raise ValueError(
            f"{name}: heads are split over {q_spec[2]} but kv heads over {kv_spec[2]}; they must "
            "map to the same mesh axes"
        )
    seg_spec = sharding.logical_to_spec(("batch", None), rules)
    return jax.shard_map(
        local, mesh=mesh, in_specs=(q_spec, kv_spec, kv_spec, seg_spec), out_specs=q_spec, check_vma=False
    )


def cpu_ffi_attention(
    q_BTHK, k_BTGK, v_BTGK, segment_ids_BT, *, scale: float, mesh=None, rules=sharding.LOGICAL_RULES
):
    """Causal grouped-query attention through the native XLA:CPU kernel (`rlhf_jax.kernels.cpu_attention`,
    built by `python -m rlhf_jax.kernels.build`), forward and backward.

    out[b, t, h] = Σ_s softmax_s(scale · q[b, t, h] · k[b, s, g(h)]) v[b, s, g(h)] over s ≤ t with
    segment_ids[b, s] == segment_ids[b, t] (padding, id 0, attends among itself, as the mask
    `causal_attention` gets from `transformer` does), g(h) = h // (H / G); float32, no soft-capping.
    Under a mesh of more than one device the kernel runs per shard (`jax.shard_map`, split as for
    `splash_attention`); the FFI call itself knows nothing of shardings.

    Args:
      q_BTHK, k_BTGK, v_BTGK: float32 queries, keys, values (tokens-major, as `Attention` computes them).
      segment_ids_BT: int segment ids, or None for one sequence per row.
      scale: the score scale.
      mesh, rules: the mesh and logical rules the inputs are sharded by, or mesh None.

    Returns:
      float32 [B, T, H, K] outputs.

    Raises:
      ValueError: the kernel's library is not built (the message names the build command).
    """
    from rlhf_jax.kernels import cpu_attention  # optional: imported only by models that ask for it

    B, T = q_BTHK.shape[:2]
    if segment_ids_BT is None:
        segment_ids_BT = jnp.ones((B, T), jnp.int32)
    local = functools.partial(cpu_attention.attention, scale=scale)
    if mesh is None or mesh.size == 1:
        return local(q_BTHK, k_BTGK, v_BTGK, segment_ids_BT)
    cpu_attention.require()  # fail here, at trace time, rather than inside the shard_map's trace
    return _per_shard(local, mesh, rules, "cpu_ffi_attention")(q_BTHK, k_BTGK, v_BTGK, segment_ids_BT)


class Attention(nn.Module):
    """Grouped-query self-attention through `jax.nn.dot_product_attention`.

    Without a cache the mask is causal (`is_causal=True`) and-ed with `mask_B1TS` (same segment); when
    compiling for the CPU (`target_platform`) with `attention_impl=None` that is `causal_attention`,
    faster there than JAX's (`attention_kernel` chooses; "cpu_ffi" takes the optional native kernel,
    `cpu_ffi_attention`). With a cache (`kv` = this layer's [B, G, S, K] key/value buffers) the new
    keys/values are written at `start_B` and the queries attend over the whole buffer under
    `mask_B1TS` (slot <= query position), through `_cached_attention` (`attention_impl` applies to the
    uncached forward only).

    With `qk_norm`, queries and keys pass through RMSNorms over the head dimension (scales `q_norm`,
    `k_norm` [K]) before RoPE (Qwen3, Gemma 3); scores are scaled by query_pre_attn_scalar^-1/2 when
    that is set, and soft-capped with `attn_softcap` (then always through `causal_attention`).
    """

    config: ModelConfig
    mesh: Mesh | None = None  # its devices' platform chooses the kernel (`target_platform`)
    rules: tuple = sharding.LOGICAL_RULES  # how the splash kernel's inputs are split (`splash_attention`)

    @nn.compact
    def __call__(self, x_BTD, rope_BTk, mask_B1TS, kv=None, start_B=None, segment_ids_BT=None):
        c = self.config
        dtype, pdtype = jnp.dtype(c.dtype), jnp.dtype(c.param_dtype)
        D, H, G, K = c.d_model, c.num_heads, c.num_kv_heads, c.head_dim

        def param(name, axes, shape, init):
            return self.param(name, nn.with_logical_partitioning(init, axes), shape, pdtype).astype(dtype)

        w_q = param("q_kernel", ("embed", "heads", "head_dim"), (D, H, K), fan_in(0, (1, 2)))
        w_k = param("k_kernel", ("embed", "kv_heads", "head_dim"), (D, G, K), fan_in(0, (1, 2)))
        w_v = param("v_kernel", ("embed", "kv_heads", "head_dim"), (D, G, K), fan_in(0, (1, 2)))
        w_o = param("o_kernel", ("heads", "head_dim", "embed"), (H, K, D), fan_in((0, 1), 2))
        # Projections as 2-D matmuls over the flattened rows (B·T, D), as in `MLP`: with [B, T, *]
        # operands XLA:CPU transposes activations for the weight gradients.
        B, T, _ = x_BTD.shape
        x_RD = x_BTD.reshape(B * T, D)
        q_BTHK = _plus(jnp.dot(x_RD, w_q.reshape(D, H * K)), lora_delta(self, "q_kernel", x_RD, 0))
        k_BTGK = _plus(jnp.dot(x_RD, w_k.reshape(D, G * K)), lora_delta(self, "k_kernel", x_RD, 1))
        v_BTGK = _plus(jnp.dot(x_RD, w_v.reshape(D, G * K)), lora_delta(self, "v_kernel", x_RD, 2))
        q_BTHK, k_BTGK = q_BTHK.reshape(B, T, H, K), k_BTGK.reshape(B, T, G, K)
        v_BTGK = v_BTGK.reshape(B, T, G, K)
        if c.attention_bias:
            zeros = nn.initializers.zeros
            q_BTHK += param("q_bias", ("heads", "head_dim"), (H, K), zeros)[None, None]
            k_BTGK += param("k_bias", ("kv_heads", "head_dim"), (G, K), zeros)[None, None]
            v_BTGK += param("v_bias", ("kv_heads", "head_dim"), (G, K), zeros)[None, None]
        if c.qk_norm:
            q_BTHK = RMSNorm(c, name="q_norm")(q_BTHK)
            k_BTGK = RMSNorm(c, name="k_norm")(k_BTGK)
        q_BTHK, k_BTGK = rope(q_BTHK, *rope_BTk), rope(k_BTGK, *rope_BTk)

        scale = K**-0.5 if c.query_pre_attn_scalar is None else float(c.query_pre_attn_scalar) ** -0.5
        kernel = None if kv is not None else attention_kernel(c, target_platform(self.mesh), T)
        if kernel == "blockwise":
            block = attention_block(q_BTHK.shape[1])
            out_BTHK = causal_attention(q_BTHK, k_BTGK, v_BTGK, mask_B1TS, block, scale, c.attn_softcap)
        elif kernel == "cpu_ffi":
            if segment_ids_BT is None and mask_B1TS is not None:
                raise ValueError(
                    "attention_impl='cpu_ffi' takes segment ids, not a mask; this forward has a mask "
                    "without them"
                )
            out_BTHK = cpu_ffi_attention(
                q_BTHK, k_BTGK, v_BTGK, segment_ids_BT, scale=scale, mesh=self.mesh, rules=self.rules
            )
        elif kernel == "splash":
            out_BTHK = splash_attention(
                q_BTHK, k_BTGK, v_BTGK, segment_ids_BT, scale=scale, softcap=c.attn_softcap, mesh=self.mesh,
                rules=self.rules,
            )  # fmt: skip
        elif kernel is not None:
            out_BTHK = jax.nn.dot_product_attention(
                q_BTHK, k_BTGK, v_BTGK, mask=mask_B1TS, scale=scale, is_causal=True, implementation=kernel
            )
        else:
            k_BGSK, v_BGSK = _write(kv[0], k_BTGK, start_B), _write(kv[1], v_BTGK, start_B)
            if decode_kernel(c, target_platform(self.mesh)) == "bounded":
                prefix = None
                if len(kv) == 4:  # the prefix's filled slots: the columns some query may attend to
                    R = kv[2].shape[-2]
                    any_R = jnp.any(mask_B1TS[..., :R], axis=(0, 1, 2))
                    prefix = (kv[2], kv[3], jnp.max(jnp.where(any_R, jnp.arange(1, R + 1), 0)))
                num_slots = jnp.max(start_B) + T  # row b's slots up to start_B[b] + T are filled
                out_BTHK = bounded_cached_attention(
                    q_BTHK, k_BGSK, v_BGSK, mask_B1TS, num_slots, scale, c.attn_softcap, prefix,
                    chunk=_DECODE_CHUNK,
                )  # fmt: skip
                kv = (k_BGSK, v_BGSK) + tuple(kv[2:])
            elif len(kv) == 4:  # + a prefix shared by groups of rows (`KVCache.prefix_k`): read only
                out_BTHK = _shared_prefix_attention(
                    q_BTHK, kv[2].astype(dtype), kv[3].astype(dtype), k_BGSK.astype(dtype),
                    v_BGSK.astype(dtype), mask_B1TS, scale, c.attn_softcap,
                )  # fmt: skip
                kv = (k_BGSK, v_BGSK, kv[2], kv[3])
            else:
                out_BTHK = _cached_attention(
                    q_BTHK, k_BGSK.astype(dtype), v_BGSK.astype(dtype), mask_B1TS, scale, c.attn_softcap
                )
                kv = (k_BGSK, v_BGSK)
        out_RI = out_BTHK.reshape(B * T, H * K)
        out_RD = _plus(jnp.dot(out_RI, w_o.reshape(H * K, D)), lora_delta(self, "o_kernel", out_RI, 3))
        return out_RD.reshape(B, T, D), kv


class MLP(nn.Module):
    """Gated MLP: down(act(gate(x)) * up(x)), SwiGLU (Shazeer 2020) or GeGLU."""

    config: ModelConfig

    @nn.compact
    def __call__(self, x_BTD):
        c = self.config
        dtype, pdtype = jnp.dtype(c.dtype), jnp.dtype(c.param_dtype)

        def param(name, axes, shape, init):
            return self.param(name, nn.with_logical_partitioning(init, axes), shape, pdtype).astype(dtype)

        w_gate = param("gate_kernel", ("embed", "mlp"), (c.d_model, c.mlp_dim), fan_in(0, 1))
        w_up = param("up_kernel", ("embed", "mlp"), (c.d_model, c.mlp_dim), fan_in(0, 1))
        w_down = param("down_kernel", ("mlp", "embed"), (c.mlp_dim, c.d_model), fan_in(0, 1))
        act = jax.nn.silu if c.mlp_activation == "silu" else lambda g: jax.nn.gelu(g, approximate=True)
        # The rows are flattened (R = B·T) so every matmul, and its weight gradient, is a plain 2-D one.
        # With [B, T, *] operands XLA:CPU writes the activation gradient transposed ([F, B·T]) for the
        # weight-gradient matmul, a strided copy (timed in bench/README.md); 2-D, it does not.
        B, T, D = x_BTD.shape
        x_RD = x_BTD.reshape(B * T, D)
        gate_RF = _plus(jnp.dot(x_RD, w_gate), lora_delta(self, "gate_kernel", x_RD, 4))
        h_RF = act(gate_RF) * _plus(jnp.dot(x_RD, w_up), lora_delta(self, "up_kernel", x_RD, 5))
        return _plus(jnp.dot(h_RF, w_down), lora_delta(self, "down_kernel", h_RF, 6)).reshape(B, T, D)


# A window no distance between positions reaches: the window of a full-attention layer.
NO_WINDOW = np.iinfo(np.int32).max


def layer_values(config: ModelConfig) -> dict[str, np.ndarray]:
    """What differs between layers, as arrays with a leading L axis (scanned with the layer stack):
    "window" int32 (the sliding window of a sliding layer, `NO_WINDOW` for a full one) when the model
    has a `sliding_window`, and "local" bool (the layer uses the local rotary table) when it has a
    `local_rope_theta`. Empty for a model whose layers are all alike."""
    sliding_L = np.asarray(sliding_layers(config), bool)
    out = {}
    if config.sliding_window is not None:
        out["window"] = np.where(sliding_L, config.sliding_window, NO_WINDOW).astype(np.int32)
    if config.local_rope_theta is not None:
        out["local"] = sliding_L
    return out


class Block(nn.Module):
    """Pre-norm decoder layer: x + attn(norm(x)), then + mlp(norm(x)); with `sandwich_norms`,
    x + post_attn_norm(attn(attn_norm(x))), then + post_mlp_norm(mlp(mlp_norm(x))) (Gemma 2/3).

    Its signature is scan-shaped: `(x_BTD, *broadcast inputs, kv, layer) -> (x_BTD, kv)`, where `kv` is
    this layer's (key, value) cache buffers or None, and `layer` this layer's entries of `layer_values`
    (scalars). `rope_BTk` is one (sin, cos) table, or {"global": ..., "local": ...} two of them of which
    `layer["local"]` picks one; `dist_B1TS` (query position - key position, or None) is compared with
    `layer["window"]` to mask keys outside a sliding window. `segment_ids_BT` (the ids `mask_B1TS` came
    from, or None) reaches kernels that take ids instead of a mask (`attention_kernel`).
    """

    config: ModelConfig
    mesh: Mesh | None = None
    rules: tuple = sharding.LOGICAL_RULES

    @nn.compact
    def __call__(
        self, x_BTD, rope_BTk, mask_B1TS, start_B, kv, dist_B1TS=None, layer=None, segment_ids_BT=None
    ):
        c = self.config
        act_axes = ("batch", "length", "act_embed")
        x_BTD = sharding.constrain(x_BTD, self.mesh, act_axes, self.rules)
        if isinstance(rope_BTk, dict):  # a value select, not a branch: the same program for every layer
            pick = lambda glob, loc: jnp.where(layer["local"], loc, glob)
            rope_BTk = jax.tree.map(pick, rope_BTk["global"], rope_BTk["local"])
        if dist_B1TS is not None:
            in_window_B1TS = dist_B1TS < layer["window"]
            mask_B1TS = in_window_B1TS if mask_B1TS is None else mask_B1TS & in_window_B1TS
        h_BTD, kv = Attention(c, self.mesh, self.rules, name="attn")(
            RMSNorm(c, name="attn_norm")(x_BTD), rope_BTk, mask_B1TS, kv, start_B, segment_ids_BT
        )
        if c.sandwich_norms:
            h_BTD = RMSNorm(c, name="post_attn_norm")(h_BTD)
        x_BTD = x_BTD + h_BTD
        h_BTD = MLP(c, name="mlp")(RMSNorm(c, name="mlp_norm")(x_BTD))
        if c.sandwich_norms:
            h_BTD = RMSNorm(c, name="post_mlp_norm")(h_BTD)
        x_BTD = x_BTD + h_BTD
        return sharding.constrain(x_BTD, self.mesh, act_axes, self.rules), kv
