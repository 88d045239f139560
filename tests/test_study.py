"""The study runner: intervals, tables, shared stages, and a smoke study through the command line."""

import json
import os

import numpy as np
import pytest

from launch import study


def test_t_interval_matches_the_formula():
    values = [0.5, 0.6, 0.7]
    lo, hi = study.t_interval(values)
    half = 4.303 * np.std(values, ddof=1) / np.sqrt(3)
    assert (lo, hi) == pytest.approx((0.6 - half, 0.6 + half))
    assert study.t_interval([0.4]) is None


def test_summarize_and_markdown():
    s = study.Study("s", (study.Method("a", "x"), study.Method("b", "x")), ("m", "n"))
    results = {
        "a": [{"m": 0.5, "n": None, "wall_time_s": 1.0}, {"m": 0.7, "n": None, "wall_time_s": 2.0}],
        "b": [{"m": 0.6, "m_ci95": [0.5, 0.7], "n": 1.0, "wall_time_s": 1.0}],
    }
    table = study.summarize(s, results)
    assert table["a"]["m"]["values"] == [0.5, 0.7] and table["a"]["m"]["mean"] == pytest.approx(0.6)
    assert table["a"]["n"]["mean"] is None and table["a"]["wall_time_s"] == 3.0
    assert table["b"]["m"]["ci95"] == [0.5, 0.7]  # one seed: the run's own bootstrap interval
    text = study.markdown(s, table, 2, 60.0, "cmd")
    assert "| a | 0.600 [" in text and "| b | 0.600 [0.500, 0.700] | 1.000 |" in text and "n/a" in text


def test_unknown_study_lists_the_studies(capsys):
    assert study.main(["--study=nope"]) == 2
    err = capsys.readouterr().err
    for name in ("rso_table", "rdpo_noise", "rpo_overopt", "inpo_iters"):
        assert name in err


def test_every_study_builds_valid_runs():
    from launch import overrides, train

    for name in ("rso_table", "rdpo_noise", "rpo_overopt", "inpo_iters"):
        module = __import__(f"experiments.{name}", fromlist=["get_study"])
        for variant in (None, "smoke"):
            s = module.get_study(variant)
            assert s.methods and s.metrics
            for method in s.methods:
                exp, _, var = method.experiment.partition(":")
                config = __import__(f"experiments.{exp}", fromlist=["get_config"]).get_config(var or None)
                train.build_stages(overrides.apply_overrides(config, list(method.overrides)))


@pytest.mark.slow
def test_smoke_study_runs_and_shares_stages(tmp_path):
    assert study.main(["--study=rpo_overopt:smoke", "--seeds=1", f"--workdir={tmp_path}",
                       "--config.progress=false"]) == 0  # fmt: skip
    for name in ("table.md", "table.json", "plot.png"):
        assert os.path.exists(tmp_path / name), name
    table = json.loads((tmp_path / "table.json").read_text())
    assert set(table["methods"]) == {"dpo", "rpo"}
    assert table["methods"]["rpo"]["win_rate_vs_sft_gold"]["values"]
    # The SFT and reward-model stages were trained once and copied: identical params metadata.
    a, b = (tmp_path / "seed_0" / m / "sft" / "results.json" for m in ("dpo", "rpo"))
    assert a.read_text() == b.read_text()
    curve = [json.loads(x) for x in (tmp_path / "seed_0" / "rpo" / "policy" / "eval_curve.jsonl").open()]
    assert [c["step"] for c in curve] == [3, 6] and all(c["gold_reward_policy"] is not None for c in curve)


def _fake_run(root, seed, run, config, stages):
    d = root / f"seed_{seed}" / run
    d.mkdir(parents=True, exist_ok=True)
    for sub in stages:
        (d / sub / "params").mkdir(parents=True)
    (d / "config.json").write_text(json.dumps({"experiment": "x", **config}))
    return d


def test_reuse_copies_only_stages_whose_config_matches(tmp_path):
    rows = study.Method("a", "rso_tldr:smoke")
    config = study.run_config(rows, 0, [])
    assert config["seed"] == 0
    other = tmp_path / "other"
    _fake_run(other, 0, "m0", config, ("sft", "rm"))
    assert study.find_reusable("sft", config, 0, [str(other)]) == str(other / "seed_0" / "m0" / "sft")
    assert study.find_reusable("rm", config, 0, [str(other)]) == str(other / "seed_0" / "m0" / "rm")
    # Only SFT and reward-model stages are reusable; another seed has nothing to give.
    assert study.find_reusable("samples", config, 0, [str(other)]) is None
    assert study.find_reusable("sft", study.run_config(rows, 1, []), 1, [str(other)]) is None
    # A different SFT budget changes both stages; a different RM budget or kind only the reward model;
    # a different policy budget neither.
    sft_changed = study.run_config(rows, 0, ["--config.sft.steps=7"])
    assert study.find_reusable("sft", sft_changed, 0, [str(other)]) is None
    assert study.find_reusable("rm", sft_changed, 0, [str(other)]) is None
    rm_changed = study.run_config(rows, 0, ["--config.rm.learning_rate=0.5"])
    assert study.find_reusable("sft", rm_changed, 0, [str(other)]) is not None
    assert study.find_reusable("rm", rm_changed, 0, [str(other)]) is None
    pairwise = study.run_config(rows, 0, ["--config.rso.reward_kind=pairwise"])
    assert study.find_reusable("rm", pairwise, 0, [str(other)]) is None
    policy_changed = study.run_config(rows, 0, ["--config.train.steps=99", "--config.loss.name=hinge"])
    assert study.find_reusable("rm", policy_changed, 0, [str(other)]) is not None
    # An unfinished stage (no params/) is never reused.
    _fake_run(tmp_path / "third", 0, "m0", config, ())
    (tmp_path / "third" / "seed_0" / "m0" / "sft").mkdir()
    assert study.find_reusable("sft", config, 0, [str(tmp_path / "third")]) is None


def test_reuse_of_a_missing_directory_is_an_error(tmp_path, capsys):
    assert study.main(["--study=rso_table:smoke", f"--workdir={tmp_path}", f"--reuse={tmp_path}/nope"]) == 2
    assert "--reuse" in capsys.readouterr().err


def test_reuse_ignores_keys_that_are_unset_on_both_sides(tmp_path):
    """A run written before a config key existed (so its config.json lacks it) matches a run that leaves
    the new key unset ("")."""
    config = study.run_config(study.Method("a", "rso_tldr:smoke"), 0, [])
    older = json.loads(json.dumps(config))
    del older["data"]["path"]
    _fake_run(tmp_path, 0, "m0", older, ("sft",))
    assert study.find_reusable("sft", config, 0, [str(tmp_path)]) is not None
    given = study.run_config(study.Method("a", "rso_tldr:smoke"), 0, ["--config.data.path=x.jsonl"])
    assert study.find_reusable("sft", given, 0, [str(tmp_path)]) is None
