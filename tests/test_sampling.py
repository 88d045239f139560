"""The sampler: policies, EOS handling, log-probs equal to the trainer's, batch/mesh invariance.

Tolerances (float32): tokens are compared exactly. Sequence log-probs from the sampler and from the
trainer's full forward (`steps.sequence_logps`) run the same maths through different graphs (cached
attention one token at a time vs one causal pass), so each token's log-prob differs by rounding only
(~1e-6 on values of order 5); summed over <= 10 tokens the bound is 1e-4 absolute. The same bound holds
across meshes (different reduction orders). Scoring is tested in tests/test_scoring.py.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from random_params import random_params

from rlhf_jax import models, sampling, scoring, sharding
from rlhf_jax.train import steps

TINY = models.preset("tiny")
PAD = 0
P, T, N, NEW = 8, 8, 2, 10
LOGP_ATOL = 1e-4
POLICY = sampling.SamplingConfig(max_new_tokens=NEW, temperature=0.7, top_k=40)


@pytest.fixture(scope="module")
def lm():
    model = models.Transformer(TINY)
    return model, random_params(model, 0)


@pytest.fixture(scope="module")
def prompts():
    rng = np.random.default_rng(0)
    lengths_P = rng.integers(1, T + 1, P).astype(np.int32)
    tokens_PT = np.where(np.arange(T) < lengths_P[:, None], rng.integers(4, TINY.vocab_size, (P, T)), PAD)
    return tokens_PT.astype(np.int32), lengths_P


@pytest.fixture(scope="module")
def eos_run(lm, prompts):
    """Samples without EOS, then with the most frequent sampled token as EOS (so many rows stop early)."""
    model, params = lm
    kwargs = dict(config=POLICY, num_samples=N, rng=jax.random.key(1), pad_id=PAD)
    free = sampling.sample(model, params, *prompts, eos_id=None, **kwargs)
    eos = int(np.bincount(free.tokens_PNT.ravel()).argmax())
    return free, eos, sampling.sample(model, params, *prompts, eos_id=eos, **kwargs)


# ------------------------------------------------------------------------------------------ policies


def test_config_validation():
    for bad in (dict(temperature=0.0), dict(top_k=-1), dict(top_p=0.0), dict(top_p=1.5)):
        with pytest.raises(ValueError):
            sampling.SamplingConfig(max_new_tokens=4, **bad)
    with pytest.raises(ValueError):
        sampling.SamplingConfig(max_new_tokens=0)


def draw(policy, logits_BV, keys_B):
    return jax.jit(policy.next_token)(logits_BV, keys_B)


def test_next_token_support_and_logps():
    """Greedy = argmax; draws stay in the top-k / nucleus; logps are the untempered log-softmax."""
    logits_V = jax.random.normal(jax.random.key(0), (16,)) * 2
    order_V = np.argsort(-np.asarray(logits_V))
    keys_B = jax.random.split(jax.random.key(1), 500)
    logits_BV = jnp.broadcast_to(logits_V, (500, 16))
    model_logps_V = jax.nn.log_softmax(logits_V)

    tokens_B, logps_B, sampling_B = draw(sampling.SamplingConfig(4, greedy=True), logits_BV, keys_B)
    assert (np.asarray(tokens_B) == order_V[0]).all() and (np.asarray(sampling_B) == 0).all()
    np.testing.assert_allclose(logps_B, model_logps_V[order_V[0]], rtol=1e-6)
    tokens_B, _, sampling_B = draw(sampling.SamplingConfig(4, top_k=1), logits_BV, keys_B)
    assert (np.asarray(tokens_B) == order_V[0]).all() and np.allclose(sampling_B, 0)

    policy = sampling.SamplingConfig(4, temperature=0.7, top_k=3)
    tokens_B, logps_B, sampling_B = draw(policy, logits_BV, keys_B)
    assert set(np.asarray(tokens_B)) == set(order_V[:3])
    np.testing.assert_allclose(logps_B, model_logps_V[tokens_B], rtol=1e-6)
    top3_V = jnp.where(jnp.isin(jnp.arange(16), order_V[:3]), logits_V / 0.7, -jnp.inf)
    np.testing.assert_allclose(sampling_B, jax.nn.log_softmax(top3_V)[tokens_B], rtol=1e-5)

    probs_V = np.asarray(jax.nn.softmax(logits_V))[order_V]
    nucleus = order_V[: int(np.searchsorted(np.cumsum(probs_V), 0.8)) + 1]
    # Row b's draw depends only on its key and logits, not on its row or the other rows.
    perm_B = np.random.default_rng(0).permutation(500)
    np.testing.assert_array_equal(draw(policy, logits_BV[perm_B], keys_B[perm_B])[0], tokens_B[perm_B])

    tokens_B, _, _ = draw(sampling.SamplingConfig(4, top_p=0.8), logits_BV, keys_B)
    assert set(np.asarray(tokens_B)) == set(nucleus)


@pytest.mark.parametrize("V,k", [(8192, 40), (8193, 40), (1000, 7), (300, 1), (64, 8), (128, 128)])
def test_top_k_equals_lax_top_k(V, k):
    """Same values and indices as `jax.lax.top_k` (ties to the lower index), chunked or direct path,
    on plain, heavily tied and mostly -inf rows, with V not a multiple of the chunk."""
    rng = np.random.default_rng(V + k)
    x_BV = rng.normal(size=(3, 6, V)).astype(np.float32)
    x_BV[1] = np.round(x_BV[1] * 2) / 2  # few distinct values: many ties at the k-th
    x_BV[2, :, rng.random(V) < 0.8] = -np.inf  # mostly masked vocabulary
    fn = jax.jit(lambda x: sampling.top_k(x, k))
    for x in x_BV:
        values, indices = fn(x)
        expected_values, expected_indices = jax.lax.top_k(x, k)
        np.testing.assert_array_equal(indices, expected_indices)
        np.testing.assert_array_equal(values, expected_values)
        assert indices.dtype == expected_indices.dtype


def test_next_token_frequencies_match_tempered_top_k():
    """20k draws from softmax(top-4 logits / 0.7): total variation < 0.02 (its sampling noise ~0.004)."""
    logits_V = jnp.array([2.0, 1.5, 1.0, 0.5, 0.3, 0.0, -1.0, -2.0])
    keys_B = jax.random.split(jax.random.key(2), 20_000)
    policy = sampling.SamplingConfig(4, temperature=0.7, top_k=4)
    tokens_B, _, _ = draw(policy, jnp.broadcast_to(logits_V, (20_000, 8)), keys_B)
    freq_V = np.bincount(np.asarray(tokens_B), minlength=8) / 20_000
    expected_V = np.asarray(jax.nn.softmax(jnp.where(jnp.arange(8) < 4, logits_V / 0.7, -jnp.inf)))
    assert 0.5 * np.abs(freq_V - expected_V).sum() < 0.02


# ------------------------------------------------------------------------------------------ sampling


def test_eos_stopping_and_layout(eos_run):
    free, eos, out = eos_run
    assert free.tokens_PNT.shape == (P, N, NEW) and (free.lengths_PN == NEW).all()
    assert not free.finished_PN.any()
    assert out.finished_PN.any() and not out.finished_PN.all()
    for p, n in np.ndindex(P, N):
        row, length = out.tokens_PNT[p, n], out.lengths_PN[p, n]
        hits = np.flatnonzero(row == eos)
        assert out.finished_PN[p, n] == (len(hits) > 0)
        assert length == (hits[0] + 1 if len(hits) else NEW)
        assert (row[length:] == PAD).all()
    # Until the first EOS, a row is the same draw as without EOS stopping.
    first_p, first_n = np.argwhere(out.finished_PN)[0]
    length = out.lengths_PN[first_p, first_n]
    np.testing.assert_array_equal(
        out.tokens_PNT[first_p, first_n, :length], free.tokens_PNT[first_p, first_n, :length]
    )


def test_logps_equal_trainer_logps(lm, prompts, eos_run):
    model, params = lm
    for out in eos_run[::2]:
        batch = scoring.completions_to_batch(*prompts, out.tokens_PNT, out.lengths_PN, pad_id=PAD)
        trainer_B = jax.jit(steps.sequence_logps, static_argnums=0)(
            model, params, batch["tokens"], batch["targets"], batch["loss_mask"], batch["segment_ids"]
        )
        np.testing.assert_allclose(out.logps_PN.reshape(-1), trainer_B, atol=LOGP_ATOL)


def test_sampling_logps_are_the_tempered_top_k_logps(lm, prompts, eos_run):
    """`sampling_logps` is log q(y | x) of the distribution sampled from: at every completion token
    (EOS included, nothing after it), log softmax(logits / T) over the top k of the full forward's
    logits, at the sampled token, summed. Holds for any seed (RSO's proposal correction relies on it)."""
    model, params = lm
    for out in eos_run[::2]:
        batch = scoring.completions_to_batch(*prompts, out.tokens_PNT, out.lengths_PN, pad_id=PAD)
        logits_BTV = jax.jit(model.apply)(
            {"params": params}, batch["tokens"], segment_ids_BT=batch["segment_ids"]
        )
        scaled_BTV = np.asarray(logits_BTV, np.float64) / POLICY.temperature
        kth_BT1 = np.sort(scaled_BTV, axis=-1)[..., -POLICY.top_k][..., None]
        kept_BTV = np.where(scaled_BTV >= kth_BT1, scaled_BTV, -np.inf)
        max_BT1 = kept_BTV.max(-1, keepdims=True)
        log_q_BTV = kept_BTV - max_BT1 - np.log(np.exp(kept_BTV - max_BT1).sum(-1, keepdims=True))
        log_q_BT = np.take_along_axis(log_q_BTV, batch["targets"][..., None], axis=-1)[..., 0]
        want_B = np.where(batch["loss_mask"] > 0, log_q_BT, 0.0).sum(-1)
        np.testing.assert_allclose(out.sampling_logps_PN.reshape(-1), want_B, atol=LOGP_ATOL)


def test_entropy_is_the_tempered_untruncated_entropy_and_leaves_samples_alone(lm, prompts, eos_run):
    """`SamplingConfig(entropy=True)` sums, per sample, the entropy of softmax(logits / T) over the
    whole vocabulary (not the top k sampled from) at every completion position, EOS included and nothing
    after it: NumPy from the full forward's logits in float64. The samples are the same with it on, and
    it is zeros with it off."""
    model, params = lm
    _, eos, reference = eos_run
    assert not reference.entropy_PN.any()  # off by default
    policy = sampling.SamplingConfig(max_new_tokens=NEW, temperature=0.7, top_k=40, entropy=True)
    out = sampling.sample(
        model, params, *prompts, config=policy, num_samples=N, rng=jax.random.key(1), pad_id=PAD, eos_id=eos
    )
    np.testing.assert_array_equal(out.tokens_PNT, reference.tokens_PNT)
    np.testing.assert_array_equal(out.logps_PN, reference.logps_PN)
    assert (out.lengths_PN < NEW).any() and (out.lengths_PN == NEW).any()  # EOS masks some rows
    batch = scoring.completions_to_batch(*prompts, out.tokens_PNT, out.lengths_PN, pad_id=PAD)
    logits_BTV = jax.jit(model.apply)(
        {"params": params}, batch["tokens"], segment_ids_BT=batch["segment_ids"]
    )
    z_BTV = np.asarray(logits_BTV, np.float64) / policy.temperature
    log_p_BTV = z_BTV - z_BTV.max(-1, keepdims=True)
    log_p_BTV -= np.log(np.exp(log_p_BTV).sum(-1, keepdims=True))
    h_BT = -(np.exp(log_p_BTV) * log_p_BTV).sum(-1)
    want_B = np.where(batch["loss_mask"] > 0, h_BT, 0.0).sum(-1)
    np.testing.assert_allclose(out.entropy_PN.reshape(-1), want_B, rtol=1e-5, atol=LOGP_ATOL)
    # The trainer's fused head computes the same per-token entropies.
    _, h_train_BT = jax.jit(
        lambda p, b: steps.completion_logps(model, p, b, temperature=0.7, return_entropy=True)
    )(params, batch)
    np.testing.assert_allclose(out.entropy_PN.reshape(-1), np.asarray(h_train_BT).sum(-1), atol=LOGP_ATOL)


def test_samples_do_not_depend_on_batching_or_mesh(lm, prompts, eos_run):
    """A prompt's samples are the same in any batch, at any row, on any mesh."""
    model, params = lm
    _, eos, reference = eos_run
    tokens_PT, lengths_P = prompts
    kwargs = dict(config=POLICY, num_samples=N, rng=jax.random.key(1), eos_id=eos, pad_id=PAD)

    # Prompts {7, 6, 5} (padded to 4 rows) and {1, 0, 3, 2}, on a mesh that splits batch, heads and vocab.
    mesh_model = models.Transformer(
        TINY, mesh=sharding.make_mesh(sharding.MeshConfig(data=1, fsdp=2, tensor=4))
    )
    mesh_params = jax.device_put(params, models.param_shardings(mesh_model))
    for ids in ([7, 6, 5], [1, 0, 3, 2]):
        got = sampling.sample(
            mesh_model, mesh_params, tokens_PT[ids], lengths_P[ids], prompt_ids=ids, **kwargs
        )
        np.testing.assert_array_equal(got.tokens_PNT, reference.tokens_PNT[ids])
        np.testing.assert_allclose(got.logps_PN, reference.logps_PN[ids], atol=LOGP_ATOL)
    # All prompts permuted, one device.
    perm = np.random.default_rng(1).permutation(P)
    got = sampling.sample(model, params, tokens_PT[perm], lengths_P[perm], prompt_ids=perm, **kwargs)
    np.testing.assert_array_equal(got.tokens_PNT, reference.tokens_PNT[perm])
    np.testing.assert_array_equal(got.lengths_PN, reference.lengths_PN[perm])
    np.testing.assert_allclose(got.logps_PN, reference.logps_PN[perm], atol=LOGP_ATOL)
    assert not np.array_equal(reference.tokens_PNT[:, 0], reference.tokens_PNT[:, 1])  # samples differ


def test_greedy_follows_the_full_forward_argmax(lm, prompts):
    model, params = lm
    out = sampling.sample(
        model, params, *prompts, config=sampling.SamplingConfig(NEW, greedy=True), num_samples=N,
        rng=jax.random.key(0), eos_id=None, pad_id=PAD,
    )  # fmt: skip
    np.testing.assert_array_equal(out.tokens_PNT[:, 0], out.tokens_PNT[:, 1])
    batch = scoring.completions_to_batch(*prompts, out.tokens_PNT, out.lengths_PN, pad_id=PAD)
    logits_BTV = jax.jit(model.apply)(
        {"params": params}, batch["tokens"], segment_ids_BT=batch["segment_ids"]
    )
    mask_BT = batch["loss_mask"] > 0
    np.testing.assert_array_equal(np.argmax(logits_BTV, -1)[mask_BT], batch["targets"][mask_BT])


def test_decode_loop_stops_when_every_row_is_done(lm):
    """The while loop runs no step once every row is done, and runs to the end while one is not."""
    model, params = lm
    unrolled, unrolled_params = sampling._unrolled(model, params)
    cache = models.init_cache(unrolled.config, 2, max_len=NEW + 1)._replace(
        lengths_B=jnp.ones((2,), jnp.int32)
    )
    state = sampling.init_state(jax.random.split(jax.random.key(0), 2), cache, NEW, PAD)
    state = state._replace(step=jnp.ones((), jnp.int32), lengths_B=jnp.ones((2,), jnp.int32))
    decode = jax.jit(
        lambda s: sampling.decode(unrolled, unrolled_params, s, config=POLICY, eos_id=-1, pad_id=PAD)
    )
    assert int(decode(state._replace(done_B=jnp.array([True, True]))).step) == 1
    final = decode(state._replace(done_B=jnp.array([True, False])))
    assert int(final.step) == NEW
    np.testing.assert_array_equal(final.lengths_B, [1, NEW])
    assert (final.tokens_BT[0] == PAD).all() and (final.tokens_BT[1, 1:] != PAD).any()


def test_several_stop_ids_end_a_sample_at_the_first_of_them(lm, prompts, eos_run):
    """A tokenizer with several EOS ids (Llama 3 Instruct: `<|eot_id|>`, `<|end_of_text|>`): each row stops
    at the first drawn token that is any of them, and one id given as a list is that id."""
    model, params = lm
    free, eos, single = eos_run
    counts = np.bincount(free.tokens_PNT.ravel())
    other = int(np.argsort(counts)[-2])  # the second most frequent token
    kwargs = dict(config=POLICY, num_samples=N, rng=jax.random.key(1), pad_id=PAD)  # eos_run's key
    both = sampling.sample(model, params, *prompts, eos_id=[eos, other], **kwargs)
    for p, n in np.ndindex(P, N):
        row = free.tokens_PNT[p, n]
        hits = np.flatnonzero((row == eos) | (row == other))
        want = hits[0] + 1 if len(hits) else NEW
        assert both.lengths_PN[p, n] == want and both.finished_PN[p, n] == (len(hits) > 0)
        np.testing.assert_array_equal(both.tokens_PNT[p, n, :want], row[:want])
    assert (both.lengths_PN <= single.lengths_PN).all() and (both.lengths_PN < single.lengths_PN).any()
    as_list = sampling.sample(model, params, *prompts, eos_id=[eos], **kwargs)
    np.testing.assert_array_equal(as_list.tokens_PNT, single.tokens_PNT)


@pytest.mark.parametrize("family", ["llama", "windowed_softcapped"])
def test_a_shared_prompt_cache_samples_what_repeated_caches_sample(prompts, family):
    """G samples of a prompt reading one shared prefix (the default) give the samples of the layout
    that repeats the prompt's cache for every sample: the same tokens and lengths for the same keys, the
    same log-probs up to float32 rounding; also with sliding windows narrower than prompt + completion
    (the window reaches back into the shared prefix) and soft-capped scores, on a mesh."""
    import dataclasses

    config = TINY
    if family == "windowed_softcapped":
        config = dataclasses.replace(
            TINY, sliding_window=5, layer_types=("sliding_attention", "full_attention"), attn_softcap=3.0,
            final_softcap=20.0,
        )  # fmt: skip
    mesh = sharding.make_mesh(sharding.MeshConfig(data=2, fsdp=1, tensor=2), jax.devices()[:4])
    for model in (models.Transformer(config), models.Transformer(config, mesh=mesh)):
        params = random_params(models.Transformer(config), 3)
        if model.mesh is not None:
            params = jax.device_put(params, models.param_shardings(model))
        kw = dict(config=POLICY, num_samples=4, rng=jax.random.key(5), eos_id=None, pad_id=PAD)
        shared = sampling.sample(model, params, *prompts, **kw)
        repeated = sampling.sample(model, params, *prompts, shared_prefix=False, **kw)
        np.testing.assert_array_equal(shared.tokens_PNT, repeated.tokens_PNT)
        np.testing.assert_array_equal(shared.lengths_PN, repeated.lengths_PN)
        np.testing.assert_allclose(shared.logps_PN, repeated.logps_PN, atol=1e-4)
        np.testing.assert_allclose(shared.sampling_logps_PN, repeated.sampling_logps_PN, atol=1e-4)
        assert not np.array_equal(shared.tokens_PNT[:, 0], shared.tokens_PNT[:, 1])  # samples differ


def test_share_prefix_builds_groups_over_the_prefix_rows():
    config = TINY
    prefix = models.init_cache(config, 3, 5)._replace(lengths_B=jnp.array([2, 5, 1], jnp.int32))
    cache = models.share_prefix(prefix, 6, 7, config)
    assert cache.prefix_lengths_P.tolist() == [2, 5, 1] and cache.lengths_B.tolist() == [0] * 6
    assert jax.tree.leaves(cache.k)[0].shape[-2] == 7 and jax.tree.leaves(cache.k)[0].shape[-4] == 6
    assert cache.prefix_k is prefix.k
    with pytest.raises(ValueError, match="7 rows do not split into groups over 3 prefix rows"):
        models.share_prefix(prefix, 7, 7, config)


# ------------------------------------------------------------------------------- prefix continuation


def test_continue_prefix_with_an_empty_prefix_draws_the_same_samples(lm, prompts):
    model, params = lm
    kwargs = dict(config=POLICY, num_samples=N, rng=jax.random.key(1), pad_id=PAD, eos_id=None)
    plain = sampling.sample(model, params, *prompts, **kwargs)
    empty = np.zeros((P, 3), np.int32)
    cont = sampling.continue_prefix(model, params, *prompts, empty, np.zeros(P, np.int32), **kwargs)
    # Tokens exactly; log-probs to rounding (the joined prompt is wider, so another compiled shape).
    for name in ("tokens_PNT", "lengths_PN", "finished_PN"):
        np.testing.assert_array_equal(getattr(plain, name), getattr(cont, name))
    np.testing.assert_allclose(plain.logps_PN, cont.logps_PN, atol=LOGP_ATOL)


def test_greedy_continuation_of_a_greedy_prefix_is_its_rest(lm, prompts):
    """Greedy decoding of prompt + the first k greedy tokens gives the remaining greedy tokens."""
    model, params = lm
    kwargs = dict(num_samples=1, rng=jax.random.key(0), pad_id=PAD, eos_id=None)
    full = sampling.sample(
        model, params, *prompts, config=sampling.SamplingConfig(NEW, greedy=True), **kwargs
    )
    k_P = np.array([0, 1, 2, 3, 4, 5, 6, 7]) % NEW
    rest = sampling.continue_prefix(
        model, params, *prompts, full.tokens_PNT[:, 0], k_P, config=sampling.SamplingConfig(NEW, greedy=True),
        **kwargs,
    )  # fmt: skip
    for p in range(P):
        np.testing.assert_array_equal(rest.tokens_PNT[p, 0, : NEW - k_P[p]], full.tokens_PNT[p, 0, k_P[p] :])
    joined, lengths = sampling.with_prefix(*prompts, full.tokens_PNT[:, 0], k_P)
    np.testing.assert_array_equal(lengths, prompts[1] + k_P)
    np.testing.assert_array_equal(joined[1, : prompts[1][1]], prompts[0][1, : prompts[1][1]])


def test_stop_at_first():
    tokens = np.array([[[5, 9, 3, 9, 0], [4, 4, 4, 0, 0]]])
    lengths = np.array([[4, 3]])
    np.testing.assert_array_equal(sampling.stop_at_first(tokens, lengths, [9]), [[2, 3]])
    np.testing.assert_array_equal(sampling.stop_at_first(tokens, np.array([[1, 3]]), [9, 4]), [[1, 1]])
