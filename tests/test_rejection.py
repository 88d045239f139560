"""RSO rejection sampling and pair construction: the paper's limits, the target distribution, pairs.

Statistical tests use fixed seeds and thresholds at p = 0.001 of their null distribution, so they are
deterministic (they pass or fail the same way on every run) and a correct implementation fails them
only for one seed in a thousand:
  - chi-square with d degrees of freedom against the exact expected counts: critical values 24.32
    (d = 7) and 18.47 (d = 4).
  - M = 1 rejection sampling from N candidates is π_r only approximately (the envelope r_max is the
    largest *sampled* reward); on the 5-response example below, 200k-prompt runs put the total
    variation from π_r at 0.001 (N = 16) to 0.002 (N = 64), the size of their own sampling noise; at
    the test's 50k prompts such a bias adds ~2 to a chi-square whose critical value is 18.47.
"""

import math

import numpy as np
import pytest

from rlhf_jax import rejection

CHI2_7DOF, CHI2_4DOF = 24.32, 18.47


def chi_square(counts, expected) -> float:
    return float(((counts - expected) ** 2 / expected).sum())


def test_beta_to_zero_accepts_the_top_m_in_reward_order():
    rewards_PN = np.random.default_rng(0).normal(size=(50, 16)).astype(np.float32)
    accepted_PM = rejection.rejection_sample(rewards=rewards_PN, num_accept=5, beta=1e-9, seed=0)
    np.testing.assert_array_equal(accepted_PM, np.argsort(-rewards_PN, axis=1)[:, :5])


def test_beta_to_infinity_is_uniform_over_candidates():
    """Each of N = 8 candidates is selected with probability M / N = 3/8, even with sorted rewards."""
    P, N, M = 20_000, 8, 3
    rewards_PN = np.sort(np.random.default_rng(1).normal(size=(P, N)), axis=1).astype(np.float32)
    for beta in (math.inf, 1e9):
        accepted_PM = np.asarray(
            rejection.rejection_sample(rewards=rewards_PN, num_accept=M, beta=beta, seed=1)
        )
        assert all(len(set(row)) == M for row in accepted_PM[:100])  # without replacement
        counts = np.bincount(accepted_PM.ravel(), minlength=N)
        assert chi_square(counts, P * M / N) < CHI2_7DOF
        # The first accepted is uniform too (acceptance order is the random iteration order).
        assert chi_square(np.bincount(accepted_PM[:, 0], minlength=N), P / N) < CHI2_7DOF


def test_accepted_samples_follow_the_optimal_policy():
    """M = 1 from N = 64 samples of π_sft: the accepted response is distributed as π_sft exp(r/β) / Z."""
    P, N, beta = 50_000, 64, 0.5
    sft_probs = np.array([0.35, 0.25, 0.2, 0.12, 0.08])
    response_rewards = np.array([0.0, 0.25, 0.5, 0.75, 1.0])
    target = sft_probs * np.exp(response_rewards / beta)
    target /= target.sum()
    responses_PN = np.random.default_rng(2).choice(5, size=(P, N), p=sft_probs)
    rewards_PN = response_rewards[responses_PN]
    accepted_P1 = rejection.rejection_sample(rewards=rewards_PN, num_accept=1, beta=beta, seed=3)
    counts = np.bincount(np.take_along_axis(responses_PN, accepted_P1, axis=1).ravel(), minlength=5)
    assert chi_square(counts, P * target) < CHI2_4DOF
    assert chi_square(counts, P * sft_probs) > 100 * CHI2_4DOF  # without rejection: far off


def test_rejection_sample_accepts_distinct_candidates_deterministically():
    rewards_PN = np.random.default_rng(4).normal(size=(64, 12)).astype(np.float32)
    run = lambda seed: rejection.rejection_sample(rewards=rewards_PN, num_accept=12, beta=0.3, seed=seed)
    accepted_PM = run(5)
    np.testing.assert_array_equal(np.sort(accepted_PM, axis=1), np.broadcast_to(np.arange(12), (64, 12)))
    np.testing.assert_array_equal(run(5), accepted_PM)
    assert not np.array_equal(run(6), accepted_PM)


def test_validation():
    rewards_PN = np.zeros((2, 4), np.float32)
    with pytest.raises(ValueError, match="num_accept=5"):
        rejection.rejection_sample(rewards=rewards_PN, num_accept=5, beta=1.0, seed=0)
    with pytest.raises(ValueError, match="beta"):
        rejection.rejection_sample(rewards=rewards_PN, num_accept=2, beta=0.0, seed=0)
    with pytest.raises(ValueError, match="finite"):
        rejection.rejection_sample(rewards=rewards_PN + np.nan, num_accept=2, beta=1.0, seed=0)
    with pytest.raises(ValueError, match="indices"):
        rejection.first_round_rank(rewards=rewards_PN, samples=[[0, 4], [1, 2]], seed=0)


# ------------------------------------------------------------------------------------------------ pairs


def _check_labels(pairs, rewards_PN):
    chosen_r = np.take_along_axis(rewards_PN, pairs.chosen_PB, axis=1)
    rejected_r = np.take_along_axis(rewards_PN, pairs.rejected_PB, axis=1)
    assert (chosen_r >= rejected_r).all()
    np.testing.assert_array_equal(pairs.valid_PB, chosen_r != rejected_r)


def test_first_round_rank_pairs_disjoint_neighbours():
    rewards_PN = np.random.default_rng(6).normal(size=(10, 8)).astype(np.float32)
    rewards_PN[:, 3] = rewards_PN[:, 5]  # a tie in every prompt
    samples_PM = np.tile(np.array([0, 3, 5, 6, 7], np.int32), (10, 1))
    pairs = rejection.first_round_rank(rewards=rewards_PN, samples=samples_PM, seed=0)
    assert pairs.chosen_PB.shape == (10, 2)
    _check_labels(pairs, rewards_PN)
    used_PB2 = np.concatenate([pairs.chosen_PB, pairs.rejected_PB], axis=1)
    for row in used_PB2:
        assert len(set(row)) == 4 and set(row) <= {0, 3, 5, 6, 7}
    tie_PB = np.isin(pairs.chosen_PB, [3, 5]) & np.isin(pairs.rejected_PB, [3, 5])
    assert tie_PB.any() and not pairs.valid_PB[tie_PB].any()
    again = rejection.first_round_rank(rewards=rewards_PN, samples=samples_PM, seed=0)
    for a, b in zip(again, pairs, strict=True):
        np.testing.assert_array_equal(a, b)


@pytest.mark.parametrize("M", [8, 5])
def test_tournament_rank_is_a_single_elimination(M):
    rewards_PN = np.random.default_rng(7).normal(size=(20, 12)).astype(np.float32)
    samples_PM = np.stack([np.random.default_rng(p).permutation(12)[:M] for p in range(20)]).astype(np.int32)
    pairs = rejection.tournament_rank(rewards=rewards_PN, samples=samples_PM, seed=1)
    assert pairs.chosen_PB.shape == (20, M - 1) and pairs.valid_PB.all()
    _check_labels(pairs, rewards_PN)
    for p in range(20):
        losers = pairs.rejected_PB[p]
        champion = samples_PM[p][np.argmax(rewards_PN[p, samples_PM[p]])]
        assert sorted(losers) == sorted(set(samples_PM[p]) - {champion})  # all but the best lose once
        assert pairs.chosen_PB[p, -1] == champion  # the final
    # Round 1 of the tournament is the first round of first-round-rank with the same shuffle.
    first = rejection.first_round_rank(rewards=rewards_PN, samples=samples_PM, seed=1)
    np.testing.assert_array_equal(pairs.chosen_PB[:, : M // 2], first.chosen_PB)


def test_sft_sample_rank_uses_uniform_distinct_candidates():
    P, N, M = 4000, 8, 4
    rewards_PN = np.random.default_rng(8).normal(size=(P, N)).astype(np.float32)
    pairs = rejection.sft_sample_rank(rewards=rewards_PN, num_samples=M, seed=2)
    assert pairs.chosen_PB.shape == (P, M // 2)
    _check_labels(pairs, rewards_PN)
    used_PM = np.concatenate([pairs.chosen_PB, pairs.rejected_PB], axis=1)
    assert all(len(set(row)) == M for row in used_PM[:100])
    assert chi_square(np.bincount(used_PM.ravel(), minlength=N), P * M / N) < CHI2_7DOF
