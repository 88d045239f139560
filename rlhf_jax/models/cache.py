"""KV-cache inference: prefill a prompt batch, then decode one token at a time.

The cache is an explicit pytree (`KVCache`), so `prefill` and `decode_step` are pure, jittable functions
of (params, tokens, cache); the sampler threads it through its own state with donation.

Layout: prompts are *right*-padded, with their true lengths given. Row b's tokens occupy cache slots
0 .. lengths_B[b]-1 at positions 0, 1, ...; a query at position p attends to slots <= p. Slots beyond a
row's length hold stale entries (the prompt's padding) that no query can see and that decoding
overwrites, so rows of different lengths decode in lockstep without shifting. The caller keeps
`cache.lengths_B + new tokens <= cache size` (`dynamic_update_slice` would clamp, not fail).
"""

from typing import NamedTuple

import jax
import jax.numpy as jnp
from flax import linen as nn

from rlhf_jax import sharding
from rlhf_jax.models.config import ModelConfig


class KVCache(NamedTuple):
    """Keys and values of every layer, and how many slots of each row are filled.

    The buffers mirror the params' layout: one stacked array for a `scan_layers` model, a tuple of
    per-layer arrays for an unrolled one (each layer then updates its own buffer in place, the fast
    layout for a decode loop; `unstack_layers` converts the params).

    Attributes:
      k: keys, [layers, batch, kv heads, cache slots, head dim] (k_LBGSK), or a tuple of L [B, G, S, K].
      v: values, same layout.
      lengths_B: int32, filled slots per row; the next token of row b is written at slot lengths_B[b] and
        has position lengths_B[b].
    """

    k: jax.Array | tuple[jax.Array, ...]
    v: jax.Array | tuple[jax.Array, ...]
    lengths_B: jax.Array  # noqa: N815 (shape-suffixed names, see rlhf_jax/__init__.py)


_LAYER_AXES = ("batch", "kv_heads", "length", "head_dim")


def init_cache(config: ModelConfig, batch_size: int, max_len: int | None = None, dtype=None) -> KVCache:
    """An empty cache, stacked for a `scan_layers` model, per layer otherwise.

    Args:
      config: the model.
      batch_size: B.
      max_len: cache slots S (prompt + generated tokens); default `config.max_len`.
      dtype: storage dtype of keys and values; default the compute dtype.

    Returns:
      A KVCache of zeros with lengths 0.
    """
    shape = (batch_size, config.num_kv_heads, max_len or config.max_len, config.head_dim)
    dtype = jnp.dtype(dtype or config.dtype)
    if config.scan_layers:
        buffers = lambda: jnp.zeros((config.num_layers, *shape), dtype)
    else:
        buffers = lambda: tuple(jnp.zeros(shape, dtype) for _ in range(config.num_layers))
    return KVCache(buffers(), buffers(), jnp.zeros((batch_size,), jnp.int32))


def cache_shardings(mesh, rules=sharding.LOGICAL_RULES, config: ModelConfig | None = None) -> KVCache:
    """NamedShardings for a KVCache (batch over data x fsdp, kv heads over tensor).

    Args:
      mesh: the mesh.
      rules: the logical-axis rules.
      config: the model; its cache is per layer if it is unrolled. None: a stacked cache.

    Returns:
      A KVCache of NamedSharding.
    """
    lengths = sharding.logical_sharding(mesh, ("batch",), rules)
    if config is None or config.scan_layers:
        stacked = sharding.logical_sharding(mesh, ("layers", *_LAYER_AXES), rules)
        return KVCache(stacked, stacked, lengths)
    layer = (sharding.logical_sharding(mesh, _LAYER_AXES, rules),) * config.num_layers
    return KVCache(layer, layer, lengths)


def prefill(
    model: nn.Module, params, tokens_BT: jax.Array, lengths_B: jax.Array, cache: KVCache
) -> tuple[jax.Array, KVCache]:
    """Runs right-padded prompts through the model, filling the cache.

    Args:
      model: a `Transformer`.
      params: its parameters.
      tokens_BT: prompts, right-padded; T <= cache slots.
      lengths_B: true prompt lengths, each >= 1.
      cache: an empty cache (`init_cache`); a non-empty one is extended from its current lengths.

    Returns:
      (logits_BV, cache): float32 logits at each row's last prompt token (the next-token distribution),
      and the cache with lengths `cache.lengths_B + lengths_B`.
    """
    return model.apply({"params": params}, tokens_BT, lengths_B, cache, method="extend")


def decode_step(model: nn.Module, params, tokens_B: jax.Array, cache: KVCache) -> tuple[jax.Array, KVCache]:
    """Feeds one token per row and returns the next-token logits.

    Args:
      model: a `Transformer`.
      params: its parameters.
      tokens_B: the token at position `cache.lengths_B` of each row.
      cache: the cache after `prefill` (and earlier steps).

    Returns:
      (logits_BV, cache): float32 logits for the following position; lengths advanced by one.
    """
    lengths_B = jnp.ones_like(cache.lengths_B)
    return model.apply({"params": params}, tokens_B[:, None], lengths_B, cache, method="extend")
