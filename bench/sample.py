"""Sampling throughput: generated tokens/s of `rlhf_jax.sampling.sample` against HF `generate`.

    python -m bench.sample --preset=small [--compare=torch] [--profile] [--json=PATH]
    python -m bench.sample --preset=small --prompts=8 --samples=8 --compare=torch   # G-sample groups

The workload (RSO's sampling setting): `--prompts` (64) prompts of `--prompt_len` (128) random tokens,
`--new_tokens` (64) new tokens each, temperature 0.7, top-k 40, one sample per prompt, and no early
stop (no EOS id), so every run generates exactly prompts x samples x new_tokens tokens. `--samples` (1)
G > 1 is online RL's setting: G samples of each prompt, our `sample(num_samples=G)` (one prefill per
prompt) against HF `generate(num_return_sequences=G)`; the table then also times our sampler with
each prompt's cache repeated for its samples instead of shared (`shared_prefix=False`), the A/B of
the shared prompt cache. Each run includes the
prefill and the transfer of the samples to the host. The reported time is the median of `--runs` timed
runs after one warm-up (which compiles).

`--compare=torch` times HF transformers' `LlamaForCausalLM.generate` on the same architecture (random
init, untied embeddings, float32, `do_sample=True, temperature=0.7, top_k=40, max_new_tokens=64,
min_new_tokens=64, use_cache=True`, torch threads = the cores this process may use). It needs the
`bench` extra (`pip install -e .[bench]`); torch is imported only then.

`--profile` adds the top XLA ops of one of our `sample` calls (`common.op_profile`): ops with
`calls` = new_tokens - 1 are the decode loop's, run once per token; the others are the prefill.

The last line is `tokens_per_s=<ours> mfu=na ratio_vs_torch=<ours / HF or na>`.
"""

from __future__ import annotations

import argparse
import sys

import numpy as np

from bench import common


def _prompts(args, vocab: int) -> np.ndarray:
    # Token ids from 4 up: clear of the usual pad/unk/bos/eos ids.
    return np.random.default_rng(0).integers(4, vocab, (args.prompts, args.prompt_len), dtype=np.int32)


def time_ours(args, config, shared_prefix: bool = True) -> dict[str, object]:
    """Median seconds per `sample` call of our sampler, single device; `shared_prefix=False` times the
    layout that repeats each prompt's cache for its samples (`sampling.sample(shared_prefix=False)`)."""
    import jax

    from rlhf_jax import models, sampling

    model = models.Transformer(config)
    params = models.init_params(model, jax.random.key(0))
    prompts_PT = _prompts(args, config.vocab_size)
    lengths_P = np.full((args.prompts,), args.prompt_len, np.int32)
    policy = sampling.SamplingConfig(max_new_tokens=args.new_tokens, temperature=0.7, top_k=40)
    calls = [0]

    def one():
        calls[0] += 1
        out = sampling.sample(
            model, params, prompts_PT, lengths_P, config=policy, num_samples=args.samples,
            rng=jax.random.key(calls[0]), eos_id=None, pad_id=0, shared_prefix=shared_prefix,
        )  # fmt: skip
        assert out.tokens_PNT.shape == (args.prompts, args.samples, args.new_tokens)

    times = common.time_calls(one, warmup=1, iters=args.runs)
    name = "jax" if shared_prefix else "jax (repeated cache)"
    result = {"framework": name, "seconds": common.median(times), "all_seconds": times}
    if args.profile:
        # The jitted body as `sample` calls it (prompt ids 0..P-1, EOS id -1: no early stop).
        generate = sampling.jitted_generate(model, policy, args.samples, 0)
        prompt_ids_P = np.arange(args.prompts, dtype=np.int32)
        inputs = (params, prompts_PT, lengths_P, prompt_ids_P, jax.random.key(0), np.int32(-1))
        hlo = generate.lower(*inputs).compile().as_text()
        result["profile"] = common.op_profile(lambda: jax.block_until_ready(generate(*inputs)), hlo, steps=2)
    return result


def time_torch(args, config) -> dict[str, object]:
    """Median seconds per HF `generate` call on the same architecture."""
    import torch
    import transformers

    torch.set_num_threads(common.cores())
    torch.manual_seed(0)
    hf_config = transformers.LlamaConfig(
        vocab_size=config.vocab_size, hidden_size=config.d_model, intermediate_size=config.mlp_dim,
        num_hidden_layers=config.num_layers, num_attention_heads=config.num_heads,
        num_key_value_heads=config.num_kv_heads, head_dim=config.head_dim,
        max_position_embeddings=max(config.max_len, args.prompt_len + args.new_tokens),
        rms_norm_eps=config.norm_eps, rope_theta=config.rope_theta, tie_word_embeddings=False,
        pad_token_id=0, bos_token_id=2, eos_token_id=3,
    )  # fmt: skip
    model = transformers.LlamaForCausalLM(hf_config).to(torch.float32).eval()
    input_ids = torch.from_numpy(_prompts(args, config.vocab_size).astype(np.int64))
    attention_mask = torch.ones_like(input_ids)

    def one():
        with torch.no_grad():
            out = model.generate(
                input_ids=input_ids, attention_mask=attention_mask, do_sample=True, temperature=0.7,
                top_k=40, max_new_tokens=args.new_tokens, min_new_tokens=args.new_tokens, use_cache=True,
                pad_token_id=0, num_return_sequences=args.samples,
            )  # fmt: skip
        assert out.shape == (args.prompts * args.samples, args.prompt_len + args.new_tokens)

    times = common.time_calls(one, warmup=1, iters=args.runs)
    return {
        "framework": "torch",
        "seconds": common.median(times),
        "all_seconds": times,
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "threads": torch.get_num_threads(),
    }


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--preset", default="small", choices=sorted(common.PRESETS))
    parser.add_argument("--compare", default="", choices=["", "torch"])
    parser.add_argument(
        "--json", default=None, help="default bench_results/sample_<preset>.json; '' for none"
    )
    parser.add_argument("--prompts", type=int, default=64)
    parser.add_argument("--prompt_len", type=int, default=128)
    parser.add_argument("--new_tokens", type=int, default=64)
    parser.add_argument("--samples", type=int, default=1, help="G samples per prompt (online RL)")
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--profile", action="store_true", help="also print the top ops of our sample call")
    args = parser.parse_args(argv)

    config = common.get_preset(args.preset).model
    generated = args.prompts * args.samples * args.new_tokens
    results = [time_ours(args, config)]
    if args.samples > 1:  # the A/B of the shared prompt cache, in the same run
        results.append(time_ours(args, config, shared_prefix=False))
    if args.compare == "torch":
        results.append(time_torch(args, config))
    for r in results:
        r["tokens_per_s"] = generated / r["seconds"]
        r["ms_per_new_token_step"] = 1e3 * r["seconds"] / args.new_tokens
    ours = results[0]["tokens_per_s"]
    torch_rows = [r for r in results if r["framework"] == "torch"]
    ratio = ours / torch_rows[0]["tokens_per_s"] if torch_rows else None

    print(
        f"sampling: preset={args.preset} prompts={args.prompts} samples={args.samples} "
        f"prompt_len={args.prompt_len} new_tokens={args.new_tokens} temperature=0.7 top_k=40 runs={args.runs}"
    )
    common.print_table(results, ["framework", "seconds", "ms_per_new_token_step", "tokens_per_s"])
    if args.profile:
        print("\nour sample call, top ops (ms per call, summed over threads):")
        common.print_table(results[0]["profile"], ["op", "ms", "calls", "shape", "source"])
    common.write_json(
        (f"bench_results/sample_{args.preset}" + (f"_g{args.samples}" if args.samples > 1 else "") + ".json")
        if args.json is None
        else args.json,
        {
            "benchmark": "sample",
            "preset": args.preset,
            "workload": {
                "prompts": args.prompts, "samples": args.samples, "prompt_len": args.prompt_len,
                "new_tokens": args.new_tokens,
                "temperature": 0.7, "top_k": 40, "runs": args.runs,
            },
            "machine": common.machine(),
            "results": results,
            "tokens_per_s": ours,
            "ratio_vs_torch": ratio,
        },
    )  # fmt: skip
    print(common.summary_line(ours, None, ratio))
    return 0


if __name__ == "__main__":
    sys.exit(main())
