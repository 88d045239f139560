"""The `rft` pipeline: its pure helpers (records from a selection, steps, round bookkeeping, the samples
file), its config and fingerprints (the SFT stage shared with `grpo_arith`), and `rft_arith:smoke` end to
end through the command line, rerun on finished stages."""

import dataclasses
import glob
import json
import os
import subprocess
import sys

import pytest

from launch import train
from rlhf_jax import rft as rft_lib
from rlhf_jax.data import records as rec
from rlhf_jax.pipelines import fingerprints, sft
from rlhf_jax.pipelines import rft as rft_pipe

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _problems(n):
    return [rec.MathExample(f"Question: q{i}?\nAnswer:", f" {i}\n#### {i}", str(i)) for i in range(n)]


def test_sft_records_are_the_kept_pairs_with_their_prompts():
    problems = _problems(3)
    sel = rft_lib.select([["a", "a ", "b"], ["c"], ["d", "e"]], [[True, True, True], [False], [False, True]])
    records = rft_pipe.sft_records(problems, sel)
    assert [(r.prompt, r.completion, r.meta["problem"]) for r in records] == [
        (problems[0].prompt, "a", 0),
        (problems[0].prompt, "b", 0),
        (problems[2].prompt, "e", 2),
    ]


def test_round_steps_and_init():
    assert rft_pipe.round_steps(0, epochs=3.0, batch_size=8) == 0  # nothing kept: no training
    assert rft_pipe.round_steps(12, epochs=1.0, batch_size=8) == 2  # ceil(12 / 8)
    assert rft_pipe.round_steps(16, epochs=1.0, batch_size=8) == 2
    assert rft_pipe.round_steps(5, epochs=3.0, batch_size=32) == 1  # ceil(15 / 32)
    assert rft_pipe.round_steps(100, epochs=2.5, batch_size=32) == 8  # ceil(250 / 32)
    assert rft_pipe.round_init("previous", sft_dir="s", previous_dir="p") == "p"
    assert rft_pipe.round_init("sft", sft_dir="s", previous_dir="p") == "s"
    with pytest.raises(ValueError, match="rft.init must be one of"):
        rft_pipe.round_init("base", sft_dir="s", previous_dir="p")


def test_check_counts_accepts_a_selection_and_rejects_inconsistent_counts():
    sel = rft_lib.select([["a", "a", "b"], ["c", "d", "e"]], [[True, True, False], [False, False, False]])
    rft_pipe.check_counts(sel.counts(), num_samples=3)
    good = sel.counts()
    for bad in ({"kept": 2}, {"samples": 7}, {"problems_solved": 2, "kept": 1, "duplicates": 1}):
        with pytest.raises(ValueError, match="inconsistent RFT selection counts"):
            rft_pipe.check_counts({**good, **bad}, num_samples=3)


def test_read_samples_round_trips_and_names_bad_lines(tmp_path):
    path = tmp_path / "samples.jsonl"
    rows = [
        {"problem": 0, "solutions": ["x", "y"], "correct": [True, False]},
        {"solutions": [], "correct": []},
    ]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    assert rft_pipe.read_samples(str(path)) == ([["x", "y"], []], [[True, False], []])
    for line, want in (
        ("{oops", r"samples.jsonl:2: not JSON"),
        ('{"solutions": ["x"]}', r"samples.jsonl:2: field 'correct' missing"),
        ('{"solutions": ["x"], "correct": []}', r"samples.jsonl:2: 1 solutions but 0 verdicts"),
    ):
        path.write_text(json.dumps(rows[0]) + "\n" + line + "\n")
        with pytest.raises(ValueError, match=want):
            rft_pipe.read_samples(str(path))


def test_config_validation_names_the_field():
    with pytest.raises(ValueError, match=r"rft.init must be one of \('previous', 'sft'\), got 'base'"):
        rft_pipe.RFTConfig(init="base")
    with pytest.raises(ValueError, match="rft.num_samples must be >= 1"):
        rft_pipe.RFTConfig(num_samples=0)
    with pytest.raises(ValueError, match="rft.epochs must be > 0"):
        rft_pipe.RFTConfig(epochs=0.0)
    with pytest.raises(ValueError, match="nope"):
        train.build_plan(train.resolve_config("rft_arith:smoke", ["--config.rft.reward=nope"]))
    with pytest.raises(ValueError, match="config.rft"):
        train.build_plan(train.resolve_config("rft_arith:smoke", ["--config.rft.rounds=0"]))


@pytest.mark.parametrize("variant", ["", ":smoke"])
def test_rft_arith_shares_the_sft_stage_of_grpo_arith(variant):
    """The SFT stage's fingerprint equals grpo_arith's (so a workdir or --reuse shares it), and round k's
    samples do not depend on the SFT settings of the rounds (epochs, init, optimizer) nor on K."""
    rft_plan = train.build_plan(train.resolve_config("rft_arith" + variant, []))
    grpo_plan = train.build_plan(train.resolve_config("grpo_arith" + variant, []))
    assert fingerprints.fingerprint(sft.spec(rft_plan.sft)) == fingerprints.fingerprint(
        sft.spec(grpo_plan.sft)
    )
    spec = lambda r: rft_pipe.samples_spec(rft_plan.main, r, 1, policy_dir="")  # noqa: E731
    base = rft_plan.rft
    same = dataclasses.replace(base, epochs=7.0, init="sft", rounds=5)
    assert fingerprints.fingerprint(spec(same)) == fingerprints.fingerprint(spec(base))
    other = dataclasses.replace(base, num_samples=base.num_samples + 1)
    assert fingerprints.fingerprint(spec(other)) != fingerprints.fingerprint(spec(base))


def test_sft_spec_with_examples_keys_on_their_contents():
    cfg = train.build_plan(train.resolve_config("rft_arith:smoke", [])).main
    a = [rec.SFTExample("p", " x"), rec.SFTExample("q", " y")]
    fp = lambda examples: fingerprints.fingerprint(sft.spec(cfg, examples))  # noqa: E731
    assert sft.spec(cfg) == fingerprints.trainer_spec(cfg, kind="sft", loss=False)  # unchanged without
    assert fp(a) == fp([rec.SFTExample("p", " x", meta={"problem": 3}), rec.SFTExample("q", " y")])  # meta
    assert len({fp(None), fp(a), fp(a[::-1]), fp([a[0]]), fp([a[0], rec.SFTExample("q", " y ")])}) == 5
    with pytest.raises(ValueError, match="no SFT examples"):
        sft.run(cfg, "/nonexistent", examples=[])


# ----------------------------------------------------------------------------------------------------
# End to end.


def _launch(workdir, *flags):
    env = {**os.environ, "PYTHONPATH": ROOT + os.pathsep + os.environ.get("PYTHONPATH", "")}
    cmd = [sys.executable, "-m", "launch.train", "--experiment=rft_arith:smoke", "--config.progress=false",
           f"--workdir={workdir}", *flags]  # fmt: skip
    out = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT, env=env)
    assert out.returncode == 0, out.stderr[-3000:]
    with open(os.path.join(workdir, "results.json"), encoding="utf-8") as f:
        return out.stdout, json.load(f)


def _check_rounds(results, N, P):
    for r in results["rounds"]:
        rft_pipe.check_counts(r, num_samples=N)
        assert r["problems"] == P and r["samples"] == N * P and r["kept"] <= r["verified"] <= N * P
        assert 0 <= r["accuracy"] <= 1 and -1 <= r["accuracy_vs_sft"] <= 1
        lo, hi = r["accuracy_vs_sft_ci95"]
        assert lo <= r["accuracy_vs_sft"] <= hi
    assert results["samples_generated"] == sum(r["samples"] for r in results["rounds"])


@pytest.mark.slow
def test_rft_arith_smoke_rounds_train_on_the_kept_samples_and_rerun_reuses_them(tmp_path):
    """`rft_arith:smoke` (its untrained SFT policy verifies nothing: round 1 keeps nothing and trains
    nothing); then round 1's saved samples are replaced by hand-made ones (what a rerun reads instead of
    sampling again) and the run is extended to 2 rounds: round 1 trains on exactly the distinct verified
    ones; a third run recomputes nothing (~70 s)."""
    N, P = 4, 8
    out, first = _launch(tmp_path, "--config.rft.rounds=1")
    assert "RFT on arith: rft x1 (init=previous)" in out and "round  solved" in out
    _check_rounds(first, N, P)
    (r1,) = first["rounds"]
    if r1["kept"] == 0:  # nothing to train on: the round's policy is the SFT policy, evaluated as such
        assert not r1["trained"] and r1["policy"] == first["stages"]["sft"]["dir"]
        assert r1["accuracy_vs_sft"] == 0.0 and r1["accuracy"] == first["accuracy_sft"]
    metrics = [json.loads(line) for line in open(tmp_path / "metrics.jsonl")]
    assert [m["step"] for m in metrics] == [1] and metrics[0]["kept"] == r1["kept"]

    # Round 1's samples as a verifier would have judged these texts: per problem, a correct solution, a
    # whitespace copy of it (a duplicate), a wrong one, and on even problems a second correct one.
    (samples_path,) = glob.glob(str(tmp_path / "round_1" / "samples" / "*" / "samples.jsonl"))
    rows = [json.loads(line) for line in open(samples_path)]
    for row in rows:
        a, i = row["answer"], row["problem"]
        row["solutions"] = [f" He has {a}.\n#### {a}", f" He  has {a}. \n#### {a}", " No.\n#### 0",
                            f" So {a}.\n#### {a}"]  # fmt: skip
        row["correct"] = [True, True, False, i % 2 == 0]
    with open(samples_path, "w") as f:
        f.writelines(json.dumps(r) + "\n" for r in rows)

    out, second = _launch(tmp_path, "--config.rft.rounds=2")
    assert "reused sft/" in out and "reused round_1/samples/" in out and "computing round_1/policy/" in out
    _check_rounds(second, N, P)
    r1, r2 = second["rounds"]
    want = {"problems": 8, "problems_solved": 8, "samples": 32, "verified": 20, "kept": 12, "duplicates": 8}
    assert {k: r1[k] for k in rft_pipe.COUNT_KEYS} == want
    assert r1["trained"] and r1["sft_steps"] == 2 and r1["init"] == "sft"  # ceil(1 epoch · 12 / 8)
    assert r2["init"] == "round_1" and r1["policy"].startswith("round_1/policy/")
    stage = tmp_path / r1["policy"]
    kept = [json.loads(line) for line in open(stage / "sft_records.jsonl")]
    a0, a1 = rows[0]["answer"], rows[1]["answer"]
    first_three = [(k["problem"], k["completion"].split(".")[0]) for k in kept[:3]]
    assert first_three == [(0, f" He has {a0}"), (0, f" So {a0}"), (1, f" He has {a1}")]
    assert len(kept) == 12 and json.load(open(stage / "results.json"))["steps"] == 2
    assert [json.loads(line)["step"] for line in open(stage / "metrics.jsonl")][-1] == 2
    # Round 2 samples the policy round 1 trained, so its samples stage is new.
    assert second["stages"]["round_2/samples"]["reused"] is False
    assert json.load(open(tmp_path / "stages.json"))["final"] == (
        "round_2/policy" if r2["trained"] else "round_1/policy"
    )

    out, third = _launch(tmp_path, "--config.rft.rounds=2")
    assert "computing" not in out and out.count("[stages] reused") == len(third["stages"])
    strip = lambda rs: [{k: v for k, v in r.items() if k != "round_s"} for r in rs]  # noqa: E731
    assert strip(third["rounds"]) == strip(second["rounds"])


@pytest.mark.parametrize("variant", [None, "smoke"])
def test_rft_study_rows_pair_with_the_sft_row(variant):
    """rft_study's RFT rows train from the SFT stage of its 0% row (same fingerprint), and report
    `accuracy_vs_sft`, paired with that row."""
    from experiments import rft_study
    from launch import study

    s = rft_study.get_study(variant)
    methods = {m.name: m for m in s.methods}
    assert list(methods)[:4] == ["sft_wrong_0", "sft_wrong_10", "sft_wrong_20", "sft_wrong_40"]  # kept

    def sft_fingerprint(name):
        m = methods[name]
        config = train.resolve_config(m.experiment, study.render_overrides(m.overrides))
        return fingerprints.fingerprint(sft.spec(train.build_plan(config).sft))

    assert sft_fingerprint("rft_1") == sft_fingerprint("rft_2") == sft_fingerprint("sft_wrong_0")
    assert sft_fingerprint("sft_wrong_10") != sft_fingerprint("sft_wrong_0")
    assert s.baseline_of("rft_1") == s.baseline_of("rft_2") == "sft_wrong_0"
    assert s.metrics == ("accuracy_sft", "accuracy_vs_sft")
