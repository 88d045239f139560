"""Study: INPO iterations 1..T against iterative DPO with the same sampling and oracle.

    python -m launch.study --study=inpo_iters --seeds=3
    python -m launch.study --study=inpo_iters:smoke --seeds=1

Zhang et al. 2024 claim INPO improves over the iterations and beats iterative DPO (each iteration's
reference = the previous iterate) under the same oracle. Both start from the same SFT policy and oracle
(trained once per seed, or copied with `--reuse=studies/rso_table`); the plot shows the gold-reward
win rate per iteration (iterations.jsonl). Each iteration is evaluated on 64 held-out prompts × 2
samples (the smoke variant: 8). The baseline of the paired comparison is iterative DPO: the claim is
that INPO beats it, so INPO − iterative DPO > 0, resolved, is what would support the claim.
"""

from experiments import Method, Study


def get_study(arg=None):
    smoke = arg == "smoke"
    experiment = "inpo_tldr:smoke" if smoke else "inpo_tldr"
    common = {} if smoke else {"eval.num_prompts": 64}
    return Study(
        name="inpo_iters",
        methods=(
            Method("inpo", experiment, common),
            Method("iterative_dpo", experiment, {**common, "loss.name": "dpo", "inpo.reference": "previous"}),
        ),
        metrics=("win_rate_vs_sft_gold", "win_rate_vs_sft_proxy", "kl_to_sft"),
        curve=("iterations.jsonl", "iteration", ("win_rate_vs_sft_gold", "win_rate_vs_sft_proxy")),
        note="INPO vs iterative DPO over online iterations, same oracle and sampling; "
        f"{8 if smoke else 64} held-out prompts × 2 samples per evaluation; INPO paired with iterative DPO.",
        baseline="iterative_dpo",
    )
