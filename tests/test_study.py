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
def test_smoke_study_runs_and_shares_stages(tmp_path, capsys):
    assert study.main(["--study=rpo_overopt:smoke", "--seeds=1", f"--workdir={tmp_path}",
                       "--config.progress=false"]) == 0  # fmt: skip
    out = capsys.readouterr().out
    for name in ("table.md", "table.json", "plot.png"):
        assert os.path.exists(tmp_path / name), name
    table = json.loads((tmp_path / "table.json").read_text())
    assert set(table["methods"]) == {"dpo", "rpo"}
    assert table["methods"]["rpo"]["win_rate_vs_sft_gold"]["values"]
    # The SFT and reward-model stages were computed once, by the first method, and copied to the second
    # (the fingerprints match): the second run says so and its stages are the first run's.
    seed = tmp_path / "seed_0"
    dpo, rpo = (json.loads((seed / m / "results.json").read_text())["stages"] for m in ("dpo", "rpo"))
    for name in ("sft", "rm"):
        assert not dpo[name]["reused"] and rpo[name]["reused"], name
        assert dpo[name]["fingerprint"] == rpo[name]["fingerprint"], name
        assert (
            f"reused {name}/ (fingerprint {dpo[name]['fingerprint'][:12]}, copied from {seed / 'dpo'}" in out
        )
    assert out.count("computing sft/") == 1 and out.count("computing rm/") == 1
    assert dpo["policy"]["fingerprint"] != rpo["policy"]["fingerprint"]
    curve_path = study.run_file(str(seed / "rpo"), "policy/eval_curve.jsonl")
    curve = [json.loads(x) for x in open(curve_path)]
    assert [c["step"] for c in curve] == [3, 6] and all(c["gold_reward_policy"] is not None for c in curve)
    # A rerun of the finished study reuses every stage and writes the same table.
    assert study.main(["--study=rpo_overopt:smoke", "--seeds=1", f"--workdir={tmp_path}",
                       "--config.progress=false"]) == 0  # fmt: skip
    assert "computing" not in capsys.readouterr().out
    again = json.loads((tmp_path / "table.json").read_text())
    assert again["methods"]["rpo"]["win_rate_vs_sft_gold"] == table["methods"]["rpo"]["win_rate_vs_sft_gold"]
