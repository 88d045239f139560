"""Iterative Nash Policy Optimization (INPO), online: sample from π_t, label with an oracle, train π_{t+1}.

Zhang et al. 2024, "Iterative Nash Policy Optimization: Aligning LLMs with General Preferences via
No-Regret Learning", Algorithm 1. π_1 = π_ref = the SFT policy; for t = 1..T:

  1. sample K responses per training prompt from π_t;
  2. label pairs with the preference oracle:
     * a reward model: the best of the K (chosen) against the worst (rejected), one pair per prompt;
     * a pairwise preference (ranking) model: a single-elimination tournament over the K gives the
       winner, a tournament of losers the loser, and the pair is kept only if the final check
       P(winner ≻ loser) > 1/2 holds (both A/B orders averaged);
  3. train π_{t+1}, starting from π_t, with `losses.inpo(η, τ)` against π_ref, feeding the log-probs of
     the frozen previous iterate π_t (precomputed once per iteration, `previous_logps.npz`);
  4. evaluate π_{t+1} against the SFT policy (win rates by gold and proxy reward), also for iterative
     DPO, whose training reference is π_t: the evaluation baseline is always π_sft.

Each iteration's samples and policy live in WORKDIR/iter_{t}/samples/{fingerprint}/ (samples.npz,
pairs.jsonl) and WORKDIR/iter_{t}/policy/{fingerprint}/, reused when their fingerprint matches, so a rerun
resumes at the iteration it stopped in. The same loop runs iterative DPO (`loss.name=dpo`,
with `reference="previous"`: each iteration's reference is π_t) for the `inpo_iters` study.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import logging
import os
import time

import numpy as np

from rlhf_jax import sampling, sharding
from rlhf_jax.data import pipeline
from rlhf_jax.data.tokenizer import Tokenizer
from rlhf_jax.pipelines import candidates, common, evaluation, fingerprints, preference, reward, sft
from rlhf_jax.pipelines.config import StageConfig

log = logging.getLogger("rlhf_jax")

# What the evaluation measured of the SFT baseline's samples: the same in every iteration and for every
# method (iterative DPO included), since the baseline is always π_sft with the same prompts and keys.
SFT_BASELINE_KEYS = ("gold_reward_sft", "mean_response_length_sft")


@dataclasses.dataclass(frozen=True)
class INPOConfig:
    """Attributes:
    iterations: T (paper: 3).
    num_samples: K responses per prompt from π_t (paper: 8).
    num_prompts: training prompts per iteration (0 = all distinct prompts of the preference split).
    oracle: "pointwise" (reward model, best vs worst) or "pairwise" (ranking-model tournament).
    reference: "sft" (INPO: π_ref fixed) or "previous" (iterative DPO: the reference is π_t).
    temperature, top_k, max_new_tokens: the sampling policy for π_t's responses.
    """

    iterations: int = 3
    num_samples: int = 8
    num_prompts: int = 0
    oracle: str = "pointwise"
    reference: str = "sft"
    temperature: float = 1.0
    top_k: int = 0
    max_new_tokens: int = 48

    def __post_init__(self):
        if self.iterations < 1 or self.num_samples < 2:
            raise ValueError(
                f"inpo.iterations={self.iterations} must be >= 1, num_samples={self.num_samples} >= 2"
            )
        if self.oracle not in ("pointwise", "pairwise"):
            raise ValueError(f"inpo.oracle must be pointwise or pairwise, got {self.oracle!r}")
        if self.reference not in ("sft", "previous"):
            raise ValueError(f"inpo.reference must be sft or previous, got {self.reference!r}")


def _tournament(logit_fn, K: int, P: int, *, best: bool) -> np.ndarray:
    """Single elimination over K players per prompt; `logit_fn(a_idx [P, B], b_idx) -> logit P(a ≻ b)`.

    Returns the champion [P] (the best, or with best=False the worst: the loser advances).
    """
    players = np.tile(np.arange(K), (P, 1))
    while players.shape[1] > 1:
        B = players.shape[1] // 2
        a, b = players[:, 0 : 2 * B : 2], players[:, 1 : 2 * B : 2]
        a_wins = logit_fn(a, b) >= 0
        advance = np.where(a_wins == best, a, b)
        players = np.concatenate([advance, players[:, 2 * B :]], axis=1)
    return players[:, 0]


def label_pairs(cand: dict, oracle: str, *, proxy, tokenizer, prompts, batch_size: int):
    """(chosen_P, rejected_P, keep_P) candidate indices per prompt by the oracle (module docstring)."""
    tokens, lengths = cand["tokens"], cand["lengths"]
    P, K = lengths.shape
    if oracle == "pointwise":
        r = candidates.pointwise_rewards(
            proxy, cand, tokens, lengths, pad_id=tokenizer.pad_id, batch_size=batch_size
        )
        chosen, rejected = r.argmax(axis=1), r.argmin(axis=1)
        return chosen, rejected, r.max(axis=1) > r.min(axis=1)
    texts = evaluation.decode_completions(tokenizer, tokens, lengths)

    def logit_fn(a, b):
        flat_p = [prompts[p] for p in range(P) for _ in range(a.shape[1])]
        ta = [texts[p][i] for p in range(P) for i in a[p]]
        tb = [texts[p][i] for p in range(P) for i in b[p]]
        return candidates.pairwise_logits(proxy, tokenizer, flat_p, ta, tb, batch_size=batch_size).reshape(
            a.shape
        )

    winner = _tournament(logit_fn, K, P, best=True)
    loser = _tournament(logit_fn, K, P, best=False)
    final = logit_fn(winner[:, None], loser[:, None])[:, 0]
    return winner, loser, (final > 0) & (winner != loser)


# The INPOConfig fields that determine an iteration's samples and labels.
SAMPLING_FIELDS = ("num_samples", "num_prompts", "oracle", "temperature", "top_k", "max_new_tokens")


def samples_spec(cfg: StageConfig, inpo: INPOConfig, t: int, *, prev_dir: str, rm_dir: str) -> dict:
    """What iteration t's samples and labelled pairs depend on: π_t, the oracle, the prompts and the
    sampling settings (not the loss or the reference, so INPO and iterative DPO share iteration 1's)."""
    return {
        "kind": "inpo_samples",
        "iteration": t,
        "seed": cfg.seed,
        "data": fingerprints.data_spec(cfg.data),
        "policy": fingerprints.stage_input(prev_dir),
        "oracle": fingerprints.stage_input(rm_dir),
        **{k: getattr(inpo, k) for k in SAMPLING_FIELDS},
    }


def _samples_done(stage_dir: str) -> bool:
    return os.path.exists(os.path.join(stage_dir, "samples.npz"))


def _draw_and_label(t: int, *, cfg: StageConfig, inpo: INPOConfig, tokenizer, prev_dir: str, rm_dir: str,
                    cand_path: str) -> dict:  # fmt: skip
    """Samples K responses per prompt from π_t (`prev_dir`) and labels them with the oracle; writes
    `cand_path` (npz) and returns its arrays."""
    mesh = sharding.make_mesh(cfg.mesh)
    task = common.load_task(cfg.data, cfg.seed)
    prompts, pb = candidates.training_prompts(cfg, task, tokenizer, inpo.num_prompts, salt=100 + t)
    lm, params = candidates.load_lm(prev_dir, mesh)
    config = sampling.SamplingConfig(
        max_new_tokens=inpo.max_new_tokens, temperature=inpo.temperature, top_k=inpo.top_k
    )
    tokens, lengths, _, _ = candidates.draw(
        lm, params, pb, num_samples=inpo.num_samples, config=config, seed=cfg.seed * 1000 + t,
        tokenizer=tokenizer,
    )  # fmt: skip
    cand = dict(
        prompt_tokens=pb["prompt_tokens"], prompt_lengths=pb["prompt_lengths"], tokens=tokens, lengths=lengths
    )
    proxy = reward.load_proxy(rm_dir, mesh, common.layout(cfg.data))
    chosen, rejected, keep = label_pairs(
        cand, inpo.oracle, proxy=proxy, tokenizer=tokenizer, prompts=prompts,
        batch_size=cfg.train.eval_batch_size,
    )  # fmt: skip
    cand.update(chosen=chosen, rejected=rejected, keep=keep)
    if common.is_main():
        os.makedirs(os.path.dirname(cand_path), exist_ok=True)
        np.savez(cand_path + ".tmp.npz", **cand)
        os.replace(cand_path + ".tmp.npz", cand_path)
    return cand


def _pairs(cand: dict, *, pad_id: int, max_len: int):
    """The kept (chosen, rejected) samples as tokenised pairs, and how many had a response cut."""
    idx = np.nonzero(cand["keep"])[0]
    tok = lambda p, i: cand["tokens"][p, i, : cand["lengths"][p, i]]
    return pipeline.TokenizedPreference.fitted(
        [cand["prompt_tokens"][p, : cand["prompt_lengths"][p]] for p in idx],
        [tok(p, cand["chosen"][p]) for p in idx],
        [tok(p, cand["rejected"][p]) for p in idx],
        np.ones(len(idx), np.float32), pad_id, max_len,
    )  # fmt: skip


def _write_pairs(path: str, pairs, tokenizer) -> None:
    if not common.is_main():
        return
    text = lambda ids: evaluation.decode_text(tokenizer, ids)
    with open(path + ".tmp", "w", encoding="utf-8") as f:
        for i in range(len(pairs)):
            row = {"prompt": text(pairs.prompt_ids[i]), "chosen": text(pairs.chosen_ids[i]),
                   "rejected": text(pairs.rejected_ids[i])}  # fmt: skip
            f.write(json.dumps(row) + "\n")
    os.replace(path + ".tmp", path)


def run(
    *,
    sft_cfg: StageConfig,
    rm_cfg: StageConfig,
    policy_cfg: StageConfig,
    inpo: INPOConfig,
    eval_config: evaluation.EvalConfig,
    workdir: str,
    reuse_from: tuple[str, ...] = (),
) -> dict:
    """Runs (or resumes) T online iterations in `workdir`; writes and returns `results.json`.

    Stages (each in WORKDIR/{stage}/{fingerprint}/, reused when its fingerprint matches): sft, rm (the
    oracle), and per iteration t: iter_{t}/samples (samples.npz with the oracle's labels, pairs.jsonl)
    and iter_{t}/policy (π_{t+1}, its evaluation against π_sft).
    """
    start = time.perf_counter()
    locate = functools.partial(fingerprints.locate, workdir, reuse_from=reuse_from)
    ran = [locate("sft", sft.spec(sft_cfg), done=common.stage_done)]
    sft_dir = ran[-1].dir
    sft.run(sft_cfg, sft_dir, name="sft")
    rm_cfg = dataclasses.replace(rm_cfg, init_from=sft_dir)
    response_len = max(inpo.max_new_tokens, eval_config.max_new_tokens)  # the oracle judges these
    ran.append(locate("rm", reward.spec(rm_cfg, inpo.oracle, response_len), done=common.stage_done))
    rm_dir = ran[-1].dir
    reward.run(rm_cfg, rm_dir, kind=inpo.oracle, name="oracle", ranking_response_len=response_len)
    tokenizer = Tokenizer.load(os.path.join(sft_dir, "tokenizer.model"))
    uses_previous = any(k.startswith("previous_") for k in preference.loss_inputs(policy_cfg.loss.name))
    iterations = []
    prev_dir = sft_dir
    for t in range(1, inpo.iterations + 1):
        t0 = time.perf_counter()
        # Sample from π_t and label with the oracle.
        spec = samples_spec(policy_cfg, inpo, t, prev_dir=prev_dir, rm_dir=rm_dir)
        ran.append(locate(f"iter_{t}/samples", spec, done=_samples_done))
        cand_path = os.path.join(ran[-1].dir, "samples.npz")
        if os.path.exists(cand_path):
            cand = dict(np.load(cand_path))
        else:
            cand = _draw_and_label(t, cfg=policy_cfg, inpo=inpo, tokenizer=tokenizer, prev_dir=prev_dir,
                                   rm_dir=rm_dir, cand_path=cand_path)  # fmt: skip
        pairs, cut = _pairs(cand, pad_id=tokenizer.pad_id, max_len=policy_cfg.data.max_len)
        if not os.path.exists(os.path.join(ran[-1].dir, "pairs.jsonl")):  # a reused stage has them
            _write_pairs(os.path.join(ran[-1].dir, "pairs.jsonl"), pairs, tokenizer)

        # Train π_{t+1} from π_t; evaluate it against π_sft.
        cfg = dataclasses.replace(policy_cfg, init_from=prev_dir)
        kw = dict(
            train_data=pairs, eval_config=eval_config, proxy_dir=rm_dir,
            reference_from=sft_dir if inpo.reference == "sft" else prev_dir,
            previous_from=prev_dir if uses_previous else "",
            sft_from=sft_dir,  # evaluated against π_sft whatever the reference (iterative DPO's is π_t)
        )  # fmt: skip
        ran.append(locate(f"iter_{t}/policy", preference.spec(cfg, **kw), done=common.stage_done))
        result = preference.run(cfg, ran[-1].dir, name=f"iteration {t}", **kw)
        result = {"iteration": t, "pairs": len(pairs), "pairs_truncated": cut,
                  "prompts": int(len(cand["keep"])), **result}  # fmt: skip
        log.info("iteration %d done in %.1fs", t, time.perf_counter() - t0)
        iterations.append(
            {
                k: result.get(k)
                for k in ("iteration", "pairs", *evaluation.RESULT_KEYS, *SFT_BASELINE_KEYS)
                if k != "wall_time_s"
            }  # fmt: skip
        )
        prev_dir = ran[-1].dir
    final = dict(result)
    results = {
        **{k: final.get(k) for k in evaluation.RESULT_KEYS},
        **final,
        "method": f"{policy_cfg.loss.name} x{inpo.iterations} "
        f"({inpo.oracle} oracle, reference={inpo.reference})",
        "inpo": dataclasses.asdict(inpo),
        "iterations": iterations,
        "sft": common.read_results(sft_dir),
        "oracle": common.read_results(rm_dir),
        "wall_time_s": time.perf_counter() - start,
        "stages": {s.name: s.record() for s in ran},
    }
    fingerprints.write_stages(workdir, ran, final=f"iter_{inpo.iterations}/policy")
    common.write_json(os.path.join(workdir, "results.json"), results)
    if common.is_main():
        with open(os.path.join(workdir, "iterations.jsonl"), "w", encoding="utf-8") as f:
            f.writelines(json.dumps(it) + "\n" for it in iterations)
        print("\n" + evaluation.format_table(results, f"INPO on {policy_cfg.data.task}: {results['method']}"))
        for it in iterations:
            g = it.get("win_rate_vs_sft_gold")
            p = it.get("win_rate_vs_sft_proxy")
            fmt = lambda v: "n/a" if v is None else f"{v:.3f}"
            head = f"  iteration {it['iteration']}: pairs {it['pairs']}"
            print(f"{head}, win rate vs SFT gold {fmt(g)}, proxy {fmt(p)}")
    return results
