"""Offline preference-training stage: any pairwise loss from `rlhf_jax.losses` against a frozen reference.

    results = preference.run(stage_config, workdir)

The policy and the reference both start from `init_from` (an SFT stage). Reference log-probs are either
computed in every step without gradient (`train.reference="online"`) or once over the dataset, stored
in `WORKDIR/reference_logps.npz` and looked up by example id (`"precomputed"`); both give the same loss.
"""

from __future__ import annotations

import functools
import json
import os

import jax
import numpy as np

from rlhf_jax import losses, models, sharding
from rlhf_jax.data import pipeline, synthetic_tldr
from rlhf_jax.data import records as rec
from rlhf_jax.pipelines import common, evaluation, fingerprints, reward
from rlhf_jax.pipelines.config import StageConfig
from rlhf_jax.train import metrics, steps

REFERENCE_KEYS = ("reference_chosen_logps", "reference_rejected_logps")


def loss_inputs(name: str) -> tuple[str, ...]:
    """The array inputs the step passes to loss `name`: its required ones.

    Optional inputs are not passed: `ipo` then regresses the summed log-ratio margin as in the paper
    (Azar et al. 2023), not TRL's per-token variant (call `losses.ipo` with lengths for that).
    """
    return losses.required_inputs(name)


def compute_pair_logps(model, params, data, *, mesh, batch_size: int) -> tuple[np.ndarray, np.ndarray]:
    """Summed log-probs of every pair's chosen and rejected response under `params`: two [N] arrays."""
    fn = jax.jit(lambda p, b: steps.pair_logps(model, p, b), out_shardings=sharding.replicated(mesh))
    n = len(data)
    chosen, rejected = np.zeros(n, np.float32), np.zeros(n, np.float32)
    it = iter(pipeline.batches(data, global_batch_size=batch_size, shuffle=False, num_epochs=1,
                               drop_remainder=False, process_index=0, process_count=1))  # fmt: skip
    rows = sharding.process_rows(mesh, batch_size)
    for full in it:
        local = {k: v[rows] for k, v in full.items()}
        c, r = jax.device_get(fn(params, sharding.shard_batch(local, mesh)))
        c, r = np.asarray(c), np.asarray(r)
        ids = full["example_ids"]
        keep = ids >= 0
        chosen[ids[keep]], rejected[ids[keep]] = c[keep], r[keep]
    return chosen, rejected


def with_logps(prefix: str, chosen_N: np.ndarray, rejected_N: np.ndarray):
    """A batch transform adding precomputed `{prefix}_chosen_logps` / `{prefix}_rejected_logps` looked up
    by example id (0 on padding rows)."""

    def transform(batch: dict) -> dict:
        ids = batch["example_ids"]
        safe = np.maximum(ids, 0)
        return {
            **batch,
            f"{prefix}_chosen_logps": np.where(ids >= 0, chosen_N[safe], 0.0).astype(np.float32),
            f"{prefix}_rejected_logps": np.where(ids >= 0, rejected_N[safe], 0.0).astype(np.float32),
        }

    return transform


def precomputed_logps(path: str, model, params, data, *, mesh, batch_size: int):
    """`compute_pair_logps`, cached in `path` (npz, written atomically) so a resumed run reuses it."""
    if os.path.exists(path):
        saved = np.load(path)
        return saved["chosen"], saved["rejected"]
    chosen, rejected = compute_pair_logps(model, params, data, mesh=mesh, batch_size=batch_size)
    if common.is_main():
        np.savez(path + ".tmp.npz", chosen=chosen, rejected=rejected)
        os.replace(path + ".tmp.npz", path)
    return chosen, rejected


def _compose(transforms):
    def transform(batch):
        for t in transforms:
            batch = t(batch)
        return batch

    return transform if transforms else None


def pairs_digest(data: pipeline.TokenizedPreference) -> str:
    """Content hash of tokenised pairs (ids, weights and shapes)."""
    lengths = [np.asarray([len(x) for x in ids], np.int64) for ids in (data.prompt_ids, data.chosen_ids,
                                                                      data.rejected_ids)]  # fmt: skip
    flat = [np.concatenate(ids) if len(ids) else np.zeros(0, np.int32)
            for ids in (data.prompt_ids, data.chosen_ids, data.rejected_ids)]  # fmt: skip
    return fingerprints.arrays_digest(*lengths, *flat, np.asarray(data.weights), np.asarray([data.max_len]))


def spec(
    cfg: StageConfig,
    *,
    train_data: pipeline.TokenizedPreference | None = None,
    eval_config: evaluation.EvalConfig | None = None,
    proxy_dir: str = "",
    reference_from: str = "",
    previous_from: str = "",
    sft_from: str = "",
) -> dict:
    """What a preference stage's output depends on (its fingerprint's input); arguments as `run`'s."""
    return {
        **fingerprints.trainer_spec(cfg, kind="policy", loss=True),
        "train_pairs": pairs_digest(train_data) if train_data is not None else "task",
        "eval": eval_config,
        "proxy": fingerprints.stage_input(proxy_dir),
        "reference": fingerprints.stage_input(reference_from or cfg.init_from),
        "previous": fingerprints.stage_input(previous_from),
        "sft": fingerprints.stage_input(sft_from or cfg.init_from) if eval_config is not None else "",
    }


def run(
    cfg: StageConfig,
    workdir: str,
    *,
    name: str = "preference",
    train_data: pipeline.TokenizedPreference | None = None,
    eval_config: evaluation.EvalConfig | None = None,
    proxy_dir: str = "",
    reference_from: str = "",
    previous_from: str = "",
    sft_from: str = "",
) -> dict:
    """Trains (or resumes) the policy with `cfg.loss` in `workdir`; returns held-out metrics.

    Args:
      cfg: the stage's config; `cfg.init_from` is the SFT stage (policy and reference start there).
      workdir: the stage's directory.
      name: label for logs.
      train_data: tokenised training pairs (e.g. RSO's sampled pairs); default the task's pairs.
      eval_config: if given, also sample from the policy and the SFT policy on held-out prompts and
        report win rates (`rlhf_jax.pipelines.evaluation`).
      proxy_dir: a reward- or ranking-model stage's workdir, the proxy judge of that evaluation.
      reference_from: the workdir whose final params are the frozen reference (default `cfg.init_from`;
        iterative methods start the policy from the previous iterate but keep the SFT reference).
      previous_from: the workdir of INPO's previous iterate π_t; its log-probs of the training pairs
        are precomputed once (`previous_logps.npz`) and fed to the loss as `previous_*_logps`.
      sft_from: the SFT stage the sample-based evaluation compares against (`*_vs_sft`, `kl_to_sft`);
        default `cfg.init_from`. Always the SFT policy, whatever the training reference is: iterative
        DPO trains against π_t but is still evaluated against π_sft.
    """
    if not cfg.init_from:
        raise ValueError("preference training needs init_from: the workdir of a finished SFT stage")
    os.makedirs(workdir, exist_ok=True)
    stage_spec = spec(
        cfg, train_data=train_data, eval_config=eval_config, proxy_dir=proxy_dir,
        reference_from=reference_from, previous_from=previous_from, sft_from=sft_from,
    )  # fmt: skip
    fingerprints.claim(workdir, stage_spec, name)
    if common.stage_done(workdir):
        return common.read_results(workdir)

    # Mesh.
    mesh = sharding.make_mesh(cfg.mesh)

    # Data.
    task = common.load_task(cfg.data, cfg.seed)
    tokenizer = common.tokenizer_for(cfg.data, task, workdir, cfg.init_from, cfg.init_from_hf)
    stats = rec.LoadStats()
    lay = common.layout(cfg.data)
    if train_data is None:
        train_data = pipeline.tokenize_preference(task.preference, tokenizer, lay, stats)
    eval_data = pipeline.tokenize_preference(task.eval_preference, tokenizer, lay)
    data_iter = iter(pipeline.batches(train_data, global_batch_size=cfg.train.batch_size, seed=cfg.seed))

    # Model, reference and optimizer.
    model_cfg = common.model_config(cfg, tokenizer)
    model = models.Transformer(model_cfg, mesh=mesh)
    policy = common.init_lm_params(model, cfg, jax.random.key(cfg.seed))
    if reference_from and os.path.abspath(reference_from) != os.path.abspath(cfg.init_from):
        reference = common.load_params(reference_from, policy)
    else:
        reference = jax.tree.map(lambda x: x.copy(), policy)
    objective = functools.partial(
        steps.preference_objective, model=model, loss_fn=cfg.loss.make(),
        loss_inputs=loss_inputs(cfg.loss.name), metric_beta=cfg.loss.metric_beta(),
    )  # fmt: skip
    param_sh = models.param_shardings(model, mesh)
    precomputed = cfg.train.reference == "precomputed"
    trainer, state = common.build_trainer(
        cfg=cfg, mesh=mesh, model=model, params=policy, objective=objective,
        weight_fn=steps.pair_weight, frozen_shardings=None if precomputed else param_sh,
    )  # fmt: skip
    common.log_startup(f"{name} ({cfg.loss.name})", mesh, model_cfg, cfg.train.batch_size, task.stats)
    transforms, frozen = [], reference
    kw = dict(mesh=mesh, batch_size=cfg.train.eval_batch_size)
    if precomputed:
        path = os.path.join(workdir, "reference_logps.npz")
        transforms.append(
            with_logps("reference", *precomputed_logps(path, model, reference, train_data, **kw))
        )
        frozen = None
    eval_transform = None
    if previous_from:
        previous = common.load_params(previous_from, policy)
        path = os.path.join(workdir, "previous_logps.npz")
        transforms.append(with_logps("previous", *precomputed_logps(path, model, previous, train_data, **kw)))
        path = os.path.join(workdir, "eval_previous_logps.npz")
        eval_transform = with_logps("previous", *precomputed_logps(path, model, previous, eval_data, **kw))
        del previous
    elif any(k.startswith("previous_") for k in loss_inputs(cfg.loss.name)):
        raise ValueError(f"loss {cfg.loss.name!r} needs the previous iterate's log-probs: give previous_from")
    transform = _compose(transforms)

    # The evaluation baseline: the SFT policy, not the training reference (which may be π_t).
    same = lambda a, b: os.path.abspath(a) == os.path.abspath(b)
    sft_from = sft_from or cfg.init_from
    sft_params = None
    if eval_config is not None:
        use_reference = same(sft_from, reference_from or cfg.init_from)
        sft_params = reference if use_reference else common.load_params(sft_from, policy)

    # Restore.
    ckpt, state = common.restore(cfg, workdir, state, data_iter)

    # Periodic sample-based evaluation (e.g. for over-optimisation curves).
    gold = synthetic_tldr.gold_reward if task.synthetic else None
    resume_step = int(jax.device_get(state.step))
    callback = None
    if eval_config is not None and cfg.train.eval_every > 0:
        curve_path = os.path.join(workdir, "eval_curve.jsonl")
        metrics.keep_records_up_to(curve_path, resume_step)
        proxy_for_curve = reward.load_proxy(proxy_dir, mesh, lay) if proxy_dir else None

        def callback(step, state):
            if step % cfg.train.eval_every and step != cfg.train.steps:
                return
            ev = evaluation.evaluate_against_sft(
                model=model, policy_params=state.params, sft_params=sft_params, tokenizer=tokenizer,
                prompts=task.eval_prompts, config=eval_config, seed=cfg.seed, proxy=proxy_for_curve,
                gold=gold, max_prompt_len=cfg.data.max_prompt_len, batch_size=cfg.train.eval_batch_size,
            )  # fmt: skip
            keys = ("win_rate_vs_sft_gold", "win_rate_vs_sft_proxy", "gold_reward_policy",
                    "proxy_reward_policy", "kl_to_sft", "mean_response_length")  # fmt: skip
            if common.is_main():
                with open(curve_path, "a", encoding="utf-8") as f:
                    f.write(json.dumps({"step": step, **{k: ev.get(k) for k in keys}}) + "\n")

    # Loop.
    state = common.train(
        cfg, workdir, ckpt, state, trainer=trainer, data_iter=data_iter, frozen=frozen, transform=transform,
        name=name, callback=callback,
    )  # fmt: skip

    # Evaluate: the loss and implicit-reward metrics on held-out pairs, reference computed online.
    ev = common.evaluate_objective(
        objective, state.params, reference, eval_data, mesh=mesh, batch_size=cfg.train.eval_batch_size,
        transform=eval_transform,
    )  # fmt: skip
    results = {
        "stage": name,
        "loss_name": cfg.loss.name,
        "steps": cfg.train.steps,
        "nonfinite_steps": int(jax.device_get(state.nonfinite_count)),
        "train_pairs": len(train_data),
        "eval_pairs": len(task.eval_preference),
        **{f"eval_{k}": v for k, v in ev.items()},
        "truncated": dict(stats.truncated),
    }
    if eval_config is not None:
        proxy = reward.load_proxy(proxy_dir, mesh, lay) if proxy_dir else None
        results.update(
            evaluation.evaluate_against_sft(
                model=model, policy_params=state.params, sft_params=sft_params, tokenizer=tokenizer,
                prompts=task.eval_prompts, config=eval_config, seed=cfg.seed, proxy=proxy,
                gold=gold,
                max_prompt_len=cfg.data.max_prompt_len, batch_size=cfg.train.eval_batch_size,
            )
        )  # fmt: skip
    common.write_json(os.path.join(workdir, "results.json"), results)
    metrics.plot_curves(workdir, ("loss", "reward_accuracy", "reward_margin", "kl_to_reference"))
    common.save_params(workdir, state.params, model_cfg, "lm")
    return results
