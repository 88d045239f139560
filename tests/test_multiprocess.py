"""Two `jax.distributed` CPU processes (gloo collectives, 4 devices each) equal one process with 8.

Tolerance: the same program on the same mesh, with the cross-device reductions done by gloo instead of
in-process; float32 sums in another order, so 1e-5 relative.
"""

import json
import os
import socket
import subprocess
import sys

import multiprocess_worker
import pytest

from rlhf_jax import sharding

_WORKER = os.path.join(os.path.dirname(__file__), "multiprocess_worker.py")
_TIMEOUT_S = 300


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.slow
def test_two_processes_match_one(tmp_path):
    env = {**os.environ, "XLA_FLAGS": "--xla_force_host_platform_device_count=4", "JAX_PLATFORMS": "cpu"}
    port, num_processes = _free_port(), 2
    procs, logs = [], []
    try:
        for i in range(num_processes):
            log = open(tmp_path / f"worker{i}.log", "w")
            logs.append(log)
            cmd = [
                sys.executable,
                _WORKER,
                str(port),
                str(num_processes),
                str(i),
                str(tmp_path / f"out{i}.json"),
            ]
            procs.append(subprocess.Popen(cmd, env=env, stdout=log, stderr=subprocess.STDOUT))
        for proc in procs:
            proc.wait(timeout=_TIMEOUT_S)
    finally:
        for proc in procs:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
        for log in logs:
            log.close()
    for i, proc in enumerate(procs):
        tail = (tmp_path / f"worker{i}.log").read_text()[-3000:]
        assert proc.returncode == 0, f"worker {i} exited with {proc.returncode}:\n{tail}"

    loss, grad_norm = multiprocess_worker.loss_and_grad_norm(sharding.make_mesh(multiprocess_worker.MESH))
    for i in range(num_processes):
        out = json.loads((tmp_path / f"out{i}.json").read_text())
        assert out["devices"] == 8
        assert out["loss"] == pytest.approx(loss, rel=1e-5)
        assert out["grad_norm"] == pytest.approx(grad_norm, rel=1e-5)
