"""Optimizers from a frozen config: AdamW or Adafactor, warmup + cosine/linear/constant decay, clipping.

Gradient accumulation is not an optax wrapper here: the train steps split a batch into micro-batches
and sum their gradients inside one jitted step (`rlhf_jax.train.steps`), so k accumulated micro-batches
give exactly the update of one k-times larger batch.
"""

from __future__ import annotations

import dataclasses
import math

import optax


@dataclasses.dataclass(frozen=True)
class OptimConfig:
    """Optimizer hyperparameters.

    Attributes:
      name: "adamw" or "adafactor" (RSO trained with Adafactor).
      learning_rate: peak learning rate.
      schedule: "cosine", "linear" (decay to `final_lr_fraction` of peak), or "constant" after warmup.
      warmup_steps: linear warmup from 0.
      final_lr_fraction: end of the decay as a fraction of the peak.
      weight_decay: decoupled weight decay (AdamW; Adafactor's `weight_decay_rate`).
      b1, b2, eps: Adam moments and epsilon.
      grad_clip_norm: global-norm clipping threshold (0 disables).
    """

    name: str = "adamw"
    learning_rate: float = 1e-4
    schedule: str = "cosine"
    warmup_steps: int = 0
    final_lr_fraction: float = 0.1
    weight_decay: float = 0.0
    b1: float = 0.9
    b2: float = 0.999
    eps: float = 1e-8
    grad_clip_norm: float = 1.0

    def __post_init__(self):
        if self.name not in ("adamw", "adafactor"):
            raise ValueError(f"optimizer name must be 'adamw' or 'adafactor', got {self.name!r}")
        if self.schedule not in ("cosine", "linear", "constant"):
            raise ValueError(f"schedule must be cosine, linear or constant, got {self.schedule!r}")
        # NaN fails every comparison, so each check is written to fail for it.
        checks = (
            ("learning_rate", math.isfinite(self.learning_rate) and self.learning_rate > 0, "finite and > 0"),
            ("warmup_steps", self.warmup_steps >= 0, ">= 0"),
            ("final_lr_fraction", 0.0 <= self.final_lr_fraction <= 1.0, "in [0, 1]"),
            ("weight_decay", 0.0 <= self.weight_decay < math.inf, "finite and >= 0"),
            ("b1", 0.0 <= self.b1 < 1.0, "in [0, 1)"),
            ("b2", 0.0 <= self.b2 < 1.0, "in [0, 1)"),
            ("eps", 0.0 < self.eps < math.inf, "finite and > 0"),
            ("grad_clip_norm", 0.0 <= self.grad_clip_norm < math.inf, "finite and >= 0 (0 disables)"),
        )
        for field, ok, want in checks:
            if not ok:
                raise ValueError(f"{field} must be {want}, got {getattr(self, field)!r}")


def make_schedule(config: OptimConfig, total_steps: int) -> optax.Schedule:
    """Warmup then the configured decay over the remaining steps."""
    peak = config.learning_rate
    warmup = min(config.warmup_steps, max(total_steps - 1, 0))
    decay_steps = max(total_steps - warmup, 1)
    end = peak * config.final_lr_fraction
    if config.schedule == "cosine":
        decay = optax.cosine_decay_schedule(peak, decay_steps, alpha=config.final_lr_fraction)
    elif config.schedule == "linear":
        decay = optax.linear_schedule(peak, end, decay_steps)
    else:
        decay = optax.constant_schedule(peak)
    if warmup == 0:
        return decay
    return optax.join_schedules([optax.linear_schedule(0.0, peak, warmup), decay], [warmup])


def make_optimizer(config: OptimConfig, total_steps: int) -> optax.GradientTransformation:
    """Builds the optax chain: clip by global norm, then AdamW or Adafactor with the schedule."""
    schedule = make_schedule(config, total_steps)
    parts = []
    if config.grad_clip_norm > 0:
        parts.append(optax.clip_by_global_norm(config.grad_clip_norm))
    if config.name == "adamw":
        parts.append(
            optax.adamw(
                schedule, b1=config.b1, b2=config.b2, eps=config.eps, weight_decay=config.weight_decay
            )
        )
    else:
        parts.append(
            optax.adafactor(
                schedule, weight_decay_rate=config.weight_decay or None, multiply_by_parameter_scale=True
            )
        )
    return optax.chain(*parts)
