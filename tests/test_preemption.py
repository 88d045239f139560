"""SIGTERM (how TPU VMs and schedulers preempt) through the command line: checkpoint, exit 143, resume."""

import glob
import json
import os
import re
import signal
import subprocess
import sys
import time

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ARGS = ["--experiment=sft_tldr:smoke", "--config.train.steps=40", "--config.checkpoint.every_steps=1000",
        "--config.progress=false", "--config.train.log_every=1"]  # fmt: skip


def _command(workdir, extra=()):
    return [sys.executable, "-m", "launch.train", *ARGS, *extra, f"--workdir={workdir}"]


def _env():
    return {**os.environ, "PYTHONPATH": ROOT + os.pathsep + os.environ.get("PYTHONPATH", "")}


def _records(workdir):
    """The stage's metrics.jsonl records (wherever in the workdir the stage writes them)."""
    paths = glob.glob(os.path.join(workdir, "**", "metrics.jsonl"), recursive=True)
    if not paths:
        return []
    (path,) = paths
    with open(path, encoding="utf-8") as f:
        lines = [line for line in f if line.endswith("\n")]  # a line being written is not yet a record
    return [json.loads(line) for line in lines]


@pytest.mark.slow
@pytest.mark.parametrize(
    "extra",
    # IFT: its frozen initial embedding is rebuilt from the init on resume, not checkpointed.
    [(), ("--config.train.objective=ift",)],
    ids=["nll", "ift"],
)
def test_sigterm_checkpoints_exits_143_and_the_rerun_resumes_exactly(tmp_path, extra):
    full = subprocess.run(
        _command(tmp_path / "full", extra), cwd=ROOT, env=_env(), capture_output=True, text=True
    )
    assert full.returncode == 0, full.stderr[-3000:]

    workdir = tmp_path / "preempted"
    proc = subprocess.Popen(
        _command(workdir, extra),
        cwd=ROOT,
        env=_env(),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    deadline = time.time() + 300
    while time.time() < deadline and proc.poll() is None:
        if len(_records(workdir)) >= 3:
            break
        time.sleep(0.05)
    assert proc.poll() is None, (
        "the run ended before SIGTERM could be sent:\n" + proc.communicate()[1][-3000:]
    )
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=300)
    assert proc.returncode == 143, err[-3000:]
    found = re.search(
        r"preempted by SIGTERM at step (\d+) of stage sft; checkpoint saved in ([^;]+); "
        r"rerun the same command to resume",
        err,
    )
    assert found, err[-3000:]
    step, checkpoints = int(found.group(1)), found.group(2)
    assert 3 <= step < 40
    assert sorted(os.listdir(checkpoints)) == [str(step)]  # the step it finished, and no periodic one
    before = _records(workdir)
    assert [r["step"] for r in before] == list(range(1, step + 1))  # the stop step is logged too

    rerun = subprocess.run(_command(workdir, extra), cwd=ROOT, env=_env(), capture_output=True, text=True)
    assert rerun.returncode == 0, rerun.stderr[-3000:]
    assert f"resuming from the checkpoint at step {step}" in rerun.stdout
    after = _records(workdir)
    # Resumed, not restarted: the first run's records stay (a restart would have superseded them) and the
    # rerun's first record is the step after the checkpoint.
    assert after[:step] == before and after[step]["step"] == step + 1
    assert not glob.glob(os.path.join(workdir, "**", "metrics.superseded.jsonl"), recursive=True)
    # Bitwise on CPU: params, optimizer state, RNG and data position were all restored exactly.
    losses = lambda records: [(r["step"], r["loss"]) for r in records]
    assert losses(after) == losses(_records(tmp_path / "full"))
    assert json.load(open(os.path.join(workdir, "results.json")))["nonfinite_steps"] == 0


@pytest.mark.slow
def test_processes_agree_on_the_preemption_step(tmp_path):
    """Two processes (the TPU-pod case): JAX's preemption sync point makes both stop at one step."""
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = {**_env(), "XLA_FLAGS": "--xla_force_host_platform_device_count=4", "JAX_PLATFORMS": "cpu"}
    workdir = tmp_path / "two"
    procs = [
        subprocess.Popen(
            [
                *_command(workdir),
                "--config.mesh.data=8",
                f"--coordinator=127.0.0.1:{port}",
                "--num_processes=2",
                f"--process_id={i}",
            ],
            cwd=ROOT,
            env=env,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
            text=True,
        )  # fmt: skip
        for i in range(2)
    ]
    try:
        deadline = time.time() + 300
        while time.time() < deadline and all(p.poll() is None for p in procs) and len(_records(workdir)) < 3:
            time.sleep(0.05)
        assert all(p.poll() is None for p in procs), "a process ended before SIGTERM could be sent"
        for p in procs:  # a scheduler signals every host; the sync point copes with any arrival order
            p.send_signal(signal.SIGTERM)
        errs = [p.communicate(timeout=300)[1] for p in procs]
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.wait()
    assert [p.returncode for p in procs] == [143, 143], errs[0][-3000:] + errs[1][-3000:]
    stops = {int(re.search(r"preempted by SIGTERM at step (\d+) of stage sft", e).group(1)) for e in errs}
    assert len(stops) == 1
    (step,) = stops
    assert glob.glob(os.path.join(workdir, "**", "checkpoints", str(step)), recursive=True)
    assert _records(workdir)[-1]["step"] == step
