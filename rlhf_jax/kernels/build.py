"""Compiles the optional C++ kernels into a shared library in a cache directory.

    python -m rlhf_jax.kernels.build [--force]

The library lands in `cache_dir()/<hash>/libcpu_attention.so`, where the hash covers the source and the
jaxlib version (whose FFI headers it is compiled against): a new source or jaxlib builds afresh, an
unchanged one is reused. Compilers tried, in order: `$CXX`, then `g++`, `c++`, `clang++` on PATH, then
the Zig toolchain from pip (`python -m ziglang c++`, `pip install -e '.[kernels]'`), so a machine
without a system compiler can still build; a library that compiles but does not load counts as a
failure of that compiler. Flags: `-O3 -std=c++17 -shared -fPIC -pthread`; set
`RLHF_JAX_KERNELS_NATIVE=1` to add `-march=native` (the library then runs only on CPUs like this one;
without it GCC still builds AVX-512/AVX2 versions of the hot loops, chosen at load time, see the
source). `RLHF_JAX_KERNELS_CACHE` overrides the cache directory.
"""

import argparse
import hashlib
import importlib.util
import os
import shutil
import subprocess
import sys
import tempfile

import jax
import jaxlib

SOURCE = os.path.join(os.path.dirname(os.path.abspath(__file__)), "cpu_attention.cc")
LIBRARY = "libcpu_attention.so"


def cache_dir() -> str:
    """`$RLHF_JAX_KERNELS_CACHE`, else `$XDG_CACHE_HOME/rlhf_jax/kernels` (default ~/.cache)."""
    if path := os.environ.get("RLHF_JAX_KERNELS_CACHE"):
        return path
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return os.path.join(base, "rlhf_jax", "kernels")


def library_path() -> str:
    """Where the library of this source and jaxlib version lives (built or not)."""
    with open(SOURCE, "rb") as f:
        digest = hashlib.sha256(f.read() + jaxlib.__version__.encode()).hexdigest()[:16]
    return os.path.join(cache_dir(), digest, LIBRARY)


def compilers() -> list[tuple[str, list[str]]]:
    """(description, command prefix) of each C++ compiler to try, in order."""
    found = []
    if cxx := os.environ.get("CXX"):
        found.append((f"$CXX={cxx}", cxx.split()))
    for name in ("g++", "c++", "clang++"):
        if path := shutil.which(name):
            found.append((name, [path]))
    if importlib.util.find_spec("ziglang") is not None:
        found.append(("python -m ziglang c++", [sys.executable, "-m", "ziglang", "c++"]))
    return found


def _flags(zig: bool) -> list[str]:
    flags = ["-O3", "-std=c++17", "-shared", "-fPIC", "-pthread", "-I", jax.ffi.include_dir()]
    if os.environ.get("RLHF_JAX_KERNELS_NATIVE") == "1":
        flags.append("-march=native")
    elif zig:  # Zig's C++ compiler targets the host CPU unless told otherwise
        flags.append("-mcpu=baseline")
    return flags


def build(force: bool = False, verbose: bool = False) -> str:
    """Compiles the library unless it exists (or `force`); returns its path.

    Raises:
      RuntimeError: no compiler worked; the message names every one tried and its error.
    """
    out = library_path()
    if os.path.exists(out) and not force:
        return out
    os.makedirs(os.path.dirname(out), exist_ok=True)
    tried = []
    candidates = compilers()
    for name, prefix in candidates:
        zig = "ziglang" in prefix
        fd, tmp = tempfile.mkstemp(suffix=".so", dir=os.path.dirname(out))
        os.close(fd)
        cmd = [*prefix, *_flags(zig), SOURCE, "-o", tmp]
        if verbose:
            print(" ".join(cmd), flush=True)
        try:
            proc = subprocess.run(cmd, capture_output=True, text=True)
        except OSError as e:
            proc = subprocess.CompletedProcess(cmd, -1, "", str(e))
        if proc.returncode == 0:
            # Loaded in a subprocess: a library that compiles but does not load (an undefined symbol)
            # fails here, not in the user's program, and the next compiler is tried.
            load = subprocess.run(
                [sys.executable, "-c", f"import ctypes; ctypes.CDLL({tmp!r})"], capture_output=True, text=True
            )
            if load.returncode == 0:
                os.replace(tmp, out)  # atomic: a concurrent loader sees the old file or the whole new one
                return out
            proc = subprocess.CompletedProcess(cmd, load.returncode, "", f"does not load: {load.stderr}")
        os.unlink(tmp)
        tried.append(f"  {name}: exit {proc.returncode}: {(proc.stderr or proc.stdout).strip()[-2000:]}")
    if not candidates:
        tried.append("  no $CXX, no g++/c++/clang++ on PATH, and the ziglang package is not installed")
    raise RuntimeError(
        "could not compile rlhf_jax/kernels/cpu_attention.cc; tried:\n" + "\n".join(tried) + "\n"
        "Install a C++17 compiler, or the Zig toolchain from pip: pip install -e '.[kernels]'"
    )


def main(argv=None) -> str:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--force", action="store_true", help="rebuild even if the library exists")
    args = ap.parse_args(argv)
    path = build(force=args.force, verbose=True)
    print(path)
    return path


if __name__ == "__main__":
    main()
