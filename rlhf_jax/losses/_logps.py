"""Per-token and per-sequence log-probabilities from logits, in float32 without a float32 [B,T,V] copy.

The log-softmax over a large vocabulary is the biggest activation of a language-model step. Written
naively (`jax.nn.log_softmax(logits.astype(float32))`) it materialises a float32 [B,T,V] array in the
forward pass and another in the backward pass; some XLA backends (XLA:CPU with its YNNPACK fusions)
do so even for a fused max/sum formulation. Here the rows (B·T) are processed in chunks under
`lax.map` with a custom VJP, so float32 temporaries are bounded by one [chunk, V] block, and the
backward pass writes the logits' gradient directly in the logits' dtype.

Shape letters (rlhf_jax/__init__.py): R the flattened rows B·T, C the rows of one chunk, I the chunks
(R = I·C).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

from rlhf_jax.losses._common import Array

# Float32 elements per chunk of rows (4 MiB): large enough to keep the vector units busy, small
# enough to stay in cache-friendly territory on CPU and far below accelerator memory.
_CHUNK_ELEMENTS = 1 << 20


def _chunk_rows(num_rows: int, vocab: int, shards: int = 1) -> int:
    """Largest divisor of num_rows with at most _CHUNK_ELEMENTS // vocab rows (>= 1), a multiple of
    `shards` when `shards` divides num_rows (so every chunk has the same rows on every shard)."""
    if shards < 1 or num_rows % shards:
        shards = 1
    limit = max(shards, _CHUNK_ELEMENTS // max(vocab, 1) // shards * shards)
    if num_rows <= limit:
        return num_rows
    for rows in range(limit, 0, -shards):
        if num_rows % rows == 0:
            return rows
    return shards


def _lse_and_target(x_CV, t_C):
    # The barrier stops XLA from hoisting the float32 convert out of the loop onto the whole array.
    x_CV = jax.lax.optimization_barrier(x_CV)
    max_C1 = jnp.max(x_CV, axis=-1, keepdims=True).astype(jnp.float32)
    sumexp_C = jnp.sum(jnp.exp(x_CV.astype(jnp.float32) - max_C1), axis=-1)
    lse_C = max_C1[:, 0] + jnp.log(sumexp_C)
    target_C = jnp.take_along_axis(x_CV, t_C[:, None], axis=-1)[:, 0].astype(jnp.float32)
    return lse_C, target_C


# Chunk i holds the strided rows i, i + I, i + 2I, ... (the [R, V] rows viewed as [C, I, V], sliced
# along I). With the rows split over devices (a batch sharded over `data x fsdp`), C is split the same
# way, so every chunk has C / shards rows on every device and the slice is along a local axis. Chunks of
# consecutive rows would each live on one device: under SPMD every step of the loop would all-gather the
# whole [R, V] logits (the TPU compiler showed it, `bench.tpu_plan`).


def _column(x_CI, i):
    return jax.lax.dynamic_index_in_dim(x_CI, i, axis=1, keepdims=False)


def _set_column(x_CI, col_C, i):
    return jax.lax.dynamic_update_index_in_dim(x_CI, col_C, i, axis=1)


@functools.partial(jax.custom_vjp, nondiff_argnums=(2,))
def _rows_logps(logits_RV, targets_R, chunk: int):
    return _rows_logps_fwd(logits_RV, targets_R, chunk)[0]


def _rows_logps_fwd(logits_RV, targets_R, chunk: int):
    num_rows, vocab = logits_RV.shape
    num_chunks = num_rows // chunk
    x_CIV, t_CI = logits_RV.reshape(chunk, num_chunks, vocab), targets_R.reshape(chunk, num_chunks)

    def body(i, carry):
        lse_CI, target_CI = carry
        lse_C, target_C = _lse_and_target(_column(x_CIV, i), _column(t_CI, i))
        return _set_column(lse_CI, lse_C, i), _set_column(target_CI, target_C, i)

    zeros_CI = jnp.zeros((chunk, num_chunks), jnp.float32)
    lse_CI, target_CI = jax.lax.fori_loop(0, num_chunks, body, (zeros_CI, zeros_CI))
    lse_R = lse_CI.reshape(num_rows)
    return target_CI.reshape(num_rows) - lse_R, (logits_RV, targets_R, lse_R)


def _rows_logps_bwd(chunk: int, residuals, g_R):
    logits_RV, targets_R, lse_R = residuals
    num_rows, vocab = logits_RV.shape
    num_chunks = num_rows // chunk
    x_CIV, t_CI = logits_RV.reshape(chunk, num_chunks, vocab), targets_R.reshape(chunk, num_chunks)
    lse_CI = lse_R.reshape(chunk, num_chunks)
    g_CI = g_R.astype(jnp.float32).reshape(chunk, num_chunks)

    def body(i, g_CIV):
        x_CV, t_C = jax.lax.optimization_barrier(_column(x_CIV, i)), _column(t_CI, i)
        lse_C, g_C = _column(lse_CI, i), _column(g_CI, i)
        p_CV = jnp.exp(x_CV.astype(jnp.float32) - lse_C[:, None])
        onehot_CV = jnp.arange(vocab, dtype=t_C.dtype)[None, :] == t_C[:, None]
        d_CV = (onehot_CV.astype(jnp.float32) - p_CV) * g_C[:, None]
        # Rows with zero cotangent (masked positions) get exactly 0, even where p is not finite.
        d_CV = jnp.where(g_C[:, None] != 0, d_CV, 0.0).astype(x_CV.dtype)
        return jax.lax.dynamic_update_index_in_dim(g_CIV, d_CV, i, axis=1)

    g_CIV = jax.lax.fori_loop(0, num_chunks, body, jnp.zeros_like(x_CIV))
    return g_CIV.reshape(num_rows, vocab), None


_rows_logps.defvjp(_rows_logps_fwd, _rows_logps_bwd)


def token_logps(*, logits, targets, shards: int = 1) -> Array:
    """Log-probability of each target token under the logits: log softmax(logits)[targets].

    Computed as logits[target] - logsumexp(logits), chunked over rows with a custom VJP (module
    docstring): neither the log-softmax nor a float32 copy of bfloat16 logits is materialised as a
    [B,T,V] array; the gradient is (onehot - softmax) · g, written in the logits' dtype.

    Args:
      logits: [B, T, V] (any float dtype); position t scores the token at t (already shifted).
      targets: [B, T] int token ids in [0, V).
      shards: how many devices the batch B is split over (`rlhf_jax.sharding.batch_shards(mesh)`); the
        chunks then take the same number of rows from each, so no device waits for another's rows and
        nothing is gathered. 1 (default): unsharded.

    Returns:
      [B, T] float32 log-probs.
    """
    logits_BTV = logits
    b, t, v = logits_BTV.shape
    targets_R = targets.astype(jnp.int32).reshape(b * t)
    logps_R = _rows_logps(logits_BTV.reshape(b * t, v), targets_R, _chunk_rows(b * t, v, shards))
    return logps_R.reshape(b, t)


def sequence_logps(*, logits, targets, mask) -> Array:
    """Summed log-probability of `targets` where `mask` is nonzero: Σ_t mask_t · log p(targets_t).

    Masked positions contribute exactly zero and receive exactly zero gradient (they are selected out
    with `where`, so the cotangent there is exactly 0).

    Args:
      logits: [B, T, V] (float32 or bfloat16); position t scores target t.
      targets: [B, T] int token ids.
      mask: [B, T], 1 (or True) on completion tokens, 0 elsewhere.

    Returns:
      [B] float32 summed log-probs (the `*_logps` inputs of every loss in `rlhf_jax.losses`).
    """
    logps_BT = token_logps(logits=logits, targets=targets)
    return jnp.sum(jnp.where(mask.astype(bool), logps_BT, 0.0), axis=-1)


# ----------------------------------------------------------------------------------------------------
# Log-probs straight from hidden states: the LM head fused in, only the masked rows computed.

# Float32 elements of one chunk's [rows, V] logits block. On CPU it should stay near the L2 cache; on
# accelerators larger chunks keep the matmuls big.
_HEAD_CHUNK_ELEMENTS = {"cpu": 1 << 21}
_HEAD_CHUNK_ELEMENTS_DEFAULT = 1 << 26


def _head_chunk_rows(vocab: int, platform: str | None = None) -> int:
    budget = _HEAD_CHUNK_ELEMENTS.get(platform or jax.default_backend(), _HEAD_CHUNK_ELEMENTS_DEFAULT)
    return max(8, budget // max(vocab, 1) // 8 * 8)


# Each batch shard (Z of them, one per device that holds part of the batch) compacts and chunks its
# own rows: a chunk is C masked-in rows of every shard, [Z, C, ...], so the gathers stay on the device
# that holds the rows. One global compaction would pull rows across devices at every chunk (the TPU
# compiler showed collective-permutes and all-reduces of whole [C, V] blocks, `bench.tpu_plan`).


def _head_chunk(h_ZRD, w_DV, t_ZR, order_ZR, num_valid_Z, i, chunk, softcap, temperature=1.0):
    """Row indices, validity, float32 logits (soft-capped with `softcap` if set, then divided by
    `temperature`) and their derivative d logits / d raw (1 - tanh² over the temperature; None when it
    is 1) of the i-th chunk of each shard's compacted rows."""
    pos_C = i * chunk + jnp.arange(chunk, dtype=jnp.int32)
    valid_ZC = pos_C[None, :] < num_valid_Z[:, None]
    idx_ZC = jax.lax.dynamic_slice_in_dim(order_ZR, i * chunk, chunk, axis=1)
    h_ZCD = jnp.take_along_axis(h_ZRD, idx_ZC[:, :, None], axis=1)
    logits_ZCV = jnp.einsum("ZCD,DV->ZCV", h_ZCD, w_DV, preferred_element_type=jnp.float32)
    dcap_ZCV = None
    if softcap is not None:
        tanh_ZCV = jnp.tanh(logits_ZCV / softcap)
        logits_ZCV, dcap_ZCV = softcap * tanh_ZCV, 1.0 - jnp.square(tanh_ZCV)
    if temperature != 1.0:
        logits_ZCV = logits_ZCV / temperature
        dcap_ZCV = (1.0 / temperature) if dcap_ZCV is None else dcap_ZCV / temperature
    t_ZC = jnp.take_along_axis(t_ZR, idx_ZC, axis=1)
    return idx_ZC, valid_ZC, h_ZCD, t_ZC, logits_ZCV, dcap_ZCV


def _head_lse_and_target(logits_ZCV, t_ZC):
    max_ZC1 = jnp.max(logits_ZCV, axis=-1, keepdims=True)
    lse_ZC = max_ZC1[..., 0] + jnp.log(jnp.sum(jnp.exp(logits_ZCV - max_ZC1), axis=-1))
    return lse_ZC, jnp.take_along_axis(logits_ZCV, t_ZC[..., None], axis=-1)[..., 0]


def _num_chunks(num_valid_Z, chunk):
    return (jnp.max(num_valid_Z) + chunk - 1) // chunk


def _scatter_add(x_ZR, idx_ZC, y_ZC):
    """x[z, idx[z, c]] += y[z, c] (rows of one shard)."""
    return jax.vmap(lambda x, i, y: x.at[i].add(y))(x_ZR, idx_ZC, y_ZC)


@functools.partial(jax.custom_vjp, nondiff_argnums=(5, 6, 7, 8))
def _head_logps(
    h_ZRD, w_DV, t_ZR, order_ZR, num_valid_Z, chunk: int, softcap, temperature=1.0, entropy=False
):
    """(per-row log-probs [Z, R], per-row entropy [Z, R], zeros unless `entropy`); the entropy carries
    no gradient."""
    return _head_logps_fwd(h_ZRD, w_DV, t_ZR, order_ZR, num_valid_Z, chunk, softcap, temperature, entropy)[0]


def _head_logps_fwd(
    h_ZRD, w_DV, t_ZR, order_ZR, num_valid_Z, chunk: int, softcap, temperature=1.0, entropy=False
):
    z, num_rows = t_ZR.shape
    # Padded so the last chunk's slice of `order_ZR` never runs off the end.
    order_ZR = jnp.pad(order_ZR, ((0, 0), (0, chunk)))

    def body(i, carry):
        logps_ZR, entropy_ZR, lse_ZR = carry
        idx_ZC, valid_ZC, _, t_ZC, logits_ZCV, _ = _head_chunk(
            h_ZRD, w_DV, t_ZR, order_ZR, num_valid_Z, i, chunk, softcap, temperature
        )
        lse_ZC, target_ZC = _head_lse_and_target(logits_ZCV, t_ZC)
        # Rows past a shard's `num_valid` (its last chunk's tail) point at masked rows, which stay 0.
        logps_ZR = _scatter_add(logps_ZR, idx_ZC, jnp.where(valid_ZC, target_ZC - lse_ZC, 0.0))
        if entropy:  # H = lse - Σ softmax · logits (the same chunk: no second pass over the vocabulary)
            entropy_ZC = lse_ZC - jnp.sum(jnp.exp(logits_ZCV - lse_ZC[..., None]) * logits_ZCV, axis=-1)
            entropy_ZR = _scatter_add(entropy_ZR, idx_ZC, jnp.where(valid_ZC, entropy_ZC, 0.0))
        return logps_ZR, entropy_ZR, jax.lax.dynamic_update_slice_in_dim(lse_ZR, lse_ZC, i * chunk, axis=1)

    zeros_ZR = jnp.zeros((z, num_rows + chunk), jnp.float32)
    init = (zeros_ZR[:, :num_rows], zeros_ZR[:, :num_rows], zeros_ZR)
    logps_ZR, entropy_ZR, lse_ZR = jax.lax.fori_loop(0, _num_chunks(num_valid_Z, chunk), body, init)
    return (logps_ZR, entropy_ZR), (h_ZRD, w_DV, t_ZR, order_ZR, num_valid_Z, lse_ZR)


def _head_logps_bwd(chunk: int, softcap, temperature, entropy, residuals, g):
    del entropy
    h_ZRD, w_DV, t_ZR, order_ZR, num_valid_Z, lse_ZR = residuals
    vocab = w_DV.shape[1]
    g_ZR = g[0].astype(jnp.float32)  # the entropy's cotangent is dropped: it is logged, not trained

    def body(i, carry):
        dh_ZRD, dw_DV = carry
        idx_ZC, valid_ZC, h_ZCD, t_ZC, logits_ZCV, dcap_ZCV = _head_chunk(
            h_ZRD, w_DV, t_ZR, order_ZR, num_valid_Z, i, chunk, softcap, temperature
        )
        lse_ZC = jax.lax.dynamic_slice_in_dim(lse_ZR, i * chunk, chunk, axis=1)
        g_ZC = jnp.where(valid_ZC, jnp.take_along_axis(g_ZR, idx_ZC, axis=1), 0.0)
        # d logp / d logits = onehot(target) - softmax. The cotangent g scales rows, so it is applied
        # to the [Z, C, D] operands rather than to the [Z, C, V] block. With a soft-cap,
        # d capped / d raw = 1 - tanh² scales it elementwise (chain rule).
        onehot_ZCV = jnp.arange(vocab, dtype=t_ZC.dtype)[None, None, :] == t_ZC[..., None]
        d_ZCV = onehot_ZCV.astype(jnp.float32) - jnp.exp(logits_ZCV - lse_ZC[..., None])
        if dcap_ZCV is not None:
            d_ZCV = d_ZCV * dcap_ZCV
        s_ZCV = jnp.where(valid_ZC[..., None], d_ZCV, 0.0).astype(h_ZCD.dtype)
        dh_ZCD = g_ZC[..., None] * jnp.einsum("ZCV,DV->ZCD", s_ZCV, w_DV, preferred_element_type=jnp.float32)
        hg_ZCD = h_ZCD * g_ZC[..., None].astype(h_ZCD.dtype)
        dw_DV = dw_DV + jnp.einsum("ZCD,ZCV->DV", hg_ZCD, s_ZCV, preferred_element_type=jnp.float32)
        dh_ZCD = jnp.where(valid_ZC[..., None], dh_ZCD, 0.0)
        return jax.vmap(lambda x, i, y: x.at[i].add(y))(dh_ZRD, idx_ZC, dh_ZCD), dw_DV

    zeros = (jnp.zeros(h_ZRD.shape, jnp.float32), jnp.zeros(w_DV.shape, jnp.float32))
    dh_ZRD, dw_DV = jax.lax.fori_loop(0, _num_chunks(num_valid_Z, chunk), body, zeros)
    return dh_ZRD.astype(h_ZRD.dtype), dw_DV.astype(w_DV.dtype), None, None, None


_head_logps.defvjp(_head_logps_fwd, _head_logps_bwd)


def sequence_logps_from_hidden(
    *,
    hidden,
    kernel,
    targets,
    mask,
    softcap: float | None = None,
    platform: str | None = None,
    shards: int = 1,
) -> Array:
    """`sequence_logps` of the logits `hidden @ kernel`, without materialising the logits.

    With `softcap` = c the logits are soft-capped first, z -> c·tanh(z / c) (Gemma 2's
    final_logit_softcapping; `Transformer.hidden_and_head(..., return_softcap=True)` returns the
    model's c), inside the same chunks, forward and backward.

    The LM head is fused into the log-softmax: the rows where `mask` is nonzero are gathered into
    chunks, and each chunk's [rows, V] logits live only inside one loop iteration (the backward pass
    recomputes them instead of storing them). Rows where `mask` is 0 (prompt and padding positions)
    cost nothing at all, neither in the LM head nor in the log-softmax.

    Args:
      hidden: [B, T, D] final-normed hidden states (float32 or bfloat16).
      kernel: [D, V] LM-head kernel, in the dtype of `hidden`.
      targets: [B, T] int token ids.
      mask: [B, T], 1 (or True) on completion tokens, 0 elsewhere.
      softcap: the logit soft-cap c, or None for none.
      platform: the platform compiled for ("cpu", "tpu", ...), which sizes the chunks; default
        `jax.default_backend()` (give the mesh's when compiling for other devices, e.g. a TPU from a CPU).
      shards: how many devices the batch B is split over (`rlhf_jax.sharding.batch_shards(mesh)`): each
        compacts and chunks its own rows, so no row crosses devices. 1 (default): one compaction.

    Returns:
      [B] float32 summed log-probs, equal to `sequence_logps(logits=hidden @ kernel, ...)` (of the
      soft-capped logits with `softcap`).
    """
    logps_BT = token_logps_from_hidden(
        hidden=hidden,
        kernel=kernel,
        targets=targets,
        mask=mask,
        softcap=softcap,
        platform=platform,
        shards=shards,
    )
    return jnp.sum(logps_BT, axis=-1)


def token_logps_from_hidden(
    *,
    hidden,
    kernel,
    targets,
    mask,
    temperature: float = 1.0,
    softcap: float | None = None,
    platform: str | None = None,
    shards: int = 1,
    return_entropy: bool = False,
):
    """Per-token log-probs of `targets` under softmax(cap(hidden @ kernel) / temperature) on the rows
    where `mask` is nonzero (0 elsewhere), without materialising the logits, as
    `sequence_logps_from_hidden` (same chunks, same custom backward; rows outside the mask cost
    nothing). The online RL losses need them per token (ratios, KL), at the sampling temperature.

    Args:
      hidden, kernel, targets, mask, softcap, platform, shards: as `sequence_logps_from_hidden`.
      temperature: τ > 0: the logits (after the soft-cap) are divided by it.
      return_entropy: also return each masked row's entropy of that distribution, −Σ p log p, computed
        from the same chunk of logits; it carries no gradient (a logged quantity).

    Returns:
      float32 [B, T] log-probs, or (log-probs, entropy) [B, T] each with `return_entropy`.
    """
    if not temperature > 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")
    b, t, d = hidden.shape
    z = shards if shards >= 1 and b % shards == 0 else 1
    mask_ZR = mask.reshape(z, b * t // z) != 0
    # Masked-in rows first, in order, within each shard; chunks past the last masked-in row are never run.
    order_ZR = jnp.argsort(~mask_ZR, axis=1, stable=True).astype(jnp.int32)
    num_valid_Z = jnp.sum(mask_ZR, axis=1, dtype=jnp.int32)
    logps_ZR, entropy_ZR = _head_logps(
        hidden.reshape(z, b * t // z, d),
        kernel,
        targets.astype(jnp.int32).reshape(z, b * t // z),
        order_ZR,
        num_valid_Z,
        _head_chunk_rows(kernel.shape[1], platform),
        None if softcap is None else float(softcap),
        float(temperature),
        return_entropy,
    )
    logps_BT = logps_ZR.reshape(b, t)
    return (logps_BT, jax.lax.stop_gradient(entropy_ZR.reshape(b, t))) if return_entropy else logps_BT
