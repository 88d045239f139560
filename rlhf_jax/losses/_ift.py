"""IFT, Intuitive Fine-Tuning (Hua et al., arXiv 2405.11870): the token-weighted loss of the second pass.

The official code (TsinghuaC3I/Intuitive-Fine-Tuning, src/trainers.py, `loss=ift`, config/loss/ift.yaml:
lambda 0.2, gamma 0.95, propagation_type=loss, propagation_side=left, propagation_norm=L1) does:

1. a no-grad pass on the gold sequence; ŷ = argmax of the logits, SHIFTED so that the input at position t
   becomes the prediction made at position t−1 (``cat(input_ids[:, :1], argmax(logits)[:, :-1])``), i.e. the
   model's guess of token t from the gold prefix y*_<t; only positions whose input token is a completion
   token (label != −100) change;
2. input embeddings (1−λ)·E[y*_t] + λ·E[ŷ_t] from a no-grad embedding copy (both terms, and the first
   pass's inputs too; the copy is re-taken from the policy after every optimizer step);
3. a second (with-grad) pass giving per-token log p_t of the gold tokens;
4. these weights (`ift_weights`) and this loss (`ift_loss`).

The code's default is the L1 (``propagation_norm=L1``), rescaled, not-detached suffix sum below, and
γ = 0 is special-cased to uniform weights (plain SFT). The training objective built on these (steps 1-3 in
this codebase, and how they differ from the code) is `rlhf_jax.train.ift`.
"""

import jax
import jax.numpy as jnp


def ift_weights(*, token_logps_BT, mask_BT, gamma):
    """IFT per-token weights (official-code default), NOT detached.

    With n_b = Σ_t m_bt and u_bt = −log p_bt · m_bt / n_b:
        s_bt = Σ_{k ≥ t} γ^{k−t} u_bk           (discounted suffix sum, ``discounted_cumsum_right``)
        w_bt = m_bt · s_bt · n_b / Σ_k m_bk s_bk  (rescaled to sum to n_b)
    γ = 0 gives w = m (the code returns ones), so `ift_loss` is then per-sequence-mean SFT.
    Source: the official code's ``get_cumsum_weight`` (arXiv 2405.11870's relation propagation; the
    paper's Eq. 21 itself is not checked against it here, README "IFT").
    """
    mask = mask_BT.astype(token_logps_BT.dtype)
    if gamma == 0:
        return mask
    n_B = jnp.maximum(mask.sum(-1), 1.0)
    u_BT = -token_logps_BT * mask / n_B[:, None]

    def step(carry_B, u_B):
        s_B = u_B + gamma * carry_B
        return s_B, s_B

    _, s_TB = jax.lax.scan(step, jnp.zeros_like(n_B), u_BT.T[::-1])
    s_BT = s_TB[::-1].T * mask
    total_B = s_BT.sum(-1)
    total_B = jnp.where(total_B != 0, total_B, 1.0)
    return s_BT * (n_B / total_B)[:, None]


def ift_sequence_losses(*, token_logps_BT, mask_BT, gamma):
    """Per-sequence IFT losses [B]: ℓ_b = Σ_t −log p_bt · w_bt / n_b, with w = `ift_weights` (gradient
    flows through w); 0 for a row without loss tokens."""
    mask = mask_BT.astype(token_logps_BT.dtype)
    n_B = jnp.maximum(mask.sum(-1), 1.0)
    w_BT = ift_weights(token_logps_BT=token_logps_BT, mask_BT=mask_BT, gamma=gamma)
    return (-token_logps_BT * w_BT * mask).sum(-1) / n_B


def ift_loss(*, token_logps_BT, mask_BT, gamma):
    """IFT loss = (1/B) Σ_b Σ_t −log p_bt · w_bt / n_b (the mean of `ift_sequence_losses`)."""
    return jnp.mean(ift_sequence_losses(token_logps_BT=token_logps_BT, mask_BT=mask_BT, gamma=gamma))
