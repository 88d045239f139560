"""The embedded math task `arith`: multi-step arithmetic word problems with GSM8K-style solutions.

Problems. A seeded generator writes short word problems about one person's count of one kind of item,
in the canonical math prompt (`math_formats.prompt`, "Question: ...\\nAnswer:"). A problem of k steps
has k sentences, each one operation on the running count, and asks for the final count; its solution
has one line per step, `x op b = y` in its text, then `#### N`:

  Question: Tom has 5 boxes of 7 apples. Then he has 2 times as many. He loses 9. How many apples does
  Tom have?
  Answer: Tom has 5 * 7 = 35 apples.
  He has 35 * 2 = 70.
  He has 70 - 9 = 61.
  #### 61

The first step sets the count (`a * b`, `a + b`, `a - b` or `a / b`, the last worded as a fraction: "gets
a quarter of 44 eggs"); each later one adds to it, subtracts from it, multiplies it or keeps a fraction
of it. Every count is a whole number in [1, max_value] (divisions are exact, subtractions leave at least
1); an operation that cannot meet this is not drawn.

Difficulty knobs (`ArithConfig`): the number of steps, drawn uniformly from [min_steps, max_steps];
added and subtracted amounts and starting counts up to `max_operand`; multipliers and divisors in
[2, max_factor]; counts up to `max_value`; the operations allowed (`ops`). The defaults are 1-3 steps,
12, 5 and 99, all four operations, and `error_rate` 0.2 (below). More steps and larger ranges make
problems harder (more lines to get right, more digits per line); `meta["steps"]` lets an evaluation
break accuracy down by steps. Accuracy is not calibrated here: choose the knobs by training.

Slipped demonstrations. With `error_rate` p, each SFT demonstration independently (probability p) carries
one arithmetic slip: one step's result is off by d in {-10, -2, -1, 1, 2, 10} (a carry or counting
error), and the later steps compute correctly from the wrong value, so the final `#### N` is wrong too
(the slip is propagated: a later multiplication scales it, it never cancels). The slipped step is drawn
among those after which no division follows, so every later line stays whole-number arithmetic; if a
negative d would make a count non-positive it is taken positive. So a share p of demonstrations ends in
a wrong answer, and SFT alone imitates them and leaves headroom for RL on the exact-answer reward.
Problems and slips come from separate random streams, so the demonstrations are the same problems at
every p, and the slipped ones at p are a subset of those at any larger p.

Random slips move no step's most likely line: at p = 0.2 a given step is slipped in a few percent of the
demonstrations, each time by a different d, so the greedy SFT policy writes the correct line wherever
the model can compute it, and its greedy errors are the model's own. An RL update that rewards correct
answers then has little to move in the greedy answer (measured in the README: +0.01 at p = 0.2).

Misread subtractions. With `misread_rate` q, each subtraction step of a demonstration independently
(probability q) is misread as an addition: the line reads `x + b = x+b` where the problem takes b away
("loses", "gives away", "sells", "had ... and lost"), and the later steps compute from that value. This
is a systematic demonstrator error, the kind that SFT copies into its greedy policy once q > 1/2: the
SFT model then adds where it should subtract, on every held-out problem with a subtraction, while the
correct line keeps probability about 1 - q when sampling, which is the signal an exact-answer reward
finds. Only subtractions after which no division follows are misread (so later lines stay whole-number
arithmetic; the misread count may exceed `max_value`). Misreads come from a fourth random stream, drawn
for every subtraction, so the misread steps at q are a subset of those at any larger q; a demonstration
may carry both a slip and misreads.

Splits. `generate_splits` returns SFT demonstrations (prompt -> solution, slipped at `error_rate`), RL
training prompts and held-out evaluation prompts, each a `records.MathExample` with the gold `answer`
(the problem's true result; training and evaluation solutions are always correct references). Every
prompt occurs once across all three splits. `MathExample.to_sft()` gives the `SFTExample` view;
`write_jsonl` writes the demonstrations as SFT records and the training and evaluation problems in the
GSM8K format, which `loading.load_sft` and `loading.load_math` read back unchanged.

Lengths. With a 1536-piece tokenizer trained on `corpus(splits)` (digits are single pieces, and so is the
space before a number), the default knobs (1-3 steps, counts up to 99) give prompts of at most about 44
tokens (95% under 40) and solutions of at most about 50; with `max_steps=4` prompts reach about 50 and
solutions about 65 (tests/test_data_math.py checks the default).

Command line (writes sft/train/eval JSONL and a tokenizer, prints sizes and statistics):
  python -m rlhf_jax.data.synthetic_arith --out /tmp/synthetic_arith
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import time
from collections import Counter
from collections.abc import Sequence

import numpy as np

from rlhf_jax.data import math_formats, tokenizer
from rlhf_jax.data import records as rec

OPS = ("add", "sub", "mul", "div")
SLIPS = (-10, -2, -1, 1, 2, 10)
_MAX_MISSES = 1000  # repeated problems in a row before the knobs are deemed too narrow
NAMES = (
    ("Tom", "he"),
    ("Sam", "he"),
    ("Ben", "he"),
    ("Leo", "he"),
    ("Max", "he"),
    ("Ali", "he"),
    ("Mia", "she"),
    ("Ana", "she"),
    ("Eva", "she"),
    ("Zoe", "she"),
    ("Amy", "she"),
    ("Lily", "she"),
)
ITEMS = ("apples", "pens", "cards", "marbles", "cookies", "books", "shells", "coins", "eggs", "stamps")
CONTAINERS = ("boxes", "bags", "jars", "packs", "baskets")
FRACTIONS = {2: "half", 3: "a third", 4: "a quarter", 5: "a fifth", 6: "a sixth", 7: "a seventh"}
# (question sentence, solution line) per operation; {x} is the count before the step, {b} the operand,
# {y} the count after it, {f} the fraction 1/{b} in words. The first step's count before it is {x}.
_FIRST = {
    "mul": (("{N} has {x} {box} of {b} {items}.", "{N} has {x} * {b} = {y} {items}."),),
    "add": (
        ("{N} has {x} {items} and finds {b} more.", "{N} has {x} + {b} = {y} {items}."),
        ("{N} buys {x} {items} and then {b} more.", "{N} has {x} + {b} = {y} {items}."),
    ),
    "sub": (("{N} had {x} {items} and lost {b}.", "{N} has {x} - {b} = {y} {items}."),),
    "div": (("{N} gets {f} of {x} {items}.", "{N} gets {x} / {b} = {y} {items}."),),
}
_LATER = {
    "add": (
        ("{P} buys {b} more.", "{P} has {x} + {b} = {y}."),
        ("{P} finds {b} more.", "{P} has {x} + {b} = {y}."),
    ),
    "sub": (
        ("{P} gives away {b}.", "{P} has {x} - {b} = {y}."),
        ("{P} loses {b}.", "{P} has {x} - {b} = {y}."),
        ("{P} sells {b}.", "{P} has {x} - {b} = {y}."),
    ),
    "mul": (("Then {p} has {b} times as many.", "{P} has {x} * {b} = {y}."),),
    "div": (("{P} keeps {f} of them.", "{P} keeps {x} / {b} = {y}."),),
}
_ASK = "How many {items} does {N} have?"


@dataclasses.dataclass(frozen=True)
class ArithConfig:
    """Difficulty knobs of the task (module docstring)."""

    min_steps: int = 1
    max_steps: int = 3
    max_operand: int = 12  # added/subtracted amounts, starting counts and items per container
    max_factor: int = 5  # multipliers and divisors are in [2, max_factor]
    max_value: int = 99  # every count is in [1, max_value]
    ops: tuple[str, ...] = OPS

    def __post_init__(self):
        if not 1 <= self.min_steps <= self.max_steps:
            raise ValueError(f"need 1 <= min_steps <= max_steps, got {self.min_steps}, {self.max_steps}")
        if self.max_operand < 2 or self.max_value < 2 * self.max_operand:
            raise ValueError(
                f"need 2 <= max_operand <= max_value / 2, got {self.max_operand}, {self.max_value}"
            )
        if not 2 <= self.max_factor <= max(FRACTIONS):
            raise ValueError(f"need 2 <= max_factor <= {max(FRACTIONS)}, got {self.max_factor}")
        if set(self.ops) - set(OPS) or not {"add", "sub"} <= set(self.ops):
            raise ValueError(f"ops must be a subset of {OPS} holding add and sub, got {self.ops}")


@dataclasses.dataclass(frozen=True)
class Step:
    """One step: `op` applied to the count (the first step's to `start`) and `operand`; `line` is its
    solution line with {x}, {b} and {y} still to fill."""

    op: str
    operand: int
    line: str
    start: int | None = None


@dataclasses.dataclass(frozen=True)
class Problem:
    """One generated problem: its question text and steps."""

    question: str
    steps: tuple[Step, ...]

    @property
    def prompt(self) -> str:
        return math_formats.prompt(self.question)

    @property
    def answer(self) -> int:
        return _run(self.steps)[-1]

    def solution(self, slip: tuple[int, int] | None = None, misread: Sequence[int] = ()) -> str:
        """The solution text (leading space, one line per step, `#### N`); `slip` = (step, d) adds d to
        that step's result and carries it through the later steps; the subtraction steps in `misread`
        are written and computed as additions."""
        values = _run(self.steps, slip, misread)
        lines, x = [], None
        for i, (step, y) in enumerate(zip(self.steps, values, strict=True)):
            x = step.start if x is None else x
            line = step.line.replace(" - {b}", " + {b}") if i in misread else step.line
            lines.append(line.format(x=x, b=step.operand, y=y))
            x = y
        return " " + "\n".join(lines + [f"#### {values[-1]}"])


@dataclasses.dataclass(frozen=True)
class Splits:
    """The generated task: SFT demonstrations, RL training prompts, held-out evaluation prompts."""

    sft: list[rec.MathExample]
    train: list[rec.MathExample]
    eval: list[rec.MathExample]


def answer_of(solution_text: str) -> str | None:
    """Returns the final answer of a solution: the number after its last `####` (commas removed), or None."""
    return math_formats.final_answer(solution_text)


def make_problem(rng: np.random.Generator, config: ArithConfig = ArithConfig()) -> Problem:
    """Generates one problem (module docstring)."""
    name, pronoun = _pick(rng, NAMES)
    words = {
        "N": name,
        "P": pronoun.capitalize(),
        "p": pronoun,
        "items": _pick(rng, ITEMS),
        "box": _pick(rng, CONTAINERS),
    }
    sentences, steps, x = [], [], None
    for _ in range(int(rng.integers(config.min_steps, config.max_steps + 1))):
        if x is None:
            op = _pick(rng, config.ops)
            start, operand = _first_operands(rng, op, config)
        else:
            choices = _later_operands(x, config)
            op = _pick(rng, sorted(choices))
            start, operand = None, int(_pick(rng, choices[op]))
        question, line = _pick(rng, (_FIRST if x is None else _LATER)[op])
        sentences.append(question.format(**words, f=FRACTIONS.get(operand), x=start, b=operand))
        steps.append(Step(op, operand, line.format(**words, x="{x}", b="{b}", y="{y}"), start))
        x = _apply(op, start if x is None else x, operand)
    sentences.append(_ASK.format(**words))
    return Problem(" ".join(sentences), tuple(steps))


def generate_splits(
    *,
    seed: int = 0,
    num_sft: int = 2048,
    num_train: int = 2048,
    num_eval: int = 256,
    error_rate: float = 0.2,
    misread_rate: float = 0.0,
    config: ArithConfig = ArithConfig(),
) -> Splits:
    """Generates the task's splits (module docstring); the same arguments give the same splits.

    Args:
      seed: the generator seed.
      num_sft: SFT demonstrations (prompt, solution), of which a share `error_rate` is slipped.
      num_train: RL training prompts with gold answers (and correct reference solutions).
      num_eval: held-out evaluation prompts with gold answers (and correct reference solutions).
      error_rate: the probability that a demonstration carries one propagated arithmetic slip.
      misread_rate: the probability that a subtraction step of a demonstration (one after which no
        division follows) is misread as an addition (module docstring).
      config: the difficulty knobs.

    Returns:
      The splits; every prompt occurs once across them. Examples carry `meta` with "question", "steps",
      "slip" (None, or (step index, d) for a slipped demonstration) and "misread" (the indices of the
      misread subtraction steps; empty outside SFT).

    Raises:
      ValueError: `error_rate` or `misread_rate` is not in [0, 1], or the knobs allow too few distinct
        problems.
    """
    for name, rate in (("error_rate", error_rate), ("misread_rate", misread_rate)):
        if not 0.0 <= rate <= 1.0:
            raise ValueError(f"{name} must be in [0, 1], got {rate}")
    rng_sft, rng_train, rng_eval, rng_slip, rng_misread = (np.random.default_rng([seed, i]) for i in range(5))
    seen: set[str] = set()
    sft = []
    for problem in _distinct(rng_sft, num_sft, seen, config):
        # Drawn for every demonstration (and subtraction), so the slipped (misread) ones at a rate are a
        # subset of those at a higher one.
        u, slip = rng_slip.random(), _draw_slip(rng_slip, problem)
        misread = tuple(i for i in _misreadable(problem) if rng_misread.random() < misread_rate)
        sft.append(_example(problem, slip if u < error_rate else None, misread))
    train = [_example(p) for p in _distinct(rng_train, num_train, seen, config)]
    evaluation = [_example(p) for p in _distinct(rng_eval, num_eval, seen, config)]
    return Splits(sft, train, evaluation)


def corpus(splits: Splits) -> list[str]:
    """Returns the texts a tokenizer for the task is trained on: every prompt and solution."""
    return [
        t
        for split in (splits.sft, splits.train, splits.eval)
        for ex in split
        for t in (ex.prompt, ex.solution)
    ]


def get_tokenizer(splits: Splits, cache_dir: str, vocab_size: int = 1536) -> tokenizer.Tokenizer:
    """Returns the task's sentencepiece tokenizer, trained on `corpus(splits)` and cached in `cache_dir`."""
    return tokenizer.get_or_train_tokenizer("", corpus(splits), vocab_size, cache_dir)


def write_jsonl(splits: Splits, out_dir: str) -> dict[str, str]:
    """Writes `sft.jsonl` in the generic SFT format ({"prompt", "completion"}, plus the gold "answer"),
    read back by `loading.load_sft`, and `train.jsonl` and `eval.jsonl` in the GSM8K format ({"question",
    "answer"}), read back by `loading.load_math` as the same examples. Returns their paths."""
    os.makedirs(out_dir, exist_ok=True)
    rows = {
        "sft": [{"prompt": e.prompt, "completion": e.solution, "answer": e.answer} for e in splits.sft],
        "train": [{"question": e.meta["question"], "answer": e.solution.strip()} for e in splits.train],
        "eval": [{"question": e.meta["question"], "answer": e.solution.strip()} for e in splits.eval],
    }
    paths = {}
    for name, items in rows.items():
        paths[name] = os.path.join(out_dir, f"{name}.jsonl")
        with open(paths[name], "w", encoding="utf-8") as f:
            f.writelines(json.dumps(item) + "\n" for item in items)
    return paths


def _example(
    problem: Problem, slip: tuple[int, int] | None = None, misread: tuple[int, ...] = ()
) -> rec.MathExample:
    meta = {"question": problem.question, "steps": len(problem.steps), "slip": slip, "misread": misread}
    return rec.MathExample(problem.prompt, problem.solution(slip, misread), str(problem.answer), meta)


def _misreadable(problem: Problem) -> list[int]:
    """The subtraction steps after which no division follows (module docstring)."""
    divisions = [i for i, s in enumerate(problem.steps) if s.op == "div"]
    after = divisions[-1] + 1 if divisions else 0
    return [i for i, s in enumerate(problem.steps) if s.op == "sub" and i >= after]


def _distinct(rng: np.random.Generator, n: int, seen: set[str], config: ArithConfig) -> list[Problem]:
    """`n` problems whose prompts are not in `seen` (which they join)."""
    out, misses = [], 0
    while len(out) < n:
        problem = make_problem(rng, config)
        if problem.prompt in seen:
            misses += 1
            if misses == _MAX_MISSES:
                raise ValueError(
                    f"found only {len(out)} of {n} new distinct problems ({_MAX_MISSES} repeats in a row); "
                    f"widen the knobs of {config}"
                )
            continue
        seen.add(problem.prompt)
        out.append(problem)
        misses = 0
    return out


def _draw_slip(rng: np.random.Generator, problem: Problem) -> tuple[int, int]:
    """A slip (step, d) as in the module docstring: a step after which no division follows."""
    divisions = [i for i, s in enumerate(problem.steps) if s.op == "div"]
    step = int(rng.integers(divisions[-1] if divisions else 0, len(problem.steps)))
    d = int(_pick(rng, SLIPS))
    if min(_run(problem.steps, (step, d))) < 1:
        d = -d
    return step, d


def _run(
    steps: Sequence[Step], slip: tuple[int, int] | None = None, misread: Sequence[int] = ()
) -> list[int]:
    """The count after each step, with an optional slip (step, d) and misread subtractions (computed as
    additions) carried forward."""
    values, x = [], None
    for i, step in enumerate(steps):
        op = "add" if i in misread else step.op
        x = _apply(op, step.start if x is None else x, step.operand)
        if slip is not None and i == slip[0]:
            x += slip[1]
        values.append(x)
    return values


def _apply(op: str, x: int, b: int) -> int:
    if op == "add":
        return x + b
    if op == "sub":
        return x - b
    if op == "mul":
        return x * b
    if x % b:
        raise ValueError(f"{x} / {b} is not whole")
    return x // b


def _first_operands(rng: np.random.Generator, op: str, config: ArithConfig) -> tuple[int, int]:
    """(start, operand) of a first step, whose result is a count in [1, max_value]."""
    c = config
    if op == "add":
        return int(rng.integers(2, c.max_operand + 1)), int(rng.integers(1, c.max_operand + 1))
    if op == "sub":
        start = int(rng.integers(2, c.max_operand + 1))
        return start, int(rng.integers(1, start))
    if op == "mul":  # `start` containers of `operand` items.
        start = int(rng.integers(2, c.max_factor + 1))
        return start, int(rng.integers(2, min(c.max_operand, c.max_value // start) + 1))
    operand = int(rng.integers(2, c.max_factor + 1))  # div: `start` items into `operand` piles.
    return operand * int(rng.integers(1, min(c.max_operand, c.max_value // operand) + 1)), operand


def _later_operands(x: int, config: ArithConfig) -> dict[str, Sequence[int]]:
    """The operations allowed on count `x` (the result stays a whole count in [1, max_value]) and their
    operands; add or sub is always among them."""
    c = config
    out = {}
    if x < c.max_value:
        out["add"] = range(1, min(c.max_operand, c.max_value - x) + 1)
    if x > 1:
        out["sub"] = range(1, min(c.max_operand, x - 1) + 1)
    if 2 * x <= c.max_value:
        out["mul"] = range(2, min(c.max_factor, c.max_value // x) + 1)
    divisors = [b for b in range(2, c.max_factor + 1) if x % b == 0]
    if divisors:
        out["div"] = divisors
    return {op: operands for op, operands in out.items() if op in c.ops}


def _pick(rng: np.random.Generator, items: Sequence):
    return items[int(rng.integers(len(items)))]


def main(argv: Sequence[str] | None = None) -> None:
    """Writes the splits and a tokenizer to `--out` and prints sizes, timings and statistics."""
    parser = argparse.ArgumentParser(
        prog="python -m rlhf_jax.data.synthetic_arith", description=__doc__.split("\n")[0]
    )
    parser.add_argument("--out", required=True)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--num_sft", type=int, default=2048)
    parser.add_argument("--num_train", type=int, default=2048)
    parser.add_argument("--num_eval", type=int, default=256)
    parser.add_argument("--error_rate", type=float, default=0.2)
    parser.add_argument("--misread_rate", type=float, default=0.0)
    parser.add_argument("--min_steps", type=int, default=1)
    parser.add_argument("--max_steps", type=int, default=3)
    parser.add_argument("--vocab_size", type=int, default=1536)
    args = parser.parse_args(argv)
    config = ArithConfig(min_steps=args.min_steps, max_steps=args.max_steps)
    start = time.perf_counter()
    splits = generate_splits(
        seed=args.seed,
        num_sft=args.num_sft,
        num_train=args.num_train,
        num_eval=args.num_eval,
        error_rate=args.error_rate,
        misread_rate=args.misread_rate,
        config=config,
    )
    generated = time.perf_counter()
    paths = write_jsonl(splits, args.out)
    tok = get_tokenizer(splits, args.out, args.vocab_size)
    trained = time.perf_counter()
    print(
        f"generated in {generated - start:.2f}s; tokenizer ({tok.vocab_size} pieces, {tok.path}) in "
        f"{trained - generated:.2f}s"
    )
    for name, path in paths.items():
        print(f"{name}: {len(getattr(splits, name))} examples -> {path}")
    wrong = np.mean([answer_of(ex.solution) != ex.answer for ex in splits.sft]) if splits.sft else 0.0
    steps = Counter(ex.meta["steps"] for ex in splits.sft)
    print(f"SFT demonstrations with a wrong final answer: {wrong:.3f}; steps: {dict(sorted(steps.items()))}")
    examples = splits.sft + splits.train + splits.eval
    for name, texts in (
        ("prompt+BOS", [e.prompt for e in examples]),
        ("solution+EOS", [e.solution for e in examples]),
    ):
        lens = np.array([len(ids) + 1 for ids in tok.encode_batch(texts)])
        p = np.percentile(lens, [5, 50, 95, 100]).astype(int)
        print(f"{name} tokens: p5 {p[0]}, p50 {p[1]}, p95 {p[2]}, max {p[3]}")


if __name__ == "__main__":
    main()
