"""The launcher through its real command line: overrides, errors, smoke runs, resume, meshes, processes."""

import glob
import json
import math
import os
import shutil
import signal
import socket
import subprocess
import sys
import time

import pytest
from workdirs import stage_dir

from launch import overrides, train
from rlhf_jax.train.metrics import read_metrics

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _cli(args, env=None, **kw):
    return subprocess.run(
        [sys.executable, "-m", "launch.train", *args],
        cwd=ROOT, env={**os.environ, **(env or {})}, capture_output=True, text=True, **kw,
    )  # fmt: skip


def _losses(workdir):
    return [(r["step"], r["loss"]) for r in read_metrics(workdir)]


def _find(workdir, name) -> list[str]:
    """Every file or directory called `name` under `workdir`, at any depth (stages may nest their outputs)."""
    return sorted(glob.glob(os.path.join(glob.escape(str(workdir)), "**", name), recursive=True))


def _one(workdir, name) -> str:
    """The one file or directory called `name` under `workdir`."""
    found = _find(workdir, name)
    assert len(found) == 1, f"expected one {name} under {workdir}, found {found}"
    return found[0]


def _step_of(line: str) -> int | None:
    """The step of a metrics.jsonl line, or None for a line cut short by a kill."""
    try:
        return json.loads(line)["step"]
    except json.JSONDecodeError:
        return None


class TestOverrides:
    def _config(self):
        from experiments import dpo_tldr

        return dpo_tldr.get_config()

    def test_values_are_typed(self):
        c = overrides.apply_overrides(
            self._config(),
            ["--config.train.steps=7", "--config.loss.beta=0.5", "--config.checkpoint.async_save=false",
             "--config.data.sft_path=a.jsonl,b.jsonl"],
        )  # fmt: skip
        assert c.train.steps == 7 and c.loss.beta == 0.5 and c.checkpoint.async_save is False
        assert c.data.sft_path == "a.jsonl,b.jsonl"

    def test_unknown_key_lists_close_and_all_keys(self):
        with pytest.raises(overrides.ConfigError, match=r"unknown config key 'train.stepz'.*train.steps"):
            overrides.apply_overrides(self._config(), ["--config.train.stepz=3"])

    def test_wrong_type(self):
        with pytest.raises(overrides.ConfigError, match="train.steps=abc: expected an int"):
            overrides.apply_overrides(self._config(), ["--config.train.steps=abc"])
        with pytest.raises(overrides.ConfigError, match="expected a bool"):
            overrides.apply_overrides(self._config(), ["--config.progress=maybe"])

    def test_switching_loss_resets_its_hyperparameters(self):
        c = overrides.apply_overrides(self._config(), ["--config.loss.gamma=0.2", "--config.loss.name=hinge"])
        assert dict(c.loss) == {"name": "hinge", "gamma": 0.2}
        with pytest.raises(overrides.ConfigError, match="no hyperparameter 'flip_rate'.*loss.beta"):
            overrides.apply_overrides(self._config(), ["--config.loss.flip_rate=0.2"])
        with pytest.raises(overrides.ConfigError, match="unknown loss 'dpoo'"):
            overrides.apply_overrides(self._config(), ["--config.loss.name=dpoo"])

    def test_every_experiment_validates(self):
        for name in train.available_experiments():
            module = __import__(f"experiments.{name}", fromlist=["get_config"])
            assert name in module.__doc__ and "python -m launch.train" in module.__doc__
            for variant in (None, "smoke"):
                config = module.get_config(variant)
                if config.data.task in ("hh", "math"):  # the experiments that need the user's files
                    config.data.preference_path = "data.jsonl"
                if config.get("cls", {}).get("source") == "files":  # gencls_glue: the user's TSV files
                    config.data.path = "train.tsv"
                train.build_plan(config)


def test_unknown_experiment_lists_the_known_ones(capsys):
    assert train.main(["--experiment=nope"]) == 2
    err = capsys.readouterr().err
    assert "unknown experiment 'nope'" in err and "dpo_tldr" in err and "sft_tldr" in err


def test_bad_values_stop_before_any_work(tmp_path, capsys):
    assert train.main(["--experiment=rdpo_tldr", f"--workdir={tmp_path}", "--config.loss.flip_rate=0.6"]) == 2
    assert "flip_rate must lie in [0.0, 0.5)" in capsys.readouterr().err
    assert train.main(["--experiment=dpo_tldr", f"--workdir={tmp_path}", "--config.mesh.data=3"]) == 2
    assert "needs 3 devices" in capsys.readouterr().err
    assert not os.listdir(tmp_path)


def test_hh_without_data_says_which_path_to_give(tmp_path, capsys):
    assert train.main(["--experiment=dpo_hh:smoke", f"--workdir={tmp_path}", "--config.progress=false"]) == 2
    assert "--config.data.path" in capsys.readouterr().err


def test_data_path_is_shorthand_for_the_preference_path():
    from rlhf_jax.pipelines.config import DataConfig

    assert DataConfig(task="hh", path="a.jsonl").preference_path == "a.jsonl"
    assert DataConfig(path="a.jsonl", preference_path="a.jsonl").preference_path == "a.jsonl"
    with pytest.raises(ValueError, match="data.path"):
        DataConfig(path="a.jsonl", preference_path="b.jsonl")


def test_sft_smoke_writes_the_documented_workdir(tmp_path):
    wd = str(tmp_path / "run")
    assert train.main(["--experiment=sft_tldr:smoke", f"--workdir={wd}", "--config.progress=false"]) == 0
    for name in ("config.json", "results.json", "stages.json"):
        assert os.path.exists(os.path.join(wd, name)), name
    sft_dir = stage_dir(wd, "sft")
    assert os.path.dirname(sft_dir) == os.path.join(wd, "sft")  # WORKDIR/sft/{fingerprint}
    for name in (
        "metrics.jsonl",
        "results.json",
        "curves.png",
        "tokenizer.model",
        "params",
        "fingerprint.json",
    ):
        assert os.path.exists(os.path.join(sft_dir, name)), name
    assert os.listdir(os.path.join(sft_dir, "tensorboard"))
    config = json.load(open(os.path.join(wd, "config.json")))
    assert config["experiment"] == "sft_tldr:smoke" and config["train"]["steps"] == 6
    records = read_metrics(sft_dir)
    assert [r["step"] for r in records] == [2, 3, 4, 6] and all("tokens_per_s" in r for r in records)
    results = json.load(open(os.path.join(wd, "results.json")))
    assert results["stages"]["sft"]["reused"] is False
    # It learns: the held-out NLL falls below the untrained model's (the same run with zero steps: the
    # pipeline's own evaluation of the initial parameters, 7.68 nats against 7.18 after the six steps;
    # with a learning rate of 1e-12 the two are equal).
    untrained = str(tmp_path / "untrained")
    assert train.main(["--experiment=sft_tldr:smoke", f"--workdir={untrained}", "--config.progress=false",
                       "--config.train.steps=0"]) == 0  # fmt: skip
    initial = json.load(open(os.path.join(untrained, "results.json")))["eval_nll_per_token"]
    assert results["eval_nll_per_token"] < initial - 0.25, (results["eval_nll_per_token"], initial)
    # A finished stage with the same fingerprint is reused, not run again.
    mtime = os.path.getmtime(os.path.join(sft_dir, "metrics.jsonl"))
    assert train.main(["--experiment=sft_tldr:smoke", f"--workdir={wd}", "--config.progress=false"]) == 0
    assert os.path.getmtime(os.path.join(sft_dir, "metrics.jsonl")) == mtime
    assert json.load(open(os.path.join(wd, "results.json")))["stages"]["sft"]["reused"] is True


# `dpo_tldr:smoke` with a DPO budget that learns at smoke size (its 6 steps at 1e-4 do not: the reward
# accuracy stays near chance); 24 steps at 1e-3 take seconds, most of a smoke run is compilation.
DPO_SMOKE = ["--experiment=dpo_tldr:smoke", "--config.progress=false", "--config.train.steps=24",
             "--config.train.learning_rate=1e-3", "--config.train.log_every=1"]  # fmt: skip


@pytest.fixture(scope="module")
def dpo_smoke(tmp_path_factory):
    """One `dpo_tldr:smoke` run on the 8-device (8, 1, 1) mesh, shared by the tests that compare with it."""
    workdir = tmp_path_factory.mktemp("dpo_smoke")
    start = time.time()
    out = _cli([*DPO_SMOKE, f"--workdir={workdir}", "--config.mesh.data=8"])
    return workdir, out, time.time() - start


@pytest.mark.slow
@pytest.mark.xdist_group("dpo_smoke")
def test_dpo_smoke_runs_from_the_command_line(dpo_smoke):
    workdir, out, _ = dpo_smoke
    assert out.returncode == 0, out.stderr[-3000:]
    assert "mesh (data=8, fsdp=1, tensor=1)" in out.stdout and "parameters" in out.stdout
    rec = read_metrics(stage_dir(workdir, "policy"))
    for key in (
        "loss",
        "reward_accuracy",
        "reward_margin",
        "chosen_reward",
        "rejected_reward",
        "kl_to_reference",
    ):
        assert key in rec[-1], key
    results = json.load(open(workdir / "results.json"))
    assert 0.0 <= results["eval_reward_accuracy"] <= 1.0
    for key in ("win_rate_vs_sft_gold", "win_rate_vs_sft_gold_ci95", "win_rate_vs_sft_proxy",
                "win_rate_vs_reference_gold", "mean_response_length", "kl_to_sft"):  # fmt: skip
        assert key in results, key
    assert results["win_rate_vs_sft_proxy"] is None  # no reward model in a DPO run
    assert results["wall_time_s"] > 0  # what `launch.study` sums as the runs' own time
    # DPO learns: the training batches' reward accuracy rises from chance (0.42 over the first 8 steps,
    # 0.84 over the last 8), and on held-out pairs the loss falls below its starting value ln 2 (0.53).
    accuracy = [r["reward_accuracy"] for r in rec]
    assert len(accuracy) == 24
    early, late = sum(accuracy[:8]) / 8, sum(accuracy[-8:]) / 8
    assert late > max(0.7, early + 0.2), (early, late)
    assert results["eval_loss"] < math.log(2) - 0.05 and results["eval_reward_accuracy"] > 0.5, results


@pytest.mark.slow
def test_kill_and_resume_repeats_the_uninterrupted_losses(tmp_path):
    args = ["--experiment=sft_tldr:smoke", "--config.train.steps=30", "--config.checkpoint.every_steps=4",
            "--config.train.log_every=1", "--config.progress=false"]  # fmt: skip
    full = str(tmp_path / "full")
    assert _cli([*args, f"--workdir={full}"]).returncode == 0
    killed = str(tmp_path / "killed")
    proc = subprocess.Popen(
        [sys.executable, "-m", "launch.train", *args, f"--workdir={killed}"],
        cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )  # fmt: skip
    deadline = time.time() + 240
    while time.time() < deadline and proc.poll() is None:
        found = _find(killed, "metrics.jsonl")
        steps = [s for s in map(_step_of, open(found[0]).readlines()) if s is not None] if found else []
        if steps and steps[-1] >= 14:
            break
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert not _find(killed, "params"), "killed too late: the run had finished"
    metrics_path = _one(killed, "metrics.jsonl")
    before = open(metrics_path).readlines()  # the killed process's records (the last may be cut short)
    # The newest checkpoint Orbax finished (renamed from its temporary directory) is the one to resume.
    saved = [
        int(os.path.basename(p)) for p in _find(killed, "checkpoints/*") if os.path.basename(p).isdigit()
    ]
    restored = max(saved)
    last = max(s for s in map(_step_of, before) if s is not None)
    assert 4 <= restored < last, (restored, last)

    resumed = _cli([*args, f"--workdir={killed}"])
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    # Bitwise on CPU: the restored params, optimizer state, RNG and data position are exact.
    assert _losses(os.path.dirname(metrics_path)) == _losses(os.path.dirname(_one(full, "metrics.jsonl")))
    # And it did restore (training is deterministic, so a restart from step 0 would repeat the same
    # losses): the resumed process kept the killed one's records up to the checkpoint's step, byte for
    # byte, wrote only the steps after it, and moved the killed process's later records aside.
    after = open(metrics_path).readlines()
    superseded = open(os.path.join(os.path.dirname(metrics_path), "metrics.superseded.jsonl")).readlines()
    assert [s for s in map(_step_of, superseded) if s is not None] == list(range(restored + 1, last + 1))
    assert [_step_of(line) for line in after] == list(range(1, 31))
    assert after[:restored] == [line for line in before if (_step_of(line) or 0) <= restored]


@pytest.mark.slow
@pytest.mark.xdist_group("dpo_smoke")
def test_sharded_runs_write_the_same_losses(tmp_path, dpo_smoke):
    mixed = tmp_path / "mixed"
    out = _cli([*DPO_SMOKE, f"--workdir={mixed}", "--config.mesh.data=2", "--config.mesh.fsdp=2",
                "--config.mesh.tensor=2"])  # fmt: skip
    assert out.returncode == 0, out.stderr[-3000:]
    for sub in ("sft", "policy"):
        a = _losses(stage_dir(dpo_smoke[0], sub))
        b = _losses(stage_dir(mixed, sub))
        assert [s for s, _ in a] == [s for s, _ in b]
        for (_, x), (_, y) in zip(a, b, strict=True):
            assert y == pytest.approx(x, rel=2e-5, abs=1e-6)


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.slow
@pytest.mark.xdist_group("dpo_smoke")
def test_two_process_run_matches_one_process(tmp_path, dpo_smoke):
    args = [*DPO_SMOKE, "--config.mesh.data=8"]
    # Only the one-process run's SFT stage is offered for reuse, so the policy stage runs in two processes.
    sft = stage_dir(dpo_smoke[0], "sft")
    shutil.copytree(sft, tmp_path / "sft_only" / os.path.relpath(sft, dpo_smoke[0]))
    port = _free_port()
    env = {**os.environ, "XLA_FLAGS": "--xla_force_host_platform_device_count=4", "JAX_PLATFORMS": "cpu"}
    procs = [
        subprocess.Popen(
            [
                sys.executable,
                "-m",
                "launch.train",
                *args,
                f"--workdir={tmp_path / 'two'}",
                f"--reuse={tmp_path / 'sft_only'}",  # copied by process 0, then read by both
                f"--coordinator=127.0.0.1:{port}",
                "--num_processes=2",
                f"--process_id={i}",
            ],
            cwd=ROOT,
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )  # fmt: skip
        for i in range(2)
    ]
    try:
        outs = [p.communicate(timeout=900) for p in procs]
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
    for p, (_, err) in zip(procs, outs, strict=True):
        assert p.returncode == 0, err[-3000:]
    assert "2 process(es)" in outs[0][0]
    # The policy stage ran in two processes from the copied SFT stage (the one-process run's SFT: two
    # processes training SFT are the same loop as training the policy, which this compares).
    assert "reused sft/" in outs[0][0] and "computing policy/" in outs[0][0], outs[0][0][-3000:]
    a, b = _losses(stage_dir(dpo_smoke[0], "policy")), _losses(stage_dir(tmp_path / "two", "policy"))
    assert [s for s, _ in a] == [s for s, _ in b] and a
    for (_, x), (_, y) in zip(a, b, strict=True):
        assert y == pytest.approx(x, rel=2e-5, abs=1e-6)


def _write_hh(path, n=60):
    import gzip

    rows = []
    for i in range(n):
        prompt = f"\n\nHuman: How do I cook dish number {i}?\n\nAssistant: Which dish?\n\nHuman: Soup {i}."
        rows.append(
            {
                "chosen": prompt
                + f"\n\nAssistant: Boil water, add vegetables {i}, simmer for {i % 7 + 5} minutes.",
                "rejected": prompt + "\n\nAssistant: I don't know.",
            }
        )
    with gzip.open(path, "wt") as f:
        for r in rows:
            f.write(json.dumps(r) + "\n")


# `rm_tldr:smoke` with a budget whose pointwise reward model learns (the smoke run's 6 steps on 9 held-out
# pairs stay at chance): 60 steps at 3e-3, 100 held-out pairs (0.75 accuracy; 0.45 at lr 1e-12).
RM_LEARNS = ["--config.train.steps=60", "--config.train.learning_rate=3e-3", "--config.train.batch_size=16",
             "--config.data.num_pref=400", "--config.data.eval_fraction=0.25",
             "--config.train.log_every=10"]  # fmt: skip


@pytest.mark.slow
@pytest.mark.parametrize(
    "experiment,extra",
    [("rm_tldr:smoke", ["--config.rm.kind=pairwise"]),
     ("rm_tldr:smoke", RM_LEARNS),
     ("dpo_hh:smoke", ["--config.train.reference=precomputed"]), ("rso_hh:smoke", []), ("inpo_hh:smoke", []),
     ("dapo_arith:smoke", []),
     ("rso_tldr:smoke", ["--config.rm.kind=pairwise", "--config.rso.ranking=tournament",
                         "--config.rso.pairs=sft_sample_rank"])],
)  # fmt: skip
def test_more_experiments_smoke(tmp_path, experiment, extra):
    if experiment.endswith("_hh:smoke"):
        _write_hh(tmp_path / "hh.jsonl.gz")
        extra = [*extra, f"--config.data.path={tmp_path / 'hh.jsonl.gz'}"]
    out = _cli(
        [f"--experiment={experiment}", f"--workdir={tmp_path / 'run'}", "--config.progress=false", *extra]
    )
    assert out.returncode == 0, out.stderr[-3000:]
    results = json.load(open(tmp_path / "run" / "results.json"))
    assert results and all(v is None or v == v for v in results.values() if isinstance(v, float))
    if extra == RM_LEARNS:  # held-out accuracy above chance, and a loss below the untrained ln 2
        assert results["eval_pairs"] == 100 and results["eval_accuracy"] >= 0.65, results
        assert results["eval_loss"] < math.log(2) - 0.03, results
    if "reference=precomputed" in " ".join(extra):
        assert os.path.exists(os.path.join(stage_dir(tmp_path / "run", "policy"), "reference_logps.npz"))
    if experiment.endswith("_hh:smoke") and experiment != "dpo_hh:smoke":
        assert results["win_rate_vs_sft_gold"] is None and results["win_rate_vs_sft_proxy"] is not None
    if experiment.startswith("rso_tldr"):
        assert "win rate vs SFT (gold reward)" in out.stdout  # the printed table
        for key in ("win_rate_vs_sft_gold", "win_rate_vs_sft_gold_ci95", "win_rate_vs_sft_proxy",
                    "win_rate_vs_sft_proxy_ci95", "win_rate_vs_reference_gold", "mean_response_length",
                    "kl_to_sft", "wall_time_s"):  # fmt: skip
            assert results[key] is not None, key
        # The policy stage learns its pairs: from ln 2 the loss falls (0.693 to 0.662 in the six steps) and
        # the reward accuracy rises (0.5 to 1.0).
        records = read_metrics(stage_dir(tmp_path / "run", "policy"))
        first, last = records[0], records[-1]
        assert last["loss"] < first["loss"] - 0.02, (first, last)
        assert last["reward_accuracy"] > first["reward_accuracy"], (first, last)
        assert last["reward_margin"] > 0.03, (first, last)
        stats = json.load(open(os.path.join(stage_dir(tmp_path / "run", "pairs"), "stats.json")))
        assert stats["pairs"] > 0
        assert os.path.exists(os.path.join(stage_dir(tmp_path / "run", "samples"), "candidates.npz"))
        # A rerun reuses every stage and reports the same results.
        again = _cli(
            [f"--experiment={experiment}", f"--workdir={tmp_path / 'run'}", "--config.progress=false", *extra]
        )
        assert again.returncode == 0, again.stderr[-3000:]
        rerun = json.load(open(tmp_path / "run" / "results.json"))
        assert all(s["reused"] for s in rerun["stages"].values())
        timing = ("wall_time_s", "stage_seconds", "stages")
        assert {k: v for k, v in rerun.items() if k not in timing} == {
            k: v for k, v in results.items() if k not in timing
        }
