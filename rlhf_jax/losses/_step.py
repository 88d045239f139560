"""Trajectory-level objectives: the GFlowNet trajectory-balance loss.

Conventions: per-example quantities are [B] arrays of summed log-probs (a step's, or a whole
trajectory's, tokens), float32 compute, keyword-only arguments, hyperparameters checked eagerly;
each function returns the per-example loss [B] and the caller takes the (weighted) mean.
"""

from __future__ import annotations

import jax.numpy as jnp

from rlhf_jax.losses._common import Array, f32


def _check_b(**arrays) -> None:
    """Raises ValueError naming the argument unless every array is [B] with the first's B."""
    (name0, x0), *rest = arrays.items()
    if jnp.ndim(x0) != 1:
        raise ValueError(f"{name0} must be [B], got shape {jnp.shape(x0)}")
    for name, x in rest:
        if jnp.shape(x) != jnp.shape(x0):
            raise ValueError(f"{name} must have the shape of {name0} {jnp.shape(x0)}, got {jnp.shape(x)}")


def trajectory_balance(*, log_z, policy_logps, log_rewards) -> Array:
    """The GFlowNet trajectory-balance loss (Malkin et al. 2022, "Trajectory Balance: Improved Credit
    Assignment in GFlowNets", arXiv 2201.13386, Eq. 14; for language models with a fixed backward
    policy, as in GFlowVLM, arXiv 2503.06514, and Hu et al. 2024, arXiv 2310.04363):

        loss = (log Z + log π(x) − log R(x))²,

    where log π(x) = Σ_t log π(a_t | s_t) is the completion's summed token log-probability (one
    generation order per completion, so the backward policy is 1) and Z a learned scalar, the
    partition function. At the optimum, π(x) = R(x) / Z: completions are sampled in proportion to their
    reward, not only the best one (the diversity the objective is used for). R must be positive: the
    caller passes log R (e.g. reward / temperature for R = exp(reward / temperature)).

    Args:
      log_z: scalar (or [B]) learned log Z; it receives gradient.
      policy_logps: [B] summed log-probs of each completion under the policy.
      log_rewards: [B] log R(x) (constants).

    Returns:
      Per-completion loss [B], float32.
    """
    _check_b(policy_logps=policy_logps, log_rewards=log_rewards)
    if jnp.ndim(log_z) not in (0, 1) or (
        jnp.ndim(log_z) == 1 and jnp.shape(log_z) != jnp.shape(policy_logps)
    ):
        raise ValueError(f"log_z must be a scalar or [B], got shape {jnp.shape(log_z)}")
    return jnp.square(f32(log_z) + f32(policy_logps) - f32(log_rewards))
