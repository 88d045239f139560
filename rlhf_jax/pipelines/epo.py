"""EPO: offline turn-level REINFORCE on multi-turn dialogues (Liu et al. 2025, arXiv 2502.12486). The `epo`
pipeline: [SFT →] EPO, evaluated by the programmatic per-turn reward before and after.

    results = epo.run(stage_config, workdir, epo_config=..., eval_config=...)

Data: the embedded dialogue task (`data.task=dialogue`, `rlhf_jax.data.synthetic_dialogue`): training
dialogues with slips and one gold reward per assistant turn (+1 right total, −1 wrong). The SFT stage
imitates every reply; the EPO stage starts from it and minimises `losses.epo` (discounted per-turn
returns G_u = Σ_{k≥u} γ^(k−u) r_k, normalised by max |G| per dialogue, times the mean log-prob of turn u's
tokens) on the same dialogues in the turn layout (`rlhf_jax.data.turns`), averaged over dialogues.

Evaluation (held-out, slip-free dialogues): for every assistant turn, the prompt is the dialogue up to
that turn's "Assistant:" cue with the correct earlier replies; `eval.samples_per_prompt` replies are
sampled from the SFT policy and from the EPO policy with the same keys (paired), and each is scored by
the gold per-turn rule (`synthetic_dialogue.turn_reward`). `results.json`: turn_reward_sft /
turn_reward_epo (mean reward over turns and samples), turn_accuracy_sft / _epo (share of replies stating
the right total), turn_reward_by_turn_sft / _epo (by turn position), turn_reward_gain (mean over
dialogues of the EPO − SFT difference of the dialogue's mean reward) with turn_reward_gain_ci95 (95%
bootstrap over dialogues), train_turn_reward (the demonstrations' mean reward), eval_dialogues,
eval_turns, steps, nonfinite_steps and truncated (the turn layout's counts).
"""

from __future__ import annotations

import dataclasses
import functools
import math
import os

import jax
import numpy as np

from rlhf_jax import models, sampling, sharding
from rlhf_jax.data import pipeline, synthetic_dialogue, turns
from rlhf_jax.data import records as rec
from rlhf_jax.pipelines import evaluation, fingerprints, sft, tasks, training
from rlhf_jax.pipelines import workdir as workdir_io
from rlhf_jax.pipelines.config import StageConfig, section_config, stage_config
from rlhf_jax.train import metrics, steps


@dataclasses.dataclass(frozen=True)
class EPOConfig:
    """Attributes: gamma (the turn discount, 0.99 as released), normalize (divide the returns by
    max |G| per dialogue, as released) and reward_shift (added to every per-turn training reward before
    the returns; 0 keeps the data's rewards. The dialogue task's ±1 rewards shifted by 1 are {0, 2}:
    every return is then ≥ 0 and, after the max-|G| normalisation, which removes the scale, EPO is a
    return-weighted SFT with no push-down on wrong turns. The evaluation's rewards are never shifted)."""

    gamma: float = 0.99
    normalize: bool = True
    reward_shift: float = 0.0

    def __post_init__(self):
        if not 0.0 <= self.gamma <= 1.0:
            raise ValueError(f"gamma must be in [0, 1], got {self.gamma!r}")
        if not math.isfinite(self.reward_shift):
            raise ValueError(f"reward_shift must be finite, got {self.reward_shift!r}")


def spec(cfg: StageConfig, epo_config: EPOConfig, eval_config: evaluation.EvalConfig) -> dict:
    """What the EPO stage's output depends on (its fingerprint's input)."""
    return {
        **fingerprints.trainer_spec(cfg, kind="epo", loss=False),
        "epo": epo_config,
        "eval": eval_config,
    }


def run(cfg: StageConfig, workdir: str, *, epo_config: EPOConfig, eval_config: evaluation.EvalConfig,
        name: str = "epo") -> dict:  # fmt: skip
    """Trains (or resumes) the EPO policy from the SFT stage `cfg.init_from`; returns the results."""
    if not cfg.init_from:
        raise ValueError("EPO training needs init_from: the workdir of a finished SFT stage")
    if cfg.data.task != "dialogue":
        raise ValueError(f"the epo pipeline trains on data.task='dialogue', got {cfg.data.task!r}")
    os.makedirs(workdir, exist_ok=True)
    fingerprints.claim(workdir, spec(cfg, epo_config, eval_config), name)
    if workdir_io.stage_done(workdir):
        return workdir_io.read_results(workdir)

    # Mesh.
    mesh = sharding.make_mesh(cfg.mesh)

    # Data.
    task = tasks.load_task(cfg.data, cfg.seed, init_from=cfg.init_from)
    tokenizer = tasks.tokenizer_for(cfg.data, task, workdir, cfg.init_from)
    stats = rec.LoadStats()
    train_data = turns.tokenize_dialogues(
        task.dialogues, tokenizer, max_len=cfg.data.max_len, max_turns=cfg.data.dialogue_max_turns,
        stats=stats,
    )  # fmt: skip
    data_iter = iter(pipeline.batches(train_data, global_batch_size=cfg.train.batch_size, seed=cfg.seed))

    # Model and optimizer.
    model_cfg = training.model_config(cfg.model, cfg.data, tokenizer)
    model = models.Transformer(model_cfg, mesh=mesh)
    params = training.init_lm_params(model, jax.random.key(cfg.seed), init_from=cfg.init_from)
    objective = functools.partial(
        steps.epo_objective,
        model=model,
        gamma=epo_config.gamma,
        normalize=epo_config.normalize,
        reward_shift=epo_config.reward_shift,
    )
    step_fn, state = training.setup(
        cfg.optim, cfg.train, seed=cfg.seed, mesh=mesh, model=model, params=params, objective=objective,
        weight_fn=steps.pair_weight,
    )  # fmt: skip
    del params
    training.log_startup(name, mesh, model_cfg, cfg.train.batch_size, task.stats)

    # Restore.
    ckpt, state = training.restore(workdir, cfg.checkpoint, state, data_iter)

    # Loop.
    state = training.fit(
        workdir, state, step_fn, loop=cfg.train.loop(cfg.progress), checkpointer=ckpt, mesh=mesh,
        data_iter=data_iter, name=name,
    )  # fmt: skip

    # Evaluate.
    sft_params = workdir_io.load_params(cfg.init_from, state.params)
    results = {
        "stage": name,
        "steps": cfg.train.steps,
        "nonfinite_steps": int(jax.device_get(state.nonfinite_count)),
        "train_turn_reward": float(np.mean([r for d in task.dialogues for r in d.turn_rewards])),
        **evaluate_turns(
            model=model, before=sft_params, after=state.params, tokenizer=tokenizer,
            dialogues=task.eval_dialogues, config=eval_config, seed=cfg.seed,
            max_prompt_len=cfg.data.max_prompt_len, stats=stats,
        ),
        "truncated": dict(stats.truncated),
    }  # fmt: skip
    workdir_io.write_json(os.path.join(workdir, "results.json"), results)
    metrics.plot_curves(workdir, ("loss", "grad_norm"))
    training.save_policy(workdir, state, None, model_cfg, None)  # last: marks the stage as done
    return results


def evaluate_turns(
    *, model, before, after, tokenizer, dialogues, config: evaluation.EvalConfig, seed: int,
    max_prompt_len: int, stats: rec.LoadStats | None = None,
) -> dict:  # fmt: skip
    """Gold per-turn rewards of replies sampled from `before` (SFT) and `after` (EPO) on every assistant
    turn of `dialogues` (the first `config.num_prompts` dialogues; 0: all), with the same keys (module
    docstring's results keys)."""
    dialogues = dialogues[: config.num_prompts] if config.num_prompts else dialogues
    keys, prompts = turns.turn_prompts(dialogues, tokenizer, max_prompt_len=max_prompt_len, stats=stats)
    S = config.samples_per_prompt
    rng = jax.random.key(seed + 7)
    scores = {}
    for name, params in (("sft", before), ("epo", after)):
        out = sampling.sample(
            model, params, prompts["prompt_tokens"], prompts["prompt_lengths"], config=config.sampling(),
            num_samples=S, rng=rng, eos_id=tokenizer.eos_ids, pad_id=tokenizer.pad_id,
        )  # fmt: skip
        texts = evaluation.decode_completions(tokenizer, out.tokens_PNT, out.lengths_PN)
        totals_P = [dialogues[x].meta["totals"][u] for x, u in keys]
        scores[name] = np.array(
            [
                [synthetic_dialogue.turn_reward(text, total) for text in row]
                for row, total in zip(texts, totals_P, strict=True)
            ]
        )  # [P, S]
    dialogue_of_P = np.array([x for x, _ in keys])
    turn_of_P = np.array([u for _, u in keys])
    per_dialogue = lambda r_PS: np.array([r_PS[dialogue_of_P == x].mean() for x in range(len(dialogues))])  # noqa: E731
    gain_X = per_dialogue(scores["epo"]) - per_dialogue(scores["sft"])
    out = {
        "eval_dialogues": len(dialogues),
        "eval_turns": len(keys),
        "samples_per_turn": S,
        "turn_reward_gain": float(gain_X.mean()),
        "turn_reward_gain_ci95": evaluation.bootstrap_ci(gain_X, resamples=config.bootstrap, seed=seed),
    }
    for name, r_PS in scores.items():
        out[f"turn_reward_{name}"] = float(r_PS.mean())
        out[f"turn_accuracy_{name}"] = float((r_PS > 0).mean())
        by_turn = [float(r_PS[turn_of_P == u].mean()) for u in range(turn_of_P.max() + 1)]
        out[f"turn_reward_by_turn_{name}"] = by_turn
    return out


# ----------------------------------------------------------------------------------------------------
# The `epo` pipeline: [SFT →] EPO.


@dataclasses.dataclass(frozen=True)
class Plan:
    """The `epo` pipeline's stages: the SFT stage (when `init_from` is empty), EPO (`main`) with its
    settings, and the evaluation."""

    main: StageConfig
    sft: StageConfig | None
    epo: EPOConfig
    eval: evaluation.EvalConfig


def plan(config) -> Plan:
    """Validates an experiment's ConfigDict into the `epo` pipeline's stage configs."""
    return Plan(
        main=stage_config(config, "train"),
        sft=stage_config(config, "sft") if "sft" in config else None,
        epo=section_config(EPOConfig, config, "epo"),
        eval=section_config(evaluation.EvalConfig, config, "eval"),
    )


def run_pipeline(plan: Plan, workdir: str, *, reuse_from: tuple[str, ...] = ()) -> dict:
    """Runs [SFT →] EPO, each in WORKDIR/{stage}/{fingerprint}/; writes results.json."""
    locate = functools.partial(fingerprints.locate, workdir, reuse_from=reuse_from)
    ran, main = [], plan.main
    if not main.init_from:
        if plan.sft is None:
            raise ValueError("EPO without init_from trains an SFT stage first: give a `sft` section")
        ran.append(sft.run_stage(plan.sft, locate))
        main = dataclasses.replace(main, init_from=ran[-1].dir)
    ran.append(locate("epo", spec(main, plan.epo, plan.eval), done=workdir_io.stage_done))
    results = run(main, ran[-1].dir, epo_config=plan.epo, eval_config=plan.eval)
    return fingerprints.finish(workdir, results, ran, final="epo")
