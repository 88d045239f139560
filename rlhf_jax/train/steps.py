"""Pure train and eval steps for SFT, reward models and offline preference training.

An *objective* maps (params, batch, reference_params) to (loss_sum, sums): the batch's weighted loss
*sum* and a dict of weighted metric sums whose "weight" entry is their denominator (tokens for SFT,
pairs for the pairwise objectives). `train_step` divides by the whole batch's weight, computed before
the batch is split into micro-batches, so k accumulated micro-batches give exactly the gradient of the
full batch, and `apply_gradients` makes the update (skipped when the loss or gradient is not finite).

`train_step(state, batch, reference_params, ...)` is the one update function; `trainer.make_train_step`
binds its keyword arguments with `functools.partial` and jits it once with shardings and
`donate_argnums=0`. `reference_params` is what the step reads but never updates (the reference
policy's params, or None).

Batch keys are those of `rlhf_jax.data.pipeline` (tokens / targets / loss_mask / segment_ids, with
chosen_ / rejected_ prefixes for pairs, weights [B] with 0 on padding rows).
"""

from __future__ import annotations

from collections.abc import Callable

import flax.linen as nn
import jax
import jax.numpy as jnp
import optax

from rlhf_jax import losses, sharding
from rlhf_jax.models import layers
from rlhf_jax.train import state as state_lib

Objective = Callable[..., tuple[jax.Array, dict[str, jax.Array]]]


def sequence_logps(model: nn.Module, params, tokens_BT, targets_BT, loss_mask_BT, segment_ids_BT):
    """Summed log-probs of the masked targets under the LM `model` with `params`: [B] float32.

    The LM head is applied inside the log-softmax to the loss-masked rows only (prompt and padding
    positions never reach it), and the [B, T, V] logits are never materialised; the model's logit
    soft-cap (Gemma 2's final_softcap), if any, is applied there too.
    """
    hidden_BTD, w_DV, softcap = model.apply(
        {"params": params}, tokens_BT, segment_ids_BT=segment_ids_BT, method="hidden_and_head",
        return_softcap=True,
    )  # fmt: skip
    return losses.sequence_logps_from_hidden(
        hidden=hidden_BTD, kernel=w_DV, targets=targets_BT, mask=loss_mask_BT, softcap=softcap,
        platform=layers.target_platform(getattr(model, "mesh", None)), shards=_shards(model),
    )  # fmt: skip


def completion_logps(
    model: nn.Module, params, batch, *, temperature: float = 1.0, return_entropy: bool = False,
    return_hidden: bool = False, embeds_BTD=None,
):  # fmt: skip
    """Per-token log-probs [B, T] of the batch's targets on its loss-masked (completion) positions, 0
    elsewhere, under softmax(cap(logits) / temperature), through the fused LM head (`losses.
    token_logps_from_hidden`: prompt and padding positions never reach the head, no [B, T, V] logits).
    With `embeds_BTD`, the forward reads these input embeddings instead of the batch's `tokens` (IFT).

    With `return_entropy` also the per-token entropy of that distribution (no gradient); with
    `return_hidden` also the final-normed hidden states [B, T, D] (a shared value head reads them).
    Returns the log-probs alone, or a tuple (log-probs, [entropy], [hidden]) in that order.
    """
    inputs = {"tokens_BT": batch["tokens"]} if embeds_BTD is None else {"embeds_BTD": embeds_BTD}
    hidden_BTD, w_DV, softcap = model.apply(
        {"params": params}, **inputs, segment_ids_BT=batch["segment_ids"], method="hidden_and_head",
        return_softcap=True,
    )  # fmt: skip
    out = losses.token_logps_from_hidden(
        hidden=hidden_BTD, kernel=w_DV, targets=batch["targets"], mask=batch["loss_mask"],
        temperature=temperature, softcap=softcap, shards=_shards(model), return_entropy=return_entropy,
        platform=layers.target_platform(getattr(model, "mesh", None)),
    )  # fmt: skip
    out = out if return_entropy else (out,)
    out = (*out, hidden_BTD) if return_hidden else out
    return out if len(out) > 1 else out[0]


def pair_logps(model: nn.Module, params, batch) -> tuple[jax.Array, jax.Array]:
    """(chosen_B, rejected_B) summed log-probs from one forward over the concatenated 2B rows."""
    cat = lambda key: jnp.concatenate([batch[f"chosen_{key}"], batch[f"rejected_{key}"]], axis=0)
    logps_2B = sequence_logps(
        model, params, cat("tokens"), cat("targets"), cat("loss_mask"), cat("segment_ids")
    )
    return jnp.split(logps_2B, 2)


def _shards(model: nn.Module) -> int:
    """Devices the batch is split over in `model`'s mesh (`losses.token_logps` chunks rows by them)."""
    return sharding.batch_shards(
        getattr(model, "mesh", None), getattr(model, "rules", sharding.LOGICAL_RULES)
    )


# ----------------------------------------------------------------------------------------------------
# Objectives.


def sft_objective(params, batch, reference_params, *, model: nn.Module):
    """Token-level NLL of the completion tokens, through the fused LM head on the loss-masked rows only
    (`completion_logps`): the sum Σ_t m_t · (−log π(y_t | ·)) and its weight Σ_t m_t, with m_t the
    float `loss_mask` times the row's weight. m_t is 1 on completion tokens, or the token's weight for
    token-weighted SFT (TL-Training, arXiv 2412.15495; `rlhf_jax.data.token_weights`), so `train_step`
    minimises the weighted per-token mean over the whole batch, exactly under accumulation."""
    del reference_params
    logps_BT = completion_logps(model, params, batch)
    mask_BT = batch["loss_mask"] * batch["weights"][:, None]
    nll = -jnp.sum(jnp.where(mask_BT > 0, logps_BT * mask_BT, 0.0))
    return nll, {"loss": nll, "weight": jnp.sum(mask_BT)}


def sft_weight(batch) -> jax.Array:
    """Denominator of the SFT loss: Σ loss_mask · row weight (completion tokens, or their weights)."""
    return jnp.sum(batch["loss_mask"] * batch["weights"][:, None])


def epo_objective(
    params,
    batch,
    reference_params,
    *,
    model: nn.Module,
    gamma: float,
    normalize: bool,
    reward_shift: float = 0.0,
):
    """EPO's offline turn-level REINFORCE (`losses.epo`, arXiv 2502.12486) on a batch of dialogues in
    the turn layout (`rlhf_jax.data.turns`: `turn_ids`, `turn_rewards`, `turn_mask`): the per-dialogue
    losses summed with the row weights; the weight is the number of dialogues (`pair_weight`). The loss
    reads `turn_rewards + reward_shift` (`EPOConfig.reward_shift`); the logged `turn_reward` is the
    data's, unshifted."""
    del reference_params
    logps_BT = completion_logps(model, params, batch)
    loss_B = losses.epo(
        token_logps_BT=logps_BT, turn_ids_BT=batch["turn_ids"],
        turn_rewards_BU=batch["turn_rewards"] + reward_shift,
        turn_mask_BU=batch["turn_mask"], gamma=gamma, normalize=normalize,
    )  # fmt: skip
    w_B = batch["weights"]
    total = jnp.sum(w_B * loss_B)
    turns_B = jnp.sum(batch["turn_mask"], axis=1)
    mean_reward_B = jnp.sum(batch["turn_rewards"] * batch["turn_mask"], axis=1) / jnp.maximum(turns_B, 1.0)
    return total, {"loss": total, "weight": jnp.sum(w_B), "turn_reward": jnp.sum(w_B * mean_reward_B)}


def pair_weight(batch) -> jax.Array:
    """Denominator of the pairwise losses: weighted pairs (padding rows weigh 0)."""
    return jnp.sum(batch["weights"])


def reward_objective(params, batch, reference_params, *, model: nn.Module, margin: float = 0.0):
    """Bradley-Terry loss on the reward head: -logσ(r(x, y_w) - r(x, y_l) - m)."""
    del reference_params
    cat = lambda key: jnp.concatenate([batch[f"chosen_{key}"], batch[f"rejected_{key}"]], axis=0)
    rewards_2B = model.apply({"params": params}, cat("tokens"), cat("segment_ids"))
    chosen_B, rejected_B = jnp.split(rewards_2B, 2)
    w_B = batch["weights"]
    loss_B = losses.bradley_terry(chosen_rewards=chosen_B, rejected_rewards=rejected_B, margin=margin)
    total = jnp.sum(w_B * loss_B)
    return total, {
        "loss": total,
        "accuracy": jnp.sum(w_B * (chosen_B > rejected_B)),
        "reward_margin": jnp.sum(w_B * (chosen_B - rejected_B)),
        "chosen_reward": jnp.sum(w_B * chosen_B),
        "rejected_reward": jnp.sum(w_B * rejected_B),
        "weight": jnp.sum(w_B),
    }


def ranking_objective(params, batch, reference_params, *, model: nn.Module):
    """Pairwise preference ("ranking") model: sigmoid cross-entropy of logit P(A ≻ B) vs the label.

    The batch holds one sequence per pair, prompt + A + B (`rlhf_jax.data.pipeline.tokenize_ranking`),
    with `labels` [B] = 1 where A is the preferred response.
    """
    del reference_params
    logits_B = model.apply({"params": params}, batch["tokens"], batch["segment_ids"])
    labels_B = batch["labels"].astype(jnp.float32)
    w_B = batch["weights"]
    loss_B = optax.sigmoid_binary_cross_entropy(logits_B, labels_B)
    total = jnp.sum(w_B * loss_B)
    return total, {
        "loss": total,
        "accuracy": jnp.sum(w_B * ((logits_B > 0) == (labels_B > 0.5))),
        "weight": jnp.sum(w_B),
    }


def preference_objective(
    params,
    batch,
    reference_params,
    *,
    model: nn.Module,
    loss_fn: Callable,
    loss_inputs: tuple[str, ...],
    metric_beta: float,
):
    """Any pairwise loss from `rlhf_jax.losses` against a frozen reference policy.

    Reference log-probs come from the batch (`reference_chosen_logps`, ..., precomputed once per
    dataset) when present, else from a forward of `reference_params` without gradient.
    Other inputs (lengths, INPO's `previous_*_logps`) come from the batch.

    Args:
      loss_fn: a loss with its hyperparameters bound (`losses.make`).
      loss_inputs: the array inputs it takes (required and optional ones present in the batch).
      metric_beta: the β used for the implicit-reward metrics.
    """
    policy_chosen_B, policy_rejected_B = pair_logps(model, params, batch)
    if "reference_chosen_logps" in batch:
        ref_chosen_B, ref_rejected_B = batch["reference_chosen_logps"], batch["reference_rejected_logps"]
    elif reference_params is not None:
        ref_chosen_B, ref_rejected_B = pair_logps(model, jax.lax.stop_gradient(reference_params), batch)
    else:
        ref_chosen_B = ref_rejected_B = None
    available = {
        "policy_chosen_logps": policy_chosen_B,
        "policy_rejected_logps": policy_rejected_B,
        "reference_chosen_logps": ref_chosen_B,
        "reference_rejected_logps": ref_rejected_B,
        "chosen_lengths": batch["chosen_lengths"],
        "rejected_lengths": batch["rejected_lengths"],
        "previous_chosen_logps": batch.get("previous_chosen_logps"),
        "previous_rejected_logps": batch.get("previous_rejected_logps"),
    }
    loss_B = loss_fn(**{k: available[k] for k in loss_inputs})
    w_B = batch["weights"]
    total = jnp.sum(w_B * loss_B)
    sums = {
        "loss": total,
        "weight": jnp.sum(w_B),
        "policy_chosen_logps": jnp.sum(w_B * policy_chosen_B),
        "policy_rejected_logps": jnp.sum(w_B * policy_rejected_B),
    }
    if ref_chosen_B is not None:
        r_w = policy_chosen_B - ref_chosen_B
        r_l = policy_rejected_B - ref_rejected_B
        sums.update(
            chosen_reward=jnp.sum(w_B * metric_beta * r_w),
            rejected_reward=jnp.sum(w_B * metric_beta * r_l),
            reward_margin=jnp.sum(w_B * metric_beta * (r_w - r_l)),
            reward_accuracy=jnp.sum(w_B * (r_w > r_l)),
            # Offline estimate: the mean log-ratio log π/π_ref over the dataset's responses. A true KL
            # needs samples from π (the evaluation's `kl_to_sft` uses them).
            kl_to_reference=jnp.sum(w_B * 0.5 * (r_w + r_l)),
        )
    return total, sums


def tempered_logits(model: nn.Module, params, batch, *, temperature: float = 1.0) -> jax.Array:
    """The batch's logits [B, T, V] divided by the sampling temperature."""
    logits_BTV = model.apply({"params": params}, batch["tokens"], segment_ids_BT=batch["segment_ids"])
    if temperature != 1.0:
        logits_BTV = logits_BTV / jnp.asarray(temperature, logits_BTV.dtype)
    return logits_BTV


def token_logps(model: nn.Module, params, batch, *, temperature: float = 1.0) -> jax.Array:
    """Per-token log-probs [B, T] of the batch's targets under softmax(logits / temperature).

    The online RL objectives need them per token (the importance ratio and the KL are per token); with
    a sampling temperature T they are those of the tempered distribution the samples were drawn from,
    as TRL computes them (top-k truncation is not applied).
    """
    logits_BTV = tempered_logits(model, params, batch, temperature=temperature)
    return losses.token_logps(logits=logits_BTV, targets=batch["targets"], shards=_shards(model))


def policy_gradient_objective(
    params,
    batch,
    reference_params,
    *,
    model: nn.Module,
    temperature: float,
    aggregation: str,
    loss_kwargs: tuple[tuple[str, object], ...] = (),
    max_length: int | None = None,
    entropy: bool = True,
):
    """The GRPO family's clipped policy-gradient loss (`losses.policy_gradient_loss`) on a mini-batch of
    sampled completions, exact under gradient accumulation.

    The batch holds the rows (`tokens`, `targets`, `loss_mask`, `segment_ids`), `old_logps` [B, T] (at
    sampling time; absent when the stepped policy is the one that sampled, one optimizer step per
    rollout: then they are the step's own log-probs under a stop-gradient, the ratio exactly 1),
    `advantages` [B] (or [B, T] per token: PPO's GAE), optionally `reference_logps` [B, T] (the KL
    term's), and two normalisers written by the online loop for the whole mini-batch: `token_normalizer`
    [B] (its masked token count, every row the same) and `row_fraction` [B] (1 / its row count). The
    returned loss is that of the whole mini-batch restricted to these rows, so micro-batches sum to it
    exactly (the trainer's `weight_fn` is then 1): "dapo" and "bnpo" divide the masked token sum by
    the global count, "grpo" and "dr_grpo" scale their per-micro-batch value by its share of the rows.
    `reference_params` is unused (reference log-probs come precomputed). With `entropy` the sums also
    hold the policy's mean entropy at the loss tokens (an extra reduction over the vocabulary in the
    head; the online loop takes it from the sampler instead, `GRPOConfig.entropy_source`).
    """
    del reference_params
    out = completion_logps(model, params, batch, temperature=temperature, return_entropy=entropy)
    logps_BT, entropy_BT = out if entropy else (out, None)
    return _policy_gradient_terms(
        logps_BT, entropy_BT, batch, aggregation=aggregation, loss_kwargs=loss_kwargs, max_length=max_length
    )


def _policy_gradient_terms(logps_BT, entropy_BT, batch, *, aggregation, loss_kwargs, max_length):
    """`policy_gradient_objective`'s (loss, sums) from the completion tokens' tempered log-probs and
    entropies (`completion_logps`; 0 off the loss mask, as the batch's `old_logps` are; None: no
    `entropy` in the sums)."""
    mask_BT = batch["loss_mask"]
    # [B]: one advantage per sequence (the GRPO family); [B, T]: per token (PPO's GAE).
    adv_key = "advantages_BT" if batch["advantages"].ndim == 2 else "advantages_B"
    share = jnp.sum(batch["row_fraction"])  # rows of this micro-batch / rows of the mini-batch
    token_normalizer = batch["token_normalizer"][0]
    kw = dict(loss_kwargs)
    old_logps_BT = batch["old_logps"] if "old_logps" in batch else jax.lax.stop_gradient(logps_BT)
    inputs = dict(
        logps_BT=logps_BT, old_logps_BT=old_logps_BT, mask_BT=mask_BT,
        reference_logps_BT=batch.get("reference_logps"), **{adv_key: batch["advantages"]},
    )  # fmt: skip
    if aggregation in ("dapo", "bnpo"):  # masked token sum over the mini-batch's token count
        loss = losses.policy_gradient_loss(
            **inputs, **kw, aggregation="dapo", token_normalizer=token_normalizer
        )
    else:
        loss = share * losses.policy_gradient_loss(
            **inputs, **kw, aggregation=aggregation, max_length=max_length
        )
    metric_kw = {k: v for k, v in kw.items() if k in ("epsilon_low", "epsilon_high")}
    means = losses.policy_gradient_metrics(
        logps_BT=logps_BT, old_logps_BT=old_logps_BT, mask_BT=mask_BT,
        reference_logps_BT=batch.get("reference_logps"), **{adv_key: batch["advantages"]}, **metric_kw,
    )  # fmt: skip
    token_share = jnp.sum(mask_BT) / jnp.maximum(token_normalizer, 1.0)
    # The policy's entropy at the sampled positions (logged only; DAPO's clip-higher claim is about it).
    sums = {"loss": loss, "weight": share}
    if entropy_BT is not None:
        sums["entropy"] = jnp.sum(entropy_BT * mask_BT) / jnp.maximum(token_normalizer, 1.0)
    sums.update({k: token_share * share_free for k, share_free in means.items()})
    # `weight` sums to 1 over the micro-batches, so `finalize` leaves these sums as they are.
    return loss, sums


def trajectory_balance_objective(
    params, batch, reference_params, *, model: nn.Module, temperature: float, entropy: bool = True
):
    """GFlowNet trajectory balance (`losses.trajectory_balance`) on a mini-batch of sampled completions,
    exact under gradient accumulation.

    `params` is {"policy": the LM's params, "log_z": a scalar}; Σ_t log π(a_t|s_t) is the masked sum of
    the tempered token log-probs of each row; the batch holds the rows, `log_rewards` [B],
    `row_fraction` [B] (1 / the mini-batch's rows) and `token_normalizer` [B], so the loss is the
    mini-batch mean of the squared residuals. `clip_frac_low`/`clip_frac_high` are logged as 0 (no
    ratio is clipped), `log_z` and `tb_residual` (mean of log Z + Σ log π − log R) beside them, and
    with `entropy` the mean entropy at the loss tokens. `reference_params` is unused.
    """
    del reference_params
    out = completion_logps(model, params["policy"], batch, temperature=temperature, return_entropy=entropy)
    logps_BT, entropy_BT = out if entropy else (out, None)
    mask_BT = batch["loss_mask"]
    logps_B = jnp.sum(jnp.where(mask_BT > 0, logps_BT, 0.0), axis=-1)
    log_z = params["log_z"]
    per_B = losses.trajectory_balance(logps_B=logps_B, log_rewards_B=batch["log_rewards"], log_z=log_z)
    fraction_B = batch["row_fraction"]
    share = jnp.sum(fraction_B)
    loss = jnp.sum(per_B * fraction_B)
    residual_B = jax.lax.stop_gradient(log_z + logps_B - batch["log_rewards"])
    sums = {
        "loss": loss, "weight": share, "clip_frac_low": 0.0 * share, "clip_frac_high": 0.0 * share,
        "log_z": jax.lax.stop_gradient(log_z) * share, "tb_residual": jnp.sum(residual_B * fraction_B),
    }  # fmt: skip
    if entropy:
        sums["entropy"] = jnp.sum(entropy_BT * mask_BT) / jnp.maximum(batch["token_normalizer"][0], 1.0)
    return loss, sums


def critic_objective(params, batch, reference_params, *, model: nn.Module):
    """A state critic (Direct Advantage Policy Optimization, arXiv 2412.18279 §3.3): `losses.critic_bce`
    of the scalar head on each row's last real token (`RewardModel`) against the soft Monte-Carlo
    targets `mc_targets` [B], summed with the row weights (the weight is the rows)."""
    del reference_params
    logits_B = model.apply({"params": params}, batch["tokens"], batch["segment_ids"])
    w_B = batch["weights"]
    loss = jnp.sum(w_B * losses.critic_bce(value_logits=logits_B, targets=batch["mc_targets"]))
    value_B = jax.nn.sigmoid(logits_B)
    return loss, {
        "loss": loss,
        "value_mean": jnp.sum(w_B * value_B),
        "abs_error": jnp.sum(w_B * jnp.abs(value_B - batch["mc_targets"])),
        "weight": jnp.sum(w_B),
    }


def direct_advantage_po_objective(params, batch, reference_params, *, model: nn.Module, beta: float):
    """`losses.direct_advantage_po` on (state, step) rows: log π(a|s) is the summed log-prob of the step's
    tokens (the rows' loss mask covers the step only), against the batch's precomputed `reference_logps`
    and critic `advantages` [B]; summed with the row weights (the weight is the rows). Also logs the mean
    log-ratio log π/π_ref and its target Â/β."""
    del reference_params
    logps_B = sequence_logps(
        model, params, batch["tokens"], batch["targets"], batch["loss_mask"], batch["segment_ids"]
    )
    w_B = batch["weights"]
    per_B = losses.direct_advantage_po(
        policy_logps=logps_B, reference_logps=batch["reference_logps"], advantages=batch["advantages"],
        beta=beta,
    )  # fmt: skip
    loss = jnp.sum(w_B * per_B)
    log_ratio_B = jax.lax.stop_gradient(logps_B - batch["reference_logps"])
    return loss, {
        "loss": loss,
        "log_ratio": jnp.sum(w_B * log_ratio_B),
        "target_log_ratio": jnp.sum(w_B * batch["advantages"] / beta),
        "weight": jnp.sum(w_B),
    }


def shared_critic_objective(
    params,
    batch,
    reference_params,
    *,
    model: nn.Module,
    temperature: float,
    aggregation: str,
    loss_kwargs: tuple[tuple[str, object], ...] = (),
    max_length: int | None = None,
    vf_coef: float = 0.1,
    clip: float | None = 0.2,
    entropy: bool = True,
):
    """PPO with the value head on the policy's backbone: `policy_gradient_objective` + vf_coef ·
    `value_objective` from one forward (TRL's `PPOTrainer` loss pg_loss + vf_coef · vf_loss, OpenAI
    baselines' shared-network PPO; PPO for NLU, arXiv 2410.11020, puts its value head on the policy's
    backbone).

    `params` is {"policy": the LM's params, "value_head": {"kernel": [D, 1], "bias": [1]}}; V(s_t) is
    the head on the final-normed hidden state at every position (float32), so the value loss's gradient
    reaches the backbone. The batch is `policy_gradient_objective`'s plus `old_values` and `returns`.
    The sums hold the policy's metrics, `value_loss` (unscaled) and the value metrics of
    `value_objective`; `loss` is the total (`entropy` as in `policy_gradient_objective`).
    """
    del reference_params
    out = completion_logps(
        model, params["policy"], batch, temperature=temperature, return_entropy=entropy, return_hidden=True
    )
    logps_BT, entropy_BT, hidden_BTD = out if entropy else (out[0], None, out[1])
    pg_loss, sums = _policy_gradient_terms(
        logps_BT, entropy_BT, batch, aggregation=aggregation, loss_kwargs=loss_kwargs, max_length=max_length
    )
    values_BT = _value_head(hidden_BTD, params["value_head"])
    vf_loss, value_sums = _value_terms(values_BT, batch, clip=clip)
    loss = pg_loss + vf_coef * vf_loss
    sums.update({("value_loss" if k == "loss" else k): v for k, v in value_sums.items() if k != "weight"})
    sums["policy_loss"], sums["loss"] = pg_loss, loss
    return loss, sums


def _value_head(hidden_BTD, head) -> jax.Array:
    """A scalar head on every position's hidden state, float32 [B, T]."""
    kernel_D = head["kernel"][:, 0].astype(jnp.float32)
    return jnp.einsum("BTD,D->BT", hidden_BTD.astype(jnp.float32), kernel_D) + head["bias"][0].astype(
        jnp.float32
    )


def shared_values(model: nn.Module, params, batch) -> jax.Array:
    """V(s_t) [B, T] of `shared_critic_objective`'s value head (rollout-time values)."""
    _, hidden_BTD = model.apply(
        {"params": params["policy"]}, batch["tokens"], segment_ids_BT=batch["segment_ids"], return_hidden=True
    )
    return _value_head(hidden_BTD, params["value_head"])


def value_objective(params, batch, reference_params, *, model: nn.Module, clip: float | None = 0.2):
    """PPO's critic loss (`losses.value_loss`, clipped, ½·squared error) on a mini-batch of rollouts,
    exact under gradient accumulation.

    `model` is a `RewardModel` (its `values` method, V(s_t) at every position); the batch holds the rows
    (`tokens`, `targets`, `loss_mask`, `segment_ids`), `old_values` and `returns` [B, T] (at rollout
    time, `losses.gae`), and the loop's normalisers `token_normalizer` and `row_fraction` (as in
    `policy_gradient_objective`): the loss is the masked token mean over the whole mini-batch.
    """
    del reference_params
    values_BT = model.apply({"params": params}, batch["tokens"], batch["segment_ids"], method="values")
    return _value_terms(values_BT, batch, clip=clip)


def _value_terms(values_BT, batch, *, clip):
    """`value_objective`'s (loss, sums) from the critic's values [B, T]."""
    mask_BT = batch["loss_mask"]
    token_normalizer = jnp.maximum(batch["token_normalizer"][0], 1.0)
    token_share = jnp.sum(mask_BT) / token_normalizer  # this micro-batch's tokens / the mini-batch's
    loss = token_share * losses.value_loss(
        values_BT=values_BT, old_values_BT=batch["old_values"], returns_BT=batch["returns"], mask_BT=mask_BT,
        clip=clip,
    )  # fmt: skip
    mask = mask_BT > 0
    moved = jnp.abs(values_BT - batch["old_values"]) > clip if clip is not None else jnp.zeros_like(mask)
    total = lambda x_BT: jnp.sum(jnp.where(mask, x_BT, 0.0)) / token_normalizer  # noqa: E731
    sums = {
        "loss": loss,
        "weight": jnp.sum(batch["row_fraction"]),
        "value_clip_frac": total(moved.astype(jnp.float32)),
        "value_mean": total(values_BT),
        "value_error": total(jnp.abs(values_BT - batch["returns"])),
    }
    return loss, sums


# ----------------------------------------------------------------------------------------------------
# Steps.


def _micro_batches(batch, k: int):
    """Rows b of a [B, ...] batch go to micro-batch b % k: [B/k, k, ...], sliced on axis 1 (no transpose)."""

    def split(x):
        if x.shape[0] % k:
            raise ValueError(f"batch of {x.shape[0]} rows does not split into {k} micro-batches")
        return x.reshape(x.shape[0] // k, k, *x.shape[1:])

    return jax.tree.map(split, batch)


def loss_and_grads(
    objective: Objective, params, batch, reference_params, *, weight_fn, accum_steps: int = 1, rng=None
):
    """Mean loss, metric sums and gradients of the full batch, over `accum_steps` micro-batches.

    With `rng` (a key), the objective is called with `rng=` a key folded with the micro-batch index
    (LoRA dropout, `rlhf_jax.lora.objective`).
    """
    total_weight = jnp.maximum(weight_fn(batch), 1e-9)

    def scaled(p, micro, i=0):
        kw = {} if rng is None else {"rng": jax.random.fold_in(rng, i)}
        loss_sum, sums = objective(p, micro, reference_params, **kw)
        return loss_sum / total_weight, sums

    grad_fn = jax.value_and_grad(scaled, has_aux=True)
    if accum_steps == 1:
        (loss, sums), grads = grad_fn(params, batch)
        return loss, sums, grads
    micro = _micro_batches(batch, accum_steps)
    take = lambda i: jax.tree.map(lambda x: jax.lax.dynamic_index_in_dim(x, i, 1, keepdims=False), micro)
    shapes = jax.eval_shape(grad_fn, params, take(0))
    zeros = jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), shapes)

    def body(i, carry):
        (loss, sums), grads = grad_fn(params, take(i), i)
        return jax.tree.map(jnp.add, carry, ((loss, sums), grads))

    (loss, sums), grads = jax.lax.fori_loop(0, accum_steps, body, zeros)
    return loss, sums, grads


def apply_gradients(
    state: state_lib.TrainState, grads, tx: optax.GradientTransformation, *, ok
) -> state_lib.TrainState:
    """One optimizer update, applied only where `ok` (a traced bool); otherwise the state is kept.

    A non-finite step therefore never reaches the parameters or a checkpoint; it is counted, and the
    loop decides (at its next host sync) whether to stop with the step number or carry on.
    """
    updates, new_opt_state = tx.update(grads, state.opt_state, state.params)
    new_params = optax.apply_updates(state.params, updates)
    keep = lambda new, old: jax.tree.map(lambda n, o: jnp.where(ok, n, o), new, old)
    step = state.step + 1
    return state.replace(
        step=step,
        params=keep(new_params, state.params),
        opt_state=keep(new_opt_state, state.opt_state),
        nonfinite_count=state.nonfinite_count + jnp.where(ok, 0, 1).astype(jnp.int32),
        first_nonfinite_step=jnp.where(
            ok | (state.first_nonfinite_step >= 0), state.first_nonfinite_step, step
        ).astype(jnp.int32),
    )


def finalize(sums: dict[str, jax.Array]) -> dict[str, jax.Array]:
    """Metric sums -> means over their "weight" (which is dropped)."""
    weight = jnp.maximum(sums["weight"], 1e-9)
    return {k: v / weight for k, v in sums.items() if k != "weight"}


def train_step(
    state: state_lib.TrainState,
    batch,
    reference_params,
    *,
    objective: Objective,
    weight_fn: Callable,
    tx: optax.GradientTransformation,
    schedule: optax.Schedule | None = None,
    accum_steps: int = 1,
):
    """One optimizer step: gradients of the batch's mean loss, clipped and applied if finite.

    An objective with a true `takes_rng` attribute (LoRA with dropout) gets a key per step and
    micro-batch, folded from the state's key and step number (so a resumed run draws the same masks).

    Returns:
      (new_state, metrics): metrics hold the objective's means plus `grad_norm`, `learning_rate`,
      `finite` (1.0 if this step was applied) and `nonfinite_steps` (running count).
    """
    rng = None
    if getattr(objective, "takes_rng", False):
        rng = jax.random.fold_in(jax.random.wrap_key_data(state.rng), state.step)
    loss, sums, grads = loss_and_grads(
        objective, state.params, batch, reference_params, weight_fn=weight_fn, accum_steps=accum_steps,
        rng=rng,
    )  # fmt: skip
    grad_norm = optax.tree.norm(grads)
    ok = jnp.isfinite(loss) & jnp.isfinite(grad_norm)
    new_state = apply_gradients(state, grads, tx, ok=ok)
    metrics = finalize(sums)
    metrics["grad_norm"] = grad_norm
    metrics["finite"] = ok.astype(jnp.float32)
    metrics["nonfinite_steps"] = new_state.nonfinite_count
    if schedule is not None:
        metrics["learning_rate"] = schedule(state.step)
    return new_state, metrics


def eval_sums(params, batch, reference_params, *, objective: Objective) -> dict[str, jax.Array]:
    """The objective's metric sums on a batch, without gradients (accumulate, then `finalize`)."""
    _, sums = objective(params, batch, reference_params)
    return sums
