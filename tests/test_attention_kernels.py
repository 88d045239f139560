"""Accelerator attention (`model.attention_impl`): the kernel chosen per platform, the Pallas splash
kernel (run in Pallas' interpreter on the CPU) against JAX's reference attention, forward and gradient,
with packed segments, padding, grouped-query heads, soft-capping and a mesh; the model's forward through
it; and the TPU compiler lowering the model's `auto` attention to the Mosaic kernel."""

import functools
import importlib.util
import os

os.environ.setdefault("TPU_SKIP_MDS_QUERY", "1")
os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")

import dataclasses  # noqa: E402

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
import pytest  # noqa: E402

from rlhf_jax import models, sharding  # noqa: E402
from rlhf_jax.models import layers  # noqa: E402

needs_libtpu = pytest.mark.skipif(importlib.util.find_spec("libtpu") is None, reason="needs the libtpu wheel")


def _config(**kw):
    return dataclasses.replace(models.preset("tiny", vocab_size=64, max_len=256), **kw)


@pytest.mark.parametrize(
    "impl, platform, dtype, extra, seq_len, kernel",
    [
        (None, "cpu", "float32", {}, 128, "blockwise"),
        (None, "tpu", "float32", {}, 128, "xla"),
        (None, "gpu", "bfloat16", {}, 128, "xla"),
        ("xla", "cpu", "float32", {}, 128, "xla"),
        ("cudnn", "gpu", "bfloat16", {}, 128, "cudnn"),
        ("auto", "cpu", "bfloat16", {}, 128, "blockwise"),
        ("auto", "gpu", "bfloat16", {}, 100, "cudnn"),
        ("auto", "gpu", "float32", {}, 128, "xla"),  # cuDNN flash attention takes no float32
        ("auto", "tpu", "float32", {}, 256, "splash"),
        ("auto", "tpu", "bfloat16", {}, 100, "xla"),  # not a multiple of the kernel's 128 block
        ("auto", "tpu", "bfloat16", {"sliding_window": 64}, 256, "xla"),
        ("auto", "tpu", "bfloat16", {"attn_softcap": 50.0}, 256, "splash"),  # capped in the kernel
        ("auto", "gpu", "bfloat16", {"attn_softcap": 50.0}, 256, "blockwise"),
        (None, "tpu", "bfloat16", {"attn_softcap": 50.0}, 256, "blockwise"),
    ],
)
def test_attention_kernel_per_platform(impl, platform, dtype, extra, seq_len, kernel):
    config = _config(attention_impl=impl, dtype=dtype, **extra)
    assert layers.attention_kernel(config, platform, seq_len) == kernel


def test_an_unknown_attention_impl_is_refused():
    with pytest.raises(ValueError, match=r"attention_impl must be one of .*'auto'.*got 'flash'"):
        _config(attention_impl="flash")


def _qkv(B=2, T=128, H=4, G=2, K=32, seed=0):
    rng = np.random.default_rng(seed)
    q = jnp.asarray(rng.normal(size=(B, T, H, K)), jnp.float32)
    k = jnp.asarray(rng.normal(size=(B, T, G, K)), jnp.float32)
    v = jnp.asarray(rng.normal(size=(B, T, G, K)), jnp.float32)
    seg = np.ones((B, T), np.int32)
    seg[0, 50:] = 2  # row 0: two packed sequences
    seg[1, 90:] = 0  # row 1: one sequence, then padding
    return q, k, v, jnp.asarray(seg)


def _reference(q, k, v, seg, scale, softcap=None):
    """JAX's attention, or (soft-capped) the plain softmax written out: the independent reference."""
    mask = (seg[:, :, None] == seg[:, None, :])[:, None]
    if softcap is None:
        return jax.nn.dot_product_attention(q, k, v, mask=mask, scale=scale, is_causal=True)
    T, Q = q.shape[1], q.shape[2] // k.shape[2]
    k, v = jnp.repeat(k, Q, axis=2), jnp.repeat(v, Q, axis=2)
    s = jnp.einsum("bthk,bshk->bhts", q, k) * scale
    s = softcap * jnp.tanh(s / softcap)
    causal = jnp.tril(jnp.ones((T, T), bool))[None, None]
    s = jnp.where(mask & causal, s, -jnp.inf)
    return jnp.einsum("bhts,bshk->bthk", jax.nn.softmax(s, axis=-1), v)


def _valid(seg):
    return np.asarray(seg)[:, :, None, None] != 0  # padding rows' outputs are never read


@pytest.mark.parametrize("softcap", [None, 5.0])
def test_splash_matches_the_reference_forward_and_gradient(softcap):
    q, k, v, seg = _qkv()
    scale = 0.3
    splash = functools.partial(layers.splash_attention, scale=scale, softcap=softcap, interpret=True)
    out = splash(q, k, v, seg)
    ref = _reference(q, k, v, seg, scale, softcap)
    np.testing.assert_allclose(np.where(_valid(seg), out, 0), np.where(_valid(seg), ref, 0), atol=2e-5)
    w = jnp.asarray(np.random.default_rng(1).normal(size=q.shape), jnp.float32) * _valid(seg)

    def loss(f):
        return lambda q, k, v: jnp.sum(jnp.sin(f(q, k, v, seg)) * w)

    grads = jax.grad(loss(splash), argnums=(0, 1, 2))(q, k, v)
    grads_ref = jax.grad(loss(lambda *a: _reference(*a, scale, softcap)), argnums=(0, 1, 2))(q, k, v)
    for name, g, r in zip("qkv", grads, grads_ref, strict=True):
        np.testing.assert_allclose(g, r, atol=5e-5, err_msg=name)


def test_splash_under_a_mesh_splits_rows_and_heads():
    mesh = sharding.make_mesh(sharding.MeshConfig(data=2, fsdp=2, tensor=2), jax.devices()[:8])
    q, k, v, seg = _qkv(B=4, H=4, G=2)
    seg = jnp.concatenate([seg, seg[::-1]])[:4]
    rules = sharding.LOGICAL_RULES
    put = lambda x, axes: jax.device_put(x, sharding.logical_sharding(mesh, axes, rules))  # noqa: E731
    args = (put(q, ("batch", None, "heads", None)), put(k, ("batch", None, "kv_heads", None)),
            put(v, ("batch", None, "kv_heads", None)), put(seg, ("batch", None)))  # fmt: skip
    f = jax.jit(functools.partial(layers.splash_attention, scale=0.2, mesh=mesh, interpret=True))
    out = f(*args)
    assert out.sharding.spec == sharding.logical_to_spec(("batch", None, "heads", None), rules)
    ref = _reference(q, k, v, seg, 0.2)
    np.testing.assert_allclose(np.where(_valid(seg), out, 0), np.where(_valid(seg), ref, 0), atol=2e-5)


def test_splash_refuses_a_length_off_its_block():
    q, k, v, seg = _qkv(T=100)
    with pytest.raises(ValueError, match="multiple of 128, got 100"):
        layers.splash_attention(q, k, v, seg, scale=1.0, interpret=True)


def test_the_model_through_splash_equals_the_default_path(monkeypatch):
    """A model whose kernel choice is forced to splash (interpreted) gives the default path's logits and
    gradients on packed rows: the segment ids reach every layer of the scanned stack."""
    config = _config(num_layers=2)
    model = models.Transformer(config)
    params = models.init_params(model, jax.random.key(0))
    rng = np.random.default_rng(2)
    tokens = jnp.asarray(rng.integers(1, 64, (2, 128)), jnp.int32)
    seg = _qkv()[3]

    def loss(p):
        logits = model.apply({"params": p}, tokens, segment_ids_BT=seg)
        return jnp.sum(jnp.where(seg[..., None] != 0, jax.nn.log_softmax(logits), 0.0)[..., :8])

    base_loss, base_grads = jax.value_and_grad(loss)(params)
    monkeypatch.setattr(layers, "attention_kernel", lambda *a: "splash")
    monkeypatch.setattr(
        layers, "splash_attention", functools.partial(layers.splash_attention, interpret=True)
    )
    splash_loss, splash_grads = jax.value_and_grad(loss)(params)
    np.testing.assert_allclose(splash_loss, base_loss, rtol=1e-5)
    for (path, g), r in zip(jax.tree_util.tree_leaves_with_path(splash_grads), jax.tree.leaves(base_grads),
                            strict=True):  # fmt: skip
        np.testing.assert_allclose(g, r, rtol=2e-4, atol=2e-5, err_msg=jax.tree_util.keystr(path))


@needs_libtpu
def test_the_tpu_compiler_lowers_auto_attention_to_the_splash_kernel():
    """Compiled for 4 v5e chips (fsdp 4), the model's forward and gradient with attention_impl="auto"
    run the Mosaic splash kernel (a `tpu_custom_call`); with None they do not."""
    from bench import tpu_plan

    mesh = sharding.make_mesh(
        sharding.MeshConfig(data=1, fsdp=4, tensor=1), tpu_plan.topology_devices("v5e:2x2")
    )

    def hlo(impl):
        config = _config(attention_impl=impl, dtype="bfloat16", head_dim=128, num_heads=2, num_kv_heads=1)
        model = models.Transformer(config, mesh=mesh)
        params = models.param_shapes(models.Transformer(config))
        bs = sharding.batch_sharding(mesh)
        tokens = jax.ShapeDtypeStruct((8, 256), jnp.int32, sharding=bs)

        def loss(p, t):
            return jnp.sum(model.apply({"params": p}, t, segment_ids_BT=jnp.ones_like(t)))

        shardings = models.param_shardings(model)
        params = jax.tree.map(
            lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), params, shardings
        )
        return jax.jit(jax.grad(loss)).lower(params, tokens).compile().as_text()

    assert "tpu_custom_call" in hlo("auto")
    assert "tpu_custom_call" not in hlo(None)
