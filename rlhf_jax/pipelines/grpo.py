"""Online RL with verifiable rewards: the GRPO family (GRPO, Dr. GRPO, DAPO, RLOO) and PPO, one loop.

(Over 400 lines: the loop, its sampling of groups with dynamic sampling, and its pipeline read together.)

    python -m launch.train --experiment=grpo_arith           # SFT → GRPO on the synthetic math task
    python -m launch.train --experiment=grpo_tldr            # SFT → reward model → GRPO on it (TL;DR)

On a math task (`data.task` arith or math) the reward is verifiable (`gsm8k`, `math`, ...) and the
evaluation is held-out accuracy against the SFT policy (`math_eval`). On any other task the reward may
be a learned one: `rewards.reward_model` makes the pipeline train a pointwise reward model from the SFT
policy on the task's pairs (the `rm` section) and score samples with it; the evaluation is then win rates
against the SFT policy (`evaluation.evaluate_against_sft`, by the gold reward where the task has one),
and `train.eval_every` adds the same evaluation during training (`eval_curve.jsonl`: the
over-optimisation curve).

Per iteration i (Shao et al. 2024, DeepSeekMath, Algorithm 1; DAPO, Yu et al. 2025, Algorithm 1):

  1. P prompts, drawn from a stream that depends on (seed, i, draw) only, so a resumed run draws the
     same prompts without any saved iterator;
  2. G samples of each from the current policy with the KV-cached sampler (temperature, top-k), each
     (prompt, sample) with its own key, fold_in(key(seed), i, draw);
  3. rewards on the host (`rlhf_jax.rewards`, weighted), advantages per group
     (`losses.group_advantages`); with dynamic sampling (DAPO), groups whose rewards are all equal are
     dropped and further prompts drawn until P groups are kept or `max_draws` draws are spent (the
     count is logged; a short batch is filled with dropped groups, which carry zero advantage);
  4. the old per-token log-probs of every sample under the sampling policy (softmax(logits / T), as
     TRL) and, when β > 0, the frozen reference's, computed once at sampling time; with one optimizer
     step per iteration (μ = 1, `train.batch_size` = the iteration's rows; no critic, no GFlowNet) the
     policy that sampled is the one being stepped, so the old log-probs are the step's own, under a
     stop-gradient (`steps.policy_gradient_objective` without `old_logps`; TRL does the same at μ = 1),
     and that forward pass is skipped: the same loss and gradient, the ratio exactly 1;
  5. μ = `num_iterations` passes over the P·G rows in shuffled mini-batches of `train.batch_size` rows,
     each an optimizer step of `losses.policy_gradient_loss` (`steps.policy_gradient_objective`, jitted
     once by `trainer.make_train_step`); at the first step of an iteration the ratio is 1.

With `estimator="gae"` this is PPO with a critic (`pipelines.ppo`): step 3's advantages are per token,
from GAE over a critic's values and KL-shaped rewards, and each mini-batch step also updates the critic.

One record per iteration in `metrics.jsonl` (at the iteration's last optimizer step): `loss`,
`reward_mean`, `reward_std`, `frac_zero_std_groups`, `groups_dropped`, `clip_frac_low`,
`clip_frac_high`, `kl`, `entropy`, `response_length`, `truncated_frac`, `generation_s`, `train_s`, plus
each reward's mean. `entropy` is the sampling policy's mean entropy of softmax(logits / temperature)
(untruncated) over every sampled token of the iteration's P·G samples, EOS included: the sampler sums it
while it draws (`SamplingConfig(entropy=True)`), so the training forward skips that reduction over the
vocabulary. It is the entropy of the policy that sampled the iteration, before its updates; with one
optimizer step per iteration it equals the step's own entropy at the loss tokens up to float32 rounding
(tested; `steps.policy_gradient_objective(entropy=True)` computes that one). Checkpoints at iteration
ends hold the train state; with the prompt stream and the keys functions of (seed, i), rerunning resumes
exactly.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import logging
import os
import time
from collections.abc import Callable

import jax
import numpy as np
from tqdm.auto import tqdm

from rlhf_jax import losses, models, rewards, sampling, scoring, sharding
from rlhf_jax.data import pipeline, synthetic_tldr
from rlhf_jax.data.tokenizer import load_tokenizer
from rlhf_jax.pipelines import evaluation, fingerprints, math_eval, reward, sft, tasks, training
from rlhf_jax.pipelines import gflownet as gfn_lib
from rlhf_jax.pipelines import ppo as ppo_lib
from rlhf_jax.pipelines import workdir as workdir_io
from rlhf_jax.pipelines.config import StageConfig, in_section, rm_kind, section_config, stage_config
from rlhf_jax.train import metrics, steps
from rlhf_jax.train.checkpoint import Checkpointer
from rlhf_jax.train.preemption import NonFiniteError, Preempted, PreemptionWatch

log = logging.getLogger("rlhf_jax")

AGGREGATIONS = ("grpo", "bnpo", "dr_grpo", "dapo")
# Rewards whose mean over the samples is their accuracy (shown as `acc` in the progress bar).
ACCURACY_REWARDS = ("gsm8k", "math", "exact_match")
ESTIMATORS = ("grpo", "dr_grpo", "rloo")  # `losses.group_advantages`'s
# "gae": PPO with a critic (`pipelines.ppo`): per-token advantages from GAE instead of the group's.
PPO_ESTIMATOR = "gae"


@dataclasses.dataclass(frozen=True)
class GRPOConfig:
    """The online loop's settings (the optimizer and mini-batch size are the `train` section's).

    Attributes:
      iterations: outer iterations (sample, score, update).
      num_prompts: P, prompts per iteration.
      group_size: G, samples per prompt.
      num_iterations: μ, passes over each iteration's samples (TRL's `num_iterations`).
      estimator, scale: `losses.group_advantages`'s; estimator "gae" is PPO with a critic
        (`pipelines.ppo`, its settings in the `ppo` section; scale then unused).
      aggregation, epsilon_low, epsilon_high, delta, beta, importance_level: `losses.policy_gradient_loss`'s
        (epsilon_high 0: equal to epsilon_low; delta 0: no cap).
      temperature, top_k, max_new_tokens: the sampling policy.
      mask_truncated: samples cut at max_new_tokens carry no loss (DAPO's overlong filtering).
      dynamic_sampling: drop groups with equal rewards and draw more prompts (DAPO).
      max_draws: the most prompt draws per iteration with dynamic sampling.
      rewards: (name, weight, hyperparameters) summed into the reward (`rlhf_jax.rewards`).
      max_prompts: train on the task's first this many training prompts only (0: all); a small fixed
        pool checks that the update raises the reward on the prompts it trains on.
    """

    iterations: int = 20
    num_prompts: int = 16
    group_size: int = 8
    num_iterations: int = 1
    estimator: str = "grpo"
    scale: str = "group"
    aggregation: str = "dapo"
    epsilon_low: float = 0.2
    epsilon_high: float = 0.0
    delta: float = 0.0
    beta: float = 0.0
    importance_level: str = "token"
    temperature: float = 1.0
    top_k: int = 0
    max_new_tokens: int = 48
    mask_truncated: bool = False
    dynamic_sampling: bool = False
    max_draws: int = 4
    rewards: tuple[tuple[str, float, tuple], ...] = (("gsm8k", 1.0, ()),)
    max_prompts: int = 0

    def __post_init__(self):
        checks = (
            ("iterations", self.iterations >= 1, ">= 1"),
            ("num_prompts", self.num_prompts >= 1, ">= 1"),
            (
                "group_size",
                self.group_size >= (1 if self.estimator == PPO_ESTIMATOR else 2),
                ">= 2 (advantages compare samples of a group; estimator gae: >= 1)",
            ),
            ("num_iterations", self.num_iterations >= 1, ">= 1"),
            (
                "estimator",
                self.estimator in (*ESTIMATORS, PPO_ESTIMATOR),
                f"one of {(*ESTIMATORS, PPO_ESTIMATOR)}",
            ),
            (
                "dynamic_sampling",
                not (self.dynamic_sampling and self.estimator == PPO_ESTIMATOR),
                "false with estimator gae (it drops groups of equal rewards, a group-baseline filter)",
            ),
            ("aggregation", self.aggregation in AGGREGATIONS, f"one of {AGGREGATIONS}"),
            ("epsilon_low", 0 < self.epsilon_low < 1, "in (0, 1)"),
            ("epsilon_high", self.epsilon_high >= 0, ">= 0 (0: equal to epsilon_low)"),
            ("delta", self.delta == 0 or self.delta > 1, "0 (off) or > 1"),
            ("beta", self.beta >= 0, ">= 0"),
            ("temperature", self.temperature > 0, "> 0"),
            ("max_draws", self.max_draws >= 1, ">= 1"),
            ("max_prompts", self.max_prompts >= 0, ">= 0 (0: all)"),
            ("rewards", len(self.rewards) >= 1, "at least one (name, weight)"),
        )
        for field, ok, want in checks:
            if not ok:
                raise ValueError(f"grpo.{field} must be {want}, got {getattr(self, field)!r}")

    def loss_kwargs(self) -> tuple[tuple[str, object], ...]:
        kw = dict(epsilon_low=self.epsilon_low, beta=self.beta, importance_level=self.importance_level)
        if self.epsilon_high:
            kw["epsilon_high"] = self.epsilon_high
        if self.delta:
            kw["delta"] = self.delta
        return tuple(sorted(kw.items()))

    def sampling(self) -> sampling.SamplingConfig:
        return sampling.SamplingConfig(
            max_new_tokens=self.max_new_tokens,
            temperature=self.temperature,
            top_k=self.top_k,
            entropy=True,  # the logged `entropy`, summed while sampling
        )


@dataclasses.dataclass(frozen=True)
class RLTask:
    """What the online loop trains on: prompts with their dataset columns (e.g. `answer`), and the
    reward, `reward(prompts=, completions=, **columns) -> (total [N], {name: [N]})`."""

    prompts: list[str]
    columns: dict[str, list]
    reward: Callable[..., tuple[np.ndarray, dict[str, np.ndarray]]]


def prompt_stream(num_prompts: int, *, seed: int, iteration: int, draw: int, count: int) -> np.ndarray:
    """Indices of the `count` prompts of draw `draw` of iteration `iteration`: a permutation of the
    prompts seeded by (seed, iteration, draw), cycled if `count` exceeds their number."""
    order = np.random.default_rng([seed, 23, iteration, draw]).permutation(num_prompts)
    return np.resize(order, count)


# ----------------------------------------------------------------------------------------------------
# Sampling and scoring one iteration's groups.


def rows_logps(model, params, rows: dict, *, temperature: float, mesh, batch_size: int) -> np.ndarray:
    """Per-token log-probs [R, T] of the rows' completion targets under softmax(logits / temperature), 0
    off the loss mask (`steps.completion_logps`, as the training step computes them)."""
    fn = _jitted_token_logps(model, temperature)
    return scoring.map_rows(fn, params, rows, batch_size=batch_size, mesh=mesh)


@functools.lru_cache(maxsize=8)
def _jitted_token_logps(model, temperature: float):
    return jax.jit(lambda p, b: steps.completion_logps(model, p, b, temperature=temperature))


def sample_groups(
    model,
    params,
    tokenizer,
    task: RLTask,
    grpo: GRPOConfig,
    *,
    iteration: int,
    seed: int,
    max_prompt_len: int,
) -> dict:
    """One iteration's P groups of G samples (module docstring, steps 1-3), as host arrays.

    Returns:
      dict with `prompt_tokens` [P, Tp], `prompt_lengths` [P], `tokens` [P, G, Tc], `lengths` [P, G],
      `finished` [P, G], `rewards` [P, G], `entropy` [P, G] (each sample's summed per-token entropy,
      `sampling.SampleOutput.entropy_PN`), `advantages` [P, G], per-reward means (`reward/<name>`), and
      counts: `draws`, `groups_dropped`, `groups_short` (kept groups missing after `max_draws`).
    """
    P, G = grpo.num_prompts, grpo.group_size
    kept, dropped, draws = [], [], 0
    per_reward: dict[str, list] = {}
    while len(kept) < P and draws < (grpo.max_draws if grpo.dynamic_sampling else 1):
        idx = prompt_stream(len(task.prompts), seed=seed, iteration=iteration, draw=draws, count=P)
        prompts = [task.prompts[i] for i in idx]
        tokenized = pipeline.tokenize_prompts(prompts, tokenizer, max_prompt_len)
        pb = tokenized.batch(np.arange(P), max_prompt_len)
        out = sampling.sample(
            model, params, pb["prompt_tokens"], pb["prompt_lengths"], config=grpo.sampling(), num_samples=G,
            rng=jax.random.fold_in(jax.random.key(seed + 31), iteration * 1000 + draws),
            eos_id=tokenizer.eos_ids, pad_id=tokenizer.pad_id, prompt_ids=np.arange(P),
        )  # fmt: skip
        draws += 1
        texts = [
            evaluation.decode_text(tokenizer, out.tokens_PNT[p, g, : out.lengths_PN[p, g]])
            for p in range(P)
            for g in range(G)
        ]
        columns = {k: [v[i] for i in idx for _ in range(G)] for k, v in task.columns.items()}
        columns["completion_lengths"] = [int(n) for n in out.lengths_PN.reshape(-1)]
        total, parts = task.reward(
            prompts=[p for p in prompts for _ in range(G)], completions=texts, **columns
        )
        rewards_PG = np.asarray(total, np.float32).reshape(P, G)
        if not np.isfinite(rewards_PG).all():
            bad = np.flatnonzero(~np.isfinite(rewards_PG))
            names = [n for n, v in parts.items() if not np.isfinite(np.asarray(v, np.float32)).all()]
            raise ValueError(
                f"reward {', '.join(names) or 'total'}: non-finite value for {bad.size} of {P * G} "
                f"completions in iteration {iteration} (first: prompt {prompts[bad[0] // G]!r}, completion "
                f"{texts[bad[0]]!r}); a reward must return finite float32 values"
            )
        for name, values in parts.items():
            per_reward.setdefault(name, []).append(np.asarray(values, np.float32))
        for p in range(P):
            group = {
                "prompt_tokens": pb["prompt_tokens"][p], "prompt_lengths": pb["prompt_lengths"][p],
                "tokens": out.tokens_PNT[p], "lengths": out.lengths_PN[p], "finished": out.finished_PN[p],
                "rewards": rewards_PG[p], "entropy": out.entropy_PN[p],
            }  # fmt: skip
            varied = rewards_PG[p].max() > rewards_PG[p].min()
            (kept if varied or not grpo.dynamic_sampling else dropped).append(group)
    short = max(0, P - len(kept))
    groups = (kept + dropped[:short])[:P]
    out = {k: np.stack([g[k] for g in groups]) for k in groups[0]}
    if grpo.estimator == PPO_ESTIMATOR:  # per token, from the critic (`pipelines.ppo.advantages`)
        out["advantages"] = np.zeros((P, G), np.float32)
    else:
        out["advantages"] = np.array(  # a writable host copy
            losses.group_advantages(rewards_PG=out["rewards"], estimator=grpo.estimator, scale=grpo.scale),
            np.float32,
        )
    if grpo.dynamic_sampling and short:  # filled with equal-reward groups: no signal, by construction
        out["advantages"][len(kept) :] = 0.0
    out.update(draws=draws, groups_dropped=len(dropped), groups_short=short)
    for name, values in per_reward.items():
        out[f"reward/{name}"] = float(np.mean(np.concatenate(values)))
    return out


def training_rows(groups: dict, *, pad_id: int, mask_truncated: bool) -> dict:
    """The P·G samples as training rows (`scoring.completions_to_batch`) with `advantages` [R]."""
    rows = scoring.completions_to_batch(
        groups["prompt_tokens"], groups["prompt_lengths"], groups["tokens"], groups["lengths"], pad_id=pad_id
    )
    if mask_truncated:
        rows["loss_mask"] = rows["loss_mask"] * groups["finished"].reshape(-1, 1).astype(np.float32)
    rows["advantages"] = groups["advantages"].reshape(-1)
    rows["truncated"] = ~groups["finished"].reshape(-1)
    return rows


# ----------------------------------------------------------------------------------------------------
# The stage.


def _mean_of(records: list[dict], key: str) -> float:
    return float(np.mean([float(r[key]) for r in records]))


def _entropy(groups: dict) -> float:
    """The iteration's logged `entropy` (module docstring): the sampled tokens' mean, from the sampler's
    per-sample sums."""
    return float(groups["entropy"].sum() / max(int(groups["lengths"].sum()), 1))


CRITIC_KEYS = (*scoring.LOGP_KEYS, "old_values", "returns")  # `steps.value_objective`'s
# `steps.shared_critic_objective`'s (the reference log-probs are added when present).
SHARED_KEYS = (*scoring.LOGP_KEYS, "old_logps", "advantages", "old_values", "returns")


def minibatch(rows: dict, idx: np.ndarray, keys: tuple[str, ...] | None = None) -> dict:
    """Mini-batch `idx` of the rows with its normalisers (`steps.policy_gradient_objective`; with
    `keys=CRITIC_KEYS`, `steps.value_objective`)."""
    if keys is None:
        keys = (*scoring.LOGP_KEYS, "old_logps", "advantages")
    if "old_logps" in keys and "reference_logps" in rows:
        keys += ("reference_logps",)
    # Without `old_logps` in the rows (one step per rollout, `run`) the step uses its own log-probs.
    batch = {k: rows[k][idx] for k in keys if k != "old_logps" or k in rows}
    n = len(idx)
    batch["token_normalizer"] = np.full(n, np.float32(batch["loss_mask"].sum()), np.float32)
    batch["row_fraction"] = np.full(n, 1.0 / n, np.float32)
    return batch


def run(
    cfg: StageConfig,
    workdir: str,
    *,
    grpo: GRPOConfig,
    task: RLTask,
    tokenizer,
    name: str = "grpo",
    rm_dir: str = "",
    curve_spec: dict | None = None,
    evaluate: Callable[[object], dict] | None = None,
    ppo: ppo_lib.PPOConfig | None = None,
    critic_from: str = "",
    gflownet: gfn_lib.GFlowNetConfig | None = None,
) -> dict:
    """Trains (or resumes) the policy from `cfg.init_from` (an SFT stage) with online RL in `workdir`.

    Args:
      cfg, grpo, task, tokenizer: the stage's config, the loop's settings, the prompts and reward, and
        the tokenizer.
      name: label for logs.
      rm_dir: the reward-model stage behind `task.reward`, if any (in the fingerprint).
      curve_spec: what the curve's evaluation depends on (in the fingerprint), with `evaluate`.
      evaluate: if given with `cfg.train.eval_every` > 0, `evaluate(params) -> dict` runs at the end of
        every iteration that crosses a multiple of `eval_every` optimizer steps, at the last one and
        before the first (step 0, the initial policy), and its numbers (`CURVE_KEYS`, with the
        iteration's training reward means) are appended to `eval_curve.jsonl` with `step` and
        `iteration`: the over-optimisation curve of a learned reward (gold reward and KL against the
        proxy's reward).
      ppo, critic_from: with `grpo.estimator="gae"`, PPO's settings and the stage its critic starts
        from (the SFT stage, default `cfg.init_from`, or a reward-model stage; `pipelines.ppo`).
      gflownet: GFlowNet trajectory balance instead of the clipped policy gradient
        (`pipelines.gflownet`: a learnable log Z, positive rewards, a replay buffer); the estimator,
        aggregation and clipping settings of `grpo` are then unused.

    Returns the stage's results (the last iteration's metrics); evaluation is the pipeline's.
    """
    if not cfg.init_from:
        raise ValueError("online RL needs init_from: the workdir of a finished SFT stage")
    is_ppo = grpo.estimator == PPO_ESTIMATOR
    if is_ppo and ppo is None:
        raise ValueError("grpo.estimator='gae' is PPO with a critic: give its settings (ppo=PPOConfig(...))")
    ppo = ppo if is_ppo else None
    shared = ppo is not None and ppo.shared  # the value head on the policy's backbone
    if shared and cfg.train.lora() is not None:
        raise ValueError(
            "ppo.critic_init='shared' does not support LoRA (train.lora_rank > 0) yet: use 'sft'"
        )
    critic_from = (critic_from or cfg.init_from) if is_ppo and not shared else ""
    if gflownet is not None and (ppo is not None or cfg.train.lora() is not None):
        raise ValueError("gflownet: not with PPO (grpo.estimator='gae') or LoRA (train.lora_rank > 0)")
    os.makedirs(workdir, exist_ok=True)
    fingerprints.claim(
        workdir,
        spec(cfg, grpo, rm_dir=rm_dir, curve=curve_spec, ppo=ppo, critic_from=critic_from, gflownet=gflownet),
        name,
    )
    if workdir_io.stage_done(workdir):
        return workdir_io.read_results(workdir)
    if workdir_io.is_main():  # every stage keeps the tokenizer it used, for init_from and for export
        tokenizer.save(workdir)
    replay_rows = gflownet.replay_rows if gflownet is not None else 0
    rows_per_iteration = grpo.num_prompts * grpo.group_size + replay_rows
    if rows_per_iteration % cfg.train.batch_size:
        raise ValueError(
            f"grpo.num_prompts * grpo.group_size (+ gflownet.replay_rows) = {rows_per_iteration} rows per "
            "iteration do not split into "
            f"mini-batches of train.batch_size={cfg.train.batch_size}"
        )
    steps_per_iteration = grpo.num_iterations * rows_per_iteration // cfg.train.batch_size
    total_steps = grpo.iterations * steps_per_iteration
    # One optimizer step per rollout: π_old is the stepped policy, its log-probs the step's own (step 4).
    old_logps_in_step = steps_per_iteration == 1 and ppo is None and gflownet is None

    # Mesh, model, params, reference.
    mesh = sharding.make_mesh(cfg.mesh)
    saved = workdir_io.load_model_json(cfg.init_from)
    saved.pop("kind")
    model_cfg = models.ModelConfig(**saved)
    model = models.Transformer(model_cfg, mesh=mesh)
    params = training.init_lm_params(model, jax.random.key(cfg.seed), init_from=cfg.init_from)
    lora = cfg.train.lora()  # LoRA: the state holds the adapters; `params` stays as the frozen base
    # The frozen reference: for the loss's KL (β > 0) or, with PPO, the reward's KL penalty.
    keep_reference = grpo.beta > 0 or (ppo is not None and ppo.kl_coef > 0)
    if lora is not None:
        reference = params if keep_reference else None  # the adapters disabled: no second copy
    else:
        reference = jax.tree.map(lambda x: x.copy(), params) if keep_reference else None
    training.log_startup(
        f"{name} ({'tb' if gflownet is not None else f'{grpo.estimator}/{grpo.aggregation}'})",
        mesh,
        model_cfg,
        cfg.train.batch_size,
    )

    # Optimizer, state, step.
    objective = functools.partial(
        steps.policy_gradient_objective, model=model, temperature=grpo.temperature,
        aggregation=grpo.aggregation, loss_kwargs=grpo.loss_kwargs(),
        max_length=grpo.max_new_tokens,  # Dr. GRPO: the completion budget (TRL: max_completion_length)
        entropy=False,  # logged from the sampler
    )  # fmt: skip
    train_cfg = dataclasses.replace(cfg.train, steps=total_steps)
    if gflownet is not None:  # one state {"policy", "log_z"}, the trajectory-balance loss
        objective = functools.partial(
            steps.trajectory_balance_objective,
            model=model,
            temperature=grpo.temperature,
            entropy=False,
        )
        step_fn, state = gfn_lib.setup(
            cfg, train_cfg, gflownet, model=model, params=params, mesh=mesh, objective=objective
        )
        replay = gfn_lib.ReplayBuffer(gflownet.replay_size, gflownet.replay_min_reward)
    elif shared:  # one state {"policy", "value_head"}, one loss: pg + vf_coef · value loss
        objective = functools.partial(
            steps.shared_critic_objective, **objective.keywords, vf_coef=ppo.vf_coef,
            clip=ppo.value_clip if ppo.value_clip > 0 else None,
        )  # fmt: skip
        head = ppo_lib.value_head_init(model_cfg.d_model, seed=cfg.seed, dtype=model_cfg.param_dtype)
        step_fn, state = ppo_lib.setup_shared(
            cfg, train_cfg, model=model, params=params, head=head, mesh=mesh, objective=objective
        )
    else:
        step_fn, state = training.setup(
            cfg.optim, train_cfg, seed=cfg.seed, mesh=mesh, model=model, params=params, objective=objective,
            weight_fn=lambda batch: np.float32(1.0), lora=lora,
        )  # fmt: skip
    base = params if lora is not None else None  # full fine-tuning: the state holds the only copy
    del params
    if ppo is not None and not shared:  # the critic: its own model, optimizer state and jitted step
        critic_model, critic_params = ppo_lib.critic(model_cfg, mesh, seed=cfg.seed, init_from=critic_from)
        critic_step, critic_state = ppo_lib.setup_critic(
            ppo, cfg, train_cfg, model=critic_model, params=critic_params, mesh=mesh
        )
        del critic_params
    kl_coef = float(np.float32(ppo.kl_coef)) if ppo is not None else 0.0

    def saved_state():
        """What a checkpoint holds: the train state, with PPO also the critic's and β."""
        if ppo is None:
            return state
        kl = jax.device_put(np.float32(kl_coef), sharding.replicated(mesh))
        if shared:
            return {"policy": state, "kl_coef": kl}
        return {"policy": state, "critic": critic_state, "kl_coef": kl}

    def policy():
        """The current policy's params (the latest `state`; with LoRA, its adapters on the base)."""
        nested = shared or gflownet is not None
        return training.policy_params(state.params["policy"] if nested else state.params, base, lora)

    # Restore (an iteration's end; the prompts and keys of the next follow from its number).
    ckpt = Checkpointer(os.path.join(workdir, "checkpoints"), every_steps=cfg.checkpoint.every_steps,
                        keep=cfg.checkpoint.keep, async_save=cfg.checkpoint.async_save)  # fmt: skip
    if ckpt.latest_step() is not None:
        restored, saved = ckpt.restore(None, saved_state())
        if ppo is None:
            state = saved
        else:
            state = saved["policy"]
            critic_state = None if shared else saved["critic"]
            kl_coef = float(np.float32(jax.device_get(saved["kl_coef"])))
        if workdir_io.is_main():
            print(f"resuming from the checkpoint at step {restored} in {ckpt.directory}", flush=True)
    start_step = int(jax.device_get(state.step))
    if start_step % steps_per_iteration:
        raise ValueError(f"{workdir}: checkpoint at step {start_step}, not an iteration's end")
    writer = metrics.MetricsWriter(workdir, resume_step=start_step)
    curve_path = os.path.join(workdir, CURVE_FILE)
    every = cfg.train.eval_every if evaluate is not None else 0
    if every:
        metrics.keep_records_up_to(curve_path, start_step)  # a killed run's later points are redone

    def curve_point(step: int, iteration: int, record: dict) -> None:
        ev = evaluate(policy())
        point = {"step": step, "iteration": iteration, **{k: ev.get(k) for k in CURVE_KEYS}}
        point.update({k: record[k] for k in ("reward_mean", *CURVE_TRAIN_KEYS) if k in record})
        if workdir_io.is_main():
            with open(curve_path, "a", encoding="utf-8") as f:
                f.write(json.dumps(point) + "\n")

    if every and start_step == 0:
        curve_point(0, 0, {})  # the SFT policy: the curve's origin
    preemption = PreemptionWatch()
    place = functools.partial(sharding.shard_batch, mesh=mesh)
    bs = cfg.train.eval_batch_size
    record = {}
    first = start_step // steps_per_iteration
    bar = tqdm(
        total=grpo.iterations, initial=first, desc=name, disable=not (cfg.progress and workdir_io.is_main())
    )
    try:
        for it in range(first, grpo.iterations):
            # Sample, score, advantages, old (and reference) log-probs.
            t0 = time.perf_counter()
            groups = sample_groups(model, policy(), tokenizer, task, grpo, iteration=it, seed=cfg.seed,
                                   max_prompt_len=cfg.data.max_prompt_len)  # fmt: skip
            rows = training_rows(groups, pad_id=tokenizer.pad_id, mask_truncated=grpo.mask_truncated)
            kw = dict(temperature=grpo.temperature, mesh=mesh, batch_size=bs)
            if gflownet is not None:  # log R; the replay rows after admitting this iteration's
                rewards_R = groups["rewards"].reshape(-1)
                rows["log_rewards"] = gflownet.log_rewards(rewards_R)
                replay_added = replay.add(rows, rewards_R)
                extra = replay.draw(replay_rows, np.random.default_rng([cfg.seed, 37, it]), rows)
                rows = {k: np.concatenate([rows[k], extra[k]]) for k in gfn_lib.TB_KEYS} | {
                    "truncated": np.concatenate([rows["truncated"], np.zeros(replay_rows, bool)])
                }
            elif not old_logps_in_step:
                rows["old_logps"] = rows_logps(model, policy(), rows, **kw)
            if reference is not None:
                rows["reference_logps"] = rows_logps(model, reference, rows, **kw)
            if ppo is not None:  # the critic's values, the shaped rewards, GAE
                rows["old_values"] = ppo_lib.rows_values(
                    model if shared else critic_model, state.params if shared else critic_state.params, rows,
                    mesh=mesh, batch_size=bs, shared=shared,
                )  # fmt: skip
                shaped = ppo_lib.advantages(rows, groups["rewards"].reshape(-1), ppo, kl_coef)
                rows["advantages"], rows["returns"] = shaped["advantages"], shaped["returns"]
            generation_s = time.perf_counter() - t0

            # μ passes of mini-batch updates.
            t0 = time.perf_counter()
            step_metrics, critic_metrics = [], []
            for epoch in range(grpo.num_iterations):
                order = np.random.default_rng([cfg.seed, 29, it, epoch]).permutation(rows_per_iteration)
                for start in range(0, rows_per_iteration, cfg.train.batch_size):
                    idx = order[start : start + cfg.train.batch_size]
                    keys = SHARED_KEYS if shared else (gfn_lib.TB_KEYS if gflownet is not None else None)
                    batch = place(minibatch(rows, idx, keys))
                    with jax.transfer_guard("disallow"):
                        state, m = step_fn(state, batch, base)
                    step_metrics.append(m)
                    if ppo is not None and not shared:
                        batch = place(minibatch(rows, idx, CRITIC_KEYS))
                        with jax.transfer_guard("disallow"):
                            critic_state, m = critic_step(critic_state, batch, None)
                        critic_metrics.append(m)
            step_metrics, critic_metrics = jax.device_get((step_metrics, critic_metrics))
            if critic_metrics:  # a non-finite critic update counts as one of the run's
                for m, c in zip(step_metrics, critic_metrics, strict=True):
                    m["nonfinite_steps"] = m["nonfinite_steps"] + c["nonfinite_steps"]
            train_s = time.perf_counter() - t0
            step = (it + 1) * steps_per_iteration
            skipped = int(step_metrics[-1]["nonfinite_steps"])
            if skipped and cfg.train.nonfinite == "stop":
                raise NonFiniteError(
                    f"{name}: non-finite loss or gradient in iteration {it + 1} (update not applied; last "
                    f"checkpoint: step {ckpt.latest_step()}). Set --config.train.nonfinite=skip to skip them."
                )
            limit = cfg.train.max_nonfinite_fraction * total_steps
            if skipped > limit:  # nonfinite="skip": skipped updates are counted over the whole run
                raise NonFiniteError(
                    f"{name}: {skipped} of {total_steps} updates were skipped for a non-finite loss or "
                    f"gradient by iteration {it + 1}, more than train.max_nonfinite_fraction="
                    f"{cfg.train.max_nonfinite_fraction} allows ({limit:g}); last checkpoint: step "
                    f"{ckpt.latest_step()}. Lower the learning rate, or raise the limit."
                )

            # Log the iteration.
            mean = functools.partial(_mean_of, step_metrics)
            rewards_PG = groups["rewards"]
            record = {
                "loss": mean("loss"), "grad_norm": mean("grad_norm"), "learning_rate": mean("learning_rate"),
                "reward_mean": float(rewards_PG.mean()), "reward_std": float(rewards_PG.std()),
                "frac_zero_std_groups": float(np.mean(rewards_PG.max(1) == rewards_PG.min(1))),
                "groups_dropped": groups["groups_dropped"], "groups_short": groups["groups_short"],
                "draws": groups["draws"], "clip_frac_low": mean("clip_frac_low"),
                "clip_frac_high": mean("clip_frac_high"), "kl": mean("kl") if grpo.beta > 0 else 0.0,
                "entropy": _entropy(groups), "response_length": float(groups["lengths"].mean()),
                "truncated_frac": float(rows["truncated"].mean()), "generation_s": generation_s,
                "train_s": train_s, "nonfinite_steps": skipped,
                **{k: mean(k) for k in ("ratio_mean",) if k in step_metrics[0]},
                **{k: v for k, v in groups.items() if k.startswith("reward/")},
            }  # fmt: skip
            if gflownet is not None:
                record.update(log_z=mean("log_z"), tb_residual=mean("tb_residual"), replay_size=len(replay),
                              replay_added=replay_added)  # fmt: skip
            if shared:  # one step: `loss` is pg + vf_coef · value loss
                record.update(
                    kl_coef=kl_coef, policy_loss=mean("policy_loss"), value_loss=mean("value_loss"),
                    **{k: mean(k) for k in ("value_clip_frac", "value_mean", "value_error")},
                    **shaped["stats"],
                )  # fmt: skip
                kl_coef = ppo_lib.next_kl_coef(ppo, kl_coef, shaped["stats"]["kl_seq"], rows_per_iteration)
            elif ppo is not None:
                cmean = functools.partial(_mean_of, critic_metrics)
                record.update(
                    kl_coef=kl_coef, value_loss=cmean("loss"), value_grad_norm=cmean("grad_norm"),
                    **{k: cmean(k) for k in ("value_clip_frac", "value_mean", "value_error")},
                    **shaped["stats"],
                )  # fmt: skip
                kl_coef = ppo_lib.next_kl_coef(ppo, kl_coef, shaped["stats"]["kl_seq"], rows_per_iteration)
            writer.write(step, record)
            accuracy = next(
                (record[f"reward/{k}"] for k in ACCURACY_REWARDS if f"reward/{k}" in record), None
            )
            shown = {"acc": accuracy} if accuracy is not None else {}
            if "reward/tldr_gold" in record:  # logged beside a learned reward: the gold reward
                shown["gold"] = record["reward/tldr_gold"]
            shown = {k: f"{v:.3f}" for k, v in shown.items()}
            bar.set_postfix(reward=f"{record['reward_mean']:.3f}", **shown,
                            len=f"{record['response_length']:.1f}", refresh=False)  # fmt: skip
            bar.update(1)
            last = it + 1 == grpo.iterations
            if every and (last or step // every > (step - steps_per_iteration) // every):
                curve_point(step, it + 1, record)
            if last or ckpt.should_save(step):
                ckpt.save(step, saved_state(), force=True)
            if preemption.reached(step):
                ckpt.save(step, saved_state(), force=True)
                ckpt.wait()
                raise Preempted(step=step, stage=name, checkpoint_dir=ckpt.directory)
    finally:
        bar.close()
        preemption.close()
        writer.close()
        ckpt.close()
    results = {"stage": name, "iterations": grpo.iterations, "steps": total_steps, **record}
    workdir_io.write_json(os.path.join(workdir, "results.json"), results)
    metrics.plot_curves(workdir, ("reward_mean", "loss", "entropy", "response_length"))
    nested = shared or gflownet is not None
    policy_state = state.replace(params=state.params["policy"]) if nested else state
    training.save_policy(workdir, policy_state, base, model_cfg, lora)  # last: marks the stage as done
    return results


# ----------------------------------------------------------------------------------------------------
# The `grpo` pipeline: SFT → online RL → evaluation against the SFT policy.


SUMMARY_WINDOW = 5  # iterations averaged by `training_summary`
CURVE_FILE = "eval_curve.jsonl"
# The held-out numbers of each curve point (`evaluation.CURVE_KEYS`), and the training iteration's reward
# parts it also records.
CURVE_KEYS = evaluation.CURVE_KEYS
CURVE_TRAIN_KEYS = ("reward/reward_model", "reward/tldr_gold")


def training_summary(policy_dir: str, grpo: GRPOConfig) -> dict:
    """Whole-run numbers of a finished online stage, from its `metrics.jsonl` (so a resumed run counts
    every iteration): `samples_generated` (P·G per prompt draw, dynamic sampling's extra draws
    included), and the mean over the last `SUMMARY_WINDOW` iterations of the entropy, the reward and the
    response length (`entropy_final`, `reward_final`, `response_length_final`)."""
    records = metrics.read_metrics(policy_dir)
    last = records[-SUMMARY_WINDOW:]

    def final(key):
        return float(np.mean([r[key] for r in last])) if last else None

    return {
        "samples_generated": int(sum(r["draws"] for r in records)) * grpo.num_prompts * grpo.group_size,
        "entropy_final": final("entropy"),
        "reward_final": final("reward_mean"),
        "response_length_final": final("response_length"),
    }


def task_reward(specs: tuple[tuple[str, float, tuple], ...], *, reward_model: Callable | None = None):
    """The weighted sum of `rlhf_jax.rewards` given as (name, weight, hyperparameters), and each part
    (`rewards.combine`): `reward(prompts=, completions=, **columns) -> (total [N], {name: [N]})`.
    `reward_model`: the factory `rewards.reward_model` with the model, parameters, tokenizer and layout
    bound, required when a spec names "reward_model" (its hyperparameters are the spec's)."""
    fns = {}
    for name, _, hparams in specs:
        if name == "reward_model":
            if reward_model is None:
                raise ValueError("the reward 'reward_model' needs a trained reward model (the rm stage)")
            fns[name] = reward_model(**dict(hparams))
        else:
            fns[name] = rewards.make(name, **dict(hparams))
    return rewards.combine({name: weight for name, weight, _ in specs}, fns).evaluate


def rl_task(task: tasks.TaskData, grpo: GRPOConfig, *, reward_model: Callable | None = None) -> RLTask:
    """The online loop's view of a task.

    A math task: its training problems (the first `grpo.max_prompts`, if set) with their `answer`
    column. Any other task (the synthetic TL;DR task, preference files): the distinct prompts of its
    training pairs (of its SFT examples when it has no pairs), in order of first appearance, with the
    column `reference_completions` (the first chosen response, or SFT completion, of each prompt), for
    `reward_model`'s relative form. The reward is `grpo.rewards` (`task_reward`).
    """
    if task.problems:
        problems = task.problems[: grpo.max_prompts] if grpo.max_prompts else task.problems
        prompts, columns = [p.prompt for p in problems], {"answer": [p.answer for p in problems]}
    else:
        pairs = [(p.prompt, p.chosen) for p in task.preference] or [
            (e.prompt, e.completion) for e in task.sft
        ]
        first = dict(reversed(pairs))  # prompt -> its first response (reversed: the first one wins)
        prompts = list(dict.fromkeys(p for p, _ in pairs))
        prompts = prompts[: grpo.max_prompts] if grpo.max_prompts else prompts
        columns = {"reference_completions": [first[p] for p in prompts]}
        if not prompts:
            raise ValueError(
                "online RL: the task has no training prompts (no preference pairs or SFT examples)"
            )
    return RLTask(
        prompts=prompts, columns=columns, reward=task_reward(grpo.rewards, reward_model=reward_model)
    )


def spec(
    cfg: StageConfig, grpo: GRPOConfig, *, rm_dir: str = "", curve: dict | None = None,
    ppo: ppo_lib.PPOConfig | None = None, critic_from: str = "",
    gflownet: gfn_lib.GFlowNetConfig | None = None,
) -> dict:  # fmt: skip
    """What the online RL stage's output depends on (its fingerprint's input): with a learned reward,
    the reward-model stage; with a periodic evaluation, what its curve depends on; with PPO, its
    settings and the critic's initial stage."""
    out = {
        **fingerprints.trainer_spec(cfg, kind="grpo", loss=False),
        "grpo": grpo,
        "sft": fingerprints.stage_input(cfg.init_from),
    }
    if rm_dir:
        out["reward_model"] = fingerprints.stage_input(rm_dir)
    if curve:
        out["curve"] = curve
    if ppo is not None:
        out["ppo"] = ppo
        if not ppo.shared:
            out["critic_from"] = fingerprints.stage_input(critic_from or cfg.init_from)
    if gflownet is not None:
        out["gflownet"] = gflownet
    return out


MATH_TASKS = ("arith", "math")
REWARD_MODEL_HPARAMS = {"batch_size": int, "relative": bool}  # `rewards.reward_model`'s, from the config


@dataclasses.dataclass(frozen=True)
class Plan:
    """The `grpo` pipeline's stage configs: SFT, the reward model (`rm`, when a reward is
    "reward_model"), PPO's settings (`ppo`, with estimator "gae"), the online RL stage (`main`, its
    optimizer and mini-batch size; `grpo` the loop's settings) and the evaluation: on a math task
    `math_eval.MathEvalConfig` with the answer checker `eval_reward`, on any other
    `evaluation.EvalConfig` (win rates against the SFT policy)."""

    sft: StageConfig
    main: StageConfig
    grpo: GRPOConfig
    eval: math_eval.MathEvalConfig | evaluation.EvalConfig
    eval_reward: str
    rm: StageConfig | None = None
    ppo: ppo_lib.PPOConfig | None = None  # with grpo.estimator "gae"
    gflownet: gfn_lib.GFlowNetConfig | None = None  # trajectory balance instead of the policy gradient

    @property
    def math(self) -> bool:
        return self.main.data.task in MATH_TASKS


def _reward_model_hparams(entry: dict) -> None:
    for key, value in entry.items():
        want = REWARD_MODEL_HPARAMS.get(key)
        if want is None:
            raise ValueError(
                f"config.rewards.reward_model.{key}: unknown; the reward model reward takes weight and "
                f"{', '.join(REWARD_MODEL_HPARAMS)} (the model is the run's rm stage)"
            )
        if type(value) is not want or (key == "batch_size" and value < 1):
            raise ValueError(f"config.rewards.reward_model.{key} must be {want.__name__}"
                             f"{' >= 1' if want is int else ''}, got {value!r}")  # fmt: skip


def _reward_specs(section) -> tuple:
    """`config.rewards` ({name: {weight, hyperparameters...}}) as (name, weight, hyperparameters)."""
    out = []
    for name in sorted(section):
        entry = dict(section[name])
        weight = float(entry.pop("weight", 1.0))
        if name == "reward_model":
            _reward_model_hparams(entry)
        else:
            rewards.make(name, **entry)  # validates the name and hyperparameters now, naming them
        out.append((name, weight, tuple(sorted(entry.items()))))
    if not out:
        raise ValueError("config.rewards is empty: give at least one reward, e.g. rewards.gsm8k.weight=1.0")
    return tuple(out)


def plan(config) -> Plan:
    """Validates an experiment's ConfigDict into the `grpo` pipeline's stage configs."""
    section = dict(config.grpo)
    eval_reward = section.pop("eval_reward", "gsm8k")
    grpo = in_section("grpo", GRPOConfig, **section, rewards=_reward_specs(config.rewards))
    math = config.data.task in MATH_TASKS
    learned = any(name == "reward_model" for name, _, _ in grpo.rewards)
    ppo = ppo_config(config, grpo, has_reward_model=learned)
    rm = None
    if learned:
        if math:
            raise ValueError(
                f"config.rewards.reward_model: data.task={config.data.task!r} has no preference pairs to "
                "train a reward model on; use a verifiable reward (gsm8k, math, exact_match)"
            )
        if "rm" not in config:
            raise ValueError("config.rewards.reward_model needs an rm section (the reward-model stage)")
        if rm_kind(config) != "pointwise":
            raise ValueError("config.rm.kind must be 'pointwise' for the reward model reward r(x, y)")
        rm = stage_config(config, "rm")
    if math:
        rewards.make(eval_reward)
        eval_config = section_config(math_eval.MathEvalConfig, config, "eval")
    else:
        eval_config = section_config(evaluation.EvalConfig, config, "eval")
    return Plan(
        sft=stage_config(config, "sft"),
        main=stage_config(config, "train"),
        grpo=grpo,
        eval=eval_config,
        eval_reward=eval_reward,
        rm=rm,
        ppo=ppo,
        gflownet=section_config(gfn_lib.GFlowNetConfig, config, "gflownet") if "gflownet" in config else None,
    )


def method(grpo: GRPOConfig, gflownet: gfn_lib.GFlowNetConfig | None = None) -> str:
    """The results' `method`: "grpo/dapo", "rloo/dapo+dynamic", ...; PPO: "ppo/<aggregation>";
    trajectory balance: "gflownet/tb"."""
    if gflownet is not None:
        return "gflownet/tb"
    name = "ppo" if grpo.estimator == PPO_ESTIMATOR else grpo.estimator
    return f"{name}/{grpo.aggregation}" + ("+dynamic" if grpo.dynamic_sampling else "")


def ppo_config(config, grpo: GRPOConfig, *, has_reward_model: bool) -> ppo_lib.PPOConfig | None:
    """PPO's settings from `config.ppo` (defaults without the section) when `grpo.estimator` is "gae";
    None for the GRPO family (an experiment may carry a `ppo` section for `--config.grpo.estimator=gae`;
    it is unused, and not in the fingerprint, otherwise)."""
    if grpo.estimator != PPO_ESTIMATOR:
        return None
    ppo = section_config(ppo_lib.PPOConfig, config, "ppo") if "ppo" in config else ppo_lib.PPOConfig()
    if ppo.critic_init == "reward_model" and not has_reward_model:
        raise ValueError(
            "config.ppo.critic_init='reward_model' needs the run's reward model (a reward_model reward "
            "with an rm section); use critic_init='sft' or 'shared'"
        )
    return ppo


def _evaluation_path(policy_dir: str, eval_spec: dict) -> str:
    # Cached beside the policy under the fingerprint of what it depends on beyond the policy: another
    # evaluation config (or SFT stage) on a reused policy is evaluated anew, never served the old one.
    return os.path.join(policy_dir, f"evaluation_{fingerprints.fingerprint(eval_spec)[:12]}.json")


def read_curve(policy_dir: str) -> list[dict]:
    """The points of a finished stage's `eval_curve.jsonl` (empty without one)."""
    path = os.path.join(policy_dir, CURVE_FILE)
    if not os.path.exists(path):
        return []
    with open(path, encoding="utf-8") as f:
        return [json.loads(line) for line in f if line.strip()]


def format_curve(points: list[dict]) -> str:
    """The over-optimisation curve as a plain-text table."""
    header = f"{'step':>6} {'KL to SFT':>10} {'proxy r':>9} {'gold r':>8} {'gold win vs SFT':>16}"
    fmt = lambda v, w: f"{v:>{w}.3f}" if v is not None else f"{'n/a':>{w}}"  # noqa: E731
    lines = [header] + [
        f"{p['step']:>6} {fmt(p['kl_to_sft'], 10)} {fmt(p['proxy_reward_policy'], 9)} "
        f"{fmt(p['gold_reward_policy'], 8)} {fmt(p['win_rate_vs_sft_gold'], 16)}"
        for p in points
    ]
    return "\n".join(lines)


def run_pipeline(plan: Plan, workdir: str, *, reuse_from: tuple[str, ...] = ()) -> dict:
    """Runs SFT [→ reward model] → online RL → evaluation, each stage in WORKDIR/{stage}/{fingerprint}/;
    writes results.json (`math_eval.RESULT_KEYS` first on a math task, `evaluation.RESULT_KEYS` on any
    other) and prints the table (and the curve, with `train.eval_every`)."""
    start = time.perf_counter()
    locate = functools.partial(fingerprints.locate, workdir, reuse_from=reuse_from)
    ran = [sft.run_stage(plan.sft, locate)]
    sft_dir = ran[-1].dir
    rm_dir = ""
    if plan.rm is not None:
        ran.append(
            reward.run_stage(dataclasses.replace(plan.rm, init_from=sft_dir), locate, kind="pointwise")
        )
        rm_dir = ran[-1].dir
    cfg = dataclasses.replace(plan.main, init_from=plan.main.init_from or sft_dir)
    tokenizer = load_tokenizer(sft_dir)
    task = tasks.load_task(cfg.data, cfg.seed, tokenizer=tokenizer)
    if plan.math and not task.problems:
        raise ValueError(f"data.task={cfg.data.task!r} has no problems: give GSM8K or MATH-style files")
    mesh = sharding.make_mesh(cfg.mesh)
    layout = tasks.layout(cfg.data)
    proxy = reward.load_proxy(rm_dir, mesh, layout) if rm_dir else None
    reward_model = (
        functools.partial(
            rewards.reward_model, model=proxy.model, params=proxy.params, tokenizer=tokenizer, layout=layout
        )
        if proxy is not None
        else None
    )
    gold = synthetic_tldr.gold_reward if (task.synthetic and not plan.math) else None
    eval_spec = {"eval": plan.eval, "sft": fingerprints.stage_input(sft_dir), "seed": cfg.seed,
                 "data": fingerprints.data_spec(cfg.data)}  # fmt: skip
    if plan.math:
        eval_spec["eval_reward"] = plan.eval_reward
        eval_spec["math_metrics"] = 2  # 2: with distinct_correct; older cached evaluations lack it
    if rm_dir:
        eval_spec["reward_model"] = fingerprints.stage_input(rm_dir)

    def evaluate(model, policy_params, sft_params):
        if plan.math:
            return math_eval.evaluate_math(
                model=model, policy_params=policy_params, sft_params=sft_params, tokenizer=tokenizer,
                problems=task.eval_problems, correct=rewards.make(plan.eval_reward), config=plan.eval,
                seed=cfg.seed, max_prompt_len=cfg.data.max_prompt_len, batch_size=cfg.train.eval_batch_size,
            )  # fmt: skip
        return evaluation.evaluate_against_sft(
            model=model, policy_params=policy_params, sft_params=sft_params, tokenizer=tokenizer,
            prompts=task.eval_prompts, config=plan.eval, seed=cfg.seed, proxy=proxy, gold=gold,
            max_prompt_len=cfg.data.max_prompt_len, batch_size=cfg.train.eval_batch_size,
        )  # fmt: skip

    # The SFT policy, loaded once and only if an evaluation runs (not when both are reused).
    sft_lm = functools.cache(lambda: workdir_io.load_lm(sft_dir, mesh))

    # The curve (non-math tasks with train.eval_every): the same evaluation as the final one.
    curve_spec, evaluate_curve = None, None
    if cfg.train.eval_every and not plan.math:
        curve_spec = {"every": cfg.train.eval_every, **eval_spec}
        evaluate_curve = lambda params: evaluate(sft_lm()[0], params, sft_lm()[1])  # noqa: E731
    critic_from = rm_dir if plan.ppo is not None and plan.ppo.critic_init == "reward_model" else ""
    critic_from = sft_dir if plan.ppo is not None and plan.ppo.critic_init == "sft" else critic_from
    policy_spec = spec(cfg, plan.grpo, rm_dir=rm_dir, curve=curve_spec, ppo=plan.ppo, critic_from=critic_from,
                       gflownet=plan.gflownet)  # fmt: skip
    ran.append(locate("policy", policy_spec, done=workdir_io.stage_done))
    policy_dir = ran[-1].dir
    rl = rl_task(task, plan.grpo, reward_model=reward_model)
    stage_results = run(cfg, policy_dir, grpo=plan.grpo, task=rl, tokenizer=tokenizer, rm_dir=rm_dir,
                        curve_spec=curve_spec, evaluate=evaluate_curve, ppo=plan.ppo,
                        name=method(plan.grpo, plan.gflownet).split("/")[0],
                        critic_from=critic_from, gflownet=plan.gflownet)  # fmt: skip

    # Evaluate the policy and the SFT policy on the held-out problems or prompts.
    evaluation_path = _evaluation_path(policy_dir, eval_spec)
    if os.path.exists(evaluation_path):
        ev = workdir_io.read_json(evaluation_path)
    else:
        model, policy_params = workdir_io.load_lm(policy_dir, mesh)
        ev = evaluate(model, policy_params, sft_lm()[1])
        workdir_io.write_json(evaluation_path, ev)
    keys = math_eval.RESULT_KEYS if plan.math else evaluation.RESULT_KEYS
    curve = read_curve(policy_dir) if curve_spec else []
    results = {
        **{k: ev.get(k) for k in keys if k != "wall_time_s"},
        **ev,
        **training_summary(policy_dir, plan.grpo),
        "method": method(plan.grpo, plan.gflownet),
        **({"gflownet": dataclasses.asdict(plan.gflownet)} if plan.gflownet is not None else {}),
        "grpo": dataclasses.asdict(plan.grpo),
        **({"ppo": dataclasses.asdict(plan.ppo)} if plan.ppo is not None else {}),
        "training": stage_results,
        "sft": workdir_io.read_results(sft_dir),
        **({"reward_model": workdir_io.read_results(rm_dir)} if rm_dir else {}),
        **({"curve": curve} if curve else {}),
        "wall_time_s": time.perf_counter() - start,
    }
    results = fingerprints.finish(workdir, results, ran, final="policy")
    if workdir_io.is_main():
        title = f"Online RL on {cfg.data.task}: {results['method']}"
        table = (
            math_eval.format_table(results, title) if plan.math else evaluation.format_table(results, title)
        )
        print("\n" + table)
        if curve:
            print("\nEvaluation during training (held-out prompts; proxy = the reward being maximised):")
            print(format_curve(curve))
    return results
