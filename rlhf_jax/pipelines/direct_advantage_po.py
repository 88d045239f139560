"""Direct Advantage Policy Optimization on a math task: SFT → per round: Monte-Carlo data → critic →
step advantages → offline policy → evaluation against the SFT policy.

(Over 400 lines: four stages and their pipeline read together.)

Liu et al. 2024, "Improving Multi-Step Reasoning Abilities of Large Language Models with Direct Advantage
Policy Optimization", arXiv 2412.18279 (NOT ByteDance's DAPO, arXiv 2503.14476: the `dapo` aggregation of
the online loop, `pipelines.grpo`). A step is one line of a solution (`data.steps`), the state s is the
prompt plus the previous steps. Per round r (π_ref = the SFT policy in round 1, round r-1's policy after):

  1. MC data (`round_r/mc`): for `num_problems` training problems (a seeded subset per round), `rollouts`
     solutions from π_ref, split into steps at the tokenizer's newline piece (`data.steps.
     token_step_ends`); for every distinct state s before a step, N = `mc_samples` completions from s
     (`sampling.continue_prefix`), MC_N(s) = the share whose final answer the checker accepts
     (`mc_targets`). Sampled in parts of `problems_per_part` problems, each saved when done, so an
     interrupted stage resumes at its first missing part.
  2. Critic (`round_r/critic`): a `RewardModel` (trunk from π_ref, fresh scalar head) trained with
     `losses.critic_bce` on (s, MC_N(s)), V(s) = σ(v(s)); the states of the last `critic_holdout` share
     of the round's problems are held out: `critic_eval_bce` and `critic_eval_corr` (Pearson correlation
     of V with MC_N there).
  3. Advantages (`round_r/advantages`): for every state, M = `next_steps` steps a_j ~ π_ref(·|s)
     (continuations stopped at the first newline, `sampling.stop_at_first`), V(s∘a_j) by the critic, or
     for a step that ends the solution (EOS) the checker's 1/0 on it (the exact terminal value), and
     Â(s, a_j) = V(s∘a_j) − mean_j V(s∘a_j) (`losses.step_advantages`; `next_state_values`).
  4. Policy (`round_r/policy`): π starts from π_ref and minimises `losses.direct_advantage_po` =
     ½ (Â/β − (log π(a|s) − log π_ref(a|s)))² (Eq. 12-13) over the (s, a_j, Â_j) rows for `train.steps`
     steps; log π(a|s) sums the step's token log-probs (the row's loss mask covers the step only), and
     log π_ref is computed once before training (`reference_logps.npz`).
  5. Evaluation of the round's policy against the SFT policy on the held-out problems
     (`math_eval.evaluate_math`: greedy accuracy, paired gain with a bootstrap interval, pass@k, KL).

Every stage lives in WORKDIR/{stage}/{fingerprint}/ and is reused when its fingerprint matches.
`samples_generated` counts the sequences sampled by steps 1 and 3 over all rounds (rollouts, MC
completions and next steps), `sampled_tokens` their tokens, the budget a GRPO run is matched on.
"""

from __future__ import annotations

import dataclasses
import functools
import os
import time

import jax
import numpy as np

from rlhf_jax import losses, models, rewards, sampling, scoring, sharding
from rlhf_jax.data import pipeline, steps
from rlhf_jax.data.tokenizer import load_tokenizer
from rlhf_jax.pipelines import evaluation, fingerprints, math_eval, reward, sft, tasks, training
from rlhf_jax.pipelines import workdir as workdir_io
from rlhf_jax.pipelines.config import StageConfig, section_config, stage_config
from rlhf_jax.train import metrics
from rlhf_jax.train import steps as train_steps


@dataclasses.dataclass(frozen=True)
class DirectAdvantagePOConfig:
    """The method's settings (the critic's and the policy's optimizers are the `critic` and `train`
    sections).

    Attributes:
      rounds: offline rounds; round r > 1 takes round r-1's policy as π_ref.
      num_problems: training problems per round (a seeded subset of the task's training problems).
      rollouts: solutions sampled from π_ref per problem; their states are the round's states.
      mc_samples: N, completions per state for MC_N(s).
      next_steps: M, steps a_j ~ π_ref(·|s) per state for the advantages.
      beta: β of `losses.direct_advantage_po`.
      temperature: of every sample (rollouts, completions, steps).
      max_new_tokens: budget of a rollout and of a completion from a state.
      max_step_tokens: budget of one sampled step.
      critic_holdout: share of the round's problems whose states are held out of critic training.
      problems_per_part: problems per saved part of the MC stage (its resume granularity).
      states_per_call: states per sampling call (padded, so one compilation serves every call).
      reward: the answer checker (`rlhf_jax.rewards`, e.g. "gsm8k").
    """

    rounds: int = 1
    num_problems: int = 64
    rollouts: int = 2
    mc_samples: int = 8
    next_steps: int = 4
    beta: float = 0.2
    temperature: float = 1.0
    max_new_tokens: int = 56
    max_step_tokens: int = 24
    critic_holdout: float = 0.125
    problems_per_part: int = 16
    states_per_call: int = 64
    reward: str = "gsm8k"

    def __post_init__(self):
        checks = (
            ("rounds", self.rounds >= 1, ">= 1"),
            ("num_problems", self.num_problems >= 2, ">= 2"),
            ("rollouts", self.rollouts >= 1, ">= 1"),
            ("mc_samples", self.mc_samples >= 1, ">= 1"),
            ("next_steps", self.next_steps >= 2, ">= 2 (advantages compare the steps of a state)"),
            ("beta", self.beta > 0, "> 0"),
            ("temperature", self.temperature > 0, "> 0"),
            ("max_new_tokens", self.max_new_tokens >= 1, ">= 1"),
            ("max_step_tokens", self.max_step_tokens >= 1, ">= 1"),
            ("critic_holdout", 0 < self.critic_holdout < 1, "in (0, 1)"),
            ("problems_per_part", self.problems_per_part >= 1, ">= 1"),
            ("states_per_call", self.states_per_call >= 1, ">= 1"),
        )
        for field, ok, want in checks:
            if not ok:
                raise ValueError(f"direct_advantage_po.{field} must be {want}, got {getattr(self, field)!r}")
        rewards.make(self.reward)

    def sampling(self, max_new_tokens: int) -> sampling.SamplingConfig:
        return sampling.SamplingConfig(max_new_tokens=max_new_tokens, temperature=self.temperature)


# ----------------------------------------------------------------------------------------------------
# Pure pieces (tested against hand values).


def mc_targets(correct_SN: np.ndarray) -> np.ndarray:
    """MC_N(s) [S]: the share of each state's N completions whose answer is accepted (float32)."""
    correct_SN = np.asarray(correct_SN, np.float32)
    if correct_SN.ndim != 2 or correct_SN.shape[1] < 1:
        raise ValueError(f"correct_SN must be [S, N] with N >= 1, got shape {correct_SN.shape}")
    return correct_SN.mean(axis=1)


def rollout_states(completion_ids: list[np.ndarray], *, newline_ids, decode) -> list[tuple[int, ...]]:
    """The distinct states of a problem's rollouts as prefixes of completion ids (the empty prefix is the
    prompt alone), in order of first appearance: for each rollout the prefixes before each of its steps
    (`steps.token_step_ends`); a rollout with no step (all blank) contributes the prompt state only."""
    seen: dict[tuple[int, ...], None] = {}
    for ids in completion_ids:
        ids = [int(t) for t in ids]
        ends = steps.token_step_ends(ids, newline_ids=newline_ids, decode=decode)
        for start in [0, *ends[:-1]]:
            seen.setdefault(tuple(ids[:start]), None)
    return list(seen)


def next_state_values(critic_SM: np.ndarray, terminal_SM: np.ndarray, correct_SM: np.ndarray) -> np.ndarray:
    """V(s∘a_j) [S, M]: the critic's value, or for a step that ends the solution the checker's 1/0."""
    return np.where(terminal_SM, np.asarray(correct_SM, np.float32), np.asarray(critic_SM, np.float32))


def advantage_rows(states: list[np.ndarray], steps_SM: list[list[np.ndarray]], advantages_SM: np.ndarray):
    """The policy's training rows: (state ids, step ids, Â) for every state and each of its M steps, in
    (s, j) order; a step with no tokens is dropped (it carries no log-probability)."""
    out = []
    for s, state in enumerate(states):
        for j, step in enumerate(steps_SM[s]):
            if len(step):
                out.append(
                    (np.asarray(state, np.int32), np.asarray(step, np.int32), float(advantages_SM[s, j]))
                )
    return out


# ----------------------------------------------------------------------------------------------------
# Sampling helpers.


def _pad(rows: list, width: int) -> tuple[np.ndarray, np.ndarray]:
    """Ragged id lists right-padded with zeros to [R, width], and their lengths [R]."""
    out = np.zeros((len(rows), width), np.int32)
    for i, r in enumerate(rows):
        out[i, : len(r)] = r
    return out, np.asarray([len(r) for r in rows], np.int32)


def _continue_states(model, params, prompt_PT, prompt_len_P, prefix_PT, prefix_len_P, *, config, n, rng,
                     eos_id, pad_id, per_call: int) -> sampling.SampleOutput:  # fmt: skip
    """`sampling.continue_prefix` over the rows in calls of exactly `per_call` rows (the last padded with
    copies of row 0, dropped), so every call has one shape; row i is seeded by its index."""
    R = len(prompt_len_P)
    parts = []
    for start in range(0, R, per_call):
        idx = np.arange(start, start + per_call)
        take = np.where(idx < R, idx, 0)
        out = sampling.continue_prefix(
            model, params, prompt_PT[take], prompt_len_P[take], prefix_PT[take], prefix_len_P[take],
            config=config, num_samples=n, rng=rng, eos_id=eos_id, pad_id=pad_id, prompt_ids=idx,
        )  # fmt: skip
        keep = idx < R
        parts.append(sampling.SampleOutput(*(x[keep] for x in out)))
    return sampling.SampleOutput(*(np.concatenate(xs) for xs in zip(*parts, strict=True)))


def _texts(tokenizer, prefix_PT, prefix_len_P, tokens_PNT, lengths_PN) -> list[str]:
    """Decoded prefix + continuation of every sample, in (p, n) order."""
    return [
        evaluation.decode_text(
            tokenizer, np.concatenate([prefix_PT[p, : prefix_len_P[p]], tokens_PNT[p, n, : lengths_PN[p, n]]])
        )
        for p in range(tokens_PNT.shape[0])
        for n in range(tokens_PNT.shape[1])
    ]


def _newline_ids(tokenizer) -> tuple[int, ...]:
    ids = tuple(tokenizer.encode("\n"))
    if len(ids) != 1:
        raise ValueError(
            f"the tokenizer encodes a newline as {ids}, not one piece; steps are lines, cut at a newline "
            "token"
        )
    return ids


# ----------------------------------------------------------------------------------------------------
# Stage 1: Monte-Carlo data.


def round_problems(problems, dapo: DirectAdvantagePOConfig, *, seed: int, round_: int) -> list[int]:
    """Indices of round `round_`'s training problems: a permutation seeded by (seed, round), cut."""
    if dapo.num_problems > len(problems):
        raise ValueError(
            f"direct_advantage_po.num_problems={dapo.num_problems} exceeds the task's {len(problems)} "
            "training problems (data.num_train)"
        )
    order = np.random.default_rng([seed, 41, round_]).permutation(len(problems))
    return [int(i) for i in order[: dapo.num_problems]]


MC_FIELDS = ("num_problems", "rollouts", "mc_samples", "temperature", "max_new_tokens", "problems_per_part",
             "reward")  # fmt: skip


def mc_spec(cfg: StageConfig, dapo: DirectAdvantagePOConfig, round_: int, ref_dir: str) -> dict:
    """What round `round_`'s MC data depend on: π_ref, the problems and the sampling settings."""
    return {
        "kind": "direct_advantage_po:mc", "round": round_, "seed": cfg.seed,
        "data": fingerprints.data_spec(cfg.data), "reference": fingerprints.stage_input(ref_dir),
        **{k: getattr(dapo, k) for k in MC_FIELDS},
    }  # fmt: skip


def _file_done(name: str):
    return lambda stage_dir: os.path.exists(os.path.join(stage_dir, name))


def run_mc(cfg: StageConfig, stage_dir: str, dapo: DirectAdvantagePOConfig, round_: int, *, ref_dir: str,
           tokenizer, problems) -> dict:  # fmt: skip
    """Stage 1 (module docstring) in `stage_dir`; returns the arrays of `mc.npz`: `problem` [S] (index
    into the task's training problems), `prefix` [S, max_new_tokens] and `prefix_length` [S] (the state's
    completion ids after the prompt), `mc_targets` [S], `reference_correct` [R] (each rollout's 1/0), and
    the counts `sequences`, `tokens`."""
    path = os.path.join(stage_dir, "mc.npz")
    if os.path.exists(path):
        return dict(np.load(path))
    mesh = sharding.make_mesh(cfg.mesh)
    model, params = workdir_io.load_lm(ref_dir, mesh)
    correct = rewards.make(dapo.reward)
    newline, T = _newline_ids(tokenizer), dapo.max_new_tokens
    decode = functools.partial(evaluation.decode_text, tokenizer)
    chosen = round_problems(problems, dapo, seed=cfg.seed, round_=round_)
    parts = []
    for part, start in enumerate(range(0, len(chosen), dapo.problems_per_part)):
        part_path = os.path.join(stage_dir, f"part_{part:04d}.npz")
        if os.path.exists(part_path):  # a resumed stage keeps the parts it finished
            parts.append(dict(np.load(part_path)))
            continue
        idx = chosen[start : start + dapo.problems_per_part]
        pb = pipeline.tokenize_prompts([problems[i].prompt for i in idx], tokenizer, cfg.data.max_prompt_len)
        pb = pb.batch(np.arange(len(idx)), cfg.data.max_prompt_len)
        key = jax.random.fold_in(jax.random.key(cfg.seed + 43), round_ * 10_000 + part)
        roll = sampling.sample(
            model, params, pb["prompt_tokens"], pb["prompt_lengths"], config=dapo.sampling(T),
            num_samples=dapo.rollouts, rng=jax.random.fold_in(key, 0), eos_id=tokenizer.eos_ids,
            pad_id=tokenizer.pad_id, prompt_ids=np.asarray(idx),
        )  # fmt: skip
        roll_text = evaluation.decode_completions(tokenizer, roll.tokens_PNT, roll.lengths_PN)
        ref_correct = np.asarray(
            correct(prompts=[problems[i].prompt for i in idx for _ in range(dapo.rollouts)],
                    completions=[t for row in roll_text for t in row],
                    answer=[problems[i].answer for i in idx for _ in range(dapo.rollouts)]), np.float32,
        )  # fmt: skip
        which, prefixes = [], []
        for p in range(len(idx)):
            done = [roll.tokens_PNT[p, n, : roll.lengths_PN[p, n]] for n in range(dapo.rollouts)]
            for prefix in rollout_states(done, newline_ids=newline, decode=decode):
                which.append(p)
                prefixes.append(prefix)
        prefix_ST, prefix_len_S = _pad(prefixes, T)
        which = np.asarray(which, np.int64)
        mc = _continue_states(
            model, params, pb["prompt_tokens"][which], pb["prompt_lengths"][which], prefix_ST, prefix_len_S,
            config=dapo.sampling(T), n=dapo.mc_samples, rng=jax.random.fold_in(key, 1),
            eos_id=tokenizer.eos_ids, pad_id=tokenizer.pad_id, per_call=dapo.states_per_call,
        )  # fmt: skip
        texts = _texts(tokenizer, prefix_ST, prefix_len_S, mc.tokens_PNT, mc.lengths_PN)
        n = dapo.mc_samples
        ok_SN = np.asarray(
            correct(prompts=[problems[idx[p]].prompt for p in which for _ in range(n)], completions=texts,
                    answer=[problems[idx[p]].answer for p in which for _ in range(n)]), np.float32,
        ).reshape(-1, n)  # fmt: skip
        arrays = {
            "problem": np.asarray(idx, np.int64)[which], "prefix": prefix_ST, "prefix_length": prefix_len_S,
            "mc_targets": mc_targets(ok_SN), "reference_correct": ref_correct,
            "sequences": np.int64(roll.lengths_PN.size + mc.lengths_PN.size),
            "tokens": np.int64(roll.lengths_PN.sum() + mc.lengths_PN.sum()),
        }  # fmt: skip
        workdir_io.write_npz(part_path, arrays)
        parts.append(arrays)
    out = {k: np.concatenate([p[k] for p in parts]) for k in ("problem", "prefix", "prefix_length",
                                                              "mc_targets", "reference_correct")}  # fmt: skip
    out["sequences"] = np.int64(sum(int(p["sequences"]) for p in parts))
    out["tokens"] = np.int64(sum(int(p["tokens"]) for p in parts))
    workdir_io.write_npz(path, out)  # last: marks the stage as done
    return out


def _state_ids(problems, tokenizer, max_prompt_len: int, problem_S, prefix_ST, prefix_len_S) -> list:
    """Token ids (BOS + prompt + prefix) of each state."""
    prompt_ids = pipeline.tokenize_prompts(
        [problems[i].prompt for i in problem_S], tokenizer, max_prompt_len
    ).prompt_ids
    return [np.concatenate([np.asarray(p, np.int32), prefix_ST[s, : prefix_len_S[s]]])
            for s, p in enumerate(prompt_ids)]  # fmt: skip


# ----------------------------------------------------------------------------------------------------
# Stage 2: the critic.


def critic_split(problem_S: np.ndarray, chosen: list[int], holdout: float) -> np.ndarray:
    """A held-out mask [S]: the states of the last `holdout` share (at least one) of the round's problems."""
    held = set(chosen[len(chosen) - max(1, int(round(holdout * len(chosen)))) :])
    return np.asarray([int(p) in held for p in problem_S], bool)


def critic_spec(cfg: StageConfig, dapo: DirectAdvantagePOConfig, mc_dir: str) -> dict:
    return {
        **fingerprints.trainer_spec(cfg, kind="direct_advantage_po:critic", loss=False),
        "mc": fingerprints.stage_input(mc_dir), "critic_holdout": dapo.critic_holdout,
    }  # fmt: skip


def _rows(ids: list, width: int, pad_id: int) -> pipeline.TokenizedSFT:
    """States as rows with no completion (the critic reads the last real token)."""
    empty = [np.zeros(0, np.int32)] * len(ids)
    return pipeline.TokenizedSFT(list(ids), empty, np.ones(len(ids), np.float32), pad_id, width)


def _with(column: str, values_X: np.ndarray):
    """A batch transform adding `column` [B] from per-example values (0 on padding rows)."""

    def transform(batch: dict) -> dict:
        ids = batch["example_ids"]
        return {**batch, column: np.where(ids >= 0, values_X[np.maximum(ids, 0)], 0.0).astype(np.float32)}

    return transform


def run_critic(cfg: StageConfig, stage_dir: str, dapo: DirectAdvantagePOConfig, *, mc: dict, chosen,
               tokenizer, problems) -> dict:  # fmt: skip
    """Stage 2 (module docstring) in `stage_dir` (`cfg.init_from`: π_ref, whose trunk it starts from)."""
    os.makedirs(stage_dir, exist_ok=True)
    if workdir_io.stage_done(stage_dir):
        return workdir_io.read_results(stage_dir)
    if workdir_io.is_main():
        tokenizer.save(stage_dir)
    mesh = sharding.make_mesh(cfg.mesh)
    width = cfg.data.max_prompt_len + dapo.max_new_tokens + dapo.max_step_tokens
    ids = _state_ids(
        problems, tokenizer, cfg.data.max_prompt_len, mc["problem"], mc["prefix"], mc["prefix_length"]
    )
    held_S = critic_split(mc["problem"], chosen, dapo.critic_holdout)
    train_idx, eval_idx = np.flatnonzero(~held_S), np.flatnonzero(held_S)
    if not len(train_idx) or not len(eval_idx):
        raise ValueError(f"critic: {len(train_idx)} training and {len(eval_idx)} held-out states; need both")
    train_data = _rows([ids[i] for i in train_idx], width, tokenizer.pad_id)
    data_iter = iter(pipeline.batches(train_data, global_batch_size=cfg.train.batch_size, seed=cfg.seed))
    saved = workdir_io.load_model_json(cfg.init_from)
    saved.pop("kind")
    model_cfg = dataclasses.replace(models.ModelConfig(**saved), max_len=max(saved["max_len"], width))
    model = models.RewardModel(model_cfg, mesh=mesh)
    params = reward.init_reward_params(model, jax.random.key(cfg.seed), init_from=cfg.init_from)
    objective = functools.partial(train_steps.critic_objective, model=model)
    step_fn, state = training.setup(
        cfg.optim, cfg.train, seed=cfg.seed, mesh=mesh, model=model, params=params, objective=objective,
        weight_fn=train_steps.pair_weight,
    )  # fmt: skip
    training.log_startup("critic", mesh, model_cfg, cfg.train.batch_size)
    ckpt, state = training.restore(stage_dir, cfg.checkpoint, state, data_iter)
    state = training.fit(
        stage_dir, state, step_fn, loop=cfg.train.loop(cfg.progress), checkpointer=ckpt, mesh=mesh,
        data_iter=data_iter, transform=_with("mc_targets", mc["mc_targets"][train_idx]), name="critic",
    )  # fmt: skip
    held = _rows([ids[i] for i in eval_idx], width, tokenizer.pad_id).batch(np.arange(len(eval_idx)), width)
    logits = scoring.score_pointwise(model, state.params, held, batch_size=cfg.train.eval_batch_size)
    y = mc["mc_targets"][eval_idx]
    bce = np.asarray(losses.critic_bce(value_logits=logits, targets=y))
    v = 1.0 / (1.0 + np.exp(-np.asarray(logits, np.float64)))
    corr = float(np.corrcoef(v, y)[0, 1]) if v.std() > 0 and y.std() > 0 else None
    results = {
        "stage": "critic", "steps": cfg.train.steps, "train_states": int(len(train_idx)),
        "eval_states": int(len(eval_idx)), "critic_eval_bce": float(bce.mean()),
        # The BCE of predicting the training states' mean target everywhere: what the critic must beat.
        "critic_eval_bce_constant": float(np.mean(losses.critic_bce(
            value_logits=np.full_like(y, _logit(mc["mc_targets"][train_idx].mean())), targets=y))),
        "critic_eval_corr": corr, "critic_eval_value_mean": float(v.mean()),
        "mc_target_eval_mean": float(y.mean()),
        "nonfinite_steps": int(jax.device_get(state.nonfinite_count)),
    }  # fmt: skip
    workdir_io.write_json(os.path.join(stage_dir, "results.json"), results)
    metrics.plot_curves(stage_dir, ("loss", "abs_error"))
    workdir_io.save_params(stage_dir, state.params, model_cfg, "critic")  # last: marks the stage as done
    return results


def _logit(p: float) -> float:
    p = min(max(p, 1e-4), 1 - 1e-4)
    return float(np.log(p / (1 - p)))


def load_critic(stage_dir: str, mesh):
    saved = workdir_io.load_model_json(stage_dir)
    saved.pop("kind")
    model = models.RewardModel(models.ModelConfig(**saved), mesh=mesh)
    return model, workdir_io.load_params(stage_dir, models.init_params(model, jax.random.key(0)))


# ----------------------------------------------------------------------------------------------------
# Stage 3: advantages.

ADVANTAGE_FIELDS = ("next_steps", "temperature", "max_step_tokens", "reward")


def advantages_spec(cfg: StageConfig, dapo: DirectAdvantagePOConfig, *, mc_dir: str, critic_dir: str,
                    ref_dir: str) -> dict:  # fmt: skip
    return {
        "kind": "direct_advantage_po:advantages", "seed": cfg.seed, "data": fingerprints.data_spec(cfg.data),
        "mc": fingerprints.stage_input(mc_dir), "critic": fingerprints.stage_input(critic_dir),
        "reference": fingerprints.stage_input(ref_dir), **{k: getattr(dapo, k) for k in ADVANTAGE_FIELDS},
    }  # fmt: skip


def run_advantages(cfg: StageConfig, stage_dir: str, dapo: DirectAdvantagePOConfig, round_: int, *, mc: dict,
                   ref_dir: str, critic_dir: str, tokenizer, problems) -> dict:  # fmt: skip
    """Stage 3 (module docstring) in `stage_dir`; returns the arrays of `advantages.npz`: per state
    `steps` [S, M, max_step_tokens], `step_lengths`, `terminal`, `values`, `advantages` [S, M], and the
    counts `sequences`, `tokens`."""
    path = os.path.join(stage_dir, "advantages.npz")
    if os.path.exists(path):
        return dict(np.load(path))
    mesh = sharding.make_mesh(cfg.mesh)
    model, params = workdir_io.load_lm(ref_dir, mesh)
    newline = _newline_ids(tokenizer)
    pb = pipeline.tokenize_prompts(
        [problems[i].prompt for i in mc["problem"]], tokenizer, cfg.data.max_prompt_len
    )
    pb = pb.batch(np.arange(len(mc["problem"])), cfg.data.max_prompt_len)
    M, Ts = dapo.next_steps, dapo.max_step_tokens
    out = _continue_states(
        model, params, pb["prompt_tokens"], pb["prompt_lengths"], mc["prefix"], mc["prefix_length"],
        config=dapo.sampling(Ts), n=M, rng=jax.random.fold_in(jax.random.key(cfg.seed + 47), round_),
        eos_id=(*tokenizer.eos_ids, *newline), pad_id=tokenizer.pad_id, per_call=dapo.states_per_call,
    )  # fmt: skip
    lengths_SM = sampling.stop_at_first(out.tokens_PNT, out.lengths_PN, newline)
    S = len(mc["problem"])
    last_SM = np.take_along_axis(out.tokens_PNT, np.maximum(lengths_SM - 1, 0)[..., None], -1)[..., 0]
    terminal_SM = np.isin(last_SM, tokenizer.eos_ids) & (lengths_SM > 0)
    texts = _texts(tokenizer, mc["prefix"], mc["prefix_length"], out.tokens_PNT, lengths_SM)
    correct_SM = np.asarray(
        rewards.make(dapo.reward)(
            prompts=[problems[i].prompt for i in mc["problem"] for _ in range(M)], completions=texts,
            answer=[problems[i].answer for i in mc["problem"] for _ in range(M)],
        ), np.float32,
    ).reshape(S, M)  # fmt: skip
    state_PT, state_len_P = sampling.with_prefix(
        pb["prompt_tokens"], pb["prompt_lengths"], mc["prefix"], mc["prefix_length"]
    )
    rows = scoring.completions_to_batch(
        state_PT, state_len_P, out.tokens_PNT, lengths_SM, pad_id=tokenizer.pad_id
    )
    critic_model, critic_params = load_critic(critic_dir, mesh)
    logits = scoring.score_pointwise(critic_model, critic_params, rows, batch_size=cfg.train.eval_batch_size)
    critic_SM = (1.0 / (1.0 + np.exp(-np.asarray(logits, np.float64)))).reshape(S, M)
    values_SM = next_state_values(critic_SM, terminal_SM, correct_SM)
    arrays = {
        "steps": out.tokens_PNT, "step_lengths": lengths_SM, "terminal": terminal_SM,
        "values": values_SM.astype(np.float32),
        "advantages": np.asarray(losses.step_advantages(values_SM), np.float32),
        "sequences": np.int64(out.lengths_PN.size), "tokens": np.int64(out.lengths_PN.sum()),
    }  # fmt: skip
    workdir_io.write_npz(path, arrays)
    return arrays


# ----------------------------------------------------------------------------------------------------
# Stage 4: the policy.


def policy_spec(cfg: StageConfig, dapo: DirectAdvantagePOConfig, advantages_dir: str) -> dict:
    return {
        **fingerprints.trainer_spec(cfg, kind="direct_advantage_po:policy", loss=False),
        "advantages": fingerprints.stage_input(advantages_dir), "beta": dapo.beta,
    }  # fmt: skip


def run_policy(cfg: StageConfig, stage_dir: str, dapo: DirectAdvantagePOConfig, *, mc: dict, adv: dict,
               tokenizer, problems, name: str) -> dict:  # fmt: skip
    """Stage 4 (module docstring) in `stage_dir`, from `cfg.init_from` (π_ref, also the reference)."""
    os.makedirs(stage_dir, exist_ok=True)
    if workdir_io.stage_done(stage_dir):
        return workdir_io.read_results(stage_dir)
    if workdir_io.is_main():
        tokenizer.save(stage_dir)
    mesh = sharding.make_mesh(cfg.mesh)
    width = cfg.data.max_prompt_len + dapo.max_new_tokens + dapo.max_step_tokens
    states = _state_ids(
        problems, tokenizer, cfg.data.max_prompt_len, mc["problem"], mc["prefix"], mc["prefix_length"]
    )
    steps_SM = [[adv["steps"][s, j, : adv["step_lengths"][s, j]] for j in range(dapo.next_steps)]
                for s in range(len(states))]  # fmt: skip
    rows = advantage_rows(states, steps_SM, adv["advantages"])
    data = pipeline.TokenizedSFT([r[0] for r in rows], [r[1] for r in rows], np.ones(len(rows), np.float32),
                                 tokenizer.pad_id, width)  # fmt: skip
    advantages_X = np.asarray([r[2] for r in rows], np.float32)

    model, params = workdir_io.load_lm(cfg.init_from, mesh)
    model_cfg = dataclasses.replace(model.config, max_len=max(model.config.max_len, width))
    model = models.Transformer(model_cfg, mesh=mesh)
    ref_path = os.path.join(stage_dir, "reference_logps.npz")
    if os.path.exists(ref_path):
        reference_X = np.load(ref_path)["logps"]
    else:  # π_ref = the initial params: computed once, before the first update
        reference_X = scoring.sequence_logps(model, params, data.batch(np.arange(len(data)), width),
                                             batch_size=cfg.train.eval_batch_size)  # fmt: skip
        workdir_io.write_npz(ref_path, {"logps": reference_X})
    objective = functools.partial(train_steps.direct_advantage_po_objective, model=model, beta=dapo.beta)
    step_fn, state = training.setup(
        cfg.optim, cfg.train, seed=cfg.seed, mesh=mesh, model=model, params=params, objective=objective,
        weight_fn=train_steps.pair_weight,
    )  # fmt: skip
    del params
    training.log_startup(name, mesh, model_cfg, cfg.train.batch_size)
    data_iter = iter(pipeline.batches(data, global_batch_size=cfg.train.batch_size, seed=cfg.seed))
    ckpt, state = training.restore(stage_dir, cfg.checkpoint, state, data_iter)
    add_ref, add_adv = _with("reference_logps", reference_X), _with("advantages", advantages_X)
    state = training.fit(
        stage_dir, state, step_fn, loop=cfg.train.loop(cfg.progress), checkpointer=ckpt, mesh=mesh,
        data_iter=data_iter, transform=lambda b: add_adv(add_ref(b)), name=name,
    )  # fmt: skip
    final = scoring.sequence_logps(model, state.params, data.batch(np.arange(len(data)), width),
                                   batch_size=cfg.train.eval_batch_size)  # fmt: skip
    log_ratio = final - reference_X
    results = {
        "stage": name, "steps": cfg.train.steps, "rows": len(rows),
        "nonfinite_steps": int(jax.device_get(state.nonfinite_count)),
        "final_loss": float(np.mean(losses.direct_advantage_po(
            policy_logps=final, reference_logps=reference_X, advantages=advantages_X, beta=dapo.beta))),
        "initial_loss": float(np.mean(0.5 * (advantages_X / dapo.beta) ** 2)),
        # Does the trained log-ratio follow its target Â/β (the loss's minimiser)?
        "log_ratio_corr": float(np.corrcoef(log_ratio, advantages_X)[0, 1])
        if log_ratio.std() > 0 and advantages_X.std() > 0 else None,
        "log_ratio_mean": float(log_ratio.mean()),
    }  # fmt: skip
    workdir_io.write_json(os.path.join(stage_dir, "results.json"), results)
    metrics.plot_curves(stage_dir, ("loss", "log_ratio"))
    training.save_policy(stage_dir, state, None, model_cfg, None)  # last: marks the stage as done
    return results


# ----------------------------------------------------------------------------------------------------
# The pipeline.


@dataclasses.dataclass(frozen=True)
class Plan:
    """The pipeline's stage configs: SFT, the critic (`critic` section), the policy (`train` section),
    the method's settings and the math evaluation."""

    sft: StageConfig
    critic: StageConfig
    main: StageConfig
    dapo: DirectAdvantagePOConfig
    eval: math_eval.MathEvalConfig


def plan(config) -> Plan:
    """Validates an experiment's ConfigDict into the pipeline's stage configs."""
    if config.data.task not in ("arith", "math"):
        raise ValueError(
            f"direct_advantage_po needs a math task (data.task arith or math), got {config.data.task!r}"
        )
    return Plan(
        sft=stage_config(config, "sft"),
        critic=stage_config(config, "critic"),
        main=stage_config(config, "train"),
        dapo=section_config(DirectAdvantagePOConfig, config, "direct_advantage_po"),
        eval=section_config(math_eval.MathEvalConfig, config, "eval"),
    )


ROUND_KEYS = ("accuracy", "accuracy_ci95", "accuracy_gain", "accuracy_gain_ci95", "pass_at_k", "kl_to_sft",
              "mean_response_length")  # fmt: skip


def run_pipeline(plan: Plan, workdir: str, *, reuse_from: tuple[str, ...] = ()) -> dict:
    """Runs SFT → `rounds` × (MC data → critic → advantages → policy → evaluation); writes results.json
    (`math_eval.RESULT_KEYS` first, `accuracy_vs_sft` = the paired gain, per-round `accuracy_round{r}`,
    `samples_generated`, `sampled_tokens`) and prints the table."""
    start = time.perf_counter()
    dapo = plan.dapo
    locate = functools.partial(fingerprints.locate, workdir, reuse_from=reuse_from)
    ran = [sft.run_stage(plan.sft, locate)]
    sft_dir = ran[-1].dir
    tokenizer = load_tokenizer(sft_dir)
    task = tasks.load_task(plan.main.data, plan.main.seed, tokenizer=tokenizer)
    if not task.problems:
        raise ValueError(f"data.task={plan.main.data.task!r} has no problems: give GSM8K or MATH-style files")
    mesh = sharding.make_mesh(plan.main.mesh)
    eval_spec = {"eval": plan.eval, "sft": fingerprints.stage_input(sft_dir), "seed": plan.main.seed,
                 "data": fingerprints.data_spec(plan.main.data), "eval_reward": dapo.reward}  # fmt: skip
    sft_lm = functools.cache(lambda: workdir_io.load_lm(sft_dir, mesh))
    ref_dir, rounds, sequences, tokens = sft_dir, [], 0, 0
    for r in range(1, dapo.rounds + 1):
        ran.append(locate(f"round_{r}/mc", mc_spec(plan.main, dapo, r, ref_dir), done=_file_done("mc.npz")))
        mc_dir = ran[-1].dir
        mc = run_mc(plan.main, mc_dir, dapo, r, ref_dir=ref_dir, tokenizer=tokenizer, problems=task.problems)
        critic_cfg = dataclasses.replace(plan.critic, init_from=ref_dir)
        ran.append(
            locate(f"round_{r}/critic", critic_spec(critic_cfg, dapo, mc_dir), done=workdir_io.stage_done)
        )
        critic_dir = ran[-1].dir
        chosen = round_problems(task.problems, dapo, seed=plan.main.seed, round_=r)
        critic = run_critic(critic_cfg, critic_dir, dapo, mc=mc, chosen=chosen, tokenizer=tokenizer,
                            problems=task.problems)  # fmt: skip
        spec = advantages_spec(plan.main, dapo, mc_dir=mc_dir, critic_dir=critic_dir, ref_dir=ref_dir)
        ran.append(locate(f"round_{r}/advantages", spec, done=_file_done("advantages.npz")))
        adv = run_advantages(plan.main, ran[-1].dir, dapo, r, mc=mc, ref_dir=ref_dir, critic_dir=critic_dir,
                             tokenizer=tokenizer, problems=task.problems)  # fmt: skip
        cfg = dataclasses.replace(plan.main, init_from=ref_dir)
        ran.append(
            locate(f"round_{r}/policy", policy_spec(cfg, dapo, ran[-1].dir), done=workdir_io.stage_done)
        )
        policy_dir = ran[-1].dir
        trained = run_policy(cfg, policy_dir, dapo, mc=mc, adv=adv, tokenizer=tokenizer,
                             problems=task.problems, name=f"policy (round {r})")  # fmt: skip
        ev_path = os.path.join(policy_dir, f"evaluation_{fingerprints.fingerprint(eval_spec)[:12]}.json")
        if os.path.exists(ev_path):
            ev = workdir_io.read_json(ev_path)
        else:
            model, policy_params = workdir_io.load_lm(policy_dir, mesh)
            ev = math_eval.evaluate_math(
                model=model, policy_params=policy_params, sft_params=sft_lm()[1], tokenizer=tokenizer,
                problems=task.eval_problems, correct=rewards.make(dapo.reward), config=plan.eval,
                seed=plan.main.seed, max_prompt_len=plan.main.data.max_prompt_len,
                batch_size=plan.main.train.eval_batch_size,
            )  # fmt: skip
            workdir_io.write_json(ev_path, ev)
        sequences += int(mc["sequences"]) + int(adv["sequences"])
        tokens += int(mc["tokens"]) + int(adv["tokens"])
        rounds.append({
            "round": r, **{k: ev.get(k) for k in ROUND_KEYS}, "states": int(len(mc["problem"])),
            "mc_target_mean": float(mc["mc_targets"].mean()),
            "reference_train_accuracy": float(mc["reference_correct"].mean()),
            "terminal_step_fraction": float(adv["terminal"].mean()),
            "advantage_abs_mean": float(np.abs(adv["advantages"]).mean()),
            "samples_generated": sequences, "sampled_tokens": tokens, "critic": critic, "policy": trained,
        })  # fmt: skip
        ref_dir = policy_dir
    results = {
        **{k: ev.get(k) for k in math_eval.RESULT_KEYS if k != "wall_time_s"},
        **ev,
        "accuracy_vs_sft": ev["accuracy_gain"],
        "accuracy_vs_sft_ci95": ev["accuracy_gain_ci95"],
        **{f"accuracy_round{x['round']}": x["accuracy"] for x in rounds},
        **{f"accuracy_vs_sft_round{x['round']}": x["accuracy_gain"] for x in rounds},
        "critic_eval_bce": rounds[-1]["critic"]["critic_eval_bce"],
        "critic_eval_corr": rounds[-1]["critic"]["critic_eval_corr"],
        "samples_generated": sequences,
        "sampled_tokens": tokens,
        "method": f"direct_advantage_po x{dapo.rounds}",
        "direct_advantage_po": dataclasses.asdict(dapo),
        "rounds": rounds,
        "sft": workdir_io.read_results(sft_dir),
        "wall_time_s": time.perf_counter() - start,
    }
    results = fingerprints.finish(workdir, results, ran, final=f"round_{dapo.rounds}/policy")
    if workdir_io.is_main():
        print("\n" + math_eval.format_table(results, f"Direct Advantage PO on {plan.main.data.task}: "
                                                     f"{dapo.rounds} round(s)"))  # fmt: skip
        for x in rounds:
            c = x["critic"]
            print(f"  round {x['round']}: accuracy {x['accuracy']:.3f} (vs SFT {x['accuracy_gain']:+.3f}), "
                  f"{x['states']} states, critic held-out BCE {c['critic_eval_bce']:.3f} "
                  f"(constant {c['critic_eval_bce_constant']:.3f}), corr {c['critic_eval_corr']}, "
                  f"samples so far {x['samples_generated']}")  # fmt: skip
    return results
