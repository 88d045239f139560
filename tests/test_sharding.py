"""Meshes, the logical rules table, placement, and sharded == single-device on 8 simulated CPU devices.

Tolerances (float32): sharded and single-device runs do the same maths with partial sums split across
devices, so they differ only by reduction order: 1e-5 absolute on logits of order 1 (observed ~1e-6),
1e-5 relative / 1e-7 absolute on parameter gradients.
"""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from jax.sharding import PartitionSpec as P

from rlhf_jax import losses, models, sharding

TINY = models.preset("tiny")
MESHES = [(8, 1, 1), (2, 4, 1), (2, 2, 2), (1, 2, 4)]


def test_make_mesh_resolves_rest_and_names_axes():
    mesh = sharding.make_mesh(sharding.MeshConfig(data=-1, fsdp=2, tensor=2))
    assert mesh.axis_names == ("data", "fsdp", "tensor")
    assert dict(mesh.shape) == {"data": 2, "fsdp": 2, "tensor": 2}
    assert set(mesh.axis_types) == {jax.sharding.AxisType.Auto}
    assert sharding.make_mesh().shape["data"] == 8
    assert sharding.make_mesh(sharding.MeshConfig(1, 1, 1), devices=jax.devices()[:1]).size == 1


@pytest.mark.parametrize(
    "config, message",
    [
        (sharding.MeshConfig(data=2, fsdp=2, tensor=1), "needs 4 devices, but 8 are available"),
        (sharding.MeshConfig(data=-1, fsdp=3, tensor=1), "use 3 devices, which does not divide the 8"),
        (sharding.MeshConfig(data=-1, fsdp=-1, tensor=1), "at most one -1"),
    ],
)
def test_make_mesh_errors_give_numbers(config, message):
    with pytest.raises(ValueError, match=message):
        sharding.make_mesh(config)


def test_rules_table():
    assert sharding.logical_to_spec(("batch", "length", "act_embed")) == P(("data", "fsdp"), None, None)
    assert sharding.logical_to_spec(("layers", "embed", "heads", "head_dim")) == P(
        None, "fsdp", "tensor", None
    )
    with pytest.raises(ValueError, match="twice"):
        sharding.logical_to_spec(("batch", "embed"))  # both want fsdp
    with pytest.raises(ValueError, match="no rule"):
        sharding.logical_to_spec(("nonsense",))


def test_indivisible_parameter_raises_with_numbers_and_rules_can_replicate():
    mesh = sharding.make_mesh(sharding.MeshConfig(data=1, fsdp=1, tensor=8))
    with pytest.raises(ValueError, match=r"k_kernel.*size 4, which does not divide into 8 shards.*tensor=8"):
        models.param_shardings(models.Transformer(TINY, mesh=mesh))
    # Replicating the 4 kv heads (as for multi-query models on wide tensor axes) is a one-line rule change.
    rules = tuple((name, None if name == "kv_heads" else axes) for name, axes in sharding.LOGICAL_RULES)
    shardings = models.param_shardings(models.Transformer(TINY, mesh=mesh, rules=rules))
    assert shardings["decoder"]["layers"]["attn"]["k_kernel"].spec == P(None, "fsdp", None, None)
    assert shardings["decoder"]["layers"]["attn"]["q_kernel"].spec == P(None, "fsdp", "tensor", None)


def test_shard_batch_places_and_checks():
    mesh = sharding.make_mesh(sharding.MeshConfig(data=2, fsdp=2, tensor=2))
    batch = {"tokens": np.arange(24).reshape(4, 6), "mask": np.ones((4, 6), bool)}
    placed = sharding.shard_batch(batch, mesh)
    assert placed["tokens"].sharding.spec == P(("data", "fsdp"))
    np.testing.assert_array_equal(placed["tokens"], batch["tokens"])
    with pytest.raises(ValueError, match=r"batch\['tokens'\]: dimension 0 has size 6.*4 shards"):
        sharding.shard_batch({"tokens": np.zeros((6, 3))}, mesh)


def test_optimizer_state_shardings_follow_params(single_device_reference):
    mesh = sharding.make_mesh(sharding.MeshConfig(data=2, fsdp=2, tensor=2))
    model = models.Transformer(TINY, mesh=mesh)
    param_shardings = models.param_shardings(model)
    params = jax.device_put(single_device_reference[0], param_shardings)
    tx = optax.adamw(1e-3)
    opt_shardings = sharding.shardings_like(jax.eval_shape(tx.init, params), params, param_shardings, mesh)
    opt_state = jax.jit(tx.init, out_shardings=opt_shardings)(params)
    mu = opt_state[0].mu
    assert mu["lm_head"].sharding.spec == P("fsdp", "tensor")
    assert (
        mu["decoder"]["layers"]["mlp"]["down_kernel"].sharding
        == param_shardings["decoder"]["layers"]["mlp"]["down_kernel"]
    )
    assert opt_state[0].count.sharding.spec == P()


# ------------------------------------------------------------------------- sharded == single device


def _preference_batch(pairs=4, T=16, seed=0):
    """Chosen and rejected concatenated (2*pairs rows): prompt of 5 tokens, responses right-padded."""
    rng = np.random.default_rng(seed)
    tokens_BT = rng.integers(1, TINY.vocab_size, size=(2 * pairs, T)).astype(np.int32)
    tokens_BT[pairs:, :5] = tokens_BT[:pairs, :5]  # shared prompts
    lengths_B = rng.integers(8, T + 1, size=2 * pairs)
    segment_ids_BT = (np.arange(T)[None] < lengths_B[:, None]).astype(np.int32)
    tokens_BT = tokens_BT * segment_ids_BT
    loss_mask_BT = segment_ids_BT * (np.arange(T)[None] >= 5)
    return {"tokens": tokens_BT, "segment_ids": segment_ids_BT, "loss_mask": loss_mask_BT}


def _dpo_step(model):
    """(logits, loss, grads) of DPO, chosen and rejected in one forward pass; reference log-probs given."""

    def loss_fn(params, batch):
        logits_BTV = model.apply(
            {"params": params}, batch["tokens"][:, :-1], segment_ids_BT=batch["segment_ids"][:, :-1]
        )
        logps_B = losses.sequence_logps(
            logits=logits_BTV, targets=batch["tokens"][:, 1:], mask=batch["loss_mask"][:, 1:]
        )
        ref_logps_B, n = batch["reference_logps"], logps_B.shape[0] // 2
        loss_B = losses.dpo(
            policy_chosen_logps=logps_B[:n],
            policy_rejected_logps=logps_B[n:],
            reference_chosen_logps=ref_logps_B[:n],
            reference_rejected_logps=ref_logps_B[n:],
            beta=0.1,
        )
        return loss_B.mean(), logits_BTV

    def step(params, batch):
        (loss, logits_BTV), grads = jax.value_and_grad(loss_fn, has_aux=True)(params, batch)
        return logits_BTV, loss, grads

    return step


@pytest.fixture(scope="module")
def single_device_reference():
    model = models.Transformer(TINY)
    params = models.init_params(model, jax.random.key(0))
    batch = _preference_batch()
    batch["reference_logps"] = np.random.default_rng(1).normal(-40.0, 3.0, size=len(batch["tokens"]))
    batch["reference_logps"] = batch["reference_logps"].astype(np.float32)
    return params, batch, jax.jit(_dpo_step(model))(params, batch)


@pytest.mark.parametrize("mesh_shape", MESHES, ids=[f"mesh{m}" for m in MESHES])
def test_sharded_equals_single_device(mesh_shape, single_device_reference):
    params, host_batch, (ref_logits, ref_loss, ref_grads) = single_device_reference
    mesh = sharding.make_mesh(sharding.MeshConfig(*mesh_shape))
    model = models.Transformer(TINY, mesh=mesh)
    p_shardings = models.param_shardings(model)
    params = jax.device_put(params, p_shardings)
    batch = sharding.shard_batch(host_batch, mesh)
    logits_sharding = sharding.logical_sharding(mesh, ("batch", "length", "act_vocab"))
    step = jax.jit(
        _dpo_step(model),
        in_shardings=(p_shardings, sharding.batch_sharding(mesh)),
        out_shardings=(logits_sharding, sharding.replicated(mesh), p_shardings),
    )
    logits, loss, grads = step(params, batch)

    np.testing.assert_allclose(logits, ref_logits, atol=1e-5)
    np.testing.assert_allclose(loss, ref_loss, rtol=1e-6)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-7), grads, ref_grads)


def test_sharded_init_reward_model_and_kv_cache_decode():
    """Born-sharded init equals single-device init; prefill, decode and rewards equal single-device."""
    mesh = sharding.make_mesh(sharding.MeshConfig(data=2, fsdp=2, tensor=2))
    tokens_BT = np.random.default_rng(0).integers(1, TINY.vocab_size, size=(4, 10)).astype(np.int32)
    lengths_B = jnp.array([3, 6, 4, 5])

    def infer(lm, rm, lm_params, rm_params, tokens_BT, cache):
        rows = jnp.arange(4)
        prompts_BT = jnp.where(jnp.arange(6)[None, :] < lengths_B[:, None], tokens_BT[:, :6], 0)
        first_BV, cache = models.prefill(lm, lm_params, prompts_BT, lengths_B, cache)
        second_BV, cache = models.decode_step(lm, lm_params, tokens_BT[rows, lengths_B], cache)
        return first_BV, second_BV, rm.apply({"params": rm_params}, tokens_BT)

    lm, rm = models.Transformer(TINY), models.RewardModel(TINY)
    lm_params, rm_params = (
        models.init_params(lm, jax.random.key(0)),
        models.init_params(rm, jax.random.key(1)),
    )
    cache = models.init_cache(TINY, 4, max_len=16)
    single = jax.jit(functools.partial(infer, lm, rm))(lm_params, rm_params, tokens_BT, cache)

    lm, rm = models.Transformer(TINY, mesh=mesh), models.RewardModel(TINY, mesh=mesh)
    sharded_lm_params = models.init_params(lm, jax.random.key(0))
    jax.tree.map(np.testing.assert_array_equal, sharded_lm_params, lm_params)  # values independent of mesh
    assert sharded_lm_params["lm_head"].sharding.spec == P("fsdp", "tensor")
    rm_params = jax.device_put(rm_params, models.param_shardings(rm))
    cache = jax.device_put(cache, models.cache_shardings(mesh))
    tokens = sharding.shard_batch(tokens_BT, mesh)
    sharded = jax.jit(functools.partial(infer, lm, rm))(sharded_lm_params, rm_params, tokens, cache)
    for a, b in zip(sharded, single, strict=True):
        np.testing.assert_allclose(a, b, atol=1e-5)


def test_token_logps_chunks_stay_on_their_devices():
    """With the batch split over 8 devices, `losses.token_logps` (forward and gradient) gathers no logits:
    each chunk of rows takes its rows from every device (contiguous chunks made XLA all-gather the whole
    [B, T, V] logits at every step of the chunk loop). Values equal the unsharded computation."""
    import numpy as np

    from bench import hlo_collectives
    from rlhf_jax import losses

    mesh = sharding.make_mesh(sharding.MeshConfig(data=1, fsdp=8, tensor=1))
    b, t, v = 8, 256, 2048  # 4 chunks of 512 rows (`_CHUNK_ELEMENTS`)
    rng = np.random.default_rng(0)
    logits = rng.normal(size=(b, t, v)).astype(np.float32)
    targets = rng.integers(0, v, (b, t)).astype(np.int32)
    shards = sharding.batch_shards(mesh)
    assert shards == 8

    def f(x, y):
        return jnp.sum(losses.token_logps(logits=x, targets=y, shards=shards) * jnp.arange(t)[None, :])

    fn = jax.jit(jax.value_and_grad(f), in_shardings=(sharding.batch_sharding(mesh),) * 2)
    x, y = sharding.shard_batch(logits, mesh), sharding.shard_batch(targets, mesh)
    gathered = hlo_collectives.summary(fn.lower(x, y).compile().as_text())["all-gather"]["bytes"]
    assert gathered < logits.nbytes / 64, gathered
    value, grad = fn(x, y)
    logp = (
        logits
        - np.log(np.exp(logits - logits.max(-1, keepdims=True)).sum(-1, keepdims=True))
        - logits.max(-1, keepdims=True)
    )
    want = np.take_along_axis(logp, targets[..., None], -1)[..., 0]
    np.testing.assert_allclose(value, np.sum(want * np.arange(t)), rtol=1e-5)
    onehot = np.eye(v, dtype=np.float32)[targets]
    np.testing.assert_allclose(grad, (onehot - np.exp(logp)) * np.arange(t)[None, :, None], atol=1e-5)


def test_fused_head_logps_per_shard_equals_unfused():
    """`losses.sequence_logps_from_hidden` with the batch split over 8 devices and `shards=8` (each shard
    compacts and chunks its own masked-in rows) equals the unfused log-probs, values and gradients.
    That it moves no rows between devices is checked on a TPU compile (tests/test_tpu_plan.py)."""
    import numpy as np

    from rlhf_jax import losses

    mesh = sharding.make_mesh(sharding.MeshConfig(data=1, fsdp=8, tensor=1))
    b, t, d, v = 16, 128, 64, 4096  # 512 rows per chunk on CPU: several chunks per shard
    rng = np.random.default_rng(1)
    hidden = rng.normal(size=(b, t, d)).astype(np.float32)
    kernel = (rng.normal(size=(d, v)) / 8).astype(np.float32)
    targets = rng.integers(0, v, (b, t)).astype(np.int32)
    mask = (rng.random((b, t)) < 0.6).astype(np.float32)

    def f(h, w, y, m):
        kw = dict(hidden=h, kernel=w, targets=y, mask=m, shards=sharding.batch_shards(mesh))
        return jnp.sum(losses.sequence_logps_from_hidden(**kw) * jnp.arange(1, b + 1))

    bs, rep = sharding.batch_sharding(mesh), sharding.replicated(mesh)
    fn = jax.jit(jax.value_and_grad(f, argnums=(0, 1)), in_shardings=(bs, rep, bs, bs))
    args = (sharding.shard_batch(hidden, mesh), kernel, sharding.shard_batch(targets, mesh),
            sharding.shard_batch(mask, mesh))  # fmt: skip
    value, (dh, dw) = fn(*args)

    def unfused(h, w):
        logits = jnp.einsum("BTD,DV->BTV", h, w)
        return jnp.sum(
            losses.sequence_logps(logits=logits, targets=targets, mask=mask) * jnp.arange(1, b + 1)
        )

    want, (want_dh, want_dw) = jax.value_and_grad(unfused, argnums=(0, 1))(hidden, kernel)
    np.testing.assert_allclose(value, want, rtol=1e-5)
    np.testing.assert_allclose(dh, want_dh, rtol=1e-5, atol=1e-4)
    np.testing.assert_allclose(dw, want_dw, rtol=1e-4, atol=1e-4)
