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
        has position lengths_B[b] (plus its prefix's length when there is a prefix).
      prefix_k, prefix_v: None, or keys and values shared by groups of consecutive rows, same layout
        with P rows (B = P·N): row b continues prefix row b // N (`share_prefix`: the prompt of a
        prompt's N samples, prefilled once). Read only; row b's own slot j then holds position
        prefix_lengths_P[b // N] + j, and attention runs over the prefix's filled slots and the row's own.
      prefix_lengths_P: int32 [P], filled prefix slots per prefix row (None without a prefix).
    """

    k: jax.Array | tuple[jax.Array, ...]
    v: jax.Array | tuple[jax.Array, ...]
    lengths_B: jax.Array  # noqa: N815 (shape-suffixed names, see rlhf_jax/__init__.py)
    prefix_k: jax.Array | tuple[jax.Array, ...] | None = None
    prefix_v: jax.Array | tuple[jax.Array, ...] | None = None
    prefix_lengths_P: jax.Array | None = None  # noqa: N815


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


def share_prefix(prefix: KVCache, num_rows: int, max_len: int, config: ModelConfig) -> KVCache:
    """A cache of `num_rows` = P·N empty rows of `max_len` slots each, continuing the P rows of the
    filled cache `prefix` in groups of N (row b continues prefix row b // N): its keys and values are
    read, never copied N times.

    Args:
      prefix: a filled cache of P rows (e.g. after `prefill` of P prompts).
      num_rows: B = P·N.
      max_len: each row's own slots (e.g. the tokens to generate).
      config: the model (stacked or per-layer buffers, as `init_cache`).

    Returns:
      A KVCache with `prefix_k`, `prefix_v`, `prefix_lengths_P` from `prefix` and lengths 0.
    """
    P = prefix.lengths_B.shape[0]
    if num_rows % P:
        raise ValueError(f"share_prefix: {num_rows} rows do not split into groups over {P} prefix rows")
    dtype = jax.tree.leaves(prefix.k)[0].dtype
    own = init_cache(config, num_rows, max_len, dtype)
    return own._replace(prefix_k=prefix.k, prefix_v=prefix.v, prefix_lengths_P=prefix.lengths_B)


def cache_shardings(
    mesh, rules=sharding.LOGICAL_RULES, config: ModelConfig | None = None, prefix: bool = False
) -> KVCache:
    """NamedShardings for a KVCache (batch over data x fsdp, kv heads over tensor).

    Args:
      mesh: the mesh.
      rules: the logical-axis rules.
      config: the model; its cache is per layer if it is unrolled. None: a stacked cache.
      prefix: the cache has a shared prefix (`share_prefix`), its P rows split like the batch.

    Returns:
      A KVCache of NamedSharding.
    """
    lengths = sharding.logical_sharding(mesh, ("batch",), rules)
    if config is None or config.scan_layers:
        buffers = sharding.logical_sharding(mesh, ("layers", *_LAYER_AXES), rules)
    else:
        buffers = (sharding.logical_sharding(mesh, _LAYER_AXES, rules),) * config.num_layers
    if prefix:
        return KVCache(buffers, buffers, lengths, buffers, buffers, lengths)
    return KVCache(buffers, buffers, lengths)


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
