"""Preference-optimisation losses as pure JAX functions over per-sequence log-probs.

Usage from any JAX code:

    from rlhf_jax import losses
    per_pair_B = losses.dpo(policy_chosen_logps=pc_B, policy_rejected_logps=pr_B,
                            reference_chosen_logps=rc_B, reference_rejected_logps=rr_B, beta=0.1)
    loss = per_pair_B.mean()
    loss_fn = losses.make("ipo", beta=0.5)   # by name, validated

Every pairwise loss is keyword-only, takes summed log-probs [B] (float32 or bfloat16), computes in
float32, and returns the per-example loss [B]; see each docstring for the formula and the paper.
"""

from rlhf_jax.losses._logps import sequence_logps, sequence_logps_from_hidden, token_logps
from rlhf_jax.losses._pairwise import (
    cdpo,
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
from rlhf_jax.losses._registry import (
    INPUT_NAMES,
    get,
    hyperparameters,
    make,
    names,
    optional_inputs,
    required_inputs,
    uses_reference,
)
from rlhf_jax.losses._reward import bradley_terry, preference_metrics
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

__all__ = [
    "INPUT_NAMES",
    "aot",
    "aot_unpaired",
    "apo_down",
    "apo_zero",
    "bco_pair",
    "bradley_terry",
    "cdpo",
    "discopop",
    "dpo",
    "dpo_length_normalized",
    "exo_pair",
    "get",
    "hinge",
    "hinge_norm",
    "hyperparameters",
    "inpo",
    "ipo",
    "make",
    "names",
    "nca_pair",
    "optional_inputs",
    "orpo",
    "preference_metrics",
    "rdpo",
    "required_inputs",
    "rpo",
    "sequence_logps",
    "sequence_logps_from_hidden",
    "sigmoid_norm",
    "simpo",
    "slic",
    "sppo_hard",
    "token_logps",
    "uses_reference",
]
