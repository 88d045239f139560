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
