"""Pieces every training stage uses: data, tokenizer, model, sharded state, jitted steps, final params.

A stage's workdir holds `config.json` (written by the launcher), `tokenizer.model`, `model.json`,
`checkpoints/` (Orbax, resumable), `metrics.jsonl`, `tensorboard/`, `curves.png`, `results.json` and,
once it has finished, `params/` (the final parameters, which `init_from` reads and whose presence marks
the stage as done).
"""

from __future__ import annotations

import dataclasses
import functools
import json
import logging
import os
from collections.abc import Callable, Iterator

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp

from rlhf_jax import models, sharding
from rlhf_jax.data import loading, pipeline, synthetic_tldr
from rlhf_jax.data import records as rec
from rlhf_jax.data.tokenizer import Tokenizer, get_or_train_tokenizer
from rlhf_jax.pipelines.config import DataConfig, StageConfig
from rlhf_jax.train import optim
from rlhf_jax.train import state as state_lib

log = logging.getLogger("rlhf_jax")


def is_main() -> bool:
    return jax.process_index() == 0


def write_json(path: str, obj) -> None:
    """Writes JSON atomically (temp file + rename), from process 0 only."""
    if not is_main():
        return
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    tmp = path + ".tmp"
    with open(tmp, "w", encoding="utf-8") as f:
        json.dump(obj, f, indent=2, sort_keys=True, default=str)
        f.write("\n")
    os.replace(tmp, path)


# ----------------------------------------------------------------------------------------------------
# Data.


@dataclasses.dataclass
class TaskData:
    """The examples of a run. `eval_prompts` are held-out prompts with a reference completion."""

    sft: list[rec.SFTExample]
    preference: list[rec.PreferenceExample]
    eval_preference: list[rec.PreferenceExample]
    eval_prompts: list[rec.SFTExample]
    synthetic: bool
    stats: dict


def _flip(pairs: list[rec.PreferenceExample], rate: float, seed: int) -> list[rec.PreferenceExample]:
    if rate <= 0:
        return pairs
    flip = np.random.default_rng([seed, 7]).random(len(pairs)) < rate
    return [
        dataclasses.replace(p, chosen=p.rejected, rejected=p.chosen) if f else p
        for p, f in zip(pairs, flip, strict=True)
    ]


def load_task(data: DataConfig, seed: int) -> TaskData:
    """Loads the run's examples: the user's files, or the synthetic TL;DR task when none are given.

    With files: SFT examples come from `sft_path`, or else from the prompt and chosen response of the
    preference pairs; evaluation pairs from `eval_path`, or else a seeded `eval_fraction` of the
    preference pairs held out. Label flips (`flip_rate`) hit only the training pairs. With
    `vary_with_seed` the synthetic task is generated from (synthetic_seed, seed), and the pairs of an
    `eval_path` (hence the evaluation prompts, of which evaluation takes the first eval.num_prompts)
    come in a seeded order.

    Raises:
      ValueError: for an HH experiment without a data path (naming the key to set).
    """
    fmt = data.format or None
    if not (data.sft_path or data.preference_path):
        if data.task == "hh":
            raise ValueError(
                "this is an Anthropic HH experiment and needs your data: give "
                "--config.data.path=PATH (the preference file: e.g. hh-rlhf/helpful-base/train.jsonl.gz; a "
                "file, glob or comma-separated list; same as data.preference_path), optionally "
                "--config.data.eval_path=PATH (the test split)"
            )
        task_seed = data.synthetic_seed
        if data.vary_with_seed:  # hashed, so (synthetic_seed, seed) = (0, 1) and (1, 0) differ
            task_seed = int(np.random.SeedSequence([data.synthetic_seed, seed]).generate_state(1)[0])
        splits = synthetic_tldr.generate_splits(
            seed=task_seed,
            num_sft=data.num_sft,
            num_pref=data.num_pref,
            num_eval=data.num_eval,
            flip_rate=data.flip_rate,
        )
        held = max(1, int(len(splits.preference) * data.eval_fraction))
        clean = synthetic_tldr.generate_splits(
            seed=task_seed, num_sft=0, num_pref=data.num_pref, num_eval=0
        ).preference
        # Held-out pairs are ordered by the gold reward (never flipped), so evaluation accuracy is
        # agreement with the gold reward.
        eval_preference = [
            p if p.meta["gold_chosen"] > p.meta["gold_rejected"]
            else dataclasses.replace(p, chosen=p.rejected, rejected=p.chosen)
            for p in clean[:held]
        ]  # fmt: skip
        return TaskData(
            sft=splits.sft,
            preference=splits.preference[held:],
            eval_preference=eval_preference,
            eval_prompts=splits.eval,
            synthetic=True,
            stats={"source": "synthetic_tldr", "sft": len(splits.sft), "preference": len(splits.preference)},
        )
    stats = {}
    preference, eval_preference = [], []
    if data.preference_path:
        preference, s = loading.load_preference(data.preference_path, format=fmt, strict=data.strict)
        stats["preference"] = s.summary()
    if data.eval_path:
        eval_preference, s = loading.load_preference(data.eval_path, format=fmt, strict=data.strict)
        stats["eval"] = s.summary()
        if data.vary_with_seed:
            order = np.random.default_rng([seed, 13]).permutation(len(eval_preference))
            eval_preference = [eval_preference[i] for i in order]
    elif preference:
        order = np.random.default_rng([seed, 3]).permutation(len(preference))
        held = max(1, int(len(preference) * data.eval_fraction))
        eval_preference = [preference[i] for i in order[:held]]
        preference = [preference[i] for i in order[held:]]
    if data.sft_path:
        sft, s = loading.load_sft(data.sft_path, format=fmt, strict=data.strict)
        stats["sft"] = s.summary()
    else:
        sft = [rec.SFTExample(p.prompt, p.chosen) for p in preference]
    eval_prompts = [rec.SFTExample(p.prompt, p.chosen) for p in eval_preference]
    if not sft and not preference:
        raise ValueError("no usable examples in the given data paths; see the skipped counts above")
    return TaskData(
        sft=sft,
        preference=_flip(preference, data.flip_rate, seed),
        eval_preference=eval_preference,
        eval_prompts=eval_prompts,
        synthetic=False,
        stats=stats,
    )


def corpus(task: TaskData) -> list[str]:
    """Training texts for a tokenizer trained from scratch (evaluation texts excluded)."""
    texts = [t for ex in task.sft for t in (ex.prompt, ex.completion)]
    return texts + [t for ex in task.preference for t in (ex.prompt, ex.chosen, ex.rejected)]


def tokenizer_for(
    data: DataConfig, task: TaskData, workdir: str, init_from: str, init_from_hf: str = ""
) -> Tokenizer:
    """The tokenizer: data.tokenizer, else init_from's, else the HF checkpoint's, else trained on the
    task's text; a copy is kept in the workdir."""
    dest = os.path.join(workdir, "tokenizer.model")
    source = data.tokenizer or (
        os.path.join(init_from, "tokenizer.model")
        if init_from and os.path.exists(os.path.join(init_from, "tokenizer.model"))
        else ""
    )
    if not source and init_from_hf:
        from rlhf_jax import interop

        source = interop.tokenizer_path(init_from_hf)
    if source:
        if not os.path.exists(source):
            raise FileNotFoundError(f"data.tokenizer: no such file {source!r}")
        tokenizer = Tokenizer.load(source)
    else:
        tokenizer = get_or_train_tokenizer("", corpus(task), data.vocab_size, workdir)
    if is_main():  # every stage keeps the tokenizer it used, for init_from and for users
        os.makedirs(workdir, exist_ok=True)
        with open(dest + ".tmp", "wb") as f:
            f.write(tokenizer.model_proto)
        os.replace(dest + ".tmp", dest)
    return tokenizer


def layout(data: DataConfig) -> pipeline.SequenceLayout:
    return pipeline.SequenceLayout(max_len=data.max_len, max_prompt_len=data.max_prompt_len)


# ----------------------------------------------------------------------------------------------------
# Model, params and state.


def model_config(cfg: StageConfig, tokenizer: Tokenizer) -> models.ModelConfig:
    """The stage's architecture with the tokenizer's vocabulary and room for the data's length.

    A pretrained checkpoint (`init_from_hf`) keeps its vocabulary (its embedding may have more rows than
    the tokenizer has ids) and its trained context length.
    """
    if cfg.init_from_hf:
        if tokenizer.vocab_size > cfg.model.vocab_size:
            raise ValueError(
                f"the tokenizer has {tokenizer.vocab_size} ids but the checkpoint "
                f"{cfg.init_from_hf} embeds only {cfg.model.vocab_size}"
            )
        if cfg.data.max_len > cfg.model.max_len:
            raise ValueError(
                f"data.max_len={cfg.data.max_len} exceeds the checkpoint's trained context "
                f"({cfg.model.max_len} tokens, max_position_embeddings)"
            )
        return dataclasses.replace(cfg.model, max_len=cfg.data.max_len)
    return dataclasses.replace(
        cfg.model, vocab_size=tokenizer.vocab_size, max_len=max(cfg.model.max_len, cfg.data.max_len)
    )


def params_dir(workdir: str) -> str:
    return os.path.join(os.path.abspath(workdir), "params")


def stage_done(workdir: str) -> bool:
    """Whether a stage finished in `workdir` (its final params are written atomically, last)."""
    return os.path.isdir(params_dir(workdir))


def read_results(workdir: str) -> dict:
    """A finished stage's results.json ({} if absent)."""
    path = os.path.join(workdir, "results.json")
    if not os.path.exists(path):
        return {}
    with open(path, encoding="utf-8") as f:
        return json.load(f)


def save_params(workdir: str, params, model: models.ModelConfig, kind: str) -> None:
    """Writes the final params (Orbax, atomic) and `model.json` describing them."""
    write_json(os.path.join(workdir, "model.json"), {"kind": kind, **dataclasses.asdict(model)})
    with ocp.StandardCheckpointer() as ckptr:
        ckptr.save(params_dir(workdir), params, force=True)


def load_model_json(workdir: str) -> dict:
    path = os.path.join(workdir, "model.json")
    if not os.path.exists(path):
        raise FileNotFoundError(
            f"init_from={workdir!r}: no model.json there (is it a finished stage's workdir?)"
        )
    with open(path, encoding="utf-8") as f:
        return json.load(f)


def load_params(workdir: str, target) -> dict:
    """Restores the final params of the stage in `workdir` onto `target`'s shapes and shardings."""
    path = params_dir(workdir)
    if not os.path.isdir(path):
        raise FileNotFoundError(f"init_from={workdir!r}: no finished params at {path}")
    abstract = jax.tree.map(
        lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=getattr(x, "sharding", None)), target
    )
    with ocp.StandardCheckpointer() as ckptr:
        try:
            return ckptr.restore(path, abstract)
        except Exception as e:
            raise ValueError(
                f"init_from={workdir!r}: params at {path} do not match this model ({e}); "
                "the architecture (model.* config) must equal the earlier stage's"
            ) from e


def check_same_architecture(init_from: str, model: models.ModelConfig) -> None:
    """Raises if the earlier stage's model.json describes a different architecture."""
    saved = load_model_json(init_from)
    mine = dataclasses.asdict(model)
    keys = ("vocab_size", "num_layers", "d_model", "num_heads", "num_kv_heads", "head_dim", "mlp_dim")
    diff = {k: (saved.get(k), mine[k]) for k in keys if saved.get(k) != mine[k]}
    if diff:
        raise ValueError(f"init_from={init_from!r} has a different architecture (saved, this run): {diff}")


def init_lm_params(model, cfg: StageConfig, rng):
    """LM params: from `init_from`'s final params, else a HuggingFace checkpoint, else a fresh init."""
    if not cfg.init_from and cfg.init_from_hf:
        from rlhf_jax import interop

        return interop.import_params(cfg.init_from_hf, model)
    params = models.init_params(model, rng)
    if cfg.init_from:
        check_same_architecture(cfg.init_from, model.config)
        params = load_params(cfg.init_from, params)
    return params


@dataclasses.dataclass
class Trainer:
    """A stage's compiled pieces: mesh, the model, state shardings, the jitted step."""

    mesh: jax.sharding.Mesh
    model: object
    tx: object
    schedule: object
    state_shardings: state_lib.TrainState
    step_fn: Callable


def state_shardings(params, tx, mesh, param_sh) -> state_lib.TrainState:
    """Shardings of a TrainState built from `params` with `tx` (optimizer state mirrors params)."""
    abstract = jax.eval_shape(lambda p: state_lib.create(p, tx, jax.random.key(0)), params)
    rep = sharding.replicated(mesh)
    return state_lib.TrainState(
        step=rep,
        params=param_sh,
        opt_state=sharding.shardings_like(abstract.opt_state, abstract.params, param_sh, mesh),
        rng=rep,
        nonfinite_count=rep,
        first_nonfinite_step=rep,
    )


def build_trainer(
    *, cfg: StageConfig, mesh, model, params, objective, weight_fn, frozen_shardings
) -> tuple[Trainer, state_lib.TrainState]:
    """Creates the optimizer, the sharded train state and the jitted, donating train step."""
    from rlhf_jax.train import steps

    tx = optim.make_optimizer(cfg.optim, cfg.train.steps)
    schedule = optim.make_schedule(cfg.optim, cfg.train.steps)
    param_sh = models.param_shardings(model, mesh)
    st_sh = state_shardings(params, tx, mesh, param_sh)
    state = jax.jit(lambda p, r: state_lib.create(p, tx, r), out_shardings=st_sh)(
        params, jax.random.key(cfg.seed)
    )
    step = functools.partial(
        steps.train_step,
        objective=objective,
        weight_fn=weight_fn,
        tx=tx,
        schedule=schedule,
        accum_steps=cfg.train.grad_accum_steps,
    )
    step_fn = jax.jit(
        step,
        in_shardings=(st_sh, sharding.batch_sharding(mesh), frozen_shardings),
        out_shardings=(st_sh, sharding.replicated(mesh)),
        donate_argnums=0,
    )
    return Trainer(mesh, model, tx, schedule, st_sh, step_fn), state


# ----------------------------------------------------------------------------------------------------
# Batches.


def device_batches(iterator, mesh, transform: Callable[[dict], dict] | None = None) -> Iterator[dict]:
    """Global device batches from a grain iterator of per-process numpy batches (no read-ahead, so the
    iterator's checkpointed state is always that of the next batch)."""
    for local in iterator:
        if transform is not None:
            local = transform(local)
        yield sharding.shard_batch(local, mesh)


def real_tokens(batch: dict) -> int:
    """Non-padding tokens of a host (numpy) batch, over every *segment_ids key.

    Counted on the host so that the training loop never waits for the device to count them.
    """
    return sum(
        int(np.count_nonzero(np.asarray(v) > 0)) for k, v in batch.items() if k.endswith("segment_ids")
    )


def evaluate(eval_fn: Callable, data, *, mesh, batch_size: int, transform=None) -> dict[str, float]:
    """One pass over `data` with a jitted `eval_fn(batch) -> sums`; returns the finalised means."""
    from rlhf_jax.train import steps

    it = iter(pipeline.batches(data, global_batch_size=batch_size, shuffle=False, num_epochs=1,
                               drop_remainder=False))  # fmt: skip
    total = None
    for batch in device_batches(it, mesh, transform):
        sums = eval_fn(batch)
        total = sums if total is None else jax.tree.map(jnp.add, total, sums)
    if total is None:
        return {}
    return {k: float(v) for k, v in jax.device_get(steps.finalize(total)).items()}


def log_startup(name: str, mesh, model_cfg: models.ModelConfig, batch_size: int, stats=None) -> None:
    """Prints the device mesh, parameter count and global batch size (process 0)."""
    if not is_main():
        return
    shape = ", ".join(f"{k}={v}" for k, v in mesh.shape.items())
    n = models.param_count(model_cfg)
    print(
        f"[{name}] mesh ({shape}) over {jax.device_count()} {jax.devices()[0].platform} devices, "
        f"{jax.process_count()} process(es); model {n:,} parameters "
        f"(L={model_cfg.num_layers}, D={model_cfg.d_model}, V={model_cfg.vocab_size}); "
        f"global batch {batch_size}",
        flush=True,
    )
    if stats:
        log.info("[%s] data: %s", name, stats)


def restore(cfg: StageConfig, workdir: str, state, data_iter):
    """The stage's Checkpointer, and the state (and data position) of its newest checkpoint if any.

    A corrupt newest checkpoint is moved aside for the previous one; an I/O error or a checkpoint of a
    differently shaped state raises `CheckpointError` (see `rlhf_jax.train.checkpoint`).
    """
    from rlhf_jax.train.checkpoint import Checkpointer

    ckpt = Checkpointer(
        os.path.join(workdir, "checkpoints"), every_steps=cfg.checkpoint.every_steps,
        keep=cfg.checkpoint.keep, async_save=cfg.checkpoint.async_save,
    )  # fmt: skip
    if ckpt.latest_step() is not None:
        step, state = ckpt.restore(None, state, data_iter)
        if is_main():
            print(f"resuming from the checkpoint at step {step} in {ckpt.directory}", flush=True)
    return ckpt, state


def train(cfg: StageConfig, workdir: str, ckpt, state, *, trainer: Trainer, data_iter, frozen=None,
          transform=None, name: str, callback=None):  # fmt: skip
    """Runs the stage's loop from `state` to `cfg.train.steps` with metrics and checkpoints; closes both.

    Raises `loop.Preempted` on SIGTERM (after a checkpoint) and `loop.NonFiniteError`; the metrics
    writer and the checkpointer are closed (pending saves finished) either way.
    """
    from rlhf_jax.train import loop, metrics

    writer = metrics.MetricsWriter(workdir, resume_step=int(jax.device_get(state.step)))
    # Host batches, transformed lazily (no read-ahead, so the iterator's checkpointed state is always
    # that of the next batch); the loop counts their tokens before it places them on the mesh.
    host_batches = (transform(b) if transform is not None else b for b in data_iter)
    try:
        state = loop.run(
            state=state, step_fn=trainer.step_fn, frozen=frozen, batches=host_batches,
            config=cfg.train.loop(cfg.progress), checkpointer=ckpt, writer=writer, data_iterator=data_iter,
            place=functools.partial(sharding.shard_batch, mesh=trainer.mesh), tokens_in=real_tokens,
            description=name, callback=callback,
        )  # fmt: skip
    finally:
        writer.close()
        ckpt.close()
    return state


def evaluate_objective(objective, params, frozen, data, *, mesh, batch_size: int, transform=None) -> dict:
    """The objective's metric means over one pass of held-out `data` (no gradients)."""
    from rlhf_jax.train import steps

    eval_fn = jax.jit(
        lambda b: steps.eval_sums(params, b, frozen, objective=objective),
        out_shardings=sharding.replicated(mesh),
    )
    return evaluate(eval_fn, data, mesh=mesh, batch_size=batch_size, transform=transform)
