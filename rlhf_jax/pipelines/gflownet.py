"""GFlowNet trajectory balance in the online loop (`pipelines.grpo.run` with `gflownet=`): its settings,
the positive-reward transform, the replay buffer and the {policy, log Z} train state.

Objective (`losses.trajectory_balance`, Malkin et al. 2022 arXiv 2201.13259; GFlowVLM arXiv 2503.06514):
(log Z + Σ_t log π(a_t|s_t) − log R(x))² with a learnable scalar log Z trained by its own Adam at
`log_z_learning_rate` (GFlowNet practice: log Z learns much faster than the policy). R must be positive:
R = exp(reward / reward_temperature) (default), or R = max(reward, reward_floor) when reward_floor > 0.

Replay buffer (documented policy): every sampled trajectory whose reward is >= `replay_min_reward` (on
`arith` with the exact-answer reward: the correct ones) enters a FIFO buffer of at most `replay_size`
distinct (prompt, completion) rows; a duplicate already in the buffer is not added again. Each iteration
trains on the P·G on-policy rows plus `replay_rows` rows drawn uniformly with replacement from the
buffer (drawn from the on-policy rows while the buffer is empty), so the step count per iteration is
fixed. The buffer is rebuilt from scratch after a resume (it is not checkpointed).
"""

from __future__ import annotations

import collections
import dataclasses

import jax
import numpy as np
import optax

from rlhf_jax import losses, models, sharding
from rlhf_jax.train import optim, trainer

TB_KEYS = ("tokens", "targets", "loss_mask", "segment_ids", "log_rewards")


@dataclasses.dataclass(frozen=True)
class GFlowNetConfig:
    """Attributes: log_z_init, log_z_learning_rate (its own Adam), reward_temperature, reward_floor (> 0:
    R = max(r, floor) instead of exp(r / temperature)), replay_size (buffer capacity, 0: off),
    replay_rows (buffer rows added to each iteration), replay_min_reward (admission threshold)."""

    log_z_init: float = 0.0
    log_z_learning_rate: float = 1e-2
    reward_temperature: float = 0.1
    reward_floor: float = 0.0
    replay_size: int = 256
    replay_rows: int = 16
    replay_min_reward: float = 1.0

    def __post_init__(self):
        checks = (
            ("log_z_learning_rate", self.log_z_learning_rate > 0, "> 0"),
            ("reward_temperature", self.reward_temperature > 0, "> 0"),
            ("reward_floor", self.reward_floor >= 0, ">= 0 (0: exp(r / temperature))"),
            ("replay_size", self.replay_size >= 0, ">= 0"),
            ("replay_rows", self.replay_rows >= 0, ">= 0"),
        )
        for field, ok, want in checks:
            if not ok:
                raise ValueError(f"gflownet.{field} must be {want}, got {getattr(self, field)!r}")

    def log_rewards(self, rewards_B: np.ndarray) -> np.ndarray:
        """log R of the rewards (the module docstring's transform)."""
        kw = (
            dict(floor=self.reward_floor)
            if self.reward_floor > 0
            else dict(temperature=self.reward_temperature)
        )
        return np.asarray(losses.positive_log_rewards(rewards_B=rewards_B, **kw), np.float32)


class ReplayBuffer:
    """FIFO buffer of distinct high-reward training rows (the module docstring's policy)."""

    def __init__(self, size: int, min_reward: float):
        self.size, self.min_reward = size, min_reward
        self._rows: collections.OrderedDict[bytes, dict] = collections.OrderedDict()

    def __len__(self) -> int:
        return len(self._rows)

    def add(self, rows: dict, rewards_R: np.ndarray) -> int:
        """Admits the rows with reward >= min_reward not already held; returns how many were added."""
        added = 0
        for r in np.flatnonzero(rewards_R >= self.min_reward):
            key = rows["tokens"][r].tobytes() + rows["loss_mask"][r].tobytes()
            if self.size == 0 or key in self._rows:
                continue
            self._rows[key] = {k: rows[k][r] for k in TB_KEYS}
            added += 1
            while len(self._rows) > self.size:
                self._rows.popitem(last=False)
        return added

    def draw(self, n: int, rng: np.random.Generator, fallback: dict) -> dict:
        """n rows uniformly with replacement (from `fallback`'s rows while the buffer is empty)."""
        if not self._rows:
            idx = rng.integers(0, len(fallback["tokens"]), n)
            return {k: fallback[k][idx] for k in TB_KEYS}
        held = list(self._rows.values())
        pick = rng.integers(0, len(held), n)
        return {k: np.stack([held[i][k] for i in pick]) for k in TB_KEYS}


def setup(cfg, train_cfg, gfn: GFlowNetConfig, *, model, params, mesh, objective):
    """The jitted step and fresh state of {"policy", "log_z"}: the policy with the stage's optimizer,
    log Z (replicated) with its own Adam at `log_z_learning_rate`."""
    tx = optax.multi_transform(
        {
            "policy": optim.make_optimizer(cfg.optim, train_cfg.steps),
            "log_z": optax.adam(gfn.log_z_learning_rate),
        },
        lambda p: {"policy": jax.tree.map(lambda _: "policy", p["policy"]), "log_z": "log_z"},
    )
    schedule = optim.make_schedule(cfg.optim, train_cfg.steps)
    log_z = np.float32(gfn.log_z_init)
    param_sh = None
    if mesh is not None:
        param_sh = {"policy": models.param_shardings(model, mesh), "log_z": sharding.replicated(mesh)}
        log_z = jax.device_put(log_z, param_sh["log_z"])
    state, state_sh = trainer.init_state(
        {"policy": params, "log_z": log_z}, tx, seed=cfg.seed, mesh=mesh, param_shardings=param_sh
    )
    step_fn = trainer.make_train_step(
        objective, weight_fn=lambda batch: np.float32(1.0), tx=tx, schedule=schedule,
        accum_steps=train_cfg.grad_accum_steps, mesh=mesh, state_shardings=state_sh,
    )  # fmt: skip
    return step_fn, state
