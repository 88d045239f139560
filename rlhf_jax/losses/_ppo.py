"""PPO with a learned critic: per-token rewards with a KL penalty, GAE, the clipped value loss,
advantage whitening and the adaptive KL coefficient.

The RLHF form of PPO (Ziegler et al. 2019, "Fine-Tuning Language Models from Human Preferences",
arXiv 1909.08593; Stiennon et al. 2020; Ouyang et al. 2022) as PPO for NLU (arXiv 2410.11020) uses it:
the task reward arrives on the last completion token, every token pays the KL penalty
-β·(log π_old - log π_ref), a value head predicts the return per token, GAE (Schulman et al. 2016,
"High-Dimensional Continuous Control Using Generalized Advantage Estimation", arXiv 1506.02438)
turns rewards and values into per-token advantages, and the policy is updated with the clipped
surrogate of `policy_gradient_loss` given ``advantages_BT`` (per token) instead of GRPO's
``advantages_B`` (per sequence).

Conventions as in the GRPO family (``_policy_gradient``): [B, T] arrays over completion tokens,
``mask_BT`` 1 on tokens that carry loss (right-padded or with gaps, e.g. tool outputs), float32
compute, keyword-only arguments, hyperparameters checked eagerly. Rewards, values and returns that
feed GAE are constants (gradients stop at them), as in TRL's ``PPOTrainer`` (no_grad rollout) and
OpenRLHF.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from rlhf_jax.losses._common import Array, check_positive, check_range, f32

KL_ESTIMATORS = ("k1", "k3")


def _check_same_shape(**arrays) -> tuple[int, ...]:
    """Raises ValueError naming the argument unless every given [B, T] array has the first's shape."""
    items = [(k, v) for k, v in arrays.items() if v is not None]
    name0, x0 = items[0]
    shape = jnp.shape(x0)
    if len(shape) != 2:
        raise ValueError(f"{name0} must be [B, T], got shape {shape}")
    for name, x in items[1:]:
        if jnp.shape(x) != shape:
            raise ValueError(f"{name} must have the shape of {name0} {shape}, got {jnp.shape(x)}")
    return shape


def last_token_mask(mask_BT) -> Array:
    """1 on the last masked-in token of each row, 0 elsewhere (all 0 for an empty row), float32 [B, T]."""
    mask = f32(mask_BT) > 0
    t_BT = jnp.broadcast_to(jnp.arange(mask.shape[1])[None, :], mask.shape)
    last_B1 = jnp.max(jnp.where(mask, t_BT, -1), axis=1, keepdims=True)
    return (t_BT == last_B1).astype(jnp.float32) * mask


def kl_penalized_rewards(
    *,
    scores_B,
    logps_BT,
    reference_logps_BT,
    mask_BT,
    beta,
    kl_estimator: str = "k1",
    score_clip: float | None = None,
) -> Array:
    """Per-token rewards of RLHF-style PPO: the KL penalty on every token, the task score on the last.

        r_t = -β·kl_t + [t = last masked-in token]·clip(score, -c, c)
        kl_t = log π(y_t) - log π_ref(y_t)                     ("k1", Ziegler et al. 2019 Eq. 2)
             = exp(ref - logp) - (ref - logp) - 1              ("k3", Schulman's estimator, ≥ 0)

    k1 summed over a completion is the sampled estimate of KL(π || π_ref) of that completion, the
    penalty of Ziegler et al. 2019 / Stiennon et al. 2020 and TRL's ``PPOTrainer``
    (``kl_estimator="k1"``, default) and OpenRLHF (``kl_estimator="k1"``); k3 is TRL's
    ``kl_estimator="k3"``. PPO for NLU (arXiv 2410.11020, §3) places the task reward on the last token
    of the completion and subtracts the KL penalty per token. ``score_clip`` is reward clipping
    (OpenRLHF ``reward_clip_range``, PPO for NLU's bounded rewards); default None: no clip.

    Args:
      scores_B: the task reward of each completion, [B].
      logps_BT: log-probs of the sampled tokens under the sampling policy (π_old), [B, T].
      reference_logps_BT: the same under the frozen reference, [B, T].
      mask_BT: 1 on completion tokens, [B, T]; the score goes on each row's last masked-in token (an
        empty row gets none).
      beta: β >= 0, the KL coefficient (may be traced: the adaptive controller's current value).
      kl_estimator: "k1" (default) or "k3".
      score_clip: c > 0 clips the score to [-c, c]; None (default) leaves it.

    Returns:
      Rewards [B, T], float32, 0 outside the mask; constants (no gradient).
    """
    if kl_estimator not in KL_ESTIMATORS:
        raise ValueError(f"kl_estimator must be one of {KL_ESTIMATORS}, got {kl_estimator!r}")
    check_range("beta", beta, 0.0, float("inf"))
    if score_clip is not None:
        check_positive("score_clip", score_clip)
    shape = _check_same_shape(logps_BT=logps_BT, reference_logps_BT=reference_logps_BT, mask_BT=mask_BT)
    if jnp.shape(scores_B) != shape[:1]:
        raise ValueError(f"scores_B must be [B] = {shape[:1]}, got shape {jnp.shape(scores_B)}")
    mask = f32(mask_BT)
    diff_BT = jnp.where(mask > 0, f32(logps_BT) - f32(reference_logps_BT), 0.0)
    if kl_estimator == "k1":
        kl_BT = diff_BT
    else:
        kl_BT = jnp.exp(-diff_BT) + diff_BT - 1.0
    score_B = f32(scores_B)
    if score_clip is not None:
        score_B = jnp.clip(score_B, -score_clip, score_clip)
    rewards_BT = (-f32(beta) * kl_BT) * mask + last_token_mask(mask) * score_B[:, None]
    return jax.lax.stop_gradient(rewards_BT)


def gae(*, rewards_BT, values_BT, mask_BT, gamma, lam) -> tuple[Array, Array]:
    """Generalized advantage estimation over completion tokens (Schulman et al. 2016, Eq. 16).

    Over the masked-in tokens t_1 < t_2 < ... < t_n of a row (steps of one episode; positions outside
    the mask are skipped, so a gap such as a tool output joins its neighbours), with V(t_{n+1}) = 0 (the
    episode ends at the last token):

        δ_i = r(t_i) + γ·V(t_{i+1}) - V(t_i)
        Â_i = δ_i + γλ·Â_{i+1},          Â_{n+1} = 0
        R_i = Â_i + V(t_i)               (the value target: the λ-return)

    λ = 1 gives Â_i = Σ_{j≥i} γ^{j-i} r(t_j) - V(t_i), the discounted return minus the value (Monte
    Carlo); λ = 0 gives the one-step TD error δ_i. For right-padded masks this is TRL's ``PPOTrainer``
    recursion with rewards and values zeroed on padding; for masks with gaps it is verl's
    ``compute_gae_advantage_return`` (which carries the next value and Â across masked-out positions).

    Args:
      rewards_BT: per-token rewards, [B, T] (e.g. `kl_penalized_rewards`).
      values_BT: the critic's values V(s_t) of the state before each token is emitted, [B, T].
      mask_BT: 1 on the tokens of the episode, [B, T].
      gamma: discount γ in [0, 1].
      lam: GAE's λ in [0, 1].

    Returns:
      (advantages_BT, returns_BT), float32, 0 outside the mask, constants (gradients stop here).
    """
    check_range("gamma", gamma, 0.0, 1.0, high_open=False)
    check_range("lam", lam, 0.0, 1.0, high_open=False)
    _check_same_shape(rewards_BT=rewards_BT, values_BT=values_BT, mask_BT=mask_BT)
    mask_BT = f32(mask_BT) > 0
    rewards_BT = jnp.where(mask_BT, jax.lax.stop_gradient(f32(rewards_BT)), 0.0)
    values_BT = jnp.where(mask_BT, jax.lax.stop_gradient(f32(values_BT)), 0.0)

    def step(carry, xs):
        next_value_B, next_adv_B = carry
        r_B, v_B, m_B = xs
        adv_B = r_B + gamma * next_value_B - v_B + gamma * lam * next_adv_B
        carry = (jnp.where(m_B, v_B, next_value_B), jnp.where(m_B, adv_B, next_adv_B))
        return carry, jnp.where(m_B, adv_B, 0.0)

    zeros_B = jnp.zeros(rewards_BT.shape[:1], jnp.float32)
    _, adv_TB = jax.lax.scan(step, (zeros_B, zeros_B), (rewards_BT.T, values_BT.T, mask_BT.T), reverse=True)
    advantages_BT = adv_TB.T
    returns_BT = jnp.where(mask_BT, advantages_BT + values_BT, 0.0)
    return advantages_BT, returns_BT


def whiten(*, values_BT, mask_BT, shift_mean: bool = True, eps: float = 1e-8) -> Array:
    """Masked whitening: (x - mean) / sqrt(var + eps) over the masked-in entries of the whole batch.

    The variance is unbiased (divided by n - 1), as TRL's ``masked_whiten``/``masked_var``; with
    shift_mean=False the mean is added back (TRL whitens rewards that way). Advantage whitening is
    PPO's standard normalisation (OpenAI baselines; TRL ``PPOTrainer`` always whitens advantages).
    Positions outside the mask are 0. With fewer than two masked entries the input is returned centred
    (or as it is) without scaling.

    Returns:
      [B, T] float32.
    """
    check_positive("eps", eps)
    x = f32(values_BT)
    mask = f32(mask_BT)
    n = jnp.sum(mask)
    mean = jnp.sum(x * mask) / jnp.maximum(n, 1.0)
    centred = jnp.where(mask > 0, x - mean, 0.0)
    var = jnp.sum(centred**2) / jnp.maximum(n - 1.0, 1.0)
    scale = jnp.where(n >= 2, jax.lax.rsqrt(var + eps), 1.0)
    out = centred * scale
    if not shift_mean:
        out = out + mean
    return jnp.where(mask > 0, out, 0.0)


def value_loss(*, values_BT, old_values_BT, returns_BT, mask_BT, clip: float | None = 0.2) -> Array:
    """PPO's clipped value loss, the masked token mean of

        ½·max((V - R)², (V_clip - R)²),    V_clip = V_old + clip(V - V_old, -c, c)

    (the value clipping of OpenAI baselines' PPO2; TRL ``PPOTrainer`` with ``cliprange_value`` and
    its ½, OpenRLHF ``value_clip``). The max makes clipping pessimistic: when V has moved more than c
    from V_old and the clipped prediction is the worse one, the loss is constant in V (zero gradient);
    otherwise the gradient is V - R. clip=None gives the plain ½·(V - R)².

    Args:
      values_BT: the critic's current values, [B, T] (the only input with a gradient).
      old_values_BT: the values at rollout time (constant), [B, T].
      returns_BT: the targets (GAE's returns, constant), [B, T].
      mask_BT: 1 on loss tokens, [B, T].
      clip: c > 0 (default 0.2, as TRL's ``cliprange_value``) or None.

    Returns:
      The scalar loss, float32 (0 for an all-masked batch).
    """
    if clip is not None:
        check_positive("clip", clip)
    _check_same_shape(
        values_BT=values_BT, old_values_BT=old_values_BT, returns_BT=returns_BT, mask_BT=mask_BT
    )
    mask = f32(mask_BT)
    v = f32(values_BT)
    old = jax.lax.stop_gradient(f32(old_values_BT))
    target = jax.lax.stop_gradient(f32(returns_BT))
    loss_BT = jnp.square(v - target)
    if clip is not None:
        v_clipped = old + jnp.clip(v - old, -clip, clip)
        loss_BT = jnp.maximum(loss_BT, jnp.square(v_clipped - target))
    loss_BT = jnp.where(mask > 0, loss_BT, 0.0)
    return 0.5 * jnp.sum(loss_BT) / jnp.maximum(jnp.sum(mask), 1.0)


def adaptive_kl_coef(*, coef, kl, target: float, horizon: float, n_steps) -> Array:
    """One update of the adaptive KL controller (Ziegler et al. 2019, §2.2; TRL / OpenRLHF
    ``AdaptiveKLController``):

        e = clip(KL / KL_target - 1, -0.2, 0.2),      β ← β·(1 + e·n / horizon)

    with KL the mean per-sequence KL of the last rollout batch and n its number of episodes
    (sequences). Over a horizon of `horizon` episodes β moves by at most ±20% per unit of proportional
    error; the paper uses K_β = 0.1, i.e. n / horizon = 0.1 per batch.

    Args:
      coef: the current β > 0.
      kl: the measured KL (scalar, may be traced).
      target: KL_target > 0.
      horizon: > 0, in episodes (TRL's default 10000).
      n_steps: the batch's episodes n (>= 0).

    Returns:
      The next β, float32 scalar.
    """
    check_positive("target", target)
    check_positive("horizon", horizon)
    error = jnp.clip(f32(kl) / target - 1.0, -0.2, 0.2)
    return f32(coef) * (1.0 + error * f32(n_steps) / horizon)
