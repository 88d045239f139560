"""PPO with a critic: GAE against a NumPy backward recursion, the clipped value loss's gradient cases,
the adaptive KL coefficient against hand values, KL-penalised per-token rewards, whitening, and the
clipped surrogate at per-token advantages."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from rlhf_jax import losses


def _gae_numpy(rewards, values, mask, gamma, lam):
    """GAE by the definition: over each row's masked-in positions only (gaps skipped), V after the last
    step = 0, backwards."""
    adv = np.zeros_like(rewards, dtype=np.float64)
    for b in range(rewards.shape[0]):
        steps = [t for t in range(rewards.shape[1]) if mask[b, t]]
        next_v, next_a = 0.0, 0.0
        for t in reversed(steps):
            delta = rewards[b, t] + gamma * next_v - values[b, t]
            next_a = delta + gamma * lam * next_a
            adv[b, t] = next_a
            next_v = values[b, t]
    return adv, np.where(mask, adv + values, 0.0)


def _ragged(seed, B=5, T=9, gaps=False):
    rng = np.random.default_rng(seed)
    rewards = rng.normal(size=(B, T)).astype(np.float32)
    values = rng.normal(size=(B, T)).astype(np.float32)
    lengths = [T, 4, 1, 0, 7][:B]
    mask = np.arange(T)[None, :] < np.asarray(lengths)[:, None]
    if gaps:  # a tool output inside the completion of row 0 and row 4
        mask[0, 3:5] = False
        mask[4, 2] = False
    return rewards, values, mask


@pytest.mark.parametrize("gaps", [False, True])
@pytest.mark.parametrize("gamma,lam", [(1.0, 0.95), (0.9, 0.5), (0.99, 1.0), (0.8, 0.0)])
def test_gae_equals_the_backward_recursion_on_ragged_masks(gamma, lam, gaps):
    rewards, values, mask = _ragged(0, gaps=gaps)
    adv, ret = losses.gae(rewards_BT=rewards, values_BT=values, mask_BT=mask, gamma=gamma, lam=lam)
    want_adv, want_ret = _gae_numpy(rewards, values, mask, gamma, lam)
    np.testing.assert_allclose(adv, want_adv, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(ret, want_ret, rtol=1e-5, atol=1e-5)
    assert np.all(np.asarray(adv)[~mask] == 0) and np.all(np.asarray(ret)[~mask] == 0)


def test_gae_lambda_one_is_discounted_return_minus_value_and_lambda_zero_the_td_error():
    rewards, values, mask = _ragged(1)
    gamma = 0.9
    adv1, ret1 = losses.gae(rewards_BT=rewards, values_BT=values, mask_BT=mask, gamma=gamma, lam=1.0)
    adv0, _ = losses.gae(rewards_BT=rewards, values_BT=values, mask_BT=mask, gamma=gamma, lam=0.0)
    B, T = rewards.shape
    for b in range(B):
        n = int(mask[b].sum())
        for t in range(n):
            discounted = sum(gamma ** (j - t) * rewards[b, j] for j in range(t, n))
            np.testing.assert_allclose(adv1[b, t], discounted - values[b, t], rtol=1e-5, atol=1e-5)
            np.testing.assert_allclose(ret1[b, t], discounted, rtol=1e-5, atol=1e-5)
            next_v = values[b, t + 1] if t + 1 < n else 0.0
            np.testing.assert_allclose(adv0[b, t], rewards[b, t] + gamma * next_v - values[b, t], atol=1e-6)


def test_gae_hand_values_and_no_gradient():
    # One row of three steps, reward 1 on the last; γ = 0.5, λ = 0.5; V = (0.2, 0.4, 0.6).
    # δ3 = 1 - 0.6 = 0.4; δ2 = 0 + 0.5·0.6 - 0.4 = -0.1; δ1 = 0 + 0.5·0.4 - 0.2 = 0
    # Â3 = 0.4; Â2 = -0.1 + 0.25·0.4 = 0; Â1 = 0 + 0.25·0 = 0
    r = jnp.asarray([[0.0, 0.0, 1.0, 0.0]])
    v = jnp.asarray([[0.2, 0.4, 0.6, 9.0]])
    m = jnp.asarray([[1, 1, 1, 0]])
    adv, ret = losses.gae(rewards_BT=r, values_BT=v, mask_BT=m, gamma=0.5, lam=0.5)
    np.testing.assert_allclose(adv, [[0.0, 0.0, 0.4, 0.0]], atol=1e-7)
    np.testing.assert_allclose(ret, [[0.2, 0.4, 1.0, 0.0]], atol=1e-7)
    grad = jax.grad(lambda v: losses.gae(rewards_BT=r, values_BT=v, mask_BT=m, gamma=0.5, lam=0.5)[0].sum())(
        v
    )
    assert np.all(np.asarray(grad) == 0)


def test_gae_rejects_bad_arguments():
    r, v, m = _ragged(2)
    with pytest.raises(ValueError, match="gamma"):
        losses.gae(rewards_BT=r, values_BT=v, mask_BT=m, gamma=1.5, lam=0.9)
    with pytest.raises(ValueError, match="lam"):
        losses.gae(rewards_BT=r, values_BT=v, mask_BT=m, gamma=1.0, lam=-0.1)
    with pytest.raises(ValueError, match="values_BT"):
        losses.gae(rewards_BT=r, values_BT=v[:, :3], mask_BT=m, gamma=1.0, lam=0.9)


def _value_grad(v, old, ret, clip):
    mask = jnp.ones_like(v)
    f = lambda v: losses.value_loss(values_BT=v, old_values_BT=old, returns_BT=ret, mask_BT=mask, clip=clip)
    return float(f(v)), np.asarray(jax.grad(f)(v))


def test_value_loss_clipping_gradient_cases():
    old = jnp.asarray([[1.0]])
    ret = jnp.asarray([[2.0]])
    # Inside the clip range: ½(V - R)², gradient V - R.
    loss, g = _value_grad(jnp.asarray([[1.1]]), old, ret, 0.2)
    np.testing.assert_allclose([loss, g[0, 0]], [0.5 * 0.81, -0.9], rtol=1e-6)
    # V moved past the clip away from the target's side... V = 0.5: unclipped (0.5-2)² = 2.25,
    # clipped V_c = 0.8, (0.8-2)² = 1.44: the unclipped is larger, gradient V - R = -1.5.
    loss, g = _value_grad(jnp.asarray([[0.5]]), old, ret, 0.2)
    np.testing.assert_allclose([loss, g[0, 0]], [0.5 * 2.25, -1.5], rtol=1e-6)
    # V moved past the clip towards (and beyond) the target: V = 2.5, unclipped 0.25, clipped V_c = 1.2,
    # (1.2-2)² = 0.64 larger: the loss is the clipped one, constant in V, gradient 0.
    loss, g = _value_grad(jnp.asarray([[2.5]]), old, ret, 0.2)
    np.testing.assert_allclose([loss, g[0, 0]], [0.5 * 0.64, 0.0], rtol=1e-6, atol=0)
    # Without clipping the same V has gradient V - R = 0.5.
    loss, g = _value_grad(jnp.asarray([[2.5]]), old, ret, None)
    np.testing.assert_allclose([loss, g[0, 0]], [0.5 * 0.25, 0.5], rtol=1e-6)


def test_value_loss_is_the_masked_token_mean():
    rng = np.random.default_rng(3)
    v, old, ret = (rng.normal(size=(3, 6)).astype(np.float32) for _ in range(3))
    mask = np.array([[1, 1, 1, 0, 0, 0], [1, 1, 1, 1, 1, 1], [0, 0, 0, 0, 0, 0]], bool)
    got = losses.value_loss(values_BT=v, old_values_BT=old, returns_BT=ret, mask_BT=mask, clip=0.3)
    clipped = old + np.clip(v - old, -0.3, 0.3)
    per = 0.5 * np.maximum((v - ret) ** 2, (clipped - ret) ** 2)
    np.testing.assert_allclose(got, per[mask].mean(), rtol=1e-6)
    v_garbage = np.where(mask, v, np.nan)
    got2 = losses.value_loss(values_BT=v_garbage, old_values_BT=old, returns_BT=ret, mask_BT=mask, clip=0.3)
    np.testing.assert_allclose(got2, got, rtol=1e-6)
    with pytest.raises(ValueError, match="clip"):
        losses.value_loss(values_BT=v, old_values_BT=old, returns_BT=ret, mask_BT=mask, clip=0.0)


def test_adaptive_kl_coefficient_hand_values():
    # Ziegler et al. 2019: e = clip(KL/target - 1, ±0.2), β ← β(1 + e·n/horizon).
    up = losses.adaptive_kl_coef(coef=0.1, kl=12.0, target=6.0, horizon=10000, n_steps=256)
    np.testing.assert_allclose(up, 0.1 * (1 + 0.2 * 256 / 10000), rtol=1e-6)  # error 1.0 clipped to 0.2
    down = losses.adaptive_kl_coef(coef=0.1, kl=5.4, target=6.0, horizon=10000, n_steps=256)
    np.testing.assert_allclose(down, 0.1 * (1 - 0.1 * 256 / 10000), rtol=1e-6)
    low = losses.adaptive_kl_coef(coef=0.2, kl=0.0, target=6.0, horizon=100, n_steps=10)
    np.testing.assert_allclose(low, 0.2 * (1 - 0.2 * 0.1), rtol=1e-6)
    same = losses.adaptive_kl_coef(coef=0.05, kl=6.0, target=6.0, horizon=100, n_steps=10)
    np.testing.assert_allclose(same, 0.05, rtol=1e-7)
    with pytest.raises(ValueError, match="target"):
        losses.adaptive_kl_coef(coef=0.1, kl=1.0, target=0.0, horizon=100, n_steps=1)


def test_kl_penalized_rewards_put_the_score_on_the_last_token():
    logp = np.array([[-1.0, -2.0, -0.5, 0.0], [-0.3, -0.4, 0.0, 0.0], [0.0, 0.0, 0.0, 0.0]], np.float32)
    ref = np.array([[-1.5, -1.0, -0.5, 7.0], [-0.3, -0.9, 5.0, 5.0], [1.0, 1.0, 1.0, 1.0]], np.float32)
    mask = np.array([[1, 1, 1, 0], [1, 1, 0, 0], [0, 0, 0, 0]], bool)
    scores = np.array([1.0, -3.0, 2.0], np.float32)
    got = losses.kl_penalized_rewards(
        scores_B=scores, logps_BT=logp, reference_logps_BT=ref, mask_BT=mask, beta=0.1
    )
    want = np.array([[-0.05, 0.1, 1.0, 0.0], [0.0, -0.05 - 3.0, 0.0, 0.0], [0.0, 0.0, 0.0, 0.0]])
    np.testing.assert_allclose(got, want, atol=1e-6)
    clipped = losses.kl_penalized_rewards(
        scores_B=scores, logps_BT=logp, reference_logps_BT=ref, mask_BT=mask, beta=0.0, score_clip=2.0
    )
    np.testing.assert_allclose(np.asarray(clipped).sum(axis=1), [1.0, -2.0, 0.0], atol=1e-6)
    k3 = losses.kl_penalized_rewards(
        scores_B=np.zeros(3, np.float32), logps_BT=logp, reference_logps_BT=ref, mask_BT=mask, beta=1.0,
        kl_estimator="k3",
    )  # fmt: skip
    d = np.where(mask, ref - logp, 0.0)
    np.testing.assert_allclose(k3, -(np.exp(d) - d - 1) * mask, atol=1e-6)
    assert np.all(np.asarray(k3) <= 0)
    with pytest.raises(ValueError, match="kl_estimator"):
        losses.kl_penalized_rewards(
            scores_B=scores, logps_BT=logp, reference_logps_BT=ref, mask_BT=mask, beta=0.1, kl_estimator="k2"
        )


def test_last_token_mask_with_gaps():
    mask = np.array([[1, 0, 1, 0], [0, 0, 0, 0], [1, 1, 1, 1]], bool)
    np.testing.assert_array_equal(losses.last_token_mask(mask), [[0, 0, 1, 0], [0, 0, 0, 0], [0, 0, 0, 1]])


def test_whiten_matches_unbiased_masked_statistics():
    rng = np.random.default_rng(4)
    x = rng.normal(3.0, 2.0, size=(4, 7)).astype(np.float32)
    mask = rng.random((4, 7)) > 0.3
    sel = x[mask].astype(np.float64)
    want = (x - sel.mean()) / np.sqrt(sel.var(ddof=1) + 1e-8)
    got = np.asarray(losses.whiten(values_BT=x, mask_BT=mask))
    np.testing.assert_allclose(got[mask], want[mask], rtol=1e-5, atol=1e-5)
    assert np.all(got[~mask] == 0)
    np.testing.assert_allclose(got[mask].mean(), 0.0, atol=1e-5)
    kept = np.asarray(losses.whiten(values_BT=x, mask_BT=mask, shift_mean=False))
    np.testing.assert_allclose(kept[mask], want[mask] + sel.mean(), rtol=1e-5)


def test_clipped_surrogate_at_per_token_advantages():
    rng = np.random.default_rng(5)
    logp = rng.normal(-1.0, 0.3, size=(3, 5)).astype(np.float32)
    old = logp + rng.normal(0.0, 0.3, size=(3, 5)).astype(np.float32)
    adv = rng.normal(size=(3, 5)).astype(np.float32)
    mask = np.array([[1, 1, 1, 1, 1], [1, 1, 0, 0, 0], [1, 1, 1, 0, 0]], bool)
    got = losses.policy_gradient_loss(
        logps_BT=logp, old_logps_BT=old, advantages_BT=adv, mask_BT=mask, aggregation="bnpo"
    )
    ratio = np.exp(logp - old)
    term = -np.minimum(ratio * adv, np.clip(ratio, 0.8, 1.2) * adv)
    np.testing.assert_allclose(got, term[mask].mean(), rtol=1e-5)
    # A per-sequence advantage broadcast over tokens gives GRPO's loss exactly.
    adv_B = adv[:, 0]
    per_seq = losses.policy_gradient_loss(logps_BT=logp, old_logps_BT=old, advantages_B=adv_B, mask_BT=mask)
    per_tok = losses.policy_gradient_loss(
        logps_BT=logp, old_logps_BT=old, advantages_BT=np.repeat(adv_B[:, None], 5, 1), mask_BT=mask
    )
    np.testing.assert_allclose(per_tok, per_seq, rtol=1e-6)
    # At the first update (old = logp) the gradient is -Â·m / n per token.
    g = jax.grad(
        lambda lp: losses.policy_gradient_loss(
            logps_BT=lp, old_logps_BT=logp, advantages_BT=adv, mask_BT=mask, aggregation="bnpo"
        )
    )(jnp.asarray(logp))
    np.testing.assert_allclose(g, -adv * mask / mask.sum(), rtol=1e-5, atol=1e-7)
    with pytest.raises(ValueError, match="exactly one"):
        losses.policy_gradient_loss(logps_BT=logp, old_logps_BT=old, mask_BT=mask)
    with pytest.raises(ValueError, match="exactly one"):
        losses.policy_gradient_loss(
            logps_BT=logp, old_logps_BT=old, advantages_B=adv_B, advantages_BT=adv, mask_BT=mask
        )
    metrics = losses.policy_gradient_metrics(logps_BT=logp, old_logps_BT=old, advantages_BT=adv, mask_BT=mask)
    low = ((adv < 0) & (ratio < 0.8))[mask].mean()
    np.testing.assert_allclose(metrics["clip_frac_low"], low, rtol=1e-6)
