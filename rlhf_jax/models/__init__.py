"""Llama/Gemma-family decoder-only transformer: policy, frozen reference, reward model and sampler.

Flax Linen, not NNX, on purpose: Linen keeps parameters a plain pytree outside the module, so every
step stays a pure function `step(params, batch)` that is jitted once with explicit in/out shardings, and
params, optimizer state and checkpoints are ordinary nested dicts (`nn.scan` stacks the layers, logical
axes are read from the init's metadata boxes and the params come out unboxed).

Usage (see `rlhf_jax.sharding` for meshes)::

    from rlhf_jax import models, sharding
    mesh = sharding.make_mesh(sharding.MeshConfig(data=-1, fsdp=4, tensor=1))
    model = models.Transformer(models.preset("1b"), mesh=mesh)
    params = models.init_params(model, jax.random.key(0))  # born sharded, never whole on one device
    logits_BTV = jax.jit(model.apply)({"params": params}, sharding.shard_batch(tokens_BT, mesh))
"""

from rlhf_jax.models.cache import KVCache, cache_shardings, decode_step, init_cache, prefill, share_prefix
from rlhf_jax.models.config import PRESETS, ModelConfig, param_count, preset
from rlhf_jax.models.transformer import (
    RewardModel,
    Transformer,
    init_params,
    param_logical_axes,
    param_shapes,
    param_shardings,
    stack_layers,
    unstack_layers,
)

__all__ = [
    "PRESETS",
    "KVCache",
    "ModelConfig",
    "RewardModel",
    "Transformer",
    "cache_shardings",
    "decode_step",
    "init_cache",
    "share_prefix",
    "init_params",
    "param_count",
    "param_logical_axes",
    "param_shapes",
    "param_shardings",
    "prefill",
    "preset",
    "stack_layers",
    "unstack_layers",
]
