"""tests/conftest.py's CI rule: with CI=true a missing test dependency fails the run instead of skipping."""

import os
import shutil
import subprocess
import sys

_TESTS = """
import pytest

def test_needs_a_missing_module():
    pytest.importorskip("rlhf_jax_no_such_module")

def test_needs_a_newer_pytest():
    pytest.importorskip("pytest", minversion="999")

def test_not_applicable():
    pytest.skip("a legitimate skip")
"""

_MODULE_LEVEL = """
import pytest

pytest.importorskip("rlhf_jax_no_such_module")

def test_anything():
    pass
"""


def _pytest(tmp_path, ci: bool):
    """Runs pytest, with this repository's conftest.py, on two small files; returns (rc, summary lines)."""
    shutil.copy(os.path.join(os.path.dirname(__file__), "conftest.py"), tmp_path / "conftest.py")
    (tmp_path / "pytest.ini").write_text("[pytest]\n")  # the rootdir: not the repository's pytest.ini
    (tmp_path / "test_deps.py").write_text(_TESTS)
    (tmp_path / "test_module_level.py").write_text(_MODULE_LEVEL)
    env = {k: v for k, v in os.environ.items() if k not in ("CI", "PYTEST_ADDOPTS")}
    if ci:
        env["CI"] = "true"
    out = subprocess.run(
        [sys.executable, "-m", "pytest", "-p", "no:cacheprovider", "-rA", "--continue-on-collection-errors"],
        cwd=tmp_path, env=env, capture_output=True, text=True,
    )  # fmt: skip
    summary = out.stdout.split("short test summary info")[-1]
    return out.returncode, summary


def test_without_ci_missing_dependencies_skip(tmp_path):
    rc, summary = _pytest(tmp_path, ci=False)
    assert rc == 0, summary
    assert "SKIPPED [1] test_module_level.py" in summary and "= 4 skipped in" in summary, summary


def test_with_ci_missing_dependencies_fail_and_other_skips_stay(tmp_path):
    rc, summary = _pytest(tmp_path, ci=True)
    assert rc == 1, summary
    missing = "CI=true: a test dependency is missing"
    assert f"FAILED test_deps.py::test_needs_a_missing_module - {missing}" in summary
    assert "FAILED test_deps.py::test_needs_a_newer_pytest" in summary
    assert f"ERROR test_module_level.py - {missing}" in summary
    assert "SKIPPED [1] test_deps.py" in summary and "a legitimate skip" in summary
    assert "2 failed, 1 skipped, 1 error" in summary, summary
