r"""The math data: the synthetic `arith` task (determinism, disjoint splits, right arithmetic, slips at the
asked rate, lengths) and the GSM8K / MATH readers (annotations, nested \boxed{}, bad records, strict, gz)."""

import gzip
import json
import math
import re

import numpy as np
import pytest

from rlhf_jax import data
from rlhf_jax.data import math_formats
from rlhf_jax.data import synthetic_arith as sa
from rlhf_jax.data.tokenizer import train_tokenizer

LINE_RE = re.compile(r"(\d+) ([-+*/]) (\d+) = (\d+)")
OPS = {"+": lambda a, b: a + b, "-": lambda a, b: a - b, "*": lambda a, b: a * b, "/": lambda a, b: a / b}


def parse_solution(solution):
    """[(a, op, b, c)] of the step lines, and the `####` number; asserts the GSM8K layout."""
    assert solution.startswith(" ") and not solution.startswith("  ")
    *lines, last = solution[1:].split("\n")
    assert re.fullmatch(r"#### \d+", last), last
    steps = []
    for line in lines:
        (match,) = LINE_RE.findall(line)  # Exactly one equation per line.
        a, op, b, c = match
        steps.append((int(a), op, int(b), int(c)))
    return steps, int(last[5:])


def wrong_lines(steps):
    """Indices of the lines whose `a op b = c` is false."""
    return [i for i, (a, op, b, c) in enumerate(steps) if OPS[op](a, b) != c]


def chained(steps):
    """Every line after the first starts from the previous line's result."""
    return all(steps[i][0] == steps[i - 1][3] for i in range(1, len(steps)))


@pytest.fixture(scope="module")
def splits():
    return sa.generate_splits(seed=0, num_sft=1500, num_train=600, num_eval=200, error_rate=0.3)


def test_deterministic_per_seed_and_different_across_seeds(splits):
    again = sa.generate_splits(seed=0, num_sft=1500, num_train=600, num_eval=200, error_rate=0.3)
    assert again == splits
    assert [e.meta for e in again.sft] == [e.meta for e in splits.sft]  # `meta` is not compared by ==.
    other = sa.generate_splits(seed=1, num_sft=1500, num_train=600, num_eval=200, error_rate=0.3)
    assert len({e.prompt for e in other.sft} & {e.prompt for e in splits.sft}) < 150
    # The SFT stream depends neither on the other sizes nor (its problems) on the error rate.
    small = sa.generate_splits(seed=0, num_sft=1500, num_train=3, num_eval=3, error_rate=0.0)
    assert [e.prompt for e in small.sft] == [e.prompt for e in splits.sft]
    assert [e.answer for e in small.sft] == [e.answer for e in splits.sft]
    assert (len(splits.sft), len(splits.train), len(splits.eval)) == (1500, 600, 200)


def test_splits_disjoint(splits):
    sft, train, held = ({e.prompt for e in split} for split in (splits.sft, splits.train, splits.eval))
    assert len(sft) + len(train) + len(held) == 1500 + 600 + 200  # No prompt twice, in or across splits.
    assert not held & (sft | train) and not sft & train


def test_clean_solutions_are_right_and_end_in_the_answer(splits):
    clean = [e for e in splits.sft if e.meta["slip"] is None] + splits.train + splits.eval
    assert len(clean) > 1500
    config = sa.ArithConfig()
    for ex in clean:
        steps, final = parse_solution(ex.solution)
        assert not wrong_lines(steps), ex.solution
        assert chained(steps), ex.solution
        assert len(steps) == ex.meta["steps"] and config.min_steps <= len(steps) <= config.max_steps
        assert final == steps[-1][3] == int(ex.answer) and sa.answer_of(ex.solution) == ex.answer
        assert all(1 <= c <= config.max_value for *_, c in steps)
        assert ex.prompt.startswith("Question: ") and ex.prompt.endswith("?\nAnswer:")
        assert ex.prompt == math_formats.prompt(ex.meta["question"])
    # Every operation and every step count occurs.
    ops = {op for ex in clean for _, op, _, _ in parse_solution(ex.solution)[0]}
    assert ops == {"+", "-", "*", "/"}
    assert {e.meta["steps"] for e in clean} == {1, 2, 3}


def test_error_rate_slips_one_step_and_the_final_answer(splits):
    n, p = len(splits.sft), 0.3
    wrong = [e for e in splits.sft if sa.answer_of(e.solution) != e.answer]
    # Binomial(1500, 0.3): mean 450, sd 17.7; four sd either side.
    assert abs(len(wrong) - n * p) < 4 * math.sqrt(n * p * (1 - p))
    assert {id(e) for e in wrong} == {id(e) for e in splits.sft if e.meta["slip"] is not None}
    for ex in wrong:
        steps, final = parse_solution(ex.solution)
        # One line is off (by the slip), the later ones compute from its wrong result.
        assert wrong_lines(steps) == [ex.meta["slip"][0]], ex.solution
        assert chained(steps) and final == steps[-1][3] != int(ex.answer)
        slipped = steps[ex.meta["slip"][0]]
        assert slipped[3] - OPS[slipped[1]](slipped[0], slipped[2]) in sa.SLIPS
    # Slips are coupled across rates: those at 0.1 are a subset of those at 0.3, none at 0.
    low = sa.generate_splits(seed=0, num_sft=1500, num_train=0, num_eval=0, error_rate=0.1).sft
    slipped_low = {i for i, e in enumerate(low) if e.meta["slip"] is not None}
    assert slipped_low < {i for i, e in enumerate(splits.sft) if e.meta["slip"] is not None}
    assert 100 < len(slipped_low) < 200
    none = sa.generate_splits(seed=0, num_sft=300, num_train=0, num_eval=0, error_rate=0.0).sft
    assert all(sa.answer_of(e.solution) == e.answer for e in none)


def test_misread_rate_turns_subtractions_into_additions():
    def sft(rate):
        return sa.generate_splits(seed=0, num_sft=1500, num_train=0, num_eval=0, error_rate=0.0,
                                  misread_rate=rate).sft  # fmt: skip

    clean, high, low = sft(0.0), sft(0.7), sft(0.3)
    assert [e.prompt for e in clean] == [e.prompt for e in high] == [e.prompt for e in low]
    eligible = misread = 0
    for ref, ex in zip(clean, high, strict=True):
        ref_steps, _ = parse_solution(ref.solution)
        steps, final = parse_solution(ex.solution)
        # Misreadable: a subtraction line with no division line after it.
        later_div = [i for i, s in enumerate(ref_steps) if s[1] == "/"]
        can = [i for i, s in enumerate(ref_steps) if s[1] == "-" and i > (later_div[-1] if later_div else -1)]
        flipped = [i for i, (r, s) in enumerate(zip(ref_steps, steps, strict=True)) if r[1] != s[1]]
        assert flipped == list(ex.meta["misread"]) and set(flipped) <= set(can), (ref.solution, ex.solution)
        assert all(steps[i][1] == "+" and steps[i][2] == ref_steps[i][2] for i in flipped)
        # Every line is right arithmetic and starts from the previous line's (misread) result.
        assert not wrong_lines(steps) and chained(steps)
        assert (final != int(ex.answer)) == bool(flipped) and ref.answer == ex.answer
        eligible, misread = eligible + len(can), misread + len(flipped)
    # Binomial(eligible, 0.7) with eligible in the hundreds: four sd either side.
    assert eligible > 300
    assert abs(misread - 0.7 * eligible) < 4 * math.sqrt(eligible * 0.7 * 0.3)
    # Coupled across rates: the misread steps at 0.3 are a subset of those at 0.7.
    pairs = {(i, j) for i, e in enumerate(low) for j in e.meta["misread"]}
    assert pairs < {(i, j) for i, e in enumerate(high) for j in e.meta["misread"]} and len(pairs) > 50
    with pytest.raises(ValueError, match="misread_rate"):
        sa.generate_splits(num_sft=1, misread_rate=-0.1)


def test_token_lengths_with_a_tokenizer_trained_on_the_corpus(splits):
    tok = train_tokenizer(sa.corpus(splits), vocab_size=1536)
    examples = splits.sft + splits.train + splits.eval
    prompt_lens = [len(ids) + 1 for ids in tok.encode_batch([e.prompt for e in examples])]  # + BOS
    solution_lens = [len(ids) + 1 for ids in tok.encode_batch([e.solution for e in examples])]  # + EOS
    assert max(prompt_lens) <= 45 and np.percentile(prompt_lens, 95) <= 40
    assert max(solution_lens) <= 60
    assert tok.decode(tok.encode(examples[0].prompt + examples[0].solution)) == (
        examples[0].prompt + examples[0].solution
    )


def test_difficulty_knobs():
    config = sa.ArithConfig(min_steps=4, max_steps=4, max_operand=30, max_value=500, ops=("add", "sub"))
    s = sa.generate_splits(seed=3, num_sft=0, num_train=200, num_eval=0, config=config)
    numbers = []
    for ex in s.train:
        steps, _ = parse_solution(ex.solution)
        assert len(steps) == 4 and {op for _, op, _, _ in steps} <= {"+", "-"}
        numbers += [n for a, _, b, c in steps for n in (a, b, c)]
    assert max(numbers) <= 500 and max(numbers) > 99
    with pytest.raises(ValueError, match="min_steps"):
        sa.ArithConfig(min_steps=3, max_steps=2)
    with pytest.raises(ValueError, match="add and sub"):
        sa.ArithConfig(ops=("mul", "div"))
    with pytest.raises(ValueError, match="error_rate"):
        sa.generate_splits(num_sft=1, error_rate=1.5)
    # 1-step add/sub from 2 by 1 or 2: 5 questions for each of 12 names and 10 items, 600 in all.
    tiny = sa.ArithConfig(max_steps=1, max_operand=2, max_value=4, ops=("add", "sub"))
    assert len(sa.generate_splits(num_sft=600, num_train=0, num_eval=0, config=tiny).sft) == 600
    with pytest.raises(ValueError, match="found only 0 of 1 new distinct problems"):
        sa.generate_splits(num_sft=600, num_train=1, num_eval=0, config=tiny)


def test_answer_of_and_boxed():
    assert sa.answer_of(" a\nb\n#### 1,080") == "1080"
    assert sa.answer_of(" x #### 3\n#### -12 apples") == "-12"
    assert sa.answer_of(" #### $0.5") == "0.5"
    assert sa.answer_of(" no final line 42") is None and sa.answer_of(" ####\n") is None
    assert math_formats.last_boxed(r"so \boxed{1} or \boxed{\frac{1}{2}}.") == r"\frac{1}{2}"
    assert math_formats.last_boxed(r"\boxed{\{1, 2\}} then \boxed{3") == r"\{1, 2\}"  # Unbalanced: earlier.
    assert math_formats.last_boxed(r"\fbox{ 7 } and \boxed{}") == "7"
    assert math_formats.last_boxed("none") is None


def test_synthetic_files_read_back_unchanged(splits, tmp_path):
    paths = sa.write_jsonl(splits, str(tmp_path))
    loaded, stats = data.load_math(f"{paths['train']},{paths['eval']}")
    assert [f.format for f in stats.files] == ["gsm8k", "gsm8k"] and stats.kept == 800
    assert loaded == splits.train + splits.eval
    sft, stats = data.load_sft(paths["sft"])
    assert stats.files[0].format == "sft" and sft == [e.to_sft() for e in splits.sft]
    assert sft[0] == data.SFTExample(splits.sft[0].prompt, splits.sft[0].solution)


GSM8K = [
    {
        "question": "Natalia sold clips to 48 friends in April, and half as many in May. How many in all? ",
        "answer": "Natalia sold 48/2 = <<48/2=24>>24 clips in May.\n"
        "Natalia sold 48+24 = <<48+24=72>>72 clips.\n#### 72",
    },
    {
        "question": "Weng earns $12 an hour. How much for 90 hours?",
        "answer": "She earns 12 * 90 = $<<12*90=1080>>1,080.\n#### 1,080",
    },
]


def write_jsonl(path, rows, *, gz=False):
    text = "".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows)
    if gz:
        with gzip.open(path, "wt") as f:
            f.write(text)
    else:
        path.write_text(text)
    return str(path)


def test_gsm8k_reader_strips_annotations(tmp_path):
    examples, stats = data.load_math(write_jsonl(tmp_path / "gsm8k.jsonl", GSM8K))
    assert stats.files[0].format == "gsm8k" and (stats.records, stats.kept) == (2, 2)
    natalia, weng = examples
    assert natalia.prompt == (
        "Question: Natalia sold clips to 48 friends in April, and half as many in May. How many in all?"
        "\nAnswer:"
    )
    assert natalia.solution == (
        " Natalia sold 48/2 = 24 clips in May.\nNatalia sold 48+24 = 72 clips.\n#### 72"
    )
    assert (natalia.answer, weng.answer) == ("72", "1080")
    assert weng.solution == " She earns 12 * 90 = $1,080.\n#### 1,080"
    assert natalia.meta["question"].endswith("How many in all?")
    # Gzipped, and as one of a comma list: the same examples, in order.
    gz = write_jsonl(tmp_path / "gsm8k.jsonl.gz", GSM8K[::-1], gz=True)
    both, stats = data.load_math(f"{gz},{tmp_path / 'gsm8k.jsonl'}")
    assert both == [weng, natalia, natalia, weng] and len(stats.files) == 2


def test_math_reader_boxed_answers(tmp_path):
    rows = [
        {"problem": "Half of 1?", "solution": r"It is $\boxed{\frac{1}{2}}$.", "level": "Level 1"},
        {"problem": "Set?", "solution": r"First \boxed{2}, then $\boxed{\{1,2\}}$."},
        # MATH-500: both a solution and an answer; no box in the solution -> the answer field.
        {"problem": "Sum?", "solution": "Add them: 3.", "answer": "3"},
        {"question": "x?", "answer": 5},  # A bare number as the answer text.
        {"problem": "No answer anywhere", "solution": "We are done."},
    ]
    examples, stats = data.load_math(write_jsonl(tmp_path / "math.jsonl", rows))
    assert stats.files[0].format == "math"
    assert [e.answer for e in examples] == [r"\frac{1}{2}", r"\{1,2\}", "3", "5"]
    assert examples[0].solution == r" It is $\boxed{\frac{1}{2}}$."
    assert examples[0].prompt == "Question: Half of 1?\nAnswer:"
    assert stats.skipped == {"no_final_answer": 1}
    # A question/answer file whose answers are boxed is MATH-style, not GSM8K.
    boxed = [{"question": "q?", "answer": r"So \boxed{x+1}."}]
    (example,), stats = data.load_math(write_jsonl(tmp_path / "qa.jsonl", boxed))
    assert (stats.files[0].format, example.answer) == ("math", "x+1")


def test_bad_records_counted_and_strict_names_file_line_field(tmp_path):
    lines = [
        GSM8K[0],
        "{not json",
        {"answer": "x\n#### 3"},  # missing question
        {"question": "q?", "answer": ""},  # empty answer
        {"question": "q?", "answer": "no final line"},
        {"question": "q?", "answer": ["#### 3"]},
        {"question": " ", "answer": "#### 3"},
        GSM8K[1],
    ]
    path = write_jsonl(tmp_path / "bad.jsonl", lines)
    examples, stats = data.load_math(path)
    assert [e.answer for e in examples] == ["72", "1080"]
    assert stats.skipped == {
        "malformed_line": 1,
        "missing_field": 1,
        "empty_response": 1,
        "no_final_answer": 1,
        "wrong_type": 1,
        "empty_prompt": 1,
    }
    assert stats.records == stats.kept + sum(stats.skipped.values()) == 8
    assert "no_final_answer=1" in stats.summary()
    with pytest.raises(data.DataError, match=r"bad\.jsonl:2: malformed_line"):
        data.load_math(path, strict=True)
    strict_path = write_jsonl(tmp_path / "s.jsonl.gz", [GSM8K[0], lines[3]], gz=True)
    with pytest.raises(data.DataError, match=r"s\.jsonl\.gz:2: field 'answer': empty_response") as e:
        data.load_math(strict_path, strict=True)
    assert (e.value.line, e.value.field) == (2, "answer")
    strict_path = write_jsonl(tmp_path / "n.jsonl", [lines[4]])
    with pytest.raises(data.DataError, match=r"n\.jsonl:1: field 'answer': no_final_answer"):
        data.load_math(strict_path, strict=True)


def test_detection_and_format_override(tmp_path):
    assert math_formats.detect_format({"question": "q", "answer": "#### 1"}) == "gsm8k"
    assert math_formats.detect_format({"problem": "p", "solution": "s"}) == "math"
    assert math_formats.detect_format({"question": "q", "solution": "s"}) == "math"
    assert math_formats.detect_format({"prompt": "p", "completion": "c"}) is None
    odd = write_jsonl(tmp_path / "odd.jsonl", [{"prompt": "p", "completion": "c"}])
    with pytest.raises(data.DataError, match=r"odd\.jsonl: cannot detect the format .*'gsm8k', 'math'"):
        data.load_math(odd)
    with pytest.raises(ValueError, match="unknown math format"):
        data.load_math(odd, format="sft")
    # Forced "math" on GSM8K records: no \boxed{}, so the whole answer text is the gold answer.
    rows = [{"question": "q?", "answer": "#### 4"}]
    (example,), stats = data.load_math(write_jsonl(tmp_path / "g.jsonl", rows), format="math")
    assert (stats.files[0].format, example.answer) == ("math", "#### 4")
    with pytest.raises(FileNotFoundError):
        data.load_math(str(tmp_path / "none*.jsonl"))
    (tmp_path / "empty.jsonl").write_text("")
    examples, stats = data.load_math(str(tmp_path / "empty.jsonl"))
    assert examples == [] and stats.records == 0
