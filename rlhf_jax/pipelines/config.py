"""Frozen run configuration, built once from an experiment's ConfigDict at the edge (the launcher).

The pipelines read only these dataclasses. `from_configdict` validates everything it can before any
model is built: unknown loss or hyperparameter, impossible sizes, an unknown model preset.
"""

from __future__ import annotations

import dataclasses
import os
from typing import Any

from rlhf_jax import lora as lora_lib
from rlhf_jax import losses, models, sharding
from rlhf_jax.data import synthetic_dialogue, synthetic_tools
from rlhf_jax.pipelines import fingerprints
from rlhf_jax.train.ift import SFTObjectiveConfig
from rlhf_jax.train.optim import OptimConfig
from rlhf_jax.train.trainer import LoopConfig


@dataclasses.dataclass(frozen=True)
class DataConfig:
    """Where the data comes from and how it is shaped.

    Attributes:
      task: "tldr" (synthetic task when no path is given), "hh" (paths required), "arith" (the synthetic
        math task, `data.synthetic_arith`), "math" (GSM8K / MATH-style problem files: `path` holds
        the training problems, `eval_path` the held-out ones; `rlhf_jax.data.load_math`) or "dialogue"
        (the embedded multi-turn running-total dialogues with per-turn rewards,
        `data.synthetic_dialogue`: `num_sft` training and `num_eval` held-out dialogues) or "tools" (the
        embedded tool-calling task, `data.synthetic_tools`: `num_sft` training and `num_eval` held-out
        requests).
      tokenizer: a sentencepiece .model; empty: train one on the training text (cached in the workdir).
      path: the user's preference file(s): shorthand for `preference_path` (SFT examples then come from
        the pairs' prompts and chosen responses unless `sft_path` is given).
      sft_path, preference_path, eval_path: a file, glob or comma-separated list; empty: synthetic.
      format: force a format for every file ("" = detect from the records' keys).
      chat_template: how conversational records (message lists: TRL's `messages`, `prompt`/`chosen`/
        `rejected` and `prompt`/`completion` as message lists, math `prompt` messages) become text:
        "auto" (the default) renders them with the tokenizer's chat template when it has one (else as
        "none"), "none" as HH-style "\n\nHuman: ...\n\nAssistant:" text, and a path to a Jinja file
        with that template instead of the tokenizer's (`rlhf_jax.data.conversations`). With a
        template, math questions (GSM8K, MATH) become one user message too.
      chat_template_kwargs: extra variables for the template, e.g. {"enable_thinking": False} for
        Qwen3, or the same as "enable_thinking=false" (comma-separated key=value; true/false and
        numbers are parsed); stored as sorted (key, value) pairs.
      strict: raise on the first bad record instead of skipping and counting it.
      max_len, max_prompt_len: tokens per row, and of them at most this many prompt tokens (with BOS).
      vocab_size: vocabulary size when a tokenizer is trained.
      synthetic_seed, num_sft, num_pref, num_eval: synthetic task generation.
      flip_rate: fraction of preference labels flipped (robustness studies; applied to any data).
      eval_fraction: share of the preference data held out for evaluation when no eval_path is given.
      num_train: RL training problems of the synthetic math task.
      arith_max_steps, arith_error_rate, arith_misread_rate: the synthetic math task's difficulty (most
        steps per problem), the share of SFT demonstrations with an arithmetic slip, and the
        probability that a demonstration's subtraction step is misread as an addition
        (`synthetic_arith`).
      dialogue_max_turns, dialogue_error_rate: the dialogue task's most assistant turns per dialogue
        (at least 2) and the per-turn slip probability of its training demonstrations.
      tool_weights, tools_per_prompt: the tool task's SFT token weights, "uniform" (every token 1) or
        "pkt" (TL-Training's key-token weights, `data.tool_weights`), and the tools offered per prompt.
      vary_with_seed: tie the data to the run's `seed`: the synthetic task is generated from
        (synthetic_seed, seed) instead of synthetic_seed alone (so its pairs and held-out evaluation
        prompts change with the seed), and the prompts of an `eval_path` are evaluated in a seeded
        order (evaluation takes the first eval.num_prompts). An interval over seeds then includes
        prompt sampling. False (the default): the synthetic task and an eval_path's order are the same
        for every seed (a held-out eval_fraction of the user's pairs is seeded either way).
    """

    task: str = "tldr"
    tokenizer: str = ""
    path: str = ""
    sft_path: str = ""
    preference_path: str = ""
    eval_path: str = ""
    format: str = ""
    strict: bool = False
    chat_template: str = "auto"
    chat_template_kwargs: Any = ()
    max_len: int = 128
    max_prompt_len: int = 100
    vocab_size: int = 1536
    synthetic_seed: int = 0
    num_sft: int = 4096
    num_pref: int = 4096
    num_eval: int = 128
    flip_rate: float = 0.0
    eval_fraction: float = 0.05
    vary_with_seed: bool = False
    num_train: int = 2048
    arith_max_steps: int = 3
    arith_error_rate: float = 0.2
    arith_misread_rate: float = 0.0
    dialogue_max_turns: int = 4
    dialogue_error_rate: float = 0.3
    tool_weights: str = "uniform"
    tools_per_prompt: int = 5

    def __post_init__(self):
        if self.path:
            if self.preference_path and self.preference_path != self.path:
                raise ValueError(
                    f"data.path ({self.path!r}) is shorthand for data.preference_path, which is set to "
                    f"{self.preference_path!r}: give one of them"
                )
            object.__setattr__(self, "preference_path", self.path)
        if self.task not in ("tldr", "hh", "arith", "math", "dialogue", "tools"):
            raise ValueError(
                f"data.task must be 'tldr', 'hh', 'arith', 'math', 'dialogue' or 'tools', got {self.task!r}"
            )
        if self.tool_weights not in ("uniform", "pkt"):
            raise ValueError(f"data.tool_weights must be 'uniform' or 'pkt', got {self.tool_weights!r}")
        if self.tool_weights == "pkt" and self.task != "tools":
            raise ValueError(f"data.tool_weights='pkt' weighs the tool task's calls (data.task='tools'), "
                             f"not data.task={self.task!r}")  # fmt: skip
        n_tools = len(synthetic_tools.TOOLS)
        if self.task == "tools" and not 2 <= self.tools_per_prompt <= n_tools:
            raise ValueError(f"data.tools_per_prompt must be in [2, {n_tools}], got {self.tools_per_prompt}")
        if self.task == "dialogue":
            try:
                synthetic_dialogue.DialogueConfig(
                    max_turns=self.dialogue_max_turns, error_rate=self.dialogue_error_rate
                )
            except ValueError as e:
                raise ValueError(f"data.dialogue_max_turns / dialogue_error_rate: {e}") from e
        if self.task == "math" and not self.preference_path:
            raise ValueError("data.task='math' needs --config.data.path=PROBLEMS.jsonl (GSM8K or MATH-style)")
        if not 0 < self.max_prompt_len < self.max_len:
            raise ValueError(
                f"need 0 < data.max_prompt_len ({self.max_prompt_len}) < data.max_len ({self.max_len})"
            )
        if self.task == "hh" and not (self.sft_path or self.preference_path):
            raise ValueError(
                "this is an Anthropic HH experiment and needs your data: give "
                "--config.data.path=PATH (the preference file: e.g. hh-rlhf/helpful-base/train.jsonl.gz; a "
                "file, glob or comma-separated list; same as data.preference_path), optionally "
                "--config.data.eval_path=PATH (the test split)"
            )
        if self.chat_template not in ("auto", "none") and not os.path.isfile(self.chat_template):
            raise ValueError(
                f"data.chat_template must be 'auto', 'none' or a Jinja template file, got "
                f"{self.chat_template!r} (no such file)"
            )
        object.__setattr__(self, "chat_template_kwargs", template_kwargs(self.chat_template_kwargs))
        if not 0.0 <= self.flip_rate < 1.0:
            raise ValueError(f"data.flip_rate must be in [0, 1), got {self.flip_rate}")
        for key in ("arith_error_rate", "arith_misread_rate"):
            if not 0.0 <= getattr(self, key) <= 1.0:
                raise ValueError(f"data.{key} must be in [0, 1], got {getattr(self, key)}")
        if self.arith_max_steps < 1 or self.num_train < 1:
            raise ValueError(
                f"data.arith_max_steps ({self.arith_max_steps}) and data.num_train ({self.num_train}) "
                "must be >= 1"
            )


def template_kwargs(value) -> tuple[tuple[str, Any], ...]:
    """`data.chat_template_kwargs` as sorted (key, value) pairs, from a mapping, pairs, or a string
    "key=value,key=value" (values true/false, integers and floats parsed, else strings)."""
    if isinstance(value, str):
        pairs = []
        for item in filter(None, (part.strip() for part in value.split(","))):
            key, sep, text = item.partition("=")
            if not sep or not key.strip():
                raise ValueError(f"data.chat_template_kwargs: expected key=value, got {item!r}")
            pairs.append((key.strip(), _scalar(text.strip())))
        value = pairs
    elif hasattr(value, "items"):
        value = list(value.items())
    try:
        return tuple(sorted((str(k), v) for k, v in value))
    except (TypeError, ValueError):
        raise ValueError(
            f"data.chat_template_kwargs: expected a mapping or key=value text, got {value!r}"
        ) from None


def _scalar(text: str):
    low = text.lower()
    if low in ("true", "false"):
        return low == "true"
    for kind in (int, float):
        try:
            return kind(text)
        except ValueError:
            pass
    return text


@dataclasses.dataclass(frozen=True)
class TrainConfig:
    """One training stage's loop and batch settings (the optimizer is `OptimConfig`).

    Attributes:
      steps: optimizer steps.
      batch_size: global batch, in pairs (pairwise stages) or examples (SFT).
      grad_accum_steps: micro-batches per step (batch_size must divide by it).
      log_every: metrics every this many steps.
      eval_batch_size: global batch for evaluation passes.
      nonfinite: "stop" or "skip" (see `rlhf_jax.train.trainer`).
      reference: "online" (reference forward in every step) or "precomputed" (once per dataset).
      eval_every: preference stages with a sample-based evaluation, and online RL stages on a non-math
        task, also run it every this many steps (0: only at the end) and append it to the stage's
        eval_curve.jsonl (online RL: at the end of each iteration that crosses a multiple, and step 0).
      max_nonfinite_fraction: with nonfinite="skip", the run fails once more than this fraction of
        `steps` were skipped (default 0.05: a run that drops more than 1 update in 20 is not the
        configured run; 1.0 never fails).
      lora_rank: > 0 trains LoRA adapters of this rank on a frozen base instead of every weight
        (`rlhf_jax.lora`; language-model stages: SFT, preference, online RL); the frozen base is then
        also the reference policy. 0 (the default): full fine-tuning.
      lora_alpha, lora_dropout, lora_targets: the adapters' α (update scaled by α / rank), input
        dropout, and projections (any of q, k, v, o, gate, up, down; a tuple or "q,v").

    Errors name the field alone; `stage_config` prefixes the config section (`config.sft.log_every`).
    """

    steps: int = 100
    batch_size: int = 32
    grad_accum_steps: int = 1
    log_every: int = 10
    eval_batch_size: int = 64
    nonfinite: str = "stop"
    reference: str = "online"
    eval_every: int = 0
    max_nonfinite_fraction: float = 0.05
    lora_rank: int = 0
    lora_alpha: float = 16.0
    lora_dropout: float = 0.0
    lora_targets: tuple = lora_lib.LoRAConfig.__dataclass_fields__["targets"].default

    def __post_init__(self):
        targets = self.lora_targets
        if isinstance(targets, str):
            targets = [t.strip() for t in targets.split(",") if t.strip()]
        object.__setattr__(self, "lora_targets", tuple(targets))
        if self.lora_rank < 0:
            raise ValueError(f"lora_rank must be >= 0 (0: full fine-tuning), got {self.lora_rank}")
        self.lora()  # validates alpha, dropout and targets
        checks = (
            ("steps", self.steps >= 0, ">= 0"),
            ("batch_size", self.batch_size >= 1, ">= 1"),
            ("grad_accum_steps", self.grad_accum_steps >= 1, ">= 1"),
            ("log_every", self.log_every >= 1, ">= 1"),
            ("eval_batch_size", self.eval_batch_size >= 1, ">= 1"),
            ("eval_every", self.eval_every >= 0, ">= 0 (0: only at the end)"),
            ("nonfinite", self.nonfinite in ("stop", "skip"), "'stop' or 'skip'"),
            ("reference", self.reference in ("online", "precomputed"), "'online' or 'precomputed'"),
            ("max_nonfinite_fraction", 0.0 <= self.max_nonfinite_fraction <= 1.0, "in [0, 1]"),
        )
        for field, ok, want in checks:
            if not ok:
                raise ValueError(f"{field} must be {want}, got {getattr(self, field)!r}")
        if self.batch_size % self.grad_accum_steps:
            raise ValueError(
                f"batch_size={self.batch_size} does not divide into "
                f"grad_accum_steps={self.grad_accum_steps} micro-batches"
            )

    def lora(self) -> lora_lib.LoRAConfig | None:
        """The stage's LoRA settings, or None for full fine-tuning (`lora_rank` 0)."""
        if self.lora_rank == 0:
            return None
        try:
            return lora_lib.LoRAConfig(
                rank=self.lora_rank,
                alpha=self.lora_alpha,
                dropout=self.lora_dropout,
                targets=self.lora_targets,
            )
        except ValueError as e:
            raise ValueError(f"lora_{str(e).removeprefix('lora ')}") from e

    def loop(self, progress: bool = True) -> LoopConfig:
        return LoopConfig(
            steps=self.steps,
            log_every=self.log_every,
            nonfinite=self.nonfinite,
            max_nonfinite_fraction=self.max_nonfinite_fraction,
            progress=progress,
        )


@dataclasses.dataclass(frozen=True)
class CheckpointConfig:
    """Attributes: every_steps (0: only at the end), keep (last K, >= 1), async_save."""

    every_steps: int = 100
    keep: int = 2
    async_save: bool = True

    def __post_init__(self):
        if self.every_steps < 0:
            raise ValueError(f"every_steps must be >= 0 (0: only at the end), got {self.every_steps!r}")
        if self.keep < 1:
            raise ValueError(f"keep must be >= 1, got {self.keep!r}")


@dataclasses.dataclass(frozen=True)
class LossConfig:
    """A loss from `rlhf_jax.losses` by name, with its hyperparameters (validated on creation)."""

    name: str = "dpo"
    hparams: tuple[tuple[str, Any], ...] = ()

    def __post_init__(self):
        losses.make(self.name, **dict(self.hparams))

    def make(self):
        return losses.make(self.name, **dict(self.hparams))

    def metric_beta(self) -> float:
        """The β of the implicit-reward metrics: the loss's beta, else gamma or eta, else 0.1."""
        h = {**losses.hyperparameters(self.name), **dict(self.hparams)}
        for key in ("beta", "gamma", "eta"):
            if isinstance(h.get(key), (int, float)) and h[key] > 0:
                return float(h[key])
        return 0.1


@dataclasses.dataclass(frozen=True)
class StageConfig:
    """Everything one training stage needs.

    Attributes:
      seed: the run's seed (init, data order, dropout-free sampling keys).
      model: the architecture (vocab_size is replaced by the tokenizer's).
      optim: the optimizer.
      train: loop and batch settings.
      loss: the pairwise loss (preference stages).
      mesh: the device mesh.
      checkpoint: checkpoint cadence.
      data: data sources and shapes.
      init_from: a previous stage's workdir whose final params (and tokenizer) start this stage.
      progress: show progress bars.
      sft_objective: an SFT stage's objective (`config.sft.objective`, `.ift_lambda`, `.ift_gamma`; the
        `sft` pipeline's `train` section); the default ("nll") elsewhere.
    """

    seed: int
    model: models.ModelConfig
    optim: OptimConfig
    train: TrainConfig
    loss: LossConfig
    mesh: sharding.MeshConfig
    checkpoint: CheckpointConfig
    data: DataConfig
    init_from: str = ""
    init_from_hf: str = ""
    progress: bool = True
    sft_objective: SFTObjectiveConfig = SFTObjectiveConfig()


_SFT_OBJECTIVE_KEYS = tuple(f.name for f in dataclasses.fields(SFTObjectiveConfig))


def section_fields(cls, section, name: str) -> dict:
    """Keyword arguments for dataclass `cls` from a ConfigDict section, rejecting unknown keys."""
    known = {f.name for f in dataclasses.fields(cls)}
    given = dict(section)
    unknown = sorted(set(given) - known)
    if unknown:
        raise ValueError(f"config.{name} has unknown keys {unknown}; known: {sorted(known)}")
    return given


_RUNTIME_FIELDS = ("param_dtype", "dtype", "remat", "scan_layers", "attention_impl", "decode_attention")


def model_config(section) -> models.ModelConfig:
    """ModelConfig from `config.model`: a preset name plus field overrides, or, with `init_from_hf`, the
    HuggingFace checkpoint's config.json plus the runtime fields (dtype, param_dtype, remat, ...)."""
    given = dict(section)
    preset = given.pop("preset")
    hf_dir = given.pop("init_from_hf", "") or ""
    known = {f.name for f in dataclasses.fields(models.ModelConfig)}
    unknown = sorted(set(given) - known)
    if unknown:
        raise ValueError(f"config.model has unknown keys {unknown}; known: preset, {sorted(known)}")
    if hf_dir:
        from rlhf_jax import interop

        runtime = {k: given.pop(k) for k in _RUNTIME_FIELDS if k in given}
        if given:
            raise ValueError(
                f"config.model.{sorted(given)} cannot be set with init_from_hf "
                "(the checkpoint's config.json fixes the architecture)"
            )
        return interop.load_config(hf_dir, **runtime)
    return models.preset(preset, **given)


def in_section(section: str, cls, /, **kwargs):
    """`cls(**kwargs)`, with a validation error prefixed by the config section it came from."""
    try:
        return cls(**kwargs)
    except (ValueError, TypeError) as e:
        raise ValueError(f"config.{section}.{e}") from e


RM_KINDS = ("pointwise", "pairwise")


def rm_kind(config) -> str:
    """The reward model's kind, `config.rm.kind`: "pointwise" (a Bradley-Terry reward model r(x, y)) or
    "pairwise" (RSO's ranking model, the logit of P(y_a ≻ y_b | x)); "pointwise" when not set."""
    kind = config.get("rm", {}).get("kind", "pointwise")
    if kind not in RM_KINDS:
        raise ValueError(f"config.rm.kind must be one of {RM_KINDS}, got {kind!r}")
    return kind


def section_config(cls, config, name: str):
    """`cls` (a frozen config dataclass) from the ConfigDict section `config.<name>`, rejecting unknown
    keys; a validation error is prefixed with the section (`config.rso.…`)."""
    return in_section(name, cls, **section_fields(cls, config[name], name))


def stage_config(config, train_section: str = "train", *, init_from: str | None = None) -> StageConfig:
    """Builds a StageConfig from an experiment ConfigDict.

    Args:
      config: the experiment's ConfigDict (after overrides).
      train_section: which section holds this stage's train/optimizer settings (e.g. "sft" for the
        SFT stage of a preference experiment); it has the keys of TrainConfig and OptimConfig (and, in
        the `rm` section, the reward model's `kind`, read by `rm_kind`).
      init_from: the stage's `init_from` (default `config.init_from`; a run's workdir there means its
        final stage, `fingerprints.resolve_init_from`).
    """
    section = dict(config[train_section])
    if train_section == "rm":
        section.pop("kind", None)
    # The SFT objective's keys belong to the section that trains the SFT stage: `sft` (every pipeline
    # that starts from SFT), or `train` in the `sft` pipeline; elsewhere they are unknown keys.
    sft_keys = train_section == "sft" or (train_section == "train" and config.get("pipeline") == "sft")
    objective = {k: section.pop(k) for k in _SFT_OBJECTIVE_KEYS if k in section} if sft_keys else {}
    optim_keys = {f.name for f in dataclasses.fields(OptimConfig)}
    train_keys = {f.name for f in dataclasses.fields(TrainConfig)}
    optim_keys = (optim_keys - {"name"}) | {"optimizer"}  # `train.optimizer` is OptimConfig.name
    unknown = sorted(set(section) - optim_keys - train_keys)
    if unknown:
        raise ValueError(
            f"config.{train_section} has unknown keys {unknown}; known: {sorted(optim_keys | train_keys)}"
        )
    optim = in_section(
        train_section,
        OptimConfig,
        **{k: v for k, v in section.items() if k in optim_keys and k != "optimizer"},
        name=section.get("optimizer", "adamw"),
    )
    train = in_section(train_section, TrainConfig, **{k: v for k, v in section.items() if k in train_keys})
    if train_section == "rm" and train.lora_rank:
        raise ValueError(
            f"config.rm.lora_rank={train.lora_rank}: LoRA trains the language-model stages (SFT, preference, "
            "online RL); the reward model trains every weight (set it to 0)"
        )
    loss_section = dict(config.get("loss", {"name": "dpo"}))
    loss = LossConfig(name=loss_section.pop("name"), hparams=tuple(sorted(loss_section.items())))
    return StageConfig(
        seed=int(config.seed),
        model=model_config(config.model),
        optim=optim,
        train=train,
        loss=loss,
        mesh=sharding.MeshConfig(**section_fields(sharding.MeshConfig, config.mesh, "mesh")),
        checkpoint=in_section(
            "checkpoint",
            CheckpointConfig,
            **section_fields(CheckpointConfig, config.checkpoint, "checkpoint"),
        ),
        data=DataConfig(**section_fields(DataConfig, config.data, "data")),
        init_from=fingerprints.resolve_init_from(str(config.get("init_from", "")))
        if init_from is None
        else init_from,
        init_from_hf=str(config.model.get("init_from_hf", "") or ""),
        progress=bool(config.get("progress", True)),
        sft_objective=in_section(train_section, SFTObjectiveConfig, **objective),
    )
