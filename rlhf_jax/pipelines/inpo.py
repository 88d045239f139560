"""Iterative Nash Policy Optimization (INPO), online: sample from π_t, label with an oracle, train π_{t+1}.

Zhang et al. 2024, "Iterative Nash Policy Optimization: Aligning LLMs with General Preferences via
No-Regret Learning", Algorithm 1. π_1 = π_ref = the SFT policy; for t = 1..T:

  1. sample K responses per training prompt from π_t;
  2. label pairs with the preference oracle (the reward model, of kind `rm.kind`):
     * a reward model: the best of the K (chosen) against the worst (rejected), one pair per prompt;
     * a pairwise preference (ranking) model: a single-elimination tournament over the K gives the
       winner, a tournament of losers the loser, and the pair is kept only if the final check
       P(winner ≻ loser) > 1/2 holds (both A/B orders averaged);
  3. train π_{t+1}, starting from π_t, with `losses.inpo(η, τ)` against π_ref, feeding the log-probs of
     the frozen previous iterate π_t (precomputed once per iteration, `previous_logps.npz`, and handed
     to the preference stage as its extra per-batch inputs, `previous_logps`);
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
import logging
import os
import time

import numpy as np

from rlhf_jax import sampling, sharding
from rlhf_jax.data.tokenizer import load_tokenizer
from rlhf_jax.pipelines import candidates, evaluation, fingerprints, preference, reward, sft, tasks
from rlhf_jax.pipelines import workdir as workdir_io
from rlhf_jax.pipelines.config import StageConfig, rm_kind, section_config, stage_config

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
    reference: "sft" (INPO: π_ref fixed) or "previous" (iterative DPO: the reference is π_t).
    temperature, top_k, max_new_tokens: the sampling policy for π_t's responses.
    """

    iterations: int = 3
    num_samples: int = 8
    num_prompts: int = 0
    reference: str = "sft"
    temperature: float = 1.0
    top_k: int = 0
    max_new_tokens: int = 48

    def __post_init__(self):
        if self.iterations < 1 or self.num_samples < 2:
            raise ValueError(
                f"inpo.iterations={self.iterations} must be >= 1, num_samples={self.num_samples} >= 2"
            )
        if self.reference not in ("sft", "previous"):
            raise ValueError(f"inpo.reference must be sft or previous, got {self.reference!r}")


def _tournament(logit_fn, N: int, P: int, *, best: bool) -> np.ndarray:
    """Single elimination over the N samples of each prompt; `logit_fn(a_idx [P, B], b_idx) -> logit
    P(a ≻ b)`.

    Returns the champion [P] (the best, or with best=False the worst: the loser advances).
    """
    players = np.tile(np.arange(N), (P, 1))
    while players.shape[1] > 1:
        B = players.shape[1] // 2
        a, b = players[:, 0 : 2 * B : 2], players[:, 1 : 2 * B : 2]
        a_wins = logit_fn(a, b) >= 0
        advance = np.where(a_wins == best, a, b)
        players = np.concatenate([advance, players[:, 2 * B :]], axis=1)
    return players[:, 0]


def label_pairs(cand: dict, rm_kind: str, *, proxy, tokenizer, prompts, batch_size: int):
    """(chosen_P, rejected_P, keep_P) candidate indices per prompt by the oracle, a reward model of kind
    `rm_kind` ("pointwise" or "pairwise", module docstring)."""
    tokens, lengths = cand["tokens"], cand["lengths"]
    P, N = lengths.shape
    if rm_kind == "pointwise":
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

    winner = _tournament(logit_fn, N, P, best=True)
    loser = _tournament(logit_fn, N, P, best=False)
    final = logit_fn(winner[:, None], loser[:, None])[:, 0]
    return winner, loser, (final > 0) & (winner != loser)


# The INPOConfig fields that determine an iteration's samples and labels (with the oracle's kind).
SAMPLING_FIELDS = ("num_samples", "num_prompts", "temperature", "top_k", "max_new_tokens")


def samples_spec(
    cfg: StageConfig, inpo: INPOConfig, t: int, *, rm_kind: str, prev_dir: str, rm_dir: str
) -> dict:
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
        "oracle_kind": rm_kind,
    }


def _samples_done(stage_dir: str) -> bool:
    return os.path.exists(os.path.join(stage_dir, "samples.npz"))


def _draw_and_label(t: int, *, cfg: StageConfig, inpo: INPOConfig, rm_kind: str, tokenizer, prev_dir: str,
                    rm_dir: str, cand_path: str) -> dict:  # fmt: skip
    """Samples K responses per prompt from π_t (`prev_dir`) and labels them with the oracle; writes
    `cand_path` (npz) and returns its arrays."""
    mesh = sharding.make_mesh(cfg.mesh)
    task = tasks.load_task(cfg.data, cfg.seed, tokenizer=tokenizer)
    prompts, pb = tasks.training_prompts(
        task, tokenizer, num_prompts=inpo.num_prompts, max_prompt_len=cfg.data.max_prompt_len, seed=cfg.seed,
        salt=100 + t,
    )  # fmt: skip
    lm, params = workdir_io.load_lm(prev_dir, mesh)
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
    proxy = reward.load_proxy(rm_dir, mesh, tasks.layout(cfg.data))
    chosen, rejected, keep = label_pairs(
        cand, rm_kind, proxy=proxy, tokenizer=tokenizer, prompts=prompts,
        batch_size=cfg.train.eval_batch_size,
    )  # fmt: skip
    cand.update(chosen=chosen, rejected=rejected, keep=keep)
    workdir_io.write_npz(cand_path, cand)
    return cand


def previous_logps(previous_from: str) -> preference.ExtraInputs:
    """INPO's extra per-batch inputs: `previous_chosen_logps` / `previous_rejected_logps`, the log-probs of
    each pair under the frozen previous iterate π_t (the stage in `previous_from`), computed once per
    iteration over the training and the held-out pairs (`previous_logps.npz`, `eval_previous_logps.npz`)."""

    def make(*, model, like, mesh, train_data, eval_data, workdir, batch_size):
        previous = workdir_io.load_params(previous_from, like)
        kw = dict(mesh=mesh, batch_size=batch_size)
        logps = lambda file, data: preference.precomputed_logps(
            os.path.join(workdir, file), model, previous, data, **kw
        )
        train_tf = preference.with_logps("previous", *logps("previous_logps.npz", train_data))
        eval_tf = preference.with_logps("previous", *logps("eval_previous_logps.npz", eval_data))
        return train_tf, eval_tf

    return preference.ExtraInputs(
        provides=("previous_chosen_logps", "previous_rejected_logps"),
        spec=fingerprints.stage_input(previous_from),
        make=make,
    )


@dataclasses.dataclass(frozen=True)
class Plan:
    """The INPO pipeline's stage configs: SFT, the oracle (`rm`, of kind `rm_kind`), the policy of every
    iteration (`main`), the iterations' settings and the evaluation."""

    sft: StageConfig
    rm: StageConfig
    main: StageConfig
    inpo: INPOConfig
    eval: evaluation.EvalConfig
    rm_kind: str


def plan(config) -> Plan:
    """Validates an experiment's ConfigDict into the INPO pipeline's stage configs."""
    return Plan(
        sft=stage_config(config, "sft"),
        rm=stage_config(config, "rm"),
        main=stage_config(config, "train"),
        inpo=section_config(INPOConfig, config, "inpo"),
        eval=section_config(evaluation.EvalConfig, config, "eval"),
        rm_kind=rm_kind(config),
    )


def run_pipeline(plan: Plan, workdir: str, *, reuse_from: tuple[str, ...] = ()) -> dict:
    """Runs (or resumes) T online iterations in `workdir`; writes and returns `results.json`.

    Stages (each in WORKDIR/{stage}/{fingerprint}/, reused when its fingerprint matches): sft, rm (the
    oracle), and per iteration t: iter_{t}/samples (samples.npz with the oracle's labels, pairs.jsonl)
    and iter_{t}/policy (π_{t+1}, its evaluation against π_sft).
    """
    inpo, policy_cfg, eval_config = plan.inpo, plan.main, plan.eval
    start = time.perf_counter()
    locate = functools.partial(fingerprints.locate, workdir, reuse_from=reuse_from)
    ran = [sft.run_stage(plan.sft, locate)]
    sft_dir = ran[-1].dir
    rm_cfg = dataclasses.replace(plan.rm, init_from=sft_dir)
    response_len = max(inpo.max_new_tokens, eval_config.max_new_tokens)  # the oracle judges these
    ran.append(reward.run_stage(rm_cfg, locate, kind=plan.rm_kind, response_len=response_len, name="oracle"))
    rm_dir = ran[-1].dir
    tokenizer = load_tokenizer(sft_dir)
    uses_previous = any(k.startswith("previous_") for k in preference.loss_inputs(policy_cfg.loss.name))
    iterations = []
    prev_dir = sft_dir
    for t in range(1, inpo.iterations + 1):
        t0 = time.perf_counter()
        # Sample from π_t and label with the oracle.
        spec = samples_spec(policy_cfg, inpo, t, rm_kind=plan.rm_kind, prev_dir=prev_dir, rm_dir=rm_dir)
        ran.append(locate(f"iter_{t}/samples", spec, done=_samples_done))
        cand_path = os.path.join(ran[-1].dir, "samples.npz")
        if os.path.exists(cand_path):
            cand = dict(np.load(cand_path))
        else:
            cand = _draw_and_label(t, cfg=policy_cfg, inpo=inpo, rm_kind=plan.rm_kind, tokenizer=tokenizer,
                                   prev_dir=prev_dir, rm_dir=rm_dir, cand_path=cand_path)  # fmt: skip
        kept = np.nonzero(cand["keep"])[0]
        pairs, cut = candidates.pairs(
            cand, kept, cand["chosen"][kept], cand["rejected"][kept], pad_id=tokenizer.pad_id,
            max_len=policy_cfg.data.max_len,
        )  # fmt: skip
        if not os.path.exists(os.path.join(ran[-1].dir, "pairs.jsonl")):  # a reused stage has them
            candidates.write_pairs(os.path.join(ran[-1].dir, "pairs.jsonl"), pairs, tokenizer)

        # Train π_{t+1} from π_t; evaluate it against π_sft.
        cfg = dataclasses.replace(policy_cfg, init_from=prev_dir)
        kw = dict(
            train_data=pairs, eval_config=eval_config, proxy_dir=rm_dir,
            reference_from=sft_dir if inpo.reference == "sft" else prev_dir,
            sft_from=sft_dir,  # evaluated against π_sft whatever the reference (iterative DPO's is π_t)
            extra_inputs=previous_logps(prev_dir) if uses_previous else None,
        )  # fmt: skip
        ran.append(locate(f"iter_{t}/policy", preference.spec(cfg, **kw), done=workdir_io.stage_done))
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
        f"({plan.rm_kind} oracle, reference={inpo.reference})",
        "inpo": dataclasses.asdict(inpo),
        "rm_kind": plan.rm_kind,
        "iterations": iterations,
        "sft": workdir_io.read_results(sft_dir),
        "oracle": workdir_io.read_results(rm_dir),
        "wall_time_s": time.perf_counter() - start,
    }
    results = fingerprints.finish(workdir, results, ran, final=f"iter_{inpo.iterations}/policy")
    workdir_io.write_jsonl(os.path.join(workdir, "iterations.jsonl"), iterations)
    if workdir_io.is_main():
        print("\n" + evaluation.format_table(results, f"INPO on {policy_cfg.data.task}: {results['method']}"))
        for it in iterations:
            g = it.get("win_rate_vs_sft_gold")
            p = it.get("win_rate_vs_sft_proxy")
            fmt = lambda v: "n/a" if v is None else f"{v:.3f}"
            head = f"  iteration {it['iteration']}: pairs {it['pairs']}"
            print(f"{head}, win rate vs SFT gold {fmt(g)}, proxy {fmt(p)}")
    return results
