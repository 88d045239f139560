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

import dataclasses
import math

import numpy as np
import pytest

from rlhf_jax import rejection

CHI2_7DOF, CHI2_4DOF, CHI2_3DOF = 24.32, 18.47, 16.27


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
    """M = 1 from N = 64 samples of π_sft (q = π_sft): the accepted response follows π_sft exp(r/β) / Z."""
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


@pytest.mark.parametrize("top_k", [5, 4])
def test_proposal_correction_targets_the_sft_policy_from_a_tempered_proposal(top_k):
    """Candidates from q = π_sft tempered at T = 0.7 (and cut to its top k): accepting on r/β alone
    gives q·exp(r/β); accepting on r/β + log π_sft − log q gives π_sft·exp(r/β) on q's support.

    Sizes: 50k prompts, N = 64, M = 1 (the test above's). The two targets differ by a total variation of
    0.098 (k = 5) and 0.066 (k = 4), so the wrong one has an expected chi-square of ~2,400 and ~1,300,
    against the 30 × critical value (~550 and ~490) asserted; in 200k-prompt runs the right one is off by
    a total variation of ~0.0015 (the envelope estimated from N samples), as in the test above."""
    P, N, beta, T = 50_000, 64, 0.5, 0.7
    sft_probs = np.array([0.35, 0.25, 0.2, 0.12, 0.08])
    response_rewards = np.array([0.0, 0.25, 0.5, 0.75, 1.0])
    support = np.arange(5) < top_k  # the top k by π_sft (sorted)
    q = np.where(support, sft_probs ** (1 / T), 0.0)
    q /= q.sum()
    sft_target = np.where(support, sft_probs * np.exp(response_rewards / beta), 0.0)
    sft_target /= sft_target.sum()
    q_target = q * np.exp(response_rewards / beta)
    q_target /= q_target.sum()
    responses_PN = np.random.default_rng(9).choice(5, size=(P, N), p=q)
    rewards_PN = response_rewards[responses_PN]
    with np.errstate(divide="ignore"):
        log_sft, log_q = np.log(sft_probs), np.log(q)

    def accepted_counts(**logps):
        accepted_P1 = rejection.rejection_sample(
            rewards=rewards_PN, num_accept=1, beta=beta, seed=10, **logps
        )
        responses = np.take_along_axis(responses_PN, accepted_P1, axis=1).ravel()
        return np.bincount(responses, minlength=5)[:top_k]

    dof = CHI2_4DOF if top_k == 5 else CHI2_3DOF
    plain = accepted_counts()
    assert chi_square(plain, P * q_target[:top_k]) < dof
    assert chi_square(plain, P * sft_target[:top_k]) > 30 * dof
    corrected = accepted_counts(sft_logps=log_sft[responses_PN], proposal_logps=log_q[responses_PN])
    assert chi_square(corrected, P * sft_target[:top_k]) < dof
    assert chi_square(corrected, P * q_target[:top_k]) > 30 * dof


def test_proposal_correction_with_q_equal_to_sft_is_algorithm_1():
    rng = np.random.default_rng(11)
    rewards_PN = rng.normal(size=(2000, 16)).astype(np.float32)
    logps_PN = -rng.gamma(5.0, size=(2000, 16))
    for beta in (0.3, math.inf):
        kw = dict(rewards=rewards_PN, num_accept=4, beta=beta, seed=12)
        np.testing.assert_array_equal(
            rejection.rejection_sample(**kw, sft_logps=logps_PN, proposal_logps=logps_PN),
            rejection.rejection_sample(**kw),
        )


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
    kw = dict(rewards=rewards_PN, num_accept=2, beta=1.0, seed=0)
    with pytest.raises(ValueError, match="both"):
        rejection.rejection_sample(**kw, sft_logps=rewards_PN)
    with pytest.raises(ValueError, match=r"proposal_logps must have the rewards' shape \(2, 4\)"):
        rejection.rejection_sample(**kw, sft_logps=rewards_PN, proposal_logps=rewards_PN[:, :3])
    with pytest.raises(ValueError, match="sft_logps must be finite"):
        rejection.rejection_sample(**kw, sft_logps=rewards_PN - np.inf, proposal_logps=rewards_PN)


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


def test_uniform_sample_is_what_sft_sample_rank_ranks():
    P, N, M = 3000, 8, 4
    rewards_PN = np.random.default_rng(9).normal(size=(P, N)).astype(np.float32)
    samples_PM = rejection.uniform_sample(rewards=rewards_PN, num_samples=M, seed=5)
    assert samples_PM.shape == (P, M) and all(len(set(row)) == M for row in samples_PM[:100])
    assert chi_square(np.bincount(samples_PM.ravel(), minlength=N), P * M / N) < CHI2_7DOF
    pairs = rejection.sft_sample_rank(rewards=rewards_PN, num_samples=M, seed=5)
    used_PM = np.sort(np.concatenate([pairs.chosen_PB, pairs.rejected_PB], axis=1), axis=1)
    np.testing.assert_array_equal(used_PM, np.sort(samples_PM, axis=1))  # the same M, ranked
    with pytest.raises(ValueError, match="num_samples"):
        rejection.uniform_sample(rewards=rewards_PN, num_samples=N + 1, seed=0)


# ------------------------------------------------------------------------------------------ RSO's stage


def _candidates(P: int, N: int, seed: int) -> dict:
    """A candidates.npz-like dict: candidate n of every prompt is the single token 10 + n."""
    rng = np.random.default_rng(seed)
    return dict(
        prompt_tokens=np.full((P, 3), 2, np.int32), prompt_lengths=np.full(P, 3, np.int32),
        tokens=np.broadcast_to(10 + np.arange(N, dtype=np.int32)[None, :, None], (P, N, 1)).copy(),
        lengths=np.ones((P, N), np.int32), rewards=rng.normal(size=(P, N)).astype(np.float32),
        logps=np.zeros((P, N), np.float32), sampling_logps=np.zeros((P, N), np.float32),
    )  # fmt: skip


def test_rso_stage_accepts_on_the_density_ratio_when_asked():
    """β huge (acceptance ~ uniform on rewards) and π_sft / q = e^50 for candidates 0-3 only: with the
    correction those four are the accepted ones in every prompt; without it, the others appear too."""
    from launch import train
    from rlhf_jax.pipelines import rso

    cand = _candidates(P=30, N=8, seed=13)
    cand["sampling_logps"][:, :4] = -50.0
    config = rso.RSOConfig(num_candidates=8, num_accepted=4, beta=1e6, proposal_correction=True)
    pairs, stats = rso.build_pairs(cand, config, seed=0, pad_id=0, max_len=8)
    used = {int(ids[0]) - 10 for ids in (*pairs.chosen_ids, *pairs.rejected_ids)}
    assert used == {0, 1, 2, 3} and stats["proposal_correction"] is True and stats["pairs"] == 60
    plain = dataclasses.replace(config, proposal_correction=False)
    pairs, stats = rso.build_pairs(cand, plain, seed=0, pad_id=0, max_len=8)
    assert {int(ids[0]) - 10 for ids in (*pairs.chosen_ids, *pairs.rejected_ids)} > {0, 1, 2, 3}
    assert stats["proposal_correction"] is False

    del cand["sampling_logps"]  # candidates drawn before the sampling log-probs were kept
    with pytest.raises(ValueError, match="sampling_logps"):
        rso.build_pairs(cand, config, seed=0, pad_id=0, max_len=8)
    with pytest.raises(ValueError, match="rso.proposal_correction must be true or false"):
        rso.RSOConfig(proposal_correction="yes")
    overridden = train.resolve_config("rso_tldr", ["--config.rso.proposal_correction=true"])
    assert train.build_plan(overridden).rso.proposal_correction is True
    assert train.build_plan(train.resolve_config("rso_tldr", [])).rso.proposal_correction is False
