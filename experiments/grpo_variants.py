"""Study: GRPO, Dr. GRPO, DAPO and RLOO on the synthetic math task `arith`, and three claims about them.

    python -m launch.study --study=grpo_variants --seeds=3
    python -m launch.study --study=grpo_variants:smoke --seeds=1

Every row starts from the same SFT policy per seed (the `grpo_arith` SFT stage, shared by fingerprint)
and runs the same number of iterations of P = 16 prompts × G = 8 samples; rows differ only in the
overrides below. Paired comparisons (the same seed's SFT policy and evaluation problems) check:

* Dr. GRPO (Liu et al. 2025, arXiv 2503.20783, Sec. 3.1): GRPO's per-sequence normalisation
  (`aggregation="grpo"`, 1/|o_i|) and std scaling bias the update toward longer wrong answers; Dr. GRPO
  removes both. Compared: `dr_grpo` against `grpo_seqmean` on `mean_length_wrong` (the length of the
  policy's sampled answers the checker rejects) and accuracy.
* DAPO (Yu et al. 2025, arXiv 2503.14476, Sec. 3.1-3.2): clip-higher (ε_high = 0.28) keeps the policy's
  entropy from collapsing (`dapo` against `dapo_symmetric_clip`, ε_high = ε_low = 0.2, on
  `entropy_final`); dynamic sampling improves sample efficiency (`dapo` against `dapo_no_dynamic` on
  accuracy at the same number of updates, with `samples_generated` showing what the extra draws cost).
* Light-R1 (Wen et al. 2025, arXiv 2503.10460) and INTELLECT-2's two-sided clip (TRL `delta`): with
  μ > 1 updates per batch, capping the ratio of negative-advantage tokens at δ keeps training stable.
  Compared: `grpo_mu2_two_sided` (μ = 2, δ = 1.5) against `grpo_mu2` (μ = 2, no cap).

`grpo`, `dapo` and `rloo` are the experiments as they stand (`grpo_arith`, `dapo_arith`, `rloo_arith`),
each compared with `grpo`. The smoke variant runs the `:smoke` experiments (seconds each; numbers are
meaningless at those sizes).
"""

from experiments import Method, Study

# (row, experiment, overrides, baseline row)
_ROWS = (
    ("grpo", "grpo_arith", {}, None),
    ("grpo_seqmean", "grpo_arith", {"grpo.aggregation": "grpo"}, "grpo"),
    ("dr_grpo", "dr_grpo_arith", {}, "grpo_seqmean"),
    ("dapo", "dapo_arith", {}, "grpo"),
    ("dapo_symmetric_clip", "dapo_arith", {"grpo.epsilon_high": 0.0}, "dapo"),
    ("dapo_no_dynamic", "dapo_arith", {"grpo.dynamic_sampling": False}, "dapo"),
    ("rloo", "rloo_arith", {}, "grpo"),
    ("grpo_mu2", "grpo_arith", {"grpo.num_iterations": 2}, "grpo"),
    ("grpo_mu2_two_sided", "grpo_arith", {"grpo.num_iterations": 2, "grpo.delta": 1.5}, "grpo_mu2"),
)
METRICS = (
    "accuracy_gain",
    "accuracy",
    "mean_length_wrong",
    "mean_length_correct",
    "entropy_final",
    "samples_generated",
    "kl_to_sft",
)


def get_study(arg=None):
    smoke = arg == "smoke"
    suffix = ":smoke" if smoke else ""
    return Study(
        name="grpo_variants",
        methods=tuple(
            Method(name, experiment + suffix, overrides) for name, experiment, overrides, _ in _ROWS
        ),
        metrics=METRICS,
        note="GRPO family on arith: accuracy gain over each seed's SFT policy (greedy, held-out), length of "
        "sampled wrong/correct answers (Dr. GRPO's claim), entropy over the last 5 iterations (DAPO's "
        "clip-higher), samples generated (dynamic sampling's cost); rows paired with the row named in "
        "experiments/grpo_variants.py.",
        baseline={name: base for name, _, _, base in _ROWS if base},
    )
