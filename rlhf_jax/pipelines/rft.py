"""Rejection-sampling fine-tuning (RFT) on a math task: SFT → K rounds of (sample, verify, dedup, SFT).

    python -m launch.train --experiment=rft_arith
    python -m launch.train --experiment=rft_arith:smoke

RFT (Yuan et al. 2023, arXiv 2308.01825), the data recipe of OpenMathInstruct-2 (arXiv 2410.01560) and
Light-R1 (arXiv 2503.10460). With π_0 the SFT policy, for round k = 1..K:

  1. sample N solutions y_1..y_N ~ π_{k-1}(·|p) of each of the first `num_problems` training problems p
     (temperature, top-k), each problem's samples seeded by (seed, k, its index);
  2. verify each against the gold answer with the answer checker `reward` (verified iff its reward is
     >= 1, the checker's full mark: on `arith`, `rewards.gsm8k`, the number after `####` is the gold);
  3. keep D_k = ∪_p {(p, y) : y ∈ dedup(verified y of p)} (`rlhf_jax.rft.select`: exact text after
     whitespace normalisation, per problem);
  4. SFT on D_k (the SFT stage, `sft.run(examples=...)`) for ceil(epochs · |D_k| / batch_size) steps of
     the `train` section's optimizer, starting from π_{k-1} (`init="previous"`: Light-R1's staged SFT,
     each stage continuing from the last; expert iteration) or from π_0 (`init="sft"`: ReST-EM, Singh et
     al. 2023 arXiv 2312.06585 Sec. 3, which restarts each iteration from the base model against drift;
     Yuan et al.'s single round also trains from the base model). The result is π_k;
  5. evaluate π_k on the held-out problems against π_0 (`math_eval`): `accuracy` (greedy) and
     `accuracy_vs_sft`, the paired difference accuracy(π_k) − accuracy(π_0) on the same problems with its
     paired bootstrap interval (`accuracy_vs_sft_ci95`), plus pass@k, distinct correct and KL to π_0.

Not done here (documented differences): the round's data is D_k alone, not D_k ∪ the demonstrations
(Yuan et al. add the SFT data; with `init="previous"` the policy already holds it), and dedup is on whole
texts, not Yuan et al.'s equation lists. A round with no verified sample (|D_k| = 0, e.g. an untrained
smoke-size SFT policy) trains nothing: its policy is the one it would have started from, and it says so
(`trained: false`).

Stages, each in WORKDIR/{stage}/{fingerprint}/ and reused when its fingerprint matches, so a killed run
resumes at the round (and SFT step) it stopped in: `sft` (the SFT stage, shared with `grpo_arith`'s when
the sections agree), then per round `round_{k}/samples` (samples.jsonl: every problem's N solutions and
verdicts; selection.json: the counts) and `round_{k}/policy` (an SFT stage on `sft_records.jsonl`, the kept
pairs, and its evaluation). WORKDIR/metrics.jsonl has one record per round (`step` = the round) and
results.json the last round's numbers on top with every round under `rounds`.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import math
import os
import time

import numpy as np

from rlhf_jax import rewards, sampling, sharding
from rlhf_jax import rft as rft_lib
from rlhf_jax.data import pipeline
from rlhf_jax.data import records as rec
from rlhf_jax.data.tokenizer import load_tokenizer
from rlhf_jax.pipelines import candidates, evaluation, fingerprints, math_eval, sft, tasks
from rlhf_jax.pipelines import workdir as workdir_io
from rlhf_jax.pipelines.config import StageConfig, section_config, stage_config

INITS = ("previous", "sft")
# The RFTConfig fields that determine a round's samples (with the policy sampled and the checker).
SAMPLING_FIELDS = ("num_samples", "num_problems", "temperature", "top_k", "max_new_tokens", "reward")
# Per-round numbers in metrics.jsonl and results.json's `rounds`.
ROUND_EVAL_KEYS = ("accuracy", "accuracy_ci95", "accuracy_vs_sft", "accuracy_vs_sft_ci95", "pass_at_k",
                   "distinct_correct", "kl_to_sft", "mean_response_length")  # fmt: skip
COUNT_KEYS = ("problems", "problems_solved", "samples", "verified", "kept", "duplicates")


@dataclasses.dataclass(frozen=True)
class RFTConfig:
    """The rounds' settings (the SFT optimizer and batch size are the `train` section's).

    Attributes:
      rounds: K.
      num_samples: N solutions sampled per problem per round.
      num_problems: training problems sampled (the task's first this many; 0 = all).
      temperature, top_k, max_new_tokens: the sampling policy.
      epochs: SFT passes over a round's kept pairs: ceil(epochs · kept / batch_size) steps.
      init: where round k's SFT starts: "previous" (π_{k-1}) or "sft" (π_0); module docstring.
      reward: the answer checker (a registered reward; verified iff >= 1), also the evaluation's.
    """

    rounds: int = 2
    num_samples: int = 4
    num_problems: int = 0
    temperature: float = 1.0
    top_k: int = 0
    max_new_tokens: int = 56
    epochs: float = 3.0
    init: str = "previous"
    reward: str = "gsm8k"

    def __post_init__(self):
        checks = (
            ("rounds", self.rounds >= 1, ">= 1"),
            ("num_samples", self.num_samples >= 1, ">= 1"),
            ("num_problems", self.num_problems >= 0, ">= 0 (0: all)"),
            ("temperature", self.temperature > 0, "> 0"),
            ("top_k", self.top_k >= 0, ">= 0 (0: off)"),
            ("max_new_tokens", self.max_new_tokens >= 1, ">= 1"),
            ("epochs", self.epochs > 0, "> 0"),
            ("init", self.init in INITS, f"one of {INITS}"),
        )
        for field, ok, want in checks:
            if not ok:
                raise ValueError(f"rft.{field} must be {want}, got {getattr(self, field)!r}")

    def sampling(self) -> sampling.SamplingConfig:
        return sampling.SamplingConfig(
            max_new_tokens=self.max_new_tokens, temperature=self.temperature, top_k=self.top_k
        )


# ----------------------------------------------------------------------------------------------------
# Pure helpers: records from a selection, steps, where a round starts.


def sft_records(problems: list[rec.MathExample], selection: rft_lib.Selection) -> list[rec.SFTExample]:
    """The kept `(problem, solution)` pairs as SFT examples: the problem's prompt, the sampled text."""
    return [
        rec.SFTExample(problems[p].prompt, solution, meta={"problem": p}) for p, solution in selection.kept
    ]


def round_steps(kept: int, *, epochs: float, batch_size: int) -> int:
    """SFT steps of a round: ceil(epochs · kept / batch_size) (0 when nothing was kept)."""
    return math.ceil(epochs * kept / batch_size) if kept else 0


def round_init(init: str, *, sft_dir: str, previous_dir: str) -> str:
    """The policy a round's SFT starts from: the previous round's (`init="previous"`) or the SFT one."""
    if init not in INITS:
        raise ValueError(f"rft.init must be one of {INITS}, got {init!r}")
    return previous_dir if init == "previous" else sft_dir


def check_counts(counts: dict, *, num_samples: int) -> None:
    """Raises unless a round's counts are consistent: kept + duplicates = verified <= samples = N · problems,
    problems_solved <= min(problems, kept)."""
    c = counts
    ok = (
        c["samples"] == num_samples * c["problems"]
        and c["kept"] + c["duplicates"] == c["verified"] <= c["samples"]
        and c["problems_solved"] <= min(c["problems"], c["kept"])
    )
    if not ok:
        raise ValueError(f"inconsistent RFT selection counts {c} (N = {num_samples})")


def read_samples(path: str) -> tuple[list[list[str]], list[list[bool]]]:
    """A round's samples.jsonl as (solutions_PN, correct_PN); a bad line raises naming file, line, field."""
    solutions, correct = [], []
    with open(path, encoding="utf-8") as f:
        for n, line in enumerate(f, 1):
            try:
                row = json.loads(line)
            except json.JSONDecodeError as e:
                raise ValueError(f"{path}:{n}: not JSON ({e})") from e
            for key in ("solutions", "correct"):
                if not isinstance(row.get(key), list):
                    raise ValueError(f"{path}:{n}: field {key!r} missing or not a list")
            if len(row["solutions"]) != len(row["correct"]):
                raise ValueError(f"{path}:{n}: {len(row['solutions'])} solutions but {len(row['correct'])} "
                                 "verdicts")  # fmt: skip
            solutions.append([str(s) for s in row["solutions"]])
            correct.append([bool(v) for v in row["correct"]])
    return solutions, correct


# ----------------------------------------------------------------------------------------------------
# A round's samples.


def samples_spec(cfg: StageConfig, rft: RFTConfig, k: int, *, policy_dir: str) -> dict:
    """What round k's samples depend on: the policy sampled, the problems (data, seed), the round and
    the sampling settings (not `epochs` or `init`, so those variants share round 1's samples)."""
    return {
        "kind": "rft_samples",
        "round": k,
        "seed": cfg.seed,
        "data": fingerprints.data_spec(cfg.data),
        "policy": fingerprints.stage_input(policy_dir),
        **{f: getattr(rft, f) for f in SAMPLING_FIELDS},
    }


def _samples_done(stage_dir: str) -> bool:
    return os.path.exists(os.path.join(stage_dir, "samples.jsonl"))


def draw_and_verify(k: int, *, cfg: StageConfig, rft: RFTConfig, tokenizer, problems, policy_dir: str,
                    out_path: str) -> None:  # fmt: skip
    """Samples N solutions of every problem from the policy in `policy_dir`, verifies them and writes
    `out_path` (one JSON line per problem: problem, prompt, answer, solutions, correct)."""
    mesh = sharding.make_mesh(cfg.mesh)
    lm, params = workdir_io.load_lm(policy_dir, mesh)
    prompts = [p.prompt for p in problems]
    pb = pipeline.tokenize_prompts(prompts, tokenizer, cfg.data.max_prompt_len).batch(
        np.arange(len(problems)), cfg.data.max_prompt_len
    )
    tokens, lengths, _, _ = candidates.draw(
        lm, params, pb, num_samples=rft.num_samples, config=rft.sampling(), seed=cfg.seed * 1000 + k,
        tokenizer=tokenizer,
    )  # fmt: skip
    texts_PN = evaluation.decode_completions(tokenizer, tokens, lengths)
    N = rft.num_samples
    reward_N = rewards.make(rft.reward)(
        prompts=[q for q in prompts for _ in range(N)], completions=[t for row in texts_PN for t in row],
        answer=[p.answer for p in problems for _ in range(N)],
    )  # fmt: skip
    ok_PN = np.asarray(reward_N, np.float32).reshape(len(problems), N) >= 1.0
    workdir_io.write_jsonl(
        out_path,
        (
            {"problem": i, "prompt": p.prompt, "answer": p.answer, "solutions": texts_PN[i],
             "correct": [bool(v) for v in ok_PN[i]]}
            for i, p in enumerate(problems)
        ),
    )  # fmt: skip


# ----------------------------------------------------------------------------------------------------
# The pipeline.


@dataclasses.dataclass(frozen=True)
class Plan:
    """The `rft` pipeline's stage configs: SFT (`sft`), every round's SFT (`main`: its optimizer and
    batch size; the steps follow from the kept pairs), the rounds' settings and the math evaluation."""

    sft: StageConfig
    main: StageConfig
    rft: RFTConfig
    eval: math_eval.MathEvalConfig


def plan(config) -> Plan:
    """Validates an experiment's ConfigDict into the `rft` pipeline's stage configs."""
    if config.data.task not in ("arith", "math"):
        raise ValueError(f"rft needs a math task (data.task arith or math), got {config.data.task!r}")
    rft = section_config(RFTConfig, config, "rft")
    rewards.make(rft.reward)  # an unknown checker fails now, naming the registered ones
    return Plan(
        sft=stage_config(config, "sft"),
        main=stage_config(config, "train"),
        rft=rft,
        eval=section_config(math_eval.MathEvalConfig, config, "eval"),
    )


def _evaluation_path(policy_dir: str, eval_spec: dict) -> str:
    return os.path.join(policy_dir, f"evaluation_{fingerprints.fingerprint(eval_spec)[:12]}.json")


def format_rounds(rounds: list[dict]) -> str:
    """The rounds as a plain-text table."""
    header = ("round", "solved", "verified", "kept", "dups", "steps", "accuracy", "vs SFT [95% CI]")
    lines = [" ".join(f"{h:>{w}}" for h, w in zip(header, _WIDTHS, strict=True))]
    for r in rounds:
        ci = r["accuracy_vs_sft_ci95"]
        vs = f"{r['accuracy_vs_sft']:+.3f} [{ci[0]:+.3f}, {ci[1]:+.3f}]"
        counts = (r[k] for k in ("round", "problems_solved", "verified", "kept", "duplicates", "sft_steps"))
        cells = (*counts, f"{r['accuracy']:.3f}", vs)
        lines.append(" ".join(f"{c:>{w}}" for c, w in zip(cells, _WIDTHS, strict=True)))
    return "\n".join(lines)


_WIDTHS = (5, 7, 9, 6, 6, 6, 9, 26)


def run_pipeline(plan: Plan, workdir: str, *, reuse_from: tuple[str, ...] = ()) -> dict:
    """Runs (or resumes) SFT and K rounds in `workdir` (module docstring); writes and returns results.json."""
    rft = plan.rft
    start = time.perf_counter()
    locate = functools.partial(fingerprints.locate, workdir, reuse_from=reuse_from)
    ran = [sft.run_stage(plan.sft, locate)]
    sft_dir = ran[-1].dir
    cfg = plan.main
    tokenizer = load_tokenizer(sft_dir)
    task = tasks.load_task(cfg.data, cfg.seed, tokenizer=tokenizer)
    if not task.problems:
        raise ValueError(f"data.task={cfg.data.task!r} has no training problems to sample")
    problems = task.problems[: rft.num_problems] if rft.num_problems else task.problems
    mesh = sharding.make_mesh(cfg.mesh)
    eval_spec = {"eval": plan.eval, "sft": fingerprints.stage_input(sft_dir), "seed": cfg.seed,
                 "data": fingerprints.data_spec(cfg.data), "eval_reward": rft.reward}  # fmt: skip
    sft_lm = functools.cache(lambda: workdir_io.load_lm(sft_dir, mesh))

    def evaluate(policy_dir: str) -> dict:
        """π's held-out evaluation against π_0, cached beside π by the evaluation's fingerprint."""
        path = _evaluation_path(policy_dir, eval_spec)
        if os.path.exists(path):
            return workdir_io.read_json(path)
        model, sft_params = sft_lm()
        params = sft_params if policy_dir == sft_dir else workdir_io.load_lm(policy_dir, mesh)[1]
        ev = math_eval.evaluate_math(
            model=model, policy_params=params, sft_params=sft_params, tokenizer=tokenizer,
            problems=task.eval_problems, correct=rewards.make(rft.reward), config=plan.eval, seed=cfg.seed,
            max_prompt_len=cfg.data.max_prompt_len, batch_size=cfg.train.eval_batch_size,
        )  # fmt: skip
        ev["accuracy_vs_sft"], ev["accuracy_vs_sft_ci95"] = ev["accuracy_gain"], ev["accuracy_gain_ci95"]
        workdir_io.write_json(path, ev)
        return ev

    rounds, previous_dir, ev = [], sft_dir, None
    for k in range(1, rft.rounds + 1):
        t0 = time.perf_counter()
        # Sample N solutions per problem from π_{k-1} and verify them.
        ran.append(locate(f"round_{k}/samples", samples_spec(cfg, rft, k, policy_dir=previous_dir),
                          done=_samples_done))  # fmt: skip
        samples_dir = ran[-1].dir
        samples_path = os.path.join(samples_dir, "samples.jsonl")
        if not os.path.exists(samples_path):
            draw_and_verify(k, cfg=cfg, rft=rft, tokenizer=tokenizer, problems=problems,
                            policy_dir=previous_dir, out_path=samples_path)  # fmt: skip
        solutions_PN, correct_PN = read_samples(samples_path)
        if len(solutions_PN) != len(problems):
            raise ValueError(f"{samples_path}: {len(solutions_PN)} problems, expected {len(problems)}")
        selection = rft_lib.select(solutions_PN, correct_PN)
        counts = selection.counts()
        check_counts(counts, num_samples=rft.num_samples)
        workdir_io.write_json(os.path.join(samples_dir, "selection.json"), counts)

        # SFT on the kept pairs from π_{k-1} or π_0.
        init_dir = round_init(rft.init, sft_dir=sft_dir, previous_dir=previous_dir)
        steps = round_steps(counts["kept"], epochs=rft.epochs, batch_size=cfg.train.batch_size)
        policy_dir, sft_results = init_dir, {}
        if steps:
            records = sft_records(problems, selection)
            round_cfg = dataclasses.replace(
                cfg, init_from=init_dir, train=dataclasses.replace(cfg.train, steps=steps)
            )
            ran.append(locate(f"round_{k}/policy", sft.spec(round_cfg, records), done=workdir_io.stage_done))
            policy_dir = ran[-1].dir
            records_path = os.path.join(policy_dir, "sft_records.jsonl")
            if not os.path.exists(records_path):  # written before training: inspectable while it runs
                rows = ({"problem": r.meta["problem"], "prompt": r.prompt, "completion": r.completion}
                        for r in records)  # fmt: skip
                workdir_io.write_jsonl(records_path, rows)
            sft_results = sft.run(round_cfg, policy_dir, name=f"rft round {k}", examples=records)

        # Evaluate π_k against π_0.
        ev = evaluate(policy_dir)
        rounds.append({
            "round": k, **counts, "trained": bool(steps), "sft_steps": steps,
            "init": "sft" if init_dir == sft_dir else f"round_{k - 1}",
            "policy": os.path.relpath(policy_dir, os.path.abspath(workdir)),
            "eval_nll_per_token": sft_results.get("eval_nll_per_token"),
            **{key: ev.get(key) for key in ROUND_EVAL_KEYS}, "round_s": time.perf_counter() - t0,
        })  # fmt: skip
        previous_dir = policy_dir

    workdir_io.write_jsonl(
        os.path.join(workdir, "metrics.jsonl"), ({"step": r["round"], **r} for r in rounds)
    )
    results = {
        **{key: ev.get(key) for key in math_eval.RESULT_KEYS if key != "wall_time_s"},
        "accuracy_vs_sft": ev["accuracy_vs_sft"],
        "accuracy_vs_sft_ci95": ev["accuracy_vs_sft_ci95"],
        **ev,
        "method": f"rft x{rft.rounds} (init={rft.init})",
        "rft": dataclasses.asdict(rft),
        "rounds": rounds,
        "samples_generated": sum(r["samples"] for r in rounds),
        "sft": workdir_io.read_results(sft_dir),
        "wall_time_s": time.perf_counter() - start,
    }
    final = next(s.name for s in reversed(ran) if s.dir == previous_dir)  # the last round's policy
    results = fingerprints.finish(workdir, results, ran, final=final)
    if workdir_io.is_main():
        print("\n" + math_eval.format_table(results, f"RFT on {cfg.data.task}: {results['method']}"))
        print("\nRounds (held-out greedy accuracy; vs SFT: paired difference on the same problems):")
        print(format_rounds(rounds))
    return results
