"""Random parameters for tests, built in numpy: a random model without compiling `init_params`."""

import jax
import jax.numpy as jnp
import numpy as np

from rlhf_jax import models


def random_params(model, seed: int):
    """Scaled-normal params from numpy: a random model without compiling `init_params` (slow on CPU)."""
    rng = np.random.default_rng(seed)

    def one(path, leaf):
        name = jax.tree_util.keystr(path)
        if "scale" in name:
            return jnp.ones(leaf.shape, leaf.dtype)
        if "bias" in name:
            return jnp.zeros(leaf.shape, leaf.dtype)
        # Stacked layers: the fan-in follows the leading L axis; the output projection reads H x K.
        dims = leaf.shape[1:] if "layers" in name else leaf.shape
        fan_in = 1 if "embedding" in name else dims[0] * (dims[1] if "o_kernel" in name else 1)
        return jnp.asarray(rng.normal(0, fan_in**-0.5, leaf.shape), leaf.dtype)

    return jax.tree_util.tree_map_with_path(one, models.param_shapes(model))
