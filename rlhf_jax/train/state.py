"""The train state: a plain pytree of step, params, optimizer state, RNG key data and non-finite counters."""

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


def apply_gradients(state: TrainState, grads, tx: optax.GradientTransformation, *, ok) -> TrainState:
    """One optimizer update, applied only where `ok` (a traced bool); otherwise the state is kept.

    A non-finite step therefore never reaches the parameters or a checkpoint; it is counted, and the
    loop decides (at its next host sync) whether to stop with the step number or carry on.
    """
    updates, new_opt_state = tx.update(grads, state.opt_state, state.params)
    new_params = optax.apply_updates(state.params, updates)
    keep = lambda new, old: jax.tree.map(lambda n, o: jnp.where(ok, n, o), new, old)
    step = state.step + 1
    return state.replace(
        step=step,
        params=keep(new_params, state.params),
        opt_state=keep(new_opt_state, state.opt_state),
        nonfinite_count=state.nonfinite_count + jnp.where(ok, 0, 1).astype(jnp.int32),
        first_nonfinite_step=jnp.where(
            ok | (state.first_nonfinite_step >= 0), state.first_nonfinite_step, step
        ).astype(jnp.int32),
    )
