"""Packaging for rlhf_jax.

Lower bounds are the versions the test suite was run with; there are no upper bounds because no known
break exists yet (add one here, with a comment naming the break, when one appears).
"""

import setuptools

_RUNTIME = [
    "jax>=0.10.2",
    "flax>=0.12.8",
    "optax>=0.2.8",
    "orbax-checkpoint>=0.12.8",
    "tensorstore>=0.1.86",
    "sentencepiece>=0.2.0",
    "grain>=0.2.18",
    "ml-collections>=1.1.0",
    "numpy>=2.0",
    "tqdm>=4.66",
    "pyarrow>=16.0",  # Parquet preference files.
    "tensorboardX>=2.6",  # TensorBoard event files without TensorFlow.
    "matplotlib>=3.8",  # training-curve and study plots (PNG, Agg backend).
    "math-verify>=0.9.0",  # the `math` reward's answer equivalence (imported when that reward is made).
    "tokenizers>=0.22",  # HuggingFace tokenizer.json (Llama 3, Qwen2.5), `rlhf_jax.data.hf_tokenizer`.
    "jinja2>=3.1.6",  # chat templates (`rlhf_jax.data.chat_template`), in transformers' sandbox.
]

_TEST = [
    "pytest>=8.0",
    "pytest-xdist>=3.5",  # two workers (pytest.ini): the suite is mostly single-threaded compilation.
    "chex>=0.1.90",
    "hypothesis>=6.100",
    # HuggingFace interop tests compare logits with PyTorch (never imported by the library).
    "torch==2.13.0",
    "transformers>=4.57",
    "trl>=1.16",  # test_bench times TRL's DPOTrainer step (`bench.train_step --compare=trl`).
    "peft>=0.17",  # LoRA export (`interop export --peft`) is reloaded with peft in the tests.
    # The Colab notebook runs headless in the slow tier.
    "nbclient>=0.10",
    "nbformat>=5.10",
    "ipykernel>=6.29",
    # .ci/run checks `ruff check .` and `ruff format --check .`; pinned because a formatter release may
    # change its style and turn a clean tree into a failing check.
    "ruff==0.17.6",
    # tests/test_tpu_plan.py compiles for TPU topologies on the CPU (libtpu wheels are Linux-only).
    'libtpu; sys_platform == "linux"',
]

# `bench.tpu_plan` compiles for described TPU topologies on any Linux host (the wheel `jax[tpu]` installs).
_TPU = ["libtpu"]

# `python -m rlhf_jax.kernels.build` on a machine without a C++ compiler: the Zig toolchain from pip.
_KERNELS = ["ziglang>=0.17.1"]

_BENCH = [
    "torch==2.13.0",
    "transformers>=4.57",
    "trl>=1.16",  # `bench.train_step --compare=trl` (TRL's DPOTrainer).
]

setuptools.setup(
    name="rlhf_jax",
    version="0.1.0",
    description="Preference optimization and RL fine-tuning of language models in JAX/Flax: the DPO family, "
    "RSO, INPO and the GRPO family.",
    long_description=open("README.md", encoding="utf-8").read(),
    long_description_content_type="text/markdown",
    python_requires=">=3.10",
    packages=setuptools.find_packages(include=["rlhf_jax", "rlhf_jax.*", "launch", "experiments", "bench"]),
    package_data={"rlhf_jax.kernels": ["*.cc"]},  # the optional kernels' source, compiled on demand
    install_requires=_RUNTIME,
    extras_require={"test": _TEST, "bench": _BENCH, "dev": _TEST, "tpu": _TPU, "kernels": _KERNELS},
    license="Apache-2.0",
)
