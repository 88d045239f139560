"""The config schema every experiment shares (keys pinned by the launcher docs; extend, never rename).

Sections: `seed`, `pipeline`, `init_from`, `progress`, `model` (preset + ModelConfig fields), `loss`
(name + hyperparameters), `train` (the stage's loop, batch and optimizer settings), `sft` (the same keys,
for the SFT stage a preference experiment runs first when `init_from` is empty), `mesh`, `checkpoint`,
`data`. A `:smoke` variant shrinks everything to a CPU run of seconds.
"""

import dataclasses

import ml_collections

from rlhf_jax.pipelines import ppo


def train_section(*, steps, batch_size, learning_rate, warmup_steps=0, schedule="cosine"):
    """A `train`-style section: loop, batch and optimizer keys."""
    return ml_collections.ConfigDict(
        dict(
            steps=steps,
            batch_size=batch_size,
            learning_rate=learning_rate,
            optimizer="adamw",
            schedule=schedule,
            warmup_steps=warmup_steps,
            final_lr_fraction=0.1,
            weight_decay=0.0,
            b1=0.9,
            b2=0.999,
            eps=1e-8,
            grad_clip_norm=1.0,
            grad_accum_steps=1,
            log_every=10,
            eval_batch_size=64,
            nonfinite="stop",
            max_nonfinite_fraction=0.05,  # with nonfinite="skip": fail once more steps were skipped
            reference="online",
            eval_every=0,
            # LoRA (`rlhf_jax.lora`): rank > 0 trains adapters on a frozen base (also the reference).
            lora_rank=0,
            lora_alpha=16.0,
            lora_dropout=0.0,
            lora_targets="q,k,v,o,gate,up,down",
        )
    )


def sft_section(*, steps, batch_size, learning_rate, warmup_steps=0, schedule="cosine"):
    """An `sft` section: the train keys plus the SFT objective (`rlhf_jax.train.ift.SFTObjectiveConfig`):
    `objective` "nll" (token-level NLL) or "ift" (Intuitive Fine-Tuning, arXiv 2405.11870) with its λ, γ."""
    section = train_section(steps=steps, batch_size=batch_size, learning_rate=learning_rate,
                            warmup_steps=warmup_steps, schedule=schedule)  # fmt: skip
    section.update(dict(objective="nll", ift_lambda=0.2, ift_gamma=0.95))
    return section


def rm_section(*, steps, batch_size, learning_rate, warmup_steps=0, kind="pointwise"):
    """An `rm` section: the reward-model stage's train keys plus its `kind`, "pointwise" (a Bradley-Terry
    reward model) or "pairwise" (RSO's ranking model), the one name of that choice in every pipeline."""
    section = train_section(steps=steps, batch_size=batch_size, learning_rate=learning_rate,
                            warmup_steps=warmup_steps)  # fmt: skip
    section.kind = kind
    return section


def ppo_section(**overrides) -> dict:
    """Every `pipelines.ppo.PPOConfig` key (its defaults, with `overrides`), so each is a `--config.ppo.*` flag."""
    fields = {f.name: f.default for f in dataclasses.fields(ppo.PPOConfig)}
    unknown = set(overrides) - set(fields)
    if unknown:
        raise ValueError(f"ppo_section: unknown keys {sorted(unknown)}")
    return {**fields, **overrides}


def base(*, pipeline: str, task: str = "tldr", smoke: bool = False) -> ml_collections.ConfigDict:
    """The shared defaults; experiments override what they need."""
    c = ml_collections.ConfigDict()
    c.seed = 0
    c.pipeline = pipeline
    c.init_from = ""
    c.progress = True
    c.model = ml_collections.ConfigDict(
        dict(preset="small", dtype="float32", param_dtype="float32", remat="none", init_from_hf="")
    )
    c.loss = ml_collections.ConfigDict(dict(name="dpo", beta=0.1))
    c.train = train_section(steps=400, batch_size=32, learning_rate=3e-4, warmup_steps=20)
    c.sft = sft_section(steps=600, batch_size=32, learning_rate=1e-3, warmup_steps=30)
    c.eval = ml_collections.ConfigDict(
        dict(
            num_prompts=128,
            samples_per_prompt=2,
            temperature=0.7,
            top_k=40,
            max_new_tokens=48,
            bootstrap=1000,
        )
    )
    c.mesh = ml_collections.ConfigDict(dict(data=-1, fsdp=1, tensor=1))
    c.checkpoint = ml_collections.ConfigDict(dict(every_steps=100, keep=2, async_save=True))
    c.data = ml_collections.ConfigDict(
        dict(
            task=task,
            tokenizer="",
            path="",
            sft_path="",
            preference_path="",
            eval_path="",
            format="",
            strict=False,
            chat_template="auto",
            chat_template_kwargs="",
            max_len=128,
            max_prompt_len=100,
            vocab_size=1536,
            synthetic_seed=0,
            num_sft=4096,
            num_pref=4096,
            num_eval=128,
            flip_rate=0.0,
            eval_fraction=0.05,
            vary_with_seed=False,
        )
    )
    if task == "hh":
        c.data.max_len = 512
        c.data.max_prompt_len = 384
        c.data.vocab_size = 8000
    if smoke:
        shrink(c)
    return c


def shrink(c: ml_collections.ConfigDict) -> None:
    """The `:smoke` sizes: the tiny model, a few steps, small synthetic splits."""
    c.model.preset = "tiny"
    for section in [c[k] for k in ("train", "sft", "rm") if k in c]:
        section.steps = 6
        section.batch_size = 8
        section.log_every = 2
        section.warmup_steps = 1
        section.eval_batch_size = 16
    c.checkpoint.every_steps = 3
    c.eval.num_prompts = 8
    c.eval.max_new_tokens = 16
    c.eval.bootstrap = 200
    c.data.num_sft = 64
    c.data.num_pref = 96
    c.data.num_eval = 8
    c.data.eval_fraction = 0.1
    if c.data.task == "hh":
        c.data.max_len = 128
        c.data.max_prompt_len = 96


def preference(*, loss: dict, task: str = "tldr", smoke: bool = False) -> ml_collections.ConfigDict:
    """An offline preference experiment with `loss` (name + hyperparameters)."""
    c = base(pipeline="preference", task=task, smoke=smoke)
    c.loss = ml_collections.ConfigDict(loss)
    c.train.learning_rate = 1e-4
    return c
