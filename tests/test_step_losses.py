"""`direct_advantage_po` (Direct Advantage Policy Optimization, arXiv 2412.18279; not ByteDance's DAPO)
against hand-derived values and gradients, its input checks, and its optimum on a bandit (a second
set beside tests/test_direct_advantage_po.py's)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from rlhf_jax import losses


def test_direct_advantage_po_values_and_gradient():
    pol, ref, adv = jnp.array([-3.0, -5.0, -1.0]), jnp.array([-4.0, -5.0, -2.0]), jnp.array([0.2, -0.1, 0.0])
    beta = 0.5
    # log-ratios 1, 0, 1; targets Â/β = 0.4, -0.2, 0: ½(0.4 - 1)² = 0.18, ½(0.2)² = 0.02, ½(1)² = 0.5
    got = losses.direct_advantage_po(policy_logps=pol, reference_logps=ref, advantages=adv, beta=beta)
    np.testing.assert_allclose(got, [0.18, 0.02, 0.5], rtol=1e-6)
    # d loss / d log π = (log π - log π_ref) - Â/β.
    grad = jax.grad(lambda p: jnp.sum(losses.direct_advantage_po(policy_logps=p, reference_logps=ref,
                                                               advantages=adv, beta=beta)))(pol)  # fmt: skip
    np.testing.assert_allclose(grad, [0.6, 0.2, 1.0], rtol=1e-6)
    # Zero gradient exactly where log π - log π_ref = Â/β.
    at_opt = ref + adv / beta
    g = jax.grad(lambda p: jnp.sum(losses.direct_advantage_po(policy_logps=p, reference_logps=ref,
                                                            advantages=adv, beta=beta)))(at_opt)  # fmt: skip
    np.testing.assert_allclose(g, 0.0, atol=1e-6)


def test_direct_advantage_po_checks_its_inputs():
    x = jnp.zeros(3)
    with pytest.raises(ValueError, match="beta"):
        losses.direct_advantage_po(policy_logps=x, reference_logps=x, advantages=x, beta=0.0)
    with pytest.raises(ValueError, match="advantages must have the shape of policy_logps"):
        losses.direct_advantage_po(policy_logps=x, reference_logps=x, advantages=jnp.zeros(2), beta=1.0)


def _train_bandit(pi_ref, adv, beta, steps=3000, lr=0.5):
    """A softmax policy over arms trained with the loss on every arm, each weighted by π_ref (the
    offline data: steps sampled from π_ref, in expectation); returns π."""
    logits0 = jnp.log(pi_ref)

    def objective(logits):
        log_pi = jax.nn.log_softmax(logits)
        per_arm = losses.direct_advantage_po(
            policy_logps=log_pi, reference_logps=jnp.log(pi_ref), advantages=adv, beta=beta
        )
        return jnp.sum(pi_ref * per_arm)

    grad = jax.jit(jax.grad(objective))
    logits = logits0
    for _ in range(steps):
        logits = logits - lr * grad(logits)
    return jax.nn.softmax(logits)


@pytest.mark.parametrize("beta", [0.1, 0.5, 2.0])
def test_on_a_bandit_the_trained_policy_does_not_lose_reward(beta):
    """Theorem 3.2's claim on a 5-armed bandit with exact advantages Â(a) = r(a) - E_π_ref[r]: the
    policy trained with the loss has expected reward ≥ π_ref's, strictly when π_ref is not optimal;
    when every arm is equally good (all advantages 0), π_ref is optimal and training leaves it."""
    rewards = jnp.array([1.0, 0.0, 0.5, -1.0, 0.2])
    pi_ref = jnp.array([0.1, 0.4, 0.2, 0.2, 0.1])
    adv = rewards - jnp.sum(pi_ref * rewards)
    pi = _train_bandit(pi_ref, adv, beta)
    gain = float(jnp.sum(pi * rewards) - jnp.sum(pi_ref * rewards))
    assert gain > 1e-3, gain
    # The stationary point satisfies the Lagrange condition π_ref(a)(ℓ(a) - Â(a)/β) + μ π(a) = 0, so the
    # log-ratio ℓ is increasing in the advantage: arms are reordered by Â, the best one gains most.
    ratio = np.log(np.asarray(pi) / np.asarray(pi_ref))
    order = np.argsort(np.asarray(adv))
    assert np.all(np.diff(ratio[order]) > 0), ratio[order]
    # All advantages zero (every arm equally good): π_ref is optimal and stays.
    flat = _train_bandit(pi_ref, jnp.zeros(5), beta, steps=200)
    np.testing.assert_allclose(flat, pi_ref, atol=1e-5)
