"""Supervised fine-tuning stage: token-level NLL of the completions.

    results = sft.run(stage_config, workdir)

Writes the stage's workdir (see `rlhf_jax.pipelines.common`) and its `fingerprint.json`
(`rlhf_jax.pipelines.fingerprints`); a finished stage is not run again, and a directory holding a stage
of another configuration is refused.
"""

from __future__ import annotations

import functools
import math
import os

import jax

from rlhf_jax import models, sharding
from rlhf_jax.data import pipeline
from rlhf_jax.data import records as rec
from rlhf_jax.pipelines import common, fingerprints
from rlhf_jax.pipelines.config import StageConfig
from rlhf_jax.train import metrics, steps


def spec(cfg: StageConfig) -> dict:
    """What the SFT stage's output depends on (its fingerprint's input)."""
    return fingerprints.trainer_spec(cfg, kind="sft", loss=False)


def run(cfg: StageConfig, workdir: str, *, name: str = "sft") -> dict:
    """Trains (or resumes) the SFT policy in `workdir`; returns the evaluation results."""
    os.makedirs(workdir, exist_ok=True)
    fingerprints.claim(workdir, spec(cfg), name)
    if common.stage_done(workdir):
        return common.read_results(workdir)

    # Mesh.
    mesh = sharding.make_mesh(cfg.mesh)

    # Data.
    task = common.load_task(cfg.data, cfg.seed)
    tokenizer = common.tokenizer_for(cfg.data, task, workdir, cfg.init_from, cfg.init_from_hf)
    stats = rec.LoadStats()
    train_data = pipeline.tokenize_sft(task.sft, tokenizer, common.layout(cfg.data), stats)
    eval_data = pipeline.tokenize_sft(task.eval_prompts, tokenizer, common.layout(cfg.data))
    data_iter = iter(pipeline.batches(train_data, global_batch_size=cfg.train.batch_size, seed=cfg.seed))

    # Model and optimizer.
    model_cfg = common.model_config(cfg, tokenizer)
    model = models.Transformer(model_cfg, mesh=mesh)
    params = common.init_lm_params(model, cfg, jax.random.key(cfg.seed))
    objective = functools.partial(steps.sft_objective, model=model)
    trainer, state = common.build_trainer(
        cfg=cfg, mesh=mesh, model=model, params=params, objective=objective,
        weight_fn=steps.sft_weight, frozen_shardings=None,
    )  # fmt: skip
    common.log_startup(name, mesh, model_cfg, cfg.train.batch_size, task.stats)

    # Restore.
    ckpt, state = common.restore(cfg, workdir, state, data_iter)

    # Loop.
    state = common.train(cfg, workdir, ckpt, state, trainer=trainer, data_iter=data_iter, name=name)

    # Evaluate.
    ev = common.evaluate_objective(
        objective, state.params, None, eval_data, mesh=mesh, batch_size=cfg.train.eval_batch_size
    )
    results = {
        "stage": name,
        "steps": cfg.train.steps,
        "nonfinite_steps": int(jax.device_get(state.nonfinite_count)),
        "eval_nll_per_token": ev.get("loss"),
        "eval_perplexity": math.exp(min(ev["loss"], 50.0)) if "loss" in ev else None,
        "truncated": dict(stats.truncated),
    }
    common.write_json(os.path.join(workdir, "results.json"), results)
    metrics.plot_curves(workdir, ("loss", "grad_norm"))
    common.save_params(workdir, state.params, model_cfg, "lm")  # last: marks the stage as done
    return results
