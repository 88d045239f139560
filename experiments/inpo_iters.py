"""Study: INPO iterations 1..T against iterative DPO with the same sampling and oracle, INPO at the
paper's η and at an η matched to iterative DPO's regularisation.

    python -m launch.study --study=inpo_iters --seeds=3
    python -m launch.study --study=inpo_iters:smoke --seeds=1

Zhang et al. 2024 claim INPO improves over the iterations and beats iterative DPO (each iteration's
reference = the previous iterate) under the same oracle. Both start from the same SFT policy and oracle
(trained once per seed); the plot shows the gold- and proxy-reward win rates per iteration
(iterations.jsonl). Each iteration is evaluated on 64 held-out prompts × 2 samples (the smoke variant: 8)
and trains on 128 prompts × 8 samples. The baseline of the paired comparisons is iterative DPO: the
claim is that INPO beats it, so INPO − iterative DPO > 0, resolved, is what would support the claim.

The mapping of η to β. With the previous iterate as its anchor, INPO's loss (h_t − 1/(2η))² is IPO's
with τ = η (`losses.inpo` reduces to `losses.ipo` with β = η): it regresses the log-ratio margin h_t onto
the target 1/(2η). Azar et al. 2023 (IPO) give τ the role DPO's β plays (both weight the KL term of the
same regularised objective; DPO's sigmoid has no fixed target, IPO's square makes the target explicit),
so the INPO matched to iterative DPO at β = 0.1 has η = β = 0.1: target margin 1/(2η) = 5 nats. The
paper's η = 0.005 sets a target of 100 nats, a much weaker anchor, which the first run of this study ran
at (the confound its README section named). Rows: `inpo` (η = 0.005, τ = η/3, the paper's),
`inpo_eta0.1` (η = 0.1, τ = η/3), `iterative_dpo` (β = 0.1). Each seed draws its own synthetic data and
evaluation prompts (`data.vary_with_seed`).
"""

from experiments import Method, Study

MATCHED_ETA = 0.1  # = iterative DPO's β: INPO's target margin 1/(2η) = 5 nats (see the docstring)


def get_study(arg=None):
    smoke = arg == "smoke"
    experiment = "inpo_tldr:smoke" if smoke else "inpo_tldr"
    common = {} if smoke else {"eval.num_prompts": 64, "inpo.num_prompts": 128, "data.vary_with_seed": True}
    return Study(
        name="inpo_iters",
        methods=(
            Method("inpo", experiment, common),
            Method("inpo_eta0.1", experiment, {**common, "loss.eta": MATCHED_ETA}),
            Method("iterative_dpo", experiment, {**common, "loss.name": "dpo", "inpo.reference": "previous"}),
        ),
        metrics=("win_rate_vs_sft_gold", "win_rate_vs_sft_proxy", "kl_to_sft"),
        curve=("iterations.jsonl", "iteration", ("win_rate_vs_sft_gold", "win_rate_vs_sft_proxy")),
        note="INPO (η = 0.005, the paper's; η = 0.1, matched to iterative DPO's β) vs iterative DPO over online "
        f"iterations, same oracle and sampling; {8 if smoke else 64} held-out prompts × 2 samples per "
        "evaluation; each INPO row paired with iterative DPO.",
        baseline="iterative_dpo",
    )
