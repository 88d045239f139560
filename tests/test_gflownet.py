"""GFlowNet trajectory balance in the online loop (`rlhf_jax.pipelines.gflownet`): the replay buffer's
policy, the log R transform, the objective against a direct computation, and `gflownet_arith:smoke`."""

import json
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from rlhf_jax import models
from rlhf_jax.pipelines import gflownet
from rlhf_jax.train import steps

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _rows(n, t=6, seed=0):
    rng = np.random.default_rng(seed)
    tokens = rng.integers(1, 50, (n, t)).astype(np.int32)
    return {
        "tokens": tokens,
        "targets": np.roll(tokens, -1, axis=1),
        "loss_mask": np.tile(np.array([0, 0, 1, 1, 1, 0], np.float32), (n, 1)),
        "segment_ids": np.ones((n, t), np.int32),
        "log_rewards": rng.normal(0, 1, n).astype(np.float32),
    }


def test_replay_admits_distinct_high_reward_rows_fifo():
    rows = _rows(4)
    rows["tokens"][1] = rows["tokens"][0]  # row 1 duplicates row 0
    buf = gflownet.ReplayBuffer(size=2, min_reward=1.0)
    fallback = _rows(3, seed=9)
    empty_draw = buf.draw(5, np.random.default_rng(0), fallback)
    assert all(any((r == f).all() for f in fallback["tokens"]) for r in empty_draw["tokens"])
    assert buf.add(rows, np.array([1.0, 1.0, 0.0, 2.0])) == 2  # row 1 a duplicate, row 2 below threshold
    assert len(buf) == 2
    more = _rows(1, seed=5)
    assert buf.add(more, np.array([1.0])) == 1 and len(buf) == 2  # capacity 2: row 0 (oldest) leaves
    drawn = buf.draw(50, np.random.default_rng(1), fallback)
    held = {rows["tokens"][3].tobytes(), more["tokens"][0].tobytes()}
    assert {r.tobytes() for r in drawn["tokens"]} == held
    assert drawn["log_rewards"].shape == (50,)


def test_log_rewards_transform_and_validation():
    np.testing.assert_allclose(
        gflownet.GFlowNetConfig(reward_temperature=0.5).log_rewards(np.array([0.0, 1.0])), [0, 2]
    )
    np.testing.assert_allclose(
        gflownet.GFlowNetConfig(reward_floor=0.1).log_rewards(np.array([0.0, 1.0])),
        np.log([0.1, 1.0]),
        rtol=1e-6,
    )
    with pytest.raises(ValueError, match="gflownet.reward_temperature"):
        gflownet.GFlowNetConfig(reward_temperature=0.0)


def test_objective_equals_direct_trajectory_balance_and_its_log_z_gradient():
    cfg = models.preset("tiny", vocab_size=64, max_len=16)
    model = models.Transformer(cfg)
    params = {"policy": models.init_params(model, jax.random.key(0)), "log_z": jnp.float32(0.3)}
    rows = _rows(4)
    batch = {k: jnp.asarray(v) for k, v in rows.items()}
    batch["row_fraction"] = jnp.full(4, 0.25, jnp.float32)
    batch["token_normalizer"] = jnp.full(4, rows["loss_mask"].sum(), jnp.float32)
    loss, sums = steps.trajectory_balance_objective(params, batch, None, model=model, temperature=0.7)
    logps_BT = np.asarray(steps.token_logps(model, params["policy"], batch, temperature=0.7))
    residual = 0.3 + (logps_BT * rows["loss_mask"]).sum(1) - rows["log_rewards"]
    np.testing.assert_allclose(float(loss), np.mean(residual**2), rtol=1e-4)
    np.testing.assert_allclose(float(sums["tb_residual"]), residual.mean(), rtol=1e-4, atol=1e-5)
    grad = jax.grad(
        lambda p: steps.trajectory_balance_objective(p, batch, None, model=model, temperature=0.7)[0]
    )(params)
    np.testing.assert_allclose(float(grad["log_z"]), 2 * residual.mean(), rtol=1e-4)


@pytest.mark.slow
def test_gflownet_arith_smoke_reports_distinct_correct(tmp_path):
    """`gflownet_arith:smoke` through the command line: trains {policy, log Z}, logs the replay buffer,
    and reports accuracy and distinct correct solutions (~35 s)."""
    env = {**os.environ, "PYTHONPATH": ROOT + os.pathsep + os.environ.get("PYTHONPATH", "")}
    args = ["--experiment=gflownet_arith:smoke", "--config.progress=false", f"--workdir={tmp_path}"]
    cmd = [sys.executable, "-m", "launch.train", *args]
    out = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT, env=env)
    assert out.returncode == 0, out.stderr[-3000:]
    results = json.load(open(tmp_path / "results.json"))
    assert results["method"] == "gflownet/tb" and "Online RL on arith: gflownet/tb" in out.stdout
    assert 0 <= results["accuracy"] <= 1 and 0 <= results["distinct_correct"] <= results["k"]
    training = results["training"]
    assert training["log_z"] != 0.0 and training["steps"] == 4  # 2 iterations × (16 + 16 rows) / 16
    assert "replay_size" in training and "tb_residual" in training
