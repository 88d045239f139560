"""What every training stage (SFT, reward model, preference) does with its frozen config: the model's
shape and first params, the optimizer, state and jitted step (`rlhf_jax.train.trainer`), restoring from
the stage's checkpoints, the loop, and the held-out evaluation of its objective.

    step_fn, state = training.setup(cfg.optim, cfg.train, seed=cfg.seed, mesh=mesh, model=model,
                                    params=params, objective=objective, weight_fn=steps.pair_weight)
    ckpt, state = training.restore(workdir, cfg.checkpoint, state, data_iter)
    state = training.fit(workdir, state, step_fn, loop=cfg.train.loop(cfg.progress), checkpointer=ckpt,
                         mesh=mesh, data_iter=data_iter, name="sft")
"""

from __future__ import annotations

import dataclasses
import functools
import logging
import os
from collections.abc import Callable, Sequence

import jax
import numpy as np

from rlhf_jax import lora as lora_lib
from rlhf_jax import models, sharding
from rlhf_jax.data import pipeline
from rlhf_jax.data.tokenizer import Tokenizer
from rlhf_jax.pipelines import workdir as workdir_io
from rlhf_jax.pipelines.config import CheckpointConfig, DataConfig, TrainConfig
from rlhf_jax.train import metrics, optim, steps, trainer
from rlhf_jax.train.checkpoint import Checkpointer

log = logging.getLogger("rlhf_jax")


# ----------------------------------------------------------------------------------------------------
# Model and params.


def model_config(
    model: models.ModelConfig, data: DataConfig, tokenizer: Tokenizer, *, init_from_hf: str = ""
) -> models.ModelConfig:
    """The stage's architecture with the tokenizer's vocabulary and room for the data's length.

    A pretrained checkpoint (`init_from_hf`) keeps its vocabulary (its embedding may have more rows than
    the tokenizer has ids) and its trained context length.
    """
    if init_from_hf:
        if tokenizer.vocab_size > model.vocab_size:
            raise ValueError(
                f"the tokenizer has {tokenizer.vocab_size} ids but the checkpoint "
                f"{init_from_hf} embeds only {model.vocab_size}"
            )
        if data.max_len > model.max_len:
            raise ValueError(
                f"data.max_len={data.max_len} exceeds the checkpoint's trained context "
                f"({model.max_len} tokens, max_position_embeddings)"
            )
        return dataclasses.replace(model, max_len=data.max_len)
    return dataclasses.replace(
        model, vocab_size=tokenizer.vocab_size, max_len=max(model.max_len, data.max_len)
    )


def init_lm_params(model: models.Transformer, rng, *, init_from: str = "", init_from_hf: str = ""):
    """LM params: from `init_from`'s final params, else a HuggingFace checkpoint, else a fresh init."""
    if not init_from and init_from_hf:
        from rlhf_jax import interop

        return interop.import_params(init_from_hf, model)
    params = models.init_params(model, rng)
    if init_from:
        workdir_io.check_same_architecture(init_from, model.config)
        params = workdir_io.load_params(init_from, params)
    return params


def log_startup(name: str, mesh, model_cfg: models.ModelConfig, batch_size: int, stats=None) -> None:
    """Prints the device mesh, parameter count and global batch size (process 0)."""
    if not workdir_io.is_main():
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


# ----------------------------------------------------------------------------------------------------
# Optimizer, state, step; restore; loop.


def setup(
    optim_config: optim.OptimConfig,
    train: TrainConfig,
    *,
    seed: int,
    mesh,
    model,
    params,
    objective: steps.Objective,
    weight_fn: Callable,
    reference_shardings=None,
    lora: lora_lib.LoRAConfig | None = None,
):
    """The stage's jitted, donating train step and its fresh, sharded train state.

    With `lora`, the state holds only the adapters (`rlhf_jax.lora`, initialised from the seed) and
    their optimizer state; the step's read-only input is then the frozen base `params` (also the
    reference policy: pass `reference_params=params` to `fit`), whatever `reference_shardings` says.

    Returns:
      (step_fn, state): `step_fn(state, batch, reference_params) -> (state, metrics)`.
    """
    tx = optim.make_optimizer(optim_config, train.steps)
    schedule = optim.make_schedule(optim_config, train.steps)
    param_sh = models.param_shardings(model, mesh)
    if lora is not None:
        objective = lora_lib.objective(objective, lora)
        reference_shardings = param_sh
        param_sh = lora_lib.shardings(models.param_logical_axes(model), lora, mesh, model.rules)
        rng = jax.random.fold_in(jax.random.key(seed), 0x10A)
        params = jax.jit(lambda p: lora_lib.init(p, lora, rng), out_shardings=param_sh)(params)
        if workdir_io.is_main():
            n, total = lora_lib.trainable_count(params), models.param_count(model.config)
            what = f"LoRA rank {lora.rank}, alpha {lora.alpha:g} on {','.join(lora.targets)}"
            print(f"{what}: {n:,} trainable parameters ({100 * n / total:.2f}% of {total:,})", flush=True)
    state, state_sh = trainer.init_state(params, tx, seed=seed, mesh=mesh, param_shardings=param_sh)
    step_fn = trainer.make_train_step(
        objective, weight_fn=weight_fn, tx=tx, schedule=schedule, accum_steps=train.grad_accum_steps,
        mesh=mesh, state_shardings=state_sh, reference_shardings=reference_shardings,
    )  # fmt: skip
    return step_fn, state


def restore(workdir: str, checkpoint: CheckpointConfig, state, data_iter):
    """The stage's Checkpointer, and the state (and data position) of its newest checkpoint if any.

    A corrupt newest checkpoint is moved aside for the previous one; an I/O error or a checkpoint of a
    differently shaped state raises `CheckpointError` (see `rlhf_jax.train.checkpoint`).
    """
    ckpt = Checkpointer(
        os.path.join(workdir, "checkpoints"), every_steps=checkpoint.every_steps, keep=checkpoint.keep,
        async_save=checkpoint.async_save,
    )  # fmt: skip
    if ckpt.latest_step() is not None:
        step, state = ckpt.restore(None, state, data_iter)
        if workdir_io.is_main():
            print(f"resuming from the checkpoint at step {step} in {ckpt.directory}", flush=True)
    return ckpt, state


def real_tokens(batch: dict) -> int:
    """Non-padding tokens of a host (numpy) batch, over every *segment_ids key.

    Counted on the host so that the training loop never waits for the device to count them.
    """
    return sum(
        int(np.count_nonzero(np.asarray(v) > 0)) for k, v in batch.items() if k.endswith("segment_ids")
    )


def fit(
    workdir: str,
    state,
    step_fn: Callable,
    *,
    loop: trainer.LoopConfig,
    checkpointer: Checkpointer,
    mesh,
    data_iter,
    reference_params=None,
    transform: Callable[[dict], dict] | None = None,
    hooks: Sequence[trainer.Hook] = (),
    name: str,
):
    """`trainer.fit` from `state` to `loop.steps` with the stage's metrics writer; closes it and the
    checkpointer (pending saves finished) whatever happens.

    Raises `Preempted` on SIGTERM (after a checkpoint) and `NonFiniteError`.
    """
    writer = metrics.MetricsWriter(workdir, resume_step=int(jax.device_get(state.step)))
    # Host batches, transformed lazily (no read-ahead, so the iterator's checkpointed state is always
    # that of the next batch); the loop counts their tokens before it places them on the mesh.
    host_batches = (transform(b) if transform is not None else b for b in data_iter)
    try:
        return trainer.fit(
            state, step_fn, host_batches, config=loop, writer=writer, checkpointer=checkpointer,
            reference_params=reference_params, data_iterator=data_iter,
            place=functools.partial(sharding.shard_batch, mesh=mesh), tokens_in=real_tokens, hooks=hooks,
            description=name,
        )  # fmt: skip
    finally:
        writer.close()
        checkpointer.close()


def policy_params(trained, base, lora: lora_lib.LoRAConfig | None):
    """The trained policy's params for a forward pass: the trained params (`state.params`), or with LoRA
    the frozen base with those adapters attached (nothing merged or copied)."""
    return trained if lora is None else lora_lib.attach(base, trained, lora)


def save_policy(workdir: str, state, base, model_cfg: models.ModelConfig, lora: lora_lib.LoRAConfig | None):
    """Writes the stage's final LM params (last: marks the stage as done). With LoRA, the adapters and
    `lora.json` first (for `python -m rlhf_jax.interop export --peft`), then the merged params, so every
    later stage, evaluation and plain export reads an ordinary parameter tree."""
    if lora is None:
        workdir_io.save_params(workdir, state.params, model_cfg, "lm")
        return
    workdir_io.save_adapters(workdir, state.params, lora)
    workdir_io.save_params(workdir, lora_lib.merge(base, state.params, lora), model_cfg, "lm")


# ----------------------------------------------------------------------------------------------------
# Held-out evaluation.


def evaluate_objective(
    objective: steps.Objective, params, reference_params, data, *, mesh, batch_size: int, transform=None
) -> dict[str, float]:
    """The objective's metric means over one pass of held-out `data` (no gradients)."""
    eval_fn = jax.jit(
        lambda b: steps.eval_sums(params, b, reference_params, objective=objective),
        out_shardings=sharding.replicated(mesh),
    )
    it = iter(pipeline.batches(data, global_batch_size=batch_size, shuffle=False, num_epochs=1,
                               drop_remainder=False))  # fmt: skip
    batches = (sharding.shard_batch(transform(b) if transform is not None else b, mesh) for b in it)
    return trainer.evaluate(eval_fn, batches)
