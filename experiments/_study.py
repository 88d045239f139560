"""What a study is: methods (an experiment plus config overrides each) and the metrics to tabulate.

A study file `experiments/NAME.py` defines `get_study(arg)` returning a `Study`; `python -m launch.study
--study=NAME` runs it. A method's overrides are a dict of dotted config keys to Python values,
`Method("dpo_direct", "rso_tldr", {"rso.pairs": "direct", "loss.name": "sigmoid_norm"})`, never command
line text: the launcher turns them into the run's config, so experiment files never import it.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping

# The values an override may hold: what an experiment's ConfigDict leaves hold (tuples of them included).
_SCALARS = (bool, int, float, str, type(None))


def _check_value(method: str, key: str, value) -> None:
    """Raises TypeError unless `value` is a scalar or a (nested) tuple of scalars."""
    if isinstance(value, tuple):
        for item in value:
            _check_value(method, key, item)
    elif not isinstance(value, _SCALARS):
        raise TypeError(
            f"method {method!r}: override {key!r} = {value!r} is a {type(value).__name__}; values are "
            "bool, int, float, str, None or tuples of them"
        )


@dataclasses.dataclass(frozen=True)
class Method:
    """One row of a study: `experiment` (NAME[:VARIANT]) run with `overrides`.

    Attributes:
      name: the row's name (its run directory under each seed).
      experiment: the experiment the row runs, e.g. "rso_tldr:smoke".
      overrides: {dotted config key: value}, e.g. {"loss.name": "hinge", "train.learning_rate": 1e-4},
        given as any mapping and stored as a tuple of (key, value) pairs sorted by key, so a method is
        immutable and hashable; `dict(method.overrides)` gives the mapping back.
    """

    name: str
    experiment: str
    overrides: Mapping[str, object] | tuple[tuple[str, object], ...] = ()

    def __post_init__(self):
        given = self.overrides
        if not isinstance(given, Mapping):
            if isinstance(given, tuple) and all(isinstance(p, tuple) and len(p) == 2 for p in given):
                given = dict(given)  # already the stored form (e.g. dataclasses.replace)
            else:
                raise TypeError(
                    f"method {self.name!r}: overrides are a dict of dotted config keys to values, e.g. "
                    f"{{'loss.name': 'dpo', 'train.learning_rate': 1e-4}}, not {given!r}"
                )
        for key, value in given.items():
            if not isinstance(key, str) or not key or key.startswith(("-", "config.")) or "=" in key:
                raise ValueError(
                    f"method {self.name!r}: override key {key!r} is not a dotted config key such as "
                    "'loss.beta' (no '--config.' prefix, no '=value')"
                )
            _check_value(self.name, key, value)
        object.__setattr__(self, "overrides", tuple(sorted(given.items())))


@dataclasses.dataclass(frozen=True)
class Study:
    """Attributes:
    name: the study's name.
    methods: the rows, run with matched budgets.
    metrics: results.json keys to tabulate (the first one is plotted); with `curve`, also `KEY@X`: the
      curve's KEY at the point whose x key equals X (e.g. "win_rate_vs_sft_gold@244", a run's gold win
      rate after 244 steps), tabulated and paired like any other metric.
    curve: optional (file, x key, y keys) of a per-run JSONL curve to plot instead of bars.
    note: what the study checks, printed above the table.
    baseline: the row each method is compared with, paired over seeds: a method name (every other row's
      baseline), "" for the first method, or a mapping {method: its baseline} for per-group baselines
      (e.g. DPO at the same label-flip rate); a method missing from the mapping has no comparison.
    """

    name: str
    methods: tuple[Method, ...]
    metrics: tuple[str, ...]
    curve: tuple[str, str, tuple[str, ...]] | None = None
    note: str = ""
    baseline: str | Mapping[str, str] = ""

    def __post_init__(self):
        names = [m.name for m in self.methods]
        pairs = self.baseline.items() if isinstance(self.baseline, Mapping) else [("", self.baseline)]
        for method, base in pairs:
            for role, name in (("method", method), ("baseline", base)):
                if name and name not in names:
                    raise ValueError(
                        f"study {self.name!r}: {role} {name!r} in `baseline` is not one of its methods "
                        f"{names}"
                    )
            if method and method == base:
                raise ValueError(f"study {self.name!r}: method {method!r} is its own baseline")

    def baseline_of(self, method: str) -> str | None:
        """The method `method` is compared with (None for a baseline row or one without a comparison)."""
        if isinstance(self.baseline, Mapping):
            return self.baseline.get(method)
        base = self.baseline or (self.methods[0].name if self.methods else "")
        return None if method == base else base
