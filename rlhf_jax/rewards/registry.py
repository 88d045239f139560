"""Registry of rewards by name, so experiment configs can choose them (`rewards.make("gsm8k")`).

`make(name, **hyperparameters)` checks the name, the hyperparameter names, their types and their values
when the config is loaded, long before a model is built or a sample drawn, and returns the reward with
its hyperparameters bound. A reward's signature says what it is: keywords named in `COLUMNS` are inputs
(`prompts`, `completions`, dataset columns such as `answer`, caller columns such as
`completion_lengths`); every other keyword is a hyperparameter, required when it has no default.
"""

from __future__ import annotations

import functools
import inspect
import types
import typing
from collections.abc import Callable

from rlhf_jax.rewards import _classify, _common, _length, _model, _rules

COLUMNS = _common.COLUMNS

_REWARDS: dict[str, Callable] = {
    fn.__name__: fn
    for fn in (
        _rules.gsm8k,
        _rules.math,
        _rules.exact_match,
        _rules.format,
        _rules.numeric_tolerance,
        _rules.tldr_gold,
        _classify.label_match,
        _classify.sts_regression,
        _length.soft_overlong,
        _length.cosine_length,
        _model.reward_model,
    )
}

# Rewards built from objects rather than hyperparameters: `make` cannot build them.
FACTORIES = ("reward_model",)


def names() -> list[str]:
    """Every registered reward name, sorted."""
    return sorted(_REWARDS)


def get(name: str) -> Callable:
    """The reward registered under `name` (for "reward_model", its factory).

    Raises:
      ValueError: for an unknown name, listing the known ones.
    """
    try:
        return _REWARDS[name]
    except KeyError:
        raise ValueError(f"unknown reward {name!r}; known rewards: {', '.join(names())}") from None


def _hyperparameter_params(name: str) -> dict[str, inspect.Parameter]:
    params = inspect.signature(get(name)).parameters
    return {k: p for k, p in params.items() if k not in COLUMNS and p.kind is inspect.Parameter.KEYWORD_ONLY}


def hyperparameters(name: str) -> dict[str, object]:
    """The reward's hyperparameters and their defaults (`inspect.Parameter.empty` for a required one)."""
    return {k: p.default for k, p in _hyperparameter_params(name).items()}


def required_hyperparameters(name: str) -> tuple[str, ...]:
    """Hyperparameters `make` needs a value for (e.g. soft_overlong's max_length and cache)."""
    return tuple(k for k, v in hyperparameters(name).items() if v is inspect.Parameter.empty)


def _allowed_types(hint) -> tuple[type, ...]:
    """The runtime types a hyperparameter annotated `hint` accepts (`int | None` -> (int, NoneType))."""
    if typing.get_origin(hint) in (typing.Union, types.UnionType):
        return tuple(t for arg in typing.get_args(hint) for t in _allowed_types(arg))
    return (hint,)


def _check_type(name: str, key: str, value, hint) -> None:
    allowed = _allowed_types(hint)
    if value is None:
        ok = type(None) in allowed
    elif isinstance(value, bool):  # a bool is an int to Python, not to a config
        ok = bool in allowed
    elif isinstance(value, int):
        ok = int in allowed or float in allowed
    elif isinstance(value, float):
        ok = float in allowed
    else:
        ok = isinstance(value, tuple(t for t in allowed if isinstance(t, type)))
    if not ok:
        want = " or ".join("None" if t is type(None) else getattr(t, "__name__", str(t)) for t in allowed)
        raise ValueError(f"reward {name!r}: hyperparameter {key} must be {want}, got {value!r}")


def make(name: str, **hparams) -> Callable:
    """Binds and checks hyperparameters; returns `reward(*, prompts, completions, **columns) -> float32 [N]`.

    Unknown hyperparameter names raise a ValueError naming the reward and listing the valid ones; a
    missing required one, a value of the wrong type (a string for a number, a bool for an int) or out of
    range (e.g. soft_overlong's cache > max_length, a format pattern that is not a regex) raises a
    ValueError naming the reward and the hyperparameter. Values are range-checked by calling the reward
    once on zero rows.

    Args:
      name: a name from `names()` other than "reward_model" (build that one with `reward_model(...)`).
      **hparams: hyperparameters, e.g. max_length=512, cache=128.

    Returns:
      The reward with its hyperparameters bound (a `functools.partial`).
    """
    fn = get(name)
    if name in FACTORIES:
        raise ValueError(
            f"reward {name!r} is built from objects, not hyperparameters: call "
            "rewards.reward_model(model=..., params=..., tokenizer=..., layout=..., batch_size=..., "
            "relative=...) with the trained reward "
            "model (the pipeline loads it from the reward-model stage) and pass the result to combine()"
        )
    valid = hyperparameters(name)
    unknown = sorted(set(hparams) - set(valid))
    if unknown:
        listed = ", ".join(k if v is inspect.Parameter.empty else f"{k}={v!r}" for k, v in valid.items())
        raise ValueError(
            f"reward {name!r} has no hyperparameter(s) {unknown}; "
            f"its hyperparameters are {listed or '(none)'}"
        )
    missing = [k for k in required_hyperparameters(name) if k not in hparams]
    if missing:
        raise ValueError(f"reward {name!r} needs hyperparameter(s) {missing}")
    hints = typing.get_type_hints(fn)
    for key, value in hparams.items():
        _check_type(name, key, value, hints[key])
    bound = functools.partial(fn, **hparams)
    empty = {c: [] for c in COLUMNS if c not in ("prompts", "completions")}
    bound(prompts=[], completions=[], **empty)  # zero rows: only the reward's own range checks run
    return bound
