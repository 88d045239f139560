"""Test setup: 8 simulated CPU devices, forced before JAX is imported, so every test can use a mesh."""

import os

# Must happen before any `import jax` in this process; pytest imports conftest.py first.
_flags = os.environ.get("XLA_FLAGS", "")
if "xla_force_host_platform_device_count" not in _flags:
    os.environ["XLA_FLAGS"] = (_flags + " --xla_force_host_platform_device_count=8").strip()
os.environ.setdefault("JAX_PLATFORMS", "cpu")

import jax  # noqa: E402

jax.config.update("jax_enable_x64", False)


def pytest_configure(config):
    n = len(jax.devices())
    if n != 8:
        raise RuntimeError(
            f"tests expect 8 simulated CPU devices, found {n}: was jax imported before conftest?"
        )
