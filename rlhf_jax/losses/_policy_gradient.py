"""Policy-gradient losses and group advantages for online RL: GRPO, Dr. GRPO, DAPO, RLOO, GSPO.

Conventions shared by every function here:
  * A group is the G samples drawn for one prompt; rewards arrive as ``rewards_PG`` (P prompts, G
    samples each; here G is the group, not the dimension key's key/value heads). Flattened
    row-major, ``advantages_PG.reshape(-1)`` is ``advantages_B`` with B = P·G, prompt-major.
  * Log-probs are per completion token, [B, T], float32 or bfloat16, of the sampled tokens;
    ``mask_BT`` is 1 on the tokens that carry loss (completion tokens, not padding or prompt).
    Everything is computed in float32. Positions outside the mask never reach an `exp`, so their
    values (padding garbage, -inf) cannot turn the loss into NaN.
  * ``old_logps_BT`` (the policy that sampled, π_old) and ``reference_logps_BT`` (the frozen π_ref)
    are constants: gradients stop at them, as TRL's detached tensors do.
  * Sign: the loss is to be *minimised*; a positive advantage raises the log-probs of its tokens.
  * All arguments are keyword-only; string options and Python-number hyperparameters are checked
    eagerly and a ValueError names the argument; traced values are not range-checked.

Anchors: TRL ``GRPOTrainer`` (``loss_type``, ``scale_rewards``, ``importance_sampling_level``,
``epsilon``/``epsilon_high``, ``delta``, ``beta``) and Tunix ``GRPOConfig`` (``advantage_estimator``,
``loss_agg_mode``, ``loss_algo``, ``kl_loss_mode``, ``epsilon``/``epsilon_high``). Each option below
says which of theirs it equals.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from rlhf_jax.losses._common import Array, check_positive, check_range, f32

ESTIMATORS = ("grpo", "dr_grpo", "rloo")
SCALES = ("group", "batch", "none")
AGGREGATIONS = ("grpo", "bnpo", "dr_grpo", "dapo")
IMPORTANCE_LEVELS = ("token", "sequence")


def _check_choice(name: str, value, choices: tuple[str, ...]) -> None:
    """Raises ValueError naming the argument when `value` is not one of `choices`."""
    if value not in choices:
        raise ValueError(f"{name} must be one of {choices}, got {value!r}")


def group_advantages(
    *, rewards_PG, estimator: str = "grpo", scale: str = "group", eps: float = 1e-4
) -> Array:
    """Advantages of G samples per prompt, from their scalar rewards, relative to their group.

    With r the rewards of one group (one row of ``rewards_PG``), mean_g their mean:

      "grpo":    A = (r - mean_g) / (std + eps), std with ddof=1 (Bessel, as torch.std, TRL and Tunix)
                 over the group (scale="group") or over all P·G rewards (scale="batch"); scale="none"
                 gives A = r - mean_g. Shao et al. 2024, DeepSeekMath (arXiv 2402.03300), §4.1.2
                 "outcome supervision". TRL: the GRPOTrainer's advantages with
                 ``scale_rewards="group" | "batch" | "none"`` (TRL's eps is 1e-4, our default); Tunix:
                 ``advantage_estimator="grpo"`` (group std only, eps 1e-6).
      "dr_grpo": A = r - mean_g, never divided by a std, which biases learning towards too easy and too
                 hard questions (Liu et al. 2025, "Understanding R1-Zero-Like Training", Dr. GRPO,
                 arXiv 2503.20783, Eq. 3). Equals "grpo" with scale="none"; TRL
                 ``scale_rewards="none"``; Tunix ``advantage_estimator="drgrpo"``.
      "rloo":    A_i = r_i - (Σ_{j≠i} r_j) / (G - 1), the mean of the other G-1 rewards of the group
                 as baseline = G/(G-1)·(r_i - mean_g) (Ahmadian et al. 2024, "Back to Basics:
                 Revisiting REINFORCE Style Optimization", arXiv 2402.14740, Eq. 7). TRL
                 ``RLOOTrainer`` (with ``normalize_advantages=False``); Tunix
                 ``advantage_estimator="rloo"``.

    A group whose rewards are all equal carries no signal: its advantages are exactly 0 (not a
    rounding residue divided by eps), the groups DAPO's dynamic sampling drops.

    Args:
      rewards_PG: rewards [P, G], G >= 2 samples per prompt.
      estimator: "grpo" (default), "dr_grpo" or "rloo".
      scale: "group" (default), "batch" or "none": the std that divides "grpo" advantages.
        "dr_grpo" and "rloo" never divide, so they accept "group" (the default, unused) or "none",
        and raise on "batch" rather than ignore it.
      eps: > 0, added to the std (default 1e-4, as TRL).

    Returns:
      Advantages [P, G], float32.

    Raises:
      ValueError: on an unknown estimator or scale, "batch" with a non-"grpo" estimator, eps <= 0,
        or rewards that are not [P, G] with G >= 2.
    """
    _check_choice("estimator", estimator, ESTIMATORS)
    _check_choice("scale", scale, SCALES)
    if estimator != "grpo" and scale == "batch":
        raise ValueError(
            f"scale='batch' divides by a std, but estimator={estimator!r} never divides: "
            "use scale='group' (default) or 'none'"
        )
    check_positive("eps", eps)
    r_PG = f32(rewards_PG)
    if r_PG.ndim != 2 or r_PG.shape[1] < 2:
        raise ValueError(f"rewards_PG must be [P, G] with G >= 2 samples per prompt, got shape {r_PG.shape}")
    num_samples = r_PG.shape[1]
    mean_P1 = jnp.mean(r_PG, axis=1, keepdims=True)
    spread_P1 = jnp.max(r_PG, axis=1, keepdims=True) - jnp.min(r_PG, axis=1, keepdims=True)
    if estimator == "rloo":
        others_mean_PG = (jnp.sum(r_PG, axis=1, keepdims=True) - r_PG) / (num_samples - 1)
        centred_PG = r_PG - others_mean_PG
    else:
        centred_PG = r_PG - mean_P1
    # mean_g of equal floats can differ from them by an ulp; an all-equal group is exactly 0.
    centred_PG = jnp.where(spread_P1 == 0.0, 0.0, centred_PG)
    if estimator != "grpo" or scale == "none":
        return centred_PG
    if scale == "group":
        std = jnp.std(r_PG, axis=1, ddof=1, keepdims=True)
    else:
        std = jnp.std(r_PG, ddof=1)
    return centred_PG / (std + eps)


def _log_ratios(logps_BT, old_logps_BT, mask_BT, importance_level: str) -> tuple[Array, Array, Array]:
    """(log importance weights [B, T], logps [B, T], mask [B, T]) in float32, masked-out positions 0."""
    logps = f32(logps_BT)
    old = jax.lax.stop_gradient(f32(old_logps_BT))
    mask = f32(mask_BT)
    log_ratio_BT = jnp.where(mask > 0, logps - old, 0.0)
    if importance_level == "token":
        return log_ratio_BT, logps, mask
    # GSPO: one weight per sequence, the length-normalised log of the sequence likelihood ratio.
    count_B1 = jnp.maximum(jnp.sum(mask, axis=1, keepdims=True), 1.0)
    log_w_B1 = jnp.sum(log_ratio_BT * mask, axis=1, keepdims=True) / count_B1
    return jnp.broadcast_to(log_w_B1, log_ratio_BT.shape), logps, mask


def _k3(logps_BT, reference_logps_BT, mask_BT) -> Array:
    """Schulman's k3 KL estimator per token, exp(ref - logp) - (ref - logp) - 1, 0 outside the mask."""
    ref = jax.lax.stop_gradient(f32(reference_logps_BT))
    diff_BT = jnp.where(mask_BT > 0, ref - logps_BT, 0.0)
    return jnp.exp(diff_BT) - diff_BT - 1.0


def _check_shapes(logps_BT, old_logps_BT, advantages_B, mask_BT, reference_logps_BT, advantages_BT=None):
    """Raises ValueError with the shapes unless the [B, T] inputs agree and exactly one of advantages_B
    ([B]) and advantages_BT ([B, T]) is given."""
    shape = jnp.shape(logps_BT)
    named = {"old_logps_BT": old_logps_BT, "mask_BT": mask_BT, "reference_logps_BT": reference_logps_BT,
             "advantages_BT": advantages_BT}  # fmt: skip
    if len(shape) != 2:
        raise ValueError(f"logps_BT must be [B, T], got shape {shape}")
    for name, x in named.items():
        if x is not None and jnp.shape(x) != shape:
            raise ValueError(f"{name} must have the shape of logps_BT {shape}, got {jnp.shape(x)}")
    if (advantages_B is None) == (advantages_BT is None):
        raise ValueError("pass exactly one of advantages_B (per sequence) and advantages_BT (per token)")
    if advantages_B is not None and jnp.shape(advantages_B) != shape[:1]:
        raise ValueError(f"advantages_B must be [B] = {shape[:1]}, got shape {jnp.shape(advantages_B)}")


def _advantages(advantages_B, advantages_BT) -> Array:
    """Advantages broadcastable against [B, T], float32, constant: [B, 1] per sequence or [B, T]."""
    adv = f32(advantages_B)[:, None] if advantages_BT is None else f32(advantages_BT)
    return jax.lax.stop_gradient(adv)


def _clip_bounds(epsilon_low, epsilon_high) -> tuple[float, float]:
    """(ε_low, ε_high) checked, ε_high defaulting to ε_low."""
    check_range("epsilon_low", epsilon_low, 0.0, 1.0)
    epsilon_high = epsilon_low if epsilon_high is None else epsilon_high
    check_range("epsilon_high", epsilon_high, 0.0, float("inf"))
    return epsilon_low, epsilon_high


def policy_gradient_loss(
    *,
    logps_BT,
    old_logps_BT,
    advantages_B=None,
    mask_BT,
    reference_logps_BT=None,
    advantages_BT=None,
    beta: float = 0.0,
    epsilon_low: float = 0.2,
    epsilon_high: float | None = None,
    delta: float | None = None,
    aggregation: str = "dapo",
    max_length: int | None = None,
    token_normalizer=None,
    importance_level: str = "token",
) -> Array:
    """Clipped-surrogate policy-gradient loss of the GRPO family, with an optional k3 KL penalty.

    Per token t of sequence b (A = advantages_B[b], or advantages_BT[b, t] for PPO with a critic;
    masked tokens only):

      w     = logp - old_logp                                    (importance_level="token")
            = Σ_t m_t (logp - old_logp) / Σ_t m_t, for every t   (importance_level="sequence", GSPO)
      ratio = exp(w);  ratio' = min(ratio, δ) if delta is set, else ratio
      term  = -min(ratio'·A, clip(ratio, 1 - ε_low, 1 + ε_high)·A)  [+ β·k3 when β > 0]
      k3    = exp(ref - logp) - (ref - logp) - 1

    The clipped surrogate is PPO's (Schulman et al. 2017) as GRPO uses it (Shao et al. 2024,
    DeepSeekMath, arXiv 2402.03300, Eq. 3), with A broadcast over the tokens of its sequence.
    Decoupled ε_low / ε_high is DAPO's clip-higher (Yu et al. 2025, arXiv 2503.14476, Eq. 10; they
    use ε_high = 0.28): TRL ``epsilon`` / ``epsilon_high``, Tunix ``epsilon`` / ``epsilon_high``.
    The sequence-level weight is GSPO's s_i(θ) (Zheng et al. 2025, arXiv 2507.18071, Eq. 7): TRL
    ``importance_sampling_level="sequence"``; Tunix ``loss_algo="gspo-token"`` has the same value but
    routes the gradient per token. δ is two-sided clipping: the unclipped ratio is capped at δ, so a
    negative-advantage token whose ratio has grown past δ stops pushing (its term is bounded by δ|A|)
    instead of growing without bound; TRL ``delta`` exactly (TRL applies it to the unclipped term
    only, after the clipped ratio is taken from the uncapped one, as here), from INTELLECT-2 (arXiv
    2505.07291) and used by Light-R1 (arXiv 2503.10460) for μ > 1 updates per batch. k3 is
    Schulman's low-variance estimator of KL(π_θ || π_ref) (GRPO Eq. 4): TRL's ``beta`` term, Tunix
    ``kl_loss_mode="low_var_kl"``; its value and gradient are 0 at π_θ = π_ref.

    With Σ the masked sum over all tokens, n_b = Σ_t m_bt the tokens of sequence b (at least 1):

      "grpo":    (1/B) Σ_b (Σ_t m_bt term_bt) / n_b: the mean over sequences of per-sequence token
                 means (GRPO Eq. 3). TRL ``loss_type="grpo"``; Tunix
                 ``loss_agg_mode="sequence-mean-token-mean"`` (which averages over non-empty rows only).
      "bnpo":    Σ m·term / max(Σ m, 1), the token mean of this batch. TRL ``loss_type="bnpo"``; Tunix
                 ``"token-mean"`` on a single batch.
      "dr_grpo": Σ m·term / (B · max_length), a constant normaliser (Dr. GRPO, arXiv 2503.20783,
                 Eq. 3, which removes the per-sequence 1/|o_i| that lengthens wrong answers). TRL
                 ``loss_type="dr_grpo"`` with ``max_length = max_completion_length``; Tunix
                 ``"sequence-mean-token-scale"`` with norm = max_length.
      "dapo":    Σ m·term / max(token_normalizer, 1), token_normalizer defaulting to the local Σ m:
                 DAPO's token-level loss (Eq. 12), TRL ``loss_type="dapo"`` (TRL's normaliser is
                 ``num_items_in_batch``, the token count of the whole accumulated global batch); Tunix
                 ``"token-mean"``, whose accumulator divides summed gradients by the summed token count.

    Gradient accumulation and several processes: with "dapo", pass token_normalizer = the number of
    loss tokens of the whole optimizer step (every micro-batch, every process); then the micro-batch
    losses *sum* exactly to the loss of the one large batch. With "grpo", "bnpo" and "dr_grpo" the
    micro-batch losses are to be *averaged* (TRL divides them by the accumulation steps); "bnpo" and
    "grpo" then weight micro-batches equally rather than by their tokens, as TRL does.

    Args:
      logps_BT: log-probs of the sampled tokens under the policy being trained, [B, T].
      old_logps_BT: the same under the policy that sampled them (π_old, constant), [B, T]; equal to
        logps_BT at the first update of a batch (then ratio = 1 and the gradient is -A·m/normaliser).
      advantages_B: one advantage per sequence, [B] (e.g. ``group_advantages(...).reshape(-1)``).
      mask_BT: 1 on loss tokens, 0 elsewhere (bool, int or float), [B, T].
      reference_logps_BT: log-probs under the frozen reference policy, [B, T]; needed when beta > 0.
      advantages_BT: instead of advantages_B, one advantage per token, [B, T] (PPO with a critic:
        `losses.gae`); exactly one of the two is given. Constant either way.
      beta: β >= 0, the weight of the k3 KL penalty (default 0: no penalty, no reference needed).
      epsilon_low: ε_low in [0, 1), the lower clip 1 - ε_low (default 0.2).
      epsilon_high: ε_high >= 0, the upper clip 1 + ε_high (default: ε_low).
      delta: δ > 1, the cap on the unclipped ratio (default None: no cap).
      aggregation: "grpo", "bnpo", "dr_grpo" or "dapo" (default), as above.
      max_length: the maximum completion length, required by (and only used by) "dr_grpo".
      token_normalizer: "dapo" only: the token count to divide by (scalar, may be traced); default
        the local masked count.
      importance_level: "token" (default) or "sequence" (GSPO).

    Returns:
      The scalar loss, float32.

    Raises:
      ValueError: naming the argument, on an unknown aggregation or importance_level, "dr_grpo"
        without max_length, token_normalizer with another aggregation, beta > 0 without
        reference_logps_BT, out-of-range hyperparameters, or mismatched shapes.
    """
    _check_choice("aggregation", aggregation, AGGREGATIONS)
    _check_choice("importance_level", importance_level, IMPORTANCE_LEVELS)
    epsilon_low, epsilon_high = _clip_bounds(epsilon_low, epsilon_high)
    if delta is not None:
        check_range("delta", delta, 1.0, float("inf"), low_open=True)
    if aggregation == "dr_grpo":
        if max_length is None:
            raise ValueError("aggregation='dr_grpo' needs max_length (the maximum completion length)")
        check_positive("max_length", max_length)
    if token_normalizer is not None and aggregation != "dapo":
        raise ValueError(
            f"token_normalizer applies to aggregation='dapo' only, got aggregation={aggregation!r}"
        )
    check_range("beta", beta, 0.0, float("inf"))
    use_kl = isinstance(beta, jax.core.Tracer) or float(beta) > 0.0
    if use_kl and reference_logps_BT is None:
        raise ValueError(f"beta={beta} > 0 needs reference_logps_BT (the KL penalty's reference)")
    _check_shapes(logps_BT, old_logps_BT, advantages_B, mask_BT, reference_logps_BT, advantages_BT)

    log_w_BT, logps, mask = _log_ratios(logps_BT, old_logps_BT, mask_BT, importance_level)
    ratio_BT = jnp.exp(log_w_BT)
    clipped_BT = jnp.clip(ratio_BT, 1.0 - epsilon_low, 1.0 + epsilon_high)
    if delta is not None:
        ratio_BT = jnp.minimum(ratio_BT, delta)
    adv = _advantages(advantages_B, advantages_BT)
    term_BT = -jnp.minimum(ratio_BT * adv, clipped_BT * adv)
    if use_kl:
        term_BT = term_BT + beta * _k3(logps, reference_logps_BT, mask)

    masked_BT = term_BT * mask
    if aggregation == "grpo":
        count_B = jnp.maximum(jnp.sum(mask, axis=1), 1.0)
        return jnp.mean(jnp.sum(masked_BT, axis=1) / count_B)
    if aggregation == "bnpo":
        return jnp.sum(masked_BT) / jnp.maximum(jnp.sum(mask), 1.0)
    if aggregation == "dr_grpo":
        return jnp.sum(masked_BT) / (mask.shape[0] * max_length)
    normalizer = jnp.sum(mask) if token_normalizer is None else f32(token_normalizer)
    return jnp.sum(masked_BT) / jnp.maximum(normalizer, 1.0)


def policy_gradient_metrics(
    *,
    logps_BT,
    old_logps_BT,
    advantages_B=None,
    mask_BT,
    reference_logps_BT=None,
    advantages_BT=None,
    epsilon_low: float = 0.2,
    epsilon_high: float | None = None,
    importance_level: str = "token",
) -> dict[str, Array]:
    """Diagnostics of a `policy_gradient_loss` step, as masked token means (scalars).

      clip_frac_low:  share of tokens with A < 0 and ratio < 1 - ε_low (the clip holds them)
      clip_frac_high: share of tokens with A > 0 and ratio > 1 + ε_high
      ratio_mean:     mean importance ratio (1 at the first update of a batch)
      kl:             mean k3 estimate of KL(π_θ || π_ref), only when reference_logps_BT is given

    The ratio is the loss's (per token, or GSPO's per sequence with importance_level="sequence"),
    before any δ cap; the clip fractions are TRL's ``clip_ratio/low_mean`` and ``clip_ratio/high_mean``.
    The names are the ``metrics.jsonl`` keys. Means are over this batch's loss tokens.

    Args:
      logps_BT, old_logps_BT, advantages_B, mask_BT, reference_logps_BT, advantages_BT, epsilon_low,
      epsilon_high, importance_level: as for `policy_gradient_loss`.

    Returns:
      {"clip_frac_low", "clip_frac_high", "ratio_mean"[, "kl"]}: float32 scalars.
    """
    _check_choice("importance_level", importance_level, IMPORTANCE_LEVELS)
    epsilon_low, epsilon_high = _clip_bounds(epsilon_low, epsilon_high)
    _check_shapes(logps_BT, old_logps_BT, advantages_B, mask_BT, reference_logps_BT, advantages_BT)
    log_w_BT, logps, mask = _log_ratios(logps_BT, old_logps_BT, mask_BT, importance_level)
    ratio_BT = jnp.exp(log_w_BT)
    adv = _advantages(advantages_B, advantages_BT)
    count = jnp.maximum(jnp.sum(mask), 1.0)

    def masked_mean(x_BT):
        return jnp.sum(f32(x_BT) * mask) / count

    out = {
        "clip_frac_low": masked_mean((adv < 0) & (ratio_BT < 1.0 - epsilon_low)),
        "clip_frac_high": masked_mean((adv > 0) & (ratio_BT > 1.0 + epsilon_high)),
        "ratio_mean": masked_mean(ratio_BT),
    }
    if reference_logps_BT is not None:
        out["kl"] = masked_mean(_k3(logps, reference_logps_BT, mask))
    return out
