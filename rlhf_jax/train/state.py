"""The train state: a plain pytree of step, params, optimizer state, RNG key data and non-finite counters.

The update that advances it is `rlhf_jax.train.steps.apply_gradients`.
"""

from __future__ import annotations

from typing import Any

import flax.struct
import jax
import jax.numpy as jnp
import optax


@flax.struct.dataclass
class TrainState:
    """Everything a step reads and writes; checkpointed whole.

    Attributes:
      step: optimizer steps taken (int32 scalar).
      params: the trained parameters.
      opt_state: the optax state.
      rng: raw PRNG key data (uint32), so it checkpoints as an ordinary array.
      nonfinite_count: steps whose loss or gradient was not finite; their update was not applied.
      first_nonfinite_step: the first such step (1-based step number), -1 if none.
    """

    step: jax.Array
    params: Any
    opt_state: Any
    rng: jax.Array
    nonfinite_count: jax.Array
    first_nonfinite_step: jax.Array


def create(params, tx: optax.GradientTransformation, rng: jax.Array) -> TrainState:
    """A fresh state at step 0. Call under `jax.jit` with out_shardings to place the optimizer state."""
    return TrainState(
        step=jnp.zeros((), jnp.int32),
        params=params,
        opt_state=tx.init(params),
        rng=jax.random.key_data(rng) if jnp.issubdtype(rng.dtype, jax.dtypes.prng_key) else rng,
        nonfinite_count=jnp.zeros((), jnp.int32),
        first_nonfinite_step=jnp.full((), -1, jnp.int32),
    )
