"""The optional native CPU attention kernel (`rlhf_jax.kernels`, `attention_impl="cpu_ffi"`): built once
per module into a temporary cache (the module's kernel tests skip when no compiler is found), its
forward (output and log-sum-exp) against the pure-JAX `causal_attention`, `jax.nn.dot_product_attention`
and a plain softmax written out; its gradients against `causal_attention`'s; under a mesh; the whole
model's loss and gradients against the default path, on one device and sharded over 8; and the errors
without a library or a compiler.

Inputs: grouped-query heads (H=4, G=2), packed segments starting inside a tile, padding (id 0, which
attends among itself), T=100 (not a multiple of the kernel's 32-query and 64-key tiles, more than one key
tile so the online softmax rescales) and T=7 (one partial tile). Tolerance 1e-5 absolute and relative on
outputs and log-sum-exps of order 1, 5e-5 on gradients: float32 with a different summation order than
XLA's (K=32-term dot products, sums over up to 100 keys) differs by a few ulp per term, ~1e-6 observed;
a wrong causal bound or a missing segment check moves some output by ~1e-1.
"""

import dataclasses
import functools
import re
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from rlhf_jax import models, sharding
from rlhf_jax.kernels import build, cpu_attention
from rlhf_jax.models import layers

SCALE = 0.3
# One xdist worker runs the module, so the library is compiled once (pytest.ini).
pytestmark = pytest.mark.xdist_group("cpu_attention_kernel")


@pytest.fixture(scope="module")
def kernel(tmp_path_factory):
    """The library built into a fresh cache directory for this module (skips when nothing compiles)."""
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("RLHF_JAX_KERNELS_CACHE", str(tmp_path_factory.mktemp("kernels")))
        if not build.compilers():
            pytest.skip("no C++ compiler ($CXX, g++, c++, clang++ or the ziglang package) for the kernel")
        build.build()
        assert cpu_attention.available()
        yield


def _case(T=100, B=2, H=4, G=2, K=32, seed=0, layout="packed"):
    rng = np.random.default_rng(seed)
    q = jnp.asarray(rng.normal(size=(B, T, H, K)), jnp.float32)
    k = jnp.asarray(rng.normal(size=(B, T, G, K)), jnp.float32)
    v = jnp.asarray(rng.normal(size=(B, T, G, K)), jnp.float32)
    seg = np.ones((B, T), np.int32)
    if layout == "packed":
        seg[0, (3 * T) // 7 :] = 2  # row 0: two packed sequences, the second from inside a tile
        seg[0, (5 * T) // 7 :] = 3
        seg[1, (4 * T) // 5 :] = 0  # row 1: one sequence, then padding
    else:  # ids in several runs each (the kernel's key-by-key mask rather than its per-query range)
        seg[0, T // 5 : (2 * T) // 5] = 2  # row 0: 1, 2, 1, 2
        seg[0, (3 * T) // 5 :] = 2
        seg[1, T // 3 : (2 * T) // 3] = 0  # row 1: 1, padding, 1
    return q, k, v, jnp.asarray(seg)


def _mask(seg):
    return (seg[:, :, None] == seg[:, None, :])[:, None]


def _plain_lse(q, k, seg):
    """[B, H, T] log Σ_s exp(scale q_t·k_s) over causal same-segment keys, written out."""
    T, Q = q.shape[1], q.shape[2] // k.shape[2]
    s = jnp.einsum("bthk,bshk->bhts", q, jnp.repeat(k, Q, axis=2)) * SCALE
    s = jnp.where(_mask(seg) & jnp.tril(jnp.ones((T, T), bool))[None, None], s, -jnp.inf)
    return jax.nn.logsumexp(s, axis=-1)


# (T, K, layout): lengths off the tiles, one partial tile, a head size off the 16-float vectors with
# ids in several runs, and several whole key tiles.
CASES = [(100, 32, "packed"), (7, 32, "packed"), (150, 20, "interleaved"), (192, 64, "packed")]


@pytest.mark.parametrize("T,K,layout", CASES)
def test_the_forward_equals_the_pure_jax_and_jax_attention(kernel, T, K, layout):
    q, k, v, seg = _case(T, K=K, layout=layout)
    out, lse = cpu_attention._forward_call(q, k, v, seg, SCALE)
    blockwise = layers.causal_attention(q, k, v, _mask(seg), layers.attention_block(T), SCALE)
    xla = jax.nn.dot_product_attention(q, k, v, mask=_mask(seg), scale=SCALE, is_causal=True)
    np.testing.assert_allclose(out, blockwise, atol=1e-5, rtol=1e-5)
    np.testing.assert_allclose(out, xla, atol=1e-5, rtol=1e-5)
    np.testing.assert_allclose(lse, _plain_lse(q, k, seg), atol=1e-5, rtol=1e-5)
    np.testing.assert_allclose(cpu_attention.attention(q, k, v, seg, SCALE), out)


def _loss(f, seg, w):
    return lambda q, k, v: jnp.sum(f(q, k, v, seg) * w)


@pytest.mark.parametrize("T,K,layout", CASES)
def test_the_gradients_equal_the_pure_jax_path(kernel, T, K, layout):
    q, k, v, seg = _case(T, K=K, layout=layout)
    w = jnp.asarray(np.random.default_rng(1).normal(size=q.shape), jnp.float32)  # a random projection
    ffi = functools.partial(cpu_attention.attention, scale=SCALE)
    blockwise = lambda q, k, v, seg: layers.causal_attention(  # noqa: E731
        q, k, v, _mask(seg), layers.attention_block(T), SCALE
    )
    grads = jax.grad(_loss(ffi, seg, w), argnums=(0, 1, 2))(q, k, v)
    grads_ref = jax.grad(_loss(blockwise, seg, w), argnums=(0, 1, 2))(q, k, v)
    for name, g, r in zip("qkv", grads, grads_ref, strict=True):
        np.testing.assert_allclose(g, r, atol=5e-5, rtol=5e-5, err_msg=name)


def test_under_a_mesh_the_kernel_runs_per_shard(kernel):
    mesh = sharding.make_mesh(sharding.MeshConfig(data=2, fsdp=2, tensor=2), jax.devices()[:8])
    q, k, v, seg = _case(B=4)
    seg = jnp.concatenate([seg[:2], seg[:2][::-1]])  # rows 2, 3: padded, then packed
    rules = sharding.LOGICAL_RULES
    put = lambda x, axes: jax.device_put(x, sharding.logical_sharding(mesh, axes, rules))  # noqa: E731
    args = (put(q, ("batch", None, "heads", None)), put(k, ("batch", None, "kv_heads", None)),
            put(v, ("batch", None, "kv_heads", None)))  # fmt: skip
    seg_sharded = put(seg, ("batch", None))
    w = jnp.asarray(np.random.default_rng(1).normal(size=q.shape), jnp.float32)
    sharded = functools.partial(layers.cpu_ffi_attention, scale=SCALE, mesh=mesh)
    out = jax.jit(sharded)(*args, seg_sharded)
    assert out.sharding.spec == sharding.logical_to_spec(("batch", None, "heads", None), rules)
    np.testing.assert_allclose(out, cpu_attention.attention(q, k, v, seg, SCALE), atol=1e-6)
    grads = jax.jit(jax.grad(_loss(sharded, seg_sharded, w), argnums=(0, 1, 2)))(*args)
    single = functools.partial(cpu_attention.attention, scale=SCALE)
    grads_ref = jax.grad(_loss(single, seg, w), argnums=(0, 1, 2))(q, k, v)
    for name, g, r in zip("qkv", grads, grads_ref, strict=True):
        np.testing.assert_allclose(g, r, atol=1e-6, err_msg=name)


def _tiny(**kw):
    return dataclasses.replace(models.preset("tiny", vocab_size=64, max_len=128), num_layers=2, **kw)


def _model_loss(config, tokens, seg):
    model = models.Transformer(config)
    params = models.init_params(model, jax.random.key(0))

    def loss(p):
        logits = model.apply({"params": p}, tokens, segment_ids_BT=seg)
        return jnp.sum(jnp.where(seg[..., None] != 0, jax.nn.log_softmax(logits), 0.0)[..., :8])

    return loss, params


def test_the_model_through_the_kernel_equals_the_default_path(kernel):
    """Loss and every parameter's gradient of a packed, padded batch through a scanned two-layer stack."""
    tokens = jnp.asarray(np.random.default_rng(2).integers(1, 64, (2, 100)), jnp.int32)
    seg = _case()[3]
    loss, params = _model_loss(_tiny(attention_impl="cpu_ffi"), tokens, seg)
    assert layers.attention_kernel(_tiny(attention_impl="cpu_ffi"), "cpu", 100) == "cpu_ffi"
    base_loss, base_grads = jax.value_and_grad(_model_loss(_tiny(), tokens, seg)[0])(params)  # same init
    jaxpr = str(jax.make_jaxpr(jax.grad(loss))(params))
    assert "rlhf_jax_cpu_attention_fwd" in jaxpr and "rlhf_jax_cpu_attention_bwd" in jaxpr
    ffi_loss, ffi_grads = jax.value_and_grad(loss)(params)
    np.testing.assert_allclose(ffi_loss, base_loss, rtol=1e-5)
    for (path, g), r in zip(jax.tree_util.tree_leaves_with_path(ffi_grads), jax.tree.leaves(base_grads),
                            strict=True):  # fmt: skip
        np.testing.assert_allclose(g, r, rtol=2e-4, atol=2e-5, err_msg=jax.tree_util.keystr(path))


def test_the_sharded_model_through_the_kernel_equals_the_default_path(kernel):
    """The model on a data x fsdp x tensor mesh (the kernel per shard of rows and heads) gives the
    single-device default path's loss and gradients."""
    tokens = jnp.asarray(np.random.default_rng(3).integers(1, 64, (4, 100)), jnp.int32)
    seg = jnp.concatenate([_case()[3], _case()[3][::-1]])
    loss, params = _model_loss(_tiny(), tokens, seg)
    base_loss, base_grads = jax.value_and_grad(loss)(params)
    mesh = sharding.make_mesh(sharding.MeshConfig(data=2, fsdp=2, tensor=2), jax.devices()[:8])
    model = models.Transformer(_tiny(attention_impl="cpu_ffi"), mesh=mesh)
    p_shardings = models.param_shardings(model)
    rows = sharding.logical_sharding(mesh, ("batch", None))

    def sharded_loss(p, tokens, seg):
        logits = model.apply({"params": p}, tokens, segment_ids_BT=seg)
        return jnp.sum(jnp.where(seg[..., None] != 0, jax.nn.log_softmax(logits), 0.0)[..., :8])

    step = jax.jit(jax.value_and_grad(sharded_loss), in_shardings=(p_shardings, rows, rows))
    hlo = step.lower(params, tokens, seg).compile().as_text()
    # Per shard: one of the 4 rows (data x fsdp) and 4 of the 8 heads (tensor), K = 16.
    assert re.search(r"\(f32\[1,100,4,16\][^\n]*custom-call\([^\n]*rlhf_jax_cpu_attention_fwd", hlo)
    ffi_loss, ffi_grads = step(jax.device_put(params, p_shardings), tokens, seg)
    np.testing.assert_allclose(ffi_loss, base_loss, rtol=1e-5)
    for (path, g), r in zip(jax.tree_util.tree_leaves_with_path(ffi_grads), jax.tree.leaves(base_grads),
                            strict=True):  # fmt: skip
        np.testing.assert_allclose(g, r, rtol=2e-4, atol=2e-5, err_msg=jax.tree_util.keystr(path))


def test_without_the_library_the_model_names_the_build_command(monkeypatch):
    monkeypatch.setattr(cpu_attention, "available", lambda: False)
    tokens = jnp.ones((1, 16), jnp.int32)
    loss, params = _model_loss(_tiny(attention_impl="cpu_ffi"), tokens, jnp.ones((1, 16), jnp.int32))
    with pytest.raises(ValueError, match=r"python -m rlhf_jax\.kernels\.build"):
        loss(params)


def test_a_failed_build_names_every_compiler_tried(monkeypatch, tmp_path):
    monkeypatch.setenv("RLHF_JAX_KERNELS_CACHE", str(tmp_path))
    monkeypatch.setattr(build, "compilers", lambda: [("broken-cxx", ["/nonexistent/broken-cxx"])])
    with pytest.raises(RuntimeError, match=r"(?s)broken-cxx.*pip install -e '\.\[kernels\]'"):
        build.build()
    writes_junk = [sys.executable, "-c", "import sys; open(sys.argv[-1], 'w').write('not a library')"]
    monkeypatch.setattr(build, "compilers", lambda: [("junk-cxx", writes_junk)])
    with pytest.raises(RuntimeError, match=r"(?s)junk-cxx.*does not load"):
        build.build()
    monkeypatch.setattr(build, "compilers", lambda: [])
    with pytest.raises(RuntimeError, match="ziglang package is not installed"):
        build.build()
    assert not cpu_attention.available()  # nothing was left in the cache
