"""Direct Advantage Policy Optimization (arXiv 2412.18279): the loss against NumPy and hand-derived
gradients, the step splitter, and Theorem 3.2 on a bandit with exact advantages."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from rlhf_jax import losses
from rlhf_jax.data.steps import split_steps, states_and_actions


def _data(seed=0, b=6):
    rng = np.random.default_rng(seed)
    return rng.normal(-5, 2, b), rng.normal(-5, 2, b), rng.normal(0, 0.5, b)


class TestLoss:
    @pytest.mark.parametrize("beta", [0.05, 0.5, 2.0])
    def test_values_match_numpy(self, beta):
        pol, ref, adv = _data()
        got = losses.direct_advantage_po(policy_logps=pol, reference_logps=ref, advantages=adv, beta=beta)
        want = 0.5 * (adv / beta - (pol - ref)) ** 2
        np.testing.assert_allclose(np.asarray(got), want, rtol=1e-5, atol=1e-6)
        assert got.dtype == jnp.float32 and got.shape == (6,)

    def test_gradient_hand_derived(self):
        pol, ref, adv = _data(1)
        beta = 0.3

        def total(p):
            return losses.direct_advantage_po(
                policy_logps=p, reference_logps=ref, advantages=adv, beta=beta
            ).sum()

        grad = jax.grad(total)(jnp.asarray(pol, jnp.float32))
        # d/dp ½ (A/β - (p - r))² = (p - r) - A/β
        np.testing.assert_allclose(np.asarray(grad), (pol - ref) - adv / beta, rtol=1e-4, atol=1e-5)

    def test_gradient_zero_at_target_and_none_into_advantages(self):
        ref, adv, beta = np.array([-3.0, -7.0]), np.array([0.4, -0.2]), 0.25
        at = jnp.asarray(ref + adv / beta, jnp.float32)
        fn = lambda p, a: losses.direct_advantage_po(  # noqa: E731
            policy_logps=p, reference_logps=ref, advantages=a, beta=beta
        ).sum()
        gp, ga = jax.grad(fn, argnums=(0, 1))(at, jnp.asarray(adv, jnp.float32))
        np.testing.assert_allclose(np.asarray(gp), 0.0, atol=1e-5)
        np.testing.assert_array_equal(np.asarray(ga), 0.0)

    def test_bfloat16_inputs_compute_in_float32(self):
        pol, ref, adv = _data(2)
        got = losses.direct_advantage_po(
            policy_logps=jnp.asarray(pol, jnp.bfloat16), reference_logps=ref, advantages=adv, beta=1.0
        )
        assert got.dtype == jnp.float32

    def test_beta_must_be_positive(self):
        pol, ref, adv = _data()
        with pytest.raises(ValueError, match="beta"):
            losses.direct_advantage_po(policy_logps=pol, reference_logps=ref, advantages=adv, beta=0.0)

    def test_never_aliases_bytedance_dapo(self):
        assert "direct_advantage_po" not in losses.registry.names() or losses.registry.get(
            "direct_advantage_po"
        ) is not losses.registry.get("dapo")
        assert "2412.18279" in losses.direct_advantage_po.__doc__ or "2412.18279" in (
            losses.direct_advantage_po.__module__
        )


class TestSplitSteps:
    @pytest.mark.parametrize(
        "text, want",
        [
            ("", []),
            ("\n\n", []),
            (" a = 1\n b = 2\n#### 2", [" a = 1\n", " b = 2\n", "#### 2"]),
            ("a\nb\n", ["a\n", "b\n"]),  # trailing newline stays with the last step
            ("a\n\n\nb", ["a\n\n\n", "b"]),  # empty steps join the step before
            ("\n  \na\nb", ["\n  \na\n", "b"]),  # leading blanks join the first step
            ("a\n \n", ["a\n \n"]),
        ],
    )
    def test_cases(self, text, want):
        assert split_steps(text) == want

    @pytest.mark.parametrize("text", ["", "x", "\n", "a\n\nb\n", " 1 + 2 = 3\n 3 * 4 = 12\n#### 12"])
    def test_concatenation_is_the_text_when_nonblank(self, text):
        if text.strip():
            assert "".join(split_steps(text)) == text

    def test_states_and_actions(self):
        pairs = states_and_actions("Q:", " a\n b\n#### 3")
        assert pairs == [("Q:", " a\n"), ("Q: a\n", " b\n"), ("Q: a\n b\n", "#### 3")]


class TestTheorem32Bandit:
    """A softmax policy over K arms trained with the loss on exact advantages Â(a) = r(a) - E_ref[r]
    (every arm's step weighted by π_ref, as the offline data samples it) has E_π[r] ≥ E_ref[r],
    strictly when π_ref is not optimal (arXiv 2412.18279, Theorem 3.2)."""

    @staticmethod
    def _train(ref_logits, rewards, beta, steps=400, lr=0.5):
        ref_logp = jax.nn.log_softmax(ref_logits)
        adv = rewards - jnp.exp(ref_logp) @ rewards

        def objective(logits):
            logp = jax.nn.log_softmax(logits)
            per_arm = losses.direct_advantage_po(
                policy_logps=logp, reference_logps=ref_logp, advantages=adv, beta=beta
            )
            return jnp.exp(ref_logp) @ per_arm

        grad = jax.jit(jax.grad(objective))
        logits = ref_logits
        for _ in range(steps):
            logits = logits - lr * grad(logits)
        return jax.nn.softmax(logits)

    @pytest.mark.parametrize("beta", [0.1, 0.5, 1.0, 4.0])
    @pytest.mark.parametrize("seed", [0, 1, 2])
    def test_improves_on_reference(self, beta, seed):
        rng = np.random.default_rng(seed)
        ref_logits = jnp.asarray(rng.normal(0, 1, 5), jnp.float32)
        rewards = jnp.asarray(rng.uniform(0, 1, 5), jnp.float32)
        pi = self._train(ref_logits, rewards, beta)
        ref_value = float(jax.nn.softmax(ref_logits) @ rewards)
        assert float(pi @ rewards) > ref_value + 1e-4

    def test_optimal_reference_stays(self):
        # π_ref all on the best arm (up to float): no room to improve, and the policy does not get worse.
        ref_logits = jnp.asarray([20.0, 0.0, 0.0], jnp.float32)
        rewards = jnp.asarray([1.0, 0.0, 0.5], jnp.float32)
        pi = self._train(ref_logits, rewards, beta=0.5)
        assert float(pi @ rewards) >= float(jax.nn.softmax(ref_logits) @ rewards) - 1e-5


class TestCriticAndAdvantages:
    def test_critic_bce_matches_numpy_and_gradient(self):
        rng = np.random.default_rng(3)
        v, y = rng.normal(0, 2, 7), rng.uniform(0, 1, 7)
        got = losses.critic_bce(value_logits=v, targets=y)
        sig = 1 / (1 + np.exp(-v))
        np.testing.assert_allclose(np.asarray(got), -(y * np.log(sig) + (1 - y) * np.log(1 - sig)), rtol=1e-5)
        grad = jax.grad(lambda x: losses.critic_bce(value_logits=x, targets=y).sum())(
            jnp.asarray(v, jnp.float32)
        )
        np.testing.assert_allclose(np.asarray(grad), sig - y, rtol=1e-4, atol=1e-6)

    def test_step_advantages(self):
        v = np.array([[0.2, 0.4, 0.9], [0.5, 0.5, 0.5]])
        got = losses.step_advantages(v)
        np.testing.assert_allclose(np.asarray(got), [[-0.3, -0.1, 0.4], [0.0, 0.0, 0.0]], atol=1e-6)
        with pytest.raises(ValueError, match="values_BM"):
            losses.step_advantages(np.zeros(3))

    def test_critic_on_random_walk_correlates_with_exact_values(self):
        """Gambler's ruin on 0..K with up-probability p: V(x) = (1 - r^x)/(1 - r^K), r = (1-p)/p. A critic
        (one-hidden-layer MLP on the one-hot state) trained with `critic_bce` on soft MC_N targets from N
        rollouts per visited state correlates ≥ 0.9 with V."""
        k, p, n = 10, 0.45, 16
        rng = np.random.default_rng(0)
        ratio = (1 - p) / p
        exact = (1 - ratio ** np.arange(k + 1)) / (1 - ratio**k)

        def rollout(x):
            while 0 < x < k:
                x += 1 if rng.random() < p else -1
            return float(x == k)

        states = rng.integers(1, k, 200)
        targets = np.array([np.mean([rollout(int(x)) for _ in range(n)]) for x in states])
        feats = jax.nn.one_hot(states, k + 1)
        key = jax.random.PRNGKey(0)
        params = {
            "w1": jax.random.normal(key, (k + 1, 16)) * 0.3,
            "b1": jnp.zeros((1, 16)),
            "w2": jax.random.normal(jax.random.fold_in(key, 1), (16,)) * 0.3,
        }

        def critic(params, f):
            return jnp.tanh(f @ params["w1"] + params["b1"]) @ params["w2"]

        def objective(params):
            return losses.critic_bce(value_logits=critic(params, feats), targets=targets).mean()

        grad = jax.jit(jax.grad(objective))
        for _ in range(1500):
            params = jax.tree.map(lambda w, g: w - 0.5 * g, params, grad(params))
        pred = np.asarray(jax.nn.sigmoid(critic(params, jax.nn.one_hot(np.arange(1, k), k + 1))))
        assert np.corrcoef(pred, exact[1:k])[0, 1] >= 0.9
