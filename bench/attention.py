"""Causal attention alone, forward and forward + backward, per implementation: ms per call and GFLOP/s.

    python -m bench.attention [--shape=B,T,H,G,K] [--impls=blockwise,xla,cpu_ffi,torch] [--iters=5]
                              [--json=PATH]

The default shape is the `medium` preset's attention in one DPO step's policy pass (8 rows of T = 512,
8 heads of K = 64, one kv head per head). Implementations: `blockwise` (`layers.causal_attention`, the
CPU default, `attention_impl=None`), `xla` (`jax.nn.dot_product_attention`, `attention_impl="xla"`),
`cpu_ffi` (the optional native kernel, `attention_impl="cpu_ffi"`; built first with `python -m
rlhf_jax.kernels.build`, skipped with a message when it is not) and `torch`
(`torch.nn.functional.scaled_dot_product_attention(is_causal=True)`, PyTorch's fused CPU kernel, the
attention of the plain PyTorch step in `bench.train_step`). Inputs are float32 normal draws, one sequence
per row; the backward is the gradient of sum(out * w) for a fixed random w. FLOPs count the causal half:
forward 2 · 2 · B · H · K · T (T + 1) / 2 (scores and values), backward 2.5 times that (five products
of the same size, the scores recomputed). Each row also gives the largest difference of its output from
the first implementation's (a wrong kernel is not timed silently). Timings are medians after two
warm-up calls; compare rows of one run only (bench/README.md).
"""

from __future__ import annotations

import argparse
import sys

import numpy as np

from bench import common


def _flops(B, T, H, K) -> float:
    return 4.0 * B * H * K * T * (T + 1) / 2


def _jax_seconds(impl: str, q, k, v, w, iters: int) -> tuple[float, float, np.ndarray]:
    import jax
    import jax.numpy as jnp

    from rlhf_jax.kernels import cpu_attention
    from rlhf_jax.models import layers

    B, T, H, _ = q.shape
    scale = q.shape[-1] ** -0.5
    seg_BT = jnp.ones((B, T), jnp.int32)
    mask = (seg_BT[:, :, None] == seg_BT[:, None, :])[:, None]
    block = layers.attention_block(T)
    fns = {
        "blockwise": lambda q, k, v: layers.causal_attention(q, k, v, mask, block, scale),
        "xla": lambda q, k, v: jax.nn.dot_product_attention(q, k, v, scale=scale, is_causal=True),
        "cpu_ffi": lambda q, k, v: cpu_attention.attention(q, k, v, seg_BT, scale),
    }
    f = fns[impl]
    fwd = jax.jit(f)
    grad = jax.jit(jax.grad(lambda q, k, v: jnp.sum(f(q, k, v) * w), argnums=(0, 1, 2)))
    t_fwd = common.time_calls(lambda: fwd(q, k, v).block_until_ready(), warmup=2, iters=iters)
    t_bwd = common.time_calls(lambda: jax.block_until_ready(grad(q, k, v)), warmup=2, iters=iters)
    return common.median(t_fwd), common.median(t_bwd), np.asarray(fwd(q, k, v))


def _torch_seconds(q, k, v, w, iters: int) -> tuple[float, float, np.ndarray]:
    import torch
    import torch.nn.functional as F  # noqa: N812

    torch.set_num_threads(common.cores())
    Q = q.shape[2] // k.shape[2]
    # [B, T, H, K] -> [B, H, T, K]; kv heads repeated to the query heads (GQA as the PyTorch step does).
    tq = torch.from_numpy(np.array(q)).transpose(1, 2).contiguous().requires_grad_()
    tk = torch.from_numpy(np.repeat(np.array(k), Q, axis=2)).transpose(1, 2).contiguous().requires_grad_()
    tv = torch.from_numpy(np.repeat(np.array(v), Q, axis=2)).transpose(1, 2).contiguous().requires_grad_()
    tw = torch.from_numpy(np.array(w)).transpose(1, 2).contiguous()

    def fwd():
        with torch.no_grad():
            F.scaled_dot_product_attention(tq, tk, tv, is_causal=True)

    def fwd_bwd():
        out = F.scaled_dot_product_attention(tq, tk, tv, is_causal=True)
        torch.autograd.grad((out * tw).sum(), (tq, tk, tv))

    t_fwd = common.time_calls(fwd, warmup=2, iters=iters)
    t_bwd = common.time_calls(fwd_bwd, warmup=2, iters=iters)
    with torch.no_grad():
        out = F.scaled_dot_product_attention(tq, tk, tv, is_causal=True).transpose(1, 2).numpy()
    return common.median(t_fwd), common.median(t_bwd), out


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--shape", default="8,512,8,8,64", help="B,T,H,G,K (rows, length, heads, kv heads, size)")
    ap.add_argument("--impls", default="blockwise,xla,cpu_ffi,torch")
    ap.add_argument("--iters", type=int, default=5)
    ap.add_argument("--json", default="bench_results/attention.json")
    args = ap.parse_args(argv)
    B, T, H, G, K = (int(x) for x in args.shape.split(","))
    if H % G:
        raise SystemExit(f"--shape: kv heads G={G} must divide heads H={H}")
    impls = [s for s in args.impls.split(",") if s]
    unknown = sorted(set(impls) - {"blockwise", "xla", "cpu_ffi", "torch"})
    if unknown:
        raise SystemExit(f"--impls: unknown {unknown}; choose from blockwise, xla, cpu_ffi, torch")

    import jax.numpy as jnp

    rng = np.random.default_rng(0)
    shapes = ((B, T, H, K), (B, T, G, K), (B, T, G, K), (B, T, H, K))
    q, k, v, w = (jnp.asarray(rng.normal(size=s), jnp.float32) for s in shapes)
    flops = _flops(B, T, H, K)
    rows, reference = [], None
    for impl in impls:
        if impl == "cpu_ffi":
            from rlhf_jax.kernels import cpu_attention

            if not cpu_attention.available():
                print("cpu_ffi: skipped, the kernel is not built (python -m rlhf_jax.kernels.build)")
                continue
        if impl == "torch":
            t_fwd, t_both, out = _torch_seconds(q, k, v, w, args.iters)
        else:
            t_fwd, t_both, out = _jax_seconds(impl, q, k, v, w, args.iters)
        if reference is None:
            reference = out
        rows.append({
            "impl": impl, "fwd ms": 1e3 * t_fwd, "fwd GFLOP/s": flops / t_fwd / 1e9,
            "fwd+bwd ms": 1e3 * t_both, "fwd+bwd GFLOP/s": 3.5 * flops / t_both / 1e9,
            "max |out - first|": float(np.max(np.abs(out - reference))),
        })  # fmt: skip
    columns = ["impl", "fwd ms", "fwd GFLOP/s", "fwd+bwd ms", "fwd+bwd GFLOP/s", "max |out - first|"]
    common.print_table(rows, columns)
    record = {"machine": common.machine(), "shape": {"B": B, "T": T, "H": H, "G": G, "K": K}, "results": rows}
    common.write_json(args.json, record)
    return record


if __name__ == "__main__":
    sys.exit(main() and 0)
