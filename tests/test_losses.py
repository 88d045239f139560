"""Tests for rlhf_jax.losses: hand-derived values, invariants from the papers, gradients, transforms."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from rlhf_jax import losses

PAIR_KEYS = (
    "policy_chosen_logps",
    "policy_rejected_logps",
    "reference_chosen_logps",
    "reference_rejected_logps",
)


def _sig(x):
    return 1.0 / (1.0 + math.exp(-x))


def _logsig(x):
    return -math.log1p(math.exp(-x)) if x > -30 else x


def _inputs(name, pc, pr, rc, rr, *, lw=4.0, ll=5.0, prev=None):
    """Keyword inputs for loss `name` from scalars (arrays of shape [1])."""
    values = {
        "policy_chosen_logps": pc,
        "policy_rejected_logps": pr,
        "reference_chosen_logps": rc,
        "reference_rejected_logps": rr,
        "chosen_lengths": lw,
        "rejected_lengths": ll,
        "previous_chosen_logps": rc if prev is None else prev[0],
        "previous_rejected_logps": rr if prev is None else prev[1],
    }
    need = losses.required_inputs(name)
    return {k: jnp.atleast_1d(jnp.asarray(values[k], jnp.float32)) for k in need}


def _call(name, pc, pr, rc, rr, **kw):
    hp = kw.pop("hp", {})
    return float(losses.get(name)(**_inputs(name, pc, pr, rc, rr, **kw), **hp)[0])


# One point: r_w = 1, r_l = -0.5, h = 1.5; lp_w - lp_l = 2.
PC, PR, RC, RR = -10.0, -12.0, -11.0, -11.5


class TestHandDerivedValues:
    def test_dpo(self):
        # -logσ(0.15) = log(1 + e^-0.15)
        assert _call("dpo", PC, PR, RC, RR) == pytest.approx(math.log1p(math.exp(-0.15)), rel=1e-6)
        assert _call("dpo", PC, PR, RC, RR, hp={"beta": 1.0}) == pytest.approx(0.2014133, rel=1e-5)

    def test_cdpo(self):
        eps = 0.2
        want = -(0.8) * _logsig(0.15) - 0.2 * _logsig(-0.15)
        got = _call("dpo", PC, PR, RC, RR, hp={"label_smoothing": eps})
        assert got == pytest.approx(want, rel=1e-6)
        assert _call("cdpo", PC, PR, RC, RR, hp={"label_smoothing": eps}) == pytest.approx(want, rel=1e-6)

    def test_rdpo(self):
        eps = 0.2
        want = (-0.8 * _logsig(0.15) + 0.2 * _logsig(-0.15)) / 0.6
        assert _call("rdpo", PC, PR, RC, RR, hp={"flip_rate": eps}) == pytest.approx(want, rel=1e-6)

    def test_ipo(self):
        # (1.5 - 5)^2 = 12.25
        assert _call("ipo", PC, PR, RC, RR) == pytest.approx(12.25, rel=1e-6)
        got = losses.ipo(
            **_inputs("dpo", PC, PR, RC, RR),
            chosen_lengths=jnp.array([4.0]),
            rejected_lengths=jnp.array([5.0]),
        )
        # h' = 1/4 - (-0.5)/5 = 0.35 -> (0.35 - 5)^2 = 21.6225
        assert float(got[0]) == pytest.approx(21.6225, rel=1e-6)

    def test_hinge_family(self):
        assert _call("hinge_norm", PC, PR, RC, RR) == pytest.approx(1 - 0.05 * 1.5, rel=1e-6)
        assert _call("hinge", PC, PR, RC, RR) == pytest.approx(1 - 0.05 * 2.0, rel=1e-6)
        assert _call("sigmoid_norm", PC, PR, RC, RR) == pytest.approx(-_logsig(0.05 * 1.5), rel=1e-6)
        # Past the margin the hinge is exactly zero.
        assert _call("hinge", PC, PR, RC, RR, hp={"gamma": 1.0}) == 0.0

    def test_slic(self):
        # max(0, 1 - 2) = 0; minus 0.5 * lp_w = +5.
        got = losses.slic(
            policy_chosen_logps=jnp.array([PC]), policy_rejected_logps=jnp.array([PR]), reg_weight=0.5
        )
        assert float(got[0]) == pytest.approx(5.0)
        got = losses.slic(
            policy_chosen_logps=jnp.array([PC]),
            policy_rejected_logps=jnp.array([PR]),
            delta=3.0,
            reg_weight=0.5,
            policy_target_logps=jnp.array([-4.0]),
        )
        assert float(got[0]) == pytest.approx(1.0 + 2.0)

    def test_inpo(self):
        # eta = 0.1, tau = 0.05: h_t = 2 - 0.5 * 0.5 - 0.5 * (prev_w - prev_l = -1) = 2.25; (2.25 - 5)^2
        got = _call("inpo", PC, PR, RC, RR, prev=(-3.0, -2.0), hp={"eta": 0.1, "tau": 0.05})
        assert got == pytest.approx((2.25 - 5.0) ** 2, rel=1e-6)
        # Default tau = eta / 3.
        want_h = 2 - (1 / 3) * 0.5 - (2 / 3) * (-1.0)
        got = _call("inpo", PC, PR, RC, RR, prev=(-3.0, -2.0), hp={"eta": 0.1})
        assert got == pytest.approx((want_h - 5.0) ** 2, rel=1e-5)

    def test_rpo(self):
        want = -_logsig(0.15) - 0.005 * 0.1 * PC
        assert _call("rpo", PC, PR, RC, RR) == pytest.approx(want, rel=1e-6)

    def test_chosen_nll(self):
        assert _call("chosen_nll", PC, PR, RC, RR) == pytest.approx(10.0, rel=1e-6)
        assert not losses.uses_reference("chosen_nll")

    def test_simpo(self):
        # lp_w / 4 - lp_l / 5 = -2.5 + 2.4 = -0.1; -logσ(2 * -0.1 - 0.5)
        assert _call("simpo", PC, PR, RC, RR) == pytest.approx(-_logsig(-0.7), rel=1e-6)

    def test_orpo(self):
        a_w, a_l = PC / 4, PR / 5
        log_odds = (a_w - a_l) - (math.log1p(-math.exp(a_w)) - math.log1p(-math.exp(a_l)))
        want = -a_w - 0.1 * _logsig(log_odds)
        assert _call("orpo", PC, PR, RC, RR) == pytest.approx(want, rel=1e-5)

    def test_trl_types(self):
        z = 0.15
        eps = 1e-3
        exo = _sig(z) * (_logsig(z) - math.log(1 - eps)) + _sig(-z) * (_logsig(-z) - math.log(eps))
        assert _call("exo_pair", PC, PR, RC, RR) == pytest.approx(exo, rel=1e-5)
        nca = -_logsig(0.1) - 0.5 * _logsig(-0.1) - 0.5 * _logsig(0.05)
        assert _call("nca_pair", PC, PR, RC, RR) == pytest.approx(nca, rel=1e-6)
        bco = -_logsig(0.1) - _logsig(0.05)
        assert _call("bco_pair", PC, PR, RC, RR) == pytest.approx(bco, rel=1e-6)
        bco_d = -_logsig(0.1 - 0.3) - _logsig(0.05 + 0.3)
        assert _call("bco_pair", PC, PR, RC, RR, hp={"delta": 0.3}) == pytest.approx(bco_d, rel=1e-6)
        assert _call("sppo_hard", PC, PR, RC, RR) == pytest.approx(16.0 + 20.25, rel=1e-6)
        assert _call("apo_zero", PC, PR, RC, RR) == pytest.approx(1 - _sig(0.1) + _sig(-0.05), rel=1e-6)
        assert _call("apo_down", PC, PR, RC, RR) == pytest.approx(_sig(0.1) + 1 - _sig(0.15), rel=1e-6)
        m = _sig(0.15 / 0.05)
        disco = -_logsig(0.15) * (1 - m) + math.exp(-0.15) * m
        assert _call("discopop", PC, PR, RC, RR) == pytest.approx(disco, rel=1e-5)
        # r_w/4 - r_l/5 = 0.25 + 0.1
        assert _call("dpo_length_normalized", PC, PR, RC, RR) == pytest.approx(-_logsig(0.035), rel=1e-6)

    def test_aot_sorts_over_the_batch(self):
        pc = jnp.array([-1.0, -5.0, -2.0])
        pr = jnp.array([-3.0, -4.0, -2.0])
        rc = jnp.array([-2.0, -2.0, -2.0])
        rr = jnp.array([-1.0, -3.0, -2.0])
        kw = dict(
            policy_chosen_logps=pc,
            policy_rejected_logps=pr,
            reference_chosen_logps=rc,
            reference_rejected_logps=rr,
            beta=1.0,
        )
        # policy margins [2, -1, 0] -> sorted [-1, 0, 2]; reference margins [-1, 1, 0] -> [-1, 0, 1].
        want = [-_logsig(d) for d in (0.0, 0.0, 1.0)]
        np.testing.assert_allclose(losses.aot(**kw), want, rtol=1e-6)
        # r_w = [1, -3, 0] -> [-3, 0, 1]; r_l = [-2, -1, 0] -> [-2, -1, 0]; deltas [-1, 1, 1].
        want = [-_logsig(d) for d in (-1.0, 1.0, 1.0)]
        np.testing.assert_allclose(losses.aot_unpaired(**kw), want, rtol=1e-6)

    def test_bradley_terry(self):
        got = losses.bradley_terry(
            chosen_rewards=jnp.array([2.0, 0.0]), rejected_rewards=jnp.array([1.0, 0.0])
        )
        np.testing.assert_allclose(got, [math.log1p(math.exp(-1.0)), math.log(2.0)], rtol=1e-6)
        got = losses.bradley_terry(
            chosen_rewards=jnp.array([2.0]), rejected_rewards=jnp.array([1.0]), margin=1.0
        )
        np.testing.assert_allclose(got, [math.log(2.0)], rtol=1e-6)

    def test_preference_metrics(self):
        m = losses.preference_metrics(
            policy_chosen_logps=jnp.array([-1.0, -2.0]),
            policy_rejected_logps=jnp.array([-3.0, -1.0]),
            reference_chosen_logps=jnp.array([-2.0, -2.0]),
            reference_rejected_logps=jnp.array([-2.0, -2.0]),
            beta=0.5,
        )
        # r_w = [1, 0], r_l = [-1, 1], h = [2, -1].
        assert float(m["chosen_reward"]) == pytest.approx(0.25)
        assert float(m["rejected_reward"]) == pytest.approx(0.0)
        assert float(m["reward_margin"]) == pytest.approx(0.25)
        assert float(m["reward_accuracy"]) == pytest.approx(0.5)


class TestPaperInvariants:
    def test_dpo_at_reference_is_log2(self):
        x = jnp.array([-3.0, -40.0, -0.5])
        got = losses.dpo(
            policy_chosen_logps=x,
            policy_rejected_logps=x - 1,
            reference_chosen_logps=x,
            reference_rejected_logps=x - 1,
        )
        np.testing.assert_allclose(got, np.full(3, math.log(2.0)), rtol=1e-6)

    @pytest.mark.parametrize("eps", [0.0, 0.1, 0.3, 0.45])
    def test_rdpo_is_unbiased(self, eps):
        rng = np.random.default_rng(0)
        pc, pr, rc, rr = (jnp.asarray(rng.normal(-20, 5, 16), jnp.float32) for _ in range(4))
        kw = dict(reference_chosen_logps=rc, reference_rejected_logps=rr)
        flipped = dict(reference_chosen_logps=rr, reference_rejected_logps=rc)
        r = losses.rdpo(policy_chosen_logps=pc, policy_rejected_logps=pr, flip_rate=eps, **kw)
        r_flip = losses.rdpo(policy_chosen_logps=pr, policy_rejected_logps=pc, flip_rate=eps, **flipped)
        clean = losses.dpo(policy_chosen_logps=pc, policy_rejected_logps=pr, **kw)
        np.testing.assert_allclose((1 - eps) * r + eps * r_flip, clean, rtol=1e-5, atol=1e-6)

    @pytest.mark.parametrize("eps", [0.05, 0.1, 0.25])
    def test_cdpo_gradient_vanishes_at_its_optimum(self, eps):
        beta = 0.1
        h_star = math.log((1 - eps) / eps) / beta

        def f(h):
            return losses.dpo(
                policy_chosen_logps=h,
                policy_rejected_logps=jnp.zeros(()),
                reference_chosen_logps=jnp.zeros(()),
                reference_rejected_logps=jnp.zeros(()),
                beta=beta,
                label_smoothing=eps,
            )

        assert abs(float(jax.grad(f)(jnp.float32(h_star)))) < 1e-6
        assert float(jax.grad(f)(jnp.float32(h_star - 5))) < 0 < float(jax.grad(f)(jnp.float32(h_star + 5)))

    def test_inpo_with_previous_equal_reference_is_ipo(self):
        rng = np.random.default_rng(1)
        pc, pr, rc, rr = (jnp.asarray(rng.normal(-20, 5, 16), jnp.float32) for _ in range(4))
        kw = dict(
            policy_chosen_logps=pc,
            policy_rejected_logps=pr,
            reference_chosen_logps=rc,
            reference_rejected_logps=rr,
        )
        got = losses.inpo(**kw, previous_chosen_logps=rc, previous_rejected_logps=rr, eta=0.05, tau=0.01)
        np.testing.assert_allclose(got, losses.ipo(**kw, beta=0.05), rtol=1e-5)

    def test_rpo_with_zero_eta_is_dpo(self):
        rng = np.random.default_rng(2)
        kw = {k: jnp.asarray(rng.normal(-20, 5, 8), jnp.float32) for k in PAIR_KEYS}
        np.testing.assert_array_equal(losses.rpo(**kw, beta=0.3, eta=0.0), losses.dpo(**kw, beta=0.3))

    def test_sigmoid_norm_is_dpo_with_beta_gamma(self):
        rng = np.random.default_rng(3)
        kw = {k: jnp.asarray(rng.normal(-20, 5, 8), jnp.float32) for k in PAIR_KEYS}
        np.testing.assert_array_equal(losses.sigmoid_norm(**kw, gamma=0.2), losses.dpo(**kw, beta=0.2))

    def test_hinge_is_slic_calibration_scaled(self):
        pc, pr = jnp.array([-5.0, -9.0, -3.0]), jnp.array([-6.0, -4.0, -30.0])
        gamma = 0.25
        hinge = losses.hinge(policy_chosen_logps=pc, policy_rejected_logps=pr, gamma=gamma)
        slic = losses.slic(policy_chosen_logps=pc, policy_rejected_logps=pr, delta=1 / gamma)
        np.testing.assert_allclose(hinge, gamma * slic, rtol=1e-6)

    def test_exo_pair_is_zero_at_label_distribution(self):
        eps = 0.1
        h = math.log((1 - eps) / eps) / 0.1  # σ(βh) = 1 - ε
        got = losses.exo_pair(
            policy_chosen_logps=jnp.array([h]),
            policy_rejected_logps=jnp.array([0.0]),
            reference_chosen_logps=jnp.array([0.0]),
            reference_rejected_logps=jnp.array([0.0]),
            label_smoothing=eps,
        )
        assert abs(float(got[0])) < 1e-5


def _all_inputs(rng, n, scale=5.0):
    return {
        "policy_chosen_logps": jnp.asarray(rng.normal(-20, scale, n), jnp.float32),
        "policy_rejected_logps": jnp.asarray(rng.normal(-20, scale, n), jnp.float32),
        "reference_chosen_logps": jnp.asarray(rng.normal(-20, scale, n), jnp.float32),
        "reference_rejected_logps": jnp.asarray(rng.normal(-20, scale, n), jnp.float32),
        "previous_chosen_logps": jnp.asarray(rng.normal(-20, scale, n), jnp.float32),
        "previous_rejected_logps": jnp.asarray(rng.normal(-20, scale, n), jnp.float32),
        "chosen_lengths": jnp.asarray(rng.integers(1, 30, n), jnp.float32),
        "rejected_lengths": jnp.asarray(rng.integers(1, 30, n), jnp.float32),
    }


def _select(name, inputs):
    return {k: inputs[k] for k in losses.required_inputs(name)}


@pytest.mark.parametrize("name", losses.names())
class TestEveryLoss:
    def test_gradient_signs_at_the_reference(self, name):
        """At policy == reference (h = 0), descent raises lp_w and lowers lp_l (or at least the margin)."""
        if name == "discopop":
            pytest.skip("DiscoPOP is not monotone at h=0 (slope > 0 for tau=0.05); see test_discopop_signs")
        x = jnp.array([-12.0, -3.0])
        y = jnp.array([-14.0, -2.0])
        inputs = {
            "policy_chosen_logps": x,
            "policy_rejected_logps": y,
            "reference_chosen_logps": x,
            "reference_rejected_logps": y,
            "previous_chosen_logps": x,
            "previous_rejected_logps": y,
            # Equal lengths and policy == reference: a margin below every loss's target margin.
            "chosen_lengths": jnp.array([10.0, 10.0]),
            "rejected_lengths": jnp.array([10.0, 10.0]),
        }
        if name in ("simpo", "orpo", "hinge", "slic"):  # reference-free: start with lp_w == lp_l
            inputs["policy_rejected_logps"] = x

        def total(pc, pr):
            kw = dict(_select(name, inputs), policy_chosen_logps=pc, policy_rejected_logps=pr)
            return jnp.sum(losses.get(name)(**kw))

        g_w, g_l = jax.grad(total, argnums=(0, 1))(
            inputs["policy_chosen_logps"], inputs["policy_rejected_logps"]
        )
        if name == "chosen_nll":  # SFT on the chosen half: the rejected response plays no part
            assert np.all(np.asarray(g_l) == 0) and np.all(np.asarray(g_w) < 0), (name, g_w, g_l)
            return
        assert np.all(np.asarray(g_l) > 0), (name, g_l)
        if name == "apo_down":  # lowers the chosen likelihood by design; still widens the margin.
            assert np.all(np.asarray(g_w - g_l) < 0), (name, g_w, g_l)
        else:
            assert np.all(np.asarray(g_w) < 0), (name, g_w)

    def test_finite_difference_gradients(self, name):
        rng = np.random.default_rng(4)
        inputs = _select(name, _all_inputs(rng, 6, scale=2.0))
        fn = losses.get(name)
        keys = [k for k in inputs if k.endswith("_logps")]

        def total(*arrays):
            return jnp.sum(fn(**dict(inputs, **dict(zip(keys, arrays, strict=True)))))

        args = [inputs[k] for k in keys]
        grads = jax.grad(total, argnums=tuple(range(len(keys))))(*args)
        eps = 1e-2
        for i, k in enumerate(keys):
            for j in range(2):
                plus = [a.at[j].add(eps) if n == i else a for n, a in enumerate(args)]
                minus = [a.at[j].add(-eps) if n == i else a for n, a in enumerate(args)]
                fd = (float(total(*plus)) - float(total(*minus))) / (2 * eps)
                assert float(grads[i][j]) == pytest.approx(fd, rel=2e-2, abs=2e-3), (name, k, j)

    def test_finite_at_extreme_margins(self, name):
        big = 1e4
        for sign in (1.0, -1.0):
            inputs = {
                "policy_chosen_logps": jnp.array([-10.0 + sign * big / 2, -1e4]),
                "policy_rejected_logps": jnp.array([-10.0 - sign * big / 2, -1.0]),
                "reference_chosen_logps": jnp.array([-10.0, -1.0]),
                "reference_rejected_logps": jnp.array([-10.0, -1e4]),
                "previous_chosen_logps": jnp.array([-10.0, -5.0]),
                "previous_rejected_logps": jnp.array([-10.0, -5.0]),
                "chosen_lengths": jnp.array([20.0, 1.0]),
                "rejected_lengths": jnp.array([20.0, 1.0]),
            }
            inputs = _select(name, inputs)
            fn = losses.get(name)
            out = fn(**inputs)
            assert np.all(np.isfinite(np.asarray(out))), (name, sign, out)
            keys = [k for k in inputs if k.endswith("_logps")]
            grads = jax.grad(lambda d, fn=fn, inputs=inputs: jnp.sum(fn(**dict(inputs, **d))))(
                {k: inputs[k] for k in keys}
            )
            for k, g in grads.items():
                assert np.all(np.isfinite(np.asarray(g))), (name, sign, k, g)

    def test_bfloat16_inputs_compute_in_float32(self, name):
        rng = np.random.default_rng(5)
        inputs = _select(name, _all_inputs(rng, 8))
        bf16 = {k: v.astype(jnp.bfloat16) for k, v in inputs.items()}
        rounded = {k: v.astype(jnp.float32) for k, v in bf16.items()}
        fn = losses.get(name)
        out = fn(**bf16)
        assert out.dtype == jnp.float32 and out.shape == (8,)
        np.testing.assert_allclose(out, fn(**rounded), rtol=1e-6, atol=1e-6)
        keys = [k for k in bf16 if k.endswith("_logps")]
        grads = jax.grad(lambda d: jnp.sum(fn(**dict(bf16, **d))))({k: bf16[k] for k in keys})
        for g in grads.values():
            assert np.all(np.isfinite(np.asarray(g.astype(jnp.float32))))

    def test_jit_vmap_pmap_agree(self, name):
        rng = np.random.default_rng(6)
        n_dev = jax.local_device_count()
        assert n_dev == 8
        inputs = _select(name, _all_inputs(rng, n_dev * 4))
        fn = losses.get(name)
        eager = fn(**inputs)
        np.testing.assert_allclose(jax.jit(fn)(**inputs), eager, rtol=1e-6, atol=1e-6)
        shaped = {k: v.reshape(n_dev, 4) for k, v in inputs.items()}

        def per_shard(d):
            return fn(**d)

        by_vmap = jax.vmap(per_shard)(shaped)
        by_pmap = jax.pmap(per_shard)(shaped)
        # Equal to float32 rounding: XLA:CPU vectorises exp/log differently for a [4] shard than for a
        # [8, 4] batch, which moves some results by one ulp (~1.2e-7 relative).
        np.testing.assert_allclose(np.asarray(by_pmap), np.asarray(by_vmap), rtol=3e-7, atol=1e-7)
        if name not in ("aot", "aot_unpaired"):  # batch-level losses sort within each shard
            np.testing.assert_allclose(np.asarray(by_vmap).reshape(-1), eager, rtol=1e-6, atol=1e-6)
        grad_fn = jax.grad(lambda d: jnp.sum(fn(**d)))
        g_v = jax.vmap(grad_fn)(shaped)
        g_p = jax.pmap(grad_fn)(shaped)
        for k in g_v:
            np.testing.assert_allclose(np.asarray(g_p[k]), np.asarray(g_v[k]), rtol=1e-6, atol=1e-7)

    def test_docstring_states_formula_and_source(self, name):
        doc = losses.get(name).__doc__
        assert doc and "loss" in doc.lower()
        assert any(s in doc for s in ("et al.", "TRL", "Mitchell", "RSO"))


def test_discopop_signs_away_from_origin():
    for h in (-30.0, -10.0, 10.0, 30.0):  # |βh| >= 1 with β = 0.1
        g = jax.grad(
            lambda pc: losses.discopop(
                policy_chosen_logps=pc,
                policy_rejected_logps=jnp.float32(0.0),
                reference_chosen_logps=jnp.float32(0.0),
                reference_rejected_logps=jnp.float32(0.0),
            )
        )(jnp.float32(h))
        assert float(g) < 0, h


class TestSequenceLogps:
    def _data(self, dtype=jnp.float32):
        rng = np.random.default_rng(7)
        logits = rng.normal(0, 3, (3, 5, 11)).astype(np.float32)
        targets = rng.integers(0, 11, (3, 5)).astype(np.int32)
        mask = np.array([[0, 1, 1, 1, 0], [1, 1, 1, 1, 1], [0, 0, 0, 1, 1]], np.int32)
        return jnp.asarray(logits, dtype), jnp.asarray(targets), jnp.asarray(mask), logits, targets, mask

    @staticmethod
    def _numpy_logps(logits, targets, mask):
        x = logits.astype(np.float64)
        logsm = x - x.max(-1, keepdims=True)
        logsm = logsm - np.log(np.exp(logsm).sum(-1, keepdims=True))
        tok = np.take_along_axis(logsm, targets[..., None], -1)[..., 0]
        return (tok * mask).sum(-1), tok

    def test_matches_numpy(self):
        logits, targets, mask, np_logits, np_targets, np_mask = self._data()
        want, want_tok = self._numpy_logps(np_logits, np_targets, np_mask)
        got = losses.sequence_logps(logits=logits, targets=targets, mask=mask)
        assert got.shape == (3,) and got.dtype == jnp.float32
        np.testing.assert_allclose(got, want, rtol=1e-5)
        np.testing.assert_allclose(losses.token_logps(logits=logits, targets=targets), want_tok, rtol=1e-5)

    def test_bfloat16_logits_give_float32(self):
        logits, targets, mask, *_ = self._data(jnp.bfloat16)
        got = jax.jit(losses.sequence_logps)(logits=logits, targets=targets, mask=mask)
        assert got.dtype == jnp.float32
        want, _ = self._numpy_logps(np.asarray(logits.astype(jnp.float32)), *self._data()[4:])
        np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-4)

    def test_masked_tokens_get_zero_gradient(self):
        logits, targets, mask, *_ = self._data()
        logits = logits.at[0, 0, 3].set(jnp.inf)  # a non-finite value at a masked position stays out
        g = jax.grad(lambda x: jnp.sum(losses.sequence_logps(logits=x, targets=targets, mask=mask)))(logits)
        masked = np.asarray(mask) == 0
        assert np.all(np.asarray(g)[masked] == 0.0)
        assert np.all(np.isfinite(np.asarray(g)))
        assert np.all(np.abs(np.asarray(g)[~masked]).sum(-1) > 0)

    def test_gradient_matches_autodiff_of_log_softmax(self):
        logits, targets, mask, *_ = self._data()

        def naive(x):
            logp = jnp.take_along_axis(jax.nn.log_softmax(x), targets[..., None], -1)[..., 0]
            return jnp.sum(jnp.sin(jnp.sum(logp * mask, -1)))

        def ours(x):
            return jnp.sum(jnp.sin(losses.sequence_logps(logits=x, targets=targets, mask=mask)))

        np.testing.assert_allclose(jax.grad(ours)(logits), jax.grad(naive)(logits), rtol=1e-5, atol=1e-6)

    def test_chunked_rows_equal_unchunked(self, monkeypatch):
        from rlhf_jax.losses import _logps

        logits, targets, mask, *_ = self._data()
        whole = _logps.sequence_logps(logits=logits, targets=targets, mask=mask)
        monkeypatch.setattr(_logps, "_CHUNK_ELEMENTS", 11 * 5)  # 5 rows per chunk, 3 chunks
        assert _logps._chunk_rows(15, 11) == 5
        chunked = _logps.sequence_logps(logits=logits, targets=targets, mask=mask)
        np.testing.assert_allclose(chunked, whole, rtol=1e-6)

    def test_no_full_size_float32_scratch(self):
        """Compiled scratch memory stays at one chunk, far below a float32 [B,T,V] log-softmax.

        Checked for float32 logits, where XLA:CPU keeps the data type. For bfloat16 logits XLA:CPU's
        float-normalisation pass upcasts any bf16 array to float32 itself (the CPU has no bf16
        arithmetic), so there we only check the backward scratch is half of a naive log-softmax's;
        accelerators keep bf16 and get the one-chunk bound.
        """
        b, t, v = 8, 256, 4096  # 2048 rows, 8 chunks of 256 rows
        full_f32 = b * t * v * 4

        def ours(x, y, m):
            return jnp.sum(losses.sequence_logps(logits=x, targets=y, mask=m))

        def naive(x, y, m):
            lp = jnp.take_along_axis(jax.nn.log_softmax(x.astype(jnp.float32)), y[..., None], -1)[..., 0]
            return jnp.sum(lp * m)

        def scratch(f, dtype):
            args = (
                jax.ShapeDtypeStruct((b, t, v), dtype),
                jax.ShapeDtypeStruct((b, t), jnp.int32),
                jax.ShapeDtypeStruct((b, t), jnp.int32),
            )
            stats = jax.jit(f).lower(*args).compile().memory_analysis()
            if stats is None:
                pytest.skip("backend gives no memory analysis")
            return stats.temp_size_in_bytes

        assert scratch(ours, jnp.float32) < full_f32 // 4
        assert scratch(jax.grad(ours), jnp.float32) < full_f32 // 4
        assert scratch(naive, jnp.float32) >= full_f32  # the test can tell the difference
        assert scratch(jax.grad(ours), jnp.bfloat16) < 0.6 * scratch(jax.grad(naive), jnp.bfloat16)


class TestRegistry:
    def test_names_lists_every_loss(self):
        want = {
            "dpo", "rdpo", "ipo", "hinge_norm", "hinge", "slic", "inpo", "rpo", "simpo", "orpo",
            "exo_pair", "nca_pair", "bco_pair", "sppo_hard", "aot", "aot_unpaired", "apo_zero",
            "apo_down", "discopop", "dpo_length_normalized", "cdpo", "sigmoid_norm", "chosen_nll",
        }  # fmt: skip
        assert want == set(losses.names())
        for n in losses.names():
            assert getattr(losses, n) is losses.get(n)

    def test_unknown_name_lists_options(self):
        with pytest.raises(ValueError, match="known losses: .*dpo"):
            losses.get("dpoo")

    def test_make_validates(self):
        with pytest.raises(ValueError, match="hyperparameters are beta=0.1"):
            losses.make("dpo", gamma=1.0)
        with pytest.raises(ValueError, match="flip_rate"):
            losses.make("rdpo", flip_rate=0.5)
        with pytest.raises(ValueError, match="beta must be > 0"):
            losses.make("ipo", beta=0.0)
        with pytest.raises(ValueError, match="must be a number"):
            losses.make("dpo", beta="0.1")
        with pytest.raises(ValueError, match="tau"):
            losses.make("inpo", eta=0.01, tau=0.02)
        fn = losses.make("ipo", beta=0.5)
        out = fn(**{k: jnp.zeros(3) for k in PAIR_KEYS})
        np.testing.assert_allclose(out, np.ones(3))

    def test_inputs(self):
        assert losses.required_inputs("simpo") == (
            "policy_chosen_logps",
            "policy_rejected_logps",
            "chosen_lengths",
            "rejected_lengths",
        )
        assert "previous_chosen_logps" in losses.required_inputs("inpo")
        assert losses.optional_inputs("ipo") == ("chosen_lengths", "rejected_lengths")
        assert losses.uses_reference("dpo") and not losses.uses_reference("hinge")
        assert losses.hyperparameters("dpo") == {"beta": 0.1, "label_smoothing": 0.0}

    def test_public_names(self):
        """The registry is a namespace (`losses.registry.make`) and every name exported before stays."""
        before = {
            "INPUT_NAMES", "aot", "aot_unpaired", "apo_down", "apo_zero", "bco_pair", "bradley_terry",
            "cdpo", "discopop", "dpo", "dpo_length_normalized", "exo_pair", "get", "hinge", "hinge_norm",
            "hyperparameters", "inpo", "ipo", "make", "names", "nca_pair", "optional_inputs", "orpo",
            "preference_metrics", "rdpo", "required_inputs", "rpo", "sequence_logps",
            "sequence_logps_from_hidden", "sigmoid_norm", "simpo", "slic", "sppo_hard", "token_logps",
            "uses_reference",
        }  # fmt: skip
        policy_gradient = {"group_advantages", "policy_gradient_loss", "policy_gradient_metrics"}
        ppo = {"adaptive_kl_coef", "gae", "kl_penalized_rewards", "last_token_mask", "value_loss", "whiten"}
        extra = {"chosen_nll", "token_logps_from_hidden", "ift_loss", "ift_sequence_losses", "ift_weights"}
        direct_advantage = {"critic_bce", "direct_advantage_po", "step_advantages"}
        trajectory = {"discounted_turn_returns", "epo", "positive_log_rewards", "trajectory_balance"}
        want = before | {"registry"} | policy_gradient | ppo | extra | direct_advantage | trajectory
        assert want == set(losses.__all__)
        assert all(hasattr(losses, name) for name in losses.__all__)
        for name in ("INPUT_NAMES", "get", "hyperparameters", "make", "names", "required_inputs"):
            assert getattr(losses, name) is getattr(losses.registry, name)
        assert losses.registry.get("ipo") is losses.ipo


class TestSequenceLogpsFromHidden:
    """The fused LM head + log-softmax over loss-masked rows equals the logits path, values and grads."""

    @staticmethod
    def _data(seed=0):
        rng = np.random.default_rng(seed)
        b, t, d, v = 3, 7, 5, 13
        hidden = jnp.asarray(rng.normal(0, 1, (b, t, d)), jnp.float32)
        kernel = jnp.asarray(rng.normal(0, 1, (d, v)), jnp.float32)
        targets = jnp.asarray(rng.integers(0, v, (b, t)), jnp.int32)
        # Row 1 fully masked; 9 masked-in rows in all, so chunks of 4 leave a partial last chunk.
        mask = jnp.asarray([[0, 1, 1, 1, 1, 0, 0], [0] * 7, [1, 1, 0, 1, 1, 1, 0]], jnp.float32)
        return hidden, kernel, targets, mask

    @pytest.mark.parametrize("chunk_rows", [4, 64])
    def test_values_and_gradients_match_the_logits_path(self, monkeypatch, chunk_rows):
        from rlhf_jax.losses import _logps

        monkeypatch.setitem(_logps._HEAD_CHUNK_ELEMENTS, jax.default_backend(), chunk_rows * 13)
        assert _logps._head_chunk_rows(13) == max(8, chunk_rows // 8 * 8)
        hidden, kernel, targets, mask = self._data()
        cot = jnp.asarray([0.3, -1.0, 2.0])

        def via_logits(h, w):
            logits = jnp.einsum("BTD,DV->BTV", h, w)
            return jnp.sum(cot * losses.sequence_logps(logits=logits, targets=targets, mask=mask))

        def fused(h, w):
            got = _logps.sequence_logps_from_hidden(hidden=h, kernel=w, targets=targets, mask=mask)
            return jnp.sum(cot * got)

        np.testing.assert_allclose(jax.jit(fused)(hidden, kernel), via_logits(hidden, kernel), rtol=1e-5)
        got = jax.jit(jax.grad(fused, argnums=(0, 1)))(hidden, kernel)
        want = jax.grad(via_logits, argnums=(0, 1))(hidden, kernel)
        for g, w in zip(got, want, strict=True):
            np.testing.assert_allclose(g, w, rtol=1e-5, atol=1e-6)

    @pytest.mark.parametrize("chunk_rows", [4, 64])
    @pytest.mark.parametrize("temperature, softcap", [(1.0, None), (0.7, None), (0.7, 3.0)])
    def test_token_logps_and_entropy_match_the_logits_path(
        self, monkeypatch, chunk_rows, temperature, softcap
    ):
        """`token_logps_from_hidden`: per-token log-probs of softmax(cap(h @ w) / τ) on masked rows (0
        elsewhere), their gradient for any per-token cotangent, and the entropy of the same distribution,
        against the plain logits path written out."""
        from rlhf_jax.losses import _logps

        monkeypatch.setitem(_logps._HEAD_CHUNK_ELEMENTS, jax.default_backend(), chunk_rows * 13)
        hidden, kernel, targets, mask = self._data(1)
        cot = jnp.asarray(np.random.default_rng(2).normal(0, 1, mask.shape), jnp.float32)

        def logits_of(h, w):
            z = jnp.einsum("BTD,DV->BTV", h, w)
            return (z if softcap is None else softcap * jnp.tanh(z / softcap)) / temperature

        def via_logits(h, w):
            logq = jax.nn.log_softmax(logits_of(h, w), axis=-1)
            return jnp.take_along_axis(logq, targets[..., None], axis=-1)[..., 0] * mask

        def fused(h, w):
            return losses.token_logps_from_hidden(
                hidden=h, kernel=w, targets=targets, mask=mask, temperature=temperature, softcap=softcap
            )

        np.testing.assert_allclose(
            jax.jit(fused)(hidden, kernel), via_logits(hidden, kernel), rtol=1e-5, atol=1e-6
        )
        got = jax.grad(lambda h, w: jnp.sum(cot * fused(h, w)), argnums=(0, 1))(hidden, kernel)
        want = jax.grad(lambda h, w: jnp.sum(cot * via_logits(h, w)), argnums=(0, 1))(hidden, kernel)
        for g, w in zip(got, want, strict=True):
            np.testing.assert_allclose(g, w, rtol=1e-5, atol=1e-6)
        kw = dict(targets=targets, mask=mask, temperature=temperature, softcap=softcap, return_entropy=True)
        logps_e, entropy = losses.token_logps_from_hidden(hidden=hidden, kernel=kernel, **kw)
        # Asking for the entropy computes the log-probs through the one-exponential path: same values.
        np.testing.assert_allclose(logps_e, via_logits(hidden, kernel), rtol=1e-5, atol=1e-6)
        logq = jax.nn.log_softmax(logits_of(hidden, kernel), axis=-1)
        want_h = -jnp.sum(jnp.exp(logq) * logq, axis=-1) * mask
        np.testing.assert_allclose(entropy, want_h, rtol=1e-5, atol=1e-6)
        assert np.all(np.asarray(entropy)[np.asarray(mask) == 0] == 0.0)
        # No gradient through the entropy; the log-probs' gradient is unchanged by asking for it.
        g_h = jax.grad(lambda h: jnp.sum(losses.token_logps_from_hidden(hidden=h, kernel=kernel, **kw)[1]))(
            hidden
        )
        assert np.all(np.asarray(g_h) == 0.0)

    def test_masked_rows_are_never_computed(self):
        from rlhf_jax.losses import _logps

        hidden, kernel, targets, mask = self._data()
        hidden = hidden.at[1].set(jnp.nan).at[0, 0].set(jnp.inf)  # only at masked positions
        f = lambda h: jnp.sum(
            _logps.sequence_logps_from_hidden(hidden=h, kernel=kernel, targets=targets, mask=mask)
        )
        assert np.isfinite(float(f(hidden)))
        g = np.asarray(jax.grad(f)(hidden))
        assert np.all(np.isfinite(g)) and np.all(g[np.asarray(mask) == 0] == 0.0)
