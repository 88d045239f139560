"""Online RL against a learned reward model (`grpo_tldr`): the task view, the reward, the plan's checks,
the fingerprint, and the over-optimisation curve through the command line (slow)."""

import glob
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time

import numpy as np
import pytest

from rlhf_jax.data import records as rec
from rlhf_jax.data import synthetic_tldr
from rlhf_jax.pipelines import evaluation, grpo, tasks
from rlhf_jax.pipelines.config import DataConfig

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _task_data(preference, sft=()):
    return tasks.TaskData(
        sft=list(sft), preference=list(preference), eval_preference=[], eval_prompts=[], synthetic=False,
        stats={},
    )  # fmt: skip


def test_rl_task_takes_each_training_prompt_once_with_its_first_chosen_response():
    pairs = [
        rec.PreferenceExample("p1", " a", " b"),
        rec.PreferenceExample("p2", " c", " d"),
        rec.PreferenceExample("p1", " e", " f"),  # the same prompt again: not a second RL prompt
        rec.PreferenceExample("p3", " g", " h"),
    ]
    cfg = grpo.GRPOConfig(rewards=(("tldr_gold", 1.0, ()),))
    task = grpo.rl_task(_task_data(pairs), cfg)
    assert task.prompts == ["p1", "p2", "p3"]
    assert task.columns == {"reference_completions": [" a", " c", " g"]}
    capped = grpo.rl_task(_task_data(pairs), grpo.GRPOConfig(rewards=cfg.rewards, max_prompts=2))
    assert capped.prompts == ["p1", "p2"] and capped.columns["reference_completions"] == [" a", " c"]
    # Without pairs, the SFT examples' prompts and completions.
    sft_only = grpo.rl_task(_task_data([], sft=[rec.SFTExample("q", " y"), rec.SFTExample("q", " z")]), cfg)
    assert sft_only.prompts == ["q"] and sft_only.columns == {"reference_completions": [" y"]}
    with pytest.raises(ValueError, match="no training prompts"):
        grpo.rl_task(_task_data([]), cfg)


def test_the_learned_reward_is_maximised_and_the_gold_reward_with_weight_zero_only_logged():
    made = []

    def factory(*, batch_size=64, relative=False):  # stands in for rewards.reward_model with a model bound
        made.append((batch_size, relative))
        return lambda *, prompts, completions, **columns: np.array([len(c) for c in completions], np.float32)

    specs = (("reward_model", 1.0, (("batch_size", 8), ("relative", True))), ("tldr_gold", 0.0, ()))
    reward = grpo.task_reward(specs, reward_model=factory)
    assert made == [(8, True)]  # the config's hyperparameters reach the factory
    split = synthetic_tldr.generate_splits(seed=0, num_sft=0, num_pref=2, num_eval=0)
    prompts = [p.prompt for p in split.preference]
    completions = [" short", " a much longer summary"]
    total, parts = reward(prompts=prompts, completions=completions)
    np.testing.assert_array_equal(total, [6.0, 22.0])  # the reward model's alone
    gold = [synthetic_tldr.gold_reward(p, c) for p, c in zip(prompts, completions, strict=True)]
    np.testing.assert_allclose(parts["tldr_gold"], gold, rtol=1e-6)
    with pytest.raises(ValueError, match="needs a trained reward model"):
        grpo.task_reward(specs)


def _config(experiment, *overrides):
    from launch import train

    return train.resolve_config(experiment, list(overrides))


def test_the_plan_trains_a_pointwise_reward_model_only_where_there_are_pairs():
    from launch import train

    plan = train.build_plan(_config("grpo_tldr:smoke"))
    assert plan.rm is not None and not plan.math
    assert isinstance(plan.eval, evaluation.EvalConfig)
    assert dict((n, w) for n, w, _ in plan.grpo.rewards) == {"reward_model": 1.0, "tldr_gold": 0.0}
    arith = train.build_plan(_config("grpo_arith:smoke"))
    assert arith.rm is None and arith.math

    with pytest.raises(ValueError, match="no preference pairs to train a reward model"):
        train.build_plan(_config("grpo_arith:smoke", "--config.rewards.reward_model.weight=1"))
    with pytest.raises(ValueError, match=r"rm.kind must be 'pointwise'"):
        train.build_plan(_config("grpo_tldr:smoke", "--config.rm.kind=pairwise"))
    bad = _config("grpo_tldr:smoke")
    bad.rewards.reward_model.batch_size = 0
    with pytest.raises(ValueError, match=r"reward_model.batch_size must be int >= 1, got 0"):
        train.build_plan(bad)
    bad = _config("grpo_tldr:smoke")
    bad.rewards.reward_model.relative = "yes"
    with pytest.raises(ValueError, match="reward_model.relative must be bool"):
        train.build_plan(bad)


def test_the_policy_fingerprint_names_the_reward_model_and_the_curve_only_when_used():
    from launch import train

    plan = train.build_plan(_config("grpo_arith:smoke"))
    base = grpo.spec(plan.main, plan.grpo)
    # A run without a learned reward or a curve keeps the keys it always had (so its stages are reused).
    keys = ("kind", "seed", "model", "optim", "train", "data", "init_from", "init_from_hf", "grpo", "sft")
    assert set(base) == set(keys)
    assert grpo.spec(plan.main, plan.grpo, rm_dir="", curve=None) == base
    with_rm = grpo.spec(plan.main, plan.grpo, rm_dir="/nonexistent/rm")
    assert with_rm["reward_model"] != base.get("reward_model")
    with_curve = grpo.spec(plan.main, plan.grpo, curve={"every": 10})
    assert with_curve["curve"] == {"every": 10}


def test_format_curve_prints_one_row_per_point():
    points = [
        {"step": 0, "kl_to_sft": 0.0, "proxy_reward_policy": 0.1, "gold_reward_policy": 0.2,
         "win_rate_vs_sft_gold": 0.5},
        {"step": 10, "kl_to_sft": 1.5, "proxy_reward_policy": 0.9, "gold_reward_policy": None,
         "win_rate_vs_sft_gold": None},
    ]  # fmt: skip
    lines = grpo.format_curve(points).splitlines()
    assert len(lines) == 3 and "gold win vs SFT" in lines[0]
    assert lines[1].split() == ["0", "0.000", "0.100", "0.200", "0.500"]
    assert lines[2].split() == ["10", "1.500", "0.900", "n/a", "n/a"]


# ----------------------------------------------------------------------------------------------------
# Through the command line.


def _cli(args):
    env = {**os.environ, "PYTHONPATH": ROOT + os.pathsep + os.environ.get("PYTHONPATH", "")}
    return [sys.executable, "-m", "launch.train", *args], dict(cwd=ROOT, env=env)


def _jsonl(path):
    if not os.path.exists(path):
        return []
    with open(path, encoding="utf-8") as f:
        return [json.loads(line) for line in f if line.endswith("\n")]


def _policy_dir(workdir):
    return glob.glob(os.path.join(workdir, "policy", "*"))[0]


ARGS = ["--experiment=grpo_tldr:smoke", "--config.progress=false", "--config.grpo.iterations=3",
        "--config.checkpoint.every_steps=1000"]  # fmt: skip


@pytest.mark.slow
def test_grpo_tldr_smoke_writes_the_curve_and_resumes_it_exactly_after_sigterm(tmp_path):
    """`grpo_tldr:smoke`: SFT → reward model → GRPO on the reward model, with the gold reward logged and
    a curve point at every step (and step 0); then the policy stage alone is rerun, stopped by SIGTERM
    after an iteration and resumed: its records and curve equal the uninterrupted run's."""
    workdir = str(tmp_path / "run")
    cmd, kw = _cli([*ARGS, f"--workdir={workdir}"])
    full = subprocess.run(cmd, capture_output=True, text=True, **kw)
    assert full.returncode == 0, full.stderr[-3000:]
    results = json.load(open(os.path.join(workdir, "results.json")))
    for key in evaluation.RESULT_KEYS:
        assert key in results, key
    assert 0 <= results["win_rate_vs_sft_gold"] <= 1 and 0 <= results["win_rate_vs_sft_proxy"] <= 1
    assert results["reward_model"]["stage"] and "Evaluation during training" in full.stdout
    assert len(glob.glob(os.path.join(workdir, "rm", "*"))) == 1
    policy = _policy_dir(workdir)
    records = _jsonl(os.path.join(policy, "metrics.jsonl"))
    assert [r["step"] for r in records] == [1, 2, 3]
    for r in records:  # the maximised reward is the reward model's; the gold one rides along at weight 0
        assert r["reward_mean"] == pytest.approx(r["reward/reward_model"], abs=1e-6)
        assert "reward/tldr_gold" in r
    curve = _jsonl(os.path.join(policy, grpo.CURVE_FILE))
    assert [p["step"] for p in curve] == [0, 1, 2, 3]
    assert curve[0]["kl_to_sft"] == pytest.approx(0.0, abs=1e-4)  # step 0 is the SFT policy itself
    assert curve[0]["win_rate_vs_sft_gold"] == 0.5  # the same samples as the SFT policy's: all ties
    assert all(p[k] is not None for p in curve for k in grpo.CURVE_KEYS)
    assert results["curve"] == curve

    # The policy stage again, interrupted and resumed (the SFT and reward-model stages are reused).
    shutil.rmtree(policy)
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, **kw)
    deadline = time.time() + 600
    while (
        time.time() < deadline
        and proc.poll() is None
        and len(_jsonl(os.path.join(policy, "metrics.jsonl"))) < 1
    ):
        time.sleep(0.05)
    assert proc.poll() is None, (
        "the run ended before SIGTERM could be sent:\n" + proc.communicate()[1][-3000:]
    )
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=600)
    assert proc.returncode == 143, err[-3000:]
    step = int(re.search(r"preempted by SIGTERM at step (\d+) of stage grpo", err).group(1))
    assert 1 <= step < 3
    rerun = subprocess.run(cmd, capture_output=True, text=True, **kw)
    assert rerun.returncode == 0, rerun.stderr[-3000:]
    assert f"resuming from the checkpoint at step {step}" in rerun.stdout
    assert "reused rm/" in rerun.stdout
    same = lambda rs: [(r["step"], r["loss"], r["reward_mean"], r["reward/tldr_gold"]) for r in rs]  # noqa: E731
    assert same(_jsonl(os.path.join(policy, "metrics.jsonl"))) == same(records)
    assert _jsonl(os.path.join(policy, grpo.CURVE_FILE)) == curve  # no point lost or written twice


def test_a_grpo_run_on_the_tldr_task_without_a_reward_is_refused_early():
    with pytest.raises(ValueError, match="rewards is empty"):
        from launch import train

        config = _config("grpo_tldr:smoke")
        del config.rewards["reward_model"]
        del config.rewards["tldr_gold"]
        train.build_plan(config)


def test_rl_task_on_the_synthetic_tldr_task_uses_the_pairs_prompts():
    data = DataConfig(task="tldr", num_sft=8, num_pref=16, num_eval=2, eval_fraction=0.25)
    task = tasks.load_task(data, seed=0)
    rl = grpo.rl_task(task, grpo.GRPOConfig(rewards=(("tldr_gold", 1.0, ()),)))
    assert rl.prompts == list(dict.fromkeys(p.prompt for p in task.preference))
    assert all("TL;DR:" in p for p in rl.prompts)
