"""RSO's statistical rejection sampling, and the preference pairs built from the accepted samples.

Liu et al. 2024, "Statistical Rejection Sampling Improves Preference Optimization" (ICLR), Sec. 3 and
Algorithm 1. The target is the optimal policy of the KL-regularised reward objective,

    π_r(y | x) = π_sft(y | x) exp(r(x, y) / β) / Z(x)          (as in DPO, Rafailov et al. 2023, Eq. 4)

reached from N candidates y_1..y_N ~ q(· | x) with rewards r_i by rejection sampling whose envelope
constant is estimated by the largest score among the candidates (Algorithm 1). Each candidate has the
score s_i = r_i / β, or, with the proposal's density ratio (`sft_logps`, `proposal_logps`),

    s_i = r_i / β + log π_sft(y_i | x) − log q(y_i | x),

and

    accepted = []
    while len(accepted) < M:
        s_max = max of s_i over the candidates not yet accepted
        for each remaining candidate i, in a random order, until M are accepted:
            draw u ~ U[0, 1); accept i (and remove it) if u < exp(s_i - s_max)

A remaining candidate with score s_max is accepted whenever the round reaches it (probability 1), so
every round accepts at least one and at most M rounds run; when the remaining candidates are exactly
the ones still needed, they are all accepted over the following rounds. With M = 1 and N large, the
accepted candidate is distributed approximately as q(y) exp(s(y)) / Z (exactly as N → ∞, when s_max is
the largest score of any response):

  * s = r / β (Algorithm 1 as written, which assumes q = π_sft): accepted samples follow
    q · exp(r / β). When the candidates are drawn from a sharpened π_sft — the paper's temperature 0.7
    and top-k 40, RSO's defaults here — q is that tempered, truncated distribution, not π_sft, and the
    accepted samples follow q · exp(r / β), not π_r.
  * s = r / β + log π_sft − log q (`rso.proposal_correction`): q · (π_sft / q) · exp(r / β) = π_r,
    exact on q's support only. Top-k (or top-p) gives q(y) = 0 to every response with a token outside
    the k most likely, so what is reached is π_r restricted to (and renormalised on) the responses q can
    draw. The ratios π_sft / q of long responses can differ by orders of magnitude, so a few candidates
    may carry most of the mass (the envelope s_max then rests on fewer effective samples).

Limits: β → ∞ accepts every candidate it meets, a uniformly random M-subset (with the correction: by
π_sft / q); β → 0 accepts only the current maximum, the top M by reward.

The iteration order is a random permutation per prompt (the paper walks i.i.d. candidates in their
sampled order; the permutation keeps the selection uniform whatever order the caller's candidates are
in, e.g. sorted by reward).

Everything here runs on the host in numpy (rewards arrive there from scoring; numpy needs no
compilation for each new shape), vectorised over prompts P, and is a deterministic function of
(rewards, seed). Pairs are index arrays into the N candidates, [P, B] with B the pairs per prompt (the
batch of a preference step). Ties: a pair of equal rewards carries no preference, so it is returned
with `valid_PB` False (in an arbitrary order) for the caller to drop; in a tournament the first of two
tied players (in the shuffled order) advances.
"""

from __future__ import annotations

from typing import NamedTuple

import numpy as np


class Pairs(NamedTuple):
    """Preference pairs per prompt, as indices into the N candidates.

    Attributes:
      chosen_PB: int32, the higher-reward candidate of each pair.
      rejected_PB: int32, the lower-reward candidate.
      valid_PB: bool, False where the two rewards are equal (no preference; drop those pairs).
    """

    chosen_PB: np.ndarray  # noqa: N815 (shape-suffixed names, see rlhf_jax/__init__.py)
    rejected_PB: np.ndarray  # noqa: N815
    valid_PB: np.ndarray  # noqa: N815


def _check(rewards, num: int, what: str) -> np.ndarray:
    """The rewards as float32 [P, N] on the host, validated (the public functions are host-level calls)."""
    rewards_PN = np.asarray(rewards, np.float32)
    if rewards_PN.ndim != 2:
        raise ValueError(f"rewards must be [prompts, candidates], got shape {rewards_PN.shape}")
    if not 1 <= num <= rewards_PN.shape[1]:
        raise ValueError(f"{what}={num} must be in [1, {rewards_PN.shape[1]}] (the candidates per prompt)")
    if not np.isfinite(rewards_PN).all():
        raise ValueError(
            f"rewards must be finite; row {int(np.argmin(np.isfinite(rewards_PN).all(1)))} is not"
        )
    return rewards_PN


def _check_samples(rewards, samples) -> tuple[np.ndarray, np.ndarray]:
    """Rewards [P, N] and sample indices [P, M] (M >= 2, each in [0, N)), validated, on the host."""
    samples_PM = np.asarray(samples, np.int32)
    rewards_PN = _check(rewards, samples_PM.shape[-1], "samples per prompt")
    if samples_PM.shape != (rewards_PN.shape[0], samples_PM.shape[-1]) or samples_PM.shape[1] < 2:
        raise ValueError(f"samples must be [{rewards_PN.shape[0]}, M >= 2], got shape {samples_PM.shape}")
    if samples_PM.min() < 0 or samples_PM.max() >= rewards_PN.shape[1]:
        raise ValueError(
            f"sample indices must be in [0, {rewards_PN.shape[1]}), "
            f"got {samples_PM.min()}..{samples_PM.max()}"
        )
    return rewards_PN, samples_PM


def _check_logps(logps, shape: tuple[int, ...], name: str) -> np.ndarray:
    """Per-candidate log-probs as float64 [P, N], validated against the rewards' shape."""
    logps_PN = np.asarray(logps, np.float64)
    if logps_PN.shape != shape:
        raise ValueError(f"{name} must have the rewards' shape {shape}, got {logps_PN.shape}")
    if not np.isfinite(logps_PN).all():
        raise ValueError(f"{name} must be finite; row {int(np.argmin(np.isfinite(logps_PN).all(1)))} is not")
    return logps_PN


def rejection_sample(
    *, rewards, num_accept: int, beta: float, seed: int, sft_logps=None, proposal_logps=None
) -> np.ndarray:
    """RSO's statistical rejection sampling (Algorithm 1; module docstring), vectorised over prompts.

    Without log-probs, candidate i is accepted against the envelope with probability
    exp((r_i − r_max) / β) and the accepted samples follow q · exp(r / β), q being the distribution the
    candidates were drawn from. With `sft_logps` and `proposal_logps`, the score is
    s_i = r_i / β + log π_sft(y_i | x) − log q(y_i | x) and the acceptance probability exp(s_i − s_max):
    the density ratio π_sft / q turns the proposal into π_sft, so the accepted samples follow
    π_sft · exp(r / β) on q's support (module docstring).

    Args:
      rewards: [P, N] finite rewards r(x, y_i) of N candidates per prompt.
      num_accept: M <= N, samples to accept per prompt.
      beta: β > 0 of π_r ∝ π_sft exp(r / β) (`math.inf` allowed: uniform selection, or by π_sft / q).
      seed: the random seed.
      sft_logps: optional [P, N] log π_sft(y_i | x) (untempered, e.g. `SampleOutput.logps_PN`).
      proposal_logps: optional [P, N] log q(y_i | x), the log-prob under the distribution the candidates
        were drawn from (e.g. `SampleOutput.sampling_logps_PN`); give both or neither.

    Returns:
      int32 [P, M] indices of the accepted candidates, in acceptance order.
    """
    rewards_PN = _check(rewards, num_accept, "num_accept").astype(np.float64)
    if not beta > 0:
        raise ValueError(f"beta={beta} must be > 0")
    if (sft_logps is None) != (proposal_logps is None):
        raise ValueError("give both sft_logps and proposal_logps (the proposal correction) or neither")
    if sft_logps is None:
        score_PN, scale = rewards_PN, beta  # exp((r - r_max) / β)
    else:
        log_ratio_PN = _check_logps(sft_logps, rewards_PN.shape, "sft_logps") - _check_logps(
            proposal_logps, rewards_PN.shape, "proposal_logps"
        )
        score_PN, scale = rewards_PN / beta + log_ratio_PN, 1.0  # exp(s - s_max); β = inf: r / β = 0
    rng = np.random.default_rng(seed)
    P, N = rewards_PN.shape
    M = num_accept
    order_PN = rng.permuted(np.broadcast_to(np.arange(N, dtype=np.int32), (P, N)), axis=1)
    s_PN = np.take_along_axis(score_PN, order_PN, axis=1)  # scores in iteration order
    remaining_PN = np.ones((P, N), bool)
    accepted_PM = np.zeros((P, M), np.int32)
    count_P = np.zeros((P,), np.int64)
    while (count_P < M).any():
        s_max_P1 = np.where(remaining_PN, s_PN, -np.inf).max(axis=1, keepdims=True)
        u_PN = rng.random((P, N))
        # Clipped at 0 for the candidates already taken (s may exceed s_max); β = inf gives exp(-0) = 1.
        accept_PN = np.exp(np.minimum(s_PN - s_max_P1, 0.0) / scale)
        proposed_PN = remaining_PN & (u_PN < accept_PN)
        # Walking in order and stopping at M: keep the first M - count proposals of the round.
        position_PN = count_P[:, None] + np.cumsum(proposed_PN, axis=1)
        taken_PN = proposed_PN & (position_PN <= M)
        p_idx, n_idx = np.nonzero(taken_PN)
        accepted_PM[p_idx, position_PN[p_idx, n_idx] - 1] = order_PN[p_idx, n_idx]
        count_P += taken_PN.sum(axis=1)
        remaining_PN &= ~taken_PN
    return accepted_PM


def _pair(rewards_PN, a_PB, b_PB) -> tuple[Pairs, np.ndarray]:
    """Labels each (a, b) by reward; returns the pairs and the winners (a on ties)."""
    r_a_PB = np.take_along_axis(rewards_PN, a_PB, axis=1)
    r_b_PB = np.take_along_axis(rewards_PN, b_PB, axis=1)
    a_wins_PB = r_a_PB >= r_b_PB
    winners_PB = np.where(a_wins_PB, a_PB, b_PB)
    return Pairs(winners_PB, np.where(a_wins_PB, b_PB, a_PB), r_a_PB != r_b_PB), winners_PB


def _first_round(rewards_PN, samples_PM, rng: np.random.Generator) -> Pairs:
    shuffled_PM = rng.permuted(samples_PM, axis=1)
    B = samples_PM.shape[1] // 2
    return _pair(rewards_PN, shuffled_PM[:, 0 : 2 * B : 2], shuffled_PM[:, 1 : 2 * B : 2])[0]


def first_round_rank(*, rewards, samples, seed: int) -> Pairs:
    """RSO's "first-round-rank": shuffle the M samples, pair neighbours (0, 1), (2, 3), ...

    Each pair is labelled by reward (chosen = higher). With M odd, the last shuffled sample is unused.

    Args:
      rewards: [P, N] rewards of the candidates.
      samples: int [P, M] candidate indices (e.g. `rejection_sample`'s), M >= 2.
      seed: the random seed of the shuffle.

    Returns:
      Pairs [P, M // 2].
    """
    return _first_round(*_check_samples(rewards, samples), np.random.default_rng(seed))


def tournament_rank(*, rewards, samples, seed: int) -> Pairs:
    """RSO's "tournament-rank": a single-elimination tournament over the shuffled M samples.

    Round 1 pairs neighbours as `first_round_rank` (the same shuffle for the same seed); winners (higher
    reward) advance, in order, and an odd player out advances without a match. Every match is a pair,
    M - 1 in all: round 1's first, then round 2's, and so on; the final's chosen is the best sample.

    Args:
      rewards: [P, N] rewards of the candidates.
      samples: int [P, M] candidate indices, M >= 2.
      seed: the random seed of the shuffle.

    Returns:
      Pairs [P, M - 1].
    """
    rewards_PN, samples_PM = _check_samples(rewards, samples)
    players_PM = np.random.default_rng(seed).permuted(samples_PM, axis=1)
    rounds = []
    while players_PM.shape[1] > 1:
        B = players_PM.shape[1] // 2
        pairs, winners_PB = _pair(rewards_PN, players_PM[:, 0 : 2 * B : 2], players_PM[:, 1 : 2 * B : 2])
        rounds.append(pairs)
        players_PM = np.concatenate([winners_PB, players_PM[:, 2 * B :]], axis=1)  # an odd one out: a bye
    return Pairs(*(np.concatenate(parts, axis=1) for parts in zip(*rounds, strict=True)))


def _uniform(rewards_PN: np.ndarray, num_samples: int, rng: np.random.Generator) -> np.ndarray:
    P, N = rewards_PN.shape
    return rng.permuted(np.broadcast_to(np.arange(N, dtype=np.int32), (P, N)), axis=1)[:, :num_samples]


def uniform_sample(*, rewards, num_samples: int, seed: int) -> np.ndarray:
    """M distinct candidates per prompt drawn uniformly, rewards ignored: the no-rejection counterpart
    of `rejection_sample` (RSO's "sft-sample-rank" baseline ranks these).

    Args:
      rewards: [P, N] rewards of the candidates (only their shape is used).
      num_samples: M in [2, N].
      seed: the random seed.

    Returns:
      int32 [P, M] candidate indices.
    """
    rewards_PN = _check(rewards, num_samples, "num_samples")
    return _uniform(rewards_PN, num_samples, np.random.default_rng(seed))


def sft_sample_rank(*, rewards, num_samples: int, seed: int) -> Pairs:
    """RSO's baseline "sft-sample-rank": M candidates drawn uniformly (no rejection), first-round-rank.

    The candidates are `uniform_sample`'s for the same seed; the shuffle of the ranking continues the
    same random stream.

    Args:
      rewards: [P, N] rewards of N candidates sampled from the SFT policy.
      num_samples: M in [2, N], candidates used per prompt.
      seed: the random seed.

    Returns:
      Pairs [P, M // 2].
    """
    rewards_PN = _check(rewards, num_samples, "num_samples")
    rng = np.random.default_rng(seed)
    samples_PM = _uniform(rewards_PN, num_samples, rng)
    return _first_round(*_check_samples(rewards_PN, samples_PM), rng)
