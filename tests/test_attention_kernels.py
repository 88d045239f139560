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
        ("cpu_ffi", "cpu", "float32", {}, 100, "cpu_ffi"),
        ("cpu_ffi", "cpu", "bfloat16", {}, 128, "blockwise"),  # the native kernel is float32 only
        ("cpu_ffi", "cpu", "float32", {"attn_softcap": 50.0}, 128, "blockwise"),
        ("cpu_ffi", "cpu", "float32", {"sliding_window": 64}, 128, "blockwise"),  # its mask has no window
        ("cpu_ffi", "gpu", "float32", {}, 128, "xla"),
        ("cpu_ffi", "tpu", "bfloat16", {}, 256, "xla"),
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


# ------------------------------------------------------------------ decode attention bounded by the fill


@pytest.mark.parametrize(
    "decode, platform, kernel",
    [(None, "cpu", "full"), (None, "tpu", "bounded"), (None, "gpu", "bounded"), ("bounded", "cpu", "bounded"),
     ("full", "tpu", "full")],
)  # fmt: skip
def test_decode_kernel_per_platform(decode, platform, kernel):
    assert layers.decode_kernel(_config(decode_attention=decode), platform) == kernel


def test_an_unknown_decode_attention_is_refused():
    with pytest.raises(ValueError, match=r"decode_attention must be one of .*'bounded'.*got 'paged'"):
        _config(decode_attention="paged")


def _cache_case(B=4, T=2, H=4, G=2, K=8, S=37, seed=0):
    """Queries, a [B, G, S, K] cache whose row b holds lengths[b] + T filled slots, the causal mask over
    them, and NaN in every slot from 24 on (past the filled ones): a read of those slots would poison
    the output (0 · NaN = NaN), so a finite result shows they were not read."""
    rng = np.random.default_rng(seed)
    lengths = np.array([3, 11, 0, 7])[:B]
    q = rng.normal(size=(B, T, H, K)).astype(np.float32)
    k = rng.normal(size=(B, G, S, K)).astype(np.float32)
    v = rng.normal(size=(B, G, S, K)).astype(np.float32)
    pos = lengths[:, None] + np.arange(T)[None, :]
    mask = (np.arange(S)[None, None, None, :] <= pos[:, None, :, None]) & np.ones((B, 1, T, S), bool)
    k_nan, v_nan = k.copy(), v.copy()
    k_nan[:, :, 24:], v_nan[:, :, 24:] = np.nan, np.nan
    return q, k, v, k_nan, v_nan, mask, int(lengths.max() + T)


@pytest.mark.parametrize("softcap", [None, 2.0])
@pytest.mark.parametrize("chunk", [8, 5, 64])
def test_bounded_decode_attention_equals_the_full_read(softcap, chunk):
    """Over ragged rows (one empty before the new tokens), grouped-query heads and soft-capping, with a
    chunk that divides S or not (the last chunk then overlaps the one before: its columns must be
    counted once) or exceeds it, the bounded read equals `_cached_attention` over the whole buffer; with
    NaN past slot 24 and chunks that stop before it (13 slots filled), it still does, while the full
    read is NaN: the bounded read never touched those slots."""
    q, k, v, k_nan, v_nan, mask, num_slots = _cache_case()
    full = layers._cached_attention(jnp.asarray(q), k, v, mask, softcap=softcap)
    out = layers.bounded_cached_attention(q, k, v, mask, jnp.int32(num_slots), softcap=softcap, chunk=chunk)
    np.testing.assert_allclose(out, full, rtol=1e-5, atol=1e-6)
    if chunk != 64:  # 64 > S: one chunk of the whole buffer
        poisoned = layers.bounded_cached_attention(q, k_nan, v_nan, mask, jnp.int32(num_slots), chunk=8)
        assert np.isnan(np.asarray(layers._cached_attention(jnp.asarray(q), k_nan, v_nan, mask))).all()
        np.testing.assert_allclose(
            poisoned, layers._cached_attention(jnp.asarray(q), k, v, mask), rtol=1e-5, atol=1e-6
        )


def test_bounded_decode_attention_over_a_shared_prefix_equals_the_two_part_read():
    """With a prefix shared by groups of rows (`KVCache.prefix_k`: 2 prompts × 2 samples), the bounded
    read of prefix and own slots equals `_shared_prefix_attention`, also with NaN past the prefix's
    filled slots."""
    rng = np.random.default_rng(1)
    P, N, T, H, G, K, R, S = 2, 2, 1, 4, 2, 8, 21, 13
    B = P * N
    q = rng.normal(size=(B, T, H, K)).astype(np.float32)
    kp, vp = rng.normal(size=(2, P, G, R, K)).astype(np.float32)
    ko, vo = rng.normal(size=(2, B, G, S, K)).astype(np.float32)
    prefix_len, own_len = np.array([5, 9]), np.array([0, 2, 4, 1])
    filled = np.concatenate(
        [
            np.arange(R)[None, :] < np.repeat(prefix_len, N)[:, None],
            np.arange(S)[None, :] <= own_len[:, None],
        ],
        1,
    )
    mask = filled[:, None, None, :]
    full = layers._shared_prefix_attention(jnp.asarray(q), kp, vp, ko, vo, mask)
    kp_nan, vp_nan = kp.copy(), vp.copy()
    kp_nan[:, :, 12:], vp_nan[:, :, 12:] = np.nan, np.nan
    for kpp, vpp in ((kp, vp), (kp_nan, vp_nan)):
        out = layers.bounded_cached_attention(
            q, ko, vo, mask, jnp.int32(own_len.max() + 1), prefix=(kpp, vpp, jnp.int32(9)), chunk=4
        )
        np.testing.assert_allclose(out, full, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("shared_prefix", [True, False])
def test_the_sampler_with_bounded_decode_attention_samples_what_the_full_read_samples(shared_prefix):
    """`decode_attention="bounded"` (the TPU/GPU default) on the CPU: the same tokens and lengths for the
    same keys as "full", log-probs equal up to float32 rounding, on a mesh, with sliding windows and
    soft-capping, and chunks smaller than the cache (the model's chunk is patched to 4 slots)."""
    from rlhf_jax import sampling

    config = _config(
        sliding_window=5, layer_types=("sliding_attention", "full_attention"), attn_softcap=3.0,
        final_softcap=20.0,
    )  # fmt: skip
    params = models.init_params(models.Transformer(config), jax.random.key(0))
    rng = np.random.default_rng(0)
    prompts = rng.integers(3, 64, size=(3, 9)).astype(np.int32)
    lengths = np.array([9, 4, 6], np.int32)
    kw = dict(
        config=sampling.SamplingConfig(max_new_tokens=12, temperature=1.0), num_samples=2,
        rng=jax.random.key(3), eos_id=None, pad_id=0, shared_prefix=shared_prefix,
    )  # fmt: skip
    mesh = sharding.make_mesh(sharding.MeshConfig(data=2, fsdp=1, tensor=2), jax.devices()[:4])
    out = {}
    for decode in ("full", "bounded"):
        model = models.Transformer(dataclasses.replace(config, decode_attention=decode), mesh=mesh)
        p = jax.device_put(params, models.param_shardings(model))
        with pytest.MonkeyPatch.context() as mp:
            mp.setattr(layers, "_DECODE_CHUNK", 4)
            out[decode] = sampling.sample(model, p, prompts, lengths, **kw)
    np.testing.assert_array_equal(out["bounded"].tokens_PNT, out["full"].tokens_PNT)
    np.testing.assert_array_equal(out["bounded"].lengths_PN, out["full"].lengths_PN)
    np.testing.assert_allclose(out["bounded"].logps_PN, out["full"].logps_PN, atol=1e-4)


@needs_libtpu
def test_the_tpu_compiler_builds_the_bounded_decode_loop_by_default():
    """Compiled for 4 v5e chips, one decode step (`Transformer.extend` of one token over a 1,024-slot
    cache) reads the cache in a while loop over chunks by default (`decode_attention=None` on a TPU) and
    in one pass with "full"."""
    from bench import tpu_plan

    mesh = sharding.make_mesh(
        sharding.MeshConfig(data=4, fsdp=1, tensor=1), tpu_plan.topology_devices("v5e:2x2")
    )

    def hlo(decode):
        config = _config(
            max_len=1024, dtype="bfloat16", head_dim=128, num_heads=2, num_kv_heads=1, decode_attention=decode
        )
        model = models.Transformer(config, mesh=mesh)
        params = jax.tree.map(
            lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s),
            models.param_shapes(models.Transformer(config)), models.param_shardings(model),
        )  # fmt: skip
        cache = jax.eval_shape(lambda: models.init_cache(config, 8, 1024))

        def step(p, tokens, cache):
            return model.apply({"params": p}, tokens, jnp.ones((8,), jnp.int32), cache, method=model.extend)

        tokens = jax.ShapeDtypeStruct((8, 1), jnp.int32)
        return jax.jit(step).lower(params, tokens, cache).compile().as_text()

    # Each has the scan over layers' loop; the bounded read adds its loop over chunks.
    assert hlo(None).count(" while(") > hlo("full").count(" while(") >= 1
