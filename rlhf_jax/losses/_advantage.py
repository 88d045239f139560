"""Direct Advantage Policy Optimization: regress the policy's log-ratio onto a critic's advantages.

Direct Advantage Policy Optimization (Liu et al. 2024, "Improving Multi-Step Reasoning Abilities of
Large Language Models with Direct Advantage Policy Optimization", arXiv 2412.18279) is an offline,
step-level method: a critic V(s) trained on Monte-Carlo returns scores reasoning states, the advantage
of a step a at state s is Â(s, a) = V(s∘a) - (1/M) Σ_j V(s∘a_j) over M steps a_j ~ π_ref(·|s), and the
policy minimises the squared distance between its log-ratio and Â/β (Eq. 12-13). It is NOT
ByteDance's DAPO (Yu et al. 2025, "DAPO: An Open-Source LLM Reinforcement Learning System at Scale",
arXiv 2503.14476), which is the ``dapo`` aggregation of ``policy_gradient_loss``; the two names never
alias each other.
"""

from __future__ import annotations

import jax

from rlhf_jax.losses._common import Array, check_positive, f32


def direct_advantage_po(*, policy_logps, reference_logps, advantages, beta: float) -> Array:
    """Per-step Direct Advantage Policy Optimization loss (arXiv 2412.18279, Eq. 12-13).

        loss(s, a) = ½ (Â(s, a)/β - (log π(a|s) - log π_ref(a|s)))²

    Its minimiser over the log-ratio is log π/π_ref = Â/β, the closed form of the KL-regularised
    step-level objective max_π E_a~π[Â(s, a)] - β KL(π(·|s) ‖ π_ref(·|s)) up to normalisation
    (paper Theorem 3.2: the resulting policy's expected advantage is ≥ 0 for every β > 0).
    Advantages are constants (no gradient flows into them).

    Args:
      policy_logps: [B] log π(a|s), the summed token log-probs of each step under the policy.
      reference_logps: [B] log π_ref(a|s), the same under the frozen reference policy.
      advantages: [B] the critic's advantage estimate Â(s, a) of each step.
      beta: > 0, the KL-regularisation strength.

    Returns:
      [B] the per-step loss, float32.
    """
    check_positive("beta", beta)
    shape = jax.numpy.shape(policy_logps)
    for name, x in (("reference_logps", reference_logps), ("advantages", advantages)):
        if jax.numpy.shape(x) != shape:
            raise ValueError(f"{name} must have the shape of policy_logps {shape}, got {jax.numpy.shape(x)}")
    target_B = jax.lax.stop_gradient(f32(advantages)) / beta
    log_ratio_B = f32(policy_logps) - f32(reference_logps)
    return 0.5 * (target_B - log_ratio_B) ** 2


def critic_bce(*, value_logits, targets) -> Array:
    """Per-state binary cross-entropy of a critic on soft Monte-Carlo targets (arXiv 2412.18279, §3.3).

        loss(s) = -[MC_N(s) log σ(v(s)) + (1 - MC_N(s)) log(1 - σ(v(s)))]

    with v(s) the critic's logit and MC_N(s) ∈ [0, 1] the share of N completions from s that are right;
    V(s) = σ(v(s)). Minimised at σ(v) = MC_N(s); the gradient in v is σ(v) - MC_N(s).

    Args:
      value_logits: [B] the critic's scalar output per state.
      targets: [B] soft targets in [0, 1] (constants).

    Returns:
      [B] the per-state loss, float32.
    """
    v_B = f32(value_logits)
    y_B = jax.lax.stop_gradient(f32(targets))
    return -(y_B * jax.nn.log_sigmoid(v_B) + (1.0 - y_B) * jax.nn.log_sigmoid(-v_B))


def step_advantages(values_BM) -> Array:
    """Â(s, a_i) = V(s∘a_i) - (1/M) Σ_j V(s∘a_j) (arXiv 2412.18279, §3.3) for M steps a_j ~ π_ref(·|s).

    Args:
      values_BM: [B, M] critic values V(s∘a_j) of the M sampled next states of each of B states.

    Returns:
      [B, M] advantages, float32; each row sums to zero.
    """
    v_BM = f32(values_BM)
    if v_BM.ndim != 2:
        raise ValueError(f"values_BM must be [B, M], got shape {v_BM.shape}")
    return v_BM - v_BM.mean(axis=1, keepdims=True)
