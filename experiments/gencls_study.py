"""Study: classification as generation (GenCLS++, arXiv 2504.19898; PPO for NLU, arXiv 2410.11020) on the
embedded synthetic k-class task, the issue's claims in miniature.

    python -m launch.study --study=gencls_study --seeds=3
    python -m launch.study --study=gencls_study:smoke --seeds=1

Every row starts from the same SFT policy per seed when its prompt strategy is the same (the
`gencls_synthetic` SFT stage, shared by fingerprint) and is evaluated on the same held-out texts.
Compared (paired over seeds, each seed's numbers already paired over examples):

* SFT → RL beats SFT alone (GenCLS++'s central claim): `accuracy_generate_vs_sft` and
  `accuracy_ppl_vs_sft` of the `grpo` row (each seed's RL policy minus its SFT policy).
* PPO vs GRPO at the same sample budget (PPO for NLU's choice of algorithm): `ppo` (128 prompts × 1
  sample, a critic from the SFT trunk, GAE, β = 0.02) against `grpo` (16 prompts × 8).
* Perplexity decoding vs free generation: `accuracy_ppl_vs_generate` of each row.
* Direct answers vs "reason first" (GenCLS++: classification is better without explicit reasoning):
  `reason` against `grpo`.
* Numeric vs named labels: `numeric` (labels "1".."k" in training and evaluation) against `grpo`.
"""

from experiments import Method, Study

# (row, overrides of gencls_synthetic, baseline row)
_ROWS = (
    ("grpo", {}, None),
    ("ppo", {"grpo.estimator": "gae", "grpo.num_prompts": 128, "grpo.group_size": 1}, "grpo"),
    (
        "reason",
        {
            "cls.train_prompt": "reason",
            "cls.eval_prompt": "reason",
            "grpo.max_new_tokens": 24,
            "cls.max_new_tokens": 24,
        },
        "grpo",
    ),  # fmt: skip
    ("numeric", {"cls.train_prompt": "numeric", "cls.eval_prompt": "numeric"}, "grpo"),
)
SMOKE = {"ppo": {"grpo.num_prompts": 16}}  # the :smoke loop's 4 prompts × 4 samples, as 16 × 1
METRICS = (
    "accuracy_generate",
    "accuracy_generate_vs_sft",
    "accuracy_ppl",
    "accuracy_ppl_vs_sft",
    "accuracy_ppl_vs_generate",
    "accuracy_generate_sft",
    "unparseable_frac",
)


def get_study(arg=None):
    smoke = arg == "smoke"
    suffix = ":smoke" if smoke else ""
    return Study(
        name="gencls_study",
        methods=tuple(
            Method(name, "gencls_synthetic" + suffix, {**overrides, **(SMOKE.get(name, {}) if smoke else {})})
            for name, overrides, _ in _ROWS
        ),
        metrics=METRICS,
        note="Classification as generation on the synthetic 4-class task: held-out accuracy by greedy "
        "generation and by perplexity decoding, each RL policy against its seed's SFT policy (paired over "
        "examples), perplexity minus generation; rows paired with the row named in "
        "experiments/gencls_study.py.",
        baseline={name: base for name, _, base in _ROWS if base},
    )
