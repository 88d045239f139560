"""Study: OpenMathInstruct-2's finding in miniature — SFT on `arith` demonstrations with 0/10/20/40% wrong.

    python -m launch.study --study=rft_study --seeds=3
    python -m launch.study --study=rft_study:smoke --seeds=1

OpenMathInstruct-2 (Toshniwal et al. 2024, arXiv 2410.01560, Sec. 3) finds SFT robust to a share of
solutions with wrong answers. Rows are the `grpo_arith` experiment with `data.arith_error_rate` p ∈ {0,
0.1, 0.2, 0.4} (each demonstration independently carries one propagated arithmetic slip with probability
p; the slipped sets are nested and the evaluation problems do not depend on p, so rows pair per seed).
The metric is `accuracy_sft`: the SFT policy's held-out accuracy, each row paired with the 0% row. (The
pipeline also runs one GRPO iteration, `grpo.iterations=1`, whose results this study ignores.)

Rows `rft_1` and `rft_2` are `rft_arith` (rejection-sampling fine-tuning, `pipelines.rft`) with K = 1 and
2 rounds on the 0% data: their SFT stage is the `sft_wrong_0` row's (shared by fingerprint, so their
`accuracy_sft` equals that row's, paired difference exactly 0: a check that the rows pair), and `rft_2`
reuses `rft_1`'s first round. Their metric is `accuracy_vs_sft`: per seed, the RFT policy's held-out
greedy accuracy minus the SFT policy's on the same problems, so its interval over seeds is the paired
per-seed comparison of RFT against the SFT row (the SFT rows have no such key: n/a).
"""

from experiments import Method, Study

_RATES = (("sft_wrong_0", 0.0), ("sft_wrong_10", 0.1), ("sft_wrong_20", 0.2), ("sft_wrong_40", 0.4))
_RFT_ROUNDS = (("rft_1", 1), ("rft_2", 2))
METRICS = ("accuracy_sft", "accuracy_vs_sft")


def get_study(arg=None):
    suffix = ":smoke" if arg == "smoke" else ""
    return Study(
        name="rft_study",
        methods=tuple(
            Method(name, "grpo_arith" + suffix, {"data.arith_error_rate": rate, "grpo.iterations": 1})
            for name, rate in _RATES
        )
        + tuple(Method(name, "rft_arith" + suffix, {"rft.rounds": k}) for name, k in _RFT_ROUNDS),
        metrics=METRICS,
        note="SFT on arith with a share of wrong demonstrations (OpenMathInstruct-2, arXiv 2410.01560): the SFT "
        "policy's held-out accuracy, each row paired with the 0% row. RFT after 1 and 2 rounds from the 0% SFT "
        "policy: accuracy_vs_sft is each seed's paired difference RFT - SFT on the same problems.",
        baseline={name: "sft_wrong_0" for name, _ in (*_RATES[1:], *_RFT_ROUNDS)},
    )
