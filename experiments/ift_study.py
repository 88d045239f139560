"""Study: IFT (Intuitive Fine-Tuning, arXiv 2405.11870) vs plain SFT at equal steps, on TL;DR and arith.

    python -m launch.study --study=ift_study --seeds=3
    python -m launch.study --study=ift_study:smoke --seeds=1

Four rows: `ift_tldr` and `ift_arith` with `sft.objective` "nll" (SFT) and "ift" (λ = 0.2, γ = 0.95),
everything else equal (data, steps, batch, learning rate, seed); each IFT row is paired over seeds with
the SFT row of its task. Metrics are the SFT policy's: on TL;DR the mean gold reward of its samples on
held-out prompts (`gold_reward_sft`) and their length; on arith its held-out greedy accuracy
(`accuracy_sft`, as `rft_study` reports). A metric a task does not report is blank in the other's rows.
The one GRPO iteration each experiment runs after SFT is ignored.
"""

from experiments import Method, Study

# (row, experiment, objective)
_ROWS = (
    ("sft_tldr", "ift_tldr", "nll"),
    ("ift_tldr", "ift_tldr", "ift"),
    ("sft_arith", "ift_arith", "nll"),
    ("ift_arith", "ift_arith", "ift"),
)
METRICS = ("gold_reward_sft", "mean_response_length_sft", "accuracy_sft")


def get_study(arg=None):
    suffix = ":smoke" if arg == "smoke" else ""
    return Study(
        name="ift_study",
        methods=tuple(
            Method(name, experiment + suffix, {"sft.objective": objective})
            for name, experiment, objective in _ROWS
        ),
        metrics=METRICS,
        note="IFT vs SFT at equal steps (arXiv 2405.11870): the SFT policy's gold reward on TL;DR and held-out "
        "accuracy on arith; each ift row paired with its task's sft row over seeds.",
        baseline={"ift_tldr": "sft_tldr", "ift_arith": "sft_arith"},
    )
