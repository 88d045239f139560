"""Test setup: 8 simulated CPU devices, forced before JAX is imported, so every test can use a mesh.

With `CI=true` (as `.ci/run` sets), a test skipped because a test dependency is missing
(`pytest.importorskip`, in a test or at module level) fails instead: CI installs the test extra, so a
missing package there is a broken install, not a reason to skip. Other skips stay skips.
"""

import os
import re
import tempfile

# Must happen before any `import jax` in this process; pytest imports conftest.py first.
_flags = os.environ.get("XLA_FLAGS", "")
if "xla_force_host_platform_device_count" not in _flags:
    _flags = (_flags + " --xla_force_host_platform_device_count=8").strip()
# XLA:CPU's concurrency-optimised scheduler can order two collectives differently on different simulated
# devices of one process, and the step then deadlocks until the rendezvous aborts the process (seen with
# the `chosen_nll` loss in the `rso_tldr` policy stage on 8 devices: half the devices waiting in a
# collective-permute, the rest in an all-reduce). The default scheduler orders them the same everywhere.
if "xla_cpu_enable_concurrency_optimized_scheduler" not in _flags:
    _flags += " --xla_cpu_enable_concurrency_optimized_scheduler=false"
os.environ["XLA_FLAGS"] = _flags
os.environ.setdefault("JAX_PLATFORMS", "cpu")
# One persistent compilation cache for the whole run, subprocesses included: the end-to-end tests
# compile the same train, eval and sampling programs many times over (kept between runs; delete freely).
os.environ.setdefault(
    "JAX_COMPILATION_CACHE_DIR",
    os.path.join(tempfile.gettempdir(), f"rlhf_jax_tests_jax_cache_{os.getuid()}"),
)
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0.3")

import jax  # noqa: E402
import pytest  # noqa: E402

jax.config.update("jax_enable_x64", False)
# Every broadcast in the library is explicit (`x_BT[:, :, None]`), so shape bugs fail loudly in tests.
jax.config.update("jax_numpy_rank_promotion", "raise")


def pytest_configure(config):
    n = len(jax.devices())
    if n != 8:
        raise RuntimeError(
            f"tests expect 8 simulated CPU devices, found {n}: was jax imported before conftest?"
        )


# The reasons `pytest.importorskip` gives: the module is missing, or older than `minversion`.
_MISSING_DEPENDENCY = re.compile(r"could not import '[^']+'|module '[^']+' has __version__ .*, required is")


def _fail_missing_dependency(report):
    """Turns a skip for a missing test dependency into a failure when CI=true; returns the report."""
    if os.environ.get("CI") != "true" or not report.skipped:
        return report
    reason = report.longrepr[2] if isinstance(report.longrepr, tuple) else str(report.longrepr)
    if _MISSING_DEPENDENCY.search(reason):
        report.outcome = "failed"
        report.longrepr = f"CI=true: a test dependency is missing ({reason}); install the test extra"
    return report


@pytest.hookimpl(wrapper=True)
def pytest_runtest_makereport(item, call):
    return _fail_missing_dependency((yield))


@pytest.hookimpl(wrapper=True)
def pytest_make_collect_report(collector):
    return _fail_missing_dependency((yield))
