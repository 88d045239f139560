"""RSO on TL;DR: SFT → reward model → sample N → statistical rejection sampling of M → pairs →
sigmoid-norm (or hinge / hinge-norm) training against the SFT policy → win rates vs SFT.

    python -m launch.train --experiment=rso_tldr
    python -m launch.train --experiment=rso_tldr:smoke                        # seconds, tiny sizes
    python -m launch.train --experiment=rso_tldr --config.loss.name=hinge_norm --config.loss.gamma=0.05
    python -m launch.train --experiment=rso_tldr --config.rso.pairs=sft_sample_rank   # paper baseline
    python -m launch.train --experiment=rso_tldr --config.rso.pairs=direct            # paper baseline
    python -m launch.train --experiment=rso_tldr --config.rm.kind=pairwise    # ranking model
    python -m launch.train --experiment=rso_tldr --config.rso.proposal_correction=true   # π_sft·exp(r/β)

Paper (Liu et al. 2024, "Statistical Rejection Sampling Improves Preference Optimization", Sec. 5):
T5-large policy, N = 64 candidates per prompt at temperature 0.7 and top-k 40, M = 8 accepted with
β = 0.5, first-round-rank pairs, sigmoid-norm loss with γ = 0.05, a T5-XXL pairwise ranking model.
Those are the values to use at paper scale (`--config.rso.num_candidates=64 --config.rso.num_accepted=8
--config.model.preset=t5_large_equiv --config.rm.kind=pairwise`). The embedded default scales
them to 2 CPU cores: the `small` architecture at width 128 (~1.2M parameters with the task's 1,536-piece
vocabulary), N = 16 candidates and M = 4 accepted per prompt for 512 training prompts (1,024 pairs), and short
training budgets; β, γ, temperature, top-k and the pairing rule are the paper's. Sampling at
temperature 0.7 / top-k 40, the accepted samples follow q·exp(r/β), q the tempered top-k SFT policy, as
in the paper; `rso.proposal_correction=true` accepts on r/β + log π_sft − log q to target
π_sft·exp(r/β). Every stage's output lands in its own subdirectory of the workdir; a rerun skips
finished stages.
"""

import ml_collections

from experiments import _base


def get_config(arg=None):
    smoke = arg == "smoke"
    c = _base.base(pipeline="rso", smoke=False)
    c.model.update(dict(d_model=128, num_heads=4, num_kv_heads=4, head_dim=32, mlp_dim=352))
    c.loss = ml_collections.ConfigDict(dict(name="sigmoid_norm", gamma=0.05))
    c.sft = _base.sft_section(steps=250, batch_size=32, learning_rate=2e-3, warmup_steps=20)
    c.rm = _base.rm_section(steps=150, batch_size=32, learning_rate=1e-3, warmup_steps=10)
    c.train = _base.train_section(steps=64, batch_size=32, learning_rate=5e-5, warmup_steps=5)
    c.train.reference = "precomputed"
    c.rso = ml_collections.ConfigDict(
        dict(
            pairs="rso", ranking="first_round", num_prompts=512,
            num_candidates=16, num_accepted=4, beta=0.5, temperature=0.7, top_k=40, max_new_tokens=40,
            proposal_correction=False,
        )
    )  # fmt: skip
    c.eval.num_prompts = 128
    c.eval.samples_per_prompt = 2
    c.eval.max_new_tokens = 40
    if smoke:
        _base.shrink(c)
        c.model.update(dict(d_model=64, num_heads=8, num_kv_heads=4, head_dim=16, mlp_dim=176))
        c.rso.num_prompts = 8
        c.rso.num_candidates = 4
        c.rso.num_accepted = 2
        c.rso.max_new_tokens = 16
    return c
