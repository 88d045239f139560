"""Turn- and trajectory-level losses: EPO's turn-level REINFORCE and GFlowNet trajectory balance.

Both are pure, keyword-only functions over log-probs already computed by the caller; neither is in
the pairwise registry. Dimension letters: B dialogues (or sampled trajectories), T tokens, U turns of
a dialogue (the assistant turns that carry loss).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from rlhf_jax.losses._common import Array, check_positive, check_range, f32


def discounted_turn_returns(*, turn_rewards_BU, turn_mask_BU, gamma: float) -> Array:
    """Discounted returns per turn, G_u = Σ_{k≥u} γ^(k-u) r_k over the valid turns of each dialogue.

    Computed right to left (G_u = r_u + γ·G_{u+1}); masked-out turns contribute no reward and their
    returns are 0. Valid turns are expected to be a prefix of U (padding at the end).

    Args:
      turn_rewards_BU: per-turn rewards [B, U].
      turn_mask_BU: 1 on the real turns, 0 on padding [B, U].
      gamma: discount in [0, 1].

    Returns:
      Returns [B, U], float32, 0 on padded turns.
    """
    check_range("gamma", gamma, 0.0, 1.0, high_open=False)
    mask_BU = f32(turn_mask_BU)
    r_UB = (f32(turn_rewards_BU) * mask_BU).T

    def step(g_B, r_B):
        g_B = r_B + gamma * g_B
        return g_B, g_B

    _, g_UB = jax.lax.scan(step, jnp.zeros_like(r_UB[0]), r_UB, reverse=True)
    return g_UB.T * mask_BU


def epo(
    *,
    token_logps_BT,
    turn_ids_BT,
    turn_rewards_BU,
    turn_mask_BU,
    gamma: float = 0.99,
    normalize: bool = True,
    eps: float = 1e-8,
) -> Array:
    """EPO's offline turn-level REINFORCE loss per dialogue [B] (Liu et al. 2025, "EPO: Explicit
    Policy Optimization for Strategic Reasoning in LLMs via Reinforcement Learning", arXiv 2502.12486).

    For dialogue b with valid turns u = 0..n_b-1, per-turn rewards r_u and the policy's token
    log-probs of the assistant tokens of each turn:

      G_u      = Σ_{k≥u} γ^(k-u) r_k                          (discounted return, REINFORCE)
      Ĝ_u      = G_u / max_{u'} |G_{u'}|                     (normalize=True; per dialogue)
      ℓ̄_u      = (1/|u|) Σ_{t ∈ turn u} log π(y_t | y_<t)    (mean over the turn's tokens)
      loss_b   = −(1/n_b) Σ_u Ĝ_u · ℓ̄_u

    Ĝ is a constant (rewards are data; the loss is offline). The paper states the objective as
    REINFORCE over turns (Σ_t G_t ∇log π(a_t|s_t), §3); the released code (AlibabaResearch/DAMO-ConvAI,
    ``EPO/LLaMA-Factory``), reproduced here, works in two parts: the returns are computed in
    data preparation (``data/utils/preprocessing.py``: ``compute_discounted_scores`` with γ = 0.99, then
    ``max_abs_normalize`` per dialogue, 0 when every return is 0), and the trainer
    (``src/llamafactory/train/sft/trainer.py``, ``reward_weighted_loss``) weights each assistant segment's
    token log-probs by score / segment length and divides the dialogue's sum by its number of segments,
    i.e. a turn's action log-prob is the *mean* over its tokens, not the paper's sum. The released
    trainer sums the dialogues' losses over the batch; this function returns them per dialogue (take
    the mean for a batch-size-independent scale: the released sum is B times that). The released
    per-turn rewards (SOTOPIA-π) are 1 on turns that reach a selected milestone, the episode score / 10
    on the last assistant turn and 0 otherwise; here they are the caller's ``turn_rewards_BU``.

    A turn with no tokens contributes ℓ̄_u = 0; a dialogue whose returns are all 0 gets loss 0
    (``eps`` guards the division). Sign: minimised; a positive return raises its turn's log-probs.

    Args:
      token_logps_BT: log π of each token [B, T] (float32 or bfloat16).
      turn_ids_BT: int [B, T], the turn index (0..U-1) of each loss-carrying token; -1 elsewhere
        (prompt, user turns, padding).
      turn_rewards_BU: per-turn rewards [B, U].
      turn_mask_BU: 1 on real turns, 0 on padding [B, U]; valid turns form a prefix.
      gamma: discount in [0, 1] (default 0.99, as released).
      normalize: divide returns by max_u |G_u| per dialogue (default True, as released).
      eps: > 0, floor of the normaliser.

    Returns:
      Loss per dialogue [B], float32.
    """
    check_positive("eps", eps)
    mask_BU = f32(turn_mask_BU)
    u = mask_BU.shape[1]
    returns_BU = discounted_turn_returns(turn_rewards_BU=turn_rewards_BU, turn_mask_BU=mask_BU, gamma=gamma)
    if normalize:
        scale_B1 = jnp.max(jnp.abs(returns_BU), axis=1, keepdims=True)
        returns_BU = returns_BU / jnp.maximum(scale_B1, eps)
    returns_BU = jax.lax.stop_gradient(returns_BU)
    # One-hot of each token's turn: [B, T, U]; tokens with id -1 (or >= U) match no turn.
    onehot_BTU = f32(jnp.asarray(turn_ids_BT)[..., None] == jnp.arange(u)[None, None, :])
    logps_BT = jnp.where(onehot_BTU.sum(-1) > 0, f32(token_logps_BT), 0.0)
    sums_BU = jnp.einsum("BT,BTU->BU", logps_BT, onehot_BTU)
    counts_BU = onehot_BTU.sum(1)
    means_BU = sums_BU / jnp.maximum(counts_BU, 1.0)
    n_B = jnp.maximum(mask_BU.sum(1), 1.0)
    return -(returns_BU * means_BU * mask_BU).sum(1) / n_B


def positive_log_rewards(*, rewards_B, temperature: float = 1.0, floor: float | None = None) -> Array:
    """log R for trajectory balance from real-valued rewards, R > 0 as GFlowNets require.

      floor=None: R = exp(r / temperature), so log R = r / temperature (any real r; the default).
      floor=ε>0:  R = max(r, ε), log R = log max(r, ε) (for rewards already >= 0, e.g. 0/1 correctness).

    Args:
      rewards_B: rewards [B].
      temperature: > 0, the reward temperature of the exponential transform.
      floor: None or > 0.

    Returns:
      log R [B], float32.
    """
    r_B = f32(rewards_B)
    if floor is None:
        check_positive("temperature", temperature)
        return r_B / temperature
    check_positive("floor", floor)
    return jnp.log(jnp.maximum(r_B, floor))


def trajectory_balance(*, logps_B, log_rewards_B, log_z) -> Array:
    """GFlowNet trajectory-balance loss per trajectory [B] (Malkin et al. 2022, "Trajectory Balance:
    Improved Credit Assignment in GFlowNets", arXiv 2201.13259, Eq. 14; the objective family of
    GFlowVLM, Kang et al. 2025, arXiv 2503.06514, Eq. 4).

      loss = (log Z + Σ_t log π(a_t | s_t) − log R(x))²

    For autoregressive generation every state has one parent, so the backward policy P_B is 1 and
    its term vanishes; Σ_t log π is the completion's summed token log-prob (``logps_B``). At the
    optimum π(x) = R(x)/Z: the policy samples complete trajectories in proportion to their reward
    (diverse high-reward samples rather than the mode). ``log_z`` is a learnable scalar that receives
    gradient here (trained with its own, usually larger, learning rate); ``log_rewards_B`` is a
    constant (see ``positive_log_rewards``).

    Args:
      logps_B: summed log π of each trajectory [B] (float32 or bfloat16).
      log_rewards_B: log R(x) [B], gradient stopped.
      log_z: scalar log partition function (a parameter).

    Returns:
      Loss per trajectory [B], float32.
    """
    delta_B = f32(log_z) + f32(logps_B) - jax.lax.stop_gradient(f32(log_rewards_B))
    return jnp.square(delta_B)
