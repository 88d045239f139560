"""`--config.a.b=value` overrides for an experiment's ConfigDict, with clear errors.

A key that does not exist stops the launch with the nearest existing keys; a value that does not
parse as the existing value's type stops it with the key, the value and the type expected. Keys that
were renamed (`RENAMED`) still work, with a warning naming the new key.
"""

from __future__ import annotations

import ast
import difflib
import inspect
import sys

import ml_collections


class ConfigError(ValueError):
    """An override names an unknown key or gives a value of the wrong type."""


# Old key -> the key it became. The reward model's kind had three names (one per pipeline); it has one.
RENAMED = {"rso.reward_kind": "rm.kind", "inpo.oracle": "rm.kind", "reward_kind": "rm.kind"}


def flat_keys(config: ml_collections.ConfigDict, prefix: str = "") -> dict[str, object]:
    """All leaf keys of a (nested) ConfigDict as dotted paths, with their current values."""
    out = {}
    for key in sorted(config.keys()):
        value = config[key]
        path = f"{prefix}{key}"
        if isinstance(value, ml_collections.ConfigDict):
            out.update(flat_keys(value, path + "."))
        else:
            out[path] = value
    return out


def _parse(key: str, text: str, current, declared_type):
    want = declared_type if declared_type is not None else type(current)
    if want is bool:
        low = text.strip().lower()
        if low in ("true", "1", "yes"):
            return True
        if low in ("false", "0", "no"):
            return False
        raise ConfigError(f"--config.{key}={text}: expected a bool (true/false)")
    if want is int:
        try:
            return int(text)
        except ValueError:
            raise ConfigError(f"--config.{key}={text}: expected an int") from None
    if want is float:
        try:
            return float(text)
        except ValueError:
            raise ConfigError(f"--config.{key}={text}: expected a float") from None
    if want is str:
        return text
    if want in (tuple, list):
        try:
            value = ast.literal_eval(text)
        except (ValueError, SyntaxError):
            value = tuple(p.strip() for p in text.split(",") if p.strip())
        if not isinstance(value, (tuple, list)):
            value = (value,)
        return want(value)
    # Unknown or None-typed field: a Python literal if it parses, else the string itself.
    try:
        return ast.literal_eval(text)
    except (ValueError, SyntaxError):
        return text


def apply_overrides(config: ml_collections.ConfigDict, overrides: list[str]) -> ml_collections.ConfigDict:
    """Applies `--config.a.b=value` strings to a copy of `config` and returns it.

    Raises:
      ConfigError: for a malformed override, an unknown key (listing the closest keys and where to
        see them all), or a value that does not parse as the key's type.
    """
    config = ml_collections.ConfigDict(config.to_dict(), type_safe=False)
    overrides = _loss_name_first(config, overrides)
    known = flat_keys(config)
    for item in overrides:
        if not item.startswith("--config."):
            raise ConfigError(f"unrecognised argument {item!r}: overrides look like --config.train.steps=100")
        body = item[len("--config.") :]
        if "=" not in body:
            raise ConfigError(f"override {item!r} has no value: write --config.{body}=VALUE")
        key, text = body.split("=", 1)
        if key in RENAMED and key not in known and RENAMED[key] in known:
            print(f"warning: --config.{key} is deprecated; it sets --config.{RENAMED[key]}", file=sys.stderr)
            key = RENAMED[key]
        if key.startswith("rewards.") and key not in known and "rewards" in config:
            known[key] = _reward_default(config, key)
        if key.startswith("loss.") and key not in known and "loss" in config:
            known[key] = _loss_default(config.loss.name, key[len("loss.") :])
            config.loss[key[len("loss.") :]] = known[key]
        if key.startswith("model.") and key not in known and "model" in config:
            field = key[len("model.") :]
            default = _model_default(config.model.get("preset", "small"), field)
            if default is not _MISSING:
                known[key] = default
                config.model[field] = default
        if key not in known:
            close = difflib.get_close_matches(key, list(known), n=5, cutoff=0.5)
            hint = f" Did you mean: {', '.join(close)}?" if close else ""
            raise ConfigError(f"unknown config key {key!r}.{hint} Known keys: {', '.join(known)}")
        current = known[key]
        declared = None if current is None else type(current)
        value = _parse(key, text, current, declared)
        node = config
        *parents, leaf = key.split(".")
        for p in parents:
            node = node[p]
        node[leaf] = value
        known[key] = value
    return config


def _loss_name_first(config: ml_collections.ConfigDict, overrides: list[str]) -> list[str]:
    """Handles `--config.loss.name=X` before the rest: switching the loss resets its hyperparameters
    to X's defaults, so `--config.loss.name=hinge --config.loss.gamma=0.1` needs no stale `beta` removed."""
    if "loss" not in config:
        return overrides
    rest = []
    for item in overrides:
        if item.startswith("--config.loss.name="):
            name = item.split("=", 1)[1]
            if name != config.loss.name:
                from rlhf_jax import losses

                try:
                    defaults = losses.hyperparameters(name)
                except ValueError as e:
                    raise ConfigError(f"--config.loss.name={name}: {e}") from None
                config.loss = ml_collections.ConfigDict(
                    {"name": name, **{k: v for k, v in defaults.items() if v is not None}}, type_safe=False
                )
        else:
            rest.append(item)
    return rest


def _loss_default(name: str, key: str):
    """The default of hyperparameter `key` of loss `name` (raises ConfigError naming the valid ones)."""
    from rlhf_jax import losses

    hparams = losses.hyperparameters(name)
    if key not in hparams:
        valid = ", ".join(f"loss.{k}" for k in hparams) or "(none)"
        raise ConfigError(f"loss {name!r} has no hyperparameter {key!r}; its hyperparameters: {valid}")
    return hparams[key]


_MISSING = object()


def _model_default(preset: str, field: str):
    """The preset's value of ModelConfig field `field` (any architecture field is overridable)."""
    import dataclasses

    from rlhf_jax import models

    cfg = models.PRESETS.get(preset)
    if cfg is None or field not in {f.name for f in dataclasses.fields(cfg)}:
        return _MISSING
    return getattr(cfg, field)


def _reward_default(config: ml_collections.ConfigDict, key: str):
    """Adds a reward (`rewards.NAME.weight`, weight 1 until set) or one of its hyperparameters
    (`rewards.NAME.HPARAM`, its default) to `config.rewards`; returns the key's current value."""
    from rlhf_jax import rewards

    parts = key.split(".")
    if len(parts) != 3:
        raise ConfigError(f"--config.{key}: reward keys look like rewards.NAME.weight or rewards.NAME.HPARAM")
    _, name, field = parts
    if name not in rewards.names():
        raise ConfigError(f"--config.{key}: unknown reward {name!r}; rewards: {', '.join(rewards.names())}")
    hparams = rewards.hyperparameters(name)
    if field != "weight" and field not in hparams:
        valid = ", ".join(["weight", *hparams])
        raise ConfigError(f"--config.{key}: reward {name!r} has no {field!r}; its keys: {valid}")
    if name not in config.rewards:
        config.rewards[name] = ml_collections.ConfigDict({"weight": 1.0}, type_safe=False)
    if field not in config.rewards[name]:
        default = hparams[field]
        config.rewards[name][field] = None if default is inspect.Parameter.empty else default
    return config.rewards[name][field]
