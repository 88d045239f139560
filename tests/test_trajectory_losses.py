"""EPO's turn-level REINFORCE and GFlowNet trajectory balance against NumPy loops and hand-derived values."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from rlhf_jax import losses


def _np_returns(rewards, n, gamma):
    """Plain Python loop: G_u = Σ_{k=u}^{n-1} γ^(k-u) r_k."""
    return [sum(gamma ** (k - u) * rewards[k] for k in range(u, n)) for u in range(n)]


def _np_epo(logps, turn_ids, rewards, n_turns, gamma, normalize):
    """Reference EPO loss per dialogue with explicit loops."""
    out = []
    for b in range(len(logps)):
        n = n_turns[b]
        g = _np_returns(rewards[b], n, gamma)
        if normalize:
            m = max(abs(x) for x in g) if n else 0.0
            g = [x / max(m, 1e-8) for x in g]
        total = 0.0
        for u in range(n):
            toks = [logps[b][t] for t in range(len(logps[b])) if turn_ids[b][t] == u]
            mean = sum(toks) / len(toks) if toks else 0.0
            total += g[u] * mean
        out.append(-total / max(n, 1))
    return np.array(out)


def _example(seed=0):
    rng = np.random.default_rng(seed)
    b, t, u = 3, 12, 4
    logps = rng.normal(-2.0, 1.0, (b, t))
    turn_ids = np.full((b, t), -1)
    # dialogue 0: 3 turns; dialogue 1: 4 turns; dialogue 2: 2 turns, the second empty of tokens.
    turn_ids[0, 1:3], turn_ids[0, 4:7], turn_ids[0, 9:11] = 0, 1, 2
    turn_ids[1, 0:2], turn_ids[1, 3:4], turn_ids[1, 5:8], turn_ids[1, 9:12] = 0, 1, 2, 3
    turn_ids[2, 2:6] = 0
    n_turns = [3, 4, 2]
    rewards = rng.normal(0.0, 1.0, (b, u))
    mask = np.array([[1] * n + [0] * (u - n) for n in n_turns], np.float32)
    rewards_padded = np.where(mask > 0, rewards, 123.0)  # garbage on padded turns must be ignored
    return logps, turn_ids, rewards, rewards_padded, mask, n_turns


def _epo(logps, turn_ids, rewards, mask, **kw):
    return losses.epo(
        token_logps_BT=jnp.asarray(logps, jnp.float32),
        turn_ids_BT=jnp.asarray(turn_ids),
        turn_rewards_BU=jnp.asarray(rewards, jnp.float32),
        turn_mask_BU=jnp.asarray(mask),
        **kw,
    )


class TestEPO:
    def test_returns_recursion_hand_values(self):
        g = losses.discounted_turn_returns(
            turn_rewards_BU=jnp.asarray([[1.0, 0.0, 2.0, 9.0]]),
            turn_mask_BU=jnp.asarray([[1, 1, 1, 0]]),
            gamma=0.5,
        )
        # G_2 = 2, G_1 = 0 + 0.5·2 = 1, G_0 = 1 + 0.5·1 = 1.5; padded turn 0.
        np.testing.assert_allclose(np.asarray(g), [[1.5, 1.0, 2.0, 0.0]])

    @pytest.mark.parametrize("gamma", [0.0, 0.7, 1.0])
    def test_returns_match_numpy(self, gamma):
        _, _, rewards, padded, mask, n_turns = _example(1)
        g = np.asarray(losses.discounted_turn_returns(turn_rewards_BU=padded, turn_mask_BU=mask, gamma=gamma))
        for b, n in enumerate(n_turns):
            np.testing.assert_allclose(g[b, :n], _np_returns(rewards[b], n, gamma), rtol=1e-5, atol=1e-6)
            assert np.all(g[b, n:] == 0)

    @pytest.mark.parametrize("normalize", [True, False])
    @pytest.mark.parametrize("gamma", [0.9, 1.0])
    def test_loss_matches_numpy(self, normalize, gamma):
        logps, turn_ids, rewards, padded, mask, n_turns = _example(2)
        got = _epo(logps, turn_ids, padded, mask, gamma=gamma, normalize=normalize)
        want = _np_epo(logps, turn_ids, rewards, n_turns, gamma, normalize)
        np.testing.assert_allclose(np.asarray(got), want, rtol=1e-5, atol=1e-6)

    def test_normalised_weights_bounded_and_scale_invariant(self):
        logps, turn_ids, _, padded, mask, _ = _example(3)
        a = _epo(logps, turn_ids, padded, mask, gamma=0.9)
        b = _epo(logps, turn_ids, padded * 50.0, mask, gamma=0.9)
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-5)

    def test_masked_tokens_ignored(self):
        logps, turn_ids, _, padded, mask, _ = _example(4)
        dirty = np.where(turn_ids < 0, -np.inf, logps)  # prompt/padding garbage never reaches the loss
        a = _epo(logps, turn_ids, padded, mask)
        b = _epo(dirty, turn_ids, padded, mask)
        assert np.all(np.isfinite(np.asarray(b)))
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-6)

    def test_gradient_is_return_over_turn_length_and_turns(self):
        logps, turn_ids, rewards, padded, mask, n_turns = _example(5)
        grad = np.asarray(
            jax.grad(lambda x: _epo(x, turn_ids, padded, mask, gamma=0.8).sum())(jnp.asarray(logps))
        )
        for b, n in enumerate(n_turns):
            g = np.array(_np_returns(rewards[b], n, 0.8))
            g = g / np.abs(g).max()
            for t in range(logps.shape[1]):
                u = turn_ids[b, t]
                want = 0.0 if u < 0 else -g[u] / (np.sum(turn_ids[b] == u) * n)
                np.testing.assert_allclose(grad[b, t], want, rtol=1e-5, atol=1e-7)

    def test_zero_rewards_give_zero_loss_and_bad_gamma_raises(self):
        logps, turn_ids, _, _, mask, _ = _example(6)
        np.testing.assert_array_equal(np.asarray(_epo(logps, turn_ids, np.zeros((3, 4)), mask)), 0.0)
        with pytest.raises(ValueError, match="gamma"):
            _epo(logps, turn_ids, np.zeros((3, 4)), mask, gamma=1.5)


class TestTrajectoryBalance:
    def test_matches_numpy_and_gradients(self):
        rng = np.random.default_rng(0)
        lp, lr, lz = rng.normal(-5, 2, 6), rng.normal(0, 1, 6), 0.7
        got = losses.trajectory_balance(logps_B=jnp.asarray(lp), log_rewards_B=jnp.asarray(lr), log_z=lz)
        np.testing.assert_allclose(np.asarray(got), (lz + lp - lr) ** 2, rtol=1e-5)
        g_lp, g_lr, g_lz = jax.grad(
            lambda a, b, z: losses.trajectory_balance(logps_B=a, log_rewards_B=b, log_z=z).sum(),
            argnums=(0, 1, 2),
        )(jnp.asarray(lp, jnp.float32), jnp.asarray(lr, jnp.float32), jnp.float32(lz))
        np.testing.assert_allclose(np.asarray(g_lp), 2 * (lz + lp - lr), rtol=1e-5)
        np.testing.assert_allclose(float(g_lz), np.sum(2 * (lz + lp - lr)), rtol=1e-5)
        np.testing.assert_array_equal(np.asarray(g_lr), 0.0)  # log R is data

    def test_optimum_is_reward_proportional_policy(self):
        """On a 4-armed bandit, minimising TB over (logits, log Z) gives π ∝ R and Z = Σ R."""
        r = jnp.asarray([1.0, 2.0, 3.0, 4.0])
        log_r = losses.positive_log_rewards(rewards_B=r, floor=1e-6)

        def loss(params):
            logits, lz = params
            return losses.trajectory_balance(
                logps_B=jax.nn.log_softmax(logits), log_rewards_B=log_r, log_z=lz
            ).sum()

        params = (jnp.zeros(4), jnp.float32(0.0))
        step = jax.jit(lambda p: jax.tree.map(lambda x, g: x - 0.1 * g, p, jax.grad(loss)(p)))
        for _ in range(2000):
            params = step(params)
        np.testing.assert_allclose(np.asarray(jax.nn.softmax(params[0])), [0.1, 0.2, 0.3, 0.4], atol=1e-4)
        np.testing.assert_allclose(float(params[1]), np.log(10.0), atol=1e-4)

    def test_positive_log_rewards(self):
        r = jnp.asarray([-1.0, 0.0, 2.0])
        np.testing.assert_allclose(
            np.asarray(losses.positive_log_rewards(rewards_B=r, temperature=0.5)), [-2, 0, 4]
        )
        np.testing.assert_allclose(
            np.asarray(losses.positive_log_rewards(rewards_B=r, floor=0.01)),
            np.log([0.01, 0.01, 2.0]),
            rtol=1e-6,
        )
        with pytest.raises(ValueError, match="temperature"):
            losses.positive_log_rewards(rewards_B=r, temperature=0.0)
