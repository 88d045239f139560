"""The online RL loop (`rlhf_jax.pipelines.grpo`): dynamic sampling, the first step's ratio, the
`grpo_arith:smoke` run through the command line, and its exact resume after SIGTERM."""

import dataclasses
import glob
import json
import os
import re
import signal
import subprocess
import sys
import time
import zlib

import jax
import numpy as np
import pytest

from rlhf_jax import models
from rlhf_jax.data import synthetic_arith
from rlhf_jax.pipelines import grpo
from rlhf_jax.train import steps

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    splits = synthetic_arith.generate_splits(seed=0, num_sft=64, num_train=32, num_eval=4)
    tok = synthetic_arith.get_tokenizer(splits, str(tmp_path_factory.mktemp("tok")), vocab_size=400)
    cfg = models.preset("tiny", vocab_size=tok.vocab_size, max_len=96)
    model = models.Transformer(cfg)
    return splits, tok, model, models.init_params(model, jax.random.key(0))


def _task(splits, reward_of):
    def reward(*, prompts, completions, **columns):
        total = np.asarray([reward_of(p, c) for p, c in zip(prompts, completions, strict=True)], np.float32)
        return total, {"test": total}

    return grpo.RLTask(
        prompts=[p.prompt for p in splits.train], columns={"answer": [p.answer for p in splits.train]},
        reward=reward,
    )  # fmt: skip


@pytest.mark.xdist_group("grpo_tiny")
def test_dynamic_sampling_drops_equal_reward_groups_and_draws_more(tiny):
    splits, tok, model, params = tiny
    flat = {p.prompt for p in splits.train[::2]}  # half the prompts: the same reward for every sample
    scrambled = lambda text: float(zlib.crc32(text.encode()) % 7)
    reward_of = lambda prompt, completion: 0.5 if prompt in flat else scrambled(completion)
    config = grpo.GRPOConfig(
        num_prompts=4, group_size=4, max_new_tokens=8, dynamic_sampling=True, max_draws=6
    )
    out = grpo.sample_groups(model, params, tok, _task(splits, reward_of), config, iteration=0, seed=0,
                             max_prompt_len=48)  # fmt: skip
    rewards_PG = out["rewards"]
    assert rewards_PG.shape == (4, 4) and out["advantages"].shape == (4, 4)
    varied = rewards_PG.max(1) > rewards_PG.min(1)
    # Every kept group has a reward signal; the flat ones drawn were counted as dropped.
    stream = lambda d: grpo.prompt_stream(len(splits.train), seed=0, iteration=0, draw=d, count=4)
    drawn = [splits.train[i].prompt for d in range(out["draws"]) for i in stream(d)]
    assert out["groups_dropped"] == sum(p in flat for p in drawn) > 0
    assert varied[: 4 - out["groups_short"]].all()
    # Without dynamic sampling nothing is dropped and one draw is made.
    plain = grpo.sample_groups(model, params, tok, _task(splits, reward_of),
                               grpo.GRPOConfig(num_prompts=4, group_size=4, max_new_tokens=8), iteration=0,
                               seed=0, max_prompt_len=48)  # fmt: skip
    assert plain["draws"] == 1 and plain["groups_dropped"] == 0
    # Every group flat: all draws spent, the batch filled with zero-advantage groups.
    flat_all = grpo.sample_groups(model, params, tok, _task(splits, lambda p, c: 1.0), config, iteration=0,
                                  seed=0, max_prompt_len=48)  # fmt: skip
    assert flat_all["draws"] == 6 and flat_all["groups_short"] == 4
    assert np.all(flat_all["advantages"] == 0.0)


@pytest.mark.xdist_group("grpo_tiny")
def test_the_logged_entropy_is_the_training_steps_entropy_of_the_same_samples(tiny):
    """The loop logs `entropy` from the sampler's sums (`_entropy`); with one optimizer step per
    iteration (the policy that sampled is the stepped one) it equals the step's own entropy at the loss
    tokens, `policy_gradient_objective(entropy=True)` on the iteration's rows in one mini-batch. Fails if
    the sampler used another temperature, counted positions after EOS, or the loop divided by another
    count; the step without `entropy` has the same loss and no entropy."""
    splits, tok, model, params = tiny
    scrambled = lambda prompt, text: float(zlib.crc32(text.encode()) % 5)
    config = grpo.GRPOConfig(num_prompts=4, group_size=4, max_new_tokens=12, temperature=0.8)
    groups = grpo.sample_groups(model, params, tok, _task(splits, scrambled), config, iteration=0, seed=0,
                                max_prompt_len=48)  # fmt: skip
    assert groups["entropy"].shape == (4, 4) and (groups["entropy"] > 0).all()
    rows = grpo.training_rows(groups, pad_id=tok.pad_id, mask_truncated=False)
    batch = grpo.minibatch(rows, np.arange(16))
    kw = dict(model=model, temperature=0.8, aggregation="dapo", loss_kwargs=config.loss_kwargs())
    on = jax.jit(lambda p, b: steps.policy_gradient_objective(p, b, None, **kw, entropy=True))
    off = jax.jit(lambda p, b: steps.policy_gradient_objective(p, b, None, **kw, entropy=False))
    (loss, sums), (loss_off, sums_off) = on(params, batch), off(params, batch)
    np.testing.assert_allclose(grpo._entropy(groups), float(sums["entropy"]), rtol=1e-5)
    assert "entropy" not in sums_off and float(loss_off) == float(loss)


def test_a_non_finite_reward_stops_with_the_reward_prompt_and_completion(tiny):
    splits, tok, model, params = tiny
    nan_for = splits.train[0].prompt
    task = _task(splits, lambda prompt, completion: float("nan") if prompt == nan_for else 1.0)
    config = grpo.GRPOConfig(num_prompts=len(splits.train), group_size=2, max_new_tokens=4)
    with pytest.raises(
        ValueError, match=r"reward test: non-finite value for 2 of \d+ completions in iteration 0"
    ):
        grpo.sample_groups(model, params, tok, task, config, iteration=0, seed=0, max_prompt_len=48)


def test_math_eval_batches_prompts_without_changing_the_samples(tiny):
    """`eval.prompts_per_batch` bounds the KV cache; each problem's samples are seeded by its index, so
    evaluating 4 problems 2 at a time gives the numbers of all 4 at once. The lengths split by the
    checker: a checker accepting every answer leaves no wrong ones."""
    from rlhf_jax.pipelines import math_eval

    splits, tok, model, params = tiny
    perturbed = jax.tree.map(lambda x: x * 1.01, params)
    parity = lambda *, prompts, completions, answer: np.array([len(c) % 2 for c in completions], np.float32)
    kw = dict(model=model, policy_params=perturbed, sft_params=params, tokenizer=tok,
              problems=splits.eval[:4], correct=parity, seed=3, max_prompt_len=48)  # fmt: skip
    config = math_eval.MathEvalConfig(num_problems=0, k=3, max_new_tokens=8, bootstrap=50)
    whole = math_eval.evaluate_math(config=config, **kw)
    chunked = math_eval.evaluate_math(config=dataclasses.replace(config, prompts_per_batch=2), **kw)
    assert whole["eval_problems"] == 4
    for key in ("accuracy", "accuracy_sft", "pass_at_k", "mean_response_length", "mean_length_correct",
                "mean_length_wrong", "distinct_correct"):  # fmt: skip
        assert chunked[key] == whole[key], key
    assert 0 <= whole["distinct_correct"] <= 3
    assert chunked["kl_to_sft"] == pytest.approx(whole["kl_to_sft"], abs=1e-5)
    everything = math_eval.evaluate_math(
        config=config, **{**kw, "correct": lambda *, prompts, completions, answer: np.ones(len(completions))}
    )
    assert everything["mean_length_wrong"] is None and 1 <= everything["mean_length_correct"] <= 8
    with pytest.raises(ValueError, match="prompts_per_batch"):
        math_eval.MathEvalConfig(prompts_per_batch=-1)


def test_distinct_correct_counts_distinct_accepted_texts():
    """Hand-counted: duplicates (up to surrounding whitespace) count once, rejected texts not at all."""
    from rlhf_jax.pipelines import math_eval

    texts = [["a", " a\n", "b", "c"], ["x", "y", "x", "z"], ["p", "p", "p", "p"]]
    ok = np.array([[1, 1, 1, 0], [0, 0, 0, 0], [1, 1, 1, 1]], bool)
    np.testing.assert_array_equal(math_eval.distinct_correct(texts, ok), [2, 0, 1])


def test_prompt_stream_depends_on_seed_iteration_and_draw_only():
    a = grpo.prompt_stream(50, seed=1, iteration=3, draw=0, count=10)
    assert np.array_equal(a, grpo.prompt_stream(50, seed=1, iteration=3, draw=0, count=10))
    assert len(set(a.tolist())) == 10
    for other in (dict(seed=2, iteration=3, draw=0), dict(seed=1, iteration=4, draw=0),
                  dict(seed=1, iteration=3, draw=1)):  # fmt: skip
        assert not np.array_equal(a, grpo.prompt_stream(50, count=10, **other))


def _cli(args, **kw):
    env = {**os.environ, "PYTHONPATH": ROOT + os.pathsep + os.environ.get("PYTHONPATH", "")}
    return [sys.executable, "-m", "launch.train", *args], dict(cwd=ROOT, env=env, **kw)


def _records(workdir):
    paths = glob.glob(os.path.join(workdir, "policy", "*", "metrics.jsonl"))
    if not paths:
        return []
    with open(paths[0], encoding="utf-8") as f:
        return [json.loads(line) for line in f if line.endswith("\n")]


SMOKE = ["--experiment=grpo_arith:smoke", "--config.progress=false"]
KEYS = ("loss", "reward_mean", "reward_std", "frac_zero_std_groups", "groups_dropped", "clip_frac_low",
        "clip_frac_high", "kl", "entropy", "response_length", "truncated_frac", "generation_s",
        "train_s")  # fmt: skip


@pytest.mark.slow
def test_grpo_arith_smoke_reports_and_resumes_exactly_after_sigterm(tmp_path):
    """`grpo_arith:smoke` through the command line (β > 0 for the KL path), then the same run stopped
    by SIGTERM after two iterations and rerun: the rerun resumes from the checkpoint and its records
    equal the uninterrupted run's (prompts, sampler keys, params and optimizer state all restored)."""
    args = [
        *SMOKE,
        "--config.grpo.iterations=5",
        "--config.checkpoint.every_steps=1000",
        "--config.grpo.beta=0.04",
    ]
    cmd, kw = _cli([*args, f"--workdir={tmp_path / 'full'}"])
    full = subprocess.run(cmd, capture_output=True, text=True, **kw)
    assert full.returncode == 0, full.stderr[-3000:]
    results = json.load(open(tmp_path / "full" / "results.json"))
    for key in ("accuracy", "accuracy_ci95", "accuracy_sft", "pass_at_k", "mean_response_length", "kl_to_sft",
                "wall_time_s"):  # fmt: skip
        assert key in results, key
    assert 0 <= results["accuracy"] <= 1 and "Online RL on arith: grpo/dapo" in full.stdout
    assert results["samples_generated"] == 5 * 4 * 4  # iterations × P × G (no dynamic sampling)
    lengths = [results[k] for k in ("mean_length_correct", "mean_length_wrong") if results[k] is not None]
    assert lengths and all(1 <= n <= 16 for n in lengths)  # tokens, EOS included; budget 16
    records = _records(str(tmp_path / "full"))
    assert [r["step"] for r in records] == [1, 2, 3, 4, 5]
    for r in records:
        assert all(k in r for k in KEYS), sorted(r)
        # One mini-batch per iteration and μ = 1: every update is at the sampling policy, ratio 1.
        assert r["ratio_mean"] == pytest.approx(1.0, abs=1e-5)
        assert r["clip_frac_low"] == r["clip_frac_high"] == 0.0

    # Another evaluation config on the reused stages: evaluated anew, never the cached one's numbers.
    cmd, kw = _cli([*args, f"--workdir={tmp_path / 'full'}", "--config.eval.num_problems=4"])
    again = subprocess.run(cmd, capture_output=True, text=True, **kw)
    assert again.returncode == 0, again.stderr[-3000:]
    assert "reused policy/" in again.stdout
    assert (
        json.load(open(tmp_path / "full" / "results.json"))["eval_problems"] == 4 != results["eval_problems"]
    )

    workdir = tmp_path / "preempted"
    cmd, kw = _cli([*args, f"--workdir={workdir}"])
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, **kw)
    deadline = time.time() + 600
    while time.time() < deadline and proc.poll() is None and len(_records(str(workdir))) < 2:
        time.sleep(0.05)
    assert proc.poll() is None, (
        "the run ended before SIGTERM could be sent:\n" + proc.communicate()[1][-3000:]
    )
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=600)
    assert proc.returncode == 143, err[-3000:]
    step = int(re.search(r"preempted by SIGTERM at step (\d+) of stage grpo", err).group(1))
    assert 2 <= step < 5
    before = _records(str(workdir))
    rerun = subprocess.run(cmd, capture_output=True, text=True, **kw)
    assert rerun.returncode == 0, rerun.stderr[-3000:]
    assert f"resuming from the checkpoint at step {step}" in rerun.stdout
    after = _records(str(workdir))
    assert after[:step] == before  # resumed, not restarted
    same = lambda rs: [(r["step"], r["loss"], r["reward_mean"], r["response_length"], r["kl"]) for r in rs]
    assert same(after) == same(records)
    resumed = json.load(open(workdir / "results.json"))  # whole-run numbers count the first run's part too
    for key in ("samples_generated", "entropy_final", "reward_final", "accuracy", "mean_length_wrong"):
        assert resumed[key] == results[key], key


def test_training_summary_counts_every_draw_and_averages_the_last_iterations(tmp_path):
    cfg = grpo.GRPOConfig(num_prompts=4, group_size=2, dynamic_sampling=True)
    with open(tmp_path / "metrics.jsonl", "w") as f:
        for i, draws in enumerate([1, 3, 2, 1, 1, 4, 1]):
            f.write(json.dumps({"step": i + 1, "draws": draws, "entropy": float(i), "reward_mean": 0.1 * i,
                                "response_length": 10.0 + i}) + "\n")  # fmt: skip
    s = grpo.training_summary(str(tmp_path), cfg)
    assert s["samples_generated"] == 13 * 4 * 2
    assert s["entropy_final"] == pytest.approx(np.mean([2, 3, 4, 5, 6]))  # the last five iterations
    assert s["reward_final"] == pytest.approx(0.4) and s["response_length_final"] == pytest.approx(14.0)


def test_rewards_are_added_and_validated_from_the_command_line():
    from launch import overrides, train

    config = train.resolve_config(
        "grpo_arith:smoke",
        ["--config.rewards.soft_overlong.weight=0.5", "--config.rewards.soft_overlong.max_length=16",
         "--config.rewards.soft_overlong.cache=4"],
    )  # fmt: skip
    plan = train.build_plan(config)
    assert plan.grpo.rewards == (
        ("gsm8k", 1.0, ()),
        ("soft_overlong", 0.5, (("cache", 4), ("max_length", 16))),
    )
    with pytest.raises(overrides.ConfigError, match="unknown reward 'nope'"):
        train.resolve_config("grpo_arith:smoke", ["--config.rewards.nope.weight=1"])
    with pytest.raises(overrides.ConfigError, match="reward 'gsm8k' has no 'cache'"):
        train.resolve_config("grpo_arith:smoke", ["--config.rewards.gsm8k.cache=1"])
    missing = train.resolve_config("grpo_arith:smoke", ["--config.rewards.soft_overlong.weight=1"])
    with pytest.raises(ValueError, match="soft_overlong"):  # max_length and cache are required
        train.build_plan(missing)
