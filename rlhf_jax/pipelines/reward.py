"""Reward-model stage: a pointwise Bradley-Terry reward model, or RSO's pairwise ranking model.

    results = reward.run(stage_config, workdir, kind="pointwise")   # or kind="pairwise"

Pointwise: r(x, y) from the reward head on the last token of prompt + response, trained with
`losses.bradley_terry`. Pairwise (RSO's ranking model, Liu et al. 2024, Sec. 3): one sequence holds the
prompt and two responses, `format_pair`, and the head's output is the logit of P(A ≻ B), trained with
a sigmoid cross-entropy; A/B order is flipped at random per pair (seeded) so the model cannot learn a
position bias. The trunk starts from `init_from` (an SFT stage) when given.
"""

from __future__ import annotations

import functools
import os

import jax
import numpy as np

from rlhf_jax import models, sharding
from rlhf_jax.data import pipeline
from rlhf_jax.data import records as rec
from rlhf_jax.pipelines import common
from rlhf_jax.pipelines.config import StageConfig
from rlhf_jax.train import metrics, steps

PAIR_TEMPLATE = "\n\nResponse A:{a}\n\nResponse B:{b}\n\nWhich response is better?"


def format_pair(a: str, b: str) -> str:
    """The completion part of a ranking-model input (the prompt comes first, as for the policy)."""
    return PAIR_TEMPLATE.format(a=a, b=b)


def ranking_examples(
    pairs: list[rec.PreferenceExample], seed: int
) -> tuple[list[rec.SFTExample], np.ndarray]:
    """Ranking-model inputs with random A/B order; labels [N] = 1 where A is the preferred response."""
    a_first = np.random.default_rng([seed, 11]).random(len(pairs)) < 0.5
    examples = [
        rec.SFTExample(
            p.prompt, format_pair(p.chosen, p.rejected) if f else format_pair(p.rejected, p.chosen)
        )
        for p, f in zip(pairs, a_first, strict=True)
    ]
    return examples, a_first.astype(np.float32)


def _with_labels(labels_N: np.ndarray):
    def transform(batch: dict) -> dict:
        ids = batch["example_ids"]
        return {**batch, "labels": np.where(ids >= 0, labels_N[np.maximum(ids, 0)], 0.0).astype(np.float32)}

    return transform


def init_reward_params(model: models.RewardModel, cfg: StageConfig, rng):
    """Reward-model params; the trunk is copied from `init_from`'s LM params when given."""
    params = models.init_params(model, rng)
    if not cfg.init_from and cfg.init_from_hf:
        from rlhf_jax import interop

        lm = interop.import_params(cfg.init_from_hf, models.Transformer(model.config, mesh=model.mesh))
        return {**params, "decoder": lm["decoder"]}
    if cfg.init_from:
        saved = common.load_model_json(cfg.init_from)
        if saved.get("kind") == "reward":
            return common.load_params(cfg.init_from, params)
        common.check_same_architecture(cfg.init_from, model.config)
        lm = models.Transformer(model.config, mesh=model.mesh)
        lm_params = common.load_params(cfg.init_from, models.init_params(lm, rng))
        params = {**params, "decoder": lm_params["decoder"]}
    return params


def run(cfg: StageConfig, workdir: str, *, kind: str = "pointwise", name: str = "reward") -> dict:
    """Trains (or resumes) a reward model in `workdir`; returns held-out accuracy and loss."""
    if kind not in ("pointwise", "pairwise"):
        raise ValueError(f"reward model kind must be 'pointwise' or 'pairwise', got {kind!r}")
    os.makedirs(workdir, exist_ok=True)
    if common.stage_done(workdir):
        return common.read_results(workdir)

    # Mesh.
    mesh = sharding.make_mesh(cfg.mesh)

    # Data.
    task = common.load_task(cfg.data, cfg.seed)
    tokenizer = common.tokenizer_for(cfg.data, task, workdir, cfg.init_from, cfg.init_from_hf)
    stats = rec.LoadStats()
    lay = common.layout(cfg.data)
    if kind == "pointwise":
        train_data = pipeline.tokenize_preference(task.preference, tokenizer, lay, stats)
        eval_data = pipeline.tokenize_preference(task.eval_preference, tokenizer, lay)
        train_tf = eval_tf = None
    else:
        examples, labels = ranking_examples(task.preference, cfg.seed)
        eval_examples, eval_labels = ranking_examples(task.eval_preference, cfg.seed + 1)
        train_data = pipeline.tokenize_sft(examples, tokenizer, lay, stats)
        eval_data = pipeline.tokenize_sft(eval_examples, tokenizer, lay)
        train_tf, eval_tf = _with_labels(labels), _with_labels(eval_labels)
    data_iter = iter(pipeline.batches(train_data, global_batch_size=cfg.train.batch_size, seed=cfg.seed))

    # Model and optimizer.
    model_cfg = common.model_config(cfg, tokenizer)
    model = models.RewardModel(model_cfg, mesh=mesh)
    params = init_reward_params(model, cfg, jax.random.key(cfg.seed))
    fn = steps.reward_objective if kind == "pointwise" else steps.ranking_objective
    objective = functools.partial(fn, model=model)
    trainer, state = common.build_trainer(
        cfg=cfg, mesh=mesh, model=model, params=params, objective=objective,
        weight_fn=steps.pair_weight, frozen_shardings=None,
    )  # fmt: skip
    common.log_startup(f"{name} ({kind})", mesh, model_cfg, cfg.train.batch_size, task.stats)

    # Restore.
    ckpt, state = common.restore(cfg, workdir, state, data_iter)

    # Loop.
    state = common.train(
        cfg, workdir, ckpt, state, trainer=trainer, data_iter=data_iter, transform=train_tf, name=name
    )

    # Evaluate.
    ev = common.evaluate_objective(
        objective, state.params, None, eval_data, mesh=mesh, batch_size=cfg.train.eval_batch_size,
        transform=eval_tf,
    )  # fmt: skip
    results = {
        "stage": name,
        "kind": kind,
        "steps": cfg.train.steps,
        "nonfinite_steps": int(jax.device_get(state.nonfinite_count)),
        "eval_accuracy": ev.get("accuracy"),
        "eval_loss": ev.get("loss"),
        "eval_pairs": len(task.eval_preference),
        "truncated": dict(stats.truncated),
    }
    common.write_json(os.path.join(workdir, "results.json"), results)
    metrics.plot_curves(workdir, ("loss", "accuracy"))
    common.save_params(workdir, state.params, model_cfg, "reward" if kind == "pointwise" else "ranking")
    return results
