"""Test setup: 8 simulated CPU devices, forced before JAX is imported, so every test can use a mesh."""

import os
import tempfile

# Must happen before any `import jax` in this process; pytest imports conftest.py first.
_flags = os.environ.get("XLA_FLAGS", "")
if "xla_force_host_platform_device_count" not in _flags:
    os.environ["XLA_FLAGS"] = (_flags + " --xla_force_host_platform_device_count=8").strip()
os.environ.setdefault("JAX_PLATFORMS", "cpu")
# One persistent compilation cache for the whole run, subprocesses included: the end-to-end tests
# compile the same train, eval and sampling programs many times over (kept between runs; delete freely).
os.environ.setdefault(
    "JAX_COMPILATION_CACHE_DIR",
    os.path.join(tempfile.gettempdir(), f"rlhf_jax_tests_jax_cache_{os.getuid()}"),
)
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0.3")

import jax  # noqa: E402

jax.config.update("jax_enable_x64", False)


def pytest_configure(config):
    n = len(jax.devices())
    if n != 8:
        raise RuntimeError(
            f"tests expect 8 simulated CPU devices, found {n}: was jax imported before conftest?"
        )
