"""Checkpoints from and for other frameworks: HuggingFace Llama / Mistral / Qwen2 / Qwen3 / Gemma 1-3
(see `interop.hf`).

    from rlhf_jax import interop
    config = interop.load_config(hf_dir, dtype="bfloat16")
    params = interop.import_params(hf_dir, models.Transformer(config, mesh=mesh))
    interop.export_params(params, config, out_dir, source=hf_dir)
    interop.export_peft(adapters, lora_config, config, out_dir, base_model=hf_dir)  # LoRA, PEFT format

Command line, to export a finished stage: `python -m rlhf_jax.interop --help`.
"""

from rlhf_jax.interop.hf import export_params, family, import_params, load_config, tokenizer_path
from rlhf_jax.interop.peft import export_peft

__all__ = ["export_params", "export_peft", "family", "import_params", "load_config", "tokenizer_path"]
