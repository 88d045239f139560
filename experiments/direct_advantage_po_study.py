"""Study: Direct Advantage Policy Optimization (arXiv 2412.18279; not ByteDance's DAPO) on `arith`, one
and two offline rounds, against GRPO at a matched sampling budget.

    python -m launch.study --study=direct_advantage_po_study --seeds=3
    python -m launch.study --study=direct_advantage_po_study:smoke --seeds=1

Every row starts from the same SFT policy per seed (the `grpo_arith` SFT stage, shared by fingerprint)
and is evaluated on the same held-out problems, so each row's `accuracy_gain` is the paired difference
against that SFT policy on the same problems (the SFT-baseline row of the comparison; `accuracy_sft` is
the SFT policy's own accuracy). Rows: `dapo_1round` (`direct_advantage_po_arith`), `dapo_2rounds` (the
same with `direct_advantage_po.rounds=2`, round 1 shared with `dapo_1round` by fingerprint, paired with
it over seeds), and `grpo_matched` (`grpo_arith` with 13 iterations, paired with `dapo_1round`).

Budget matching (sampled tokens): one full-size round of `direct_advantage_po_arith` sampled 3,416
sequences and 52,150 tokens (rollouts, MC completions and next steps; seed 0, `samples_generated` and
`sampled_tokens` in results.json), and a GRPO iteration samples 16 × 8 completions of about 31 tokens
(~4,000 tokens), so 13 iterations (~52k tokens, 1,664 sequences) match one round's sampled tokens; by
sequences the match would be 27 iterations. Every row reports `samples_generated`, so the match can be
checked per seed; it is approximate (the tokens per sample vary with the policy).
"""

from experiments import Method, Study

# (row, experiment, overrides, baseline row)
_ROWS = (
    ("dapo_1round", "direct_advantage_po_arith", {}, None),
    ("dapo_2rounds", "direct_advantage_po_arith", {"direct_advantage_po.rounds": 2}, "dapo_1round"),
    ("grpo_matched", "grpo_arith", {"grpo.iterations": 13}, "dapo_1round"),
)
METRICS = ("accuracy", "accuracy_gain", "accuracy_sft", "pass_at_k", "kl_to_sft", "samples_generated")


def get_study(arg=None):
    smoke = arg == "smoke"
    suffix = ":smoke" if smoke else ""
    return Study(
        name="direct_advantage_po_study",
        methods=tuple(
            Method(
                name, experiment + suffix, {k: v for k, v in overrides.items() if not smoke or "rounds" in k}
            )
            for name, experiment, overrides, _ in _ROWS
        ),
        metrics=METRICS,
        note="Direct Advantage PO (1 and 2 offline rounds) vs GRPO at matched sampled tokens on arith: "
        "held-out greedy accuracy and its paired gain over the shared SFT policy.",
        baseline={name: base for name, _, _, base in _ROWS if base},
    )
