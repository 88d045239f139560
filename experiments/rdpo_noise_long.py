"""Study: DPO, cDPO and rDPO trained for 4 epochs over preference labels flipped at rate ε ∈ {0.2, 0.4}
(and DPO at ε = 0), evaluated after every epoch.

    python -m launch.study --study=rdpo_noise_long --seeds=3
    python -m launch.study --study=rdpo_noise_long:smoke --seeds=1

`rdpo_noise` trained for half an epoch and found no difference between the losses; its README section
named the confound: Chowdhury et al. 2024 ("Provably Robust DPO") argue that DPO *fits the flipped
labels*, which half an epoch gives it little time to do. Here every run makes 4 passes over its ~3.9k
training pairs (EPOCH_STEPS = 121 steps of 32 per pass, lr 1e-4) and the preference stage evaluates
after each pass (`train.eval_every`, `policy/eval_curve.jsonl`): the gold win rate against the SFT
policy on 64 held-out prompts × 2 samples, the implicit-reward accuracy on the clean held-out pairs
(`eval_reward_accuracy`), and the implicit-reward accuracy *as labelled* on up to 256 training pairs
whose label was flipped (`train_flipped_fit`; `train_unflipped_fit` on as many that were not). A loss
that fits the flips drives `train_flipped_fit` up epoch after epoch and its clean-pair accuracy down;
rDPO's de-biased loss should not. The per-epoch numbers are tabulated as `KEY@STEP` metrics (the curve's
value after STEP steps) and paired like the final ones.

The model, SFT budget and sizes are `rdpo_noise`'s (`MINI`, the `rso_tldr` miniature); unlike there,
each seed also draws its own synthetic data and evaluation prompts (`data.vary_with_seed`), so the
intervals cover the draw of the task too. Rows paired within ε (cDPO, rDPO against DPO at the same ε) and DPO at
ε > 0 against DPO at ε = 0. At ε = 0 the three losses are one function (`rdpo_noise` checked that
they give identical runs), so only DPO runs there.
"""

from experiments import Method, Study
from experiments.rdpo_noise import MINI

RATES = (0.2, 0.4)
EPOCHS = 4
EPOCH_STEPS = 121  # (4096 pairs − 204 held out) // 32 pairs per step
SMOKE_EPOCH_STEPS = 2
CURVE_KEYS = ("win_rate_vs_sft_gold", "eval_reward_accuracy", "train_flipped_fit")


def _methods(experiment: str, common: dict):
    yield Method("dpo_eps0.0", experiment, {**common, "data.flip_rate": 0.0, "loss.name": "dpo"})
    for eps in RATES:
        flip = {**common, "data.flip_rate": eps}
        yield Method(f"dpo_eps{eps}", experiment, {**flip, "loss.name": "dpo"})
        yield Method(f"cdpo_eps{eps}", experiment, {**flip, "loss.name": "cdpo", "loss.label_smoothing": eps})
        yield Method(f"rdpo_eps{eps}", experiment, {**flip, "loss.name": "rdpo", "loss.flip_rate": eps})


def _baselines():
    pairs = {f"dpo_eps{eps}": "dpo_eps0.0" for eps in RATES}
    for eps in RATES:
        pairs.update({f"cdpo_eps{eps}": f"dpo_eps{eps}", f"rdpo_eps{eps}": f"dpo_eps{eps}"})
    return pairs


def get_study(arg=None):
    smoke = arg == "smoke"
    epoch = SMOKE_EPOCH_STEPS if smoke else EPOCH_STEPS
    schedule = {"train.steps": EPOCHS * epoch, "train.eval_every": epoch, "data.vary_with_seed": True}
    common = {**({} if smoke else MINI), **schedule}
    per_epoch = tuple(f"{key}@{k * epoch}" for key in CURVE_KEYS for k in range(1, EPOCHS + 1))
    return Study(
        name="rdpo_noise_long",
        methods=tuple(_methods("dpo_tldr:smoke" if smoke else "dpo_tldr", common)),
        metrics=(
            "win_rate_vs_sft_gold",
            "eval_reward_accuracy",
            "train_flipped_fit",
            "train_unflipped_fit",
            "kl_to_sft",
            *per_epoch,
        ),  # fmt: skip
        curve=("policy/eval_curve.jsonl", "step", CURVE_KEYS),
        note=f"Label noise over {EPOCHS} epochs ({epoch} steps each): DPO vs cDPO vs rDPO told the true ε. "
        "eval_reward_accuracy is on clean held-out pairs ordered by the gold reward; train_flipped_fit is the "
        "accuracy as labelled on training pairs whose label was flipped; KEY@STEP is the value after STEP "
        f"steps. Win rates on {8 if smoke else 64} held-out prompts × 2 samples. Paired within ε: cDPO and "
        "rDPO against DPO at the same ε, DPO against DPO at ε = 0.",
        baseline=_baselines(),
    )
