"""Study: the rows of RSO's Table 1 on the synthetic TL;DR task, with matched budgets.

    python -m launch.study --study=rso_table --seeds=3
    python -m launch.study --study=rso_table:smoke --seeds=1

Rows (Liu et al. 2024, Table 1): DPO on the human pairs ("direct" + sigmoid-norm), sigmoid-norm on
pairs of plain SFT samples ranked by the reward model ("sft-sample-rank"), RSO sigmoid-norm (rejection-
sampled pairs), SLiC on the human pairs ("direct" + hinge), RSO hinge-norm. Every row starts from the
same SFT policy and uses the same reward model (trained once per seed) and, for the sampled rows, the
same candidates; the paper's claim is that the rso rows beat direct and sft-sample-rank. Each run is
evaluated on 128 held-out prompts × 2 samples (8 in the smoke variant). The baseline of the paired
comparison is DPO-direct (DPO's loss family on the human pairs), the row every other one is measured
against; the win rates are already against the SFT policy, so the SFT policy is not a row.
"""

from experiments import Method, Study

_ROWS = (
    ("dpo_direct", {"rso.pairs": "direct", "loss.name": "sigmoid_norm"}),
    ("sigmoid_norm_sft_sample_rank", {"rso.pairs": "sft_sample_rank", "loss.name": "sigmoid_norm"}),
    ("rso_sigmoid_norm", {"rso.pairs": "rso", "loss.name": "sigmoid_norm"}),
    ("slic_direct_hinge", {"rso.pairs": "direct", "loss.name": "hinge"}),
    ("rso_hinge_norm", {"rso.pairs": "rso", "loss.name": "hinge_norm"}),
)


def get_study(arg=None):
    experiment = "rso_tldr:smoke" if arg == "smoke" else "rso_tldr"
    return Study(
        name="rso_table",
        methods=tuple(Method(name, experiment, overrides) for name, overrides in _ROWS),
        metrics=("win_rate_vs_sft_gold", "win_rate_vs_sft_proxy", "kl_to_sft", "mean_response_length"),
        note="RSO Table 1 in miniature: win rates against the SFT policy by the gold and the proxy reward, "
        f"on {8 if arg == 'smoke' else 128} held-out prompts × 2 samples per run; rows paired with DPO-direct.",
        baseline="dpo_direct",
    )
