"""Pairwise preference losses from the papers this library reproduces: DPO, cDPO, rDPO, IPO, RSO,
SLiC-HF, INPO, RPO, SimPO and ORPO.

(Over 400 lines because each of the ten losses carries its formula, sign convention and paper.)

Conventions shared by every function here:
  * Inputs are per-sequence log-probs *summed* over completion tokens, shape [B], float32 or bfloat16;
    everything is computed in float32 and the result is the per-example loss, shape [B], float32.
    Callers take the mean (or a weighted mean, or a `pmean`) themselves.
  * "chosen" (w) is the preferred response, "rejected" (l) the other one. Lower loss is better.
  * r_w = policy_chosen - reference_chosen, r_l = policy_rejected - reference_rejected, h = r_w - r_l;
    lp_w, lp_l are the policy's summed log-probs; L_w, L_l completion token counts.
  * All arguments are keyword-only; hyperparameters that are Python numbers are range-checked
    eagerly (a ValueError names the argument), traced values are not checked.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from rlhf_jax.losses._common import (
    Array,
    check_positive,
    check_range,
    f32,
    log1mexp,
    log_ratios,
    per_token,
)


def dpo(
    *,
    policy_chosen_logps,
    policy_rejected_logps,
    reference_chosen_logps,
    reference_rejected_logps,
    beta: float = 0.1,
    label_smoothing: float = 0.0,
) -> Array:
    """Direct Preference Optimization loss, with cDPO label smoothing.

    loss = -(1 - ε) logσ(β h) - ε logσ(-β h),   h = r_w - r_l.

    With ε = 0 this is DPO (Rafailov et al. 2023, Eq. 7). With ε > 0 it is conservative DPO (cDPO,
    Mitchell 2023, "A note on DPO with noisy preferences"): the cross-entropy against soft labels
    (1 - ε, ε), whose gradient vanishes at β h = log((1 - ε)/ε) instead of pushing h to infinity.
    RSO's "sigmoid-norm" loss (Liu et al. 2024, Eq. 8) is exactly this loss with β = γ.

    Args:
      policy_chosen_logps, policy_rejected_logps: summed policy log-probs, [B].
      reference_chosen_logps, reference_rejected_logps: summed reference log-probs, [B].
      beta: β > 0, inverse strength of the KL regularisation (default 0.1).
      label_smoothing: ε in [0, 0.5], the assumed probability that a label is flipped (default 0).

    Returns:
      Per-example loss [B], float32. At policy == reference it equals log 2.
    """
    check_positive("beta", beta)
    check_range("label_smoothing", label_smoothing, 0.0, 0.5, high_open=False)
    r_w, r_l = log_ratios(
        policy_chosen_logps, policy_rejected_logps, reference_chosen_logps, reference_rejected_logps
    )
    z = beta * (r_w - r_l)
    return -(1.0 - label_smoothing) * jax.nn.log_sigmoid(z) - label_smoothing * jax.nn.log_sigmoid(-z)


def rdpo(
    *,
    policy_chosen_logps,
    policy_rejected_logps,
    reference_chosen_logps,
    reference_rejected_logps,
    beta: float = 0.1,
    flip_rate: float = 0.1,
) -> Array:
    """Robust DPO: an unbiased estimate of the clean DPO loss under labels flipped at rate ε.

    loss = [-(1 - ε) logσ(β h) + ε logσ(-β h)] / (1 - 2ε).

    Chowdhury et al. 2024, "Provably Robust DPO" (Eq. 5). Unbiasedness: if a label is flipped with
    probability ε, (1 - ε)·rdpo(h) + ε·rdpo(-h) = dpo(h). Unlike cDPO (`dpo` with label_smoothing),
    which down-weights every pair, rDPO de-biases the gradient; its loss is unbounded below as h grows
    (the +ε logσ(-βh) term), so it is not a cross-entropy and can be negative.

    Args:
      policy_chosen_logps, policy_rejected_logps, reference_chosen_logps, reference_rejected_logps:
        summed log-probs, [B].
      beta: β > 0 (default 0.1).
      flip_rate: ε, the known label-flip probability, 0 <= ε < 1/2 (default 0.1).

    Returns:
      Per-example loss [B], float32.

    Raises:
      ValueError: unless 0 <= flip_rate < 0.5.
    """
    check_positive("beta", beta)
    check_range("flip_rate", flip_rate, 0.0, 0.5)
    r_w, r_l = log_ratios(
        policy_chosen_logps, policy_rejected_logps, reference_chosen_logps, reference_rejected_logps
    )
    z = beta * (r_w - r_l)
    eps = flip_rate
    return (-(1.0 - eps) * jax.nn.log_sigmoid(z) + eps * jax.nn.log_sigmoid(-z)) / (1.0 - 2.0 * eps)


def ipo(
    *,
    policy_chosen_logps,
    policy_rejected_logps,
    reference_chosen_logps,
    reference_rejected_logps,
    beta: float = 0.1,
    chosen_lengths=None,
    rejected_lengths=None,
) -> Array:
    """Identity Preference Optimisation loss.

    loss = (h' - 1/(2β))²,  h' = h = r_w - r_l (summed log-probs), or, when both lengths are given,
    h' = r_w/L_w - r_l/L_l (per-token averages, as TRL's DPOTrainer does for loss_type="ipo").

    Azar et al. 2023, "A General Theoretical Paradigm to Understand Learning from Human Preferences",
    Eq. 17, where β plays the role of the paper's τ. The loss regresses the margin to 1/(2β) instead
    of pushing it to infinity, so it is minimised at a finite h' and pulls back a margin that is too big.

    Args:
      policy_chosen_logps, policy_rejected_logps, reference_chosen_logps, reference_rejected_logps:
        summed log-probs, [B].
      beta: β > 0 (default 0.1); the target margin is 1/(2β).
      chosen_lengths, rejected_lengths: optional completion token counts [B]; give both or neither.

    Returns:
      Per-example loss [B], float32.
    """
    check_positive("beta", beta)
    r_w, r_l = log_ratios(
        policy_chosen_logps, policy_rejected_logps, reference_chosen_logps, reference_rejected_logps
    )
    if (chosen_lengths is None) != (rejected_lengths is None):
        raise ValueError("ipo: give both chosen_lengths and rejected_lengths, or neither")
    if chosen_lengths is not None:
        h = per_token(r_w, chosen_lengths) - per_token(r_l, rejected_lengths)
    else:
        h = r_w - r_l
    return (h - 1.0 / (2.0 * beta)) ** 2


def hinge_norm(
    *,
    policy_chosen_logps,
    policy_rejected_logps,
    reference_chosen_logps,
    reference_rejected_logps,
    gamma: float = 0.05,
) -> Array:
    """RSO's normalised hinge loss: max(0, 1 - γ h), h = r_w - r_l.

    Liu et al. 2024, "Statistical Rejection Sampling Improves Preference Optimization" (RSO), Eq. 10;
    the same formula as TRL's loss_type="hinge" with β = γ. The reference policy appears through h.

    Args:
      policy_chosen_logps, policy_rejected_logps, reference_chosen_logps, reference_rejected_logps:
        summed log-probs, [B].
      gamma: γ > 0 (default 0.05, RSO's TL;DR setting); the margin is reached at h = 1/γ.

    Returns:
      Per-example loss [B], float32; zero (with zero gradient) once h >= 1/γ.
    """
    check_positive("gamma", gamma)
    r_w, r_l = log_ratios(
        policy_chosen_logps, policy_rejected_logps, reference_chosen_logps, reference_rejected_logps
    )
    return jax.nn.relu(1.0 - gamma * (r_w - r_l))


def hinge(*, policy_chosen_logps, policy_rejected_logps, gamma: float = 0.05) -> Array:
    """RSO's (un-normalised) hinge loss, the SLiC calibration loss: max(0, 1 - γ (lp_w - lp_l)).

    Liu et al. 2024 (RSO), Eq. 9; equal to SLiC's calibration term max(0, δ - lp_w + lp_l) scaled by γ
    with δ = 1/γ. No reference policy.

    Args:
      policy_chosen_logps, policy_rejected_logps: summed policy log-probs, [B].
      gamma: γ > 0 (default 0.05).

    Returns:
      Per-example loss [B], float32.
    """
    check_positive("gamma", gamma)
    margin = f32(policy_chosen_logps) - f32(policy_rejected_logps)
    return jax.nn.relu(1.0 - gamma * margin)


def slic(
    *,
    policy_chosen_logps,
    policy_rejected_logps,
    delta: float = 1.0,
    reg_weight: float = 0.0,
    policy_target_logps=None,
) -> Array:
    """SLiC-HF: rank calibration loss plus a regularisation towards a target sequence.

    loss = max(0, δ - lp_w + lp_l) - λ · lp_target,   lp_target defaults to lp_w.

    Zhao et al. 2023, "SLiC-HF: Sequence Likelihood Calibration with Human Feedback", Eq. 1 (the
    regulariser is the SFT target's log-likelihood, or the chosen response's in "SLiC-HF-direct").

    Args:
      policy_chosen_logps, policy_rejected_logps: summed policy log-probs, [B].
      delta: δ >= 0, the calibration margin (default 1.0).
      reg_weight: λ >= 0, weight of the cross-entropy regulariser (default 0: calibration only).
      policy_target_logps: summed policy log-probs of the regularisation target, [B]; defaults to the
        chosen response.

    Returns:
      Per-example loss [B], float32.
    """
    check_range("delta", delta, 0.0, float("inf"))
    check_range("reg_weight", reg_weight, 0.0, float("inf"))
    lp_w, lp_l = f32(policy_chosen_logps), f32(policy_rejected_logps)
    target = lp_w if policy_target_logps is None else f32(policy_target_logps)
    return jax.nn.relu(delta - lp_w + lp_l) - reg_weight * target


def inpo(
    *,
    policy_chosen_logps,
    policy_rejected_logps,
    reference_chosen_logps,
    reference_rejected_logps,
    previous_chosen_logps,
    previous_rejected_logps,
    eta: float = 0.005,
    tau: float | None = None,
) -> Array:
    """Iterative Nash Policy Optimization loss for one online iteration t.

    loss = (h_t - 1/(2η))²,
    h_t = (lp_w - lp_l) - (τ/η)(ref_w - ref_l) - (1 - τ/η)(prev_w - prev_l),

    where prev_* are the log-probs of the previous iterate π_t (frozen) and ref_* of π_ref.
    Zhang et al. 2024, "Iterative Nash Policy Optimization: Aligning LLMs with General Preferences via
    No-Regret Learning", Eq. 8 / Algorithm 1. With previous == reference it reduces to `ipo` with β = η.

    Args:
      policy_chosen_logps, policy_rejected_logps: summed log-probs of the policy being trained, [B].
      reference_chosen_logps, reference_rejected_logps: summed log-probs of π_ref, [B].
      previous_chosen_logps, previous_rejected_logps: summed log-probs of the previous iterate π_t, [B].
      eta: η > 0, the learning rate of the no-regret update (default 0.005, the paper's).
      tau: τ in [0, η], the KL-regularisation weight (default η/3, the paper's).

    Returns:
      Per-example loss [B], float32.
    """
    check_positive("eta", eta)
    tau = eta / 3.0 if tau is None else tau
    check_range("tau", tau, 0.0, eta, high_open=False)
    w = tau / eta
    h_t = (
        (f32(policy_chosen_logps) - f32(policy_rejected_logps))
        - w * (f32(reference_chosen_logps) - f32(reference_rejected_logps))
        - (1.0 - w) * (f32(previous_chosen_logps) - f32(previous_rejected_logps))
    )
    return (h_t - 1.0 / (2.0 * eta)) ** 2


def rpo(
    *,
    policy_chosen_logps,
    policy_rejected_logps,
    reference_chosen_logps,
    reference_rejected_logps,
    beta: float = 0.1,
    eta: float = 0.005,
) -> Array:
    """Regularised Preference Optimisation: DPO plus an SFT term on the chosen response.

    loss = -logσ(β h) - η · β · lp_w.

    Liu et al. 2024, "Provably Mitigating Overoptimization in RLHF: Your SFT Loss is Implicitly an
    Adversarial Regularizer", Algorithm 1 as in the authors' code: the NLL of the chosen response
    (summed over its tokens) weighted by η·β is added to the DPO loss. η = 0 gives `dpo`.

    Args:
      policy_chosen_logps, policy_rejected_logps, reference_chosen_logps, reference_rejected_logps:
        summed log-probs, [B].
      beta: β > 0 (default 0.1).
      eta: η >= 0, weight of the SFT regulariser relative to β (default 0.005).

    Returns:
      Per-example loss [B], float32.
    """
    check_range("eta", eta, 0.0, float("inf"))
    base = dpo(
        policy_chosen_logps=policy_chosen_logps,
        policy_rejected_logps=policy_rejected_logps,
        reference_chosen_logps=reference_chosen_logps,
        reference_rejected_logps=reference_rejected_logps,
        beta=beta,
    )
    return base - eta * beta * f32(policy_chosen_logps)


def chosen_nll(*, policy_chosen_logps, policy_rejected_logps) -> Array:
    """The negative log-likelihood of the chosen response alone: SFT on the chosen half of each pair.

    loss = -lp_w (summed over the response's tokens).

    Not a preference loss: the control that asks whether a preference method's gain is only its SFT
    term, e.g. RPO's η·β·NLL (Liu et al. 2024, `rpo`); trained through the same preference stage (same
    pairs, steps, optimizer and evaluation). Needs no reference model. With Adam the scale of the loss
    barely matters (updates are normalised), so no weight is offered.

    Args:
      policy_chosen_logps: summed log-probs of the chosen responses under the policy, [B].
      policy_rejected_logps: taken, as by every registered pairwise loss; enters as 0·lp_l (zero gradient).

    Returns:
      Per-example loss [B], float32.
    """
    # 0·lp_l, not `del`: the rejected half stays in the program with an exactly-zero gradient. Dropped,
    # XLA:CPU pruned the rejected rows' backward on the 8-device test mesh and its collectives deadlocked.
    return -f32(policy_chosen_logps) + 0.0 * f32(policy_rejected_logps)


def simpo(
    *,
    policy_chosen_logps,
    policy_rejected_logps,
    chosen_lengths,
    rejected_lengths,
    beta: float = 2.0,
    gamma: float = 0.5,
) -> Array:
    """SimPO: reference-free, length-normalised sigmoid loss with a target margin.

    loss = -logσ(β (lp_w/L_w - lp_l/L_l) - γ).

    Meng et al. 2024, "SimPO: Simple Preference Optimization with a Reference-Free Reward", Eq. 6.

    Args:
      policy_chosen_logps, policy_rejected_logps: summed policy log-probs, [B].
      chosen_lengths, rejected_lengths: completion token counts, [B] (clamped at 1).
      beta: β > 0, reward scale (default 2.0).
      gamma: γ, the target reward margin (default 0.5).

    Returns:
      Per-example loss [B], float32.
    """
    check_positive("beta", beta)
    avg_w = per_token(policy_chosen_logps, chosen_lengths)
    avg_l = per_token(policy_rejected_logps, rejected_lengths)
    return -jax.nn.log_sigmoid(beta * (avg_w - avg_l) - gamma)


def orpo(
    *,
    policy_chosen_logps,
    policy_rejected_logps,
    chosen_lengths,
    rejected_lengths,
    lam: float = 0.1,
) -> Array:
    """Odds-Ratio Preference Optimisation: SFT NLL plus a log-odds-ratio term, no reference model.

    With the per-token mean log-probs a_w = lp_w/L_w and a_l = lp_l/L_l,
      log-odds = (a_w - a_l) - (log(1 - e^{a_w}) - log(1 - e^{a_l})),
      loss = -a_w - λ · logσ(log-odds).

    Hong et al. 2024, "ORPO: Monolithic Preference Optimization without Reference Model", Eq. 6-7,
    and TRL's ORPOTrainer (odds from mean per-token log-probs; λ is TRL's `beta`). log(1 - e^a) is
    computed stably, with a clamped at -1e-6.

    Args:
      policy_chosen_logps, policy_rejected_logps: summed policy log-probs, [B].
      chosen_lengths, rejected_lengths: completion token counts, [B] (clamped at 1).
      lam: λ >= 0, weight of the odds-ratio term (default 0.1).

    Returns:
      Per-example loss [B], float32.
    """
    check_range("lam", lam, 0.0, float("inf"))
    a_w = per_token(policy_chosen_logps, chosen_lengths)
    a_l = per_token(policy_rejected_logps, rejected_lengths)
    a_w_c, a_l_c = jnp.minimum(a_w, -1e-6), jnp.minimum(a_l, -1e-6)
    log_odds = (a_w_c - a_l_c) - (log1mexp(a_w_c) - log1mexp(a_l_c))
    return -a_w - lam * jax.nn.log_sigmoid(log_odds)


def cdpo(
    *,
    policy_chosen_logps,
    policy_rejected_logps,
    reference_chosen_logps,
    reference_rejected_logps,
    beta: float = 0.1,
    label_smoothing: float = 0.1,
) -> Array:
    """Conservative DPO: `dpo` with label smoothing ε (default 0.1), under its own registry name.

    loss = -(1 - ε) logσ(β h) - ε logσ(-β h). Mitchell 2023, "A note on DPO with noisy preferences &
    relationship to IPO". The gradient vanishes at β h = log((1 - ε)/ε).
    """
    return dpo(
        policy_chosen_logps=policy_chosen_logps,
        policy_rejected_logps=policy_rejected_logps,
        reference_chosen_logps=reference_chosen_logps,
        reference_rejected_logps=reference_rejected_logps,
        beta=beta,
        label_smoothing=label_smoothing,
    )


def sigmoid_norm(
    *,
    policy_chosen_logps,
    policy_rejected_logps,
    reference_chosen_logps,
    reference_rejected_logps,
    gamma: float = 0.05,
) -> Array:
    """RSO's "sigmoid-norm" loss: -logσ(γ h), i.e. `dpo` with β = γ, in the RSO paper's notation.

    Liu et al. 2024 (RSO), Eq. 8, with γ = 0.05 the paper's TL;DR setting. Kept as its own name so an
    RSO config reads `loss.name="sigmoid_norm", loss.gamma=0.05` like the paper. (TRL's
    loss_type="sigmoid_norm" is a different, length-normalised loss: `dpo_length_normalized`.)
    """
    return dpo(
        policy_chosen_logps=policy_chosen_logps,
        policy_rejected_logps=policy_rejected_logps,
        reference_chosen_logps=reference_chosen_logps,
        reference_rejected_logps=reference_rejected_logps,
        beta=gamma,
    )
