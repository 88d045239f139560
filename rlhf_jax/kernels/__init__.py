"""Optional native kernels (XLA FFI), built on demand with `python -m rlhf_jax.kernels.build`.

Nothing here is imported unless a model asks for it (`ModelConfig.attention_impl="cpu_ffi"`); the
pure-JAX paths stay the default, and the package installs and runs without a compiler.
"""
