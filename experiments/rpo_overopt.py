"""Study: DPO vs RPO (DPO + η·β·NLL of the chosen response) as training goes long.

    python -m launch.study --study=rpo_overopt --seeds=3
    python -m launch.study --study=rpo_overopt:smoke --seeds=1

Liu et al. 2024 ("Provably Mitigating Overoptimization in RLHF") claim the SFT term keeps the policy
from over-optimising the learned reward: the proxy reward keeps rising while the gold reward falls for
DPO, less so for RPO. Both train on the human pairs for a long budget, evaluated every `eval_every`
steps by the proxy reward model and the gold reward (curves in plot.png, from each run's
policy/eval_curve.jsonl), on 64 held-out prompts × 2 samples (the smoke variant: 8). RPO is paired with
DPO, the baseline it modifies.
"""

from experiments import Method, Study

_LONG = {"rso.pairs": "direct", "train.steps": 400, "train.eval_every": 100, "train.learning_rate": 3e-4,
         "eval.num_prompts": 64}  # fmt: skip
_SMOKE = {"rso.pairs": "direct", "train.steps": 6, "train.eval_every": 3}


def get_study(arg=None):
    smoke = arg == "smoke"
    experiment = "rso_tldr:smoke" if smoke else "rso_tldr"
    common = _SMOKE if smoke else _LONG
    return Study(
        name="rpo_overopt",
        methods=(
            Method("dpo", experiment, {**common, "loss.name": "dpo", "loss.beta": 0.1}),
            Method("rpo", experiment, {**common, "loss.name": "rpo", "loss.beta": 0.1, "loss.eta": 1.0}),
        ),
        metrics=("win_rate_vs_sft_gold", "win_rate_vs_sft_proxy", "kl_to_sft"),
        curve=("policy/eval_curve.jsonl", "step", ("proxy_reward_policy", "gold_reward_policy")),
        note="Over-optimisation: proxy vs gold reward over training steps (plot), final win rates (table) on "
        f"{8 if smoke else 64} held-out prompts × 2 samples per run; RPO paired with DPO.",
        baseline="dpo",
    )
