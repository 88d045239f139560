"""The trainer core: a jitted, donating train step and the loop that drives it. No config objects.

    tx = optim.make_optimizer(optim_config, steps)
    state, state_sh = trainer.init_state(params, tx, seed=0, mesh=mesh, param_shardings=param_sh)
    step_fn = trainer.make_train_step(objective, weight_fn=steps.pair_weight, tx=tx, mesh=mesh,
                                      state_shardings=state_sh, reference_shardings=param_sh)
    state = trainer.fit(state, step_fn, host_batches, config=trainer.LoopConfig(steps=100),
                        checkpointer=ckpt, writer=writer, reference_params=reference, place=place)

`make_train_step` binds `steps.train_step` (the update, read in `rlhf_jax.train.steps`) to an objective
and an optimizer and jits it once with in/out shardings and `donate_argnums=0`; `fit` is the loop.

Host syncs. The loop never waits for the device to take a step: tokens/s is counted on the host
(numpy) batch before it is placed on the devices, and a log step's metrics are fetched (with an
explicit `jax.device_get`) one step late, after the next step has been dispatched, so the device always
has a step queued. The batch is placed explicitly (`place`, e.g. `sharding.shard_batch`) and the step
is dispatched under `jax.transfer_guard("disallow")`: a numpy array reaching the jitted step, or an
input on the wrong devices, would be a silent copy per step, and is an error instead.

Non-finite steps. The step never applies a non-finite update (`steps.apply_gradients`), so the loop
only looks at the non-finite counter when it fetches metrics: with `nonfinite="stop"` it then waits for
the last good checkpoint to be on disk and raises `NonFiniteError` naming the first bad step; with
`nonfinite="skip"` it carries on (the count is in `metrics.jsonl` and the stage's `results.json`) until
more than `max_nonfinite_fraction` of the run's steps were skipped, and then raises `NonFiniteError`.

Preemption: SIGTERM finishes the step in flight, checkpoints it and raises `Preempted`
(`rlhf_jax.train.preemption`).
"""

from __future__ import annotations

import dataclasses
import functools
import logging
import time
from collections.abc import Callable, Iterable, Iterator, Sequence

import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.experimental import multihost_utils
from tqdm.auto import tqdm

from rlhf_jax import sharding
from rlhf_jax.train import state as state_lib
from rlhf_jax.train import steps
from rlhf_jax.train.checkpoint import Checkpointer
from rlhf_jax.train.metrics import MetricsWriter
from rlhf_jax.train.preemption import NonFiniteError, Preempted, PreemptionWatch

Hook = Callable[[int, state_lib.TrainState], None]


# ----------------------------------------------------------------------------------------------------
# The state and the jitted step.


def state_shardings(params, tx: optax.GradientTransformation, mesh, param_shardings) -> state_lib.TrainState:
    """Shardings of a TrainState built from `params` with `tx` (the optimizer state mirrors params)."""
    abstract = jax.eval_shape(lambda p: state_lib.create(p, tx, jax.random.key(0)), params)
    rep = sharding.replicated(mesh)
    return state_lib.TrainState(
        step=rep,
        params=param_shardings,
        opt_state=sharding.shardings_like(abstract.opt_state, abstract.params, param_shardings, mesh),
        rng=rep,
        nonfinite_count=rep,
        first_nonfinite_step=rep,
    )


def init_state(
    params, tx: optax.GradientTransformation, *, seed: int, mesh=None, param_shardings=None
) -> tuple[state_lib.TrainState, state_lib.TrainState | None]:
    """A fresh train state at step 0, and its shardings (None without a mesh).

    With a mesh the optimizer state is created sharded like the params it mirrors (never gathered on
    one device first).
    """
    create = lambda p, r: state_lib.create(p, tx, r)
    if mesh is None:
        return jax.jit(create)(params, jax.random.key(seed)), None
    state_sh = state_shardings(params, tx, mesh, param_shardings)
    return jax.jit(create, out_shardings=state_sh)(params, jax.random.key(seed)), state_sh


def make_train_step(
    objective: steps.Objective,
    *,
    weight_fn: Callable,
    tx: optax.GradientTransformation,
    schedule: optax.Schedule | None = None,
    accum_steps: int = 1,
    mesh=None,
    state_shardings: state_lib.TrainState | None = None,
    reference_shardings=None,
) -> Callable:
    """`steps.train_step` bound to `objective` and `tx`, jitted once with donation of the state.

    Args:
      objective: `(params, batch, reference_params) -> (loss_sum, metric sums)` (`rlhf_jax.train.steps`).
      weight_fn: the batch's loss denominator (`steps.sft_weight`, `steps.pair_weight`).
      tx: the optimizer.
      schedule: the learning-rate schedule, logged as `learning_rate` (None: not logged).
      accum_steps: micro-batches per step (gradient accumulation; the same gradient as one batch).
      mesh: the device mesh; None runs on the default device without shardings.
      state_shardings: the state's shardings (`init_state`); required with a mesh.
      reference_shardings: the shardings of the step's read-only `reference_params` (the reference
        policy's params), or None when the step gets none.

    Returns:
      A jitted `step_fn(state, batch, reference_params) -> (state, metrics)`; `state` is donated.
    """
    step = functools.partial(
        steps.train_step,
        objective=objective,
        weight_fn=weight_fn,
        tx=tx,
        schedule=schedule,
        accum_steps=accum_steps,
    )
    if mesh is None:
        return jax.jit(step, donate_argnums=0)
    if state_shardings is None:
        raise ValueError("make_train_step: a mesh needs the state's shardings (trainer.init_state)")
    return jax.jit(
        step,
        in_shardings=(state_shardings, sharding.batch_sharding(mesh), reference_shardings),
        out_shardings=(state_shardings, sharding.replicated(mesh)),
        donate_argnums=0,
    )


def evaluate(eval_fn: Callable[[dict], dict], batches: Iterable[dict]) -> dict[str, float]:
    """Accumulates a jitted `eval_fn(batch) -> metric sums` over device `batches`; returns the means."""
    total = None
    for batch in batches:
        sums = eval_fn(batch)
        total = sums if total is None else jax.tree.map(jnp.add, total, sums)
    if total is None:
        return {}
    return {k: float(v) for k, v in jax.device_get(steps.finalize(total)).items()}


# ----------------------------------------------------------------------------------------------------
# The loop.


@dataclasses.dataclass(frozen=True)
class LoopConfig:
    """Attributes:
    steps: total optimizer steps (the loop resumes from the state's step).
    log_every: write metrics every this many steps (and at checkpoint steps and the last step).
    nonfinite: "stop" (raise, after the last good checkpoint is safe) or "skip" (count and go on).
    max_nonfinite_fraction: with "skip", raise once more than this fraction of `steps` were skipped.
    progress: show a tqdm bar.
    """

    steps: int
    log_every: int = 10
    nonfinite: str = "stop"
    max_nonfinite_fraction: float = 0.05
    progress: bool = True

    def __post_init__(self):
        if self.nonfinite not in ("stop", "skip"):
            raise ValueError(f"nonfinite must be 'stop' or 'skip', got {self.nonfinite!r}")
        if self.steps < 0 or self.log_every < 1:
            raise ValueError(f"steps must be >= 0 and log_every >= 1, got {self.steps}, {self.log_every}")
        if not 0.0 <= self.max_nonfinite_fraction <= 1.0:
            raise ValueError(f"max_nonfinite_fraction must be in [0, 1], got {self.max_nonfinite_fraction}")


def _global_count(n: int) -> int:
    """`n` summed over processes (a collective; called at log steps only, which every process reaches)."""
    if jax.process_count() == 1:
        return n
    # float32: exact to 2**24 and then to 7 digits, plenty for a rate; int64 is unavailable without x64.
    return int(np.sum(multihost_utils.process_allgather(np.float32(n))))


def fit(
    state: state_lib.TrainState,
    step_fn: Callable,
    batches: Iterator[dict],
    *,
    config: LoopConfig,
    writer: MetricsWriter,
    checkpointer: Checkpointer | None = None,
    reference_params=None,
    data_iterator=None,
    place: Callable[[dict], dict] | None = None,
    tokens_in: Callable[[dict], int] | None = None,
    hooks: Sequence[Hook] = (),
    description: str = "train",
) -> state_lib.TrainState:
    """Runs `step_fn` from `state.step` to `config.steps`; returns the final state.

    Args:
      state: the (possibly restored) train state.
      step_fn: jitted `(state, batch, reference_params) -> (state, metrics)` (`make_train_step`).
      batches: yields this process's host batches (or device-ready batches when `place` is None).
      config: loop settings.
      writer: metrics sink (`metrics.jsonl`, TensorBoard).
      checkpointer: saves state and `data_iterator` at its interval and at the end (None: no saves).
      reference_params: the step's read-only input (the reference policy's params), or None.
      data_iterator: the grain iterator behind `batches`, checkpointed with the state.
      place: puts a host batch on the devices (e.g. `sharding.shard_batch`); None: use it as it is.
      tokens_in: counts the real tokens of a host batch, before `place` (so no device sync). The
        logged `tokens_per_s` is the global figure: every process's count between two metric fetches,
        summed over processes, per second of wall time between them.
      hooks: called as hook(step, state) after each step (e.g. a periodic evaluation).
      description: the stage's name, for the progress bar and messages.

    Raises:
      NonFiniteError: a non-finite step with `nonfinite="stop"`, or too many with "skip".
      Preempted: SIGTERM arrived; the state after the step named in it is checkpointed.
    """
    start = int(jax.device_get(state.step))
    is_main = jax.process_index() == 0
    bar = tqdm(total=config.steps, initial=start, desc=description, disable=not (config.progress and is_main))
    tokens = 0
    fetched_at = time.perf_counter()
    pending = None  # (step, metrics, tokens) of a log step, fetched after the next step is dispatched

    def last_good() -> str:
        if checkpointer is None:
            return "no checkpointing configured"
        checkpointer.wait()
        good = checkpointer.latest_step()
        if good is None:
            return f"no checkpoint saved yet in {checkpointer.directory}"
        return f"last good checkpoint: step {good} in {checkpointer.directory}"

    def check_skipped(skipped: int) -> None:
        limit = config.max_nonfinite_fraction * config.steps
        if config.nonfinite == "skip" and skipped > limit:
            raise NonFiniteError(
                f"{description}: {skipped} of {config.steps} steps were skipped for a non-finite loss or "
                f"gradient, more than the stage's max_nonfinite_fraction={config.max_nonfinite_fraction} "
                f"allows ({limit:g} steps); {last_good()}. Lower the learning rate, or raise the limit."
            )

    def flush() -> None:
        """Fetches and writes the pending log step's metrics (waits for that step, not a later one)."""
        nonlocal pending, fetched_at
        if pending is None:
            return
        step, metrics, counted = pending
        pending = None
        metrics = jax.device_get(metrics)
        now = time.perf_counter()
        elapsed, fetched_at = now - fetched_at, now
        skipped = int(metrics.get("nonfinite_steps", 0))
        if skipped > 0 and config.nonfinite == "stop":
            first = int(jax.device_get(state.first_nonfinite_step))
            raise NonFiniteError(
                f"non-finite loss or gradient at step {first} (update not applied); {last_good()}. "
                "Set --config.train.nonfinite=skip to skip such steps instead."
            )
        check_skipped(skipped)
        record = {k: float(np.asarray(v)) for k, v in metrics.items()}
        if tokens_in is not None:
            record["tokens_per_s"] = _global_count(counted) / max(elapsed, 1e-9)
        writer.write(step, record)
        bar.set_postfix(
            loss=f"{record.get('loss', float('nan')):.4f}",
            tok_s=f"{record.get('tokens_per_s', 0):.0f}",
        )

    preemption = PreemptionWatch()
    try:
        for step in range(start + 1, config.steps + 1):
            batch = next(batches)
            if tokens_in is not None:
                tokens += tokens_in(batch)
            if place is not None:  # the step's one host-to-device copy, explicit
                batch = place(batch)
            with jax.transfer_guard("disallow"):  # no implicit transfer into the step (module docstring)
                state, metrics = step_fn(state, batch, reference_params)
            flush()  # the previous log step's metrics, while this step runs
            last = step == config.steps
            saving = checkpointer is not None and (last or checkpointer.should_save(step))
            logged = last or saving or step % config.log_every == 0
            if logged:
                pending, tokens = (step, metrics, tokens), 0
            if saving:
                # Saving waits for the step anyway; checking it first keeps a stopped run's checkpoints
                # free of non-finite steps.
                flush()
                checkpointer.save(step, state, data_iterator, force=True)
            if preemption.reached(step):
                if not logged:
                    pending, tokens = (step, metrics, tokens), 0
                flush()
                if checkpointer is not None:
                    checkpointer.save(step, state, data_iterator, force=True)
                    checkpointer.wait()
                raise Preempted(
                    step=step,
                    stage=description,
                    checkpoint_dir=checkpointer.directory if checkpointer is not None else None,
                )
            for hook in hooks:
                hook(step, state)
            bar.update(1)
        flush()
    finally:
        preemption.close()
        bar.close()
    if checkpointer is not None:
        checkpointer.wait()
    if config.nonfinite == "skip":  # also when resumed at the last step, with no step run here
        check_skipped(int(jax.device_get(state.nonfinite_count)))
    logging.info("%s: finished at step %d", description, config.steps)
    return state
