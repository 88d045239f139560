"""IFT weights and loss against a NumPy transcription of the official code's get_cumsum_weight."""

import jax
import jax.numpy as jnp
import numpy as np

from rlhf_jax.losses import ift_loss, ift_weights


def _numpy_weights(logps, mask, gamma):
    if gamma == 0:
        return np.ones_like(logps) * mask
    n = mask.sum(-1, keepdims=True)
    item = np.where(mask > 0, -logps / n, 0.0)
    s = np.zeros_like(item)
    for b in range(item.shape[0]):
        acc = 0.0
        for t in reversed(range(item.shape[1])):
            acc = item[b, t] + gamma * acc
            s[b, t] = acc
    s = np.where(mask > 0, s, 0.0)
    return s * n / s.sum(-1, keepdims=True)


def _data():
    rng = np.random.default_rng(0)
    logps = -rng.uniform(0.1, 3.0, (3, 6))
    mask = np.array([[0, 1, 1, 1, 1, 0], [1, 1, 1, 1, 1, 1], [0, 0, 1, 1, 0, 0]], np.float64)
    return logps, mask


def test_weights_match_numpy_and_sum_to_n():
    logps, mask = _data()
    for gamma in (0.0, 0.5, 0.95, 1.0):
        w = ift_weights(
            token_logps_BT=jnp.asarray(logps, jnp.float32), mask_BT=jnp.asarray(mask), gamma=gamma
        )
        np.testing.assert_allclose(np.asarray(w), _numpy_weights(logps, mask, gamma), rtol=1e-5, atol=1e-6)
        np.testing.assert_allclose(np.asarray(w).sum(-1), mask.sum(-1), rtol=1e-5)


def test_gamma_zero_is_per_sequence_mean_sft():
    logps, mask = _data()
    loss = ift_loss(token_logps_BT=jnp.asarray(logps, jnp.float32), mask_BT=jnp.asarray(mask), gamma=0.0)
    sft = np.mean((-logps * mask).sum(-1) / mask.sum(-1))
    np.testing.assert_allclose(float(loss), sft, rtol=1e-6)


def test_weights_not_detached():
    logps, mask = _data()
    x = jnp.asarray(logps, jnp.float32)
    m = jnp.asarray(mask)
    g = jax.grad(lambda lp: ift_loss(token_logps_BT=lp, mask_BT=m, gamma=0.95))(x)
    g_detached = jax.grad(
        lambda lp: jnp.mean(
            (-lp * jax.lax.stop_gradient(ift_weights(token_logps_BT=lp, mask_BT=m, gamma=0.95)) * m).sum(-1)
            / m.sum(-1)
        )
    )(x)
    assert not np.allclose(np.asarray(g), np.asarray(g_detached))
    assert np.all(np.asarray(g)[mask == 0] == 0)
