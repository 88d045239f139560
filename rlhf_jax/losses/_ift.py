"""IFT (Intuitive Fine-Tuning, arXiv 2405.11870): discounted suffix-sum token weights.

WORK IN PROGRESS (issue 19 part 2): the official code's alignment and the gamma = 0 convention are not yet
checked against TsinghuaC3I/Intuitive-Fine-Tuning; see the report on branch `ift`.
"""

import jax.numpy as jnp


def ift_weights(*, token_logps_BT, mask_BT, gamma):
    """Per-token IFT weights, NOT detached (the gradient flows through them, as in the brief).

    With n_b = Σ_t mask and u_t = −log p_t / n_b on masked-in tokens:
        s_t = Σ_{k ≥ t} γ^{k−t} u_k      (discounted suffix sum over the completion)
        w_t = n_b · s_t / Σ_k s_k         (rescaled to sum to n_b)
    Masked-out positions get weight 0.
    """
    mask = mask_BT.astype(token_logps_BT.dtype)
    n_B = jnp.maximum(mask.sum(-1), 1.0)
    u_BT = -token_logps_BT * mask / n_B[:, None]

    def step(carry, u_B):
        s_B = u_B + gamma * carry
        return s_B, s_B

    import jax

    _, s_TB = jax.lax.scan(step, jnp.zeros_like(n_B), u_BT.T[::-1])
    s_BT = s_TB[::-1].T * mask
    total_B = jnp.where(s_BT.sum(-1) > 0, s_BT.sum(-1), 1.0)
    return n_B[:, None] * s_BT / total_B[:, None]


def ift_loss(*, token_logps_BT, mask_BT, gamma):
    """IFT loss = mean_b Σ_t −log p_t · w_t / n_b with `ift_weights`."""
    mask = mask_BT.astype(token_logps_BT.dtype)
    n_B = jnp.maximum(mask.sum(-1), 1.0)
    w_BT = ift_weights(token_logps_BT=token_logps_BT, mask_BT=mask_BT, gamma=gamma)
    return jnp.mean((-token_logps_BT * w_BT * mask).sum(-1) / n_B)
