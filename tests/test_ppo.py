"""PPO with a critic in the online loop (`rlhf_jax.pipelines.ppo`, `grpo.run` with estimator "gae"):
the critic's per-token values, the value objective under gradient accumulation, per-token advantages in
the policy objective, the shaped rewards + GAE of a rollout against a NumPy recursion, the adaptive β,
config validation, and `ppo_arith:smoke` resuming exactly after SIGKILL."""

import json
import os
import re
import signal
import subprocess
import time

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from test_grpo import _cli, _records

from rlhf_jax import models
from rlhf_jax.pipelines import grpo, ppo
from rlhf_jax.train import steps


@pytest.fixture(scope="module")
def critic():
    cfg = models.preset("tiny", vocab_size=64, max_len=16)
    model = models.RewardModel(cfg)
    params = models.init_params(model, jax.random.key(0))
    # A nonzero head bias and a larger kernel: values that differ across positions and rows.
    params = {**params, "reward_head": {"kernel": 3.0 * params["reward_head"]["kernel"],
                                        "bias": jnp.asarray([0.25], jnp.float32)}}  # fmt: skip
    return model, params


def _rows(rng, b=4, t=10, vocab=64):
    tokens = rng.integers(1, vocab, size=(b, t)).astype(np.int32)
    lengths = np.array([t, t - 3, 5, t - 1])[:b]
    segment_ids = (np.arange(t)[None, :] < lengths[:, None]).astype(np.int32)
    tokens = tokens * segment_ids
    mask = segment_ids.astype(np.float32)
    mask[:, :3] = 0.0  # a 3-token prompt
    return dict(tokens=tokens, targets=np.roll(tokens, -1, 1), loss_mask=mask, segment_ids=segment_ids)


def test_values_read_the_head_at_every_position_and_the_reward_at_the_last(critic):
    model, params = critic
    rows = _rows(np.random.default_rng(0))
    values = np.asarray(model.apply({"params": params}, rows["tokens"], rows["segment_ids"], method="values"))
    reward = np.asarray(model.apply({"params": params}, rows["tokens"], rows["segment_ids"]))
    last = rows["segment_ids"].sum(1) - 1
    np.testing.assert_allclose(values[np.arange(4), last], reward, rtol=1e-5, atol=1e-6)
    # Causal: position t depends on tokens 0..t only (a changed later token leaves it).
    changed = rows["tokens"].copy()
    changed[:, 6] = (changed[:, 6] + 1) % 64
    other = np.asarray(model.apply({"params": params}, changed, rows["segment_ids"], method="values"))
    np.testing.assert_allclose(other[:, :6], values[:, :6], rtol=1e-5, atol=1e-6)
    assert np.abs(other[:, 6:] - values[:, 6:]).max() > 1e-4
    assert np.std(values) > 1e-3  # not a constant


def test_value_objective_is_the_value_loss_and_exact_over_micro_batches(critic):
    model, params = critic
    rng = np.random.default_rng(1)
    rows = _rows(rng)
    values = np.asarray(model.apply({"params": params}, rows["tokens"], rows["segment_ids"], method="values"))
    # Old values near the current ones (some beyond the clip), arbitrary returns.
    rows["old_values"] = (values + rng.normal(0, 0.3, values.shape)).astype(np.float32)
    rows["returns"] = rng.normal(0, 1, values.shape).astype(np.float32)
    n = len(rows["tokens"])
    rows["token_normalizer"] = np.full(n, rows["loss_mask"].sum(), np.float32)
    rows["row_fraction"] = np.full(n, 1.0 / n, np.float32)
    objective = lambda p, b: steps.value_objective(p, b, None, model=model, clip=0.2)  # noqa: E731

    # By hand: ½·max((V - R)², (V_old + clip(V - V_old) - R)²), the masked token mean.
    v, old, ret, m = values, rows["old_values"], rows["returns"], rows["loss_mask"]
    clipped = old + np.clip(v - old, -0.2, 0.2)
    want = 0.5 * np.sum(np.maximum((v - ret) ** 2, (clipped - ret) ** 2) * m) / m.sum()
    loss, sums = objective(params, rows)
    assert float(loss) == pytest.approx(want, rel=1e-5)
    assert float(sums["value_clip_frac"]) == pytest.approx(np.sum((np.abs(v - old) > 0.2) * m) / m.sum())

    # Two micro-batches (rows 0-1, 2-3) sum to the whole loss and gradient.
    halves = [{k: x[i : i + 2] for k, x in rows.items()} for i in (0, 2)]
    grad = jax.grad(lambda p, b: objective(p, b)[0])
    parts = [objective(params, h)[0] for h in halves]
    assert float(sum(parts)) == pytest.approx(float(loss), rel=1e-5)
    g_whole = grad(params, rows)
    g_sum = jax.tree.map(lambda a, b: a + b, *(grad(params, h) for h in halves))
    for a, b in zip(jax.tree.leaves(g_whole), jax.tree.leaves(g_sum), strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6)
    assert max(float(jnp.abs(x).max()) for x in jax.tree.leaves(g_whole)) > 0


def test_policy_objective_takes_per_token_advantages():
    """Per-token advantages equal to each row's constant give the per-sequence loss; varying them
    within a row changes it."""
    cfg = models.preset("tiny", vocab_size=64, max_len=16)
    model = models.Transformer(cfg)
    params = models.init_params(model, jax.random.key(1))
    rng = np.random.default_rng(2)
    rows = _rows(rng)
    rows["old_logps"] = np.asarray(steps.token_logps(model, params, rows)) + rng.normal(0, 0.1, (4, 10))
    rows["old_logps"] = rows["old_logps"].astype(np.float32)
    rows["token_normalizer"] = np.full(4, rows["loss_mask"].sum(), np.float32)
    rows["row_fraction"] = np.full(4, 0.25, np.float32)
    adv_B = np.array([1.0, -0.5, 2.0, -1.5], np.float32)
    objective = lambda b: steps.policy_gradient_objective(  # noqa: E731
        params, b, None, model=model, temperature=1.0, aggregation="dapo", loss_kwargs=(("epsilon_low", 0.2),)
    )[0]
    per_row = objective({**rows, "advantages": adv_B})
    per_token = objective({**rows, "advantages": np.repeat(adv_B[:, None], 10, 1)})
    assert float(per_token) == pytest.approx(float(per_row), rel=1e-6)
    varied = np.repeat(adv_B[:, None], 10, 1) * np.linspace(0.0, 2.0, 10)[None, :].astype(np.float32)
    assert abs(float(objective({**rows, "advantages": varied})) - float(per_row)) > 1e-4


def _gae_numpy(rewards, values, mask, gamma, lam):
    """GAE over each row's masked positions (in order), by the backward recursion."""
    adv = np.zeros_like(rewards)
    for b in range(rewards.shape[0]):
        idx = np.flatnonzero(mask[b] > 0)
        last = 0.0
        for j in reversed(range(len(idx))):
            t = idx[j]
            next_v = values[b, idx[j + 1]] if j + 1 < len(idx) else 0.0
            delta = rewards[b, t] + gamma * next_v - values[b, t]
            last = delta + gamma * lam * last
            adv[b, t] = last
    return adv, (adv + values) * mask


def test_rollout_advantages_match_a_numpy_recursion():
    rng = np.random.default_rng(3)
    b, t = 3, 8
    mask = np.zeros((b, t), np.float32)
    mask[0, 2:8] = 1
    mask[1, 3:6] = 1
    mask[2, 2:4] = 1
    rows = {"loss_mask": mask}
    rows["old_logps"] = rng.normal(-2, 0.5, (b, t)).astype(np.float32)
    rows["reference_logps"] = (rows["old_logps"] + rng.normal(0, 0.2, (b, t))).astype(np.float32)
    rows["old_values"] = rng.normal(0, 1, (b, t)).astype(np.float32)
    scores = np.array([1.0, -3.0, 0.5], np.float32)
    config = ppo.PPOConfig(gamma=0.9, lam=0.8, kl_coef=0.1, reward_clip=2.0, whiten_advantages=False)
    out = ppo.advantages(rows, scores, config, 0.1)

    kl = (rows["old_logps"] - rows["reference_logps"]) * mask
    rewards = -0.1 * kl
    last = np.array([7, 5, 3])
    rewards[np.arange(b), last] += np.clip(scores, -2.0, 2.0)  # -3 clipped to -2
    adv, ret = _gae_numpy(rewards, rows["old_values"], mask, 0.9, 0.8)
    np.testing.assert_allclose(out["advantages"] * mask, adv, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(out["returns"] * mask, ret, rtol=1e-5, atol=1e-6)
    assert out["stats"]["kl_seq"] == pytest.approx(kl.sum(1).mean(), rel=1e-5)
    resid = (ret - rows["old_values"])[mask > 0]
    assert out["stats"]["explained_variance"] == pytest.approx(
        1 - resid.var() / ret[mask > 0].var(), rel=1e-4
    )

    whitened = ppo.advantages(
        rows, scores, ppo.PPOConfig(gamma=0.9, lam=0.8, kl_coef=0.1, reward_clip=2.0), 0.1
    )
    a = whitened["advantages"][mask > 0]
    assert abs(a.mean()) < 1e-5 and a.std(ddof=1) == pytest.approx(1.0, rel=1e-4)


def test_adaptive_kl_coefficient_steps_towards_the_target():
    config = ppo.PPOConfig(kl_coef=0.1, adaptive_kl=True, kl_target=4.0, kl_horizon=1000.0)
    # e = clip(6/4 - 1, ±0.2) = 0.2; β·(1 + 0.2·100/1000) = 0.1·1.02
    assert ppo.next_kl_coef(config, 0.1, 6.0, 100) == pytest.approx(0.102, rel=1e-6)
    # e = 3/4 - 1 = -0.25 -> -0.2
    assert ppo.next_kl_coef(config, 0.1, 3.0, 100) == pytest.approx(0.098, rel=1e-6)
    # e = 4.2/4 - 1 = 0.05
    assert ppo.next_kl_coef(config, 0.1, 4.2, 100) == pytest.approx(0.1005, rel=1e-5)
    fixed = ppo.PPOConfig(kl_coef=0.1)
    assert ppo.next_kl_coef(fixed, 0.1, 100.0, 100) == 0.1


def test_configs_are_validated_naming_the_field():
    with pytest.raises(ValueError, match="lam must be in"):
        ppo.PPOConfig(lam=1.5)
    with pytest.raises(ValueError, match="adaptive_kl must be false when kl_coef is 0"):
        ppo.PPOConfig(kl_coef=0.0, adaptive_kl=True)
    with pytest.raises(ValueError, match="critic_init"):
        ppo.PPOConfig(critic_init="policy")
    assert grpo.GRPOConfig(estimator="gae", group_size=1).group_size == 1
    with pytest.raises(ValueError, match="group_size"):
        grpo.GRPOConfig(estimator="grpo", group_size=1)
    with pytest.raises(ValueError, match="dynamic_sampling"):
        grpo.GRPOConfig(estimator="gae", dynamic_sampling=True)

    from launch import train

    plan = train.build_plan(train.resolve_config("ppo_arith:smoke", []))
    assert plan.ppo is not None and plan.grpo.estimator == "gae" and plan.ppo.critic_init == "sft"
    assert grpo.method(plan.grpo) == "ppo/dapo"
    bad = train.resolve_config("ppo_arith:smoke", ["--config.ppo.critic_init=reward_model"])
    with pytest.raises(ValueError, match="critic_init='reward_model' needs the run's reward model"):
        train.build_plan(bad)
    tldr = train.build_plan(train.resolve_config("ppo_tldr:smoke", []))
    assert tldr.ppo.critic_init == "reward_model" and tldr.rm is not None
    # PPO's settings are in the policy stage's fingerprint; GRPO's spec has no ppo key (old caches hold).
    cfg = plan.main
    assert "ppo" not in grpo.spec(cfg, grpo.GRPOConfig())
    a = grpo.spec(cfg, plan.grpo, ppo=plan.ppo)
    b = grpo.spec(cfg, plan.grpo, ppo=ppo.PPOConfig(lam=0.9))
    from rlhf_jax.pipelines import fingerprints

    assert fingerprints.fingerprint(a) != fingerprints.fingerprint(b)


PPO_SMOKE = ["--experiment=ppo_arith:smoke", "--config.progress=false"]


@pytest.mark.slow
def test_ppo_arith_smoke_resumes_exactly_after_sigkill(tmp_path):
    """`ppo_arith:smoke` with the adaptive β, uninterrupted; then the same run killed with SIGKILL after
    three iterations and rerun: it resumes from the last checkpoint, and every record (the policy's
    loss, the critic's value loss, β) equals the uninterrupted run's, so the critic's params and
    optimizer state and β were restored (a fresh critic or β would change them)."""
    args = [*PPO_SMOKE, "--config.grpo.iterations=5", "--config.checkpoint.every_steps=2",
            "--config.ppo.adaptive_kl=true", "--config.ppo.kl_horizon=50",
            "--config.ppo.kl_target=0.001"]  # fmt: skip
    cmd, kw = _cli([*args, f"--workdir={tmp_path / 'full'}"])
    full = subprocess.run(cmd, capture_output=True, text=True, **kw)
    assert full.returncode == 0, full.stderr[-3000:]
    assert "Online RL on arith: ppo/dapo" in full.stdout
    results = json.load(open(tmp_path / "full" / "results.json"))
    assert 0 <= results["accuracy"] <= 1 and results["method"] == "ppo/dapo" and results["ppo"]["adaptive_kl"]
    records = _records(str(tmp_path / "full"))
    assert [r["step"] for r in records] == [2, 4, 6, 8, 10]  # 16 rows, batch 16, μ = 2
    for key in ("value_loss", "value_clip_frac", "value_mean", "value_error", "kl_coef", "kl_seq",
                "returns_mean", "advantages_std", "explained_variance"):  # fmt: skip
        assert all(np.isfinite(r[key]) for r in records), key
    betas = [r["kl_coef"] for r in records]
    # Iteration 1 samples from the reference itself (KL 0 < target: β falls by 1 - 0.2·16/50); after
    # it, the KL is above the tiny target and β rises.
    assert betas[0] == pytest.approx(0.02) and betas[1] == pytest.approx(0.02 * (1 - 0.2 * 16 / 50), rel=1e-5)
    assert all(b2 > b1 for b1, b2 in zip(betas[1:-1], betas[2:], strict=True))

    workdir = tmp_path / "killed"
    cmd, kw = _cli([*args, f"--workdir={workdir}"])
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, **kw)
    deadline = time.time() + 600
    while time.time() < deadline and proc.poll() is None and len(_records(str(workdir))) < 3:
        time.sleep(0.02)
    assert proc.poll() is None, "the run ended before SIGKILL:\n" + proc.communicate()[1][-3000:]
    os.kill(proc.pid, signal.SIGKILL)
    proc.communicate(timeout=60)
    before = _records(str(workdir))
    rerun = subprocess.run(cmd, capture_output=True, text=True, **kw)
    assert rerun.returncode == 0, rerun.stderr[-3000:]
    step = int(re.search(r"resuming from the checkpoint at step (\d+)", rerun.stdout).group(1))
    assert step >= 2
    after = _records(str(workdir))
    assert after[: step // 2] == before[: step // 2]  # resumed, not restarted
    keys = ("step", "loss", "value_loss", "kl_coef", "reward_mean", "response_length", "value_mean")
    same = lambda rs: [tuple(r[k] for k in keys) for r in rs]  # noqa: E731
    assert same(after) == same(records)
    assert json.load(open(workdir / "results.json"))["accuracy"] == results["accuracy"]


def test_shared_critic_objective_is_the_policy_loss_plus_the_weighted_value_loss():
    """The shared critic's loss is policy_gradient_objective's + vf_coef · value loss of the head on the
    policy's hidden states; the value loss's gradient reaches the backbone, the policy loss's does not
    reach the head."""
    cfg = models.preset("tiny", vocab_size=64, max_len=16)
    model = models.Transformer(cfg)
    lm = models.init_params(model, jax.random.key(3))
    head = ppo.value_head_init(cfg.d_model, seed=0, dtype=jnp.float32)
    params = {"policy": lm, "value_head": head}
    rng = np.random.default_rng(4)
    rows = _rows(rng)
    rows["old_logps"] = (np.asarray(steps.token_logps(model, lm, rows)) + rng.normal(0, 0.1, (4, 10))).astype(
        np.float32
    )
    rows["advantages"] = rng.normal(0, 1, (4, 10)).astype(np.float32)
    _, hidden = model.apply(
        {"params": lm}, rows["tokens"], segment_ids_BT=rows["segment_ids"], return_hidden=True
    )
    values = np.asarray(hidden, np.float32) @ np.asarray(head["kernel"])[:, 0] + float(head["bias"][0])
    np.testing.assert_allclose(steps.shared_values(model, params, rows), values, rtol=1e-5, atol=1e-6)
    rows["old_values"] = (values + rng.normal(0, 0.3, values.shape)).astype(np.float32)
    rows["returns"] = rng.normal(0, 1, values.shape).astype(np.float32)
    rows["token_normalizer"] = np.full(4, rows["loss_mask"].sum(), np.float32)
    rows["row_fraction"] = np.full(4, 0.25, np.float32)
    kw = dict(model=model, temperature=0.7, aggregation="dapo", loss_kwargs=(("epsilon_low", 0.2),))
    shared = lambda p: steps.shared_critic_objective(p, rows, None, **kw, vf_coef=0.5, clip=0.2)  # noqa: E731
    loss, sums = shared(params)
    pg, _ = steps.policy_gradient_objective(lm, rows, None, **kw)
    m = rows["loss_mask"]
    clipped = rows["old_values"] + np.clip(values - rows["old_values"], -0.2, 0.2)
    vl = (
        0.5
        * np.sum(np.maximum((values - rows["returns"]) ** 2, (clipped - rows["returns"]) ** 2) * m)
        / m.sum()
    )
    assert float(sums["policy_loss"]) == pytest.approx(float(pg), rel=1e-5)
    assert float(sums["value_loss"]) == pytest.approx(vl, rel=1e-4)
    assert float(loss) == pytest.approx(float(pg) + 0.5 * vl, rel=1e-5)
    grads = jax.grad(lambda p: shared(p)[0])(params)
    g_pg = jax.grad(lambda p: steps.policy_gradient_objective(p, rows, None, **kw)[0])(lm)
    embed = lambda g: np.asarray(g["decoder"]["embedding"])  # noqa: E731
    assert np.abs(embed(grads["policy"]) - embed(g_pg)).max() > 1e-6  # the value loss trains the backbone
    assert np.abs(np.asarray(grads["value_head"]["kernel"])).max() > 0


@pytest.mark.slow
def test_ppo_with_a_shared_critic_runs_and_saves_an_lm(tmp_path):
    """`ppo_arith:smoke` with the value head on the policy's backbone: one state, the records carry the
    value loss, and the saved policy is a plain LM (the head is not in it)."""
    cmd, kw = _cli([*PPO_SMOKE, "--config.ppo.critic_init=shared", f"--workdir={tmp_path}"])
    run = subprocess.run(cmd, capture_output=True, text=True, **kw)
    assert run.returncode == 0, run.stderr[-3000:]
    records = _records(str(tmp_path))
    assert len(records) == 2 and all(np.isfinite(r["value_loss"]) and "policy_loss" in r for r in records)
    assert all(r["loss"] != r["policy_loss"] for r in records)
    from rlhf_jax.pipelines import workdir as workdir_io

    results = json.load(open(tmp_path / "results.json"))
    policy_dir = tmp_path / results["stages"]["policy"]["dir"]
    model, params = workdir_io.load_lm(str(policy_dir), None)
    assert "value_head" not in params and "decoder" in params


@pytest.mark.slow
def test_ppo_tldr_smoke_trains_a_critic_from_the_reward_model(tmp_path):
    """`ppo_tldr:smoke` end to end through the command line: SFT → reward model → PPO whose critic starts
    from the reward model, judged by the gold reward against the SFT policy; the critic's and the
    policy's records are finite at every step."""
    workdir = tmp_path / "run"
    cmd, kw = _cli(["--experiment=ppo_tldr:smoke", "--config.progress=false", "--config.grpo.iterations=3",
                    f"--workdir={workdir}"])  # fmt: skip
    out = subprocess.run(cmd, capture_output=True, text=True, **kw)
    assert out.returncode == 0, out.stderr[-3000:]
    results = json.load(open(workdir / "results.json"))
    assert results["method"].startswith("ppo/") and results["ppo"]["critic_init"] == "reward_model"
    for key in ("win_rate_vs_sft_gold", "win_rate_vs_sft_proxy"):
        assert 0 <= results[key] <= 1, key
    assert results["kl_to_sft"] >= 0
    records = _records(str(workdir))
    assert len(records) >= 3
    for key in ("value_loss", "value_mean", "explained_variance", "kl_coef", "reward_mean"):
        assert all(np.isfinite(r[key]) for r in records), key


@pytest.mark.parametrize("aggregation", ["dapo", "grpo"])
def test_without_old_logps_the_step_uses_its_own_log_probs(aggregation):
    """One optimizer step per rollout (`grpo.run` then skips the old-log-prob forward): without
    `old_logps` the objective's loss and gradient equal those with `old_logps` = the policy's own
    log-probs (up to float32 rounding; with a β > 0 KL term too), the ratio is exactly 1 (nothing
    clipped); with old log-probs from another policy the loss differs, so the batch's key is read."""
    cfg = models.preset("tiny", vocab_size=64, max_len=16)
    model = models.Transformer(cfg)
    params = models.init_params(model, jax.random.key(1))
    rng = np.random.default_rng(4)
    rows = _rows(rng)
    rows["token_normalizer"] = np.full(4, rows["loss_mask"].sum(), np.float32)
    rows["row_fraction"] = np.full(4, 0.25, np.float32)
    rows["advantages"] = np.array([1.0, -0.5, 2.0, -1.5], np.float32)
    own = np.asarray(steps.token_logps(model, params, rows, temperature=0.7), np.float32)
    rows["reference_logps"] = (own + rng.normal(0, 0.3, own.shape)).astype(np.float32)
    kw = dict(
        model=model, temperature=0.7, aggregation=aggregation,
        loss_kwargs=(("epsilon_low", 0.2), ("beta", 0.05)),
    )  # fmt: skip
    loss = lambda p, b: steps.policy_gradient_objective(p, b, None, **kw)  # noqa: E731
    (l_in, m_in), g_in = jax.value_and_grad(loss, has_aux=True)(params, rows)
    (l_own, m_own), g_own = jax.value_and_grad(loss, has_aux=True)(params, {**rows, "old_logps": own})
    assert float(l_in) == pytest.approx(float(l_own), abs=1e-6)  # a sum of ±terms of size ~1e-2
    for a, b in zip(jax.tree.leaves(g_in), jax.tree.leaves(g_own), strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6)
    assert float(m_in["clip_frac_low"]) == 0.0 and float(m_in["clip_frac_high"]) == 0.0
    shifted = {**rows, "old_logps": (own + 0.5).astype(np.float32)}
    assert abs(float(loss(params, shifted)[0]) - float(l_in)) > 1e-3
