"""Per-token and per-sequence log-probabilities from logits, in float32 without a float32 [B,T,V] copy.

The log-softmax over a large vocabulary is the biggest activation of a language-model step. Written
naively (`jax.nn.log_softmax(logits.astype(float32))`) it materialises a float32 [B,T,V] array in the
forward pass and another in the backward pass; some XLA backends (XLA:CPU with its YNNPACK fusions)
do so even for a fused max/sum formulation. Here the rows (B·T) are processed in chunks under
`lax.map` with a custom VJP, so float32 temporaries are bounded by one [chunk, V] block, and the
backward pass writes the logits' gradient directly in the logits' dtype.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

from rlhf_jax.losses._common import Array

# Float32 elements per chunk of rows (4 MiB): large enough to keep the vector units busy, small
# enough to stay in cache-friendly territory on CPU and far below accelerator memory.
_CHUNK_ELEMENTS = 1 << 20


def _chunk_rows(num_rows: int, vocab: int) -> int:
    """Largest divisor of num_rows with at most _CHUNK_ELEMENTS // vocab rows (>= 1)."""
    limit = max(1, _CHUNK_ELEMENTS // max(vocab, 1))
    if num_rows <= limit:
        return num_rows
    for rows in range(limit, 0, -1):
        if num_rows % rows == 0:
            return rows
    return 1


def _lse_and_target(x_CV, t_C):
    # The barrier stops XLA from hoisting the float32 convert out of the loop onto the whole array.
    x_CV = jax.lax.optimization_barrier(x_CV)
    max_C1 = jnp.max(x_CV, axis=-1, keepdims=True).astype(jnp.float32)
    sumexp_C = jnp.sum(jnp.exp(x_CV.astype(jnp.float32) - max_C1), axis=-1)
    lse_C = max_C1[:, 0] + jnp.log(sumexp_C)
    target_C = jnp.take_along_axis(x_CV, t_C[:, None], axis=-1)[:, 0].astype(jnp.float32)
    return lse_C, target_C


@functools.partial(jax.custom_vjp, nondiff_argnums=(2,))
def _rows_logps(logits_RV, targets_R, chunk: int):
    return _rows_logps_fwd(logits_RV, targets_R, chunk)[0]


def _rows_logps_fwd(logits_RV, targets_R, chunk: int):
    num_rows, vocab = logits_RV.shape
    n = num_rows // chunk
    lse_nC, target_nC = jax.lax.map(
        lambda xs: _lse_and_target(*xs),
        (logits_RV.reshape(n, chunk, vocab), targets_R.reshape(n, chunk)),
    )
    lse_R = lse_nC.reshape(num_rows)
    return target_nC.reshape(num_rows) - lse_R, (logits_RV, targets_R, lse_R)


def _rows_logps_bwd(chunk: int, residuals, g_R):
    logits_RV, targets_R, lse_R = residuals
    num_rows, vocab = logits_RV.shape
    n = num_rows // chunk

    def grad_chunk(xs):
        x_CV, t_C, lse_C, g_C = xs
        x_CV = jax.lax.optimization_barrier(x_CV)
        p_CV = jnp.exp(x_CV.astype(jnp.float32) - lse_C[:, None])
        onehot_CV = jnp.arange(vocab, dtype=t_C.dtype)[None, :] == t_C[:, None]
        g_CV = (onehot_CV.astype(jnp.float32) - p_CV) * g_C[:, None]
        # Rows with zero cotangent (masked positions) get exactly 0, even where p is not finite.
        return jnp.where(g_C[:, None] != 0, g_CV, 0.0).astype(x_CV.dtype)

    g_nCV = jax.lax.map(
        grad_chunk,
        (
            logits_RV.reshape(n, chunk, vocab),
            targets_R.reshape(n, chunk),
            lse_R.reshape(n, chunk),
            g_R.astype(jnp.float32).reshape(n, chunk),
        ),
    )
    return g_nCV.reshape(num_rows, vocab), None


_rows_logps.defvjp(_rows_logps_fwd, _rows_logps_bwd)


def token_logps(*, logits, targets) -> Array:
    """Log-probability of each target token under the logits: log softmax(logits)[targets].

    Computed as logits[target] - logsumexp(logits), chunked over rows with a custom VJP (module
    docstring): neither the log-softmax nor a float32 copy of bfloat16 logits is materialised as a
    [B,T,V] array; the gradient is (onehot - softmax) · g, written in the logits' dtype.

    Args:
      logits: [B, T, V] (any float dtype); position t scores the token at t (already shifted).
      targets: [B, T] int token ids in [0, V).

    Returns:
      [B, T] float32 log-probs.
    """
    logits_BTV = logits
    b, t, v = logits_BTV.shape
    targets_R = targets.astype(jnp.int32).reshape(b * t)
    logps_R = _rows_logps(logits_BTV.reshape(b * t, v), targets_R, _chunk_rows(b * t, v))
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
