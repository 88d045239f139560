"""A multi-stage pipeline killed by SIGKILL in the middle of a stage, then rerun in the same workdir.

The rerun must not redo the finished stages (SFT, reward model, sampling), must resume the interrupted
policy stage from its newest checkpoint rather than from step 0, and must end with the results of an
uninterrupted run (bitwise on CPU).
"""

import glob
import json
import os
import signal
import subprocess
import sys
import time

import pytest

from rlhf_jax.train.metrics import read_metrics

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# A policy stage long enough to be caught in the middle, checkpointed every 2 steps, logged every step.
ARGS = ["--experiment=rso_tldr:smoke", "--config.progress=false", "--config.train.steps=30",
        "--config.checkpoint.every_steps=2", "--config.train.log_every=1"]  # fmt: skip
# What an uninterrupted and a resumed run must agree on.
RESULT_KEYS = ("win_rate_vs_sft_gold", "win_rate_vs_sft_gold_ci95", "win_rate_vs_sft_proxy",
               "win_rate_vs_sft_proxy_ci95", "win_rate_vs_reference_gold", "kl_to_sft",
               "mean_response_length", "pair_stats", "sft", "reward_model")  # fmt: skip


def _find(workdir, name) -> list[str]:
    """Every path called `name` under `workdir`, at any depth (stages may nest their outputs)."""
    return sorted(glob.glob(os.path.join(glob.escape(str(workdir)), "**", name), recursive=True))


def _in_stage(paths, stage: str) -> list[str]:
    """The paths that lie inside a directory named `stage`."""
    return [p for p in paths if stage in p.split(os.sep)]


def _step_of(line: str) -> int | None:
    """The step of a metrics.jsonl line, or None for a line cut short by a kill."""
    try:
        return json.loads(line)["step"]
    except json.JSONDecodeError:
        return None


def _logged_steps(path: str) -> list[int]:
    with open(path) as f:
        return [s for s in map(_step_of, f.readlines()) if s is not None]


def _snapshot(paths) -> dict:
    """Each file's modification time (ns) and bytes: equal snapshots mean the files were not rewritten."""
    return {p: (os.stat(p).st_mtime_ns, open(p, "rb").read()) for p in paths}


@pytest.mark.slow
def test_rso_killed_in_policy_training_resumes_and_matches(tmp_path):
    killed = tmp_path / "killed"
    proc = subprocess.Popen(
        [sys.executable, "-m", "launch.train", *ARGS, f"--workdir={killed}"],
        cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )  # fmt: skip
    deadline = time.time() + 600
    while time.time() < deadline and proc.poll() is None:
        policy_metrics = _in_stage(_find(killed, "metrics.jsonl"), "policy")
        if policy_metrics and len(_logged_steps(policy_metrics[0])) >= 6:
            break
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    [policy_metrics] = _in_stage(_find(killed, "metrics.jsonl"), "policy")
    assert not _in_stage(_find(killed, "params"), "policy"), "killed too late: the policy stage had finished"
    # The finished stages: SFT and the reward model (their params mark them done) and the samples.
    finished = [os.path.dirname(p) for p in _find(killed, "params")]
    assert len(finished) == 2 and _in_stage(finished, "sft") and _in_stage(finished, "rm"), finished
    done_files = [f for d in finished for f in glob.glob(os.path.join(d, "*")) if os.path.isfile(f)]
    done_files += _find(killed, "candidates.npz")
    assert len(_find(killed, "candidates.npz")) == 1 and any(f.endswith("metrics.jsonl") for f in done_files)
    before_done = _snapshot(done_files)
    before = open(policy_metrics).readlines()
    policy_dir = os.path.dirname(policy_metrics)
    saved = [
        int(os.path.basename(p)) for p in _find(policy_dir, "checkpoints/*") if p.split(os.sep)[-1].isdigit()
    ]
    restored, last = max(saved), max(_logged_steps(policy_metrics))
    assert 2 <= restored < last < 30, (restored, last)

    time.sleep(0.01)  # a rewrite of a finished stage's file would show in its mtime
    # The uninterrupted run: it copies the killed run's finished stages (SFT, reward model, samples; only
    # finished stages are ever copied) and trains its policy from step 0 in one go.
    full = tmp_path / "full"
    cmd = [sys.executable, "-m", "launch.train", *ARGS, f"--workdir={full}", f"--reuse={killed}"]
    out = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True)
    assert out.returncode == 0, out.stderr[-3000:]
    copied = [line for line in out.stdout.splitlines() if "copied from" in line]
    assert len(copied) >= 3 and "computing sft/" not in out.stdout, out.stdout[-3000:]
    [full_policy] = _in_stage(_find(full, "metrics.jsonl"), "policy")
    assert [_step_of(line) for line in open(full_policy)] == list(range(1, 31))
    assert not _find(full, "metrics.superseded.jsonl")
    out = subprocess.run([sys.executable, "-m", "launch.train", *ARGS, f"--workdir={killed}"], cwd=ROOT,
                         capture_output=True, text=True)  # fmt: skip
    assert out.returncode == 0, out.stderr[-3000:]

    # The finished stages were not run again: their files are untouched.
    assert _snapshot(done_files) == before_done
    # The policy stage resumed from its newest checkpoint: the rerun kept the killed run's records up to
    # that step, moved its later ones aside and trained only the steps after it.
    superseded = os.path.join(policy_dir, "metrics.superseded.jsonl")
    assert _logged_steps(superseded) == list(range(restored + 1, last + 1))
    after = open(policy_metrics).readlines()
    assert [_step_of(line) for line in after] == list(range(1, 31))
    assert after[:restored] == [line for line in before if (_step_of(line) or 0) <= restored]
    # And the end is the uninterrupted run's: the same policy losses, bitwise, and the same results.
    losses = lambda path: [(r["step"], r["loss"]) for r in read_metrics(os.path.dirname(path))]
    assert losses(policy_metrics) == losses(full_policy)
    resumed_results = json.load(open(killed / "results.json"))
    full_results = json.load(open(full / "results.json"))
    for key in RESULT_KEYS:
        assert resumed_results[key] == full_results[key], key
    assert resumed_results["pair_stats"]["pairs"] > 0
