"""Command line: check a HuggingFace checkpoint, or export a finished stage's policy to HuggingFace format.

    python -m rlhf_jax.interop inspect /ckpt/TinyLlama-1.1B
    python -m rlhf_jax.interop export --workdir workdirs/dpo_hh --out /tmp/dpo_hh_hf \
        [--source /ckpt/TinyLlama-1.1B] [--family llama] [--dtype bfloat16] [--peft]

`export` reads WORKDIR/model.json and WORKDIR/params (written when a stage finishes). With `--source`
(the checkpoint the run started from) its config metadata, tokenizer files and generation config are
carried over; without it the stage's own `tokenizer.model` is copied and its BOS/EOS/PAD ids are written
into config.json. `--peft` exports a LoRA stage's adapters alone in PEFT's format
(`adapter_model.safetensors`, `adapter_config.json`, for `PeftModel.from_pretrained` on the base
checkpoint) instead of the merged weights.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys

import jax


def _inspect(args) -> int:
    from rlhf_jax import interop

    config = interop.load_config(args.path)
    print(f"family: {interop.family(args.path)}")
    print(json.dumps(dataclasses.asdict(config), indent=2))
    return 0


def _export(args) -> int:
    import orbax.checkpoint as ocp

    from rlhf_jax import interop, models
    from rlhf_jax.pipelines import fingerprints  # a command-line edge, like launch/

    args.workdir = fingerprints.resolve_init_from(args.workdir)  # a run's workdir: its final stage
    with open(os.path.join(args.workdir, "model.json"), encoding="utf-8") as f:
        saved = json.load(f)
    kind = saved.pop("kind", "lm")
    if kind != "lm":
        raise ValueError(f"{args.workdir} holds a {kind!r} model; only language models (kind 'lm') export")
    config = models.ModelConfig(**saved)
    abstract = models.param_shapes(models.Transformer(config))
    if args.peft:
        from rlhf_jax.pipelines import workdir as workdir_io

        adapters, lora = workdir_io.load_adapters(args.workdir, abstract)
        interop.export_peft(adapters, lora, config, args.out, base_model=args.source or "", dtype=args.dtype)
        print(f"exported the LoRA adapters of {args.workdir} -> {args.out} (PEFT format)")
        return 0
    with ocp.StandardCheckpointer() as ckptr:
        params = ckptr.restore(os.path.abspath(os.path.join(args.workdir, "params")), abstract)
    extra, tok = {}, None
    if not args.source:  # the stage's own tokenizer (sentencepiece or tokenizer.json), if it kept one
        from rlhf_jax.data.tokenizer import load_tokenizer

        try:
            tok = load_tokenizer(args.workdir)
        except FileNotFoundError:
            tok = None
    if tok is not None:
        eos = list(tok.eos_ids) if len(tok.eos_ids) > 1 else tok.eos_id
        extra = {"bos_token_id": tok.bos_id, "eos_token_id": eos, "pad_token_id": tok.pad_id}
        extra = {k: v for k, v in extra.items() if v is not None}
    interop.export_params(
        params, config, args.out, family=args.family, dtype=args.dtype, source=args.source, extra_config=extra
    )
    if tok is not None and jax.process_index() == 0:
        tok.save(args.out)
    print(f"exported {args.workdir} -> {args.out}")
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m rlhf_jax.interop", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)  # fmt: skip
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("inspect", help="validate a HuggingFace checkpoint's config.json")
    p.add_argument("path")
    p = sub.add_parser("export", help="write a finished stage's LM as a HuggingFace checkpoint")
    p.add_argument(
        "--workdir",
        required=True,
        help="a finished stage's directory (model.json, params/), or a run's workdir (its final stage)",
    )
    p.add_argument("--out", required=True, help="output directory")
    p.add_argument("--source", default=None, help="the HF checkpoint the run started from")
    p.add_argument("--family", default=None, choices=["llama", "qwen2", "gemma"])
    p.add_argument("--dtype", default=None, choices=["float32", "bfloat16"])
    p.add_argument("--peft", action="store_true", help="a LoRA stage's adapters alone, in PEFT's format")
    args = parser.parse_args(argv)
    try:
        return _inspect(args) if args.command == "inspect" else _export(args)
    except (ValueError, FileNotFoundError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
