"""Study: GFlowNet trajectory balance vs GRPO on `arith` (issue 19 part 4: does TB sample correct
solutions with more diversity than GRPO at the same budget?).

    python -m launch.study --study=gflownet_study --seeds=3
    python -m launch.study --study=gflownet_study:smoke --seeds=1

Both rows start from the same SFT policy per seed (the `grpo_arith` SFT stage, shared by fingerprint),
run 30 iterations of 16 prompts × 8 samples (GFlowNet adds 64 replayed correct rows per iteration) and
are evaluated on the same held-out problems with k = 8 samples each. Compared: held-out greedy accuracy,
pass@k and `distinct_correct` (the mean number of distinct correct texts among the k samples of a
problem), `gflownet` paired with `grpo` over seeds.
"""

from experiments import Method, Study

# (row, experiment, overrides, baseline row)
_ROWS = (
    ("grpo", "grpo_arith", {"eval.k": 8}, None),
    ("gflownet", "gflownet_arith", {}, "grpo"),
)
METRICS = (
    "accuracy",
    "accuracy_gain",
    "pass_at_k",
    "distinct_correct",
    "mean_response_length",
    "kl_to_sft",
)


def get_study(arg=None):
    smoke = arg == "smoke"
    suffix = ":smoke" if smoke else ""
    return Study(
        name="gflownet_study",
        methods=tuple(
            Method(name, experiment + suffix, {} if smoke else overrides)
            for name, experiment, overrides, _ in _ROWS
        ),
        metrics=METRICS,
        note="GFlowNet trajectory balance vs GRPO on arith: held-out greedy accuracy, pass@k and distinct "
        "correct solutions among k samples per problem; gflownet paired with grpo over seeds.",
        baseline={name: base for name, _, _, base in _ROWS if base},
    )
