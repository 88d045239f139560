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
    target_B = jax.lax.stop_gradient(f32(advantages)) / beta
    log_ratio_B = f32(policy_logps) - f32(reference_logps)
    return 0.5 * (target_B - log_ratio_B) ** 2
