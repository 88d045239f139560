"""Shared helpers for the loss functions: float32 casting, implicit rewards, argument checks."""

from __future__ import annotations

import jax
import jax.numpy as jnp

Array = jax.Array


def f32(x) -> Array:
    """Casts an input (float32, bfloat16, numpy or Python number) to a float32 array."""
    return jnp.asarray(x, dtype=jnp.float32)


def log_ratios(
    policy_chosen_logps, policy_rejected_logps, reference_chosen_logps, reference_rejected_logps
) -> tuple[Array, Array]:
    """Returns (r_w, r_l) = (policy - reference) for chosen and rejected, in float32."""
    r_w = f32(policy_chosen_logps) - f32(reference_chosen_logps)
    r_l = f32(policy_rejected_logps) - f32(reference_rejected_logps)
    return r_w, r_l


def per_token(logps, lengths) -> Array:
    """Mean log-prob per completion token, lp / max(L, 1) (TRL clamps lengths at 1 too)."""
    return f32(logps) / jnp.maximum(f32(lengths), 1.0)


def check_positive(name: str, value) -> None:
    """Raises ValueError when a concrete hyperparameter is not > 0 (skips traced values)."""
    if not isinstance(value, jax.core.Tracer) and not float(value) > 0:
        raise ValueError(f"{name} must be > 0, got {value}")


def check_range(name: str, value, low: float, high: float, *, low_open=False, high_open=True) -> None:
    """Raises ValueError when a concrete value lies outside [low, high) (or the stated openness)."""
    if isinstance(value, jax.core.Tracer):
        return
    v = float(value)
    ok_low = v > low if low_open else v >= low
    ok_high = v < high if high_open else v <= high
    if not (ok_low and ok_high):
        lb = "(" if low_open else "["
        hb = ")" if high_open else "]"
        raise ValueError(f"{name} must lie in {lb}{low}, {high}{hb}, got {value}")


def log1mexp(x: Array) -> Array:
    """Computes log(1 - exp(x)) for x < 0 without cancellation (Maechler 2012).

    x is clamped to at most -1e-6 first, so a sequence with mean log-prob 0 (probability 1) gives a
    large finite value instead of -inf.
    """
    x = jnp.minimum(x, -1e-6)
    return jnp.where(x > -0.6931472, jnp.log(-jnp.expm1(x)), jnp.log1p(-jnp.exp(x)))
