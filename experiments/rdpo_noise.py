"""Study: DPO, cDPO and rDPO on preference labels flipped at rate ε ∈ {0, 0.1, 0.2, 0.4}.

    python -m launch.study --study=rdpo_noise --seeds=3
    python -m launch.study --study=rdpo_noise:smoke --seeds=1

Chowdhury et al. 2024 ("Provably Robust DPO") claim rDPO, told the true ε, keeps its policy quality as
ε grows while DPO degrades, with cDPO in between. cDPO uses label smoothing ε and rDPO flip rate ε
(each told the truth); evaluation pairs are never flipped. Metrics: gold-reward win rate against the
SFT policy, and implicit-reward accuracy on clean held-out pairs (ordered by the gold reward).

The full study uses `dpo_tldr` at the miniature sizes of `rso_tldr` (`MINI`: the same ~1.2M-parameter
model and SFT stage, so `--reuse=studies/rso_table` copies the ε = 0 SFT policy of each seed: stages are
shared by fingerprint, and the flip rate is part of the data an SFT stage is fingerprinted on), 64 steps of
32 pairs (half an epoch of the ~3.9k training pairs, lr 1e-4) with a precomputed reference, and 64
evaluation prompts × 2 samples (the smoke variant: 8). Paired comparisons stay within a flip rate: cDPO
and rDPO at ε against DPO at the same ε (the claim is about the method at a given noise level), and DPO
at ε > 0 against DPO at ε = 0 (the claim that DPO degrades as ε grows).
"""

from experiments import Method, Study

RATES = (0.0, 0.1, 0.2, 0.4)
MINI = {
    "model.d_model": 128, "model.num_heads": 4, "model.num_kv_heads": 4, "model.head_dim": 32,
    "model.mlp_dim": 352,
    "sft.steps": 250, "sft.learning_rate": 2e-3, "sft.warmup_steps": 20,
    "train.steps": 64, "train.warmup_steps": 5, "train.reference": "precomputed",
    "eval.max_new_tokens": 40, "eval.num_prompts": 64,
}  # fmt: skip


def _methods(experiment, rates, common):
    for eps in rates:
        flip = {**common, "data.flip_rate": eps}
        yield Method(f"dpo_eps{eps}", experiment, {**flip, "loss.name": "dpo"})
        yield Method(f"cdpo_eps{eps}", experiment, {**flip, "loss.name": "cdpo", "loss.label_smoothing": eps})
        yield Method(f"rdpo_eps{eps}", experiment, {**flip, "loss.name": "rdpo", "loss.flip_rate": eps})


def _baselines(rates):
    """cDPO and rDPO at ε against DPO at the same ε; DPO at ε > 0 against DPO at the lowest ε."""
    pairs = {f"dpo_eps{eps}": f"dpo_eps{rates[0]}" for eps in rates[1:]}
    for eps in rates:
        pairs.update({f"cdpo_eps{eps}": f"dpo_eps{eps}", f"rdpo_eps{eps}": f"dpo_eps{eps}"})
    return pairs


def get_study(arg=None):
    smoke = arg == "smoke"
    experiment = "dpo_tldr:smoke" if smoke else "dpo_tldr"
    rates = (0.0, 0.4) if smoke else RATES
    return Study(
        name="rdpo_noise",
        methods=tuple(_methods(experiment, rates, {} if smoke else MINI)),
        metrics=("win_rate_vs_sft_gold", "eval_reward_accuracy", "kl_to_sft"),
        note="Label noise: DPO vs cDPO vs rDPO (told the true ε); accuracy is on clean, gold-ordered pairs; "
        f"win rates on {8 if smoke else 64} held-out prompts × 2 samples per run. Paired within ε: cDPO and "
        "rDPO against DPO at the same ε, DPO against DPO at ε = 0.",
        baseline=_baselines(rates),
    )
