"""Study: EPO (turn-level REINFORCE, arXiv 2502.12486) against its SFT starting point, over seeds.

    python -m launch.study --study=epo_study --seeds=3
    python -m launch.study --study=epo_study:smoke --seeds=1

Rows: `epo` is `epo_hh` at full size: each seed trains its own SFT policy on the demonstrations, then
EPO from it, and evaluates both on the same held-out slip-free dialogues with the same sampling keys (the
task data and the evaluation dialogues do not depend on the seed). `turn_reward_gain` is each seed's
paired difference EPO − SFT of the mean per-turn reward over those dialogues, so its interval over seeds
is the paired comparison of EPO with its own SFT policy (the SFT policy is not a row of its own: its
numbers are `turn_reward_sft`, and `turn_reward_epo` is EPO's). `epo_nonneg` is the same with
`epo.reward_shift=1`: the ±1 training rewards become {0, 2}, so no return is negative and no turn's
log-probability is pushed down (EPO as a return-weighted SFT); it shares each seed's SFT stage and
evaluation keys with `epo`, and is paired with it.
"""

from experiments import Method, Study

METRICS = ("turn_reward_gain", "turn_reward_sft", "turn_reward_epo", "turn_accuracy_sft", "turn_accuracy_epo")


def get_study(arg=None):
    suffix = ":smoke" if arg == "smoke" else ""
    return Study(
        name="epo_study",
        methods=(
            Method("epo", "epo_hh" + suffix, {}),
            Method("epo_nonneg", "epo_hh" + suffix, {"epo.reward_shift": 1.0}),
        ),
        metrics=METRICS,
        note="EPO from its SFT policy on multi-turn dialogues with a per-turn reward: turn_reward_gain is "
        "each seed's paired EPO - SFT difference of the mean per-turn reward on the same held-out dialogues; "
        "epo_nonneg shifts the +-1 training rewards to {0, 2} (no negative returns).",
        baseline={"epo_nonneg": "epo"},
    )
