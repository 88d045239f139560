"""Classification as generation (GenCLS++, arXiv 2504.19898; PPO for NLU, arXiv 2410.11020): SFT warm-up
on label tokens → online RL with a rule-based label reward → held-out accuracy of the RL and the SFT
policy, by free generation and by perplexity decoding.

    python -m launch.train --experiment=gencls_synthetic            # the embedded synthetic k-class task
    python -m launch.train --experiment=gencls_glue --config.data.path=SST-2/train.tsv \\
        --config.data.eval_path=SST-2/dev.tsv                       # GLUE-style TSV or JSONL files

Stages (each in WORKDIR/{stage}/{fingerprint}/, reused only when its fingerprint matches):
  1. the examples rendered under the train-time prompt strategy (`cls.train_prompt`) are written to
     WORKDIR/data/{digest}/ (SFT examples: prompt → label string; held-out pairs: prompt → gold label
     vs another), so the stages' fingerprints cover them by content;
  2. `sft`: SFT on the label tokens (+ EOS);
  3. `policy`: online RL from the SFT policy (`grpo.run`, GRPO by default) on the training prompts
     with the `label_match` reward (right / wrong / unparseable, `rewards._classify`), the label set
     bound from the data;
  4. evaluation of the RL policy and of the SFT policy on the held-out split under the inference-time
     strategy (`cls.eval_prompt`): greedy free generation parsed to a label (`classification.
     parse_answer`), and perplexity decoding (`classify.score_labels`, argmax of the mean log-prob per
     label token, `cls.by="sum"` for the sum). Cached beside the policy under its own fingerprint.

results.json keys (pinned, `RESULT_KEYS`; `_ci` entries are 95% bootstrap intervals over held-out
examples, `_vs_sft` paired differences RL − SFT with paired bootstrap intervals):
  accuracy_generate, accuracy_generate_ci, accuracy_ppl, accuracy_ppl_ci,
  accuracy_generate_sft, accuracy_generate_sft_ci, accuracy_ppl_sft, accuracy_ppl_sft_ci,
  accuracy_generate_vs_sft, accuracy_generate_vs_sft_ci, accuracy_ppl_vs_sft, accuracy_ppl_vs_sft_ci,
  accuracy_ppl_vs_generate, accuracy_ppl_vs_generate_ci (the RL policy's perplexity decoding minus its
  free generation, paired on the same examples),
  confusion_generate, confusion_generate_sft (K rows: gold label; K + 1 columns: predicted label, then
  "uncertain or unparseable"), confusion_ppl, confusion_ppl_sft (K × K', K' candidates),
  unparseable_frac, unparseable_frac_sft (greedy answers naming no label), labels, eval_examples,
  train_prompt, eval_prompt, method, wall_time_s;
plus `training` (the RL stage's last iteration), `sft` (its results) and `stages`.
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import json
import os
import time

import jax
import numpy as np

from rlhf_jax import classify, rewards, sampling, sharding
from rlhf_jax.data import classification, pipeline
from rlhf_jax.data.tokenizer import load_tokenizer
from rlhf_jax.pipelines import evaluation, fingerprints, grpo, sft
from rlhf_jax.pipelines import ppo as ppo_lib
from rlhf_jax.pipelines import workdir as workdir_io
from rlhf_jax.pipelines.config import DataConfig, StageConfig, in_section, section_config, stage_config

RESULT_KEYS = (
    "accuracy_generate", "accuracy_generate_ci", "accuracy_ppl", "accuracy_ppl_ci",
    "accuracy_generate_sft", "accuracy_generate_sft_ci", "accuracy_ppl_sft", "accuracy_ppl_sft_ci",
    "accuracy_generate_vs_sft", "accuracy_generate_vs_sft_ci",
    "accuracy_ppl_vs_sft", "accuracy_ppl_vs_sft_ci",
    "accuracy_ppl_vs_generate", "accuracy_ppl_vs_generate_ci",
    "confusion_generate", "confusion_generate_sft", "confusion_ppl", "confusion_ppl_sft",
    "unparseable_frac", "unparseable_frac_sft", "labels", "eval_examples", "train_prompt", "eval_prompt",
    "method", "wall_time_s",
)  # fmt: skip
SOURCES = ("synthetic", "files")
EVAL_VERSION = 2  # 2: accuracy_ppl_vs_generate


@dataclasses.dataclass(frozen=True)
class ClsConfig:
    """The `cls` section: the task and how it is prompted, decoded and evaluated.

    Attributes:
      source: "synthetic" (the embedded task, `classification.synthetic_splits`) or "files"
        (`data.path`, `data.eval_path`: GLUE-style TSV or JSONL; without `eval_path`, a seeded
        `data.eval_fraction` of `data.path` is held out).
      num_classes, num_train, num_eval, ambiguous_rate, noise_rate: the synthetic task's.
      train_prompt, eval_prompt: the prompt strategies (`classification.STRATEGIES`) of training (SFT
        and RL) and of evaluation, chosen independently.
      shots: demonstrations of the "fewshot" strategy (from the training split, fixed by the seed).
      by: perplexity decoding's score, "mean" (per label token) or "sum".
      with_eos: perplexity decoding scores EOS after the label too.
      max_new_tokens: greedy generation budget at evaluation.
      num_eval_examples: held-out examples evaluated (0: all).
      bootstrap: resamples of the intervals.
    """

    source: str = "synthetic"
    num_classes: int = 4
    num_train: int = 1024
    num_eval: int = 256
    ambiguous_rate: float = 0.3
    noise_rate: float = 0.1
    train_prompt: str = "plain"
    eval_prompt: str = "plain"
    shots: int = 2
    by: str = "mean"
    with_eos: bool = False
    max_new_tokens: int = 8
    num_eval_examples: int = 0
    bootstrap: int = 1000

    def __post_init__(self):
        strategies = classification.STRATEGIES
        checks = (
            ("source", self.source in SOURCES, f"one of {SOURCES}"),
            ("train_prompt", self.train_prompt in strategies, f"one of {strategies}"),
            ("eval_prompt", self.eval_prompt in strategies, f"one of {strategies}"),
            ("by", self.by in classify.BY, f"one of {classify.BY}"),
            ("shots", self.shots >= 1, ">= 1"),
            ("max_new_tokens", self.max_new_tokens >= 1, ">= 1"),
            ("num_eval_examples", self.num_eval_examples >= 0, ">= 0 (0: all)"),
            ("bootstrap", self.bootstrap >= 1, ">= 1"),
            ("num_train", self.num_train >= 1, ">= 1"),
            ("num_eval", self.num_eval >= 1, ">= 1"),
        )  # fmt: skip
        for field, ok, want in checks:
            if not ok:
                raise ValueError(f"{field} must be {want}, got {getattr(self, field)!r}")
        if self.source == "synthetic":
            classification.synthetic_labels(self.num_classes)  # raises for an impossible num_classes

    def strategy(self, which: str) -> classification.Strategy:
        return classification.Strategy(getattr(self, f"{which}_prompt"), shots=self.shots)


@dataclasses.dataclass(frozen=True)
class Plan:
    """The `gencls` pipeline: `sft` and `main` (the RL stage) stage configs, whose `data` holds the
    shapes, tokenizer and the user's paths; `grpo` the online loop; `cls` the task and evaluation;
    `rewards` (name, weight, hyperparameters) without the label set, which the data binds."""

    sft: StageConfig
    main: StageConfig
    grpo: grpo.GRPOConfig
    cls: ClsConfig
    rewards: tuple
    ppo: ppo_lib.PPOConfig | None = None  # with grpo.estimator "gae": PPO with a critic


def _reward_specs(section) -> tuple:
    """`config.rewards` as (name, weight, hyperparameters); checked with a placeholder label set."""
    out = []
    for name in sorted(section):
        entry = dict(section[name])
        weight = float(entry.pop("weight", 1.0))
        if "labels" in entry:
            raise ValueError(
                f"config.rewards.{name}.labels: the label set comes from the data; do not set it"
            )
        rewards.make(name, **entry, **({"labels": ("a", "b")} if name == "label_match" else {}))
        out.append((name, weight, tuple(sorted(entry.items()))))
    if not out:
        raise ValueError("config.rewards is empty: give e.g. rewards.label_match.weight=1.0")
    return tuple(out)


def plan(config) -> Plan:
    """Validates an experiment's ConfigDict into the `gencls` pipeline's configs."""
    cls_cfg = section_config(ClsConfig, config, "cls")
    if cls_cfg.source == "files" and not config.data.get("path"):
        raise ValueError(
            "this experiment classifies your files and needs --config.data.path=TRAIN.tsv (GLUE-style TSV "
            "with a header: SST-2 sentence/label, MNLI or RTE sentence1/sentence2/label; or JSONL "
            "text/label), optionally --config.data.eval_path=DEV.tsv (else data.eval_fraction is held out)"
        )
    section = dict(config.grpo)
    section.pop("eval_reward", None)
    specs = _reward_specs(config.rewards)
    loop = in_section("grpo", grpo.GRPOConfig, **section, rewards=specs)
    return Plan(
        sft=stage_config(config, "sft"),
        main=stage_config(config, "train"),
        grpo=loop,
        cls=cls_cfg,
        rewards=specs,
        ppo=grpo.ppo_config(config, loop, has_reward_model=False),
    )


# ----------------------------------------------------------------------------------------------------
# Data: the splits, rendered, written by content.


def load_splits(cfg: ClsConfig, data: DataConfig, seed: int) -> classification.Splits:
    """The train and held-out examples: the synthetic task from `data.synthetic_seed`, or the files."""
    if cfg.source == "synthetic":
        return classification.synthetic_splits(
            seed=data.synthetic_seed, num_classes=cfg.num_classes, num_train=cfg.num_train,
            num_eval=cfg.num_eval, ambiguous_rate=cfg.ambiguous_rate, noise_rate=cfg.noise_rate,
        )  # fmt: skip
    train, labels, stats = classification.load_classification(data.preference_path, strict=data.strict)
    print(f"classification data: {stats.summary()}", flush=True)
    if data.eval_path:
        held, _, stats = classification.load_classification(data.eval_path, labels=labels, strict=data.strict)
        print(f"held-out data: {stats.summary()}", flush=True)
    else:
        order = np.random.default_rng([seed, 3]).permutation(len(train))
        n = max(1, int(len(train) * data.eval_fraction))
        held, train = [train[i] for i in order[:n]], [train[i] for i in order[n:]]
    if not train or not held:
        raise ValueError(
            f"no usable examples in {data.preference_path!r} / {data.eval_path!r}; see the counts"
        )
    return classification.Splits(train=train, eval=held, labels=labels)


def rendered(splits: classification.Splits, cfg: ClsConfig, which: str, seed: int):
    """(prompts, targets) of the training ("train") or held-out ("eval") split under that strategy."""
    strategy = cfg.strategy(which)
    demos = ()
    if strategy.name == "fewshot":
        demos = classification.demonstrations(
            splits.train, len(splits.labels.names), strategy.shots, seed=seed
        )
    examples = splits.train if which == "train" else splits.eval
    prompts = [classification.render(e, splits.labels, strategy, demos=demos) for e in examples]
    targets = [classification.target(e, splits.labels, strategy) for e in examples]
    return prompts, targets


def write_data(workdir: str, splits: classification.Splits, cfg: ClsConfig, seed: int) -> tuple[str, str]:
    """Writes the SFT examples and held-out pairs (prompt, gold label vs the next label) as JSONL under
    WORKDIR/data/{digest}/; returns their paths (the stages' fingerprints hash their contents)."""
    prompts, targets = rendered(splits, cfg, "train", seed)
    sft_rows = [{"prompt": p, "completion": t} for p, t in zip(prompts, targets, strict=True)]
    strategy = cfg.strategy("train")  # the SFT stage's held-out NLL: the training strategy's prompts
    demos = (
        classification.demonstrations(splits.train, len(splits.labels.names), strategy.shots, seed=seed)
        if strategy.name == "fewshot"
        else ()
    )
    k = len(splits.labels.names)
    eval_rows = [
        {
            "prompt": classification.render(e, splits.labels, strategy, demos=demos),
            "chosen": classification.target(e, splits.labels, strategy),
            "rejected": classification.target(
                dataclasses.replace(e, label=(e.label + 1) % k), splits.labels, strategy
            ),
        }
        for e in splits.eval
    ]
    text = {name: "".join(json.dumps(r) + "\n" for r in rows) for name, rows in
            (("sft", sft_rows), ("eval", eval_rows))}  # fmt: skip
    digest = hashlib.sha256((text["sft"] + text["eval"]).encode()).hexdigest()[:12]
    directory = os.path.join(workdir, "data", digest)
    paths = tuple(os.path.join(directory, f"{name}.jsonl") for name in ("sft", "eval"))
    if workdir_io.is_main():
        os.makedirs(directory, exist_ok=True)
        for path, name in zip(paths, ("sft", "eval"), strict=True):
            if not os.path.exists(path):
                with open(path + ".tmp", "w", encoding="utf-8") as f:
                    f.write(text[name])
                os.replace(path + ".tmp", path)
    return paths


def stage_data(data: DataConfig, sft_path: str, eval_path: str) -> DataConfig:
    """The stages' DataConfig: the written files as plain prompt/completion text, the user's shapes."""
    return DataConfig(
        task="tldr", tokenizer=data.tokenizer, sft_path=sft_path, eval_path=eval_path, format="",
        strict=True, chat_template="none", max_len=data.max_len, max_prompt_len=data.max_prompt_len,
        vocab_size=data.vocab_size,
    )  # fmt: skip


# ----------------------------------------------------------------------------------------------------
# Evaluation.


def confusion(gold_N: np.ndarray, pred_N: np.ndarray, rows: int, cols: int) -> list[list[int]]:
    """Counts [rows, cols] of (gold, predicted) pairs."""
    out = np.zeros((rows, cols), np.int64)
    np.add.at(out, (gold_N, pred_N), 1)
    return out.tolist()


def generate_predictions(model, params, tokenizer, prompts, labels, *, max_new_tokens, max_prompt_len, seed):
    """Greedy answers parsed to label indices: 0..K-1, K for "uncertain" or unparseable; and a mask of
    the unparseable ones."""
    P = len(prompts)
    pb = pipeline.tokenize_prompts(prompts, tokenizer, max_prompt_len).batch(np.arange(P), max_prompt_len)
    out = sampling.sample(
        model, params, pb["prompt_tokens"], pb["prompt_lengths"],
        config=sampling.SamplingConfig(max_new_tokens=max_new_tokens, greedy=True), num_samples=1,
        rng=jax.random.key(seed), eos_id=tokenizer.eos_ids, pad_id=tokenizer.pad_id, prompt_ids=np.arange(P),
    )  # fmt: skip
    texts = [t[0] for t in evaluation.decode_completions(tokenizer, out.tokens_PNT, out.lengths_PN)]
    parsed = [classification.parse_answer(t, labels, extra=(classification.UNCERTAIN,)) for t in texts]
    K = len(labels.names)
    pred = np.array([K if p is None else min(p, K) for p in parsed], np.int64)
    return pred, np.array([p is None for p in parsed]), texts


def evaluate_classifier(*, model, policy_params, sft_params, tokenizer, splits, cfg: ClsConfig, seed: int,
                        max_prompt_len: int, batch_size: int) -> dict:  # fmt: skip
    """The module docstring's evaluation of the RL and the SFT policy on the held-out split."""
    prompts, _ = rendered(splits, cfg, "eval", seed)
    examples = splits.eval
    if cfg.num_eval_examples:
        prompts, examples = prompts[: cfg.num_eval_examples], examples[: cfg.num_eval_examples]
    labels, strategy = splits.labels, cfg.strategy("eval")
    gold_N = np.array([e.label for e in examples], np.int64)
    K = len(labels.names)
    candidates = classification.label_strings(labels, strategy)
    if strategy.name == "reason":  # perplexity decoding scores the answer after the reason's mark
        candidates = tuple(f"{classification.ANSWER_MARK} {c}" for c in candidates)
    candidates = tuple(" " + c for c in candidates)  # as the SFT stage joins prompt and completion
    ci = functools.partial(evaluation.bootstrap_ci, resamples=cfg.bootstrap, seed=seed)
    out = {"eval_examples": len(examples), "labels": list(labels.names), "ppl_candidates": list(candidates)}
    correct = {}
    for suffix, params in (("", policy_params), ("_sft", sft_params)):
        pred, unparseable, texts = generate_predictions(
            model, params, tokenizer, prompts, labels, max_new_tokens=cfg.max_new_tokens,
            max_prompt_len=max_prompt_len, seed=seed,
        )  # fmt: skip
        scores = classify.score_labels(
            params, prompts, candidates, model=model, tokenizer=tokenizer, max_prompt_len=max_prompt_len,
            by=cfg.by, with_eos=cfg.with_eos, batch_size=batch_size,
        )  # fmt: skip
        gen_ok = (pred == gold_N).astype(np.float64)
        ppl_ok = (scores.prediction_N == gold_N).astype(np.float64)
        correct[suffix] = (gen_ok, ppl_ok)
        out.update({
            f"accuracy_generate{suffix}": float(gen_ok.mean()), f"accuracy_generate{suffix}_ci": ci(gen_ok),
            f"accuracy_ppl{suffix}": float(ppl_ok.mean()), f"accuracy_ppl{suffix}_ci": ci(ppl_ok),
            f"confusion_generate{suffix}": confusion(gold_N, pred, K, K + 1),
            f"confusion_ppl{suffix}": confusion(gold_N, scores.prediction_N, K, len(candidates)),
            f"unparseable_frac{suffix}": float(unparseable.mean()),
            f"examples_generate{suffix}": texts[:8],
        })  # fmt: skip
    for i, kind in enumerate(("generate", "ppl")):
        diff = correct[""][i] - correct["_sft"][i]
        out[f"accuracy_{kind}_vs_sft"] = float(diff.mean())
        out[f"accuracy_{kind}_vs_sft_ci"] = ci(diff)  # paired: the same resampled examples for both
    # Perplexity decoding against free generation, the RL policy's, paired on the same examples.
    diff = correct[""][1] - correct[""][0]
    out["accuracy_ppl_vs_generate"], out["accuracy_ppl_vs_generate_ci"] = float(diff.mean()), ci(diff)
    return out


def format_table(results: dict, title: str) -> str:
    """The headline numbers as a plain-text table."""
    fmt = functools.partial(evaluation.format_value, results)
    return evaluation.render_table(
        title,
        [
            ("held-out accuracy, greedy generation (RL)", fmt("accuracy_generate")),
            ("held-out accuracy, greedy generation (SFT)", fmt("accuracy_generate_sft")),
            ("  RL − SFT (paired)", fmt("accuracy_generate_vs_sft")),
            ("held-out accuracy, perplexity decoding (RL)", fmt("accuracy_ppl")),
            ("held-out accuracy, perplexity decoding (SFT)", fmt("accuracy_ppl_sft")),
            ("  RL − SFT (paired)", fmt("accuracy_ppl_vs_sft")),
            ("unparseable greedy answers (RL / SFT)",
             f"{fmt('unparseable_frac')} / {fmt('unparseable_frac_sft')}"),
            ("wall time (s)", fmt("wall_time_s")),
        ],
    )  # fmt: skip


# ----------------------------------------------------------------------------------------------------
# The pipeline.


def run_pipeline(plan: Plan, workdir: str, *, reuse_from: tuple[str, ...] = ()) -> dict:
    """Runs data → SFT → online RL → evaluation (module docstring); writes results.json."""
    start = time.perf_counter()
    seed = plan.main.seed
    splits = load_splits(plan.cls, plan.main.data, seed)
    sft_path, eval_path = write_data(workdir, splits, plan.cls, seed)
    data = stage_data(plan.main.data, sft_path, eval_path)
    locate = functools.partial(fingerprints.locate, workdir, reuse_from=reuse_from)

    # SFT on the label tokens.
    ran = [sft.run_stage(dataclasses.replace(plan.sft, data=data), locate)]
    sft_dir = ran[-1].dir
    tokenizer = load_tokenizer(sft_dir)

    # Online RL with the label reward (the label set bound from the data).
    labels = splits.labels
    specs = tuple(
        (name, weight, tuple(sorted({**dict(h), "labels": labels.names, "numeric": labels.numeric}.items())))
        if name == "label_match" else (name, weight, h)
        for name, weight, h in plan.rewards
    )  # fmt: skip
    loop = dataclasses.replace(plan.grpo, rewards=specs)
    cfg = dataclasses.replace(plan.main, data=data, init_from=plan.main.init_from or sft_dir)
    prompts, _ = rendered(splits, plan.cls, "train", seed)
    answers = [e.target if e.target is not None else e.label for e in splits.train]
    task = grpo.RLTask(prompts=prompts, columns={"answer": answers}, reward=grpo.task_reward(specs))
    # PPO (grpo.estimator "gae"): a separate critic starts from the SFT stage, or shares the policy's.
    critic_from = sft_dir if plan.ppo is not None and not plan.ppo.shared else ""
    policy_spec = grpo.spec(cfg, loop, ppo=plan.ppo, critic_from=critic_from)
    ran.append(locate("policy", policy_spec, done=workdir_io.stage_done))
    policy_dir = ran[-1].dir
    stage_results = grpo.run(cfg, policy_dir, grpo=loop, task=task, tokenizer=tokenizer, name="gencls",
                             ppo=plan.ppo, critic_from=critic_from)  # fmt: skip

    # Evaluate the RL and the SFT policy.
    # `EVAL_VERSION`: what the evaluation computes (a cached one without a later key is recomputed).
    eval_spec = {"cls": plan.cls, "sft": fingerprints.stage_input(sft_dir), "seed": seed,
                 "data": fingerprints.data_spec(data), "version": EVAL_VERSION}  # fmt: skip
    path = os.path.join(policy_dir, f"evaluation_{fingerprints.fingerprint(eval_spec)[:12]}.json")
    if os.path.exists(path):
        ev = workdir_io.read_json(path)
    else:
        mesh = sharding.make_mesh(cfg.mesh)
        model, policy_params = workdir_io.load_lm(policy_dir, mesh)
        _, sft_params = workdir_io.load_lm(sft_dir, mesh)
        ev = evaluate_classifier(
            model=model, policy_params=policy_params, sft_params=sft_params, tokenizer=tokenizer,
            splits=splits, cfg=plan.cls, seed=seed, max_prompt_len=data.max_prompt_len,
            batch_size=cfg.train.eval_batch_size,
        )  # fmt: skip
        workdir_io.write_json(path, ev)
    results = {
        **{k: ev.get(k) for k in RESULT_KEYS if k in ev},
        **ev,
        "train_prompt": plan.cls.train_prompt,
        "eval_prompt": plan.cls.eval_prompt,
        "method": grpo.method(loop),
        **grpo.training_summary(policy_dir, loop),
        "grpo": dataclasses.asdict(loop),
        **({"ppo": dataclasses.asdict(plan.ppo)} if plan.ppo is not None else {}),
        "training": stage_results,
        "sft": workdir_io.read_results(sft_dir),
        "wall_time_s": time.perf_counter() - start,
    }
    results = fingerprints.finish(workdir, results, ran, final="policy")
    if workdir_io.is_main():
        source = "synthetic" if plan.cls.source == "synthetic" else "files"
        print("\n" + format_table(results, f"Classification as generation ({source}): {results['method']}"))
    return results
