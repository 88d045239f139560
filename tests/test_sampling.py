"""The sampler: policies, EOS handling, log-probs equal to the trainer's, batch/mesh invariance, scoring.

Tolerances (float32): tokens are compared exactly. Sequence log-probs from the sampler and from the
trainer's full forward (`steps.sequence_logps`) run the same maths through different graphs (cached
attention one token at a time vs one causal pass), so each token's log-prob differs by rounding only
(~1e-6 on values of order 5); summed over <= 10 tokens the bound is 1e-4 absolute. The same bound holds
across meshes (different reduction orders). Rewards of the same rows batched differently: 1e-5.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from rlhf_jax import models, sampling, sharding
from rlhf_jax.data import pipeline, tokenizer
from rlhf_jax.data import records as rec
from rlhf_jax.train import steps

TINY = models.preset("tiny")
PAD = 0
P, T, N, NEW = 8, 8, 2, 10
LOGP_ATOL = 1e-4
POLICY = sampling.SamplingConfig(max_new_tokens=NEW, temperature=0.7, top_k=40)


def random_params(model, seed: int):
    """Scaled-normal params from numpy: a random model without compiling `init_params` (~8 s on CPU)."""
    rng = np.random.default_rng(seed)

    def one(path, leaf):
        name = jax.tree_util.keystr(path)
        if "scale" in name:
            return jnp.ones(leaf.shape, leaf.dtype)
        if "bias" in name:
            return jnp.zeros(leaf.shape, leaf.dtype)
        # Stacked layers: the fan-in follows the leading L axis; the output projection reads H x K.
        dims = leaf.shape[1:] if "layers" in name else leaf.shape
        fan_in = 1 if "embedding" in name else dims[0] * (dims[1] if "o_kernel" in name else 1)
        return jnp.asarray(rng.normal(0, fan_in**-0.5, leaf.shape), leaf.dtype)

    return jax.tree_util.tree_map_with_path(one, models.param_shapes(model))


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
        batch = sampling.completions_to_batch(*prompts, out.tokens_PNT, out.lengths_PN, pad_id=PAD)
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
        batch = sampling.completions_to_batch(*prompts, out.tokens_PNT, out.lengths_PN, pad_id=PAD)
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
    batch = sampling.completions_to_batch(*prompts, out.tokens_PNT, out.lengths_PN, pad_id=PAD)
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


def test_completions_to_batch_matches_the_pipeline_layout():
    rng = np.random.default_rng(3)
    prompt_lengths_P = np.array([1, 5, 3], np.int32)
    prompts_PT = np.where(np.arange(5) < prompt_lengths_P[:, None], rng.integers(4, 50, (3, 5)), PAD)
    lengths_PN = np.array([[4, 1], [2, 4], [3, 3]], np.int32)
    completions_PNT = np.where(np.arange(4) < lengths_PN[..., None], rng.integers(4, 50, (3, 2, 4)), PAD)
    got = sampling.completions_to_batch(
        prompts_PT, prompt_lengths_P, completions_PNT, lengths_PN, pad_id=PAD, max_len=11
    )
    data = pipeline.TokenizedSFT(
        prompt_ids=[prompts_PT[p, : prompt_lengths_P[p]] for p in range(3) for _ in range(2)],
        completion_ids=[completions_PNT[p, n, : lengths_PN[p, n]] for p in range(3) for n in range(2)],
        weights=np.ones(6, np.float32), pad_id=PAD, max_len=11,
    )  # fmt: skip
    want = data.batch(np.arange(6), 11)
    for key, value in got.items():
        np.testing.assert_array_equal(value, want[key], err_msg=key)
    with pytest.raises(ValueError, match="max_len 8"):
        sampling.completions_to_batch(
            prompts_PT, prompt_lengths_P, completions_PNT, lengths_PN, pad_id=PAD, max_len=8
        )


def test_score_pointwise_is_independent_of_chunking_and_mesh():
    rm = models.RewardModel(TINY)
    params = random_params(rm, 3)
    rng = np.random.default_rng(4)
    lengths_P = np.array([3, 1, 2, 3, 2], np.int32)
    completions_PT = rng.integers(4, TINY.vocab_size, (5, 4)).astype(np.int32)
    batch = sampling.completions_to_batch(
        rng.integers(4, TINY.vocab_size, (5, 3)),
        lengths_P,
        completions_PT,
        np.array([4, 2, 1, 3, 4]),
        pad_id=PAD,
    )
    chunked_B = sampling.score_pointwise(rm, params, batch, batch_size=2)  # chunks of 2, 2 and 1 (padded)
    mesh_rm = models.RewardModel(TINY, mesh=sharding.make_mesh(sharding.MeshConfig(data=8)))
    whole_B = sampling.score_pointwise(mesh_rm, params, batch, batch_size=8)  # one chunk, 3 dummy rows
    assert chunked_B.shape == whole_B.shape == (5,) and np.unique(chunked_B).size == 5
    np.testing.assert_allclose(chunked_B, whole_B, atol=1e-5)


def test_score_pairwise_scores_hand_built_ranking_rows():
    """Each score is the ranking model applied alone (no padding, no batch) to the row built by hand:
    BOS prompt, "\n\nResponse A:" y, "\n\nResponse B:" y_b, "\n\nWhich response is better?", EOS,
    each response cut to its share of the layout; swapping y and y_b scores the swapped rows."""
    tok = tokenizer.train_tokenizer(
        [f"post {i}: my cat ate the food. Response A: B: Which response is better?" for i in range(40)],
        vocab_size=300,
    )
    rm = models.RewardModel(models.preset("tiny", vocab_size=tok.vocab_size))
    params = random_params(rm, 5)
    layout = pipeline.RankingLayout.for_tokenizer(tok, max_prompt_len=16, max_response_len=6)
    prompts = ["my cat", "the food", "post 3: my cat ate"]
    ys = [" ate it", " is cold" * 20, " slept"]  # the second is cut
    baselines = [" slept", " is warm", " ate the food and the cat ate the food" * 3]  # the third is cut
    before, middle, question = (tok.encode(t) for t in ("\n\nResponse A:", "\n\nResponse B:",
                                                        "\n\nWhich response is better?"))  # fmt: skip
    template = len(before) + len(middle) + len(question)
    max_len = 16 + 2 * 6 + template + 1
    assert layout.max_len == max_len

    def row(prompt, a, b):
        p_ids = [tok.bos_id, *tok.encode(prompt)]
        budget = (max_len - 1 - template - len(p_ids)) // 2
        return [
            *p_ids,
            *before,
            *tok.encode(a)[:budget],
            *middle,
            *tok.encode(b)[:budget],
            *question,
            tok.eos_id,
        ]

    apply = jax.jit(rm.apply)
    for a, b in ((ys, baselines), (baselines, ys)):
        want = [
            float(apply({"params": params}, jnp.array([row(*r)]))[0]) for r in zip(prompts, a, b, strict=True)
        ]
        cut = rec.LoadStats()
        got = sampling.score_pairwise(rm, params, tok, prompts, a, b, layout=layout, batch_size=2, stats=cut)
        assert got.shape == (3,) and got.dtype == np.float32
        np.testing.assert_allclose(got, want, atol=1e-5)
        assert cut.truncated["ranking_response"] == 2  # rows 1 and 2 lose the end of a response
