"""IFT, Intuitive Fine-Tuning (Hua et al., arXiv 2405.11870), as an SFT objective, and the SFT objective
choice (`SFTObjectiveConfig`: "nll", the default, or "ift").

One IFT step on a batch of SFT rows (`rlhf_jax.data.pipeline` layout: `tokens[t]` is the input at position
t, `targets[t] = tokens[t + 1]`, `loss_mask[t]` = 1 where `targets[t]` is a completion token):

1. a pass without gradient on the gold tokens; ŷ_t = argmax of the next-token logits at position t − 1,
   the model's guess of token t from the gold prefix y*_<t;
2. the input embedding of position t (the position that predicts t + 1) becomes

       x_t = (1 − λ)·E[y*_t] + λ·E₀[ŷ_t]    where the input token y*_t is a completion token
                                            (`loss_mask[t − 1]` = 1 within one segment),
       x_t = E[y*_t]                         elsewhere (the prompt, the last prompt token included,
                                            which predicts the first completion token; padding);

   E is the model's (trained) table, E₀ a FROZEN copy of the SFT init's table (below);
3. a second pass, with gradient, from these embeddings gives log p_t of the gold targets;
4. the loss is `losses.ift_sequence_losses` (weights w_t = the γ-discounted suffix sums of −log p / n,
   rescaled to sum to n, NOT detached), averaged over the batch's sequences: (1/B) Σ_b Σ_t −log p_bt·w_bt/n_b.

Position by position, against the official code (TsinghuaC3I/Intuitive-Fine-Tuning, src/trainers.py,
`loss=ift`; HF layout `labels == input_ids` off the prompt): it mixes input position t where
`labels[t] != −100`, i.e. where the input token itself is a completion token, with
``cat(input_ids[:, :1], argmax(logits)[:, :-1])[t]`` = the argmax at t − 1: exactly the positions and
tokens of step 2 (the first completion token's input, the EOS's, is mixed too; it predicts nothing that
carries loss). Defaults follow config/loss/ift.yaml (λ = 0.2, γ = 0.95, propagation loss/left/L1).

Where this differs from the code, on purpose:
  - the gold term E[y*_t] is looked up in the trained table (so the input embedding is trained as in
    SFT, and λ = 0, γ = 0 is SFT exactly, gradients included); the code embeds both terms, and the first
    pass's inputs, with its no-grad copy, so its input embedding gets no gradient at all;
  - E₀ is the init's table for the whole run; the code re-copies the policy's table after every step,
    which for an untied model (its Mistral/Llama runs) is the same table, the input embedding receiving
    no gradient there, but which follows the LM head's updates for a tied one;
  - the prompt's inputs are E[y*_t] exactly (the code's (1 − λ)·e + λ·e, equal up to rounding);
  - the argmax pass reads the trained table (without gradient) rather than the copy.

The frozen copy E₀ is not in the train state: the SFT stage passes its init's table as the step's
read-only input (`reference_params`; with LoRA, the frozen base, whose embedding LoRA never adapts), and
recomputes it on resume the way it recomputes the init params anyway, deterministically from the seed,
`init_from` or `init_from_hf` (so a resumed run is the uninterrupted one, bit for bit).

Each row is one sequence (the SFT stage does not pack); a row of several segments would be normalised as
one. The loss sum is Σ_b weights_b·ℓ_b over the micro-batch and the denominator (`sequence_weight`) the
batch's weighted count of rows with loss tokens, so accumulated micro-batches give the full batch's
gradient exactly.
"""

from __future__ import annotations

import dataclasses
import functools

import flax.linen as nn
import jax
import jax.numpy as jnp

from rlhf_jax import losses
from rlhf_jax.train import steps

OBJECTIVES = ("nll", "ift")


@dataclasses.dataclass(frozen=True)
class SFTObjectiveConfig:
    """The SFT stage's objective (`config.sft.objective`, `.ift_lambda`, `.ift_gamma`).

    Attributes:
      objective: "nll" (token-level NLL, `steps.sft_objective`) or "ift" (`ift_objective`).
      ift_lambda: λ in [0, 1], the weight of the model's own prediction in the mixed input embedding.
      ift_gamma: γ in [0, 1], the discount of the suffix sums that weight each token's loss.
    """

    objective: str = "nll"
    ift_lambda: float = 0.2
    ift_gamma: float = 0.95

    def __post_init__(self):
        if self.objective not in OBJECTIVES:
            raise ValueError(f"objective must be one of {OBJECTIVES}, got {self.objective!r}")
        for field in ("ift_lambda", "ift_gamma"):
            value = getattr(self, field)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0.0 <= value <= 1.0:
                raise ValueError(f"{field} must be a number in [0, 1], got {value!r}")
            object.__setattr__(self, field, float(value))


def make(config: SFTObjectiveConfig, model: nn.Module):
    """(objective, weight_fn) of the SFT stage's training step."""
    if config.objective == "nll":
        return functools.partial(steps.sft_objective, model=model), steps.sft_weight
    objective = functools.partial(ift_objective, model=model, lam=config.ift_lambda, gamma=config.ift_gamma)
    return objective, sequence_weight


def frozen_embedding(params) -> dict:
    """The step's read-only input for IFT: {"decoder": {"embedding": the table [V, D]}} of `params`."""
    return {"decoder": {"embedding": params["decoder"]["embedding"]}}


def sequence_weight(batch) -> jax.Array:
    """Denominator of the IFT loss: the weighted rows that have loss tokens."""
    has_tokens_B = jnp.sum(batch["loss_mask"], axis=-1) > 0
    return jnp.sum(batch["weights"] * has_tokens_B)


def mix_positions(batch) -> jax.Array:
    """[B, T] bool: the input positions t whose token is a completion token, `loss_mask[t − 1]` > 0 with
    positions t − 1 and t in the same segment (position 0 never)."""
    seg_BT = batch["segment_ids"]
    prev_BT = jnp.pad(batch["loss_mask"][:, :-1] > 0, ((0, 0), (1, 0)))
    same_BT = jnp.pad((seg_BT[:, 1:] == seg_BT[:, :-1]) & (seg_BT[:, 1:] != 0), ((0, 0), (1, 0)))
    return prev_BT & same_BT


def predicted_inputs(logits_BTV, tokens_BT) -> jax.Array:
    """ŷ [B, T]: at position t the argmax of the logits at t − 1 (the model's guess of `tokens[t]`);
    `tokens[0]` at position 0."""
    guess_BT = jnp.argmax(logits_BTV, axis=-1).astype(tokens_BT.dtype)
    return jnp.concatenate([tokens_BT[:, :1], guess_BT[:, :-1]], axis=1)


def mixed_embeddings(model: nn.Module, params, frozen, batch, *, lam: float):
    """IFT's inputs [B, T, D] (module docstring, steps 1-2), and ŷ [B, T].

    Args:
      model: the `Transformer`.
      params: the trained params (gradients flow through E[y*]).
      frozen: a params tree holding the frozen table at `["decoder"]["embedding"]` (`frozen_embedding`).
      batch: SFT rows.
      lam: λ.
    """
    tokens_BT = batch["tokens"]
    logits_BTV = model.apply(
        {"params": jax.lax.stop_gradient(params)}, tokens_BT, segment_ids_BT=batch["segment_ids"]
    )
    guess_BT = jax.lax.stop_gradient(predicted_inputs(logits_BTV, tokens_BT))
    gold_BTD = model.apply({"params": params}, tokens_BT, method="embed")
    table_VD = jax.lax.stop_gradient(frozen["decoder"]["embedding"])
    guess_BTD = model.apply({"params": params}, guess_BT, table_VD=table_VD, method="embed")
    # In float32, cast back: with λ = 0 this is 1·gold + 0·guess = gold, bit for bit.
    mixed_BTD = (1.0 - lam) * gold_BTD.astype(jnp.float32) + lam * guess_BTD.astype(jnp.float32)
    x_BTD = jnp.where(mix_positions(batch)[..., None], mixed_BTD.astype(gold_BTD.dtype), gold_BTD)
    return x_BTD, guess_BT


def ift_objective(params, batch, reference_params, *, model: nn.Module, lam: float, gamma: float):
    """The IFT loss sum Σ_b weights_b·ℓ_b (`losses.ift_sequence_losses` on the mixed-input pass) and its
    metric sums over `sequence_weight`: `loss`, `nll` (the mixed pass's per-sequence mean NLL) and
    `guess_accuracy` (the share of completion inputs whose ŷ is the gold token).

    `reference_params` holds the frozen table E₀ (`frozen_embedding` of the init params, or the LoRA base).
    """
    if reference_params is None:
        raise ValueError("ift_objective needs the frozen initial embedding as reference_params")
    x_BTD, guess_BT = mixed_embeddings(model, params, reference_params, batch, lam=lam)
    logps_BT = steps.completion_logps(model, params, batch, embeds_BTD=x_BTD)
    mask_BT = batch["loss_mask"]
    loss_B = losses.ift_sequence_losses(token_logps_BT=logps_BT, mask_BT=mask_BT, gamma=gamma)
    has_tokens_B = jnp.sum(mask_BT, axis=-1) > 0
    w_B = batch["weights"] * has_tokens_B
    n_B = jnp.maximum(jnp.sum(mask_BT, axis=-1), 1.0)
    nll_B = -jnp.sum(logps_BT * mask_BT, axis=-1) / n_B
    mix_BT = mix_positions(batch)
    hits_B = jnp.sum(mix_BT & (guess_BT == batch["tokens"]), axis=-1) / jnp.maximum(jnp.sum(mix_BT, -1), 1)
    total = jnp.sum(w_B * loss_B)
    return total, {
        "loss": total,
        "nll": jnp.sum(w_B * nll_B),
        "guess_accuracy": jnp.sum(w_B * hits_B),
        "weight": jnp.sum(w_B),
    }
