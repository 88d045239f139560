"""Reward-model loss and preference metrics."""

from __future__ import annotations

import jax
import jax.numpy as jnp

from rlhf_jax.losses._common import Array, check_positive, f32, log_ratios


def bradley_terry(*, chosen_rewards, rejected_rewards, margin=0.0) -> Array:
    """Bradley-Terry reward-model loss: -logσ(r_c - r_r - m).

    Ouyang et al. 2022 (InstructGPT) Eq. 1; with a margin m as in Llama 2 (Touvron et al. 2023, Eq. 2).

    Args:
      chosen_rewards, rejected_rewards: scalar rewards per pair, [B].
      margin: m, a scalar or [B] (default 0).

    Returns:
      Per-pair loss [B], float32.
    """
    return -jax.nn.log_sigmoid(f32(chosen_rewards) - f32(rejected_rewards) - f32(margin))


def preference_metrics(
    *,
    policy_chosen_logps,
    policy_rejected_logps,
    reference_chosen_logps,
    reference_rejected_logps,
    beta: float,
    weights=None,
) -> dict[str, Array]:
    """Implicit-reward metrics of a DPO-style policy, as batch means (scalars).

    chosen_reward = β r_w, rejected_reward = β r_l, reward_margin = β h, reward_accuracy = the
    fraction of pairs with h > 0 (ties count as wrong). The names are the `metrics.jsonl` keys.

    Args:
      policy_chosen_logps, policy_rejected_logps, reference_chosen_logps, reference_rejected_logps:
        summed log-probs, [B].
      beta: β > 0, the implicit-reward scale.
      weights: optional [B] weights (e.g. 0 for padding pairs); the means are weighted.

    Returns:
      Dict of float32 scalars: chosen_reward, rejected_reward, reward_margin, reward_accuracy.
    """
    check_positive("beta", beta)
    r_w, r_l = log_ratios(
        policy_chosen_logps, policy_rejected_logps, reference_chosen_logps, reference_rejected_logps
    )
    w = jnp.ones_like(r_w) if weights is None else f32(weights)
    denom = jnp.maximum(jnp.sum(w), 1e-9)

    def mean(x):
        return jnp.sum(w * x) / denom

    return {
        "chosen_reward": mean(beta * r_w),
        "rejected_reward": mean(beta * r_l),
        "reward_margin": mean(beta * (r_w - r_l)),
        "reward_accuracy": mean((r_w - r_l > 0).astype(jnp.float32)),
    }
