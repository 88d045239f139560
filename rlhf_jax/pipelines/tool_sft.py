"""Token-weighted SFT on the embedded tool-calling task, evaluated by greedy calls on held-out requests.
The `tool_sft` pipeline: SFT → evaluation.

    results = tool_sft.run_pipeline(tool_sft.plan(config), workdir)

Data: the embedded tool task (`data.task=tools`, `rlhf_jax.data.synthetic_tools`): a prompt offering a few
tools with shared-prefix names and a request whose wording names one of them; the completion is one JSON
call. `data.tool_weights` chooses the SFT token weights: "uniform" (plain SFT) or "pkt" (TL-Training's
"prioritizing key tokens", arXiv 2412.15495: the first token of the called name and the token where it
parts from an offered sibling weigh min((N − K)/K, 9), `data.tool_weights`), on the same examples. The
weights enter the SFT stage's fingerprint through `data.tool_weights`, so the two runs never share it.

Evaluation: greedy decoding (no sampling) of the SFT policy on the first `eval.num_prompts` held-out
requests (0 = all), each output read by `synthetic_tools.parse_call` (the whole output must be one JSON
object with a string "name" and an object "arguments"). `results.json`: tool_name_accuracy (the called
name is the right tool; an unparseable output is wrong), call_exact_match (name and arguments right),
json_valid (the output parses as a call), and tool_name_accuracy_lenient (the first `"name": "..."` of
the output is the right tool, whether or not the rest parses: the choice of tool apart from the call's
form), each with a 95% bootstrap interval over requests (`_ci95`); tool_name_accuracy_by_tool;
eval_prompts; the SFT stage's eval_nll_per_token (unweighted) and steps; wall_time_s.
WORKDIR/tool_calls.jsonl holds every request's output and scores.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import os
import time

import jax
import numpy as np

from rlhf_jax import sampling, sharding
from rlhf_jax.data import pipeline, synthetic_tools
from rlhf_jax.data import records as rec
from rlhf_jax.data.tokenizer import load_tokenizer
from rlhf_jax.pipelines import evaluation, fingerprints, sft, tasks
from rlhf_jax.pipelines import workdir as workdir_io
from rlhf_jax.pipelines.config import StageConfig, section_config, stage_config

METRICS = ("tool_name_accuracy", "call_exact_match", "json_valid", "tool_name_accuracy_lenient")


@dataclasses.dataclass(frozen=True)
class ToolEvalConfig:
    """Attributes: num_prompts (held-out requests, 0 = all), max_new_tokens of each greedy call, and
    bootstrap resamples of the intervals."""

    num_prompts: int = 0
    max_new_tokens: int = 40
    bootstrap: int = 1000

    def __post_init__(self):
        if self.num_prompts < 0 or self.max_new_tokens < 1 or self.bootstrap < 1:
            raise ValueError(
                f"need num_prompts >= 0, max_new_tokens >= 1 and bootstrap >= 1, got {self.num_prompts}, "
                f"{self.max_new_tokens}, {self.bootstrap}"
            )


def score_outputs(texts: list[str], examples: list[rec.SFTExample], *, bootstrap: int, seed: int) -> dict:
    """The module docstring's metrics of greedy outputs `texts` against the gold calls of `examples`."""
    scores_X3 = np.array(
        [
            synthetic_tools.score_call(text, ex.meta["tool"], ex.meta["arguments"])
            for text, ex in zip(texts, examples, strict=True)
        ],
        np.float64,
    ).reshape(-1, 3)
    name_X = scores_X3[:, 1]
    out = {"eval_prompts": len(texts)}
    for key, values_X in zip(
        ("json_valid", "tool_name_accuracy", "call_exact_match"), scores_X3.T, strict=True
    ):
        out[key] = float(values_X.mean())
        out[key + "_ci95"] = evaluation.bootstrap_ci(values_X, resamples=bootstrap, seed=seed)
    first_X = np.array(
        [
            synthetic_tools.first_name(text) == ex.meta["tool"]
            for text, ex in zip(texts, examples, strict=True)
        ],
        np.float64,
    )
    out["tool_name_accuracy_lenient"] = float(first_X.mean())
    out["tool_name_accuracy_lenient_ci95"] = evaluation.bootstrap_ci(first_X, resamples=bootstrap, seed=seed)
    tools = np.array([ex.meta["tool"] for ex in examples])
    out["tool_name_accuracy_by_tool"] = {t: float(name_X[tools == t].mean()) for t in sorted(set(tools))}
    return out


def evaluate_calls(*, model, params, tokenizer, examples: list[rec.SFTExample], config: ToolEvalConfig,
                   seed: int, max_prompt_len: int) -> tuple[dict, list[str]]:  # fmt: skip
    """Greedy calls of `params` on `examples` (the first `config.num_prompts`), scored; returns the
    metrics and the output texts."""
    examples = examples[: config.num_prompts] if config.num_prompts else examples
    pb = pipeline.tokenize_prompts([ex.prompt for ex in examples], tokenizer, max_prompt_len).batch(
        np.arange(len(examples)), max_prompt_len
    )
    out = sampling.sample(
        model, params, pb["prompt_tokens"], pb["prompt_lengths"],
        config=sampling.SamplingConfig(max_new_tokens=config.max_new_tokens, greedy=True), num_samples=1,
        rng=jax.random.key(seed), eos_id=tokenizer.eos_ids, pad_id=tokenizer.pad_id,
    )  # fmt: skip
    texts = [row[0] for row in evaluation.decode_completions(tokenizer, out.tokens_PNT, out.lengths_PN)]
    return score_outputs(texts, examples, bootstrap=config.bootstrap, seed=seed), texts


def format_table(results: dict, title: str) -> str:
    """A plain-text table of the headline numbers."""
    fmt = functools.partial(evaluation.format_value, results)
    return evaluation.render_table(
        title,
        [
            ("tool name accuracy (greedy)", fmt("tool_name_accuracy")),
            ("  first name in the output, parsed or not", fmt("tool_name_accuracy_lenient")),
            ("call exact match (name and arguments)", fmt("call_exact_match")),
            ("valid JSON call", fmt("json_valid")),
            ("held-out NLL per token (unweighted)", fmt("eval_nll_per_token")),
            ("wall time (s)", fmt("wall_time_s")),
        ],
    )


# ----------------------------------------------------------------------------------------------------
# The `tool_sft` pipeline: SFT → evaluation.


@dataclasses.dataclass(frozen=True)
class Plan:
    """The `tool_sft` pipeline: the SFT stage (`main`, from the `sft` section) and the evaluation."""

    main: StageConfig
    eval: ToolEvalConfig


def plan(config) -> Plan:
    """Validates an experiment's ConfigDict into the `tool_sft` pipeline's configs."""
    main = stage_config(config, "sft")
    if main.data.task != "tools":
        raise ValueError(f"the tool_sft pipeline trains on data.task='tools', got {main.data.task!r}")
    return Plan(main=main, eval=section_config(ToolEvalConfig, config, "eval"))


def run_pipeline(plan: Plan, workdir: str, *, reuse_from: tuple[str, ...] = ()) -> dict:
    """Runs the SFT stage in WORKDIR/sft/{fingerprint}/, then the evaluation; writes results.json."""
    start = time.perf_counter()
    cfg = plan.main
    locate = functools.partial(fingerprints.locate, workdir, reuse_from=reuse_from)
    stage = sft.run_stage(cfg, locate)
    stage_results = workdir_io.read_results(stage.dir)
    tokenizer = load_tokenizer(stage.dir)
    task = tasks.load_task(cfg.data, cfg.seed, tokenizer=tokenizer)
    model, params = workdir_io.load_lm(stage.dir, sharding.make_mesh(cfg.mesh))
    ev, texts = evaluate_calls(
        model=model, params=params, tokenizer=tokenizer, examples=task.eval_prompts, config=plan.eval,
        seed=cfg.seed, max_prompt_len=cfg.data.max_prompt_len,
    )  # fmt: skip
    results = {
        "method": f"sft/{cfg.data.tool_weights}",
        **ev,
        "eval_nll_per_token": stage_results.get("eval_nll_per_token"),
        "steps": cfg.train.steps,
        "wall_time_s": time.perf_counter() - start,
    }
    if workdir_io.is_main():
        with open(os.path.join(workdir, "tool_calls.jsonl"), "w", encoding="utf-8") as f:
            for ex, text in zip(task.eval_prompts, texts, strict=False):
                row = {
                    "prompt": ex.prompt,
                    "output": text,
                    "tool": ex.meta["tool"],
                    "arguments": ex.meta["arguments"],
                }
                valid, name_ok, exact = synthetic_tools.score_call(
                    text, ex.meta["tool"], ex.meta["arguments"]
                )
                f.write(
                    json.dumps({**row, "json_valid": valid, "tool_name_correct": name_ok, "exact": exact})
                    + "\n"
                )
    results = fingerprints.finish(workdir, results, [stage], final="sft")
    if workdir_io.is_main():
        print("\n" + format_table(results, f"Tool-calling SFT: {results['method']}"))
    return results
