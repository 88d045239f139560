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


# ------------------------------------------------------------------------------------------------------
# The IFT objective on a tiny model (`rlhf_jax.train.ift`).

import dataclasses  # noqa: E402
import functools  # noqa: E402

import pytest  # noqa: E402

from rlhf_jax import lora, models, sharding  # noqa: E402
from rlhf_jax.train import ift, steps  # noqa: E402

TINY = models.preset("tiny")
# (prompt tokens P including BOS, response tokens R including EOS) of each row; T = 10.
_ROWS = ((3, 4), (2, 7), (5, 2), (4, 5))
_T = 10


def _batch(seed=0, vocab=TINY.vocab_size):
    """SFT rows in the pipeline layout: tokens = the row, targets shifted left, loss_mask on P-1..P+R-2."""
    rng = np.random.default_rng(seed)
    B = len(_ROWS)
    tokens = np.zeros((B, _T), np.int32)
    targets = np.zeros((B, _T), np.int32)
    mask = np.zeros((B, _T), np.float32)
    seg = np.zeros((B, _T), np.int32)
    for b, (p, r) in enumerate(_ROWS):
        row = rng.integers(1, vocab, size=p + r)
        tokens[b, : p + r] = row
        targets[b, : p + r - 1] = row[1:]
        mask[b, p - 1 : p - 1 + r] = 1.0
        seg[b, : p + r] = 1
    mask[:, -1] = 0.0  # the last position has no target in a row of T tokens
    return {
        "tokens": jnp.asarray(tokens), "targets": jnp.asarray(targets), "loss_mask": jnp.asarray(mask),
        "segment_ids": jnp.asarray(seg), "weights": jnp.ones(B, jnp.float32),
    }  # fmt: skip


@pytest.fixture(scope="module")
def tiny():
    model = models.Transformer(TINY)
    params = models.init_params(model, jax.random.key(0))
    return model, params


def _objective(model, lam, gamma):
    return functools.partial(ift.ift_objective, model=model, lam=lam, gamma=gamma)


def _grads(objective, params, batch, reference):
    return jax.grad(lambda p: objective(p, batch, reference)[0])(params)


def _assert_trees_equal(a, b):
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True):
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


@pytest.mark.parametrize(
    "cfg",
    [
        TINY,
        models.preset("tiny", scan_layers=False),
        models.preset("tiny", remat="full"),
        models.preset("tiny", tie_embeddings=True, embed_scale=True, final_softcap=30.0),
    ],
    ids=["scan", "unrolled", "remat", "tied_scaled_softcap"],
)
def test_embeddings_path_is_bit_identical_to_tokens(cfg):
    model = models.Transformer(cfg)
    params = models.init_params(model, jax.random.key(1))
    batch = _batch()
    x_BTD = model.apply({"params": params}, batch["tokens"], method="embed")
    apply = functools.partial(model.apply, {"params": params}, segment_ids_BT=batch["segment_ids"])
    np.testing.assert_array_equal(apply(embeds_BTD=x_BTD), apply(batch["tokens"]))
    by_embeds = apply(embeds_BTD=x_BTD, method="hidden_and_head", return_softcap=True)
    by_tokens = apply(batch["tokens"], method="hidden_and_head", return_softcap=True)
    _assert_trees_equal(by_embeds, by_tokens)
    # λ = 0: the IFT objective's forward is the token path's; its loss is the same formula on those logps.
    loss, _ = _objective(model, 0.0, 0.95)(params, batch, ift.frozen_embedding(params))
    logps = steps.completion_logps(model, params, batch)
    want = jnp.sum(losses_ift(logps, batch, 0.95))
    np.testing.assert_array_equal(np.asarray(loss), np.asarray(want))


def losses_ift(logps_BT, batch, gamma):
    from rlhf_jax import losses

    return losses.ift_sequence_losses(token_logps_BT=logps_BT, mask_BT=batch["loss_mask"], gamma=gamma)


def test_model_refuses_both_or_neither_input(tiny):
    model, params = tiny
    batch = _batch()
    x_BTD = model.apply({"params": params}, batch["tokens"], method="embed")
    with pytest.raises(ValueError, match="exactly one of tokens_BT and embeds_BTD, got both"):
        model.apply({"params": params}, batch["tokens"], embeds_BTD=x_BTD)
    with pytest.raises(ValueError, match="got neither"):
        model.apply({"params": params})
    with pytest.raises(ValueError, match=r"embeds_BTD must be \[B, T, D=64\]"):
        model.apply({"params": params}, embeds_BTD=x_BTD[..., :3])


def test_lambda0_gamma0_is_sequence_mean_sft_exactly(tiny):
    """Loss value and every gradient leaf equal, bit for bit, per-sequence-mean SFT on the token path."""
    model, params = tiny
    batch = _batch()
    frozen = ift.frozen_embedding(jax.tree.map(lambda x: x + 0.5, params))  # a different E₀: unused at λ=0

    def sft_sum(p, b, _):
        logps_BT = steps.completion_logps(model, p, b)
        n_B = jnp.maximum(b["loss_mask"].sum(-1), 1.0)
        return jnp.sum(b["weights"] * (-(logps_BT * b["loss_mask"]).sum(-1) / n_B)), {}

    objective = _objective(model, 0.0, 0.0)
    loss, sums = objective(params, batch, frozen)
    want, _ = sft_sum(params, batch, None)
    np.testing.assert_array_equal(np.asarray(loss), np.asarray(want))
    assert float(sums["weight"]) == len(_ROWS)
    _assert_trees_equal(_grads(objective, params, batch, frozen), _grads(sft_sum, params, batch, None))
    # The embedding's gradient is not zero: the gold inputs are trained, as in SFT.
    assert np.abs(np.asarray(_grads(objective, params, batch, frozen)["decoder"]["embedding"])).sum() > 0


def test_lambda0_equals_ift_loss_on_token_path(tiny):
    from rlhf_jax import losses

    model, params = tiny
    batch = _batch()
    loss, _ = _objective(model, 0.0, 0.95)(params, batch, ift.frozen_embedding(params))
    logps = steps.completion_logps(model, params, batch)
    want = losses.ift_loss(token_logps_BT=logps, mask_BT=batch["loss_mask"], gamma=0.95)
    np.testing.assert_allclose(float(loss) / len(_ROWS), float(want), rtol=1e-6)
    # ...and it is not the SFT loss (the weights matter).
    sft = np.mean(np.asarray(-(logps * batch["loss_mask"]).sum(-1) / batch["loss_mask"].sum(-1)))
    assert abs(float(loss) / len(_ROWS) - sft) > 1e-4


def test_mix_positions_by_hand():
    batch = _batch()
    mix = np.asarray(ift.mix_positions(batch))
    want = np.zeros_like(mix)
    for b, (p, r) in enumerate(_ROWS):
        want[b, p : p + r] = True  # the inputs that are completion tokens (r_1 .. EOS); P + R <= T
    np.testing.assert_array_equal(mix, want)


def test_mixed_embeddings_match_numpy(tiny):
    """λ = 0.2 on the tiny model: argmax of the gold pass shifted by one, mixed only on completion inputs,
    the guess looked up in E₀ (here a different table, so a wrong table would show)."""
    model, params = tiny
    batch = _batch(seed=3)
    lam = 0.2
    table0 = np.asarray(params["decoder"]["embedding"]) + np.random.default_rng(7).normal(
        0, 1, params["decoder"]["embedding"].shape
    ).astype(np.float32)
    frozen = {"decoder": {"embedding": jnp.asarray(table0)}}
    x_BTD, guess_BT = ift.mixed_embeddings(model, params, frozen, batch, lam=lam)

    logits = np.asarray(model.apply({"params": params}, batch["tokens"], segment_ids_BT=batch["segment_ids"]))
    tokens = np.asarray(batch["tokens"])
    table = np.asarray(params["decoder"]["embedding"])
    want_guess = tokens.copy()
    want = table[tokens].copy()
    for b, (p, r) in enumerate(_ROWS):
        for t in range(p, p + r):
            want_guess[b, t] = logits[b, t - 1].argmax()
            want[b, t] = (1 - lam) * table[tokens[b, t]] + lam * table0[want_guess[b, t]]
    np.testing.assert_array_equal(np.asarray(guess_BT)[np.asarray(ift.mix_positions(batch))],
                                  want_guess[np.asarray(ift.mix_positions(batch))])  # fmt: skip
    np.testing.assert_allclose(np.asarray(x_BTD), want, rtol=1e-6, atol=1e-7)
    # Prompt and padding inputs are the gold embeddings exactly.
    off = ~np.asarray(ift.mix_positions(batch))
    np.testing.assert_array_equal(np.asarray(x_BTD)[off], table[tokens][off])


def test_weights_are_not_detached_in_the_objective(tiny):
    from rlhf_jax import losses

    model, params = tiny
    batch = _batch()
    frozen = ift.frozen_embedding(params)

    def detached(p, b, ref):
        x_BTD, _ = ift.mixed_embeddings(model, p, ref, b, lam=0.2)
        logps_BT = steps.completion_logps(model, p, b, embeds_BTD=x_BTD)
        m = b["loss_mask"]
        w = jax.lax.stop_gradient(losses.ift_weights(token_logps_BT=logps_BT, mask_BT=m, gamma=0.95))
        return jnp.sum((-logps_BT * w * m).sum(-1) / m.sum(-1)), {}

    objective = _objective(model, 0.2, 0.95)
    np.testing.assert_allclose(
        float(objective(params, batch, frozen)[0]), float(detached(params, batch, frozen)[0]), rtol=1e-6
    )
    g = _grads(objective, params, batch, frozen)["decoder"]["embedding"]
    g_detached = _grads(detached, params, batch, frozen)["decoder"]["embedding"]
    assert not np.allclose(np.asarray(g), np.asarray(g_detached), rtol=1e-3, atol=1e-7)


def test_gradient_accumulation_is_exact(tiny):
    model, params = tiny
    batch = _batch()
    batch["weights"] = jnp.asarray([1.0, 1.0, 0.0, 1.0])  # a padding row weighs nothing
    frozen = ift.frozen_embedding(params)
    objective = _objective(model, 0.2, 0.95)
    run = lambda k: steps.loss_and_grads(  # noqa: E731
        objective, params, batch, frozen, weight_fn=ift.sequence_weight, accum_steps=k
    )
    loss1, _, g1 = run(1)
    loss2, _, g2 = run(2)
    np.testing.assert_allclose(float(loss1), float(loss2), rtol=1e-6)
    for a, b in zip(jax.tree.leaves(g1), jax.tree.leaves(g2), strict=True):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-5, atol=1e-7)  # sums reordered
    # The padding row is out: the loss is the mean over the 3 weighted rows.
    rows = [jax.tree.map(lambda x, i=i: x[i : i + 1], batch) for i in (0, 1, 3)]
    per_row = [float(objective(params, row, frozen)[0]) for row in rows]
    np.testing.assert_allclose(float(loss1), np.mean(per_row), rtol=1e-5)


def test_sharded_equals_single_device(tiny):
    model, params = tiny
    batch = jax.tree.map(lambda x: jnp.concatenate([x, x]), _batch())  # 8 rows over 8 devices
    frozen = ift.frozen_embedding(params)
    want, _ = _objective(model, 0.2, 0.95)(params, batch, frozen)
    mesh = sharding.make_mesh(sharding.MeshConfig(data=-1, fsdp=2, tensor=2))
    sharded = models.Transformer(TINY, mesh=mesh)
    p = jax.device_put(params, models.param_shardings(sharded))
    b = sharding.shard_batch(batch, mesh)
    got = jax.jit(lambda p, b, f: _objective(sharded, 0.2, 0.95)(p, b, f)[0])(p, b, ift.frozen_embedding(p))
    np.testing.assert_allclose(float(got), float(want), rtol=1e-5)


def test_lora_runs_and_starts_at_the_full_model_loss(tiny):
    model, params = tiny
    batch = _batch()
    lc = lora.LoRAConfig(rank=2, alpha=4.0)
    adapters = lora.init(params, lc, jax.random.key(2))
    wrapped = lora.objective(_objective(model, 0.2, 0.95), lc)  # the base is E₀'s holder
    loss, _ = wrapped(adapters, batch, params)
    want, _ = _objective(model, 0.2, 0.95)(params, batch, ift.frozen_embedding(params))
    np.testing.assert_allclose(float(loss), float(want), rtol=1e-6)
    g = jax.grad(lambda a: wrapped(a, batch, params)[0])(adapters)
    assert all(np.isfinite(np.asarray(x)).all() for x in jax.tree.leaves(g))


def test_objective_config_validation():
    assert ift.SFTObjectiveConfig() == ift.SFTObjectiveConfig("nll", 0.2, 0.95)
    with pytest.raises(ValueError, match=r"objective must be one of \('nll', 'ift'\), got 'ifd'"):
        ift.SFTObjectiveConfig(objective="ifd")
    with pytest.raises(ValueError, match="ift_lambda must be a number in \\[0, 1\\], got 1.5"):
        ift.SFTObjectiveConfig(objective="ift", ift_lambda=1.5)
    with pytest.raises(ValueError, match="ift_gamma must be a number"):
        ift.SFTObjectiveConfig(objective="ift", ift_gamma="0.9")
    assert dataclasses.asdict(ift.SFTObjectiveConfig(ift_gamma=1))["ift_gamma"] == 1.0


# ------------------------------------------------------------------------------------------------------
# End to end (slow tier).

import json  # noqa: E402
import os  # noqa: E402
import subprocess  # noqa: E402
import sys  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.mark.slow
@pytest.mark.parametrize(
    "experiment,metric", [("ift_arith", "accuracy_sft"), ("ift_tldr", "gold_reward_sft")]
)
def test_smoke_experiment_trains_sft_with_ift(tmp_path, experiment, metric):
    """`ift_arith:smoke` / `ift_tldr:smoke` through the command line (~1 min each): the SFT stage trains
    with the IFT objective (its metrics, its fingerprint) and the run reports the SFT policy's metric."""
    env = {**os.environ, "PYTHONPATH": ROOT + os.pathsep + os.environ.get("PYTHONPATH", "")}
    args = [f"--experiment={experiment}:smoke", "--config.progress=false", f"--workdir={tmp_path}"]
    out = subprocess.run([sys.executable, "-m", "launch.train", *args], capture_output=True, text=True,
                         cwd=ROOT, env=env)  # fmt: skip
    assert out.returncode == 0, out.stderr[-3000:]
    results = json.load(open(tmp_path / "results.json"))
    assert np.isfinite(results[metric])
    stages = json.load(open(tmp_path / "stages.json"))["stages"]
    sft_dir = tmp_path / stages["sft"]["dir"]
    spec = json.load(open(sft_dir / "fingerprint.json"))["spec"]
    assert spec["sft_objective"] == {"objective": "ift", "ift_lambda": 0.2, "ift_gamma": 0.95}
    records = [json.loads(line) for line in open(sft_dir / "metrics.jsonl")]
    assert records and all({"loss", "nll", "guess_accuracy"} <= set(r) for r in records)
    assert "rm" not in stages  # ift_tldr: no reward-model stage


def test_config_keys_reach_the_sft_stage():
    from launch import train

    plan = train.build_plan(train.resolve_config("sft_tldr:smoke", ["--config.train.objective=ift"]))
    assert plan.main.sft_objective == ift.SFTObjectiveConfig("ift", 0.2, 0.95)
    overrides = ["--config.sft.objective=ift", "--config.sft.ift_gamma=0.5"]
    config = train.resolve_config("dpo_tldr:smoke", overrides)
    plan = train.build_plan(config)
    assert plan.sft.sft_objective == ift.SFTObjectiveConfig("ift", 0.2, 0.5)
    assert plan.main.sft_objective == ift.SFTObjectiveConfig()  # the preference stage is not SFT
    with pytest.raises(ValueError, match=r"config.sft.ift_lambda must be a number in \[0, 1\], got 2.0"):
        train.build_plan(train.resolve_config("dpo_tldr:smoke", ["--config.sft.ift_lambda=2"]))
