"""The `gencls` pipeline: config validation, the evaluation's confusion matrices and paired differences
on a hand-built case, and `gencls_synthetic:smoke` / `gencls_glue:smoke` end to end through the command
line (the GLUE one on SST-2 and RTE files the test writes, with a malformed line counted)."""

import json
import os
import subprocess
import sys

import numpy as np
import pytest

from launch import train
from rlhf_jax.pipelines import gencls

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
KEYS = gencls.RESULT_KEYS


def _cli(args):
    env = {**os.environ, "PYTHONPATH": ROOT + os.pathsep + os.environ.get("PYTHONPATH", "")}
    return subprocess.run([sys.executable, "-m", "launch.train", "--config.progress=false", *args],
                          capture_output=True, text=True, cwd=ROOT, env=env)  # fmt: skip


def test_confusion_counts_gold_rows_and_predicted_columns():
    got = gencls.confusion(np.array([0, 0, 1, 2, 2]), np.array([0, 3, 1, 1, 2]), 3, 4)
    assert got == [[1, 0, 0, 1], [0, 1, 0, 0], [0, 1, 1, 0]]


def test_config_validation_names_the_field_and_the_flag():
    with pytest.raises(ValueError, match=r"config\.cls\.train_prompt must be one of"):
        train.build_plan(train.resolve_config("gencls_synthetic:smoke", ["--config.cls.train_prompt=chatty"]))
    with pytest.raises(ValueError, match=r"--config\.data\.path=TRAIN\.tsv"):
        train.build_plan(train.resolve_config("gencls_glue:smoke", []))
    with pytest.raises(ValueError, match="label set comes from the data"):
        train.build_plan(
            train.resolve_config("gencls_synthetic:smoke", ["--config.rewards.label_match.labels=a"])
        )
    plan = train.build_plan(
        train.resolve_config("gencls_synthetic:smoke", ["--config.rewards.label_match.unparseable=-3.0"])
    )
    assert dict(plan.rewards[0][2])["unparseable"] == -3.0 and plan.grpo.estimator == "grpo"
    assert plan.ppo is None  # the experiment's ppo section is unused by GRPO
    flags = ["--config.grpo.estimator=gae", "--config.grpo.group_size=1", "--config.ppo.lam=0.9"]
    ppo_plan = train.build_plan(train.resolve_config("gencls_synthetic:smoke", flags))
    assert ppo_plan.ppo is not None and ppo_plan.ppo.lam == 0.9 and ppo_plan.ppo.critic_init == "sft"
    with pytest.raises(ValueError, match="critic_init='reward_model' needs the run's reward model"):
        train.build_plan(train.resolve_config(
            "gencls_synthetic:smoke", ["--config.grpo.estimator=gae", "--config.ppo.critic_init=reward_model"]
        ))  # fmt: skip


def _check_results(results, stdout, k):
    for key in KEYS:
        assert key in results, key
    for kind in ("generate", "ppl"):
        for suffix in ("", "_sft"):
            acc, (lo, hi) = results[f"accuracy_{kind}{suffix}"], results[f"accuracy_{kind}{suffix}_ci"]
            assert 0 <= lo <= acc <= hi <= 1
            assert np.sum(results[f"confusion_{kind}{suffix}"]) == results["eval_examples"]
        # the paired difference equals the difference of the accuracies (same examples)
        diff = results[f"accuracy_{kind}"] - results[f"accuracy_{kind}_sft"]
        assert results[f"accuracy_{kind}_vs_sft"] == pytest.approx(diff, abs=1e-9)
    diff = results["accuracy_ppl"] - results["accuracy_generate"]  # the RL policy's, paired
    assert results["accuracy_ppl_vs_generate"] == pytest.approx(diff, abs=1e-9)
    lo, hi = results["accuracy_ppl_vs_generate_ci"]
    assert -1 <= lo <= results["accuracy_ppl_vs_generate"] <= hi <= 1
    assert len(results["confusion_generate"]) == k and len(results["confusion_generate"][0]) == k + 1
    assert results["method"] == "grpo/dapo" and "Classification as generation" in stdout


@pytest.mark.slow
def test_gencls_synthetic_smoke_end_to_end_and_reused(tmp_path):
    run = _cli(["--experiment=gencls_synthetic:smoke", f"--workdir={tmp_path}"])
    assert run.returncode == 0, run.stderr[-3000:]
    results = json.load(open(tmp_path / "results.json"))
    _check_results(results, run.stdout, 4)
    assert results["eval_examples"] == 32 and results["labels"] == ["sports", "food", "weather", "music"]
    again = _cli(["--experiment=gencls_synthetic:smoke", f"--workdir={tmp_path}"])
    assert again.returncode == 0 and "reused policy/" in again.stdout
    assert json.load(open(tmp_path / "results.json"))["accuracy_ppl"] == results["accuracy_ppl"]
    # Another inference-time strategy: both trained stages reused, only the evaluation runs anew.
    numeric = _cli(["--experiment=gencls_synthetic:smoke", f"--workdir={tmp_path}",
                    "--config.cls.eval_prompt=numeric"])  # fmt: skip
    assert numeric.returncode == 0, numeric.stderr[-3000:]
    assert "reused sft/" in numeric.stdout and "reused policy/" in numeric.stdout
    changed = json.load(open(tmp_path / "results.json"))
    assert changed["eval_prompt"] == "numeric" and changed["ppl_candidates"] == [" 1", " 2", " 3", " 4"]
    _check_results(changed, numeric.stdout, 4)


SST2 = "sentence\tlabel\n" + "".join(
    f"{w} film {i}\t{lab}\n"
    for i in range(40)
    for w, lab in (("a wonderful", 1), ("a dreadful", 0))
) + "a line with no label column\n"  # fmt: skip
RTE = "index\tsentence1\tsentence2\tlabel\n" + "".join(
    f"{i}\tThe cat sat on mat {i}.\t{'A cat sat.' if i % 2 else 'No cat sat.'}\t"
    f"{'entailment' if i % 2 else 'not_entailment'}\n"
    for i in range(60)
)


@pytest.mark.slow
@pytest.mark.parametrize("name, text, labels", [("sst2", SST2, ["negative", "positive"]),
                                                 ("rte", RTE, ["entailment", "not_entailment"])],
                         ids=["sst2", "rte"])  # fmt: skip
def test_gencls_glue_smoke_on_tsv_files(tmp_path, name, text, labels):
    train_file, dev_file = tmp_path / f"{name}_train.tsv", tmp_path / f"{name}_dev.tsv"
    train_file.write_text(text)
    dev_file.write_text(text.split("\n", 1)[0] + "\n" + "".join(text.splitlines(True)[1:17]))
    run = _cli(["--experiment=gencls_glue:smoke", f"--workdir={tmp_path / 'w'}",
                f"--config.data.path={train_file}", f"--config.data.eval_path={dev_file}"])  # fmt: skip
    assert run.returncode == 0, run.stderr[-3000:]
    results = json.load(open(tmp_path / "w" / "results.json"))
    _check_results(results, run.stdout, 2)
    assert results["labels"] == labels and results["eval_examples"] == 16
    if name == "sst2":  # the malformed last line: counted and named
        assert "column_count=1" in run.stdout
        assert f"{train_file}:82" in run.stderr
