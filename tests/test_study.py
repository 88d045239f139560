"""The study runner: intervals, tables, shared stages, and a smoke study through the command line."""

import dataclasses
import json
import os
import sys
import types

import ml_collections
import numpy as np
import pytest

from launch import overrides, study, train


def test_t_interval_matches_the_formula():
    values = [0.5, 0.6, 0.7]
    lo, hi = study.t_interval(values)
    half = 4.303 * np.std(values, ddof=1) / np.sqrt(3)
    assert (lo, hi) == pytest.approx((0.6 - half, 0.6 + half))
    assert study.t_interval([0.4]) is None


def test_summarize_and_markdown():
    s = study.Study("s", (study.Method("a", "x"), study.Method("b", "x")), ("m", "n"))
    results = {
        "a": [{"m": 0.5, "n": None, "wall_time_s": 60.0}, {"m": 0.7, "n": None, "wall_time_s": 120.0}],
        "b": [{"m": 0.6, "m_ci95": [0.5, 0.7], "n": 1.0, "wall_time_s": 90.0}],
    }
    table = study.summarize(s, results)
    assert table["a"]["m"]["values"] == [0.5, 0.7] and table["a"]["m"]["mean"] == pytest.approx(0.6)
    assert table["a"]["n"]["mean"] is None and table["a"]["wall_time_s"] == 180.0
    assert table["b"]["m"]["ci95"] == [0.5, 0.7]  # one seed: the run's own bootstrap interval
    text = study.markdown(s, table, 2, 6.0, "cmd")
    assert "| a | 0.600 [" in text and "| b | 0.600 [0.500, 0.700] | 1.000 |" in text and "n/a" in text
    # The command's own time (6 s) and, beside it, what the runs cost: 60 + 120 + 90 s.
    assert "wall time 0.1 min (this command)." in text and "sum to 4.5 min." in text
    # A run without a recorded time is counted, not taken for 0 s.
    del results["b"][0]["wall_time_s"]
    text = study.markdown(s, study.summarize(s, results), 2, 6.0, "cmd")
    assert "sum to 3.0 min (2 of 3 runs record one)." in text


_STUDIES = (
    "direct_advantage_po_study",
    "epo_study",
    "gencls_study",
    "gflownet_study",
    "grpo_variants",
    "ift_study",
    "inpo_iters",
    "rdpo_noise",
    "rdpo_noise_long",
    "rft_study",
    "rpo_overopt",
    "rso_table",
    "rso_table_paper",
    "tool_sft_study",
)


def test_unknown_study_lists_the_studies(capsys):
    assert study.main(["--study=nope"]) == 2
    err = capsys.readouterr().err
    listed = err.rpartition("studies: ")[2].strip().split(", ")
    # Not _study, __init__.
    assert listed == list(_STUDIES)


def test_every_study_builds_valid_runs():
    checked = set()
    for name in _STUDIES:
        module = __import__(f"experiments.{name}", fromlist=["get_study"])
        for variant in (None, "smoke"):
            s = module.get_study(variant)
            assert s.methods and s.metrics
            study.check_overrides(s)  # every key exists and reads back as the value the study gives
            for method in s.methods:
                config = train.resolve_config(method.experiment, study.render_overrides(method.overrides))
                train.build_plan(config)
                # A `KEY@STEP` metric names a step the run evaluates at (else its column is empty).
                if s.curve and s.curve[1] == "step" and config.train.get("eval_every"):
                    for metric in (m for m in s.metrics if "@" in m):
                        step = int(metric.rpartition("@")[2])
                        assert step % config.train.eval_every == 0 and step <= config.train.steps, (
                            name, variant, method.name, metric)  # fmt: skip
                        checked.add(name)
    assert {"rdpo_noise_long", "rpo_overopt"} <= checked


def test_curve_metrics_read_each_point_as_key_at_x(tmp_path):
    """`KEY@X` metrics come from the run's curve file (inside the stage the run used), one per numeric
    key and point; a study without a curve, or a run without the file, gives none."""
    from experiments import rdpo_noise_long

    s = rdpo_noise_long.get_study("smoke")
    run = tmp_path / "run"
    (run / "policy" / "abc").mkdir(parents=True)
    (run / "stages.json").write_text(json.dumps({"stages": {"policy": {"dir": "policy/abc"}}}))
    points = [{"step": 2, "win_rate_vs_sft_gold": 0.5, "train_flipped_fit": 0.25, "proxy": None},
              {"step": 4, "win_rate_vs_sft_gold": 0.75, "train_flipped_fit": 0.5, "proxy": None}]  # fmt: skip
    (run / "policy" / "abc" / "eval_curve.jsonl").write_text("".join(json.dumps(p) + "\n" for p in points))
    got = study.curve_metrics(str(run), s)
    assert got == {"win_rate_vs_sft_gold@2": 0.5, "train_flipped_fit@2": 0.25,
                   "win_rate_vs_sft_gold@4": 0.75, "train_flipped_fit@4": 0.5}  # fmt: skip
    assert {"win_rate_vs_sft_gold@2", "train_flipped_fit@8"} <= set(s.metrics)
    assert study.curve_metrics(str(tmp_path / "missing"), s) == {}
    assert study.curve_metrics(str(run), dataclasses.replace(s, curve=None)) == {}
    # Tabulated and paired like any metric.
    results = {m.name: [{**got, "win_rate_vs_sft_gold@2": 0.5 + i / 10}] for i, m in enumerate(s.methods)}
    table = study.summarize(s, results)
    assert table["dpo_eps0.2"]["win_rate_vs_sft_gold@2"]["mean"] == pytest.approx(0.6)
    assert table["dpo_eps0.2"]["win_rate_vs_sft_gold@2"]["diff_vs_baseline"]["baseline"] == "dpo_eps0.0"


def test_method_overrides_are_an_immutable_dict():
    m = study.Method("m", "rso_tldr", {"train.learning_rate": 1e-4, "loss.name": "dpo"})
    assert m.overrides == (("loss.name", "dpo"), ("train.learning_rate", 1e-4))  # sorted by key
    assert dict(m.overrides) == {"loss.name": "dpo", "train.learning_rate": 1e-4}
    assert m == study.Method("m", "rso_tldr", {"loss.name": "dpo", "train.learning_rate": 1e-4})
    assert hash(m) == hash(study.Method("m", "rso_tldr", {"loss.name": "dpo", "train.learning_rate": 1e-4}))
    assert dataclasses.replace(m, name="n").overrides == m.overrides
    with pytest.raises(dataclasses.FrozenInstanceError):
        m.overrides = ()
    with pytest.raises(TypeError, match="not CLI|dict of dotted config keys"):
        study.Method("m", "rso_tldr", ("--config.loss.name=dpo",))
    with pytest.raises(ValueError, match="no '--config.' prefix"):
        study.Method("m", "rso_tldr", {"--config.loss.name": "dpo"})
    with pytest.raises(TypeError, match="is a list"):
        study.Method("m", "rso_tldr", {"model.dims": [1, 2]})


def test_render_overrides_round_trips_exactly():
    values = {"train.learning_rate": 1e-4, "loss.beta": 0.1, "sft.learning_rate": 2e-3, "progress": False,
              "data.vary_with_seed": True, "train.steps": 64, "train.reference": "precomputed"}  # fmt: skip
    argv = study.render_overrides(values)
    assert argv == [
        "--config.train.learning_rate=0.0001", "--config.loss.beta=0.1", "--config.sft.learning_rate=0.002",
        "--config.progress=False", "--config.data.vary_with_seed=True", "--config.train.steps=64",
        "--config.train.reference=precomputed",
    ]  # fmt: skip
    resolved = overrides.flat_keys(train.resolve_config("dpo_tldr:smoke", argv))
    for key, value in values.items():
        assert resolved[key] == value and type(resolved[key]) is type(value), key
    # Tuples into a tuple key, and values into an unset (None) key, through the same parser.
    config = ml_collections.ConfigDict({"a": (1,), "b": None, "c": None, "d": None}, type_safe=False)
    values = {"a": (3, "x", 0.25), "b": (1e-4,), "c": 0.1, "d": None}
    got = overrides.apply_overrides(config, study.render_overrides(values))
    assert (got.a, got.b, got.c, got.d) == ((3, "x", 0.25), (1e-4,), 0.1, None)


def test_run_overrides_order_seed_then_method_then_command_line():
    m = study.Method("m", "dpo_tldr:smoke", {"loss.beta": 0.2, "train.steps": 3})
    argv = study._run_overrides(m, 2, ["--config.loss.beta=0.3"])
    assert argv == [
        "--config.seed=2",
        "--config.loss.beta=0.2",
        "--config.train.steps=3",
        "--config.loss.beta=0.3",
    ]
    config = train.resolve_config(m.experiment, argv)
    assert (config.seed, config.loss.beta, config.train.steps) == (2, 0.3, 3)  # the command line wins


def test_an_unknown_or_mistyped_override_stops_the_study(tmp_path, monkeypatch, capsys):
    methods = (
        study.Method("ok", "rso_tldr:smoke", {}),
        study.Method("typo", "rso_tldr:smoke", {"rso.pair": "direct"}),
    )
    bad = study.Study("bad", methods, ("m",))
    unknown = r"method 'typo': unknown config key 'rso.pair'\. Did you mean: rso\.pairs"
    with pytest.raises(overrides.ConfigError, match=unknown):
        study.run_study(bad, seeds=1, workdir=str(tmp_path), overrides=[], command="cmd")
    assert not os.listdir(tmp_path)  # stopped before the first run
    mistyped = study.Study("t", (study.Method("x", "rso_tldr:smoke", {"rso.pairs": 1}),), ("m",))
    with pytest.raises(overrides.ConfigError, match=r"'rso.pairs' = 1 \(int\) reads back as '1' \(str\)"):
        study.check_overrides(mistyped)
    # Through the command line: the launcher's message, exit code 2, nothing written.
    module = types.ModuleType("experiments.bad_study")
    module.get_study = lambda arg: bad
    monkeypatch.setitem(sys.modules, "experiments.bad_study", module)
    workdir = tmp_path / "w"
    assert study.main(["--study=bad_study", "--seeds=1", f"--workdir={workdir}"]) == 2
    err = capsys.readouterr().err
    assert "error: study 'bad', method 'typo': unknown config key 'rso.pair'. Did you mean: rso.pairs" in err
    assert not workdir.exists()


def test_an_archive_splits_a_study_by_finished_runs(tmp_path, monkeypatch, capsys):
    """`--archive`: the first sitting runs every (seed, method) and copies each run's small files (with
    the curve file at its stage path) to the archive; a second sitting in a new workdir runs nothing
    and tabulates the same values; a missing archived run is the only one rerun; a changed override
    (another config) reruns every row, naming the key that differs. `train.main` is replaced by a fake
    that writes what the launcher writes (config.json as resolved, results.json, stages.json, a curve)."""
    calls = []

    def fake_main(argv):
        args = dict(a[2:].split("=", 1) for a in argv if a.startswith("--") and "=" in a)
        run_dir, experiment = args["workdir"], args["experiment"]
        config = train.resolve_config(experiment, [a for a in argv if a.startswith("--config.")])
        seed, steps = config.seed, config.train.steps
        calls.append((os.path.basename(run_dir), seed))
        os.makedirs(os.path.join(run_dir, "policy", "abc"), exist_ok=True)
        with open(os.path.join(run_dir, "config.json"), "w") as f:
            json.dump({"experiment": experiment, **config.to_dict()}, f, sort_keys=True)
        with open(os.path.join(run_dir, "results.json"), "w") as f:
            json.dump({"m": seed + 0.1 * steps + (0.5 if "b" in run_dir else 0.0), "wall_time_s": 5.0}, f)
        with open(os.path.join(run_dir, "stages.json"), "w") as f:
            json.dump({"stages": {"policy": {"dir": "policy/abc"}}}, f)
        with open(os.path.join(run_dir, "policy", "abc", "curve.jsonl"), "w") as f:
            f.write(json.dumps({"step": 2, "m": float(seed)}) + "\n")
        return 0

    monkeypatch.setattr(train, "main", fake_main)
    methods = (
        study.Method("a", "dpo_tldr:smoke", {}),
        study.Method("b", "dpo_tldr:smoke", {"loss.beta": 0.2}),
    )
    s = study.Study("arch", methods, ("m", "m@2"), curve=("policy/curve.jsonl", "step", ("m",)),
                    baseline={"b": "a"})  # fmt: skip
    archive = str(tmp_path / "archive")
    kw = dict(seeds=2, overrides=[], command="cmd", archive=archive)
    first = study.run_study(s, workdir=str(tmp_path / "w1"), **kw)
    assert sorted(calls) == [("a", 0), ("a", 1), ("b", 0), ("b", 1)]
    for seed in (0, 1):
        for m in ("a", "b"):
            kept = sorted(
                os.path.relpath(os.path.join(d, f), tmp_path / "archive" / f"seed_{seed}" / m)
                for d, _, fs in os.walk(tmp_path / "archive" / f"seed_{seed}" / m) for f in fs
            )  # fmt: skip
            assert kept == ["config.json", "policy/abc/curve.jsonl", "results.json", "stages.json"]
    calls.clear()
    second = study.run_study(s, workdir=str(tmp_path / "w2"), **kw)
    assert calls == [] and second == first
    # Nothing ran, yet the table still says what the four runs cost when they ran.
    assert json.loads((tmp_path / "w2" / "table.json").read_text())["runs_wall_time_s"] == 20.0
    assert "seed 1: b taken from" in capsys.readouterr().out
    # One archived run gone: only it runs.
    import shutil

    shutil.rmtree(tmp_path / "archive" / "seed_1" / "a")
    assert study.run_study(s, workdir=str(tmp_path / "w3"), **kw) == first and calls == [("a", 1)]
    # Another config: nothing matches, every run is rerun and says why.
    calls.clear()
    changed = study.run_study(
        s, workdir=str(tmp_path / "w4"), **{**kw, "overrides": ["--config.train.steps=9"]}
    )
    assert len(calls) == 4 and changed != first
    assert "config differs in ['train.steps']; running it" in capsys.readouterr().out


@pytest.mark.slow
def test_smoke_study_runs_and_shares_stages(tmp_path, capsys):
    assert study.main(["--study=rpo_overopt:smoke", "--seeds=1", f"--workdir={tmp_path}",
                       "--config.progress=false"]) == 0  # fmt: skip
    out = capsys.readouterr().out
    for name in ("table.md", "table.json", "plot.png"):
        assert os.path.exists(tmp_path / name), name
    table = json.loads((tmp_path / "table.json").read_text())
    assert set(table["methods"]) == {"dpo", "rpo", "rpo_eta0.1", "rpo_eta0.005", "sft_chosen", "dpo_lr1e-4",
                                     "dpo_lr3e-5"}  # fmt: skip
    assert table["methods"]["rpo"]["win_rate_vs_sft_gold"]["values"]
    # The per-step metrics come from the curve, paired like the final ones.
    for key in ("win_rate_vs_sft_gold@3", "gold_reward_policy@3", "proxy_reward_policy@6"):
        assert table["methods"]["rpo"][key]["values"], key
    assert table["methods"]["rpo"]["gold_reward_policy@6"]["diff_vs_baseline"]["baseline"] == "dpo"
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


def test_curve_plot_gives_each_method_one_colour_in_every_panel(tmp_path, monkeypatch):
    """A method without one of the curve keys (DPO at ε = 0 has no train_flipped_fit) must not shift the
    others' colours in that panel, and the legend names every method with a curve (it once used the
    axes' colour cycle, so the flipped-fit panel's colours did not match the legend)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    methods = tuple(study.Method(n, "x", {}) for n in ("a", "b", "c"))
    s = study.Study("colours", methods, ("y1",), curve=("curve.jsonl", "step", ("y1", "y2")))
    for name in ("a", "b", "c"):
        run = tmp_path / "seed_0" / name
        run.mkdir(parents=True)
        points = [{"step": k, "y1": k * 0.1, **({} if name == "a" else {"y2": k * 0.2})} for k in (1, 2)]
        (run / "curve.jsonl").write_text("".join(json.dumps(p) + "\n" for p in points))
    figs = []
    monkeypatch.setattr(plt, "close", lambda fig=None: figs.append(fig))
    study.plot(s, {}, str(tmp_path))
    ax1, ax2 = figs[0].axes
    colour = {line.get_label(): line.get_color() for line in ax1.get_lines()}
    assert set(colour) == {"a", "b", "c"} and len(set(map(str, colour.values()))) == 3
    assert {line.get_label(): line.get_color() for line in ax2.get_lines()} == {
        n: colour[n] for n in ("b", "c")
    }
    assert [t.get_text() for t in ax1.get_legend().get_texts()] == ["a", "b", "c"]
