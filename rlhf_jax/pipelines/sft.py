"""Supervised fine-tuning: token-level NLL of the completions, or IFT (`config.sft.objective="ift"`,
`rlhf_jax.train.ift`). A stage, and the `sft` pipeline.

    results = sft.run(stage_config, workdir)                       # one stage, in `workdir`
    stage = sft.run_stage(stage_config, locate)                    # in WORKDIR/sft/{fingerprint}/
    results = sft.run(stage_config, workdir, examples=records)     # on generated records (RFT rounds)

Writes the stage's directory (`rlhf_jax.pipelines.workdir`) and its `fingerprint.json`
(`rlhf_jax.pipelines.fingerprints`); a finished stage is not run again, and a directory holding a stage
of another configuration is refused.
"""

from __future__ import annotations

import dataclasses
import functools
import math
import os
from collections.abc import Sequence

import jax

from rlhf_jax import models, sharding
from rlhf_jax.data import pipeline
from rlhf_jax.data import records as rec
from rlhf_jax.pipelines import fingerprints, tasks, training
from rlhf_jax.pipelines import workdir as workdir_io
from rlhf_jax.pipelines.config import StageConfig, stage_config
from rlhf_jax.train import ift, metrics, steps


def spec(cfg: StageConfig, examples: Sequence[rec.SFTExample] | None = None) -> dict:
    """What the SFT stage's output depends on (its fingerprint's input); the objective only when it is
    not the default NLL, so stages fingerprinted before IFT existed still match; with `examples`, their
    contents (`fingerprints.examples_digest`) instead of the task's demonstrations."""
    out = fingerprints.trainer_spec(cfg, kind="sft", loss=False)
    if cfg.sft_objective.objective != "nll":
        out["sft_objective"] = dataclasses.asdict(cfg.sft_objective)
    if examples is not None:
        out["examples"] = fingerprints.examples_digest(examples)
    return out


def run(
    cfg: StageConfig, workdir: str, *, name: str = "sft", examples: Sequence[rec.SFTExample] | None = None
) -> dict:
    """Trains (or resumes) the SFT policy in `workdir`; returns the evaluation results.

    Args:
      cfg: the stage's config; its data section still gives the held-out examples and the tokenizer.
      workdir: the stage's directory.
      name: label for logs.
      examples: train on these (e.g. an RFT round's kept samples, `pipelines.rft`) instead of the task's
        demonstrations; they enter the fingerprint by content.
    """
    if examples is not None and not examples:
        raise ValueError(f"{name}: no SFT examples to train on")
    os.makedirs(workdir, exist_ok=True)
    fingerprints.claim(workdir, spec(cfg, examples), name)
    if workdir_io.stage_done(workdir):
        return workdir_io.read_results(workdir)

    # Mesh.
    mesh = sharding.make_mesh(cfg.mesh)

    # Data.
    task = tasks.load_task(cfg.data, cfg.seed, init_from=cfg.init_from, init_from_hf=cfg.init_from_hf)
    tokenizer = tasks.tokenizer_for(cfg.data, task, workdir, cfg.init_from, cfg.init_from_hf)
    stats = rec.LoadStats()
    train_examples = tasks.sft_examples(task, tokenizer, cfg.data) if examples is None else examples
    train_data = pipeline.tokenize_sft(train_examples, tokenizer, tasks.layout(cfg.data), stats)
    eval_data = pipeline.tokenize_sft(task.eval_prompts, tokenizer, tasks.layout(cfg.data))
    data_iter = iter(pipeline.batches(train_data, global_batch_size=cfg.train.batch_size, seed=cfg.seed))

    # Model and optimizer.
    model_cfg = training.model_config(cfg.model, cfg.data, tokenizer, init_from_hf=cfg.init_from_hf)
    model = models.Transformer(model_cfg, mesh=mesh)
    params = training.init_lm_params(
        model, jax.random.key(cfg.seed), init_from=cfg.init_from, init_from_hf=cfg.init_from_hf
    )
    objective, weight_fn = ift.make(cfg.sft_objective, model)
    lora = cfg.train.lora()  # LoRA: the state holds the adapters, `params` stays the frozen base
    # The step's read-only input: with LoRA the frozen base; with IFT (full fine-tuning) the init's
    # embedding table E₀, rebuilt from the same init on resume (`rlhf_jax.train.ift`); else nothing.
    ift_on = cfg.sft_objective.objective == "ift" and lora is None
    read_only_sh = ift.frozen_embedding(models.param_shardings(model, mesh)) if ift_on else None
    read_only = jax.device_put(ift.frozen_embedding(params), read_only_sh) if ift_on else None
    step_fn, state = training.setup(
        cfg.optim, cfg.train, seed=cfg.seed, mesh=mesh, model=model, params=params, objective=objective,
        weight_fn=weight_fn, lora=lora, reference_shardings=read_only_sh,
    )  # fmt: skip
    base = params if lora is not None else None  # full fine-tuning: the state holds the only copy
    read_only = base if lora is not None else read_only
    del params
    training.log_startup(name, mesh, model_cfg, cfg.train.batch_size, task.stats)

    # Restore.
    ckpt, state = training.restore(workdir, cfg.checkpoint, state, data_iter)

    # Loop.
    state = training.fit(
        workdir, state, step_fn, loop=cfg.train.loop(cfg.progress), checkpointer=ckpt, mesh=mesh,
        data_iter=data_iter, reference_params=read_only, name=name,
    )  # fmt: skip

    # Evaluate: the token-level NLL whatever the training objective, so NLL and IFT stages compare.
    ev = training.evaluate_objective(
        functools.partial(steps.sft_objective, model=model), training.policy_params(state.params, base, lora),
        None, eval_data, mesh=mesh, batch_size=cfg.train.eval_batch_size,
    )  # fmt: skip
    results = {
        "stage": name,
        "steps": cfg.train.steps,
        "nonfinite_steps": int(jax.device_get(state.nonfinite_count)),
        "eval_nll_per_token": ev.get("loss"),
        "eval_perplexity": math.exp(min(ev["loss"], 50.0)) if "loss" in ev else None,
        "truncated": dict(stats.truncated),
    }
    workdir_io.write_json(os.path.join(workdir, "results.json"), results)
    metrics.plot_curves(workdir, ("loss", "grad_norm"))
    training.save_policy(workdir, state, base, model_cfg, lora)  # last: marks the stage as done
    return results


def run_stage(cfg: StageConfig, locate, *, name: str = "sft") -> fingerprints.Stage:
    """Locates the SFT stage by fingerprint (`fingerprints.locate`, bound to a run's workdir), runs it
    unless it is done, and returns it: the first step of every pipeline that starts from an SFT policy."""
    stage = locate("sft", spec(cfg), done=workdir_io.stage_done)
    run(cfg, stage.dir, name=name)
    return stage


# ----------------------------------------------------------------------------------------------------
# The `sft` pipeline.


@dataclasses.dataclass(frozen=True)
class Plan:
    """The `sft` pipeline's one stage."""

    main: StageConfig


def plan(config) -> Plan:
    """Validates an experiment's ConfigDict into the `sft` pipeline's stage config."""
    return Plan(main=stage_config(config, "train"))


def run_pipeline(plan: Plan, workdir: str, *, reuse_from: tuple[str, ...] = ()) -> dict:
    """Runs the SFT stage in WORKDIR/sft/{fingerprint}/; writes WORKDIR/results.json and stages.json."""
    locate = functools.partial(fingerprints.locate, workdir, reuse_from=reuse_from)
    stage = run_stage(plan.main, locate)
    return fingerprints.finish(workdir, workdir_io.read_results(stage.dir), [stage], final="sft")
