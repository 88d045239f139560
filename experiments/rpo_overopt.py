"""Study: DPO vs RPO (DPO + η·β·NLL of the chosen response) as training goes long, with the controls that
say which part of RPO's gain is the regulariser.

    python -m launch.study --study=rpo_overopt --seeds=3
    python -m launch.study --study=rpo_overopt:smoke --seeds=1

Liu et al. 2024 ("Provably Mitigating Overoptimization in RLHF") claim the SFT term keeps the policy
from over-optimising the learned reward: the proxy reward keeps rising while the gold reward falls for
DPO, less so for RPO. Both train on the human pairs for a long budget, evaluated every `eval_every`
steps by the proxy reward model and the gold reward (curves in plot.png, from each run's
policy/eval_curve.jsonl), on 64 held-out prompts × 2 samples (the smoke variant: 8).

The first run of this study (rows `dpo`, `rpo`) found RPO far ahead of DPO by gold, but DPO had
collapsed at lr 3e-4 and there was no control. The controls:

* `sft_chosen`: the chosen responses' NLL alone (loss `chosen_nll`), the same steps and learning rate:
  is RPO just SFT on the chosen responses? Paired with `rpo`.
* `dpo_lr1e-4`, `dpo_lr3e-5`: DPO at lower learning rates, bracketing the KL from the SFT policy that RPO
  ends at (~1 nat in the first run): is RPO's gain only a smaller step? Paired with `rpo`.
* `rpo_eta0.1`, `rpo_eta0.005` (0.005 is the η of the authors' recipes; `rpo` is η = 1): how the gain
  scales with the regulariser's weight. Paired with `dpo`.

Each seed draws its own synthetic data and evaluation prompts (`data.vary_with_seed`). Besides the final
metrics, the table has the curve's values as `KEY@STEP` metrics, paired like the final ones: the win
rates after the first evaluation (step 100), and the policy's mean gold and proxy reward at the first
and the last (is the gold reward falling while the proxy reward rises?).
"""

from experiments import Method, Study

_LONG = {"rso.pairs": "direct", "train.steps": 400, "train.eval_every": 100, "train.learning_rate": 3e-4,
         "eval.num_prompts": 64, "data.vary_with_seed": True}  # fmt: skip
_SMOKE = {"rso.pairs": "direct", "train.steps": 6, "train.eval_every": 3}
_DPO = {"loss.name": "dpo", "loss.beta": 0.1}
_ROWS = (
    ("dpo", _DPO, None),
    ("rpo", {"loss.name": "rpo", "loss.beta": 0.1, "loss.eta": 1.0}, "dpo"),
    ("rpo_eta0.1", {"loss.name": "rpo", "loss.beta": 0.1, "loss.eta": 0.1}, "dpo"),
    ("rpo_eta0.005", {"loss.name": "rpo", "loss.beta": 0.1, "loss.eta": 0.005}, "dpo"),
    ("sft_chosen", {"loss.name": "chosen_nll"}, "rpo"),
    ("dpo_lr1e-4", {**_DPO, "train.learning_rate": 1e-4}, "rpo"),
    ("dpo_lr3e-5", {**_DPO, "train.learning_rate": 3e-5}, "rpo"),
)


_CURVE_KEYS = ("proxy_reward_policy", "gold_reward_policy")
_FINAL = ("win_rate_vs_sft_gold", "win_rate_vs_sft_proxy", "kl_to_sft")


def get_study(arg=None):
    smoke = arg == "smoke"
    experiment = "rso_tldr:smoke" if smoke else "rso_tldr"
    common = _SMOKE if smoke else _LONG
    first, last = common["train.eval_every"], common["train.steps"]
    per_step = (
        *(f"{key}@{first}" for key in _FINAL[:2]),
        *(f"{key}@{step}" for key in ("gold_reward_policy", "proxy_reward_policy") for step in (first, last)),
    )
    return Study(
        name="rpo_overopt",
        methods=tuple(Method(name, experiment, {**common, **overrides}) for name, overrides, _ in _ROWS),
        metrics=(*_FINAL, *per_step),
        curve=("policy/eval_curve.jsonl", "step", _CURVE_KEYS),
        note="Over-optimisation: proxy vs gold reward over training steps (plot), final win rates (table) on "
        f"{8 if smoke else 64} held-out prompts × 2 samples per run; RPO at each η paired with DPO, the "
        "controls (SFT on the chosen responses, DPO at lower learning rates) paired with RPO (η = 1). "
        f"KEY@STEP is the value after STEP steps (the last, {last}, is the final evaluation).",
        baseline={name: base for name, _, base in _ROWS if base},
    )
