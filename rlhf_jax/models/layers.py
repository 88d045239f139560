"""The pieces of one decoder layer: RMSNorm, rotary embeddings, grouped-query attention, gated MLP.

Every parameter is declared with its logical axes (`nn.with_logical_partitioning`); `rlhf_jax.sharding`
maps them to the mesh. Weights are stored in `param_dtype` and cast to the compute dtype at use.
"""

import jax
import jax.numpy as jnp
from flax import linen as nn
from jax.sharding import Mesh

from rlhf_jax import sharding
from rlhf_jax.models.config import ModelConfig


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
        return (x32_BTD * inv_rms_BT1 * scale_D.astype(jnp.float32)).astype(self.config.dtype)


def rope_tables(positions_BT: jax.Array, head_dim: int, theta: float) -> tuple[jax.Array, jax.Array]:
    """float32 (sin_BTk, cos_BTk), k = head_dim / 2, of the rotary angles positions * theta^(-2i/K).

    Computed once per forward and shared by every layer.
    """
    half = head_dim // 2
    inv_freq_k = theta ** (-jnp.arange(half, dtype=jnp.float32) / half)
    angle_BTk = positions_BT[..., None].astype(jnp.float32) * inv_freq_k
    return jnp.sin(angle_BTk), jnp.cos(angle_BTk)


def rope(x_BTNK: jax.Array, sin_BTk: jax.Array, cos_BTk: jax.Array) -> jax.Array:
    """Rotary position embedding (Su et al. 2021), in the rotate-half layout of Llama/Gemma/Qwen2 checkpoints.

    Rotates the pair (i, i + K/2) of every head by the angle of frequency i.
    """
    sin_BT1k, cos_BT1k = sin_BTk[:, :, None], cos_BTk[:, :, None]
    x1, x2 = jnp.split(x_BTNK.astype(jnp.float32), 2, axis=-1)
    out = jnp.concatenate([x1 * cos_BT1k - x2 * sin_BT1k, x2 * cos_BT1k + x1 * sin_BT1k], axis=-1)
    return out.astype(x_BTNK.dtype)


def _write(cache_BGSK: jax.Array, new_BTGK: jax.Array, start_B: jax.Array) -> jax.Array:
    """Writes each row's T new entries into its [G, S, K] cache at slot start_B[b]."""
    new_BGTK = jnp.swapaxes(new_BTGK, 1, 2).astype(cache_BGSK.dtype)
    write_row = lambda c, n, s: jax.lax.dynamic_update_slice_in_dim(c, n, s, axis=1)
    return jax.vmap(write_row)(cache_BGSK, new_BGTK, start_B)


def _cached_attention(q_BTHK: jax.Array, k_BGSK: jax.Array, v_BGSK: jax.Array, mask_B1TS: jax.Array):
    """Grouped-query attention of T queries over a cache laid out [B, G, S, K] (float32 softmax).

    The same maths as `jax.nn.dot_product_attention`, on the cache's own layout: each (row, kv head) is
    one contiguous [S, K] matrix, so the score and value matmuls read the cache without transposing it
    (on CPU, that transpose cost more than the rest of a decode step).
    """
    B, T, H, K = q_BTHK.shape
    G = k_BGSK.shape[1]
    q_BTGRK = q_BTHK.reshape(B, T, G, H // G, K)  # R: query heads per kv head
    scores_BGRTS = jnp.einsum("BTGRK,BGSK->BGRTS", q_BTGRK, k_BGSK, preferred_element_type=jnp.float32)
    scores_BGRTS = jnp.where(mask_B1TS[:, :, None], scores_BGRTS * K**-0.5, jnp.finfo(jnp.float32).min)
    probs_BGRTS = jax.nn.softmax(scores_BGRTS, axis=-1).astype(v_BGSK.dtype)
    out_BTGRK = jnp.einsum("BGRTS,BGSK->BTGRK", probs_BGRTS, v_BGSK)
    return out_BTGRK.reshape(B, T, H, K)


class Attention(nn.Module):
    """Grouped-query self-attention through `jax.nn.dot_product_attention`.

    Without a cache the mask is causal (`is_causal=True`) and-ed with `mask_B1TS` (same segment). With a
    cache (`kv` = this layer's [B, G, S, K] key/value buffers) the new keys/values are written at
    `start_B` and the queries attend over the whole buffer under `mask_B1TS` (slot <= query position),
    through `_cached_attention` (`attention_impl` applies to the uncached forward only).
    """

    config: ModelConfig

    @nn.compact
    def __call__(self, x_BTD, rope_BTk, mask_B1TS, kv=None, start_B=None):
        c = self.config
        dtype, pdtype = jnp.dtype(c.dtype), jnp.dtype(c.param_dtype)
        D, H, G, K = c.d_model, c.num_heads, c.num_kv_heads, c.head_dim

        def param(name, axes, shape, init):
            return self.param(name, nn.with_logical_partitioning(init, axes), shape, pdtype).astype(dtype)

        w_q = param("q_kernel", ("embed", "heads", "head_dim"), (D, H, K), fan_in(0, (1, 2)))
        w_k = param("k_kernel", ("embed", "kv_heads", "head_dim"), (D, G, K), fan_in(0, (1, 2)))
        w_v = param("v_kernel", ("embed", "kv_heads", "head_dim"), (D, G, K), fan_in(0, (1, 2)))
        w_o = param("o_kernel", ("heads", "head_dim", "embed"), (H, K, D), fan_in((0, 1), 2))
        q_BTHK = jnp.einsum("BTD,DHK->BTHK", x_BTD, w_q)
        k_BTGK = jnp.einsum("BTD,DGK->BTGK", x_BTD, w_k)
        v_BTGK = jnp.einsum("BTD,DGK->BTGK", x_BTD, w_v)
        if c.attention_bias:
            zeros = nn.initializers.zeros
            q_BTHK += param("q_bias", ("heads", "head_dim"), (H, K), zeros)
            k_BTGK += param("k_bias", ("kv_heads", "head_dim"), (G, K), zeros)
            v_BTGK += param("v_bias", ("kv_heads", "head_dim"), (G, K), zeros)
        q_BTHK, k_BTGK = rope(q_BTHK, *rope_BTk), rope(k_BTGK, *rope_BTk)

        if kv is None:
            out_BTHK = jax.nn.dot_product_attention(
                q_BTHK, k_BTGK, v_BTGK, mask=mask_B1TS, is_causal=True, implementation=c.attention_impl
            )
        else:
            k_BGSK, v_BGSK = _write(kv[0], k_BTGK, start_B), _write(kv[1], v_BTGK, start_B)
            kv = (k_BGSK, v_BGSK)
            out_BTHK = _cached_attention(q_BTHK, k_BGSK.astype(dtype), v_BGSK.astype(dtype), mask_B1TS)
        return jnp.einsum("BTHK,HKD->BTD", out_BTHK, w_o), kv


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
        gate_BTF = jnp.einsum("BTD,DF->BTF", x_BTD, w_gate)
        up_BTF = jnp.einsum("BTD,DF->BTF", x_BTD, w_up)
        act = jax.nn.silu if c.mlp_activation == "silu" else lambda g: jax.nn.gelu(g, approximate=True)
        return jnp.einsum("BTF,FD->BTD", act(gate_BTF) * up_BTF, w_down)


class Block(nn.Module):
    """Pre-norm decoder layer: x + attn(norm(x)), then + mlp(norm(x)).

    Its signature is scan-shaped: `(x_BTD, *broadcast inputs, kv) -> (x_BTD, kv)`, where `kv` is this
    layer's (key, value) cache buffers or None.
    """

    config: ModelConfig
    mesh: Mesh | None = None
    rules: tuple = sharding.LOGICAL_RULES

    @nn.compact
    def __call__(self, x_BTD, rope_BTk, mask_B1TS, start_B, kv):
        act_axes = ("batch", "length", "act_embed")
        x_BTD = sharding.constrain(x_BTD, self.mesh, act_axes, self.rules)
        h_BTD, kv = Attention(self.config, name="attn")(
            RMSNorm(self.config, name="attn_norm")(x_BTD), rope_BTk, mask_B1TS, kv, start_B
        )
        x_BTD = x_BTD + h_BTD
        x_BTD = x_BTD + MLP(self.config, name="mlp")(RMSNorm(self.config, name="mlp_norm")(x_BTD))
        return sharding.constrain(x_BTD, self.mesh, act_axes, self.rules), kv
