"""The remaining loss types of TRL's DPOTrainer, with TRL's formulas and hyperparameter names.

Same conventions as `_pairwise.py`: summed log-probs [B] in, per-example float32 loss [B] out,
r_w = policy_chosen - reference_chosen, r_l = policy_rejected - reference_rejected, h = r_w - r_l.
Names follow TRL's `loss_type` strings; TRL's "sigmoid_norm" is `dpo_length_normalized` here because
"sigmoid-norm" means plain DPO in the RSO paper. TRL's "robust" is `rdpo`, "hinge" is `hinge_norm`,
"sigmoid" is `dpo`, and "ipo" is `ipo`.

Two losses here are batch-level: `aot` and `aot_unpaired` sort over the batch axis, so an example's
loss depends on the others in its batch (under `pmap`/sharding each device sorts its own shard, as
TRL sorts per GPU).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from rlhf_jax.losses._common import (
    Array,
    check_positive,
    check_range,
    f32,
    log_ratios,
    per_token,
)


def _smoothed_sigmoid(z: Array, eps) -> Array:
    return -(1.0 - eps) * jax.nn.log_sigmoid(z) - eps * jax.nn.log_sigmoid(-z)


def exo_pair(
    *,
    policy_chosen_logps,
    policy_rejected_logps,
    reference_chosen_logps,
    reference_rejected_logps,
    beta: float = 0.1,
    label_smoothing: float = 1e-3,
) -> Array:
    """EXO, pairwise: KL(p_θ || p_label) between the policy's and the labels' choice distributions.

    With q_w = σ(β h), q_l = σ(-β h) and label distribution (1 - ε, ε):
      loss = q_w (log q_w - log(1 - ε)) + q_l (log q_l - log ε).

    Ji et al. 2024, "Towards Efficient Exact Optimization of Language Model Alignment", Eq. 16 with
    K = 2; TRL loss_type="exo_pair". ε must be in (0, 1): TRL substitutes 1e-3 for 0, here 1e-3 is the
    default and 0 is rejected.

    Args:
      policy_chosen_logps, policy_rejected_logps, reference_chosen_logps, reference_rejected_logps:
        summed log-probs, [B].
      beta: β > 0 (default 0.1).
      label_smoothing: ε in (0, 1) (default 1e-3).

    Returns:
      Per-example loss [B], float32 (>= 0; zero when σ(βh) = 1 - ε).
    """
    check_positive("beta", beta)
    check_range("label_smoothing", label_smoothing, 0.0, 1.0, low_open=True)
    r_w, r_l = log_ratios(
        policy_chosen_logps, policy_rejected_logps, reference_chosen_logps, reference_rejected_logps
    )
    z = beta * (r_w - r_l)
    eps = label_smoothing
    return jax.nn.sigmoid(z) * (jax.nn.log_sigmoid(z) - jnp.log1p(-eps)) + jax.nn.sigmoid(-z) * (
        jax.nn.log_sigmoid(-z) - jnp.log(eps)
    )


def nca_pair(
    *,
    policy_chosen_logps,
    policy_rejected_logps,
    reference_chosen_logps,
    reference_rejected_logps,
    beta: float = 0.1,
) -> Array:
    """Noise Contrastive Alignment, pairwise.

    loss = -logσ(β r_w) - ½ logσ(-β r_w) - ½ logσ(-β r_l).

    Chen et al. 2024, "Noise Contrastive Alignment of Language Models with Explicit Rewards", NCA with
    K = 2; TRL loss_type="nca_pair". Unlike DPO it acts on the absolute rewards, so it keeps the
    chosen likelihood from falling.

    Returns:
      Per-example loss [B], float32.
    """
    check_positive("beta", beta)
    r_w, r_l = log_ratios(
        policy_chosen_logps, policy_rejected_logps, reference_chosen_logps, reference_rejected_logps
    )
    c, r = beta * r_w, beta * r_l
    return -jax.nn.log_sigmoid(c) - 0.5 * jax.nn.log_sigmoid(-c) - 0.5 * jax.nn.log_sigmoid(-r)


def bco_pair(
    *,
    policy_chosen_logps,
    policy_rejected_logps,
    reference_chosen_logps,
    reference_rejected_logps,
    beta: float = 0.1,
    delta=0.0,
) -> Array:
    """Binary Classifier Optimisation on pairs.

    loss = -logσ(β r_w - δ) - logσ(-(β r_l - δ)).

    Jung et al. 2024, "Binary Classifier Optimization for Large Language Model Alignment", Eq. 5;
    TRL loss_type="bco_pair". δ is the reward shift: TRL versions before 0.20 used a running mean of
    the batch rewards β·r (a stateful estimate), current TRL uses δ = 0. Pure functions keep no state:
    a caller who wants the running mean keeps it and passes it as `delta` (a scalar or [B] array,
    treated as a constant: wrap it in `jax.lax.stop_gradient` if it is computed from the batch).

    Returns:
      Per-example loss [B], float32.
    """
    check_positive("beta", beta)
    r_w, r_l = log_ratios(
        policy_chosen_logps, policy_rejected_logps, reference_chosen_logps, reference_rejected_logps
    )
    delta = jax.lax.stop_gradient(jnp.asarray(delta, jnp.float32))
    return -jax.nn.log_sigmoid(beta * r_w - delta) - jax.nn.log_sigmoid(-(beta * r_l - delta))


def sppo_hard(
    *,
    policy_chosen_logps,
    policy_rejected_logps,
    reference_chosen_logps,
    reference_rejected_logps,
    beta: float = 0.1,
) -> Array:
    """Self-Play Preference Optimisation with hard win probabilities (1 for chosen, 0 for rejected).

    loss = (r_w - 1/(2β))² + (r_l + 1/(2β))².

    Wu et al. 2024, "Self-Play Preference Optimization for Language Model Alignment", Eq. 4.7 with
    P(y_w ≻ π) = 1, P(y_l ≻ π) = 0; TRL loss_type="sppo_hard".

    Returns:
      Per-example loss [B], float32.
    """
    check_positive("beta", beta)
    r_w, r_l = log_ratios(
        policy_chosen_logps, policy_rejected_logps, reference_chosen_logps, reference_rejected_logps
    )
    return (r_w - 0.5 / beta) ** 2 + (r_l + 0.5 / beta) ** 2


def aot(
    *,
    policy_chosen_logps,
    policy_rejected_logps,
    reference_chosen_logps,
    reference_rejected_logps,
    beta: float = 0.1,
    label_smoothing: float = 0.0,
) -> Array:
    """Alignment via Optimal Transport, paired form (batch-level).

    Sort the policy margins m = lp_w - lp_l and the reference margins m_ref = ref_w - ref_l over the
    batch separately; with Δ_i = sort(m)_i - sort(m_ref)_i,
      loss_i = -(1 - ε) logσ(β Δ_i) - ε logσ(-β Δ_i).

    Melnyk et al. 2024, "Distributional Preference Alignment of LLMs via Optimal Transport";
    TRL loss_type="aot". Element i of the result belongs to the i-th quantile, not to pair i; the
    batch mean is what is optimised.

    Returns:
      Per-quantile loss [B], float32.
    """
    check_positive("beta", beta)
    check_range("label_smoothing", label_smoothing, 0.0, 0.5, high_open=False)
    margin = f32(policy_chosen_logps) - f32(policy_rejected_logps)
    ref_margin = f32(reference_chosen_logps) - f32(reference_rejected_logps)
    delta = jnp.sort(margin, axis=-1) - jnp.sort(ref_margin, axis=-1)
    return _smoothed_sigmoid(beta * delta, label_smoothing)


def aot_unpaired(
    *,
    policy_chosen_logps,
    policy_rejected_logps,
    reference_chosen_logps,
    reference_rejected_logps,
    beta: float = 0.1,
    label_smoothing: float = 0.0,
) -> Array:
    """Alignment via Optimal Transport, unpaired form (batch-level).

    Δ_i = sort(r_w)_i - sort(r_l)_i over the batch; loss_i = -(1 - ε) logσ(β Δ_i) - ε logσ(-β Δ_i).

    Melnyk et al. 2024; TRL loss_type="aot_unpaired" (named "aot_pair" in TRL before 0.20). The
    chosen and rejected log-ratio distributions are compared quantile by quantile, so the data need
    not be paired.

    Returns:
      Per-quantile loss [B], float32.
    """
    check_positive("beta", beta)
    check_range("label_smoothing", label_smoothing, 0.0, 0.5, high_open=False)
    r_w, r_l = log_ratios(
        policy_chosen_logps, policy_rejected_logps, reference_chosen_logps, reference_rejected_logps
    )
    delta = jnp.sort(r_w, axis=-1) - jnp.sort(r_l, axis=-1)
    return _smoothed_sigmoid(beta * delta, label_smoothing)


def apo_zero(
    *,
    policy_chosen_logps,
    policy_rejected_logps,
    reference_chosen_logps,
    reference_rejected_logps,
    beta: float = 0.1,
) -> Array:
    """Anchored Preference Optimisation, "zero" anchor: raise chosen, lower rejected.

    loss = (1 - σ(β r_w)) + σ(β r_l).

    D'Oosterlinck et al. 2024, "Anchored Preference Optimization and Contrastive Revisions", Eq. 7;
    TRL loss_type="apo_zero". For data whose chosen responses are better than the model's own outputs.

    Returns:
      Per-example loss [B], float32.
    """
    check_positive("beta", beta)
    r_w, r_l = log_ratios(
        policy_chosen_logps, policy_rejected_logps, reference_chosen_logps, reference_rejected_logps
    )
    return (1.0 - jax.nn.sigmoid(beta * r_w)) + jax.nn.sigmoid(beta * r_l)


def apo_down(
    *,
    policy_chosen_logps,
    policy_rejected_logps,
    reference_chosen_logps,
    reference_rejected_logps,
    beta: float = 0.1,
) -> Array:
    """Anchored Preference Optimisation, "down" anchor: lower both, the rejected more.

    loss = σ(β r_w) + (1 - σ(β (r_w - r_l))).

    D'Oosterlinck et al. 2024, Eq. 8; TRL loss_type="apo_down". For data whose chosen responses are
    worse than the model's own outputs: by design its gradient lowers the chosen log-prob too.

    Returns:
      Per-example loss [B], float32.
    """
    check_positive("beta", beta)
    r_w, r_l = log_ratios(
        policy_chosen_logps, policy_rejected_logps, reference_chosen_logps, reference_rejected_logps
    )
    return jax.nn.sigmoid(beta * r_w) + (1.0 - jax.nn.sigmoid(beta * (r_w - r_l)))


def discopop(
    *,
    policy_chosen_logps,
    policy_rejected_logps,
    reference_chosen_logps,
    reference_rejected_logps,
    beta: float = 0.1,
    discopop_tau: float = 0.05,
) -> Array:
    """DiscoPOP (log-ratio modulated loss): a blend of the logistic and exponential losses.

    With x = β h and m = σ(x/τ):  loss = -logσ(x) · (1 - m) + e^{-x} · m.

    Chris Lu et al. 2024, "Discovering Preference Optimization Algorithms with and for Large Language
    Models", Eq. 5; TRL loss_type="discopop" with `discopop_tau` (default 0.05). The exponential term
    is computed as exp(-x + logσ(x/τ)) so that it stays finite for large negative x when τ < 1.
    Note the loss is not monotone in x near 0 (its slope at x = 0 is positive for τ = 0.05); it
    decreases for |x| beyond about 0.5.

    Returns:
      Per-example loss [B], float32.
    """
    check_positive("beta", beta)
    check_positive("discopop_tau", discopop_tau)
    r_w, r_l = log_ratios(
        policy_chosen_logps, policy_rejected_logps, reference_chosen_logps, reference_rejected_logps
    )
    x = beta * (r_w - r_l)
    m = jax.nn.sigmoid(x / discopop_tau)
    exp_term = jnp.exp(-x + jax.nn.log_sigmoid(x / discopop_tau))
    return -jax.nn.log_sigmoid(x) * (1.0 - m) + exp_term


def dpo_length_normalized(
    *,
    policy_chosen_logps,
    policy_rejected_logps,
    reference_chosen_logps,
    reference_rejected_logps,
    chosen_lengths,
    rejected_lengths,
    beta: float = 0.1,
) -> Array:
    """Length-normalised DPO: DPO on per-token average log-ratios.

    loss = -logσ(β (r_w/L_w - r_l/L_l)), lengths clamped at 1.

    TRL loss_type="sigmoid_norm" (as used by Tulu 3); not RSO's "sigmoid-norm", which is `dpo`.

    Returns:
      Per-example loss [B], float32.
    """
    check_positive("beta", beta)
    r_w, r_l = log_ratios(
        policy_chosen_logps, policy_rejected_logps, reference_chosen_logps, reference_rejected_logps
    )
    z = beta * (per_token(r_w, chosen_lengths) - per_token(r_l, rejected_lengths))
    return -jax.nn.log_sigmoid(z)
