"""Preference-optimisation losses as pure JAX functions over per-sequence log-probs.

Usage from any JAX code:

    from rlhf_jax import losses
    per_pair_B = losses.dpo(policy_chosen_logps=pc_B, policy_rejected_logps=pr_B,
                            reference_chosen_logps=rc_B, reference_rejected_logps=rr_B, beta=0.1)
    loss = per_pair_B.mean()
    loss_fn = losses.registry.make("ipo", beta=0.5)   # by name, validated (also `losses.make`)

Every pairwise loss is keyword-only, takes summed log-probs [B] (float32 or bfloat16), computes in
float32, and returns the per-example loss [B]; see each docstring for the formula and the paper. The
log-probs come from `sequence_logps_from_hidden` (what the trainer uses: the LM head fused in, only
the loss-masked rows computed), `sequence_logps` or `token_logps`.

The policy-gradient family (`group_advantages`, `policy_gradient_loss`, `policy_gradient_metrics`)
works on per-token log-probs [B, T] of sampled groups instead, and PPO with a critic (`gae`,
`value_loss`, `kl_penalized_rewards`, `whiten`, `adaptive_kl_coef`) on per-token rewards and values;
neither is in the pairwise registry.
"""

# The registry of pairwise losses by name, as a namespace: `losses.registry.make("dpo", beta=0.1)`.
from rlhf_jax.losses import registry

# Direct Advantage Policy Optimization (arXiv 2412.18279; not ByteDance's DAPO): step-level, offline.
from rlhf_jax.losses._advantage import critic_bce, direct_advantage_po, step_advantages

# Log-probs: per token and summed per sequence, from logits or straight from hidden states.
from rlhf_jax.losses._ift import ift_loss, ift_sequence_losses, ift_weights
from rlhf_jax.losses._logps import (
    sequence_logps,
    sequence_logps_from_hidden,
    token_logps,
    token_logps_from_hidden,
)

# Paper losses: DPO and its variants (cDPO, rDPO, IPO, RSO's sigmoid/hinge, SLiC, INPO, RPO, SimPO, ORPO).
from rlhf_jax.losses._pairwise import (
    cdpo,
    chosen_nll,
    dpo,
    hinge,
    hinge_norm,
    inpo,
    ipo,
    orpo,
    rdpo,
    rpo,
    sigmoid_norm,
    simpo,
    slic,
)

# Policy-gradient losses and advantages (GRPO, Dr. GRPO, DAPO, RLOO, GSPO): online RL on sampled groups.
from rlhf_jax.losses._policy_gradient import group_advantages, policy_gradient_loss, policy_gradient_metrics

# PPO with a critic: per-token KL-penalised rewards, GAE, the clipped value loss, whitening, adaptive KL.
from rlhf_jax.losses._ppo import (
    adaptive_kl_coef,
    gae,
    kl_penalized_rewards,
    last_token_mask,
    value_loss,
    whiten,
)

# Reward-model losses and the preference metrics logged with every loss.
from rlhf_jax.losses._reward import bradley_terry, preference_metrics

# Turn- and trajectory-level losses: EPO's turn-level REINFORCE, GFlowNet trajectory balance.
from rlhf_jax.losses._trajectory import (
    discounted_turn_returns,
    epo,
    positive_log_rewards,
    trajectory_balance,
)

# TRL's DPOTrainer loss types, under TRL's names.
from rlhf_jax.losses._trl import (
    aot,
    aot_unpaired,
    apo_down,
    apo_zero,
    bco_pair,
    discopop,
    dpo_length_normalized,
    exo_pair,
    nca_pair,
    sppo_hard,
)

# The registry's names, also at the top level (`losses.make`, `losses.names`, ...) as before.
from rlhf_jax.losses.registry import (
    INPUT_NAMES,
    get,
    hyperparameters,
    make,
    names,
    optional_inputs,
    required_inputs,
    uses_reference,
)

__all__ = [
    # log-probs
    "sequence_logps",
    "sequence_logps_from_hidden",
    "token_logps",
    "token_logps_from_hidden",
    # paper losses
    "cdpo",
    "dpo",
    "hinge",
    "hinge_norm",
    "inpo",
    "ipo",
    "orpo",
    "rdpo",
    "rpo",
    "sigmoid_norm",
    "simpo",
    "slic",
    # a control: SFT on the chosen responses
    "chosen_nll",
    # TRL loss types
    "aot",
    "aot_unpaired",
    "apo_down",
    "apo_zero",
    "bco_pair",
    "discopop",
    "dpo_length_normalized",
    "exo_pair",
    "nca_pair",
    "sppo_hard",
    # Direct Advantage Policy Optimization (step-level)
    "critic_bce",
    "direct_advantage_po",
    "step_advantages",
    # policy-gradient losses and advantages
    "group_advantages",
    "policy_gradient_loss",
    "policy_gradient_metrics",
    # PPO with a critic
    "adaptive_kl_coef",
    "gae",
    "kl_penalized_rewards",
    "last_token_mask",
    "value_loss",
    "whiten",
    # turn- and trajectory-level losses
    "discounted_turn_returns",
    "epo",
    "positive_log_rewards",
    "trajectory_balance",
    # IFT (Intuitive Fine-Tuning)
    "ift_loss",
    "ift_sequence_losses",
    "ift_weights",
    # reward-model losses and metrics
    "bradley_terry",
    "preference_metrics",
    # the registry
    "registry",
    "INPUT_NAMES",
    "get",
    "hyperparameters",
    "make",
    "names",
    "optional_inputs",
    "required_inputs",
    "uses_reference",
]
