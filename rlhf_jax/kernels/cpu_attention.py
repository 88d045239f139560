"""Causal grouped-query attention on XLA:CPU through the native kernel of `cpu_attention.cc` (XLA FFI).

The maths of `layers.causal_attention` with the mask built from segment ids (query t sees key s when
s <= t and segment_ids[t] == segment_ids[s]; padding, id 0, attends among itself), float32 only and
without soft-capping:

    lse_t = log Σ_{s visible} exp(scale · q_t · k_s),   out_t = Σ_s exp(scale · q_t · k_s - lse_t) v_s

with a FlashAttention-2 forward (Dao 2023: online softmax over key blocks, the log-sum-exp kept) and a
recomputing backward (delta = rowsum(dO ∘ O), dS = P ∘ (dP - delta)) as its `jax.custom_vjp`. The
library is optional: `python -m rlhf_jax.kernels.build` compiles it (`rlhf_jax.kernels.build`), and
`available()` says whether it is built and registered. `RLHF_JAX_KERNELS_THREADS` sets the threads per
call (default: every core).
"""

import ctypes
import functools
import os

import jax
import jax.numpy as jnp
import numpy as np

from rlhf_jax.kernels import build

_FWD, _BWD = "rlhf_jax_cpu_attention_fwd", "rlhf_jax_cpu_attention_bwd"
_registered: dict[str, bool] = {}  # library path -> loaded and registered


def available() -> bool:
    """Whether the library of this source and jaxlib is built, loads, and is registered with XLA:CPU."""
    path = build.library_path()
    if path in _registered:
        return _registered[path]
    if not os.path.exists(path):
        return False  # not cached: a later build makes it available in this process
    try:
        lib = ctypes.cdll.LoadLibrary(path)
        jax.ffi.register_ffi_target(_FWD, jax.ffi.pycapsule(lib.RlhfJaxCpuAttentionFwd), platform="cpu")
        jax.ffi.register_ffi_target(_BWD, jax.ffi.pycapsule(lib.RlhfJaxCpuAttentionBwd), platform="cpu")
        _registered[path] = True
    except (OSError, AttributeError):
        _registered[path] = False
    return _registered[path]


def require() -> None:
    """Raises a ValueError naming the build command unless the library is `available()`."""
    if not available():
        raise ValueError(
            "attention_impl='cpu_ffi' needs the native CPU attention kernel: build it with "
            f"`python -m rlhf_jax.kernels.build` (expected at {build.library_path()})"
        )


def _threads() -> np.int64:
    return np.int64(int(os.environ.get("RLHF_JAX_KERNELS_THREADS", "0")))


def attention(q_BTHK, k_BTGK, v_BTGK, segment_ids_BT, scale: float):
    """Causal grouped-query attention through the native kernel (module docstring).

    Args:
      q_BTHK: float32 queries (H = G·Q heads).
      k_BTGK, v_BTGK: float32 keys and values.
      segment_ids_BT: int segment ids (0 = padding), or None for one sequence per row.
      scale: the score scale.

    Returns:
      float32 [B, T, H, K] attention output.

    Raises:
      ValueError: the library is not built (`python -m rlhf_jax.kernels.build`), or an input is not float32.
    """
    require()
    dtypes = {x.dtype for x in (q_BTHK, k_BTGK, v_BTGK)}
    if dtypes != {jnp.dtype(jnp.float32)}:
        raise ValueError(f"the CPU attention kernel takes float32 only, got {sorted(map(str, dtypes))}")
    B, T = q_BTHK.shape[:2]
    if segment_ids_BT is None:
        segment_ids_BT = jnp.ones((B, T), jnp.int32)
    return _attention(q_BTHK, k_BTGK, v_BTGK, segment_ids_BT.astype(jnp.int32), float(scale))


def _forward_call(q_BTHK, k_BTGK, v_BTGK, segment_ids_BT, scale):
    B, T, H, _ = q_BTHK.shape
    out_types = (jax.ShapeDtypeStruct((B, T, H, q_BTHK.shape[3]), jnp.float32),
                 jax.ShapeDtypeStruct((B, H, T), jnp.float32))  # fmt: skip
    call = jax.ffi.ffi_call(_FWD, out_types, vmap_method="sequential")
    return call(q_BTHK, k_BTGK, v_BTGK, segment_ids_BT, scale=np.float32(scale), num_threads=_threads())


@functools.partial(jax.custom_vjp, nondiff_argnums=(4,))
def _attention(q_BTHK, k_BTGK, v_BTGK, segment_ids_BT, scale):
    return _forward_call(q_BTHK, k_BTGK, v_BTGK, segment_ids_BT, scale)[0]


def _attention_fwd(q_BTHK, k_BTGK, v_BTGK, segment_ids_BT, scale):
    out_BTHK, lse_BHT = _forward_call(q_BTHK, k_BTGK, v_BTGK, segment_ids_BT, scale)
    return out_BTHK, (q_BTHK, k_BTGK, v_BTGK, segment_ids_BT, out_BTHK, lse_BHT)


def _attention_bwd(scale, residuals, d_out_BTHK):
    q_BTHK, k_BTGK, v_BTGK, segment_ids_BT, out_BTHK, lse_BHT = residuals
    out_types = tuple(jax.ShapeDtypeStruct(x.shape, jnp.float32) for x in (q_BTHK, k_BTGK, v_BTGK))
    call = jax.ffi.ffi_call(_BWD, out_types, vmap_method="sequential")
    dq, dk, dv = call(
        q_BTHK, k_BTGK, v_BTGK, segment_ids_BT, out_BTHK, lse_BHT, d_out_BTHK.astype(jnp.float32),
        scale=np.float32(scale), num_threads=_threads(),
    )  # fmt: skip
    return dq, dk, dv, None


_attention.defvjp(_attention_fwd, _attention_bwd)
