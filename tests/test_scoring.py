"""Scoring: the padded-chunk runner, samples as training rows, rewards, ranking logits, log-probs.

Tolerances (float32): the runner's own tests use exact arithmetic and compare exactly. A model's score of
the same row in a different chunk or on a different mesh differs by reduction order only: 1e-5.
"""

import logging

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from random_params import random_params

from rlhf_jax import models, sampling, scoring, sharding
from rlhf_jax.data import pipeline, tokenizer
from rlhf_jax.data import records as rec
from rlhf_jax.train import steps

TINY = models.preset("tiny")
PAD = 0


@pytest.fixture(scope="module")
def mesh8():
    return sharding.make_mesh(sharding.MeshConfig(data=8))


# ------------------------------------------------------------------------------------------ the runner


def row_fn(chunk):
    """A row-wise function with two outputs per call, one of them with 2 rows per input row (exact in
    float32: small integers)."""
    x_BD, y_B = chunk["x"], chunk["y"]
    sums_B = jnp.sum(x_BD, axis=-1) + y_B
    return sums_B, jnp.repeat(y_B * 2, 2, axis=0)


def rows13():
    rng = np.random.default_rng(0)
    return {"x": rng.integers(-9, 9, (13, 3)).astype(np.float32), "y": np.arange(13, dtype=np.int32)}


def test_map_chunks_of_a_ragged_row_count_on_8_devices_equal_one_unchunked_call(mesh8):
    """13 rows in chunks of 5 (rounded up to 8 rows, the batch shards): 8 + 5 padded; the outputs for
    every row equal one call on all 13 rows, including an output with 2 rows per input row."""
    rows = rows13()
    want_sums, want_pairs = jax.device_get(jax.jit(row_fn)(rows))
    np.testing.assert_array_equal(want_sums, rows["x"].sum(-1) + np.arange(13))  # hand check of row_fn
    sums, pairs = scoring.map_chunks(jax.jit(row_fn), rows, batch_size=5, mesh=mesh8)
    assert sums.shape == (13,) and pairs.shape == (26,) and pairs.dtype == np.int32
    np.testing.assert_array_equal(sums, want_sums)
    np.testing.assert_array_equal(pairs, want_pairs)
    # Without a mesh, chunks of 4: 4 + 4 + 4 + 1 padded.
    sums, pairs = scoring.map_chunks(jax.jit(row_fn), rows, batch_size=4)
    np.testing.assert_array_equal(sums, want_sums)
    np.testing.assert_array_equal(pairs, want_pairs)


def test_map_chunks_pads_each_chunk_to_one_shape_as_asked(mesh8):
    rows = rows13()
    seen = []

    def record(chunk):
        chunk = jax.device_get(chunk)
        seen.append(chunk)
        return chunk["y"]

    np.testing.assert_array_equal(scoring.map_chunks(record, rows, batch_size=6, mesh=mesh8), rows["y"])
    assert [c["y"].tolist() for c in seen] == [list(range(8)), [8, 9, 10, 11, 12, 8, 8, 8]]  # first row
    np.testing.assert_array_equal(seen[1]["x"][5:], np.repeat(rows["x"][8:9], 3, axis=0))
    seen.clear()
    scoring.map_chunks(record, rows, batch_size=10, fill=0)
    assert seen[1]["y"].tolist() == [10, 11, 12] + [0] * 7 and (seen[1]["x"][3:] == 0).all()
    seen.clear()
    scoring.map_chunks(record, rows, batch_size=10, fill={"x": 0.5, "y": -3})
    assert seen[1]["y"].tolist() == [10, 11, 12] + [-3] * 7 and (seen[1]["x"][3:] == 0.5).all()


def test_map_chunks_builds_rows_by_id_with_minus_one_for_padding(mesh8):
    rows = rows13()
    asked = []

    def build(ids):
        asked.append(ids.tolist())
        safe = np.maximum(ids, 0)
        return {
            "x": np.where(ids[:, None] >= 0, rows["x"][safe], 0),
            "y": np.where(ids >= 0, rows["y"][safe], 0),
        }

    sums, pairs = scoring.map_chunks(jax.jit(row_fn), build, num_rows=13, batch_size=8, mesh=mesh8)
    assert asked == [list(range(8)), [8, 9, 10, 11, 12, -1, -1, -1]]
    want_sums, want_pairs = scoring.map_chunks(jax.jit(row_fn), rows, batch_size=13)
    np.testing.assert_array_equal(sums, want_sums)
    np.testing.assert_array_equal(pairs, want_pairs)
    with pytest.raises(ValueError, match="num_rows"):
        scoring.map_chunks(row_fn, build, batch_size=8)


def test_map_chunks_edge_cases(mesh8):
    empty = {"x": np.zeros((0, 3), np.float32), "y": np.zeros((0,), np.int32)}
    sums, pairs = scoring.map_chunks(jax.jit(row_fn), empty, batch_size=4, mesh=mesh8)
    assert sums.shape == (0,) and sums.dtype == np.float32 and pairs.shape == (0,) and pairs.dtype == np.int32
    with pytest.raises(ValueError, match="3 output rows, not a multiple of the chunk.s 8"):
        scoring.map_chunks(lambda c: c["y"][:3], rows13(), batch_size=8)
    with pytest.raises(ValueError, match="one row count, got \\[12, 13\\]"):
        scoring.map_chunks(row_fn, {**rows13(), "y": np.arange(12)}, batch_size=4)
    with pytest.raises(ValueError, match="batch_size=0"):
        scoring.map_chunks(row_fn, rows13(), batch_size=0)
    assert scoring.batch_shards(None) == 1 and scoring.batch_shards(mesh8) == 8
    tp = sharding.make_mesh(sharding.MeshConfig(data=2, fsdp=2, tensor=2))
    assert scoring.batch_shards(tp) == 4  # data x fsdp


# ------------------------------------------------------------------------------------------ rows


def test_completions_to_batch_matches_the_pipeline_layout():
    rng = np.random.default_rng(3)
    prompt_lengths_P = np.array([1, 5, 3], np.int32)
    prompts_PT = np.where(np.arange(5) < prompt_lengths_P[:, None], rng.integers(4, 50, (3, 5)), PAD)
    lengths_PN = np.array([[4, 1], [2, 4], [3, 3]], np.int32)
    completions_PNT = np.where(np.arange(4) < lengths_PN[..., None], rng.integers(4, 50, (3, 2, 4)), PAD)
    got = scoring.completions_to_batch(
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
        scoring.completions_to_batch(
            prompts_PT, prompt_lengths_P, completions_PNT, lengths_PN, pad_id=PAD, max_len=8
        )


def test_old_names_in_sampling_are_scorings():
    for name in ("completions_to_batch", "ranking_batch", "score_pointwise", "score_pairwise"):
        assert getattr(sampling, name) is getattr(scoring, name) and name in sampling.__all__


def ragged_rows(seed: int, vocab: int) -> dict:
    """Five rows of prompt + completion of different lengths."""
    rng = np.random.default_rng(seed)
    return scoring.completions_to_batch(
        rng.integers(4, vocab, (5, 3)),
        np.array([3, 1, 2, 3, 2], np.int32),
        rng.integers(4, vocab, (5, 4)).astype(np.int32),
        np.array([4, 2, 1, 3, 4]),
        pad_id=PAD,
    )


def test_sequence_logps_are_the_trainers_in_any_chunking(mesh8):
    """Chunks of 2 on one device, and chunks of 3 (rounded up to 8 rows) on 8 devices, give the trainer's
    log-probs of the whole batch in one call; the empty padding rows add nothing."""
    lm = models.Transformer(TINY)
    params = random_params(lm, 1)
    batch = ragged_rows(2, TINY.vocab_size)
    keys = ("tokens", "targets", "loss_mask", "segment_ids")
    want_B = jax.jit(steps.sequence_logps, static_argnums=0)(lm, params, *(batch[k] for k in keys))
    chunked_B = scoring.sequence_logps(lm, params, batch, batch_size=2)
    mesh_lm = models.Transformer(TINY, mesh=mesh8)
    sharded_B = scoring.sequence_logps(mesh_lm, params, batch, batch_size=3)
    assert chunked_B.shape == sharded_B.shape == (5,) and (chunked_B < 0).all()
    np.testing.assert_allclose(chunked_B, want_B, atol=1e-5)
    np.testing.assert_allclose(sharded_B, want_B, atol=1e-5)


# ------------------------------------------------------------------------------------------ rewards


def test_score_pointwise_is_independent_of_chunking_and_mesh(mesh8):
    rm = models.RewardModel(TINY)
    params = random_params(rm, 3)
    batch = ragged_rows(4, TINY.vocab_size)
    chunked_B = scoring.score_pointwise(rm, params, batch, batch_size=2)  # chunks of 2, 2 and 1 (padded)
    mesh_rm = models.RewardModel(TINY, mesh=mesh8)
    whole_B = scoring.score_pointwise(mesh_rm, params, batch, batch_size=8)  # one chunk, 3 dummy rows
    assert chunked_B.shape == whole_B.shape == (5,) and np.unique(chunked_B).size == 5
    np.testing.assert_allclose(chunked_B, whole_B, atol=1e-5)


@pytest.fixture(scope="module")
def ranking():
    """A tokenizer, a random ranking model and its layout (responses of at most 6 tokens)."""
    tok = tokenizer.train_tokenizer(
        [f"post {i}: my cat ate the food. Response A: B: Which response is better?" for i in range(40)],
        vocab_size=300,
    )
    rm = models.RewardModel(models.preset("tiny", vocab_size=tok.vocab_size))
    layout = pipeline.RankingLayout.for_tokenizer(tok, max_prompt_len=16, max_response_len=6)
    return tok, rm, random_params(rm, 5), layout


PROMPTS = ["my cat", "the food", "post 3: my cat ate"]
YS = [" ate it", " is cold" * 20, " slept"]  # the second is cut
BASELINES = [" slept", " is warm", " ate the food and the cat ate the food" * 3]  # the third is cut


def test_score_pairwise_scores_hand_built_ranking_rows(ranking):
    """Each score is the ranking model applied alone (no padding, no batch) to the row built by hand:
    BOS prompt, "\n\nResponse A:" y, "\n\nResponse B:" y_b, "\n\nWhich response is better?", EOS,
    each response cut to its share of the layout; swapping y and y_b scores the swapped rows."""
    tok, rm, params, layout = ranking
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
    for a, b in ((YS, BASELINES), (BASELINES, YS)):
        want = [
            float(apply({"params": params}, jnp.array([row(*r)]))[0]) for r in zip(PROMPTS, a, b, strict=True)
        ]
        cut = rec.LoadStats()
        got = scoring.score_pairwise(rm, params, tok, PROMPTS, a, b, layout=layout, batch_size=2, stats=cut)
        assert got.shape == (3,) and got.dtype == np.float32
        np.testing.assert_allclose(got, want, atol=1e-5)
        assert cut.truncated["ranking_response"] == 2  # rows 1 and 2 lose the end of a response


def test_pairwise_logits_average_both_orders_and_are_antisymmetric(ranking, caplog):
    """logit(a ≻ b) = (s(a, b) - s(b, a)) / 2 from the two one-order scores, and exactly -logit(b ≻ a);
    cut comparisons are counted once each and warned about (2 of 3 > 5%)."""
    tok, rm, params, layout = ranking
    kw = dict(layout=layout, batch_size=2)
    stats = rec.LoadStats()
    stats.truncated["ranking_response"] = 1  # counts add to what `stats` holds
    with caplog.at_level(logging.WARNING):
        ab = scoring.pairwise_logits(rm, params, tok, PROMPTS, YS, BASELINES, stats=stats, what="here", **kw)
    assert stats.truncated["ranking_response"] == 1 + 2
    assert "here: 66.7% of the ranking model's inputs (2 of 3)" in caplog.text
    ba = scoring.pairwise_logits(rm, params, tok, PROMPTS, BASELINES, YS, **kw)
    assert ab.shape == (3,) and ab.dtype == np.float32
    np.testing.assert_array_equal(ab, -ba)
    s_ab = scoring.score_pairwise(rm, params, tok, PROMPTS, YS, BASELINES, **kw)
    s_ba = scoring.score_pairwise(rm, params, tok, PROMPTS, BASELINES, YS, **kw)
    np.testing.assert_allclose(ab, (s_ab - s_ba) / 2, rtol=1e-6)
    assert not np.allclose(ab, s_ab, atol=1e-4)  # the average, not one order
    np.testing.assert_array_equal(scoring.pairwise_logits(rm, params, tok, PROMPTS, YS, YS, **kw), 0.0)
