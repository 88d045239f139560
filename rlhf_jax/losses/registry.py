"""Registry of pairwise losses by name, so experiment configs can choose one with `loss.name`.

`make(name, **hyperparameters)` validates the name, the hyperparameter names and their values when
the config is loaded, long before a model is built, and returns a function of the log-prob arrays.
"""

from __future__ import annotations

import functools
import inspect
from collections.abc import Callable

import jax.numpy as jnp

from rlhf_jax.losses import _pairwise, _trl

# Array arguments a loss may take; everything else in a signature is a hyperparameter.
INPUT_NAMES = (
    "policy_chosen_logps",
    "policy_rejected_logps",
    "reference_chosen_logps",
    "reference_rejected_logps",
    "previous_chosen_logps",
    "previous_rejected_logps",
    "chosen_lengths",
    "rejected_lengths",
    "policy_target_logps",
)

_LOSSES: dict[str, Callable] = {
    fn.__name__: fn
    for fn in (
        _pairwise.dpo,
        _pairwise.cdpo,
        _pairwise.rdpo,
        _pairwise.ipo,
        _pairwise.sigmoid_norm,
        _pairwise.hinge_norm,
        _pairwise.hinge,
        _pairwise.slic,
        _pairwise.inpo,
        _pairwise.rpo,
        _pairwise.chosen_nll,
        _pairwise.simpo,
        _pairwise.orpo,
        _trl.exo_pair,
        _trl.nca_pair,
        _trl.bco_pair,
        _trl.sppo_hard,
        _trl.aot,
        _trl.aot_unpaired,
        _trl.apo_zero,
        _trl.apo_down,
        _trl.discopop,
        _trl.dpo_length_normalized,
    )
}


def names() -> list[str]:
    """Every registered pairwise loss name, sorted."""
    return sorted(_LOSSES)


def get(name: str) -> Callable:
    """Returns the loss function registered under `name`.

    Raises:
      ValueError: for an unknown name, listing the known ones.
    """
    try:
        return _LOSSES[name]
    except KeyError:
        raise ValueError(f"unknown loss {name!r}; known losses: {', '.join(names())}") from None


def _params(name: str) -> dict[str, inspect.Parameter]:
    return dict(inspect.signature(get(name)).parameters)


def hyperparameters(name: str) -> dict[str, object]:
    """The loss's hyperparameters and their defaults, e.g. {'beta': 0.1, 'label_smoothing': 0.0}."""
    return {k: p.default for k, p in _params(name).items() if k not in INPUT_NAMES}


def required_inputs(name: str) -> tuple[str, ...]:
    """Array inputs the loss cannot run without (e.g. lengths for simpo, previous_* for inpo)."""
    return tuple(k for k, p in _params(name).items() if k in INPUT_NAMES and p.default is p.empty)


def optional_inputs(name: str) -> tuple[str, ...]:
    """Array inputs the loss uses when given (e.g. lengths for ipo)."""
    return tuple(k for k, p in _params(name).items() if k in INPUT_NAMES and p.default is not p.empty)


def uses_reference(name: str) -> bool:
    """Whether the loss needs reference-policy log-probs (reference-free: hinge, slic, simpo, orpo)."""
    return "reference_chosen_logps" in required_inputs(name)


def make(name: str, **hparams) -> Callable:
    """Binds and validates hyperparameters; returns `loss_fn(**inputs) -> [B]`.

    Unknown hyperparameter names raise a ValueError naming the valid ones; invalid values (e.g. rdpo's
    flip_rate >= 0.5) raise the loss's own ValueError here, by evaluating it once on a dummy pair.

    Args:
      name: a name from `names()`.
      **hparams: hyperparameters, e.g. beta=0.1.

    Returns:
      A function of keyword array inputs returning the per-example loss.
    """
    fn = get(name)
    valid = hyperparameters(name)
    unknown = sorted(set(hparams) - set(valid))
    if unknown:
        raise ValueError(
            f"loss {name!r} has no hyperparameter(s) {unknown}; its hyperparameters are "
            f"{', '.join(f'{k}={v!r}' for k, v in valid.items()) or '(none)'}"
        )
    for key, value in hparams.items():
        if not (value is None and valid[key] is None) and (
            isinstance(value, bool) or not isinstance(value, (int, float))
        ):
            raise ValueError(f"loss {name!r}: hyperparameter {key} must be a number, got {value!r}")
    bound = functools.partial(fn, **hparams)
    dummy = {k: jnp.full((2,), -1.0) for k in required_inputs(name)}
    bound(**dummy)  # raises the loss's own ValueError for an out-of-range value
    return bound
