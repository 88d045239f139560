"""Tests for the policy-gradient losses and group advantages: NumPy references written out loop by loop,
hand-derived values, and gradients through `jax.grad` in each clip region."""

import functools
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from rlhf_jax import losses

AGGREGATIONS = ("grpo", "bnpo", "dr_grpo", "dapo")
MAX_LENGTH = 7


# ---------------------------------------------------------------- NumPy references (float64, loops)


def np_advantages(rewards, estimator, scale, eps=1e-4):
    """The estimators written out per group, without vectorised shortcuts."""
    rewards = np.asarray(rewards, np.float64)
    out = np.zeros_like(rewards)
    flat = rewards.reshape(-1)
    batch_std = math.sqrt(sum((x - flat.mean()) ** 2 for x in flat) / (flat.size - 1))
    for p, group in enumerate(rewards):
        g = len(group)
        mean = sum(group) / g
        std = math.sqrt(sum((x - mean) ** 2 for x in group) / (g - 1))
        for i, r in enumerate(group):
            if estimator == "rloo":
                out[p, i] = r - (sum(group) - r) / (g - 1)
            elif estimator == "dr_grpo" or scale == "none":
                out[p, i] = r - mean
            else:
                out[p, i] = (r - mean) / ((std if scale == "group" else batch_std) + eps)
    return out


def np_loss(
    logps,
    old,
    adv,
    mask,
    *,
    ref=None,
    beta=0.0,
    eps_low=0.2,
    eps_high=None,
    delta=None,
    aggregation="dapo",
    max_length=None,
    normalizer=None,
    level="token",
):
    """The issue's formula, token by token."""
    eps_high = eps_low if eps_high is None else eps_high
    B, T = logps.shape
    terms = np.zeros((B, T))
    for b in range(B):
        idx = [t for t in range(T) if mask[b, t]]
        seq_log_w = sum(logps[b, t] - old[b, t] for t in idx) / max(len(idx), 1)
        for t in idx:
            log_w = logps[b, t] - old[b, t] if level == "token" else seq_log_w
            ratio = math.exp(log_w)
            clipped = min(max(ratio, 1 - eps_low), 1 + eps_high)
            capped = ratio if delta is None else min(ratio, delta)
            term = -min(capped * adv[b], clipped * adv[b])
            if beta > 0:
                d = ref[b, t] - logps[b, t]
                term += beta * (math.exp(d) - d - 1)
            terms[b, t] = term
    counts = [sum(1 for t in range(T) if mask[b, t]) for b in range(B)]
    if aggregation == "grpo":
        return sum(terms[b].sum() / max(counts[b], 1) for b in range(B)) / B
    if aggregation == "bnpo":
        return terms.sum() / max(sum(counts), 1)
    if aggregation == "dr_grpo":
        return terms.sum() / (B * max_length)
    return terms.sum() / max(sum(counts) if normalizer is None else normalizer, 1)


def _batch(seed=0, B=4, T=6):
    """Random log-probs whose ratios fall in every clip region, ragged masks, mixed-sign advantages."""
    rng = np.random.default_rng(seed)
    logps = rng.uniform(-3.0, -0.5, size=(B, T))
    old = logps + rng.normal(0.0, 0.35, size=(B, T))
    ref = logps + rng.normal(0.0, 0.3, size=(B, T))
    lengths = rng.integers(1, T + 1, size=B)
    lengths[0] = T
    mask = (np.arange(T)[None, :] < lengths[:, None]).astype(np.float32)
    adv = rng.normal(0.0, 1.0, size=B)
    adv[0], adv[1] = 1.3, -0.8  # both signs for sure
    return logps, old, ref, adv, mask


def _loss(logps, old, adv, mask, **kw):
    return losses.policy_gradient_loss(
        logps_BT=jnp.asarray(logps, jnp.float32),
        old_logps_BT=jnp.asarray(old, jnp.float32),
        advantages_B=jnp.asarray(adv, jnp.float32),
        mask_BT=jnp.asarray(mask),
        **kw,
    )


def _grad(logps, old, adv, mask, **kw):
    """d loss / d logps_BT, as a NumPy array."""
    f = lambda lp: _loss(lp, old, adv, mask, **kw)  # noqa: E731
    return np.asarray(jax.grad(f)(jnp.asarray(logps, jnp.float32)))


# ---------------------------------------------------------------- advantages


class TestGroupAdvantages:
    @pytest.mark.parametrize(
        "estimator,scale",
        [("grpo", "group"), ("grpo", "batch"), ("grpo", "none"), ("dr_grpo", "group"), ("rloo", "group")],
    )
    def test_matches_numpy(self, estimator, scale):
        rewards = np.random.default_rng(1).normal(size=(3, 5))
        got = losses.group_advantages(
            rewards_PG=jnp.asarray(rewards, jnp.float32), estimator=estimator, scale=scale
        )
        assert got.shape == (3, 5) and got.dtype == jnp.float32
        np.testing.assert_allclose(got, np_advantages(rewards, estimator, scale), rtol=1e-5, atol=1e-6)

    def test_by_hand(self):
        r = jnp.asarray([[1.0, 2.0, 3.0, 6.0]])
        # mean 3, deviations -2, -1, 0, 3; std (ddof=1) = sqrt(14/3)
        std = math.sqrt(14.0 / 3.0)
        grpo = losses.group_advantages(rewards_PG=r)
        np.testing.assert_allclose(grpo[0], np.array([-2.0, -1.0, 0.0, 3.0]) / (std + 1e-4), rtol=1e-6)
        dr = losses.group_advantages(rewards_PG=r, estimator="dr_grpo")
        np.testing.assert_allclose(dr[0], [-2.0, -1.0, 0.0, 3.0], rtol=1e-6)
        # leave-one-out baselines: (2+3+6)/3, (1+3+6)/3, (1+2+6)/3, (1+2+3)/3
        rloo = losses.group_advantages(rewards_PG=r, estimator="rloo")
        np.testing.assert_allclose(rloo[0], [1 - 11 / 3, 2 - 10 / 3, 3 - 3.0, 6 - 2.0], rtol=1e-6, atol=1e-6)
        np.testing.assert_allclose(rloo[0], 4 / 3 * np.array([-2.0, -1.0, 0.0, 3.0]), rtol=1e-6, atol=1e-6)

    def test_scale_batch_and_none(self):
        r = jnp.asarray([[0.0, 2.0], [10.0, 10.0]])
        # group means 1 and 10; batch std (ddof=1) of {0, 2, 10, 10}: mean 5.5, squares 30.25+12.25+20.25*2
        batch_std = math.sqrt((30.25 + 12.25 + 20.25 + 20.25) / 3)
        got = losses.group_advantages(rewards_PG=r, scale="batch")
        np.testing.assert_allclose(
            got, [[-1 / (batch_std + 1e-4), 1 / (batch_std + 1e-4)], [0, 0]], rtol=1e-6
        )
        got = losses.group_advantages(rewards_PG=r, scale="none")
        np.testing.assert_allclose(got, [[-1.0, 1.0], [0.0, 0.0]])
        # scale="group" divides the first group by its own std sqrt(2)
        got = losses.group_advantages(rewards_PG=r, scale="group")
        np.testing.assert_allclose(got[0], [-1 / (math.sqrt(2) + 1e-4), 1 / (math.sqrt(2) + 1e-4)], rtol=1e-6)

    @pytest.mark.parametrize(
        "estimator,scale", [("grpo", "group"), ("grpo", "batch"), ("dr_grpo", "group"), ("rloo", "none")]
    )
    def test_all_equal_group_is_exactly_zero(self, estimator, scale):
        # 0.1 and 0.7 are not exact in binary: the group mean can miss them by an ulp.
        r = jnp.asarray([[0.1, 0.1, 0.1, 0.1, 0.1, 0.1, 0.1], [0.7] * 7, [0.0, 1.0, 1.0, 0.0, 1.0, 0.0, 1.0]])
        adv = losses.group_advantages(rewards_PG=r, estimator=estimator, scale=scale)
        assert np.all(np.isfinite(adv))
        assert np.all(np.asarray(adv[:2]) == 0.0)
        assert np.any(np.asarray(adv[2]) != 0.0)
        # the loss of such a batch is finite, and zero for the all-equal groups
        B, T = 21, 3
        logps = np.full((B, T), -1.0)
        loss = _loss(logps, logps - 0.1, np.asarray(adv).reshape(-1), np.ones((B, T)))
        assert np.isfinite(float(loss))
        loss_equal = _loss(logps[:14], logps[:14] - 0.1, np.asarray(adv[:2]).reshape(-1), np.ones((14, T)))
        assert float(loss_equal) == 0.0

    def test_validation_names_the_argument(self):
        r = jnp.zeros((2, 4))
        with pytest.raises(ValueError, match="estimator"):
            losses.group_advantages(rewards_PG=r, estimator="ppo")
        with pytest.raises(ValueError, match="scale"):
            losses.group_advantages(rewards_PG=r, scale="global")
        with pytest.raises(ValueError, match="scale"):
            losses.group_advantages(rewards_PG=r, estimator="rloo", scale="batch")
        with pytest.raises(ValueError, match="rewards_PG"):
            losses.group_advantages(rewards_PG=jnp.zeros((4, 1)))
        with pytest.raises(ValueError, match="rewards_PG"):
            losses.group_advantages(rewards_PG=jnp.zeros((8,)))
        with pytest.raises(ValueError, match="eps"):
            losses.group_advantages(rewards_PG=r, eps=0.0)


# ---------------------------------------------------------------- the loss against NumPy


class TestLossMatchesNumpy:
    @pytest.mark.parametrize("aggregation", AGGREGATIONS)
    @pytest.mark.parametrize("level", ["token", "sequence"])
    def test_aggregation(self, aggregation, level):
        logps, old, _, adv, mask = _batch(seed=3)
        kw = {"max_length": MAX_LENGTH} if aggregation == "dr_grpo" else {}
        got = _loss(logps, old, adv, mask, aggregation=aggregation, importance_level=level, **kw)
        want = np_loss(logps, old, adv, mask, aggregation=aggregation, max_length=MAX_LENGTH, level=level)
        assert got.shape == () and got.dtype == jnp.float32
        np.testing.assert_allclose(float(got), want, rtol=1e-5, atol=1e-6)

    @pytest.mark.parametrize("aggregation", AGGREGATIONS)
    def test_kl_clip_higher_and_delta(self, aggregation):
        logps, old, ref, adv, mask = _batch(seed=4)
        old = old - 0.5 * (adv[:, None] < 0)  # push negative-advantage ratios up to where δ bites
        hp = dict(beta=0.04, eps_low=0.2, eps_high=0.28, delta=1.5, aggregation=aggregation, max_length=9)
        got = _loss(
            logps,
            old,
            adv,
            mask,
            reference_logps_BT=jnp.asarray(ref, jnp.float32),
            beta=0.04,
            epsilon_low=0.2,
            epsilon_high=0.28,
            delta=1.5,
            aggregation=aggregation,
            **({"max_length": 9} if aggregation == "dr_grpo" else {}),
        )
        np.testing.assert_allclose(float(got), np_loss(logps, old, adv, mask, ref=ref, **hp), rtol=1e-5)

    def test_dapo_token_normalizer(self):
        logps, old, _, adv, mask = _batch(seed=5)
        got = _loss(logps, old, adv, mask, token_normalizer=40.0)
        np.testing.assert_allclose(float(got), np_loss(logps, old, adv, mask, normalizer=40.0), rtol=1e-5)

    def test_masked_positions_cannot_poison_the_loss(self):
        logps, old, ref, adv, mask = _batch(seed=6)
        bad_logps = np.where(mask > 0, logps, -np.inf)
        bad_old = np.where(mask > 0, old, 80.0)
        bad_ref = np.where(mask > 0, ref, 90.0)
        for level in ("token", "sequence"):
            kw = dict(importance_level=level, beta=0.1)
            clean = _loss(logps, old, adv, mask, reference_logps_BT=jnp.asarray(ref, jnp.float32), **kw)
            dirty = _loss(
                bad_logps, bad_old, adv, mask, reference_logps_BT=jnp.asarray(bad_ref, jnp.float32), **kw
            )
            assert float(dirty) == pytest.approx(float(clean), rel=1e-6)
            g = _grad(
                bad_logps, bad_old, adv, mask, reference_logps_BT=jnp.asarray(bad_ref, jnp.float32), **kw
            )
            assert np.all(np.isfinite(g)) and np.all(g[mask == 0] == 0.0)


# ---------------------------------------------------------------- gradients in each clip region


class TestClipGradients:
    # One token per sequence, dapo over 3 tokens: loss = Σ term / 3.
    OLD = np.zeros((3, 1))
    MASK = np.ones((3, 1))

    def test_zero_and_nonzero_regions(self):
        # rows: (A > 0, ratio 1.5 > 1 + ε_high), (A < 0, ratio 0.5 < 1 - ε_low), (A < 0, ratio 1.5)
        logps = np.log([[1.5], [0.5], [1.5]])
        adv = np.array([1.0, -1.0, -1.0])
        g = _grad(logps, self.OLD, adv, self.MASK, epsilon_low=0.2, epsilon_high=0.28)
        assert g[0, 0] == 0.0 and g[1, 0] == 0.0
        # the pessimistic bound keeps the unclipped term: d/dl[-A e^l] / 3 = -A·1.5 / 3
        assert g[2, 0] == pytest.approx(0.5, rel=1e-6)
        # inside the trust region the gradient is -A·ratio/3 for both signs
        g = _grad(np.log([[1.1], [0.9], [1.1]]), self.OLD, adv, self.MASK)
        np.testing.assert_allclose(g[:, 0], [-1.1 / 3, 0.9 / 3, 1.1 / 3], rtol=1e-6)
        # and (A > 0, ratio < 1 - ε) / (A < 0, ratio > 1 + ε) are not clipped
        g = _grad(np.log([[0.5], [1.5], [1.0]]), self.OLD, np.array([1.0, -1.0, 0.0]), self.MASK)
        np.testing.assert_allclose(g[:, 0], [-0.5 / 3, 1.5 / 3, 0.0], rtol=1e-6)

    def test_epsilon_high_defaults_to_epsilon_low(self):
        logps = np.log([[1.25], [1.25], [0.85]])
        adv = np.array([1.0, 1.0, -1.0])
        # ratio 1.25: clipped at 1.2 when ε_high = ε_low = 0.2, inside when ε_high = 0.28
        g_default = _grad(logps, self.OLD, adv, self.MASK, epsilon_low=0.2)
        g_higher = _grad(logps, self.OLD, adv, self.MASK, epsilon_low=0.2, epsilon_high=0.28)
        assert g_default[0, 0] == 0.0 and g_higher[0, 0] == pytest.approx(-1.25 / 3, rel=1e-6)
        # ratio 0.85 with A < 0 is clipped when ε_low = 0.1
        assert _grad(logps, self.OLD, adv, self.MASK, epsilon_low=0.1)[2, 0] == 0.0

    def test_delta_caps_the_unclipped_ratio(self):
        # A < 0 and ratio 5: without δ the term is 5 (growing with the ratio), with δ = 3 it is 3, flat.
        logps = np.log([[5.0], [5.0], [2.0]])
        adv = np.array([-1.0, 1.0, -1.0])
        no_delta = _loss(logps, self.OLD, adv, self.MASK)
        with_delta = _loss(logps, self.OLD, adv, self.MASK, delta=3.0)
        # rows: 5 | -1.2 | 2 without δ; 3 | -1.2 | 2 with δ = 3 (A > 0 keeps its clip, ratio 2 < δ)
        assert float(no_delta) == pytest.approx((5.0 - 1.2 + 2.0) / 3, rel=1e-6)
        assert float(with_delta) == pytest.approx((3.0 - 1.2 + 2.0) / 3, rel=1e-6)
        g = _grad(logps, self.OLD, adv, self.MASK, delta=3.0)
        np.testing.assert_allclose(g[:, 0], [0.0, 0.0, 2.0 / 3], rtol=1e-6)


class TestOnPolicyGradient:
    @pytest.mark.parametrize("aggregation", AGGREGATIONS)
    @pytest.mark.parametrize("level", ["token", "sequence"])
    def test_minus_advantage_over_normaliser(self, aggregation, level):
        logps, _, _, adv, mask = _batch(seed=7)
        B = logps.shape[0]
        counts = mask.sum(axis=1)
        normaliser = {
            "grpo": B * counts[:, None],
            "bnpo": mask.sum(),
            "dr_grpo": B * MAX_LENGTH,
            "dapo": mask.sum(),
        }[aggregation]
        kw = {"max_length": MAX_LENGTH} if aggregation == "dr_grpo" else {}
        # the old log-probs are the same array: a constant, so the ratio is 1 with gradient 1
        f = lambda lp: _loss(lp, lp, adv, mask, aggregation=aggregation, importance_level=level, **kw)  # noqa: E731
        loss, g = jax.value_and_grad(f)(jnp.asarray(logps, jnp.float32))
        np.testing.assert_allclose(np.asarray(g), -adv[:, None] * mask / normaliser, rtol=1e-6, atol=1e-8)
        # and the loss value is -Σ A·m / normaliser
        np.testing.assert_allclose(
            float(loss), np.sum(-adv[:, None] * mask / normaliser), rtol=1e-5, atol=1e-7
        )


def test_dapo_micro_batches_sum_to_one_batch():
    logps, old, ref, adv, mask = _batch(seed=8, B=8, T=5)
    kw = dict(beta=0.05, epsilon_high=0.28)
    refj = jnp.asarray(ref, jnp.float32)
    big = _loss(logps, old, adv, mask, reference_logps_BT=refj, **kw)
    g_big = _grad(logps, old, adv, mask, reference_logps_BT=refj, **kw)
    total_tokens = jnp.sum(jnp.asarray(mask))
    parts, grads = [], []
    for i in range(4):
        s = slice(2 * i, 2 * i + 2)
        sub = dict(reference_logps_BT=refj[s], token_normalizer=total_tokens, **kw)
        parts.append(float(_loss(logps[s], old[s], adv[s], mask[s], **sub)))
        grads.append(_grad(logps[s], old[s], adv[s], mask[s], **sub))
    np.testing.assert_allclose(sum(parts), float(big), rtol=1e-6, atol=1e-6)
    np.testing.assert_allclose(np.concatenate(grads), g_big, rtol=1e-6, atol=1e-7)
    # without the global normaliser each micro-batch is its own token mean: the sum is not the batch loss
    local = 0.0
    for i in range(4):
        s = slice(2 * i, 2 * i + 2)
        local += float(_loss(logps[s], old[s], adv[s], mask[s], reference_logps_BT=refj[s], **kw))
    assert abs(local - float(big)) > 1e-3


def test_gspo_sequence_ratio():
    # log-ratios 0.05 and 0.15 on the two loss tokens (mean 0.1), and 5.0 on a masked one
    old = np.array([[-1.0, -1.0, -1.0]])
    logps = old + np.array([[0.05, 0.15, 5.0]])
    mask = np.array([[1.0, 1.0, 0.0]])
    adv = np.array([1.0])
    seq = _loss(logps, old, adv, mask, importance_level="sequence")
    assert float(seq) == pytest.approx(-math.exp(0.1), rel=1e-6)
    tok = _loss(logps, old, adv, mask, importance_level="token")
    assert float(tok) == pytest.approx(-(math.exp(0.05) + math.exp(0.15)) / 2, rel=1e-6)
    # d/dl_t of -e^{(l_1 + l_2)/2 - c} summed over 2 tokens / 2 tokens = -e^{0.1}/2 on each loss token
    g = _grad(logps, old, adv, mask, importance_level="sequence")
    np.testing.assert_allclose(g, [[-math.exp(0.1) / 2, -math.exp(0.1) / 2, 0.0]], rtol=1e-6)
    m = losses.policy_gradient_metrics(
        logps_BT=jnp.asarray(logps, jnp.float32),
        old_logps_BT=jnp.asarray(old, jnp.float32),
        advantages_B=jnp.asarray(adv, jnp.float32),
        mask_BT=jnp.asarray(mask),
        importance_level="sequence",
    )
    assert float(m["ratio_mean"]) == pytest.approx(math.exp(0.1), rel=1e-6)
    # a sequence whose mean log-ratio leaves the trust region is clipped as a whole
    logps2 = old + np.array([[0.1, 0.4, 0.0]])  # mean 0.25: e^0.25 = 1.284 > 1.2
    assert float(_loss(logps2, old, adv, mask, importance_level="sequence")) == pytest.approx(-1.2, rel=1e-6)
    assert np.all(_grad(logps2, old, adv, mask, importance_level="sequence") == 0.0)


def test_k3_value_and_gradient():
    logps = np.array([[-1.0, -2.0, -0.5]])
    mask = np.ones((1, 3))
    zero_adv = np.zeros(1)
    # at ref == logps: k3 = 0 and d k3 / d logp = 1 - e^0 = 0
    f = functools.partial(_loss, old=logps, adv=zero_adv, mask=mask, beta=0.1, aggregation="bnpo")
    same = lambda lp: f(lp, reference_logps_BT=lp)  # noqa: E731
    value, g = jax.value_and_grad(same)(jnp.asarray(logps, jnp.float32))
    assert float(value) == 0.0 and np.all(np.asarray(g) == 0.0)
    # off the reference: k3(d) = e^d - d - 1 with d = ref - logp; d/dlogp = 1 - e^d
    d = np.array([[0.5, -0.3, 1.0]])
    ref = jnp.asarray(logps + d, jnp.float32)
    k3 = np.exp(d) - d - 1
    assert float(f(logps, reference_logps_BT=ref)) == pytest.approx(0.1 * k3.mean(), rel=1e-6)
    g = _grad(logps, logps, zero_adv, mask, beta=0.1, aggregation="bnpo", reference_logps_BT=ref)
    np.testing.assert_allclose(g, 0.1 * (1 - np.exp(d)) / 3, rtol=1e-5)
    m = losses.policy_gradient_metrics(
        logps_BT=jnp.asarray(logps, jnp.float32),
        old_logps_BT=jnp.asarray(logps, jnp.float32),
        advantages_B=jnp.zeros(1),
        mask_BT=jnp.ones((1, 3)),
        reference_logps_BT=ref,
    )
    assert float(m["kl"]) == pytest.approx(k3.mean(), rel=1e-6)
    # β = 0: the reference is not needed and does not change the loss
    logps_b, old_b, ref_b, adv_b, mask_b = _batch(seed=9)
    assert float(_loss(logps_b, old_b, adv_b, mask_b, reference_logps_BT=jnp.asarray(ref_b))) == float(
        _loss(logps_b, old_b, adv_b, mask_b)
    )


def test_metrics_by_hand():
    # 4 sequences × 2 tokens, the last token of sequence 3 masked out (7 loss tokens)
    ratios = np.array([[1.5, 1.0], [0.5, 0.9], [0.5, 1.5], [1.5, 9.0]])
    adv = np.array([1.0, -1.0, 1.0, -1.0])
    mask = np.array([[1, 1], [1, 1], [1, 1], [1, 0]], np.float32)
    old = np.full((4, 2), -2.0)
    m = losses.policy_gradient_metrics(
        logps_BT=jnp.asarray(old + np.log(ratios), jnp.float32),
        old_logps_BT=jnp.asarray(old, jnp.float32),
        advantages_B=jnp.asarray(adv, jnp.float32),
        mask_BT=jnp.asarray(mask),
    )
    assert set(m) == {"clip_frac_low", "clip_frac_high", "ratio_mean"}
    assert float(m["clip_frac_high"]) == pytest.approx(2 / 7)  # (A>0, 1.5) twice
    assert float(m["clip_frac_low"]) == pytest.approx(1 / 7)  # (A<0, 0.5); 1.5 with A<0 is not clipped
    assert float(m["ratio_mean"]) == pytest.approx((1.5 + 1.0 + 0.5 + 0.9 + 0.5 + 1.5 + 1.5) / 7, rel=1e-6)


def test_jit_with_traced_hyperparameters():
    logps, old, ref, adv, mask = _batch(seed=10)
    refj = jnp.asarray(ref, jnp.float32)

    @jax.jit
    def f(lp, beta, normaliser):
        return _loss(lp, old, adv, mask, reference_logps_BT=refj, beta=beta, token_normalizer=normaliser)

    got = f(jnp.asarray(logps, jnp.float32), 0.05, 30.0)
    want = np_loss(logps, old, adv, mask, ref=ref, beta=0.05, normalizer=30.0)
    np.testing.assert_allclose(float(got), want, rtol=1e-5)


def test_bfloat16_inputs_compute_in_float32():
    logps, old, _, adv, mask = _batch(seed=11)
    lp16, old16 = jnp.asarray(logps, jnp.bfloat16), jnp.asarray(old, jnp.bfloat16)
    got = losses.policy_gradient_loss(
        logps_BT=lp16, old_logps_BT=old16, advantages_B=jnp.asarray(adv, jnp.bfloat16), mask_BT=mask
    )
    assert got.dtype == jnp.float32
    adv16 = np.asarray(jnp.asarray(adv, jnp.bfloat16), np.float64)
    want = np_loss(np.asarray(lp16, np.float64), np.asarray(old16, np.float64), adv16, mask)
    np.testing.assert_allclose(float(got), want, rtol=1e-5)


def test_validation_names_the_argument():
    logps, old, ref, adv, mask = _batch(seed=12)
    cases = [
        (dict(aggregation="seq-mean"), "aggregation"),
        (dict(aggregation="dr_grpo"), "max_length"),
        (dict(importance_level="segment"), "importance_level"),
        (dict(beta=0.1), "reference_logps_BT"),
        (dict(aggregation="bnpo", token_normalizer=10.0), "token_normalizer"),
        (dict(epsilon_low=1.0), "epsilon_low"),
        (dict(epsilon_high=-0.1), "epsilon_high"),
        (dict(delta=1.0), "delta"),
        (dict(beta=-0.1), "beta"),
    ]
    for kw, name in cases:
        with pytest.raises(ValueError, match=name):
            _loss(logps, old, adv, mask, **kw)
    with pytest.raises(ValueError, match="advantages_B"):
        _loss(logps, old, adv[:2], mask)
    with pytest.raises(ValueError, match="old_logps_BT"):
        _loss(logps, old[:, :3], adv, mask)
    with pytest.raises(ValueError, match="importance_level"):
        losses.policy_gradient_metrics(
            logps_BT=logps, old_logps_BT=old, advantages_B=adv, mask_BT=mask, importance_level="x"
        )


def test_not_in_the_pairwise_registry():
    for name in ("group_advantages", "policy_gradient_loss", "policy_gradient_metrics", "grpo", "dapo"):
        assert name not in losses.names()
