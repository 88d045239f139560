"""Reward-model stage: a pointwise Bradley-Terry reward model, or RSO's pairwise ranking model.

    results = reward.run(stage_config, workdir, kind="pointwise")   # or kind="pairwise"
    stage = reward.run_stage(stage_config, locate, kind=kind)       # in WORKDIR/rm/{fingerprint}/

The kind is the experiment's `rm.kind` (`config.rm_kind`), one name everywhere: "pointwise" or
"pairwise", also in the stage's `model.json` (which earlier versions wrote as "reward" / "ranking",
still read).

Pointwise: r(x, y) from the reward head on the last token of prompt + response, trained with
`losses.bradley_terry`. Pairwise (RSO's ranking model, Liu et al. 2024, Sec. 3): one sequence holds the
prompt and two responses, `format_pair`, and the head's output is the logit of P(A ≻ B), trained with
a sigmoid cross-entropy; A/B order is flipped at random per pair (seeded) so the model cannot learn a
position bias. The trunk starts from `init_from` (an SFT stage) when given.

The ranking model has its own, longer rows (`pipeline.RankingLayout`, sized by `ranking_layout`): the
prompt as in the policy's rows, room for two responses, the template and the EOS whose hidden state the
head reads. Each response is cut to its share of the row, never the question or the EOS; the share of
inputs with a response cut is `ranking_truncated_fraction` in results.json (a warning above 5%). The
layout is saved as `ranking_layout.json` beside the params, and scoring (`scoring.score_pairwise` via
`load_proxy`) builds its inputs with it.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import os

import jax
import numpy as np

from rlhf_jax import models, sharding
from rlhf_jax.data import pipeline
from rlhf_jax.data import records as rec
from rlhf_jax.pipelines import evaluation, fingerprints, sft, tasks, training
from rlhf_jax.pipelines import workdir as workdir_io
from rlhf_jax.pipelines.config import RM_KINDS, DataConfig, StageConfig, rm_kind, stage_config
from rlhf_jax.train import metrics, steps

RANKING_LAYOUT_FILE = "ranking_layout.json"
# model.json's `kind` for reward models as earlier versions wrote it.
_LEGACY_KINDS = {"reward": "pointwise", "ranking": "pairwise"}


def saved_kind(model_json: dict) -> str:
    """The kind of the model a stage saved: "lm", "pointwise" or "pairwise" (legacy names mapped)."""
    kind = model_json.get("kind", "")
    return _LEGACY_KINDS.get(kind, kind)


def format_pair(a: str, b: str) -> str:
    """The text after the prompt in a ranking-model input when nothing is cut (the ids are built piece
    by piece, `pipeline.tokenize_ranking`)."""
    before, middle, question = pipeline.RANKING_TEMPLATE
    return f"{before}{a}{middle}{b}{question}"


def ranking_examples(
    pairs: list[rec.PreferenceExample], seed: int
) -> tuple[list[str], list[str], list[str], np.ndarray]:
    """Ranking-model inputs with random A/B order: (prompts, responses A, responses B, labels [N] = 1
    where A is the preferred response)."""
    a_first = np.random.default_rng([seed, 11]).random(len(pairs)) < 0.5
    a = [p.chosen if f else p.rejected for p, f in zip(pairs, a_first, strict=True)]
    b = [p.rejected if f else p.chosen for p, f in zip(pairs, a_first, strict=True)]
    return [p.prompt for p in pairs], a, b, a_first.astype(np.float32)


def ranking_data(
    pairs: list[rec.PreferenceExample],
    tokenizer,
    layout: pipeline.RankingLayout,
    *,
    seed: int,
    stats: rec.LoadStats | None = None,
) -> tuple[pipeline.TokenizedSFT, np.ndarray]:
    """The ranking model's training rows (`ranking_examples` in `pipeline.tokenize_ranking`'s layout,
    the one scoring uses) and their labels [N]."""
    prompts, a, b, labels = ranking_examples(pairs, seed)
    return pipeline.tokenize_ranking(prompts, a, b, tokenizer, layout, stats), labels


def ranking_layout(data: DataConfig, tokenizer, response_len: int = 0) -> pipeline.RankingLayout:
    """The ranking model's layout: the policy's prompt length, and room per response for the longer of
    a human response (`data.max_len - data.max_prompt_len`, its room in the policy's rows) and a sampled
    one (`response_len`, the largest `max_new_tokens` the model will judge)."""
    return pipeline.RankingLayout.for_tokenizer(
        tokenizer,
        max_prompt_len=data.max_prompt_len,
        max_response_len=max(data.max_len - data.max_prompt_len, response_len),
    )


def save_ranking_layout(workdir: str, layout: pipeline.RankingLayout) -> None:
    """Writes the layout a ranking model is trained with next to its params (`load_ranking_layout`)."""
    workdir_io.write_json(os.path.join(workdir, RANKING_LAYOUT_FILE), dataclasses.asdict(layout))


def load_ranking_layout(workdir: str) -> pipeline.RankingLayout:
    """The layout the ranking model in `workdir` was trained with, so scoring builds the same inputs."""
    path = os.path.join(workdir, RANKING_LAYOUT_FILE)
    if not os.path.exists(path):
        raise FileNotFoundError(
            f"{path}: missing; the ranking model in {workdir!r} was trained before the ranking layout "
            "existed (retrain it)"
        )
    with open(path, encoding="utf-8") as f:
        saved = json.load(f)
    try:
        return pipeline.RankingLayout(**saved)
    except (TypeError, ValueError) as e:
        raise ValueError(f"{path}: not a ranking layout ({e})") from e


def _with_labels(labels_X: np.ndarray):
    def transform(batch: dict) -> dict:
        ids = batch["example_ids"]
        return {**batch, "labels": np.where(ids >= 0, labels_X[np.maximum(ids, 0)], 0.0).astype(np.float32)}

    return transform


def init_reward_params(model: models.RewardModel, rng, *, init_from: str = "", init_from_hf: str = ""):
    """Reward-model params: a reward model's from `init_from`, or the trunk copied from `init_from`'s
    (or the HuggingFace checkpoint's) LM params and a fresh head."""
    params = models.init_params(model, rng)
    if not init_from and init_from_hf:
        from rlhf_jax import interop

        lm = interop.import_params(init_from_hf, models.Transformer(model.config, mesh=model.mesh))
        return {**params, "decoder": lm["decoder"]}
    if init_from:
        saved = workdir_io.load_model_json(init_from)
        if saved_kind(saved) in RM_KINDS:
            return workdir_io.load_params(init_from, params)
        workdir_io.check_same_architecture(init_from, model.config)
        lm = models.Transformer(model.config, mesh=model.mesh)
        lm_params = workdir_io.load_params(init_from, models.init_params(lm, rng))
        params = {**params, "decoder": lm_params["decoder"]}
    return params


def load_proxy(workdir: str, mesh, layout: pipeline.SequenceLayout) -> evaluation.Proxy:
    """The reward or ranking model finished in `workdir`, as an evaluation `Proxy` (a ranking model
    carries the layout it was trained with, `ranking_layout.json`, not `layout`)."""
    saved = workdir_io.load_model_json(workdir)
    kind = saved_kind(saved)
    saved.pop("kind")
    if kind not in RM_KINDS:
        raise ValueError(f"{workdir!r} holds a {kind!r} model, not a reward model ({'/'.join(RM_KINDS)})")
    model_cfg = models.ModelConfig(**saved)
    model = models.RewardModel(model_cfg, mesh=mesh)
    params = workdir_io.load_params(workdir, models.init_params(model, jax.random.key(0)))
    if kind == "pairwise":
        return evaluation.Proxy("pairwise", model, params, load_ranking_layout(workdir))
    return evaluation.Proxy("pointwise", model, params, layout)


def spec(cfg: StageConfig, kind: str, ranking_response_len: int = 0) -> dict:
    """What the reward-model stage's output depends on (its fingerprint's input); for a ranking model,
    also the response room of its layout (`ranking_layout`, `run`'s `ranking_response_len`)."""
    out = fingerprints.trainer_spec(cfg, kind=f"reward:{kind}", loss=False)
    if kind == "pairwise":
        room = cfg.data.max_len - cfg.data.max_prompt_len
        out["ranking_max_response_len"] = max(room, ranking_response_len)
    return out


def run(
    cfg: StageConfig,
    workdir: str,
    *,
    kind: str = "pointwise",
    name: str = "reward",
    ranking_response_len: int = 0,
) -> dict:
    """Trains (or resumes) a reward model in `workdir`; returns held-out accuracy and loss.

    A pairwise ranking model gets its own layout (`ranking_layout`): `ranking_response_len` is the
    longest sampled response it will judge (the pipelines pass their `max_new_tokens`); it is written to
    `ranking_layout.json`, which scoring reads (`load_proxy`).
    """
    if kind not in RM_KINDS:
        raise ValueError(f"reward model kind (rm.kind) must be one of {RM_KINDS}, got {kind!r}")
    os.makedirs(workdir, exist_ok=True)
    fingerprints.claim(workdir, spec(cfg, kind, ranking_response_len), name)
    if workdir_io.stage_done(workdir):
        return workdir_io.read_results(workdir)

    # Mesh.
    mesh = sharding.make_mesh(cfg.mesh)

    # Data.
    task = tasks.load_task(cfg.data, cfg.seed, init_from=cfg.init_from, init_from_hf=cfg.init_from_hf)
    tokenizer = tasks.tokenizer_for(cfg.data, task, workdir, cfg.init_from, cfg.init_from_hf)
    stats = rec.LoadStats()
    lay = tasks.layout(cfg.data)
    if kind == "pointwise":
        train_data = pipeline.tokenize_preference(task.preference, tokenizer, lay, stats)
        eval_data = pipeline.tokenize_preference(task.eval_preference, tokenizer, lay)
        train_tf = eval_tf = None
        ranking = {}
    else:
        ranking_lay = ranking_layout(cfg.data, tokenizer, ranking_response_len)
        if cfg.init_from_hf and ranking_lay.max_len > cfg.model.max_len:
            raise ValueError(
                f"the ranking model's inputs need {ranking_lay.max_len} tokens ({ranking_lay}) but the "
                f"checkpoint {cfg.init_from_hf} was trained on {cfg.model.max_len}"
            )
        save_ranking_layout(workdir, ranking_lay)
        eval_stats = rec.LoadStats()
        train_data, labels = ranking_data(task.preference, tokenizer, ranking_lay, seed=cfg.seed, stats=stats)
        eval_data, eval_labels = ranking_data(
            task.eval_preference, tokenizer, ranking_lay, seed=cfg.seed + 1, stats=eval_stats
        )
        train_tf, eval_tf = _with_labels(labels), _with_labels(eval_labels)
        ranking = {
            "ranking_layout": {**dataclasses.asdict(ranking_lay), "max_len": ranking_lay.max_len},
            "ranking_truncated_fraction": pipeline.ranking_truncated_fraction(
                stats, len(train_data), f"[{name}] training pairs"
            ),
            "ranking_truncated_fraction_eval": pipeline.ranking_truncated_fraction(
                eval_stats, len(eval_data), f"[{name}] held-out pairs"
            ),
        }
    data_iter = iter(pipeline.batches(train_data, global_batch_size=cfg.train.batch_size, seed=cfg.seed))

    # Model and optimizer.
    model_cfg = training.model_config(cfg.model, cfg.data, tokenizer, init_from_hf=cfg.init_from_hf)
    model = models.RewardModel(model_cfg, mesh=mesh)
    params = init_reward_params(
        model, jax.random.key(cfg.seed), init_from=cfg.init_from, init_from_hf=cfg.init_from_hf
    )
    fn = steps.reward_objective if kind == "pointwise" else steps.ranking_objective
    objective = functools.partial(fn, model=model)
    step_fn, state = training.setup(
        cfg.optim, cfg.train, seed=cfg.seed, mesh=mesh, model=model, params=params, objective=objective,
        weight_fn=steps.pair_weight,
    )  # fmt: skip
    training.log_startup(f"{name} ({kind})", mesh, model_cfg, cfg.train.batch_size, task.stats)

    # Restore.
    ckpt, state = training.restore(workdir, cfg.checkpoint, state, data_iter)

    # Loop.
    state = training.fit(
        workdir, state, step_fn, loop=cfg.train.loop(cfg.progress), checkpointer=ckpt, mesh=mesh,
        data_iter=data_iter, transform=train_tf, name=name,
    )  # fmt: skip

    # Evaluate.
    ev = training.evaluate_objective(
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
        **ranking,
    }
    workdir_io.write_json(os.path.join(workdir, "results.json"), results)
    metrics.plot_curves(workdir, ("loss", "accuracy"))
    workdir_io.save_params(workdir, state.params, model_cfg, kind)  # last: marks the stage as done
    return results


def run_stage(cfg: StageConfig, locate, *, kind: str, response_len: int = 0, name: str = "rm"):
    """Locates the reward-model stage by fingerprint (`fingerprints.locate` bound to a run's workdir),
    runs it unless it is done, and returns it. `response_len`: the longest sampled response a ranking
    model will judge (`run`'s `ranking_response_len`)."""
    stage = locate("rm", spec(cfg, kind, response_len), done=workdir_io.stage_done)
    run(cfg, stage.dir, kind=kind, name=name, ranking_response_len=response_len)
    return stage


# ----------------------------------------------------------------------------------------------------
# The `reward` pipeline: [SFT →] reward model.


@dataclasses.dataclass(frozen=True)
class Plan:
    """The `reward` pipeline's stages: the SFT stage it starts from (when `init_from` is empty) and the
    reward model (`main`) of kind `rm_kind`."""

    main: StageConfig
    sft: StageConfig | None
    rm_kind: str


def plan(config) -> Plan:
    """Validates an experiment's ConfigDict into the `reward` pipeline's stage configs."""
    return Plan(
        main=stage_config(config, "train"),
        sft=stage_config(config, "sft") if "sft" in config else None,
        rm_kind=rm_kind(config),
    )


def run_pipeline(plan: Plan, workdir: str, *, reuse_from: tuple[str, ...] = ()) -> dict:
    """Runs [SFT →] the reward model, each in WORKDIR/{stage}/{fingerprint}/; writes results.json."""
    locate = functools.partial(fingerprints.locate, workdir, reuse_from=reuse_from)
    ran, main = [], plan.main
    if not main.init_from:
        if plan.sft is None:
            raise ValueError(
                "a reward model without init_from trains an SFT stage first: give a `sft` section"
            )
        ran.append(sft.run_stage(plan.sft, locate))
        main = dataclasses.replace(main, init_from=ran[-1].dir)
    ran.append(run_stage(main, locate, kind=plan.rm_kind))
    return fingerprints.finish(workdir, workdir_io.read_results(ran[-1].dir), ran, final="rm")
