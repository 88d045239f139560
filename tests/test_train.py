"""Tests for rlhf_jax.train: steps, accumulation, reference paths, non-finite handling, checkpoints."""

import dataclasses
import functools
import json
import os
import signal
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from workdirs import stage_dir

from rlhf_jax import losses, models, sharding
from rlhf_jax.train import checkpoint, metrics, optim, preemption, steps, trainer
from rlhf_jax.train import state as state_lib

CFG = models.preset("tiny", vocab_size=64, max_len=32)


def _pair_batch(rng, b=8, t=16):
    """A preference batch in the pipeline's layout (prompt 4 tokens, responses of varied length)."""
    batch = {}
    for side in ("chosen", "rejected"):
        tokens = rng.integers(4, 64, (b, t)).astype(np.int32)
        lengths = rng.integers(3, t - 5, b)
        seg = (np.arange(t)[None, :] < (4 + lengths)[:, None]).astype(np.int32)
        tokens = np.where(seg > 0, tokens, 0)
        targets = np.concatenate([tokens[:, 1:], np.zeros((b, 1), np.int32)], 1)
        mask = ((np.arange(t)[None, :] >= 3) & (np.arange(t)[None, :] < 3 + lengths[:, None])).astype(
            np.float32
        )
        batch.update({f"{side}_tokens": tokens, f"{side}_targets": targets, f"{side}_loss_mask": mask,
                      f"{side}_segment_ids": seg, f"{side}_lengths": lengths.astype(np.int32)})  # fmt: skip
    batch["weights"] = np.ones(b, np.float32)
    return batch


def _sft_batch(rng, b=8, t=16):
    pair = _pair_batch(rng, b, t)
    return {k[len("chosen_") :]: v for k, v in pair.items() if k.startswith("chosen_")} | {
        "weights": pair["weights"]
    }


@pytest.fixture(scope="module")
def model_and_params():
    model = models.Transformer(CFG)
    return model, models.init_params(model, jax.random.key(0))


def _step(objective, weight_fn, tx, accum):
    return jax.jit(
        functools.partial(
            steps.train_step, objective=objective, weight_fn=weight_fn, tx=tx, accum_steps=accum
        )
    )


def test_gradient_accumulation_equals_one_large_batch(model_and_params):
    model, params = model_and_params
    tx = optax.sgd(0.5)
    batch = _sft_batch(np.random.default_rng(0))
    batch["weights"][5] = 0.0  # a padding row must not count, in either path
    obj = functools.partial(steps.sft_objective, model=model)
    outs = []
    for accum in (1, 2, 4):
        state = state_lib.create(params, tx, jax.random.key(1))
        new_state, m = _step(obj, steps.sft_weight, tx, accum)(state, batch, None)
        outs.append((new_state.params, m))
    for p, m in outs[1:]:
        np.testing.assert_allclose(m["loss"], outs[0][1]["loss"], rtol=1e-6)
        np.testing.assert_allclose(m["grad_norm"], outs[0][1]["grad_norm"], rtol=1e-5)
        for a, b in zip(jax.tree.leaves(p), jax.tree.leaves(outs[0][0]), strict=True):
            np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)


def test_sft_loss_is_token_mean_nll(model_and_params):
    model, params = model_and_params
    batch = _sft_batch(np.random.default_rng(1))
    loss_sum, sums = steps.sft_objective(params, batch, None, model=model)
    logits = model.apply({"params": params}, batch["tokens"], segment_ids_BT=batch["segment_ids"])
    logp = jax.nn.log_softmax(logits)
    tok = np.take_along_axis(np.asarray(logp), batch["targets"][..., None], -1)[..., 0]
    want = -(tok * batch["loss_mask"]).sum() / batch["loss_mask"].sum()
    np.testing.assert_allclose(float(loss_sum / sums["weight"]), want, rtol=1e-5)


def test_precomputed_reference_gives_the_same_loss(model_and_params):
    model, params = model_and_params
    reference = jax.tree.map(lambda x: x * 0.9, params)  # a different frozen model
    batch = _pair_batch(np.random.default_rng(2))
    obj = functools.partial(
        steps.preference_objective, model=model, loss_fn=losses.make("ipo", beta=0.5),
        loss_inputs=losses.required_inputs("ipo"), metric_beta=0.5,
    )  # fmt: skip
    online, m_online = obj(params, batch, reference)
    ref_c, ref_r = steps.pair_logps(model, reference, batch)
    pre = dict(batch, reference_chosen_logps=np.asarray(ref_c), reference_rejected_logps=np.asarray(ref_r))
    precomputed, m_pre = obj(params, pre, None)
    np.testing.assert_allclose(precomputed, online, rtol=1e-6)
    for k in m_online:
        np.testing.assert_allclose(m_pre[k], m_online[k], rtol=1e-6, atol=1e-6)
    # And the loss equals the library loss on the sequence log-probs.
    pc, pr = steps.pair_logps(model, params, batch)
    want = losses.ipo(policy_chosen_logps=pc, policy_rejected_logps=pr, reference_chosen_logps=ref_c,
                      reference_rejected_logps=ref_r, beta=0.5).sum()  # fmt: skip
    np.testing.assert_allclose(online, want, rtol=1e-6)


def test_dpo_starts_at_log2_when_policy_is_reference(model_and_params):
    model, params = model_and_params
    batch = _pair_batch(np.random.default_rng(3))
    obj = functools.partial(
        steps.preference_objective, model=model, loss_fn=losses.make("dpo"),
        loss_inputs=losses.required_inputs("dpo"), metric_beta=0.1,
    )  # fmt: skip
    loss_sum, sums = obj(params, batch, params)
    np.testing.assert_allclose(loss_sum / sums["weight"], np.log(2.0), rtol=1e-6)
    assert float(sums["kl_to_reference"]) == 0.0


def test_nonfinite_step_is_not_applied(model_and_params):
    model, params = model_and_params
    tx = optax.adam(1e-2)
    batch = _sft_batch(np.random.default_rng(4))
    bad = dict(batch, weights=batch["weights"] * np.float32("nan"))
    obj = functools.partial(steps.sft_objective, model=model)
    step = _step(obj, steps.sft_weight, tx, 1)
    state = state_lib.create(params, tx, jax.random.key(0))
    state, m = step(state, batch, None)
    good_params = state.params
    state, m = step(state, bad, None)
    assert float(m["finite"]) == 0.0 and int(state.nonfinite_count) == 1
    assert int(state.first_nonfinite_step) == 2 and int(state.step) == 2
    for a, b in zip(jax.tree.leaves(state.params), jax.tree.leaves(good_params), strict=True):
        np.testing.assert_array_equal(a, b)
    state, m = step(state, batch, None)
    assert float(m["finite"]) == 1.0 and int(state.first_nonfinite_step) == 2


def _loop_setup(tmp_path, model_and_params, nonfinite, bad_at):
    model, params = model_and_params
    tx = optax.adam(1e-3)
    obj = functools.partial(steps.sft_objective, model=model)
    step = _step(obj, steps.sft_weight, tx, 1)
    rng = np.random.default_rng(5)

    def batches():
        i = 0
        while True:
            i += 1
            b = _sft_batch(rng)
            if i == bad_at:
                b["weights"] = b["weights"] * np.float32("inf")
            yield b

    ckpt = checkpoint.Checkpointer(str(tmp_path / "ckpt"), every_steps=2, keep=3)
    writer = metrics.MetricsWriter(str(tmp_path), tensorboard=False)
    config = trainer.LoopConfig(steps=8, log_every=1, nonfinite=nonfinite, progress=False)
    state = state_lib.create(params, tx, jax.random.key(0))
    return dict(state=state, step_fn=step, batches=batches(), config=config, checkpointer=ckpt, writer=writer,
                place=jax.device_put)  # fmt: skip


def test_loop_stops_on_nonfinite_after_last_good_checkpoint(tmp_path, model_and_params):
    kw = _loop_setup(tmp_path, model_and_params, "stop", bad_at=5)
    with pytest.raises(preemption.NonFiniteError, match="at step 5.*last good checkpoint: step 4"):
        trainer.fit(**kw)
    assert kw["checkpointer"].all_steps() == [2, 4]
    records = metrics.read_metrics(str(tmp_path))
    assert [r["step"] for r in records] == [1, 2, 3, 4]


def test_loop_skips_nonfinite_when_configured(tmp_path, model_and_params):
    kw = _loop_setup(tmp_path, model_and_params, "skip", bad_at=5)
    kw["config"] = dataclasses.replace(kw["config"], max_nonfinite_fraction=1 / 8)  # 1 of 8 is allowed
    state = trainer.fit(**kw)
    assert int(state.step) == 8 and int(state.nonfinite_count) == 1
    records = metrics.read_metrics(str(tmp_path))
    assert [r["finite"] for r in records] == [1, 1, 1, 1, 0, 1, 1, 1]
    assert records[-1]["nonfinite_steps"] == 1


def test_metrics_writer_supersedes_records_after_resume(tmp_path):
    w = metrics.MetricsWriter(str(tmp_path), tensorboard=False)
    for s in range(1, 6):
        w.write(s, {"loss": float(s)})
    with open(tmp_path / "metrics.jsonl", "a") as f:
        f.write('{"step": 6, "lo')  # a line cut by kill -9
    metrics.MetricsWriter(str(tmp_path), resume_step=3, tensorboard=False).write(4, {"loss": 40.0})
    assert [(r["step"], r["loss"]) for r in metrics.read_metrics(str(tmp_path))] == [
        (1, 1.0), (2, 2.0), (3, 3.0), (4, 40.0)
    ]  # fmt: skip
    superseded = (tmp_path / "metrics.superseded.jsonl").read_text().splitlines()
    assert len(superseded) == 3 and json.loads(superseded[0])["step"] == 4


class TestOptim:
    def test_schedule_warmup_and_decay(self):
        cfg = optim.OptimConfig(learning_rate=1.0, warmup_steps=4, schedule="linear", final_lr_fraction=0.0)
        sched = optim.make_schedule(cfg, total_steps=14)
        np.testing.assert_allclose([sched(i) for i in (0, 2, 4, 9, 14)], [0.0, 0.5, 1.0, 0.5, 0.0], atol=1e-6)
        cos = optim.make_schedule(optim.OptimConfig(learning_rate=2.0, final_lr_fraction=0.1), 10)
        np.testing.assert_allclose([cos(0), cos(10)], [2.0, 0.2], rtol=1e-6)

    @pytest.mark.parametrize("name", ["adamw", "adafactor"])
    def test_optimizers_reduce_a_quadratic(self, name):
        tx = optim.make_optimizer(optim.OptimConfig(name=name, learning_rate=0.1, grad_clip_norm=1.0), 50)
        params = {"w": jnp.full((4, 3), 3.0)}
        opt_state = tx.init(params)
        for _ in range(50):
            grads = jax.grad(lambda p: jnp.sum(p["w"] ** 2))(params)
            updates, opt_state = tx.update(grads, opt_state, params)
            params = optax.apply_updates(params, updates)
        assert float(jnp.sum(params["w"] ** 2)) < 0.5 * 36

    def test_bad_config_names_the_field(self):
        with pytest.raises(ValueError, match="optimizer name"):
            optim.OptimConfig(name="sgd")
        with pytest.raises(ValueError, match="schedule"):
            optim.OptimConfig(schedule="step")


P = jax.sharding.PartitionSpec
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# Run in a subprocess: saves step 1, then dies by SIGKILL at the rename that finalizes step 2.
_KILLED_DURING_SAVE = """
import os, signal, sys
import jax, jax.numpy as jnp
from rlhf_jax import sharding
from rlhf_jax.train import checkpoint

mesh = sharding.make_mesh(sharding.MeshConfig())
sh = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec("data"))
state = lambda v: {"w": jax.device_put(jnp.arange(32.0).reshape(8, 4) + v, sh), "step": jnp.int32(v)}
ck = checkpoint.Checkpointer(sys.argv[1], every_steps=1)
ck.save(1, state(1.0), force=True)
ck.wait()
rename = os.rename
def kill_before_finalizing_step_2(src, dst, *args, **kwargs):
    if os.path.basename(os.fspath(dst)) == "2":
        os.kill(os.getpid(), signal.SIGKILL)
    return rename(src, dst, *args, **kwargs)
os.rename = kill_before_finalizing_step_2
ck.save(2, state(2.0), force=True)
ck.wait()
"""


class TestCheckpoint:
    def _state(self, mesh, spec, value=0.0):
        sh = jax.sharding.NamedSharding(mesh, spec)
        w = jax.device_put(jnp.arange(32.0).reshape(8, 4) + value, sh)
        return {"w": w, "step": jnp.int32(value)}

    def test_restores_onto_a_different_mesh(self, tmp_path):
        P = jax.sharding.PartitionSpec
        mesh_a = sharding.make_mesh(sharding.MeshConfig(data=8, fsdp=1, tensor=1))
        mesh_b = sharding.make_mesh(sharding.MeshConfig(data=2, fsdp=2, tensor=2))
        ck = checkpoint.Checkpointer(str(tmp_path), every_steps=1)
        ck.save(1, self._state(mesh_a, P("data")), force=True)
        ck.wait()
        target = self._state(mesh_b, P(("fsdp", "tensor"), "data"), value=100.0)
        step, restored = ck.restore(None, target)
        assert step == 1
        assert restored["w"].sharding == target["w"].sharding
        np.testing.assert_array_equal(restored["w"], np.arange(32.0).reshape(8, 4))
        ck.close()

    def test_interrupted_write_is_never_restored(self, tmp_path):
        # A real interrupted write, not a hand-made guess at Orbax's layout: a process saves step 1, then
        # is killed (SIGKILL) at the rename that would finalize step 2, so every file of step 2 is on disk
        # (commit_success.txt included) under Orbax's temporary name.
        out = subprocess.run([sys.executable, "-c", _KILLED_DURING_SAVE, str(tmp_path)], cwd=ROOT,
                             capture_output=True, text=True)  # fmt: skip
        assert out.returncode == -signal.SIGKILL, f"the save was not interrupted:\n{out.stderr[-2000:]}"
        leftover = [n for n in os.listdir(tmp_path) if n.startswith("2") and n != "2"]
        assert leftover and not os.path.exists(tmp_path / "2"), os.listdir(tmp_path)
        assert os.path.exists(tmp_path / leftover[0] / "state"), "the killed write left no step-2 state"
        mesh = sharding.make_mesh(sharding.MeshConfig())
        ck = checkpoint.Checkpointer(str(tmp_path), every_steps=1)
        assert ck.latest_step() == 1 and ck.all_steps() == [1]
        step, restored = ck.restore(None, self._state(mesh, P("data")))
        assert step == 1 and int(restored["step"]) == 1
        np.testing.assert_array_equal(restored["w"], np.arange(32.0).reshape(8, 4) + 1.0)
        # The resumed run saves step 2 again: the leftover neither blocks nor shadows the new checkpoint.
        ck.save(2, self._state(mesh, P("data"), 3.0), force=True)
        ck.close()
        assert sorted(os.listdir(tmp_path)) == ["1", "2"]
        ck = checkpoint.Checkpointer(str(tmp_path), every_steps=1)
        step, restored = ck.restore(None, self._state(mesh, P("data")))
        assert step == 2 and int(restored["step"]) == 3
        ck.close()

    def test_corrupt_latest_falls_back_to_previous(self, tmp_path, caplog):
        P = jax.sharding.PartitionSpec
        mesh = sharding.make_mesh(sharding.MeshConfig())
        ck = checkpoint.Checkpointer(str(tmp_path), every_steps=1, keep=3)
        ck.save(1, self._state(mesh, P("data"), 1.0), force=True)
        ck.save(2, self._state(mesh, P("data"), 2.0), force=True)
        ck.close()
        for root, _, files in os.walk(tmp_path / "2" / "state"):
            for name in files:
                with open(os.path.join(root, name), "wb") as f:
                    f.write(b"corrupt")
        ck = checkpoint.Checkpointer(str(tmp_path), every_steps=1, keep=3)
        step, restored = ck.restore(None, self._state(mesh, P("data")))
        assert step == 1 and int(restored["step"]) == 1
        assert any(str(tmp_path / "2") in r.message for r in caplog.records)
        ck.close()


def _dot_dtypes(jaxpr) -> list[tuple[str, ...]]:
    """The operand dtypes of every matmul (dot_general) in a jaxpr, nested jaxprs (scan, vjp) included."""
    out = []
    for eqn in jaxpr.eqns:
        if eqn.primitive.name == "dot_general":
            out.append(tuple(str(v.aval.dtype) for v in eqn.invars))
        for value in eqn.params.values():
            for sub in value if isinstance(value, (list, tuple)) else [value]:
                sub = getattr(sub, "jaxpr", sub)  # a ClosedJaxpr holds its Jaxpr
                if hasattr(sub, "eqns"):
                    out += _dot_dtypes(sub)
    return out


def test_mixed_precision_step_runs_in_bfloat16():
    batch = _pair_batch(np.random.default_rng(6))
    models_by_dtype = {
        dtype: models.Transformer(models.preset("tiny", vocab_size=64, max_len=32, dtype=dtype))
        for dtype in ("bfloat16", "float32")
    }
    model = models_by_dtype["bfloat16"]
    params = models.init_params(model, jax.random.key(0))
    assert all(p.dtype == jnp.float32 for p in jax.tree.leaves(params))  # float32 master weights
    tx = optim.make_optimizer(optim.OptimConfig(name="adafactor", learning_rate=1e-3), 10)
    obj = functools.partial(
        steps.preference_objective, model=model, loss_fn=losses.make("dpo"),
        loss_inputs=losses.required_inputs("dpo"), metric_beta=0.1,
    )  # fmt: skip
    state = state_lib.create(params, tx, jax.random.key(0))
    step = functools.partial(
        steps.train_step, objective=obj, weight_fn=steps.pair_weight, tx=tx, accum_steps=2
    )
    # Every matmul of the forward pass runs on bfloat16 operands, and nearly all of the step's (the
    # backward pass keeps the attention-softmax gradient in float32).
    forward = _dot_dtypes(jax.make_jaxpr(lambda p: steps.pair_logps(model, p, batch))(params).jaxpr)
    assert forward and set(forward) == {("bfloat16", "bfloat16")}, forward
    in_step = _dot_dtypes(jax.make_jaxpr(step)(state, batch, params).jaxpr)
    bf16 = in_step.count(("bfloat16", "bfloat16"))
    assert bf16 > 10 * (len(in_step) - bf16), in_step
    # So its numbers differ from float32 compute by more than float32 rounding, within bfloat16's.
    logps = {k: np.asarray(steps.pair_logps(m, params, batch)[0]) for k, m in models_by_dtype.items()}
    rel = np.abs(logps["bfloat16"] - logps["float32"]).max() / np.abs(logps["float32"]).max()
    assert 1e-5 < rel < 1e-2, rel
    new_state, m = jax.jit(step)(state, batch, params)
    assert float(m["finite"]) == 1.0 and abs(float(m["loss"]) - np.log(2)) < 1e-2
    # The update is applied to the float32 master weights.
    assert all(p.dtype == jnp.float32 for p in jax.tree.leaves(new_state.params))
    assert any(
        np.any(a != b)
        for a, b in zip(jax.tree.leaves(new_state.params), jax.tree.leaves(params), strict=True)
    )


# ----------------------------------------------------------------------------------------------------
# Non-finite limits, SIGTERM, host syncs and config validation (issue 14, items 9-11).


def _run_loop(tmp_path, model_and_params, *, bad_at=(), callback=None, checkpoint_every=0, **config):
    """The loop over 8 SFT steps whose batches at `bad_at` have an infinite weight (a non-finite loss)."""
    model, params = model_and_params
    tx = optax.adam(1e-3)
    rng = np.random.default_rng(5)

    def batches():
        for i in range(1, 100):
            b = _sft_batch(rng)
            yield dict(b, weights=b["weights"] * np.float32("inf")) if i in bad_at else b

    ckpt = checkpoint.Checkpointer(
        str(tmp_path / "ckpt"), every_steps=checkpoint_every, keep=2, async_save=True
    )
    writer = metrics.MetricsWriter(str(tmp_path), tensorboard=False)
    try:
        return trainer.fit(
            state_lib.create(params, tx, jax.random.key(0)),
            _step(functools.partial(steps.sft_objective, model=model), steps.sft_weight, tx, 1),
            batches(), checkpointer=ckpt, writer=writer, description="sft", place=jax.device_put,
            config=trainer.LoopConfig(**{"steps": 8, "log_every": 1, "progress": False, **config}),
            hooks=() if callback is None else (callback,),
        )  # fmt: skip
    finally:
        writer.close()
        ckpt.close()


def test_skipping_more_than_the_allowed_fraction_fails(tmp_path, model_and_params):
    state = _run_loop(
        tmp_path / "a", model_and_params, bad_at=(3, 6), nonfinite="skip", max_nonfinite_fraction=0.25
    )
    assert int(state.step) == 8 and int(state.nonfinite_count) == 2  # 2 of 8: at the limit, allowed
    with pytest.raises(preemption.NonFiniteError) as info:
        _run_loop(
            tmp_path / "b", model_and_params, bad_at=(3, 6), nonfinite="skip", max_nonfinite_fraction=0.2
        )
    message = str(info.value)
    assert "sft: 2 of 8 steps were skipped" in message and "max_nonfinite_fraction=0.2" in message
    assert [r["step"] for r in metrics.read_metrics(str(tmp_path / "b"))][-1] == 5  # failed at step 6's sync


def test_sigterm_finishes_the_step_saves_and_raises_preempted(tmp_path, model_and_params):
    caught = []
    outer_handler = lambda *_: caught.append(1)  # stands in for the default, which would end pytest
    previous = signal.signal(signal.SIGTERM, outer_handler)
    try:
        kill_at_3 = lambda step, state: step == 3 and os.kill(os.getpid(), signal.SIGTERM)
        with pytest.raises(preemption.Preempted) as info:
            _run_loop(tmp_path, model_and_params, callback=kill_at_3, log_every=5)
        handler_after = signal.getsignal(signal.SIGTERM)
    finally:
        signal.signal(signal.SIGTERM, previous)
    # The signal came in step 3's callback: step 4, in flight, is finished, logged and checkpointed.
    assert info.value.step == 4 and "preempted by SIGTERM at step 4 of stage sft" in str(info.value)
    assert "rerun the same command to resume" in str(info.value)
    assert caught == [] and handler_after is outer_handler  # the loop's handler was in place, then removed
    ck = checkpoint.Checkpointer(str(tmp_path / "ckpt"), every_steps=0)
    assert ck.all_steps() == [4]
    ck.close()
    assert [r["step"] for r in metrics.read_metrics(str(tmp_path))] == [4]


@pytest.mark.parametrize(
    "log_every,checkpoint_every,logged", [(2, 0, [2, 4]), (2, 4, [2, 4]), (5, 2, [2, 4])]
)
def test_sigterm_at_a_log_or_checkpoint_step_logs_it_once(tmp_path, model_and_params, log_every,
                                                          checkpoint_every, logged):  # fmt: skip
    """The stop step's metrics are written once whether it was already a log step, a checkpoint step
    (fetched before the save) or neither, and the checkpoints are those of the cadence plus the stop."""
    previous = signal.signal(signal.SIGTERM, lambda *_: None)
    try:
        kill_at_3 = lambda step, state: step == 3 and os.kill(os.getpid(), signal.SIGTERM)
        with pytest.raises(preemption.Preempted) as info:
            _run_loop(tmp_path, model_and_params, callback=kill_at_3, log_every=log_every,
                      checkpoint_every=checkpoint_every)  # fmt: skip
    finally:
        signal.signal(signal.SIGTERM, previous)
    assert info.value.step == 4
    assert [r["step"] for r in metrics.read_metrics(str(tmp_path))] == logged
    ck = checkpoint.Checkpointer(str(tmp_path / "ckpt"), every_steps=0)
    assert ck.all_steps() == ([2, 4] if checkpoint_every == 2 else [4])
    ck.close()


def _tiny_sft_stage(workdir, *, num_steps, log_every):
    """A tiny SFT stage's pieces for `training.fit`: config, mesh, step, fresh state, checkpointer, data."""
    from rlhf_jax.data import pipeline
    from rlhf_jax.pipelines import config as config_lib
    from rlhf_jax.pipelines import training

    cfg = config_lib.StageConfig(
        seed=0, model=CFG, optim=optim.OptimConfig(learning_rate=1e-3),
        train=config_lib.TrainConfig(steps=num_steps, batch_size=8, log_every=log_every),
        loss=config_lib.LossConfig(), mesh=sharding.MeshConfig(),
        checkpoint=config_lib.CheckpointConfig(every_steps=0),
        data=config_lib.DataConfig(max_len=32, max_prompt_len=8), progress=False,
    )  # fmt: skip
    rng = np.random.default_rng(0)
    ids = lambda lo, hi: [rng.integers(4, 64, rng.integers(lo, hi)).astype(np.int32) for _ in range(32)]
    data = pipeline.TokenizedSFT(ids(2, 8), ids(2, 20), np.ones(32, np.float32), pad_id=0, max_len=32)
    data_iter = iter(pipeline.batches(data, global_batch_size=8, seed=0))
    mesh = sharding.make_mesh(cfg.mesh)
    model = models.Transformer(CFG, mesh=mesh)
    step_fn, state = training.setup(
        cfg.optim, cfg.train, seed=0, mesh=mesh, model=model,
        params=models.init_params(model, jax.random.key(0)),
        objective=functools.partial(steps.sft_objective, model=model), weight_fn=steps.sft_weight,
    )  # fmt: skip
    ckpt, state = training.restore(workdir, cfg.checkpoint, state, data_iter)
    return cfg, mesh, step_fn, state, ckpt, data_iter


def test_training_reads_no_device_value_between_log_steps(tmp_path, monkeypatch):
    from rlhf_jax.pipelines import training

    cfg, mesh, step_fn, state, ckpt, data_iter = _tiny_sft_stage(str(tmp_path), num_steps=6, log_every=3)
    counted_types, fetched, order = [], [], []
    real_tokens, device_get = training.real_tokens, jax.device_get

    def spy_real_tokens(batch):
        counted_types.extend(type(v) for k, v in batch.items() if k.endswith("segment_ids"))
        order.append("batch")
        return real_tokens(batch)

    def spy_device_get(x):
        if isinstance(x, dict) and "loss" in x:
            fetched.append(x)
            order.append("fetch")
        return device_get(x)

    monkeypatch.setattr(training, "real_tokens", spy_real_tokens)
    monkeypatch.setattr(jax, "device_get", spy_device_get)
    # On GPU/TPU the guard makes any implicit device-to-host copy (np.asarray, float(), int() of a device
    # array) raise, while the loop's explicit jax.device_get of the metrics at log steps is allowed. On
    # CPU the arrays already live on the host and it checks nothing, hence the spies.
    with jax.transfer_guard_device_to_host("disallow"):
        training.fit(
            str(tmp_path), state, step_fn, loop=cfg.train.loop(False), checkpointer=ckpt, mesh=mesh,
            data_iter=data_iter, name="sft",
        )  # fmt: skip
    # Tokens are counted on the numpy batch before it is placed, not on the device batch (which waits
    # for the device and copies the count back before every step).
    assert len(counted_types) == 6 and set(counted_types) == {np.ndarray}
    records = metrics.read_metrics(str(tmp_path))
    assert [r["step"] for r in records] == [3, 6] and len(fetched) == 2  # one fetch per log step only
    assert all(r["tokens_per_s"] > 0 for r in records)
    # Step 3's metrics are fetched one step late: after batch 4 is taken (and step 4 dispatched).
    assert order[:5] == ["batch", "batch", "batch", "batch", "fetch"], order


def test_loop_refuses_implicit_transfers(tmp_path, model_and_params):
    """A host batch handed to the jitted step without `place` is an implicit host-to-device copy in
    every step: the loop's transfer guard makes it an error (on CPU too)."""
    kw = _loop_setup(tmp_path, model_and_params, "stop", bad_at=0)
    kw["place"] = None
    with pytest.raises(Exception, match="Disallowed host-to-device transfer"):
        trainer.fit(**kw)


def test_real_tokens_counts_the_host_batch():
    from rlhf_jax.pipelines import training

    batch = _pair_batch(np.random.default_rng(7))
    want = int((batch["chosen_segment_ids"] > 0).sum() + (batch["rejected_segment_ids"] > 0).sum())
    assert training.real_tokens(batch) == want


@pytest.mark.slow
def test_skipped_steps_are_in_results_and_too_many_fail_the_launch(tmp_path, capsys):
    from launch import train as launcher

    # A learning rate of 1e30 sends the params to ~1e30 after the first update (the warmup's step 1
    # has rate 0), so from step 3 on every loss overflows and every update is skipped.
    args = ["--experiment=sft_tldr:smoke", "--config.progress=false", "--config.train.nonfinite=skip",
            "--config.train.learning_rate=1e30", "--config.checkpoint.every_steps=0"]  # fmt: skip
    assert (
        launcher.main([*args, f"--workdir={tmp_path / 'a'}", "--config.train.max_nonfinite_fraction=1"]) == 0
    )
    results = os.path.join(stage_dir(tmp_path / "a", "sft"), "results.json")
    skipped = json.load(open(results))["nonfinite_steps"]
    assert skipped >= 1 and metrics.read_metrics(os.path.dirname(results))[-1]["nonfinite_steps"] == skipped
    assert json.load(open(tmp_path / "a" / "results.json"))["nonfinite_steps"] == skipped
    capsys.readouterr()
    assert launcher.main([*args, f"--workdir={tmp_path / 'b'}"]) == 1  # the default limit: 5% of 6 steps
    err = capsys.readouterr().err  # failed at its first sync after a skip (step 4: steps 3 and 4 skipped)
    assert "sft: 2 of 6 steps were skipped" in err and "max_nonfinite_fraction=0.05" in err
