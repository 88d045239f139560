"""Invariants of the transformer: causality, padding, packing, KV-cache decoding, scan, remat, counts.

Tolerances (float32 throughout): 0 where masked-out inputs must have no effect at all (the masked
attention weights are exactly 0, so the outputs are bit-identical); 1e-5 absolute on logits of order 1
where the same maths runs with different shapes (XLA may pick different reduction orders for a length-8
and a length-12 sequence, or for a cache of 16 slots); 1e-6 relative where the graph is the same up to
scheduling (scan vs unrolled, remat vs none).
"""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from rlhf_jax import models
from rlhf_jax.models import transformer

TINY = models.preset("tiny")
SHAPE_ATOL = 1e-5


@pytest.fixture(scope="module")
def tiny():
    model = models.Transformer(TINY)
    return model, models.init_params(model, jax.random.key(0))


def _tokens(shape, seed=0, vocab=TINY.vocab_size):
    return jnp.asarray(np.random.default_rng(seed).integers(1, vocab, size=shape), jnp.int32)


def _count(tree) -> int:
    return sum(int(np.prod(x.shape)) for x in jax.tree.leaves(tree))


# ---------------------------------------------------------------------------------------------- counts


@pytest.mark.parametrize(
    "cfg",
    [
        TINY,
        models.preset("small"),
        models.preset(
            "tiny", tie_embeddings=True, attention_bias=True, embed_scale=True, mlp_activation="gelu"
        ),
        models.preset("tiny", scan_layers=False),
    ],
    ids=["tiny", "small", "tiny_gemma_qwen_options", "tiny_unrolled"],
)
def test_param_count_matches_initialised_tree(cfg):
    assert _count(models.param_shapes(models.Transformer(cfg))) == models.param_count(cfg)
    assert _count(models.param_shapes(models.RewardModel(cfg))) == models.param_count(cfg, reward_head=True)


def test_param_count_presets():
    assert models.param_count(TINY) < 1_000_000
    assert 2e6 < models.param_count(models.preset("small")) < 10e6
    # Published sizes of the architectures the presets copy.
    assert models.param_count(models.preset("7b")) == 6_738_415_616  # Llama-2-7B
    assert models.param_count(models.preset("2b")) == 2_506_172_416  # Gemma-2B
    assert models.param_count(models.preset("1b")) == 1_100_048_384  # TinyLlama-1.1B
    assert 0.35e9 < models.param_count(models.preset("400m")) < 0.45e9
    assert 0.74e9 < models.param_count(models.preset("t5_large_equiv")) < 0.8e9
    for name in ("400m", "1b", "2b", "7b", "t5_large_equiv"):  # shapes only, never allocated
        cfg = models.preset(name)
        assert _count(models.param_shapes(models.Transformer(cfg))) == models.param_count(cfg), name


def test_config_validation():
    with pytest.raises(ValueError, match="num_heads=6 must be a multiple of num_kv_heads=4"):
        models.preset("tiny", num_heads=6)
    with pytest.raises(ValueError, match="remat"):
        models.preset("tiny", remat="some")
    with pytest.raises(ValueError, match="unknown model preset"):
        models.preset("13b")
    with pytest.raises(ValueError, match="float32 or bfloat16"):
        models.preset("tiny", dtype="float16")


# --------------------------------------------------------------------------------------- invariants


def test_causal_and_segment_masks_exact(tiny):
    """d logits[t] / d embedding[s] is exactly 0 for s > t and for s in another segment."""
    model, params = tiny
    segment_ids_BT = jnp.array([[1, 1, 1, 2, 2, 2, 2, 0]])
    x_BTD = model.apply({"params": params}, _tokens((1, 8)), method=lambda m, t: m.decoder.embed(t))

    def logits_sum_T(x_BTD):
        logits_BTV = model.apply(
            {"params": params}, x_BTD, segment_ids_BT=segment_ids_BT, method="from_embeddings"
        )
        return logits_BTV[0].sum(-1)

    jac_TSD = jax.jit(jax.jacrev(logits_sum_T))(x_BTD)[:, 0]
    depends_TS = np.asarray(jnp.any(jac_TSD != 0, axis=-1))
    seg = np.asarray(segment_ids_BT[0])
    t, s = np.arange(8)[:, None], np.arange(8)[None, :]
    np.testing.assert_array_equal(depends_TS, (s <= t) & (seg[:, None] == seg[None, :]))


def test_padding_invariance(tiny):
    model, params = tiny
    apply = jax.jit(model.apply)
    tokens_BT = _tokens((2, 12))
    segment_ids_BT = jnp.array([[1] * 9 + [0] * 3, [1] * 12])
    logits_BTV = apply({"params": params}, tokens_BT, segment_ids_BT=segment_ids_BT)
    # Other tokens in the padding: bit-identical logits at real positions.
    other_BT = jnp.where(segment_ids_BT == 0, 7, tokens_BT)
    logits2_BTV = apply({"params": params}, other_BT, segment_ids_BT=segment_ids_BT)
    np.testing.assert_array_equal(logits_BTV[0, :9], logits2_BTV[0, :9])
    np.testing.assert_array_equal(logits_BTV[1], logits2_BTV[1])
    # Same as the unpadded sequence alone, and as the same sequence left-padded.
    alone_1TV = apply({"params": params}, tokens_BT[:1, :9])
    np.testing.assert_allclose(logits_BTV[0, :9], alone_1TV[0], atol=SHAPE_ATOL)
    left_1T = jnp.concatenate([jnp.zeros((1, 3), jnp.int32), tokens_BT[:1, :9]], axis=1)
    left_seg_1T = jnp.array([[0] * 3 + [1] * 9])
    left_1TV = apply({"params": params}, left_1T, segment_ids_BT=left_seg_1T)
    np.testing.assert_allclose(left_1TV[0, 3:], alone_1TV[0], atol=SHAPE_ATOL)


def test_packed_equals_unpacked(tiny):
    model, params = tiny
    apply = jax.jit(model.apply)
    a_T, b_T = _tokens((7,), seed=1), _tokens((4,), seed=2)
    packed_1T = jnp.concatenate([a_T, b_T, jnp.zeros((1,), jnp.int32)])[None]
    segment_ids_1T = jnp.array([[1] * 7 + [2] * 4 + [0]])
    packed_1TV = apply({"params": params}, packed_1T, segment_ids_BT=segment_ids_1T)
    np.testing.assert_allclose(packed_1TV[0, :7], apply({"params": params}, a_T[None])[0], atol=SHAPE_ATOL)
    np.testing.assert_allclose(packed_1TV[0, 7:11], apply({"params": params}, b_T[None])[0], atol=SHAPE_ATOL)


def test_kv_cache_decode_equals_full_forward(tiny):
    """Right-padded prompts of different lengths, prefilled, then decoded token by token (teacher-forced)."""
    model, params = tiny
    B, T, steps = 3, 12, 5
    tokens_BT = _tokens((B, T), seed=3)
    full_BTV = jax.jit(model.apply)({"params": params}, tokens_BT)
    lengths_B = jnp.array([4, 7, 5])
    prompts_BT = jnp.where(jnp.arange(8)[None, :] < lengths_B[:, None], tokens_BT[:, :8], 0)

    cache = models.init_cache(TINY, B, max_len=16)
    logits_BV, cache = jax.jit(models.prefill, static_argnums=0)(model, params, prompts_BT, lengths_B, cache)
    rows = jnp.arange(B)
    np.testing.assert_allclose(logits_BV, full_BTV[rows, lengths_B - 1], atol=SHAPE_ATOL)
    step = jax.jit(models.decode_step, static_argnums=0)
    for i in range(steps):
        logits_BV, cache = step(model, params, tokens_BT[rows, lengths_B + i], cache)
        np.testing.assert_allclose(logits_BV, full_BTV[rows, lengths_B + i], atol=SHAPE_ATOL)
    np.testing.assert_array_equal(cache.lengths_B, lengths_B + steps)


def test_scan_equals_unrolled(tiny):
    model, params = tiny
    unrolled_cfg = dataclasses.replace(TINY, scan_layers=False)
    unrolled_params = models.unstack_layers(params, TINY.num_layers)
    assert "layers_1" in unrolled_params["decoder"]
    jax.tree.map(np.testing.assert_array_equal, models.stack_layers(unrolled_params, TINY.num_layers), params)

    tokens_BT = _tokens((2, 8))

    def loss(model, params):
        return jnp.mean(jax.nn.log_softmax(model.apply({"params": params}, tokens_BT))[..., 0])

    loss_s, grads_s = jax.jit(jax.value_and_grad(lambda p: loss(model, p)))(params)
    unrolled = models.Transformer(unrolled_cfg)
    loss_u, grads_u = jax.jit(jax.value_and_grad(lambda p: loss(unrolled, p)))(unrolled_params)
    np.testing.assert_allclose(loss_s, loss_u, rtol=1e-6)
    grads_u = models.stack_layers(grads_u, TINY.num_layers)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-7), grads_s, grads_u)


def test_remat_gives_same_gradients(tiny):
    _, params = tiny
    tokens_BT = _tokens((2, 8))

    def grads(remat):
        model = models.Transformer(dataclasses.replace(TINY, remat=remat))
        loss = lambda p: jnp.mean(jax.nn.log_softmax(model.apply({"params": p}, tokens_BT))[..., 1])
        return jax.jit(jax.grad(loss))(params)

    reference = grads("none")
    for remat in ("full", "save_dots"):
        jax.tree.map(
            lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-7), grads(remat), reference
        )


def test_bfloat16_params_and_compute_give_float32_logits(tiny):
    _, params = tiny
    cfg = dataclasses.replace(TINY, param_dtype="bfloat16", dtype="bfloat16")
    model = models.Transformer(cfg)
    params16 = jax.tree.map(lambda x: x.astype(jnp.bfloat16), params)
    tokens_BT = _tokens((2, 8))
    logits_BTV, hidden_BTD = jax.jit(lambda p: model.apply({"params": p}, tokens_BT, return_hidden=True))(
        params16
    )
    assert logits_BTV.dtype == jnp.float32 and hidden_BTD.dtype == jnp.bfloat16
    reference_BTV = jax.jit(models.Transformer(TINY).apply)({"params": params}, tokens_BT)
    np.testing.assert_allclose(logits_BTV, reference_BTV, atol=0.15)  # bf16 has 8 bits of mantissa
    shapes = models.param_shapes(model)
    assert {x.dtype for x in jax.tree.leaves(shapes)} == {jnp.dtype(jnp.bfloat16)}


# -------------------------------------------------------------------------------------- reward model


def test_reward_model_last_token_and_trunk_transplant(tiny):
    _, lm_params = tiny
    model = models.RewardModel(TINY)
    head = {"kernel": jax.random.normal(jax.random.key(1), (TINY.d_model, 1)), "bias": jnp.array([0.3])}
    params = {"decoder": lm_params["decoder"], "reward_head": head}  # a reward model initialised from the LM
    assert jax.tree.structure(params) == jax.tree.structure(models.param_shapes(model))
    tokens_BT = _tokens((2, 9))
    rewards_B = jax.jit(model.apply)({"params": params}, tokens_BT, jnp.ones_like(tokens_BT))
    assert rewards_B.shape == (2,) and rewards_B.dtype == jnp.float32

    # The same as a linear head on the LM trunk's last hidden state.
    lm = models.Transformer(TINY)
    _, hidden_BTD = jax.jit(lambda p: lm.apply({"params": p}, tokens_BT, return_hidden=True))(lm_params)
    np.testing.assert_allclose(
        rewards_B, hidden_BTD[:, -1] @ head["kernel"][:, 0] + head["bias"][0], atol=1e-5
    )

    # Right- and left-padding (rows 0-1 and 2-3 of one batch) give each row's reward.
    pad_BT, ones_BT = jnp.zeros((2, 3), jnp.int32), jnp.ones_like(tokens_BT)
    padded_BT = jnp.concatenate(
        [jnp.concatenate([tokens_BT, pad_BT], 1), jnp.concatenate([pad_BT, tokens_BT], 1)]
    )
    segment_ids_BT = jnp.concatenate(
        [jnp.concatenate([ones_BT, pad_BT], 1), jnp.concatenate([pad_BT, ones_BT], 1)]
    )
    padded_B = jax.jit(model.apply)({"params": params}, padded_BT, segment_ids_BT)
    np.testing.assert_allclose(padded_B, jnp.tile(rewards_B, 2), atol=SHAPE_ATOL)


def test_positions_and_last_index_helpers():
    segment_ids_BT = jnp.array([[0, 0, 1, 1, 1], [1, 1, 2, 2, 0]])
    np.testing.assert_array_equal(
        transformer.positions_from_segments(segment_ids_BT), [[0, 1, 0, 1, 2], [0, 1, 0, 1, 0]]
    )
    np.testing.assert_array_equal(transformer.last_token_index(segment_ids_BT), [4, 3])


@pytest.mark.parametrize("block", [8, 16, 32])
def test_blocked_causal_attention_equals_dot_product_attention(block):
    """Values and gradients of `causal_attention` (heads-major blocks, recomputing backward) against
    `jax.nn.dot_product_attention` with a causal and a segment mask, for grouped-query heads."""
    from rlhf_jax.models import layers

    B, T, H, G, K = 2, 32, 4, 2, 8
    kq, kk, kv, kd = jax.random.split(jax.random.key(0), 4)
    q = jax.random.normal(kq, (B, T, H, K))
    k = jax.random.normal(kk, (B, T, G, K))
    v = jax.random.normal(kv, (B, T, G, K))
    d_out = jax.random.normal(kd, (B, T, H, K))
    segments_BT = jnp.array([[1] * 20 + [2] * 12, [1] * 32])
    mask_B1TS = (segments_BT[:, :, None] == segments_BT[:, None, :])[:, None]

    def ours(q, k, v):
        return jnp.sum(layers.causal_attention(q, k, v, mask_B1TS, block) * d_out)

    def reference(q, k, v):
        out = jax.nn.dot_product_attention(q, k, v, mask=mask_B1TS, is_causal=True, implementation="xla")
        return jnp.sum(out * d_out)

    np.testing.assert_allclose(
        layers.causal_attention(q, k, v, mask_B1TS, block),
        jax.nn.dot_product_attention(q, k, v, mask=mask_B1TS, is_causal=True, implementation="xla"),
        atol=1e-5,
    )
    for g_ours, g_ref in zip(
        jax.grad(ours, argnums=(0, 1, 2))(q, k, v),
        jax.grad(reference, argnums=(0, 1, 2))(q, k, v),
        strict=True,
    ):
        np.testing.assert_allclose(g_ours, g_ref, atol=1e-4)
    # Without a segment mask too (the unpacked training path).
    np.testing.assert_allclose(
        layers.causal_attention(q, k, v, None, block),
        jax.nn.dot_product_attention(q, k, v, is_causal=True, implementation="xla"),
        atol=1e-5,
    )


@pytest.mark.parametrize("Q,T", [(1, 1), (2, 1), (1, 3)])
def test_weighted_values_equal_the_einsum(Q, T):
    """`layers._weighted_values` (a multiply-and-sum when Q·T = 1, a decode step without grouped
    heads) against the einsum it replaces and a NumPy loop."""
    from rlhf_jax.models import layers

    rng = np.random.default_rng(0)
    B, G, S, K = 3, 2, 7, 5
    probs = rng.random((B, G, Q, T, S)).astype(np.float32)
    v = rng.normal(size=(B, G, S, K)).astype(np.float32)
    out = np.asarray(layers._weighted_values(jnp.asarray(probs), jnp.asarray(v)))
    assert out.shape == (B, T, G, Q, K)
    expect = np.zeros((B, T, G, Q, K), np.float64)
    for b, t, g, q, s in np.ndindex(B, T, G, Q, S):
        expect[b, t, g, q] += probs[b, g, q, t, s] * v[b, g, s]
    np.testing.assert_allclose(out, expect, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(out, jnp.einsum("BGQTS,BGSK->BTGQK", probs, v), rtol=1e-5, atol=1e-6)
