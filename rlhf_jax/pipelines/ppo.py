"""PPO with a critic in the online loop (`grpo.run` with `grpo.estimator="gae"` and a `ppo` section).

    python -m launch.train --experiment=ppo_arith        # SFT → PPO on the synthetic math task
    python -m launch.train --experiment=ppo_tldr         # SFT → reward model → PPO on it (TL;DR)

The loop is the GRPO family's (sampling, rewards, old and reference log-probs, μ passes of mini-batch
updates, checkpoints, resume); PPO changes how the advantages are made and adds a second trained
model, the critic (Schulman et al. 2017; the RLHF form of Ziegler et al. 2019, Stiennon et al. 2020,
Ouyang et al. 2022; PPO for NLU, arXiv 2410.11020):

  1. the critic V (a `RewardModel` read per token, `RewardModel.values`) scores every completion token
     at rollout time: `old_values` [R, T];
  2. per-token rewards (`losses.kl_penalized_rewards`): −β·kl_t on every completion token (k1 or k3
     against the frozen reference) and the task reward on the last one (optionally clipped);
  3. GAE(γ, λ) over the completion tokens (`losses.gae`): per-token advantages and returns;
     optionally whitened over the iteration's tokens (`losses.whiten`);
  4. each mini-batch step updates the policy with the clipped surrogate (`losses.policy_gradient_loss`
     with `advantages_BT`) and the critic with the clipped value loss (`losses.value_loss`), each with
     its own AdamW state;
  5. with `adaptive_kl`, β follows Ziegler et al. 2019's controller (`losses.adaptive_kl_coef`) from the
     iteration's mean sequence KL; β is part of the checkpoint, so a resumed run continues exactly.

The critic is a separate model initialised from the SFT policy's trunk with a fresh head
(`critic_init="sft"`) or from the run's reward model (`"reward_model"`, InstructGPT's choice; the run
must train one). Checkpoints hold {"policy", "critic", "kl_coef"} at iteration ends.

Logged per iteration (beside the GRPO keys): `kl_coef`, `kl_seq` (mean summed k1 KL per completion),
`value_loss`, `value_clip_frac`, `value_mean`, `value_error` (mean |V − return|), `returns_mean`,
`advantages_std` (before whitening), `explained_variance` (1 − Var(return − V_old) / Var(return)).
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np

from rlhf_jax import losses, models, scoring, sharding
from rlhf_jax.pipelines import reward, training
from rlhf_jax.train import optim, steps, trainer

CRITIC_INITS = ("sft", "reward_model", "shared")
KL_ESTIMATORS = ("k1", "k3")  # `losses.kl_penalized_rewards`'s


@dataclasses.dataclass(frozen=True)
class PPOConfig:
    """PPO's critic and reward shaping (the loop, optimizer of the policy and mini-batches: `grpo`, `train`).

    Attributes:
      gamma: GAE's discount γ (1.0: undiscounted, as in RLHF).
      lam: GAE's λ (0.95, TRL's default; 1: Monte-Carlo returns minus values).
      kl_coef: β of the per-token KL penalty in the reward (0: none; then no reference is kept).
      kl_estimator: "k1" (log π − log π_ref) or "k3".
      adaptive_kl: adapt β towards `kl_target` (Ziegler et al. 2019), starting from `kl_coef`.
      kl_target, kl_horizon: the controller's target sequence KL and horizon in episodes.
      whiten_advantages: normalise the advantages over the iteration's completion tokens.
      value_clip: c of the clipped value loss (0: no clipping).
      reward_clip: clip the task reward to [−c, c] before shaping (0: none).
      critic_init: "sft" (a separate critic: the SFT trunk, a fresh head), "reward_model" (a separate
        critic: the run's reward model) or "shared" (a value head on the policy's own backbone, trained
        with the policy by pg_loss + vf_coef · value_loss; `steps.shared_critic_objective`).
      critic_learning_rate: a separate critic's peak learning rate (0: the policy's, `train.learning_rate`).
      vf_coef: the value loss's weight with `critic_init="shared"` (TRL's `vf_coef`, 0.1).
    """

    gamma: float = 1.0
    lam: float = 0.95
    kl_coef: float = 0.05
    kl_estimator: str = "k1"
    adaptive_kl: bool = False
    kl_target: float = 6.0
    kl_horizon: float = 10000.0
    whiten_advantages: bool = True
    value_clip: float = 0.2
    reward_clip: float = 0.0
    critic_init: str = "sft"
    critic_learning_rate: float = 0.0
    vf_coef: float = 0.1

    def __post_init__(self):
        checks = (
            ("gamma", 0 <= self.gamma <= 1, "in [0, 1]"),
            ("lam", 0 <= self.lam <= 1, "in [0, 1]"),
            ("kl_coef", self.kl_coef >= 0, ">= 0"),
            ("kl_estimator", self.kl_estimator in KL_ESTIMATORS, f"one of {KL_ESTIMATORS}"),
            ("adaptive_kl", not self.adaptive_kl or self.kl_coef > 0, "false when kl_coef is 0"),
            ("kl_target", self.kl_target > 0, "> 0"),
            ("kl_horizon", self.kl_horizon > 0, "> 0"),
            ("value_clip", self.value_clip >= 0, ">= 0 (0: no clipping)"),
            ("reward_clip", self.reward_clip >= 0, ">= 0 (0: no clipping)"),
            ("critic_init", self.critic_init in CRITIC_INITS, f"one of {CRITIC_INITS}"),
            ("critic_learning_rate", self.critic_learning_rate >= 0, ">= 0 (0: the policy's)"),
            ("vf_coef", self.vf_coef > 0, "> 0"),
        )
        for field, ok, want in checks:
            if not ok:
                raise ValueError(f"{field} must be {want}, got {getattr(self, field)!r}")

    @property
    def shared(self) -> bool:
        """Whether the value head sits on the policy's backbone (one model, one optimizer)."""
        return self.critic_init == "shared"


def critic(model_cfg: models.ModelConfig, mesh, *, seed: int, init_from: str):
    """The critic `RewardModel` on `mesh` and its parameters from `init_from` (an SFT stage: the trunk,
    a fresh head; a reward-model stage: all of it)."""
    model = models.RewardModel(model_cfg, mesh=mesh)
    rng = jax.random.fold_in(jax.random.key(seed), 0xC817)
    params = reward.init_reward_params(model, rng, init_from=init_from)
    return model, params


def setup_critic(ppo: PPOConfig, cfg, train_cfg, *, model, params, mesh):
    """The critic's jitted train step and fresh state (`training.setup` with `steps.value_objective`)."""
    optim = cfg.optim
    if ppo.critic_learning_rate:
        optim = dataclasses.replace(optim, learning_rate=ppo.critic_learning_rate)
    objective = functools.partial(
        steps.value_objective, model=model, clip=ppo.value_clip if ppo.value_clip > 0 else None
    )
    return training.setup(
        optim, train_cfg, seed=cfg.seed + 1, mesh=mesh, model=model, params=params, objective=objective,
        weight_fn=lambda batch: np.float32(1.0),
    )  # fmt: skip


def value_head_init(d_model: int, *, seed: int, dtype) -> dict:
    """A fresh scalar head for the shared critic: kernel [D, 1] ~ N(0, 1/D) (the `RewardModel` head's
    fan-in init), bias 0."""
    rng = jax.random.fold_in(jax.random.key(seed), 0xC818)
    kernel = jax.random.normal(rng, (d_model, 1), jnp.float32) * d_model**-0.5
    return {"kernel": kernel.astype(dtype), "bias": jnp.zeros((1,), dtype)}


def setup_shared(cfg, train_cfg, *, model, params, head, mesh, objective):
    """The jitted step and fresh state of policy + value head trained together
    (`steps.shared_critic_objective`); the head is replicated over the mesh."""
    tx = optim.make_optimizer(cfg.optim, train_cfg.steps)
    schedule = optim.make_schedule(cfg.optim, train_cfg.steps)
    param_sh = None
    if mesh is not None:
        head_sh = jax.tree.map(lambda _: sharding.replicated(mesh), head)
        param_sh = {"policy": models.param_shardings(model, mesh), "value_head": head_sh}
        head = jax.device_put(head, head_sh)
    state, state_sh = trainer.init_state(
        {"policy": params, "value_head": head}, tx, seed=cfg.seed, mesh=mesh, param_shardings=param_sh
    )
    step_fn = trainer.make_train_step(
        objective, weight_fn=lambda batch: np.float32(1.0), tx=tx, schedule=schedule,
        accum_steps=train_cfg.grad_accum_steps, mesh=mesh, state_shardings=state_sh,
    )  # fmt: skip
    return step_fn, state


@functools.lru_cache(maxsize=8)
def _jitted_shared_values(model):
    return jax.jit(lambda p, b: steps.shared_values(model, p, b))


@functools.lru_cache(maxsize=8)
def _jitted_values(model):
    return jax.jit(lambda p, b: model.apply({"params": p}, b["tokens"], b["segment_ids"], method="values"))


def rows_values(model, params, rows: dict, *, mesh, batch_size: int, shared: bool = False) -> np.ndarray:
    """The critic's V(s_t) [R, T] of the rows (`RewardModel.values`; with `shared`, the value head on
    the policy `model` whose {"policy", "value_head"} params are given), on the host."""
    fn = _jitted_shared_values(model) if shared else _jitted_values(model)
    return scoring.map_rows(fn, params, rows, batch_size=batch_size, mesh=mesh)


@functools.partial(jax.jit, static_argnames=("gamma", "lam", "kl_estimator", "reward_clip", "whiten"))
def _advantages(scores_B, logps_BT, reference_logps_BT, values_BT, mask_BT, kl_coef, *, gamma, lam,
                kl_estimator, reward_clip, whiten):  # fmt: skip
    rewards_BT = losses.kl_penalized_rewards(
        scores_B=scores_B, logps_BT=logps_BT, reference_logps_BT=reference_logps_BT, mask_BT=mask_BT,
        beta=kl_coef, kl_estimator=kl_estimator, score_clip=reward_clip,
    )  # fmt: skip
    advantages_BT, returns_BT = losses.gae(
        rewards_BT=rewards_BT, values_BT=values_BT, mask_BT=mask_BT, gamma=gamma, lam=lam
    )
    raw_BT = advantages_BT
    if whiten:
        advantages_BT = losses.whiten(values_BT=advantages_BT, mask_BT=mask_BT)
    return advantages_BT, returns_BT, raw_BT


def advantages(rows: dict, scores_B: np.ndarray, ppo: PPOConfig, kl_coef: float) -> dict:
    """Per-token `advantages` and `returns` [R, T] of an iteration's rows (module docstring, steps 2-3),
    and what the loop logs of them.

    `rows` hold `loss_mask`, `old_logps`, `old_values` and, when β > 0, `reference_logps`.
    """
    mask = rows["loss_mask"]
    reference = rows.get("reference_logps", rows["old_logps"])  # β = 0: no penalty, any equal array
    adv, ret, raw = jax.device_get(
        _advantages(
            np.asarray(scores_B, np.float32),
            rows["old_logps"],
            reference,
            rows["old_values"],
            mask,
            np.float32(kl_coef),
            gamma=ppo.gamma,
            lam=ppo.lam,
            kl_estimator=ppo.kl_estimator,
            reward_clip=ppo.reward_clip or None,
            whiten=ppo.whiten_advantages,
        )  # fmt: skip
    )
    on = mask > 0
    kl_seq = float(np.mean(np.sum(np.where(on, rows["old_logps"] - reference, 0.0), axis=1)))
    var_ret = float(np.var(ret[on])) if on.any() else 0.0
    resid = float(np.var((ret - rows["old_values"])[on])) if on.any() else 0.0
    stats = {
        "kl_seq": kl_seq,
        "returns_mean": float(ret[on].mean()) if on.any() else 0.0,
        "advantages_std": float(raw[on].std()) if on.any() else 0.0,
        "explained_variance": 1.0 - resid / var_ret if var_ret > 0 else 0.0,
    }
    return {"advantages": np.asarray(adv, np.float32), "returns": np.asarray(ret, np.float32), "stats": stats}


def next_kl_coef(ppo: PPOConfig, kl_coef: float, kl_seq: float, n_rows: int) -> float:
    """β after an iteration: the adaptive controller's update with the iteration's sequence KL, or β."""
    if not ppo.adaptive_kl:
        return kl_coef
    return float(
        losses.adaptive_kl_coef(
            coef=kl_coef, kl=kl_seq, target=ppo.kl_target, horizon=ppo.kl_horizon, n_steps=n_rows
        )
    )
