"""Tests for the sample-based evaluation: win rates, bootstrap intervals, KL, the results keys."""

import jax
import numpy as np
import pytest

from rlhf_jax import models, sharding
from rlhf_jax.data import synthetic_tldr
from rlhf_jax.data.tokenizer import get_or_train_tokenizer
from rlhf_jax.pipelines import evaluation


def test_win_rate_counts_ties_as_half():
    np.testing.assert_array_equal(evaluation.win_rate([2, 1, 1], [1, 1, 3]), [1.0, 0.5, 0.0])


def test_bootstrap_interval_brackets_the_mean_and_shrinks_with_data():
    rng = np.random.default_rng(0)
    small = (rng.random(40) < 0.7).astype(float)
    large = (rng.random(4000) < 0.7).astype(float)
    lo, hi = evaluation.bootstrap_ci(small, resamples=2000, seed=0)
    assert lo < small.mean() < hi
    lo2, hi2 = evaluation.bootstrap_ci(large, resamples=2000, seed=0)
    assert hi2 - lo2 < (hi - lo) / 5
    # For a Bernoulli mean the interval is about ±1.96 sqrt(p(1-p)/n).
    assert (hi2 - lo2) / 2 == pytest.approx(1.96 * np.sqrt(0.21 / 4000), rel=0.15)


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    splits = synthetic_tldr.generate_splits(num_sft=32, num_pref=32, num_eval=6)
    tok = get_or_train_tokenizer("", synthetic_tldr.corpus(splits), 600, str(tmp_path_factory.mktemp("tok")))
    mesh = sharding.make_mesh(sharding.MeshConfig(data=2, fsdp=1, tensor=1), jax.devices()[:2])
    model = models.Transformer(models.preset("tiny", vocab_size=tok.vocab_size, max_len=256), mesh=mesh)
    params = models.init_params(model, jax.random.key(0))
    return splits, tok, model, params


def _evaluate(setup, policy_params, **kw):
    splits, tok, model, params = setup
    config = evaluation.EvalConfig(num_prompts=6, samples_per_prompt=2, max_new_tokens=8, bootstrap=100)
    return evaluation.evaluate_against_sft(
        model=model, policy_params=policy_params, sft_params=params, tokenizer=tok, prompts=splits.eval,
        config=config, seed=0, gold=synthetic_tldr.gold_reward, max_prompt_len=160, batch_size=4, **kw,
    )  # fmt: skip


def test_policy_equal_to_sft_ties_everything_and_has_zero_kl(setup):
    params = setup[3]
    out = _evaluate(setup, params)
    for key in evaluation.RESULT_KEYS:
        if key != "wall_time_s":
            assert key in out, key
    assert out["win_rate_vs_sft_gold"] == 0.5  # identical samples: every comparison a tie
    assert out["win_rate_vs_sft_gold_ci95"] == [0.5, 0.5]
    assert abs(out["kl_to_sft"]) < 1e-4
    assert out["win_rate_vs_sft_proxy"] is None  # no proxy given
    assert out["mean_response_length"] == out["mean_response_length_sft"] > 0


def test_a_different_policy_has_positive_kl_and_a_pointwise_proxy(setup):
    splits, tok, model, params = setup
    other = jax.tree.map(lambda x: x * 1.5, params)
    rm = models.RewardModel(model.config, mesh=model.mesh)
    proxy = evaluation.Proxy("pointwise", rm, models.init_params(rm, jax.random.key(1)), None)
    out = _evaluate(setup, other, proxy=proxy)
    assert out["kl_to_sft"] > 0  # KL is non-negative in expectation; a scaled model differs clearly
    assert 0.0 <= out["win_rate_vs_sft_proxy"] <= 1.0
    lo, hi = out["win_rate_vs_sft_proxy_ci95"]
    assert lo <= out["win_rate_vs_sft_proxy"] <= hi
    assert "proxy_reward_policy" in out and "gold_reward_policy" in out


def test_format_table_shows_intervals():
    text = evaluation.format_table(
        {"win_rate_vs_sft_gold": 0.61, "win_rate_vs_sft_gold_ci95": [0.55, 0.67], "wall_time_s": 12.0}, "T"
    )
    assert "0.610  [0.550, 0.670]" in text and "n/a" in text
