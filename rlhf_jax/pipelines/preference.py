"""Offline preference training: any pairwise loss from `rlhf_jax.losses` against a frozen reference,
then evaluation. A stage, and the `preference` pipeline ([SFT →] policy).

    results = preference.run(stage_config, workdir)

The policy and the reference both start from `init_from` (an SFT stage) unless `reference_from` names
another. Reference log-probs are either computed in every step without gradient
(`train.reference="online"`) or once over the dataset, stored in `WORKDIR/reference_logps.npz` and
looked up by example id (`"precomputed"`); both give the same loss. Two hooks serve the algorithms built
on this stage: `extra_inputs` adds per-batch inputs a loss needs beyond the pairs (INPO's
previous-iterate log-probs, `rlhf_jax.pipelines.inpo`), and `train.eval_every` runs the sample-based
evaluation periodically (`eval_curve.jsonl`, e.g. RPO's over-optimisation curves).
"""

from __future__ import annotations

import dataclasses
import functools
import json
import os
import time
from collections.abc import Callable

import jax
import numpy as np

from rlhf_jax import losses, models, scoring, sharding
from rlhf_jax.data import pipeline, synthetic_tldr
from rlhf_jax.data import records as rec
from rlhf_jax.pipelines import evaluation, fingerprints, reward, sft, tasks, training
from rlhf_jax.pipelines import workdir as workdir_io
from rlhf_jax.pipelines.config import StageConfig, section_config, stage_config
from rlhf_jax.train import metrics, steps

# The loss inputs every batch provides (the rest come from `ExtraInputs`).
BATCH_INPUTS = ("policy_chosen_logps", "policy_rejected_logps", "reference_chosen_logps",
                "reference_rejected_logps", "chosen_lengths", "rejected_lengths")  # fmt: skip


def loss_inputs(name: str) -> tuple[str, ...]:
    """The array inputs the step passes to loss `name`: its required ones.

    Optional inputs are not passed: `ipo` then regresses the summed log-ratio margin as in the paper
    (Azar et al. 2023), not TRL's per-token variant (call `losses.ipo` with lengths for that).
    """
    return losses.required_inputs(name)


def compute_pair_logps(model, params, data, *, mesh, batch_size: int) -> tuple[np.ndarray, np.ndarray]:
    """Summed log-probs of every pair's chosen and rejected response under `params`: two [X] arrays."""
    fn = jax.jit(lambda p, b: steps.pair_logps(model, p, b), out_shardings=sharding.replicated(mesh))
    chosen_X, rejected_X = scoring.map_chunks(
        lambda chunk: fn(params, chunk), lambda ids: data.batch(ids, data.max_len), num_rows=len(data),
        batch_size=batch_size, mesh=mesh,
    )  # fmt: skip
    return np.asarray(chosen_X, np.float32), np.asarray(rejected_X, np.float32)


def with_logps(prefix: str, chosen_X: np.ndarray, rejected_X: np.ndarray):
    """A batch transform adding precomputed `{prefix}_chosen_logps` / `{prefix}_rejected_logps` looked up
    by example id (0 on padding rows)."""

    def transform(batch: dict) -> dict:
        ids = batch["example_ids"]
        safe = np.maximum(ids, 0)
        return {
            **batch,
            f"{prefix}_chosen_logps": np.where(ids >= 0, chosen_X[safe], 0.0).astype(np.float32),
            f"{prefix}_rejected_logps": np.where(ids >= 0, rejected_X[safe], 0.0).astype(np.float32),
        }

    return transform


def precomputed_logps(path: str, model, params, data, *, mesh, batch_size: int):
    """`compute_pair_logps`, cached in `path` (npz, written atomically) so a resumed run reuses it."""
    if os.path.exists(path):
        saved = np.load(path)
        return saved["chosen"], saved["rejected"]
    chosen, rejected = compute_pair_logps(model, params, data, mesh=mesh, batch_size=batch_size)
    workdir_io.write_npz(path, dict(chosen=chosen, rejected=rejected))
    return chosen, rejected


def _compose(transforms):
    transforms = [t for t in transforms if t is not None]

    def transform(batch):
        for t in transforms:
            batch = t(batch)
        return batch

    return transform if transforms else None


@dataclasses.dataclass(frozen=True)
class ExtraInputs:
    """Per-batch loss inputs beyond the pairs and the reference (e.g. INPO's `previous_*_logps`).

    Attributes:
      provides: the loss inputs they add (names of `losses` arguments).
      spec: what they depend on, for the stage's fingerprint (e.g. `fingerprints.stage_input(dir)`).
      make: called once before training as `make(model=, like=, mesh=, train_data=, eval_data=,
        workdir=, batch_size=)` (`like`: params of the policy's shapes and shardings); returns the
        (training, evaluation) batch transforms that add the inputs to host batches.
    """

    provides: tuple[str, ...]
    spec: object
    make: Callable[..., tuple[Callable[[dict], dict], Callable[[dict], dict]]]


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
    sft_from: str = "",
    extra_inputs: ExtraInputs | None = None,
) -> dict:
    """What a preference stage's output depends on (its fingerprint's input); arguments as `run`'s."""
    return {
        **fingerprints.trainer_spec(cfg, kind="policy", loss=True),
        "train_pairs": pairs_digest(train_data) if train_data is not None else "task",
        "eval": eval_config,
        "proxy": fingerprints.stage_input(proxy_dir),
        "reference": fingerprints.stage_input(reference_from or cfg.init_from),
        # Named after the one user of extra inputs (INPO's previous iterate), so fingerprints are stable.
        "previous": extra_inputs.spec if extra_inputs is not None else "",
        "sft": fingerprints.stage_input(sft_from or cfg.init_from) if eval_config is not None else "",
    }


# Pair metrics of each curve point, beside the sample-based `evaluation.CURVE_KEYS`: the implicit-reward
# accuracy and margin on the held-out pairs (on the synthetic task ordered by the gold reward, never
# flipped), and on the synthetic task with `data.flip_rate` > 0 the accuracy *as labelled* on training
# pairs whose label was flipped and on those that were not (up to FIT_PAIRS each): a loss that fits the
# flipped labels drives `train_flipped_fit` up over the epochs (Chowdhury et al. 2024's argument).
PAIR_CURVE_KEYS = ("eval_reward_accuracy", "eval_reward_margin", "train_flipped_fit", "train_unflipped_fit")
FIT_PAIRS = 256


def _periodic_evaluation(path: str, *, every: int, last: int, resume_step: int, evaluate: Callable):
    """A `trainer.fit` hook appending `evaluate(params)`'s curve metrics (`evaluation.CURVE_KEYS` and
    `PAIR_CURVE_KEYS`, those it returns) to `path` (JSONL) every `every` steps and at step `last`;
    records past `resume_step` (from an interrupted run) are dropped first."""
    metrics.keep_records_up_to(path, resume_step)

    def hook(step, state):
        if step % every and step != last:
            return
        ev = evaluate(state.params)
        point = {"step": step, **{k: ev.get(k) for k in evaluation.CURVE_KEYS}}
        point.update({k: ev[k] for k in PAIR_CURVE_KEYS if k in ev})
        if workdir_io.is_main():
            with open(path, "a", encoding="utf-8") as f:
                f.write(json.dumps(point) + "\n")

    return hook


def label_fit_sets(
    examples: list, data: pipeline.TokenizedPreference, seed: int, limit: int = FIT_PAIRS
) -> dict[str, pipeline.TokenizedPreference]:
    """{"flipped": pairs, "unflipped": pairs}: up to `limit` tokenised training pairs whose label was
    flipped (`meta["flipped"]`, the synthetic task's record of it) and as many that were not, a seeded
    draw; empty when no example records flips. `data` is `examples` tokenised, index for index."""
    flags = [ex.meta.get("flipped") if ex.meta else None for ex in examples]
    if len(flags) != len(data) or not any(flags):
        return {}
    rng = np.random.default_rng([seed, 11])
    out = {}
    for name, want in (("flipped", True), ("unflipped", False)):
        idx = [i for i, f in enumerate(flags) if f is want]
        idx = sorted(rng.permutation(idx)[:limit].tolist()) if len(idx) > limit else idx
        if idx:
            out[name] = pipeline.TokenizedPreference(
                [data.prompt_ids[i] for i in idx], [data.chosen_ids[i] for i in idx],
                [data.rejected_ids[i] for i in idx], data.weights[idx], data.pad_id, data.max_len,
            )  # fmt: skip
    return out


def run(
    cfg: StageConfig,
    workdir: str,
    *,
    name: str = "preference",
    train_data: pipeline.TokenizedPreference | None = None,
    eval_config: evaluation.EvalConfig | None = None,
    proxy_dir: str = "",
    reference_from: str = "",
    sft_from: str = "",
    extra_inputs: ExtraInputs | None = None,
) -> dict:
    """Trains (or resumes) the policy with `cfg.loss` in `workdir`; returns held-out metrics.

    Args:
      cfg: the stage's config; `cfg.init_from` is the SFT stage (policy and reference start there).
      workdir: the stage's directory.
      name: label for logs.
      train_data: tokenised training pairs (e.g. RSO's sampled pairs); default the task's pairs.
      eval_config: if given, also sample from the policy and the SFT policy on held-out prompts and
        report win rates (`rlhf_jax.pipelines.evaluation`), and every `cfg.train.eval_every` steps.
      proxy_dir: a reward-model stage's workdir, the proxy judge of that evaluation.
      reference_from: the workdir whose final params are the frozen reference (default `cfg.init_from`;
        iterative methods start the policy from the previous iterate but keep the SFT reference).
      sft_from: the SFT stage the sample-based evaluation compares against (`*_vs_sft`, `kl_to_sft`);
        default `cfg.init_from`. Always the SFT policy, whatever the training reference is: iterative
        DPO trains against π_t but is still evaluated against π_sft.
      extra_inputs: per-batch inputs the loss needs beyond the pairs (`ExtraInputs`).
    """
    if not cfg.init_from:
        raise ValueError("preference training needs init_from: the workdir of a finished SFT stage")
    provided = (*BATCH_INPUTS, *(extra_inputs.provides if extra_inputs is not None else ()))
    missing = [k for k in loss_inputs(cfg.loss.name) if k not in provided]
    if missing:
        raise ValueError(
            f"loss {cfg.loss.name!r} needs {missing}, which offline pairs do not carry "
            "(INPO's previous_*_logps: run it through the inpo pipeline)"
        )
    os.makedirs(workdir, exist_ok=True)
    stage_spec = spec(
        cfg, train_data=train_data, eval_config=eval_config, proxy_dir=proxy_dir,
        reference_from=reference_from, sft_from=sft_from, extra_inputs=extra_inputs,
    )  # fmt: skip
    fingerprints.claim(workdir, stage_spec, name)
    if workdir_io.stage_done(workdir):
        return workdir_io.read_results(workdir)

    # Mesh.
    mesh = sharding.make_mesh(cfg.mesh)

    # Data.
    task = tasks.load_task(cfg.data, cfg.seed, init_from=cfg.init_from, init_from_hf=cfg.init_from_hf)
    tokenizer = tasks.tokenizer_for(cfg.data, task, workdir, cfg.init_from, cfg.init_from_hf)
    stats = rec.LoadStats()
    lay = tasks.layout(cfg.data)
    task_pairs = train_data is None
    if task_pairs:
        train_data = pipeline.tokenize_preference(task.preference, tokenizer, lay, stats)
    eval_data = pipeline.tokenize_preference(task.eval_preference, tokenizer, lay)
    data_iter = iter(pipeline.batches(train_data, global_batch_size=cfg.train.batch_size, seed=cfg.seed))

    # Model, reference and optimizer.
    model_cfg = training.model_config(cfg.model, cfg.data, tokenizer, init_from_hf=cfg.init_from_hf)
    model = models.Transformer(model_cfg, mesh=mesh)
    policy = training.init_lm_params(
        model, jax.random.key(cfg.seed), init_from=cfg.init_from, init_from_hf=cfg.init_from_hf
    )
    lora = cfg.train.lora()  # LoRA: the state holds the adapters; `policy` is the frozen base
    if reference_from and os.path.abspath(reference_from) != os.path.abspath(cfg.init_from):
        if lora is not None:
            raise ValueError(
                f"train.lora_rank={lora.rank}: with LoRA the reference policy is the frozen base "
                f"(init_from={cfg.init_from!r}), but this stage's reference is {reference_from!r}"
            )
        reference = workdir_io.load_params(reference_from, policy)
    elif lora is not None:
        reference = policy  # the adapters disabled: no second copy of the weights
    else:
        reference = jax.tree.map(lambda x: x.copy(), policy)
    objective = functools.partial(
        steps.preference_objective, model=model, loss_fn=cfg.loss.make(),
        loss_inputs=loss_inputs(cfg.loss.name), metric_beta=cfg.loss.metric_beta(),
    )  # fmt: skip
    precomputed = cfg.train.reference == "precomputed"
    step_fn, state = training.setup(
        cfg.optim, cfg.train, seed=cfg.seed, mesh=mesh, model=model, params=policy, objective=objective,
        weight_fn=steps.pair_weight, lora=lora,
        reference_shardings=None if precomputed else models.param_shardings(model, mesh),
    )  # fmt: skip
    training.log_startup(f"{name} ({cfg.loss.name})", mesh, model_cfg, cfg.train.batch_size, task.stats)

    # Per-batch inputs: precomputed reference log-probs, the extra inputs.
    kw = dict(mesh=mesh, batch_size=cfg.train.eval_batch_size)
    reference_tf, step_reference = None, reference
    if precomputed:
        path = os.path.join(workdir, "reference_logps.npz")
        reference_tf = with_logps("reference", *precomputed_logps(path, model, reference, train_data, **kw))
        step_reference = None if lora is None else policy  # LoRA: the frozen base is still an input
    extra_tf = eval_transform = None
    if extra_inputs is not None:
        extra_tf, eval_transform = extra_inputs.make(
            model=model, like=policy, train_data=train_data, eval_data=eval_data, workdir=workdir, **kw
        )
    transform = _compose([reference_tf, extra_tf])

    # The evaluation baseline: the SFT policy, not the training reference (which may be π_t).
    same = lambda a, b: os.path.abspath(a) == os.path.abspath(b)
    sft_from = sft_from or cfg.init_from
    sft_params = None
    if eval_config is not None:
        use_reference = same(sft_from, reference_from or cfg.init_from)
        sft_params = reference if use_reference else workdir_io.load_params(sft_from, policy)
    gold = synthetic_tldr.gold_reward if task.synthetic else None

    def evaluate_samples(params, proxy):
        return evaluation.evaluate_against_sft(
            model=model, policy_params=params, sft_params=sft_params, tokenizer=tokenizer,
            prompts=task.eval_prompts, config=eval_config, seed=cfg.seed, proxy=proxy, gold=gold,
            max_prompt_len=cfg.data.max_prompt_len, batch_size=cfg.train.eval_batch_size,
        )  # fmt: skip

    # Restore.
    ckpt, state = training.restore(workdir, cfg.checkpoint, state, data_iter)

    # Pair metrics along the curve: held-out pairs, and the training pairs by flipped label.
    fit_sets = (
        label_fit_sets(task.preference, train_data, cfg.seed) if task_pairs and extra_tf is None else {}
    )

    def pair_metrics(params) -> dict[str, float]:
        def accuracy(data, transform=None):
            return training.evaluate_objective(
                objective, params, reference, data, mesh=mesh, batch_size=cfg.train.eval_batch_size,
                transform=transform,
            )  # fmt: skip

        ev = accuracy(eval_data, eval_transform)
        out = {"eval_reward_accuracy": ev["reward_accuracy"], "eval_reward_margin": ev["reward_margin"]}
        out.update({f"train_{k}_fit": accuracy(d)["reward_accuracy"] for k, d in fit_sets.items()})
        return out

    # Periodic sample-based evaluation (e.g. for over-optimisation curves).
    hooks = []
    if eval_config is not None and cfg.train.eval_every > 0:
        proxy = reward.load_proxy(proxy_dir, mesh, lay) if proxy_dir else None

        def curve_metrics(state_params):
            params = training.policy_params(state_params, policy, lora)
            return {**evaluate_samples(params, proxy), **pair_metrics(params)}

        hooks.append(
            _periodic_evaluation(
                os.path.join(workdir, "eval_curve.jsonl"), every=cfg.train.eval_every, last=cfg.train.steps,
                resume_step=int(jax.device_get(state.step)), evaluate=curve_metrics,
            )
        )  # fmt: skip

    # Loop.
    state = training.fit(
        workdir, state, step_fn, loop=cfg.train.loop(cfg.progress), checkpointer=ckpt, mesh=mesh,
        data_iter=data_iter, reference_params=step_reference, transform=transform, hooks=hooks, name=name,
    )  # fmt: skip

    # Evaluate: the loss and implicit-reward metrics on held-out pairs, reference computed online.
    ev = training.evaluate_objective(
        objective, training.policy_params(state.params, policy, lora), reference, eval_data, mesh=mesh,
        batch_size=cfg.train.eval_batch_size, transform=eval_transform,
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
    if fit_sets:  # the final policy's fit of flipped and unflipped training labels (PAIR_CURVE_KEYS)
        final = pair_metrics(training.policy_params(state.params, policy, lora))
        results.update({k: final[k] for k in ("train_flipped_fit", "train_unflipped_fit") if k in final})
        results["train_fit_pairs"] = {k: len(d) for k, d in fit_sets.items()}
    if eval_config is not None:
        proxy = reward.load_proxy(proxy_dir, mesh, lay) if proxy_dir else None
        results.update(evaluate_samples(training.policy_params(state.params, policy, lora), proxy))
    workdir_io.write_json(os.path.join(workdir, "results.json"), results)
    metrics.plot_curves(workdir, ("loss", "reward_accuracy", "reward_margin", "kl_to_reference"))
    training.save_policy(workdir, state, policy, model_cfg, lora)  # last: marks the stage as done
    return results


# ----------------------------------------------------------------------------------------------------
# The `preference` pipeline: [SFT →] policy, evaluated against the SFT policy.


@dataclasses.dataclass(frozen=True)
class Plan:
    """The `preference` pipeline's stages: the SFT stage it starts from (when `init_from` is empty), the
    policy (`main`) and its sample-based evaluation (None: held-out pair metrics only)."""

    main: StageConfig
    sft: StageConfig | None
    eval: evaluation.EvalConfig | None


def plan(config) -> Plan:
    """Validates an experiment's ConfigDict into the `preference` pipeline's stage configs."""
    return Plan(
        main=stage_config(config, "train"),
        sft=stage_config(config, "sft") if "sft" in config else None,
        eval=section_config(evaluation.EvalConfig, config, "eval") if "eval" in config else None,
    )


def run_pipeline(plan: Plan, workdir: str, *, reuse_from: tuple[str, ...] = ()) -> dict:
    """Runs [SFT →] the policy, each in WORKDIR/{stage}/{fingerprint}/; writes results.json (with
    `wall_time_s`, this invocation's: a reused or finished stage counts ~0)."""
    start = time.perf_counter()
    locate = functools.partial(fingerprints.locate, workdir, reuse_from=reuse_from)
    ran, main = [], plan.main
    if not main.init_from:
        if plan.sft is None:
            raise ValueError("preference training without init_from trains an SFT stage first: give a `sft` "
                             "section")  # fmt: skip
        ran.append(sft.run_stage(plan.sft, locate))
        main = dataclasses.replace(main, init_from=ran[-1].dir)
    ran.append(locate("policy", spec(main, eval_config=plan.eval), done=workdir_io.stage_done))
    results = run(main, ran[-1].dir, eval_config=plan.eval)
    results = {**results, "wall_time_s": time.perf_counter() - start}
    return fingerprints.finish(workdir, results, ran, final="policy")
