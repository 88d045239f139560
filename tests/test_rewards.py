"""Rewards: hand-written cases for every registered reward, the registry's checks, `combine`, and the
reward model as a reward against the model applied row by row.

Values are derived by hand (a cosine at 0, π/2, 3π/4 and π; DAPO's ramp at its three regimes). Three
real GSM8K training records (MIT licence, OpenAI) are copied in as literals: the tests never read the
project's shared sample data.
"""

import math
import threading

import numpy as np
import pytest
from random_params import random_params

from rlhf_jax import models, rewards
from rlhf_jax.data import pipeline, synthetic_tldr, tokenizer
from rlhf_jax.data import records as rec


def call(fn, completions, **columns):
    """`fn` on these completions, one dummy prompt each."""
    return fn(prompts=["q"] * len(completions), completions=list(completions), **columns)


# ------------------------------------------------------------------------------------------ gsm8k

# GSM8K train records 2, 3 and 6 (answers as in the dataset: `<<...>>` annotations, `$`, `#### N`).
GSM8K_ANSWERS = [
    "Weng earns 12/60 = $<<12/60=0.2>>0.2 per minute.\nWorking 50 minutes, she earned 0.2 x 50 = "
    "$<<0.2*50=10>>10.\n#### 10",
    "In the beginning, Betty has only 100 / 2 = $<<100/2=50>>50.\nBetty's grandparents gave her 15 * 2 = "
    "$<<15*2=30>>30.\nThis means, Betty needs 100 - 50 - 30 - 15 = $<<100-50-30-15=5>>5 more.\n#### 5",
    "There are 80/100 * 10 = <<80/100*10=8>>8 more purple flowers than yellow flowers.\nSo in Mark's garden, "
    "there are 10 + 8 = <<10+8=18>>18 purple flowers.\nPurple and yellow flowers sum up to 10 + 18 = "
    "<<10+18=28>>28 flowers.\nThat means in Mark's garden there are 25/100 * 28 = <<25/100*28=7>>7 green "
    "flowers.\nSo in total Mark has 28 + 7 = <<28+7=35>>35 plants in his garden.\n#### 35",
]


def test_gsm8k_real_solutions_score_one_against_themselves_and_their_number():
    r = call(rewards.gsm8k, GSM8K_ANSWERS, answer=GSM8K_ANSWERS)
    assert r.dtype == np.float32 and r.shape == (3,)
    np.testing.assert_array_equal(r, [1, 1, 1])
    np.testing.assert_array_equal(call(rewards.gsm8k, GSM8K_ANSWERS, answer=["10", "5", "35"]), [1, 1, 1])
    # Without the `#### N` line the last number of each solution is still its answer (10, 5 and 35).
    cut = [a.rsplit("\n", 1)[0] for a in GSM8K_ANSWERS]
    np.testing.assert_array_equal(call(rewards.gsm8k, cut, answer=GSM8K_ANSWERS), [1, 1, 1])
    # Each against another record's gold answer: wrong.
    np.testing.assert_array_equal(call(rewards.gsm8k, GSM8K_ANSWERS, answer=["5", "35", "10"]), [0, 0, 0])


@pytest.mark.parametrize(
    "completion, gold, want",
    [
        ("so the total is\n#### 1,000", "1000", 1.0),  # thousands comma
        ("#### 1000.0", "1,000", 1.0),  # numeric, not string, comparison
        ("She pays $1,250.50 in all.", "#### 1250.5", 1.0),  # `$`, comma, decimals, no ####
        ("#### 0.50", "0.5", 1.0),
        ("The temperature fell to -7 degrees.\n#### -7", "-7", 1.0),  # negative
        ("#### -7", "7", 0.0),
        ("#### $-7", "-7", 1.0),
        ("#### -$7", "-7", 1.0),
        ("#### 3/4", "0.75", 1.0),  # a fraction is its value
        ("so it is 8-5", "5", 1.0),  # 8-5 reads as 8 and 5, not 8 and -5
        ("so it is 8-5", "-5", 0.0),
        ("so it is 8 - -5", "-5", 1.0),
        ("Natalia sold 48/2 = <<48/2=24>>24 clips", "24", 1.0),  # annotation dropped, last number 24
        ("First 72, then 73", "72", 0.0),  # the last number counts
        ("72 is it\n#### 73", "72", 0.0),  # the answer after #### counts, not earlier ones
        ("#### 72\nthen #### 71", "71", 1.0),  # the last ####
        ("The answer is 72.\n####", "72", 0.0),  # a #### with no number: no answer, no fallback
        ("I do not know.", "72", 0.0),  # no number at all
        ("", "0", 0.0),
    ],
)
def test_gsm8k_answers(completion, gold, want):
    assert call(rewards.gsm8k, [completion], answer=[gold])[0] == want


def test_gsm8k_needs_gold_numbers_and_the_answer_column():
    with pytest.raises(ValueError, match=r"reward 'gsm8k': row 1: no number in the gold answer 'unknown'"):
        call(rewards.gsm8k, ["1", "2"], answer=["1", "unknown"])
    with pytest.raises(ValueError, match="reward 'gsm8k' needs the column 'answer'"):
        call(rewards.gsm8k, ["1"])
    with pytest.raises(ValueError, match="column 'answer' has 1 values for 2 completions"):
        call(rewards.gsm8k, ["1", "2"], answer=["1"])
    with pytest.raises(ValueError, match="1 prompts for 2 completions"):
        rewards.gsm8k(prompts=["q"], completions=["1", "2"], answer=["1", "2"])


def test_final_number_and_last_boxed():
    assert rewards.final_number("x = 1,234.5") == 1234.5
    assert rewards.final_number("2/0") is None and rewards.final_number("words") is None
    assert rewards.last_boxed(r"so \boxed{\frac{1}{2}}.") == r"\frac{1}{2}"  # nested braces
    assert rewards.last_boxed(r"\boxed{1} then \boxed{\{1,2\}}") == r"\{1,2\}"  # the last; escaped braces
    assert rewards.last_boxed(r"\boxed{3} and a cut \boxed{\frac{1}{") == "3"  # an unclosed box is skipped
    assert rewards.last_boxed("no box") is None


# ------------------------------------------------------------------------------------------ math


def test_math_verify_answers():
    pytest.importorskip("math_verify")
    solution = r"The height is $\frac{\sqrt{3}}{2}$, so the answer is $\boxed{\frac{\sqrt{3}}{2}}$."
    cases = [
        (r"Thus $\boxed{\frac{1}{2}}$.", "0.5", 1.0),  # a fraction equals its decimal
        (r"\boxed{0.5}", r"\frac{1}{2}", 1.0),
        (r"\boxed{\dfrac{\sqrt{3}}{2}}", solution, 1.0),  # nested braces; gold from a full solution
        (r"\boxed{\frac{\sqrt{2}}{2}}", solution, 0.0),
        (r"First \boxed{2}, no: \boxed{3}", "3", 1.0),  # the last box counts
        (r"\boxed{2} then \boxed{3", "2", 1.0),  # a cut-off box is skipped
        ("The answer is 0.5", "0.5", 0.0),  # no box: no answer
        (r"\boxed{x^2+1}", "$1+x^{2}$", 1.0),  # symbolic equivalence; `$` around the gold stripped
        (r"\boxed{\{1,2\}}", r"\{2,1\}", 1.0),
        (r"\boxed{4}", "3", 0.0),
    ]
    r = call(rewards.math, [c for c, _, _ in cases], answer=[g for _, g, _ in cases])
    assert r.dtype == np.float32
    np.testing.assert_array_equal(r, [w for _, _, w in cases])


def test_math_outside_the_main_thread_runs_without_signal_timeouts():
    pytest.importorskip("math_verify")
    out = {}

    def run():
        try:
            out["r"] = call(rewards.math, [r"\boxed{\frac{1}{2}}", r"\boxed{3}"], answer=["0.5", "4"])
        except Exception as e:  # noqa: BLE001 -- re-raised below, in the test's thread
            out["error"] = e

    thread = threading.Thread(target=run)
    thread.start()
    thread.join()
    assert "error" not in out, out.get("error")
    np.testing.assert_array_equal(out["r"], [1.0, 0.0])


# ---------------------------------------------------------------------------------- exact match, format


def test_exact_match():
    completions = ["  Paris\n", "paris", "New  York", "Paris!"]
    gold = ["Paris", "Paris", "new york", "Paris"]
    np.testing.assert_array_equal(call(rewards.exact_match, completions, answer=gold), [1, 0, 0, 0])
    np.testing.assert_array_equal(
        call(rewards.exact_match, completions, answer=gold, normalize=True), [1, 1, 1, 0]
    )


def test_format_presets_and_custom_patterns():
    think = [
        "<think>\nadd them\n</think>\n<answer>\n5\n</answer>",  # DeepSeek-R1's template
        "  <think>a</think><answer>5</answer>\n",  # surrounding whitespace is stripped
        "<think>a</think>",  # no answer block
        "<think>a</think><answer>5</answer> and more",  # text after the answer
        "<think>a</think><think>b</think><answer>5</answer>",  # two think blocks
        "<think>a</think><answer>5</answer><answer>6</answer>",  # two answer blocks
        "<answer>5</answer><think>a</think>",  # wrong order
    ]
    np.testing.assert_array_equal(call(rewards.format, think), [1, 1, 0, 0, 0, 0, 0])
    lines = ["step one\nstep two\n#### 1,000", "#### -3.5\n", "#### 5 apples", "#### 5\nmore text", "5"]
    np.testing.assert_array_equal(call(rewards.format, lines, pattern="gsm8k"), [1, 1, 0, 0, 0])
    custom = rewards.make("format", pattern=r"Answer: \d+")  # matched against the whole stripped text
    np.testing.assert_array_equal(call(custom, ["Answer: 42", " Answer: 42 ", "So. Answer: 42"]), [1, 1, 0])
    with pytest.raises(ValueError, match=r"reward 'format': pattern '\(unclosed' is neither a preset"):
        rewards.make("format", pattern="(unclosed")


# ------------------------------------------------------------------------------------------ length rewards


def test_soft_overlong_at_its_three_regimes():
    """DAPO Eq. 13 with L_max = 10, L_cache = 4: 0 up to 6 tokens, (6 - L) / 4 from 7 to 10, -1 beyond."""
    fn = rewards.make("soft_overlong", max_length=10, cache=4)
    lengths = [0, 6, 7, 8, 10, 11, 50]
    r = call(fn, ["x"] * 7, completion_lengths=np.array(lengths))
    assert r.dtype == np.float32 and r.shape == (7,)
    np.testing.assert_array_equal(r, [0, 0, -0.25, -0.5, -1, -1, -1])
    # The text is not looked at: lengths are tokens from the caller.
    np.testing.assert_array_equal(call(fn, ["a" * 100, ""], completion_lengths=[8, 8]), [-0.5, -0.5])
    hard = rewards.make("soft_overlong", max_length=10, cache=0)  # no ramp: -1 only past L_max
    np.testing.assert_array_equal(call(hard, ["x"] * 7, completion_lengths=lengths), [0, 0, 0, 0, 0, -1, -1])
    with pytest.raises(ValueError, match="integer token counts"):
        call(fn, ["x"], completion_lengths=[7.5])
    with pytest.raises(ValueError, match="needs the column 'completion_lengths'"):
        call(fn, ["x"])


def test_soft_overlong_equals_trls():
    trl_rewards = pytest.importorskip("trl.rewards")
    lengths = np.arange(0, 40)
    for max_length, cache in [(30, 8), (30, 0), (30, 30), (1, 1)]:
        ours = call(rewards.make("soft_overlong", max_length=max_length, cache=cache), ["x"] * 40,
                    completion_lengths=lengths)  # fmt: skip
        theirs = trl_rewards.get_soft_overlong_punishment(max_length, cache)([[1] * n for n in lengths])
        np.testing.assert_allclose(ours, theirs, atol=1e-7, err_msg=f"{max_length=}, {cache=}")


def test_cosine_length_endpoints():
    """Yeo et al.'s defaults: correct 2 at L = 0, 1.5 at L_max/2, -> 1 at L_max; wrong -10 at 0, -5 at
    L_max/2; from L_max on, -10 whether correct or not."""
    fn = rewards.make("cosine_length", max_length=100)  # correctness from gsm8k
    completions = ["#### 4", "#### 4", "#### 5", "#### 5", "#### 4", "#### 5", "#### 4"]
    lengths = [0, 50, 0, 50, 100, 100, 99]
    r = call(fn, completions, answer=["4"] * 7, completion_lengths=lengths)
    assert r.dtype == np.float32
    near_one = 1 + 0.5 * (1 + math.cos(math.pi * 0.99))  # 1 + 0.5 (1 - cos(π/100)) ≈ 1.00025
    np.testing.assert_allclose(r, [2.0, 1.5, -10.0, -5.0, -10.0, -10.0, near_one], rtol=1e-6)
    # Correctness from a column; other values.
    fn = rewards.make(
        "cosine_length", max_length=100, correctness="column", min_value_correct=0.5, max_value_correct=1.0,
        min_value_wrong=-1.0, max_value_wrong=-0.5, exceed_penalty=-2.0,
    )  # fmt: skip
    r = call(fn, ["a"] * 5, correct=[True, 1, False, 0.0, True], completion_lengths=[0, 100, 0, 50, 120])
    np.testing.assert_allclose(r, [1.0, -2.0, -1.0, -0.75, -2.0], rtol=1e-6)


def test_cosine_length_cap_clips_only_correct_answers():
    """Light-R1's weaker preference for short correct answers as a cap at 1.5: flat up to L_max/2."""
    fn = rewards.make("cosine_length", max_length=100, correctness="column", correct_cap=1.5)
    r = call(fn, ["a"] * 5, correct=[1, 1, 1, 0, 0], completion_lengths=[0, 25, 75, 0, 75])
    at_75 = 1 + 0.5 * (1 + math.cos(0.75 * math.pi))  # ≈ 1.146, under the cap: unchanged
    wrong_75 = 0 + (-10 - 0) * 0.5 * (1 + math.cos(0.75 * math.pi))  # ≈ -1.46
    np.testing.assert_allclose(r, [1.5, 1.5, at_75, -10.0, wrong_75], rtol=1e-6)
    with pytest.raises(ValueError, match="correct_cap=0.5 is below min_value_correct=1.0"):
        rewards.make("cosine_length", max_length=100, correct_cap=0.5)
    with pytest.raises(ValueError, match="correctness must be 'column' or one of gsm8k, math, exact_match"):
        rewards.make("cosine_length", max_length=100, correctness="format")


# ------------------------------------------------------------------------------------------ numeric tolerance


def test_numeric_tolerance_ramp():
    """Reason-RFT: 1 up to 5% relative error, (1 + cos(π (e - 0.05) / 0.15)) / 2 between, 0 from 20%."""
    completions = ["#### 100", "105", "<answer>112.5</answer>", "it is 120", "130", "95", "87.5", "none"]
    r = call(rewards.numeric_tolerance, completions, answer=["#### 100"] * 8)
    assert r.dtype == np.float32
    np.testing.assert_allclose(r, [1.0, 1.0, 0.5, 0.0, 0.0, 1.0, 0.5, 0.0], atol=1e-6)
    # The last <answer> block wins over the text's last number; a gold 0 needs an exact 0.
    r = call(rewards.numeric_tolerance, ["<answer>10</answer> not 99", "0", "0.001"], answer=["10", "0", "0"])
    np.testing.assert_array_equal(r, [1.0, 1.0, 0.0])
    wide = rewards.make("numeric_tolerance", low=0.0, high=0.5)  # 25% is halfway: 0.5
    np.testing.assert_allclose(call(wide, ["125", "100"], answer=["100", "100"]), [0.5, 1.0], atol=1e-6)
    with pytest.raises(ValueError, match="need 0 <= low < high"):
        rewards.make("numeric_tolerance", low=0.3, high=0.2)


# ------------------------------------------------------------------------------------------ tldr gold


def test_tldr_gold_is_the_tasks_gold_reward():
    post = synthetic_tldr.make_post(np.random.default_rng(0))
    summary = synthetic_tldr.write_summary(post, np.random.default_rng(1))
    r = rewards.tldr_gold(prompts=[post.prompt, post.prompt], completions=["", summary])
    assert r.dtype == np.float32
    assert r[0] == -2.0  # an empty summary covers none of the facts: 2 (0 - n) / n = -2
    assert r[1] == np.float32(synthetic_tldr.gold_reward(post.prompt, summary))


# ------------------------------------------------------------------------------------------ registry


def test_registry_names_and_errors():
    assert rewards.names() == [
        "cosine_length", "exact_match", "format", "gsm8k", "label_match", "math", "numeric_tolerance",
        "reward_model", "soft_overlong", "sts_regression", "tldr_gold",
    ]  # fmt: skip
    assert rewards.get("gsm8k") is rewards.gsm8k
    with pytest.raises(ValueError, match="unknown reward 'gsm9k'; known rewards: cosine_length, exact_match"):
        rewards.get("gsm8k".replace("8", "9"))
    with pytest.raises(
        ValueError, match=r"reward 'format' has no hyperparameter\(s\) \['patern'\]; .*pattern="
    ):
        rewards.make("format", patern="gsm8k")
    with pytest.raises(ValueError, match=r"reward 'soft_overlong' needs hyperparameter\(s\) \['cache'\]"):
        rewards.make("soft_overlong", max_length=10)
    with pytest.raises(ValueError, match="reward 'soft_overlong': need 0 <= cache <= max_length"):
        rewards.make("soft_overlong", max_length=10, cache=11)
    with pytest.raises(ValueError, match="reward 'soft_overlong': hyperparameter cache must be int, got '4'"):
        rewards.make("soft_overlong", max_length=10, cache="4")
    with pytest.raises(
        ValueError, match="reward 'soft_overlong': hyperparameter max_length must be int, got 10.0"
    ):
        rewards.make("soft_overlong", max_length=10.0, cache=4)
    with pytest.raises(
        ValueError, match="reward 'exact_match': hyperparameter normalize must be bool, got 1"
    ):
        rewards.make("exact_match", normalize=1)
    with pytest.raises(
        ValueError, match="reward 'numeric_tolerance': hyperparameter low must be float, got True"
    ):
        rewards.make("numeric_tolerance", low=True)
    with pytest.raises(ValueError, match="correct_cap must be float or None, got '1'"):
        rewards.make("cosine_length", max_length=10, correct_cap="1")
    with pytest.raises(ValueError, match=r"built from objects.*rewards\.reward_model\(model=\.\.\."):
        rewards.make("reward_model")
    assert rewards.hyperparameters("numeric_tolerance") == {"low": 0.05, "high": 0.2}
    assert rewards.required_hyperparameters("soft_overlong") == ("max_length", "cache")
    assert rewards.make("numeric_tolerance", low=0, high=1).keywords == {"low": 0, "high": 1}  # int for float


def test_every_made_reward_returns_float32_of_one_value_per_completion():
    hparams = {"soft_overlong": {"max_length": 8, "cache": 2}, "cosine_length": {"max_length": 8},
               "label_match": {"labels": ("3", "4", "5")}}  # fmt: skip
    columns = {"answer": ["3", "4", "5"], "completion_lengths": [1, 7, 9]}
    post = synthetic_tldr.make_post(np.random.default_rng(0))
    for name in rewards.names():
        if name == "reward_model" or (name == "math" and not _has_math_verify()):
            continue
        fn = rewards.make(name, **hparams.get(name, {}))
        r = fn(prompts=[post.prompt] * 3, completions=["#### 3", r"\boxed{4}", "5"], **columns)
        assert r.dtype == np.float32 and r.shape == (3,), name
        empty = fn(prompts=[], completions=[], **{k: [] for k in columns})
        assert empty.dtype == np.float32 and empty.shape == (0,), name


def _has_math_verify() -> bool:
    try:
        import math_verify  # noqa: F401
    except ImportError:
        return False
    return True


# ------------------------------------------------------------------------------------------ combine


def test_combine_weighted_sum_and_parts():
    fns = {
        "correct": rewards.make("gsm8k"),
        "overlong": rewards.make("soft_overlong", max_length=10, cache=4),
        "format": rewards.make("format", pattern="gsm8k"),
    }
    reward = rewards.combine({"correct": 1.0, "overlong": 0.5, "format": 0.0}, fns)
    completions = ["#### 4", "it is 4", "#### 5"]
    columns = {"answer": ["4", "4", "4"], "completion_lengths": [3, 8, 10]}
    total, parts = reward.evaluate(prompts=["q"] * 3, completions=completions, **columns)
    np.testing.assert_array_equal(parts["correct"], [1, 1, 0])
    np.testing.assert_array_equal(parts["overlong"], [0, -0.5, -1])
    np.testing.assert_array_equal(parts["format"], [1, 0, 1])  # weight 0: computed and logged
    assert list(parts) == ["correct", "overlong", "format"] and total.dtype == np.float32
    np.testing.assert_array_equal(total, [1.0, 0.75, -0.5])  # 1·correct + 0.5·overlong + 0·format
    np.testing.assert_array_equal(reward(prompts=["q"] * 3, completions=completions, **columns), total)
    nested = rewards.combine(
        {"a": 2.0, "b": -1}, {"a": reward, "b": fns["correct"]}
    )  # a Combined is a reward
    np.testing.assert_array_equal(nested(prompts=["q"] * 3, completions=completions, **columns), [1, 0.5, -1])


def test_combine_errors():
    gsm = rewards.make("gsm8k")
    with pytest.raises(
        ValueError, match=r"weights without a reward: \['b'\], rewards without a weight: \['c'\]"
    ):
        rewards.combine({"a": 1.0, "b": 1.0}, {"a": gsm, "c": gsm})
    with pytest.raises(ValueError, match="the weight of 'a' must be a finite number, got nan"):
        rewards.combine({"a": float("nan")}, {"a": gsm})
    with pytest.raises(ValueError, match="no rewards"):
        rewards.combine({}, {})
    bad_shape = rewards.combine({"s": 1.0}, {"s": lambda **kw: np.zeros((2, 1), np.float32)})
    with pytest.raises(ValueError, match=r"reward 's' returned shape \(2, 1\) for 2 completions"):
        bad_shape(prompts=["q", "q"], completions=["a", "b"])
    bad_value = rewards.combine({"n": 1.0}, {"n": lambda **kw: np.array([0.0, np.nan])})
    with pytest.raises(ValueError, match="reward 'n' returned nan for completion 1"):
        bad_value(prompts=["q", "q"], completions=["a", "b"])


# ------------------------------------------------------------------------------------------ reward model


@pytest.fixture(scope="module")
def scorer():
    tok = tokenizer.train_tokenizer(
        [f"post {i}: my cat ate the food on day {i}. TL;DR: the cat ate" for i in range(40)], vocab_size=300
    )
    rm = models.RewardModel(models.preset("tiny", vocab_size=tok.vocab_size))
    return tok, rm, random_params(rm, 7), pipeline.SequenceLayout(max_len=48, max_prompt_len=32)


def test_reward_model_scores_prompt_and_completion_rows_as_the_model_does(scorer):
    """Each reward equals the model applied to that row alone, unpadded: BOS + prompt + completion + EOS
    (the head reads the EOS); chunks of 2 rows with padding change nothing beyond float32 rounding."""
    tok, rm, params, layout = scorer
    prompts = ["post 1: my cat ate. TL;DR:", "post 2: the food. TL;DR:", "post 1: my cat ate. TL;DR:"]
    completions = [" the cat ate", " food", " my day"]
    stats = rec.LoadStats()
    fn = rewards.reward_model(
        model=rm, params=params, tokenizer=tok, layout=layout, batch_size=2, stats=stats
    )
    r = fn(prompts=prompts, completions=completions, answer=["ignored"] * 3)
    assert r.dtype == np.float32 and r.shape == (3,) and np.unique(r).size == 3
    assert not stats.truncated  # whole rows: comparable with the unpadded ones below
    for p, c, got in zip(prompts, completions, r, strict=True):
        ids = np.array([[tok.bos_id, *tok.encode(p), *tok.encode(c), tok.eos_id]], np.int32)
        want = rm.apply({"params": params}, ids, np.ones_like(ids))
        np.testing.assert_allclose(got, np.asarray(want)[0], atol=1e-5)


def test_reward_model_relative_to_a_reference(scorer):
    tok, rm, params, layout = scorer
    absolute = rewards.reward_model(model=rm, params=params, tokenizer=tok, layout=layout)
    relative = rewards.reward_model(model=rm, params=params, tokenizer=tok, layout=layout, relative=True)
    prompts = ["post 3: cat. TL;DR:"] * 3
    completions = [" the cat", " food ate", " the cat"]
    references = [" the cat"] * 3
    r_abs = absolute(prompts=prompts, completions=completions)
    r_ref = absolute(prompts=prompts[:1], completions=references[:1])[0]
    r_rel = relative(prompts=prompts, completions=completions, reference_completions=references)
    np.testing.assert_allclose(r_rel, r_abs - r_ref, atol=1e-6)
    assert r_rel[0] == 0.0 and r_rel[2] == 0.0  # a completion scored against itself: exactly 0
    with pytest.raises(ValueError, match="reward 'reward_model' needs the column 'reference_completions'"):
        relative(prompts=prompts, completions=completions)
    short = pipeline.SequenceLayout(max_len=8, max_prompt_len=4)  # cuts are counted in `stats`
    stats = rec.LoadStats()
    rewards.reward_model(model=rm, params=params, tokenizer=tok, layout=short, stats=stats)(
        prompts=prompts, completions=completions
    )
    assert stats.truncated["prompt"] == 3
    with pytest.raises(ValueError, match="model must be a models.RewardModel, got Transformer"):
        rewards.reward_model(model=models.Transformer(rm.config), params=params, tokenizer=tok, layout=layout)
