"""The jitted steps of an experiment, built from abstract shapes for a device mesh (nothing allocated).

Each `PlannedStep` holds the library's own jitted function and `jax.ShapeDtypeStruct` arguments carrying
their `NamedSharding`s, so `step.fn.lower(*step.args).compile()` compiles exactly what a run would for
the mesh's devices (a TPU topology's devices from a CPU host in `bench.tpu_plan`):

- `preference`: the preference train step (`steps.preference_objective` through
  `trainer.make_train_step`): policy forward + backward and, with `train.reference="online"`, the frozen
  reference's forward; `train.batch_size` pairs of `data.max_len` tokens.
- `reward`: the reward-model train step (`steps.reward_objective`, a `RewardModel`), same pairs.
- `prefill` and `decode`: the sampler (`rlhf_jax.sampling`): prompts of `data.max_prompt_len` tokens
  prefilled into a cache of prompt + `max_new_tokens` slots, and one decode step (`models.decode_step`
  then `sampling.choose`) over all prompt x sample rows; the model unrolled as `sampling` runs it.
  Prompts and samples per prompt come from the `grpo` section when there is one, else from `eval`.
- `grpo`: the online-RL update (`steps.policy_gradient_objective`) on `train.batch_size` rows of
  prompt + completion tokens.

FLOPs are analytic (`model_flops`), with N the matmul parameters (everything but the input embedding),
L layers, A = heads x head dim, and attention over the full T x S square (the MFU convention, which
ignores causal masking): a forward is 2 N + 4 L A S FLOPs per token attending over S positions, a
backward twice that.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from collections.abc import Callable

import jax
import jax.numpy as jnp

from rlhf_jax import lora as lora_lib
from rlhf_jax import models, sampling, sharding
from rlhf_jax.pipelines import config as config_lib
from rlhf_jax.pipelines import grpo as grpo_lib
from rlhf_jax.pipelines import preference as preference_lib
from rlhf_jax.train import optim, steps, trainer

STEPS = ("preference", "reward", "prefill", "decode", "grpo")


@dataclasses.dataclass(frozen=True)
class PlannedStep:
    """A jitted step, its abstract arguments, and its analytic FLOPs (whole step, all chips)."""

    name: str
    fn: Callable
    args: tuple
    flops: float
    flops_note: str
    shape: str
    param_bytes: int = 0  # trainable params + optimizer state, unsharded (train steps; 0 otherwise)


def _abstract(tree, shardings):
    return jax.tree.map(lambda s, sh: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=sh), tree, shardings)


def _rows(n: int, mesh) -> int:
    """n rounded up to a multiple of the batch shards (as `scoring.map_chunks` pads)."""
    shards = math.prod(mesh.shape[a] for a in ("data", "fsdp"))
    return -(-n // shards) * shards


def matmul_params(c: models.ModelConfig) -> int:
    """N: parameters other than the input embedding (the LM head counts; it is a matmul)."""
    return models.param_count(c) - c.vocab_size * c.d_model


def model_flops(c: models.ModelConfig, tokens: int, attended: int, *, passes: float) -> float:
    """`passes` x (2 N + 4 L A S) per token, S = `attended` positions (1 pass = forward, 3 = fwd + bwd)."""
    a = c.num_heads * c.head_dim
    return passes * tokens * (2 * matmul_params(c) + 4 * c.num_layers * a * attended)


def _batch(mesh, shapes: dict) -> dict:
    sh = sharding.batch_sharding(mesh)
    return {k: jax.ShapeDtypeStruct(s, d, sharding=sh) for k, (s, d) in shapes.items()}


def _pair_batch(mesh, pairs: int, t: int) -> dict:
    shapes = {}
    for side in ("chosen", "rejected"):
        for key in ("tokens", "targets", "segment_ids"):
            shapes[f"{side}_{key}"] = ((pairs, t), jnp.int32)
        shapes[f"{side}_loss_mask"] = ((pairs, t), jnp.float32)
        shapes[f"{side}_lengths"] = ((pairs,), jnp.int32)
    shapes["prompt_lengths"] = ((pairs,), jnp.int32)
    shapes["weights"] = ((pairs,), jnp.float32)
    return _batch(mesh, shapes)


def _train_step(stage, mesh, model, objective, weight_fn, batch, *, reference: bool, lora=None):
    """The trainer's jitted step over abstract state and reference params; (step args, state bytes)."""
    tx = optim.make_optimizer(stage.optim, total_steps=max(stage.train.steps, 1))
    shapes, param_sh = models.param_shapes(model), models.param_shardings(model, mesh)
    trainable, trainable_sh = shapes, param_sh
    if lora is not None:
        trainable = lora_lib.adapter_shapes(shapes, lora)
        trainable_sh = lora_lib.shardings(models.param_logical_axes(model), lora, mesh, model.rules)
        objective = lora_lib.objective(objective, lora)
        reference = True  # the frozen base is an argument of every step
    state_sh = trainer.state_shardings(trainable, tx, mesh, trainable_sh)
    state = jax.eval_shape(lambda p: trainer.state_lib.create(p, tx, jax.random.key(0)), trainable)
    fn = trainer.make_train_step(
        objective,
        weight_fn=weight_fn,
        tx=tx,
        accum_steps=stage.train.grad_accum_steps,
        mesh=mesh,
        state_shardings=state_sh,
        reference_shardings=param_sh if reference else None,
    )
    ref = _abstract(shapes, param_sh) if reference else None
    nbytes = sum(x.size * x.dtype.itemsize for x in jax.tree.leaves((state.params, state.opt_state)))
    return fn, (_abstract(state, state_sh), batch, ref), nbytes


def preference_step(config, mesh) -> PlannedStep:
    stage = config_lib.stage_config(config, "train")
    c, pairs, t = stage.model, stage.train.batch_size, stage.data.max_len
    model = models.Transformer(c, mesh=mesh)
    loss = stage.loss
    objective = functools.partial(
        steps.preference_objective,
        model=model,
        loss_fn=loss.make(),
        loss_inputs=preference_lib.loss_inputs(loss.name),
        metric_beta=loss.metric_beta(),
    )
    batch = _pair_batch(mesh, pairs, t)
    online = stage.train.reference == "online"
    if not online:
        sh = sharding.batch_sharding(mesh)
        for key in ("reference_chosen_logps", "reference_rejected_logps"):
            batch[key] = jax.ShapeDtypeStruct((pairs,), jnp.float32, sharding=sh)
    fn, args, nbytes = _train_step(
        stage, mesh, model, objective, steps.pair_weight, batch, reference=online, lora=stage.train.lora()
    )
    tokens = 2 * pairs * t
    flops = model_flops(c, tokens, t, passes=3) + (model_flops(c, tokens, t, passes=1) if online else 0)
    note = "policy fwd+bwd 3(2N+4LAT) per token" + (" + reference fwd (2N+4LAT)" if online else "")
    return PlannedStep("preference", fn, args, flops, note, f"{pairs} pairs x {t}", nbytes)


def reward_step(config, mesh) -> PlannedStep:
    stage = config_lib.stage_config(config, "rm" if "rm" in config else "train")
    c, pairs, t = stage.model, stage.train.batch_size, stage.data.max_len
    model = models.RewardModel(c, mesh=mesh)
    objective = functools.partial(steps.reward_objective, model=model)
    fn, args, nbytes = _train_step(
        stage, mesh, model, objective, steps.pair_weight, _pair_batch(mesh, pairs, t), reference=False
    )
    # No LM head: the trunk's matmuls only (the scalar head is negligible).
    flops = model_flops(c, 2 * pairs * t, t, passes=3) - 3 * 2 * c.d_model * c.vocab_size * 2 * pairs * t
    if c.tie_embeddings:
        flops += 3 * 2 * c.d_model * c.vocab_size * 2 * pairs * t  # tied: the head was not in N
    return PlannedStep(
        "reward", fn, args, flops, "fwd+bwd 3(2N+4LAT), no LM head", f"{pairs} pairs x {t}", nbytes
    )


def _sampler_shape(config) -> tuple[int, int, int]:
    """(prompts, samples per prompt, max new tokens) of the experiment's sampler."""
    if "grpo" in config:
        g = grpo_lib.GRPOConfig(
            **{k: v for k, v in dict(config.grpo).items() if k != "eval_reward"},
            rewards=(("gsm8k", 1.0, ()),),
        )
        return g.num_prompts, g.group_size, g.max_new_tokens
    e = config.eval
    return int(e.num_prompts), int(e.samples_per_prompt), int(e.max_new_tokens)


def _sampler_model(config, mesh):
    stage = config_lib.stage_config(config, "train")
    model = models.Transformer(dataclasses.replace(stage.model, scan_layers=False), mesh=mesh)
    params = _abstract(models.param_shapes(model), models.param_shardings(model, mesh))
    return stage, model, params


def prefill_step(config, mesh) -> PlannedStep:
    stage, model, params = _sampler_model(config, mesh)
    c = model.config
    p, _, new = _sampler_shape(config)
    p, t = _rows(p, mesh), stage.data.max_prompt_len
    slots = t + new
    cache_sh = models.cache_shardings(mesh, model.rules, c)

    def prefill(params, tokens_PT, lengths_P):
        cache = models.init_cache(c, p, slots)
        return models.prefill(model, params, tokens_PT, lengths_P, cache)

    fn = jax.jit(prefill, out_shardings=(sharding.batch_sharding(mesh), cache_sh))
    batch = _batch(mesh, {"tokens": ((p, t), jnp.int32), "lengths": ((p,), jnp.int32)})
    head = 2 * c.d_model * c.vocab_size
    flops = model_flops(c, p * t, slots, passes=1) - head * p * (t - 1)  # the head on the last token only
    return PlannedStep(
        "prefill",
        fn,
        (params, batch["tokens"], batch["lengths"]),
        flops,
        "fwd (2N+4LAS) per prompt token, S cache slots; LM head on the last token",
        f"{p} prompts x {t}, {slots} slots",
    )


def decode_step(config, mesh) -> PlannedStep:
    stage, model, params = _sampler_model(config, mesh)
    c = model.config
    p, n, new = _sampler_shape(config)
    b, slots = _rows(p * n, mesh), stage.data.max_prompt_len + new
    policy = sampling.SamplingConfig(max_new_tokens=new, temperature=1.0)
    batch_sh, rep = sharding.batch_sharding(mesh), sharding.replicated(mesh)
    cache = jax.eval_shape(lambda: models.init_cache(c, b, slots))
    state = jax.eval_shape(
        lambda cache: sampling.init_state(jax.random.split(jax.random.key(0), b), cache, new, 0), cache
    )
    state_sh = sampling.SamplerState(
        rep,
        batch_sh,
        batch_sh,
        batch_sh,
        batch_sh,
        batch_sh,
        batch_sh,
        batch_sh,
        models.cache_shardings(mesh, model.rules, c),
    )

    def one_token(params, s):  # `sampling.decode`'s loop body
        last_B = jax.lax.dynamic_index_in_dim(s.tokens_BT, jnp.maximum(s.step - 1, 0), axis=1, keepdims=False)
        logits_BV, cache = models.decode_step(model, params, last_B, s.cache)
        return sampling.choose(s._replace(cache=cache), logits_BV, config=policy, eos_id=1, pad_id=0)

    fn = jax.jit(one_token, out_shardings=state_sh, donate_argnums=1)
    flops = model_flops(c, b, slots, passes=1)
    return PlannedStep(
        "decode",
        fn,
        (params, _abstract(state, state_sh)),
        flops,
        "fwd (2N+4LAS) per row, S cache slots (one token)",
        f"{b} rows, {slots} slots",
    )


def grpo_step(config, mesh) -> PlannedStep:
    stage = config_lib.stage_config(config, "train")
    c = stage.model
    _, _, new = _sampler_shape(config)
    g = config.get("grpo", {})
    rows, t = stage.train.batch_size, stage.data.max_prompt_len + new
    model = models.Transformer(c, mesh=mesh)
    objective = functools.partial(
        steps.policy_gradient_objective,
        model=model,
        temperature=float(g.get("temperature", 1.0)),
        aggregation=str(g.get("aggregation", "dapo")),
        loss_kwargs=(("epsilon_low", 0.2),),
        max_length=new,
    )
    shapes = {k: ((rows, t), jnp.int32) for k in ("tokens", "targets", "segment_ids")}
    shapes.update(loss_mask=((rows, t), jnp.float32), old_logps=((rows, t), jnp.float32))
    shapes.update({k: ((rows,), jnp.float32) for k in ("advantages", "token_normalizer", "row_fraction")})
    if float(g.get("beta", 0.0)) > 0:
        shapes["reference_logps"] = ((rows, t), jnp.float32)
    fn, args, nbytes = _train_step(
        stage,
        mesh,
        model,
        objective,
        lambda b: jnp.float32(1.0),
        _batch(mesh, shapes),
        reference=False,
        lora=stage.train.lora(),
    )
    flops = model_flops(c, rows * t, t, passes=3)
    return PlannedStep(
        "grpo", fn, args, flops, "policy fwd+bwd 3(2N+4LAT) per token", f"{rows} rows x {t}", nbytes
    )


BUILDERS = {
    "preference": preference_step,
    "reward": reward_step,
    "prefill": prefill_step,
    "decode": decode_step,
    "grpo": grpo_step,
}


def build(name: str, config, mesh) -> PlannedStep:
    """The step `name` (one of `STEPS`) of the experiment `config` (a ConfigDict) on `mesh`."""
    if name not in BUILDERS:
        raise ValueError(f"unknown step {name!r}; known: {', '.join(STEPS)}")
    return BUILDERS[name](config, mesh)
