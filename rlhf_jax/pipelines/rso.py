"""RSO end to end: SFT → reward (or ranking) model → sample N per prompt → statistical rejection
sampling of M → pairs → preference training against the SFT policy → evaluation.

Liu et al. 2024, "Statistical Rejection Sampling Improves Preference Optimization". Stages, each in
WORKDIR/{stage}/{fingerprint}/ (`rlhf_jax.pipelines.fingerprints`): reused when the configuration and
inputs it depends on are unchanged, resumed when it was interrupted, computed anew otherwise:

  sft/       supervised fine-tuning (`pipelines.sft`)
  rm/        pointwise reward model, or RSO's pairwise ranking model (`pipelines.reward`), from sft/
  samples/   candidates.npz: N samples per training prompt from the SFT policy and their proxy rewards
             (shared by every pairing, rejection and loss variant)
  pairs/     pairs.jsonl + stats.json: M accepted per prompt (or M plain SFT samples for the
             `sft_sample_rank` baseline) ranked into pairs by the proxy reward
  policy/    preference training with the configured loss (`pipelines.preference`), then evaluation

and `results.json` / the printed table at the top. `pairs="direct"` skips samples/ and pairs/ and trains
on the human preference pairs (the paper's "direct" baseline).

With a pairwise ranking model, a candidate's reward is RSO's r(x, y) = logit P(y ≻ y_b) against a
baseline SFT sample y_b of the same prompt (one extra sample per prompt), averaged over both A/B orders
of the ranking model's input to cancel its position bias; its inputs are built in the ranking layout it
was trained with (`pipeline.RankingLayout`), and the share with a response cut is reported.

The candidates are drawn from q, the SFT policy at temperature 0.7 and top-k 40 (the paper's setting),
so rejection sampling on rewards alone accepts samples that follow q · exp(r/β), not π_sft · exp(r/β).
`rso.proposal_correction=true` accepts on r/β + log π_sft − log q instead (`rejection.rejection_sample`),
which follows π_sft · exp(r/β) restricted to the responses q can draw (top-k's support).
"""

from __future__ import annotations

import dataclasses
import functools
import logging
import os
import time

import numpy as np

from rlhf_jax import rejection, sampling, sharding
from rlhf_jax.data import records as rec
from rlhf_jax.data.tokenizer import load_tokenizer
from rlhf_jax.pipelines import candidates, evaluation, fingerprints, preference, reward, sft, tasks
from rlhf_jax.pipelines import workdir as workdir_io
from rlhf_jax.pipelines.config import StageConfig, rm_kind, section_config, stage_config

log = logging.getLogger("rlhf_jax")


@dataclasses.dataclass(frozen=True)
class RSOConfig:
    """RSO's sampling and pairing settings (paper defaults at paper scale: N=64, M=8, β=0.5, T=0.7, k=40).

    Attributes:
      pairs: "rso" (rejection sampling), "sft_sample_rank" (M plain SFT samples, no rejection) or
        "direct" (the human preference pairs).
      ranking: "first_round" (M/2 pairs of shuffled neighbours) or "tournament" (M-1 pairs).
      num_prompts: training prompts sampled (distinct prompts of the preference split; 0 = all).
      num_candidates: N samples per prompt from the SFT policy.
      num_accepted: M accepted per prompt.
      beta: the rejection sampler's β. Accepted samples follow q · exp(r/β), q the SFT policy as sampled
        (tempered and top-k), or π_sft · exp(r/β) on q's support with `proposal_correction`.
      temperature, top_k, max_new_tokens: the SFT sampling policy q.
      proposal_correction: accept on r/β + log π_sft − log q (the proposal's density ratio) so that the
        accepted samples follow π_sft · exp(r/β) rather than q · exp(r/β) (module docstring).
    """

    pairs: str = "rso"
    ranking: str = "first_round"
    num_prompts: int = 0
    num_candidates: int = 64
    num_accepted: int = 8
    beta: float = 0.5
    temperature: float = 0.7
    top_k: int = 40
    max_new_tokens: int = 48
    proposal_correction: bool = False

    def __post_init__(self):
        if self.pairs not in ("rso", "sft_sample_rank", "direct"):
            raise ValueError(f"rso.pairs must be rso, sft_sample_rank or direct, got {self.pairs!r}")
        if self.ranking not in ("first_round", "tournament"):
            raise ValueError(f"rso.ranking must be first_round or tournament, got {self.ranking!r}")
        if not 2 <= self.num_accepted <= self.num_candidates:
            raise ValueError(
                f"need 2 <= rso.num_accepted ({self.num_accepted}) "
                f"<= rso.num_candidates ({self.num_candidates})"
            )
        if self.beta <= 0:
            raise ValueError(f"rso.beta must be > 0, got {self.beta}")
        if not isinstance(self.proposal_correction, bool):
            raise ValueError(
                f"rso.proposal_correction must be true or false, got {self.proposal_correction!r}"
            )


# The RSOConfig fields that determine the candidates (the rest determine how they become pairs); the
# reward model's kind (`rm.kind`) does too.
SAMPLING_FIELDS = ("num_prompts", "num_candidates", "temperature", "top_k", "max_new_tokens")


def _sampling_config(rso: RSOConfig) -> sampling.SamplingConfig:
    return sampling.SamplingConfig(
        max_new_tokens=rso.max_new_tokens, temperature=rso.temperature, top_k=rso.top_k
    )


def sample_candidates(
    cfg: StageConfig, rso: RSOConfig, *, rm_kind: str, sft_dir: str, rm_dir: str, out_path: str
) -> dict:
    """Samples N (+1 baseline for a pairwise reward model) completions per training prompt and scores them.

    Writes `out_path` (npz): prompt_tokens [P, Tp], prompt_lengths [P], tokens [P, N, T], lengths [P, N],
    logps [P, N] (untempered SFT log-probs, log π_sft), sampling_logps [P, N] (log-probs under the
    sampling policy, log q), rewards [P, N] and, with a ranking model, ranking_truncated_fraction (the
    share of its inputs with a response cut); returns them.
    """
    mesh = sharding.make_mesh(cfg.mesh)
    task = tasks.load_task(cfg.data, cfg.seed, init_from=sft_dir, init_from_hf=cfg.init_from_hf)
    tokenizer = tasks.tokenizer_for(cfg.data, task, os.path.dirname(out_path), sft_dir, cfg.init_from_hf)
    prompts, pb = tasks.training_prompts(
        task, tokenizer, num_prompts=rso.num_prompts, max_prompt_len=cfg.data.max_prompt_len, seed=cfg.seed
    )
    lm, sft_params = workdir_io.load_lm(sft_dir, mesh)
    N = rso.num_candidates
    n = N + (1 if rm_kind == "pairwise" else 0)  # + the baseline sample y_b
    tokens_PNT, lengths_PN, logps_PN, sampling_logps_PN = candidates.draw(
        lm,
        sft_params,
        pb,
        num_samples=n,
        config=_sampling_config(rso),
        seed=cfg.seed + 17,
        tokenizer=tokenizer,
    )
    P = len(prompts)
    proxy = reward.load_proxy(rm_dir, mesh, tasks.layout(cfg.data))
    bs = cfg.train.eval_batch_size
    extra = {}
    if proxy.kind == "pointwise":
        rewards_PN = candidates.pointwise_rewards(proxy, pb, tokens_PNT, lengths_PN, pad_id=tokenizer.pad_id,
                                                  batch_size=bs)  # fmt: skip
    else:  # RSO's r(x, y) = logit P(y ≻ y_b) against the baseline sample y_b
        texts = evaluation.decode_completions(tokenizer, tokens_PNT, lengths_PN)
        flat_prompts = [prompts[p] for p in range(P) for _ in range(N)]
        cands = [texts[p][i] for p in range(P) for i in range(N)]
        baselines = [texts[p][N] for p in range(P) for _ in range(N)]
        cut = rec.LoadStats()
        rewards_PN = candidates.pairwise_logits(proxy, tokenizer, flat_prompts, cands, baselines,
                                                batch_size=bs, stats=cut).reshape(P, N)  # fmt: skip
        extra["ranking_truncated_fraction"] = np.float64(cut.truncated["ranking_response"] / (P * N))
        tokens_PNT, lengths_PN = tokens_PNT[:, :N], lengths_PN[:, :N]
        logps_PN, sampling_logps_PN = logps_PN[:, :N], sampling_logps_PN[:, :N]
    result = dict(
        prompt_tokens=pb["prompt_tokens"], prompt_lengths=pb["prompt_lengths"], tokens=tokens_PNT,
        lengths=lengths_PN, logps=logps_PN, sampling_logps=sampling_logps_PN,
        rewards=rewards_PN.astype(np.float32), **extra,
    )  # fmt: skip
    workdir_io.write_npz(out_path, result)
    return result


def build_pairs(cand: dict, rso: RSOConfig, *, seed: int, pad_id: int, max_len: int):
    """Accepted (or plain) samples → ranked pairs as a `TokenizedPreference` of the sampled token ids.

    Returns:
      (pairs, stats): the tokenised pairs and a dict of counts.
    """
    rewards_PN = cand["rewards"]
    P, N = rewards_PN.shape
    rank = rejection.first_round_rank if rso.ranking == "first_round" else rejection.tournament_rank
    if rso.pairs == "rso":
        correction = {}
        if rso.proposal_correction:
            if "sampling_logps" not in cand:
                raise ValueError(
                    "rso.proposal_correction needs the candidates' sampling log-probs: this candidates.npz "
                    "has no sampling_logps (drawn by an older version); delete its samples stage to redraw"
                )
            correction = dict(sft_logps=cand["logps"], proposal_logps=cand["sampling_logps"])
        accepted_PM = rejection.rejection_sample(
            rewards=rewards_PN, num_accept=rso.num_accepted, beta=rso.beta, seed=seed, **correction
        )
    else:  # sft_sample_rank: M of the SFT samples as they came, no rejection
        accepted_PM = rejection.uniform_sample(rewards=rewards_PN, num_samples=rso.num_accepted, seed=seed)
    pairs_PB = rank(rewards=rewards_PN, samples=accepted_PM, seed=seed + 1)
    p_idx, b_idx = np.nonzero(pairs_PB.valid_PB)  # pairs with a reward tie are dropped
    pairs, cut = candidates.pairs(
        cand, p_idx, pairs_PB.chosen_PB[p_idx, b_idx], pairs_PB.rejected_PB[p_idx, b_idx], pad_id=pad_id,
        max_len=max_len,
    )  # fmt: skip
    valid = pairs_PB.valid_PB
    chosen_r = np.take_along_axis(rewards_PN, pairs_PB.chosen_PB, 1)[valid]
    rejected_r = np.take_along_axis(rewards_PN, pairs_PB.rejected_PB, 1)[valid]
    stats = {
        "prompts": P,
        "candidates_per_prompt": N,
        "accepted_per_prompt": rso.num_accepted,
        "pairs": len(p_idx),
        "pairs_truncated": cut,
        "proposal_correction": rso.proposal_correction,
        "ranking_truncated_fraction": (
            float(cand["ranking_truncated_fraction"]) if "ranking_truncated_fraction" in cand else None
        ),
        "mean_candidate_reward": float(rewards_PN.mean()),
        "mean_accepted_reward": float(np.take_along_axis(rewards_PN, accepted_PM, 1).mean()),
        "tied_pairs_dropped": int((~valid).sum()),
        "mean_chosen_reward": float(chosen_r.mean()) if len(chosen_r) else None,
        "mean_rejected_reward": float(rejected_r.mean()) if len(rejected_r) else None,
    }
    return pairs, stats


def samples_spec(cfg: StageConfig, rso: RSOConfig, *, rm_kind: str, sft_dir: str, rm_dir: str) -> dict:
    """What the candidates depend on: the prompts (data, seed), the SFT policy, the reward model and the
    sampling settings (not the pairing or rejection settings, so those variants share the samples)."""
    return {
        "kind": "rso_samples",
        "format": 2,  # candidates.npz with `sampling_logps` (log q), which proposal_correction needs
        "seed": cfg.seed,
        "data": fingerprints.data_spec(cfg.data),
        "sft": fingerprints.stage_input(sft_dir),
        "rm": fingerprints.stage_input(rm_dir),
        "reward_kind": rm_kind,  # the key earlier versions used, so fingerprints are stable
        **{k: getattr(rso, k) for k in SAMPLING_FIELDS},
    }


def pairs_spec(cfg: StageConfig, rso: RSOConfig, *, samples_dir: str) -> dict:
    """What the pairs depend on: the candidates and every RSO setting that is not a sampling one."""
    return {
        "kind": "rso_pairs",
        "seed": cfg.seed,
        "max_len": cfg.data.max_len,
        "samples": fingerprints.stage_input(samples_dir),
        **{k: v for k, v in dataclasses.asdict(rso).items() if k not in SAMPLING_FIELDS},
    }


def _pairs_done(stage_dir: str) -> bool:
    return os.path.exists(os.path.join(stage_dir, "stats.json"))


def _samples_done(stage_dir: str) -> bool:
    return os.path.exists(os.path.join(stage_dir, "candidates.npz"))


@dataclasses.dataclass(frozen=True)
class Plan:
    """The RSO pipeline's stage configs: SFT, the reward model (`rm`, of kind `rm_kind`), the policy
    (`main`), RSO's sampling and pairing, and the evaluation."""

    sft: StageConfig
    rm: StageConfig
    main: StageConfig
    rso: RSOConfig
    eval: evaluation.EvalConfig
    rm_kind: str


def plan(config) -> Plan:
    """Validates an experiment's ConfigDict into the RSO pipeline's stage configs."""
    return Plan(
        sft=stage_config(config, "sft"),
        rm=stage_config(config, "rm"),
        main=stage_config(config, "train"),
        rso=section_config(RSOConfig, config, "rso"),
        eval=section_config(evaluation.EvalConfig, config, "eval"),
        rm_kind=rm_kind(config),
    )


def run_pipeline(plan: Plan, workdir: str, *, reuse_from: tuple[str, ...] = ()) -> dict:
    """Runs (or resumes) the whole RSO pipeline in `workdir`; returns and writes `results.json`.

    Every stage lives in WORKDIR/{stage}/{fingerprint}/ and is reused when its fingerprint matches
    (`rlhf_jax.pipelines.fingerprints`), here or in a `reuse_from` workdir; the results and the printed
    table are always those of the configuration given.
    """
    rso, policy_cfg, eval_config = plan.rso, plan.main, plan.eval
    start = time.perf_counter()
    locate = functools.partial(fingerprints.locate, workdir, reuse_from=reuse_from)
    title = f"RSO on {policy_cfg.data.task}: {rso.pairs}/{rso.ranking}/{policy_cfg.loss.name}"
    seconds, ran = {}, []

    t0 = time.perf_counter()
    ran.append(sft.run_stage(plan.sft, locate))
    sft_dir = ran[-1].dir
    seconds["sft"], t0 = time.perf_counter() - t0, time.perf_counter()
    rm_cfg = dataclasses.replace(plan.rm, init_from=sft_dir)
    response_len = max(rso.max_new_tokens, eval_config.max_new_tokens)  # a ranking model judges these
    ran.append(reward.run_stage(rm_cfg, locate, kind=plan.rm_kind, response_len=response_len))
    rm_dir = ran[-1].dir
    seconds["rm"], t0 = time.perf_counter() - t0, time.perf_counter()

    train_data = None
    pair_stats: dict = {"pairs": "direct (human preference pairs)"}
    if rso.pairs != "direct":
        spec = samples_spec(policy_cfg, rso, rm_kind=plan.rm_kind, sft_dir=sft_dir, rm_dir=rm_dir)
        ran.append(locate("samples", spec, done=_samples_done))
        cand_path = os.path.join(ran[-1].dir, "candidates.npz")
        if os.path.exists(cand_path):
            cand = dict(np.load(cand_path))
        else:
            cand = sample_candidates(policy_cfg, rso, rm_kind=plan.rm_kind, sft_dir=sft_dir, rm_dir=rm_dir,
                                     out_path=cand_path)  # fmt: skip
            log.info("sampled %s candidates in %.1fs", cand["tokens"].shape[:2], time.perf_counter() - t0)
        seconds["samples"], t0 = time.perf_counter() - t0, time.perf_counter()
        tokenizer = load_tokenizer(sft_dir)
        ran.append(locate("pairs", pairs_spec(policy_cfg, rso, samples_dir=ran[-1].dir), done=_pairs_done))
        train_data, pair_stats = build_pairs(
            cand, rso, seed=policy_cfg.seed, pad_id=tokenizer.pad_id, max_len=policy_cfg.data.max_len
        )
        if not ran[-1].reused:
            candidates.write_pairs(os.path.join(ran[-1].dir, "pairs.jsonl"), train_data, tokenizer)
            workdir_io.write_json(os.path.join(ran[-1].dir, "stats.json"), pair_stats)  # last: marks done

    policy_cfg = dataclasses.replace(policy_cfg, init_from=sft_dir)
    policy_spec = preference.spec(
        policy_cfg, train_data=train_data, eval_config=eval_config, proxy_dir=rm_dir
    )
    ran.append(locate("policy", policy_spec, done=workdir_io.stage_done))
    results = preference.run(
        policy_cfg, ran[-1].dir, name="policy", train_data=train_data, eval_config=eval_config,
        proxy_dir=rm_dir,
    )  # fmt: skip
    seconds["policy_and_evaluation"] = time.perf_counter() - t0
    results = {
        **{k: results.get(k) for k in evaluation.RESULT_KEYS},
        **results,
        "method": f"{rso.pairs}/{rso.ranking}/{policy_cfg.loss.name}",
        "rso": dataclasses.asdict(rso),
        "rm_kind": plan.rm_kind,
        "pair_stats": pair_stats,
        "sft": workdir_io.read_results(sft_dir),
        "reward_model": workdir_io.read_results(rm_dir),
        "wall_time_s": time.perf_counter() - start,
        "stage_seconds": seconds,  # of this invocation (a reused stage counts ~0)
    }
    results = fingerprints.finish(workdir, results, ran, final="policy")
    if workdir_io.is_main():
        print("\n" + evaluation.format_table(results, title))
    return results
