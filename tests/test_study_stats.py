"""Study statistics: paired intervals against a baseline row, clipped marginal intervals, per-group
baselines, and the option that ties the synthetic data and evaluation prompts to the run's seed."""

import json
import math

import numpy as np
import pytest

from launch import study, train
from rlhf_jax.data import synthetic_tldr
from rlhf_jax.pipelines import tasks
from rlhf_jax.pipelines.config import DataConfig, stage_config

T2 = 4.303  # t_{0.975} with 2 degrees of freedom


def _study(metrics=("win_rate_vs_sft_gold",), names=("base", "new"), **kw):
    return study.Study("s", tuple(study.Method(n, "x") for n in names), metrics, **kw)


def _runs(metric, *values):
    """Per-seed results.json dicts (None for a missing value)."""
    return [{metric: v, "wall_time_s": 1.0} for v in values]


def test_paired_interval_resolves_where_marginal_intervals_overlap():
    """d = (0.03, 0.04, 0.05): mean 0.04, sd 0.01, half-width 4.303 · 0.01 / √3 = 0.02484; the marginal
    intervals (baseline sd 0.1) overlap widely, but the paired interval excludes 0."""
    m = "win_rate_vs_sft_gold"
    s = _study()
    table = study.summarize(s, {"base": _runs(m, 0.40, 0.60, 0.50), "new": _runs(m, 0.43, 0.64, 0.55)})
    base, new = table["base"][m], table["new"][m]
    assert new["ci95"][0] < base["ci95"][1] and base["ci95"][0] < new["ci95"][1]  # marginal overlap
    d = new["diff_vs_baseline"]
    half = T2 * 0.01 / math.sqrt(3)
    assert d["baseline"] == "base" and d["seeds"] == [0, 1, 2]
    assert d["values"] == pytest.approx([0.03, 0.04, 0.05])
    assert d["mean"] == pytest.approx(0.04)
    assert d["ci95"] == pytest.approx([0.04 - half, 0.04 + half])
    assert d["resolved"] is True and d["direction"] == "higher"
    assert "diff_vs_baseline" not in base  # the baseline row is not compared with itself
    # table.json keeps its public keys.
    assert {"values", "mean", "ci95"} <= set(new) and json.dumps(table)
    text = study.markdown(s, table, 3, 60.0, "cmd")
    assert f"| new | base | +0.040 [{0.04 - half:+.3f}, {0.04 + half:+.3f}] resolved, higher |" in text
    assert "(marginal)" in text


def test_paired_interval_not_resolved_and_lower():
    m = "win_rate_vs_sft_gold"
    # d = (-0.02, 0.04, -0.05): mean -0.01, sd 0.04583; the interval straddles 0.
    table = study.summarize(_study(), {"base": _runs(m, 0.5, 0.5, 0.5), "new": _runs(m, 0.48, 0.54, 0.45)})
    d = table["new"][m]["diff_vs_baseline"]
    sd = math.sqrt(((-0.01) ** 2 + 0.05**2 + 0.04**2) / 2)
    assert d["ci95"] == pytest.approx([-0.01 - T2 * sd / math.sqrt(3), -0.01 + T2 * sd / math.sqrt(3)])
    assert d["resolved"] is False and d["direction"] is None
    assert "not resolved" in study.markdown(_study(), table, 3, 1.0, "cmd")
    # All three seeds lower by 0.1 ± 0.01: resolved, lower.
    table = study.summarize(_study(), {"base": _runs(m, 0.5, 0.6, 0.7), "new": _runs(m, 0.39, 0.5, 0.61)})
    d = table["new"][m]["diff_vs_baseline"]
    assert d["resolved"] is True and d["direction"] == "lower" and d["ci95"][1] < 0


def test_disjoint_marginal_intervals_imply_a_resolved_paired_interval():
    """sd(a - b) <= sd(a) + sd(b), so over the same seeds the paired half-width is at most the sum of
    the marginal ones: disjoint marginal intervals always resolve (the converse fails, which is the
    point of pairing)."""
    rng = np.random.default_rng(0)
    m, s = "score", _study(("score",))  # an unknown metric: no clipping
    disjoint = overlap_resolved = 0
    for _ in range(400):
        shared = rng.normal(0, 1, 3)  # the seed's shared SFT policy, reward model and keys
        base, new = shared + rng.normal(0, 0.3, 3), shared + rng.normal(rng.uniform(-1, 1), 0.3, 3)
        table = study.summarize(s, {"base": _runs(m, *base), "new": _runs(m, *new)})
        (b_lo, b_hi), (n_lo, n_hi) = table["base"][m]["ci95"], table["new"][m]["ci95"]
        d = table["new"][m]["diff_vs_baseline"]
        if n_lo > b_hi or b_lo > n_hi:
            disjoint += 1
            assert d["resolved"] and d["direction"] == ("higher" if n_lo > b_hi else "lower")
        elif d["resolved"]:
            overlap_resolved += 1
    assert disjoint and overlap_resolved


def test_pairs_by_seed_not_by_position():
    """A baseline value missing in seed 1 leaves seeds 0 and 2 paired (not seed 2 with seed 1)."""
    m = "kl_to_sft"
    table = study.summarize(_study((m,)), {"base": _runs(m, 1.0, None, 3.0), "new": _runs(m, 1.5, 9.0, 3.7)})
    d = table["new"][m]["diff_vs_baseline"]
    assert d["seeds"] == [0, 2] and d["values"] == pytest.approx([0.5, 0.7])
    assert d["mean"] == pytest.approx(0.6)
    half = 12.706 * math.sqrt(0.02) / math.sqrt(2)  # sd of (0.5, 0.7) = √0.02, 1 dof
    assert d["ci95"] == pytest.approx([0.6 - half, 0.6 + half])
    assert "(n=2)" in study.markdown(_study((m,)), table, 3, 1.0, "cmd")
    # A {seed: results} mapping pairs the same way.
    by_seed = {"base": {0: {m: 1.0}, 2: {m: 3.0}}, "new": {2: {m: 3.7}, 0: {m: 1.5}, 1: {m: 9.0}}}
    assert study.summarize(_study((m,)), by_seed)["new"][m]["diff_vs_baseline"]["values"] == pytest.approx(
        [0.5, 0.7]
    )


def test_one_seed_has_no_paired_interval():
    """With one seed nothing is resolved, even when the runs' bootstrap intervals do not overlap."""
    m = "win_rate_vs_sft_gold"
    results = {
        "base": [{m: 0.30, m + "_ci95": [0.25, 0.35]}],
        "new": [{m: 0.80, m + "_ci95": [0.75, 0.85]}],
    }
    s = _study()
    table = study.summarize(s, results)
    assert table["new"][m]["ci95"] == [0.75, 0.85] and table["new"][m]["ci95_kind"] == "bootstrap"
    d = table["new"][m]["diff_vs_baseline"]
    assert d["mean"] == pytest.approx(0.5) and d["ci95"] is None
    assert d["resolved"] is None and d["direction"] is None
    text = study.markdown(s, table, 1, 1.0, "cmd")
    assert "n/a (1 seed: no paired interval)" in text and "resolved" not in text.split("| new | base |")[1]
    assert "bootstrap interval over evaluation prompts" in text


def test_intervals_are_clipped_to_the_metric_range_and_marked():
    win, kl, other = "win_rate_vs_sft_gold", "kl_to_sft", "score"
    s = _study((win, kl, other))
    seeds = {"base": [(0.90, 0.05, -1.0), (1.00, 0.50, 0.0), (0.98, 0.10, 0.1)],
             "new": [(0.10, 0.1, 0.0), (0.95, 0.1, 0.0), (0.20, 0.1, 0.0)]}  # fmt: skip
    results = {
        name: [dict(zip((win, kl, other), v, strict=True)) for v in rows] for name, rows in seeds.items()
    }
    table = study.summarize(s, results)
    raw = study.t_interval([0.90, 1.00, 0.98])
    assert raw[1] > 1.0
    assert table["base"][win]["ci95"] == pytest.approx([raw[0], 1.0]) and table["base"][win]["ci95_clipped"]
    assert table["base"][kl]["ci95"][0] == 0.0 and table["base"][kl]["ci95_clipped"]
    # An unknown metric is never clipped; an interval inside the range is not marked.
    assert table["base"][other]["ci95"] == pytest.approx(study.t_interval([-1.0, 0.0, 0.1]))
    assert not table["base"][other]["ci95_clipped"] and not table["new"][kl]["ci95_clipped"]
    # A difference of win rates lies in [-1, 1]: d = (-0.8, -0.05, -0.78) has a raw lower end below -1.
    d = table["new"][win]["diff_vs_baseline"]
    assert study.t_interval(d["values"])[0] < -1.0
    assert d["ci95"][0] == -1.0 and d["ci95_clipped"]
    text = study.markdown(s, table, 3, 1.0, "cmd")
    assert f"0.960 [{raw[0]:.3f}, 1.000]*" in text and "[-1.000, " in text
    assert "\\* interval clipped to the metric's range" in text


@pytest.mark.parametrize("metric", ["accuracy_gain", "accuracy_generate_vs_sft", "accuracy_ppl_vs_generate"])
def test_differences_of_accuracies_are_not_clipped_to_zero_one(metric):
    # A difference of two accuracies lies in [-1, 1]: a mean of 0.069 with a lower end of -0.009 (the
    # interval grpo_variants once printed as [0.000, 0.147]) keeps its negative end, unmarked.
    assert study.metric_range(metric) == (-1.0, 1.0) and study.metric_range("accuracy_ppl") == (0.0, 1.0)
    s = _study((metric,))
    values = [0.02, 0.05, 0.137]
    table = study.summarize(s, {"base": [{metric: v} for v in values], "new": [{metric: 0.0}] * 3})
    raw = study.t_interval(values)
    assert raw[0] < 0.0
    assert table["base"][metric]["ci95"] == pytest.approx(raw) and not table["base"][metric]["ci95_clipped"]


def test_per_group_baselines_of_rdpo_noise():
    from experiments import rdpo_noise

    s = rdpo_noise.get_study(None)
    for eps in rdpo_noise.RATES:
        assert s.baseline_of(f"cdpo_eps{eps}") == s.baseline_of(f"rdpo_eps{eps}") == f"dpo_eps{eps}"
    assert s.baseline_of("dpo_eps0.0") is None and s.baseline_of("dpo_eps0.4") == "dpo_eps0.0"
    # Paired within ε: rdpo at ε = 0.4 against DPO at ε = 0.4, not the first row.
    m = "win_rate_vs_sft_gold"
    results = {name: _runs(m, 0.6, 0.6, 0.6) for name in (x.name for x in s.methods)}
    results["dpo_eps0.4"] = _runs(m, 0.50, 0.55, 0.52)
    results["rdpo_eps0.4"] = _runs(m, 0.53, 0.59, 0.57)
    d = study.summarize(s, results)["rdpo_eps0.4"][m]["diff_vs_baseline"]
    assert d["baseline"] == "dpo_eps0.4" and d["values"] == pytest.approx([0.03, 0.04, 0.05])
    text = study.markdown(s, study.summarize(s, results), 3, 1.0, "cmd")
    assert "| rdpo_eps0.4 | dpo_eps0.4 | +0.040 [" in text


def test_every_study_names_its_baseline_and_a_bad_one_is_an_error():
    from experiments import inpo_iters, rpo_overopt, rso_table

    for variant in (None, "smoke"):
        rso = rso_table.get_study(variant)
        assert {m.name: rso.baseline_of(m.name) for m in rso.methods} == {
            "dpo_direct": None,
            "sigmoid_norm_sft_sample_rank": "dpo_direct",
            "rso_sigmoid_norm": "dpo_direct",
            "slic_direct_hinge": "dpo_direct",
            "rso_hinge_norm": "dpo_direct",
        }
        assert rpo_overopt.get_study(variant).baseline_of("rpo") == "dpo"
        inpo = inpo_iters.get_study(variant)
        assert inpo.baseline_of("inpo") == "iterative_dpo" and inpo.baseline_of("iterative_dpo") is None
    # The default baseline is the first method.
    assert _study().baseline_of("new") == "base" and _study().baseline_of("base") is None
    with pytest.raises(ValueError, match="'nope'"):
        _study(baseline="nope")
    with pytest.raises(ValueError, match="'nope'"):
        _study(baseline={"new": "nope"})
    with pytest.raises(ValueError, match="its own baseline"):
        _study(baseline={"new": "new"})


def test_study_notes_state_their_evaluation_size():
    """Each study's note states the eval.num_prompts its runs resolve to."""
    from experiments import inpo_iters, rdpo_noise, rpo_overopt, rso_table

    for module in (rso_table, rdpo_noise, rpo_overopt, inpo_iters):
        for variant in (None, "smoke"):
            s = module.get_study(variant)
            method = s.methods[0]
            config = train.resolve_config(method.experiment, study.render_overrides(method.overrides))
            assert f"{config.eval.num_prompts} held-out prompts × 2 samples" in s.note, (module, variant)


# ----------------------------------------------------------------------------------------------------
# Data tied to the seed.

SMALL = dict(num_sft=8, num_pref=40, num_eval=6)


def _texts(task):
    return (
        [(e.prompt, e.completion) for e in task.eval_prompts],
        [(p.prompt, p.chosen, p.rejected) for p in task.preference],
        [(e.prompt, e.completion) for e in task.sft],
    )


def test_vary_with_seed_off_keeps_todays_data():
    """Default: every seed gets the task of `synthetic_seed`, exactly the splits generated from it."""
    data = DataConfig(**SMALL)
    assert data.vary_with_seed is False
    task0, task1 = tasks.load_task(data, 0), tasks.load_task(data, 1)
    assert _texts(task0) == _texts(task1)
    splits = synthetic_tldr.generate_splits(seed=0, **SMALL)
    assert task0.eval_prompts == splits.eval and task0.sft == splits.sft
    assert task0.preference == splits.preference[2:]  # 5% of 40 held out: 2 pairs
    # The experiments' default is off too.
    assert stage_config(train.resolve_config("dpo_tldr:smoke", [])).data.vary_with_seed is False


def test_vary_with_seed_ties_synthetic_pairs_and_eval_prompts_to_the_seed():
    data = DataConfig(**SMALL, vary_with_seed=True)
    task0, task1 = tasks.load_task(data, 0), tasks.load_task(data, 1)
    eval0, pref0, sft0 = _texts(task0)
    eval1, pref1, sft1 = _texts(task1)
    # Evaluation takes the first eval.num_prompts of eval_prompts: those differ by seed.
    assert set(eval0[:4]).isdisjoint(eval1[:4])
    assert pref0 != pref1 and sft0 != sft1
    assert [e.prompt for e in task0.eval_preference] != [e.prompt for e in task1.eval_preference]
    # Deterministic per seed, and different from the seed-free task.
    assert _texts(tasks.load_task(data, 1)) == (eval1, pref1, sft1)
    assert eval0 != _texts(tasks.load_task(DataConfig(**SMALL), 0))[0]
    # The same (synthetic_seed, seed) pair keys the task, not their sum.
    swapped = tasks.load_task(DataConfig(**SMALL, vary_with_seed=True, synthetic_seed=1), 0)
    assert _texts(swapped)[0] != eval1
    # Reachable from the command line.
    config = train.resolve_config("dpo_tldr:smoke", ["--config.data.vary_with_seed=true"])
    assert stage_config(config).data.vary_with_seed is True


def test_vary_with_seed_orders_an_eval_file_by_seed(tmp_path):
    path = tmp_path / "eval.jsonl"
    rows = [
        {"prompt": f"post {i}\nTL;DR:", "chosen": f" good {i}", "rejected": f" bad {i}"} for i in range(12)
    ]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    train_path = tmp_path / "train.jsonl"
    train_path.write_text(path.read_text())

    def prompts(seed, vary):
        data = DataConfig(preference_path=str(train_path), eval_path=str(path), vary_with_seed=vary)
        return [e.prompt for e in tasks.load_task(data, seed).eval_prompts]

    in_file_order = [r["prompt"] for r in rows]
    assert prompts(0, False) == prompts(1, False) == in_file_order
    assert sorted(prompts(0, True)) == sorted(in_file_order)
    assert prompts(0, True)[:4] != prompts(1, True)[:4]
