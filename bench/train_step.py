"""Seconds per DPO optimizer step, tokens/s and MFU; optionally side by side with PyTorch and TRL.

    python -m bench.train_step --preset=small [--compare=torch,trl] [--reference=online|precomputed]
        [--loss=dpo] [--dtype=float32|bfloat16] [--iters=5] [--profile] [--json=PATH]
        [--attention_impl=xla|cpu_ffi|...] [--no-isolate]

Ours is the library's step (`rlhf_jax.train.steps.train_step` with `preference_objective`, built by
`bench.common.jax_dpo_step` with the trainer core, `rlhf_jax.train.trainer.make_train_step`, as the
preference stage builds it): one concatenated forward of chosen and rejected, the reference forward
without gradient (or precomputed log-probs), AdamW with clipping at global norm 1. The batch is
`bench.common.make_batch`: every token real, the loss mask on the response.

`--compare=torch` times the same step hand-written in PyTorch, as well as we would write our own:
`transformers.LlamaForCausalLM` policy and a frozen copy as reference (SDPA attention), float32, no
autocast, `torch.set_num_threads(cores)`, one concatenated forward, `torch.no_grad()` reference,
`torch.optim.AdamW(fused=True)`, `clip_grad_norm_`. Two variants: "torch" computes the LM head on every
position and gathers the targets' log-probs from `log_softmax` (what a plain DPO step does);
"torch-masked" gathers the loss-masked hidden states first and computes the LM head and log-softmax on
those rows only, the trick our step uses. The ratio is against the faster of the two. `--compare=trl`
times TRL's `DPOTrainer` on the same model, data and optimizer settings (float32, no gradient
checkpointing), from the gaps between its `on_step_end` callbacks.

With `--compare`, each implementation is timed in its own fresh process (`--only=NAME`, one after the
other, each with its own warm-up), so no framework's idle worker threads or allocator state share the
cores with another's step: on the 2-core AMD EPYC machine of 2026-12-04 the PyTorch steps in the same
process slowed ours by a third (CPU seconds per step 15 → 23 for the same work) and plain PyTorch's by
12-30% (`medium`: 407-508 tokens/s in one process, 581 alone). `--no-isolate` times them in this process
in turns instead, one step each (drift hits all alike, the interference too).

Tokens/s counts every token through the policy (2 x pairs x (prompt + response)). FLOPs per step are
`bench.common.flops_per_step` (2BT(8N + 16LAT) with the reference forward, 2BT(6N + 12LAT) without),
the same for every implementation, so their GFLOP/s compare like tokens/s. MFU divides by the dense
matmul peak of `bench.peak`, measured in the same run. The last line is
`tokens_per_s=<ours> mfu=<ours> ratio_vs_torch=<ours/torch or na>`.

`--attention_impl` sets `ModelConfig.attention_impl` of our step only (the PyTorch and TRL steps keep
SDPA): e.g. `cpu_ffi` times the optional native CPU attention kernel (build it first with
`python -m rlhf_jax.kernels.build`), `xla` JAX's attention; default: the preset's (None).
"""

from __future__ import annotations

import argparse
import copy
import os
import sys

from bench import common, peak
from rlhf_jax.models.config import ATTENTION_IMPLS

# ----------------------------------------------------------------------------------------------------
# PyTorch.


def _torch_batch(p: common.BenchPreset):
    """The benchmark batch as torch tensors, chosen and rejected concatenated to 2B rows."""
    import numpy as np
    import torch

    b = common.make_batch(p)
    cat = lambda k: torch.from_numpy(np.concatenate([b[f"chosen_{k}"], b[f"rejected_{k}"]]))
    return cat("tokens").long(), cat("targets").long(), cat("loss_mask").bool()


def _torch_sequence_logps(model, tokens_BT, targets_BT, mask_BT, *, masked_rows: bool):
    """Summed log-probs of the masked targets: [B]. With `masked_rows` only those rows reach the LM head."""
    import torch

    if not masked_rows:
        logits_BTV = model(input_ids=tokens_BT, use_cache=False).logits
        logps_BT = torch.gather(logits_BTV.log_softmax(-1), 2, targets_BT[..., None])[..., 0]
        return (logps_BT * mask_BT).sum(-1)
    hidden_BTD = model.model(input_ids=tokens_BT, use_cache=False).last_hidden_state
    logits_RV = model.lm_head(hidden_BTD[mask_BT])
    logps_R = torch.gather(logits_RV.log_softmax(-1), 1, targets_BT[mask_BT][:, None])[:, 0]
    rows_R = torch.nonzero(mask_BT, as_tuple=True)[0]
    return torch.zeros(tokens_BT.shape[0], dtype=logps_R.dtype).index_add_(0, rows_R, logps_R)


class TorchDPO:
    """A plain PyTorch DPO step on `transformers.LlamaForCausalLM` (module docstring)."""

    def __init__(self, p: common.BenchPreset, *, reference: str, masked_rows: bool, beta: float = 0.1):
        import torch
        import transformers

        torch.manual_seed(0)
        torch.set_num_threads(common.cores())
        self.policy = transformers.LlamaForCausalLM(common.hf_llama_config(p.model)).float().train()
        self.reference = copy.deepcopy(self.policy).eval().requires_grad_(False)
        cfg = common.optim_config()
        self.opt = torch.optim.AdamW(
            self.policy.parameters(), lr=cfg.learning_rate, betas=(cfg.b1, cfg.b2), eps=cfg.eps,
            weight_decay=cfg.weight_decay, fused=True,
        )  # fmt: skip
        self.tokens, self.targets, self.mask = _torch_batch(p)
        self.beta, self.masked_rows = beta, masked_rows
        self.ref_logps = None
        if reference == "precomputed":
            with torch.no_grad():
                self.ref_logps = self._logps(self.reference)

    def _logps(self, model):
        return _torch_sequence_logps(
            model, self.tokens, self.targets, self.mask, masked_rows=self.masked_rows
        )

    def step(self) -> float:
        import torch
        from torch.nn import functional

        if self.ref_logps is None:
            with torch.no_grad():
                ref_logps = self._logps(self.reference)
        else:
            ref_logps = self.ref_logps
        chosen, rejected = self._logps(self.policy).chunk(2)
        ref_chosen, ref_rejected = ref_logps.chunk(2)
        loss = -functional.logsigmoid(self.beta * ((chosen - ref_chosen) - (rejected - ref_rejected))).mean()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(self.policy.parameters(), common.optim_config().grad_clip_norm)
        self.opt.step()
        self.opt.zero_grad(set_to_none=True)
        return float(loss.detach())


# ----------------------------------------------------------------------------------------------------
# TRL.


def _trl_tokenizer(vocab: int):
    """A word-level tokenizer whose words are token ids ("w17" -> 17), so TRL sees our exact sequences."""
    import tokenizers
    import transformers

    words = {"<pad>": 0, "<eos>": 1, "<bos>": 2, **{f"w{i}": i for i in range(3, vocab)}}
    tok = tokenizers.Tokenizer(tokenizers.models.WordLevel(words, unk_token="<pad>"))
    tok.pre_tokenizer = tokenizers.pre_tokenizers.WhitespaceSplit()
    return transformers.PreTrainedTokenizerFast(
        tokenizer_object=tok, pad_token="<pad>", eos_token="<eos>", bos_token="<bos>"
    )


def _no_checkpointing() -> dict:
    """Activation checkpointing off, under the argument name of the installed transformers."""
    import dataclasses

    import trl

    names = {f.name for f in dataclasses.fields(trl.DPOConfig)}
    return {
        "activation_checkpointing" if "activation_checkpointing" in names else "gradient_checkpointing": False
    }


def time_trl(p: common.BenchPreset, *, reference: str, warmup: int, iters: int) -> list[float]:
    """Seconds per step of TRL's `DPOTrainer` (float32, no gradient checkpointing), after `warmup` steps."""
    import contextlib
    import io
    import tempfile
    import time

    import datasets
    import torch
    import transformers
    import trl

    datasets.disable_progress_bars()
    torch.manual_seed(0)
    torch.set_num_threads(common.cores())
    b = common.make_batch(p)
    text = lambda ids: " ".join(f"w{i}" for i in ids)
    steps = warmup + iters
    rows = {"prompt": [], "chosen": [], "rejected": []}
    for _ in range(steps):  # one batch per step; TRL appends EOS to each response, so drop its last token
        for i in range(p.pairs):
            rows["prompt"].append(text(b["chosen_tokens"][i, : p.prompt_len]))
            rows["chosen"].append(" " + text(b["chosen_tokens"][i, p.prompt_len : -1]))
            rows["rejected"].append(" " + text(b["rejected_tokens"][i, p.prompt_len : -1]))
    model = transformers.LlamaForCausalLM(common.hf_llama_config(p.model)).float()
    cfg = common.optim_config()
    ends = []

    class StepTimes(transformers.TrainerCallback):
        def on_step_end(self, args, state, control, **kwargs):
            ends.append(time.perf_counter())

    with tempfile.TemporaryDirectory() as out:
        args = trl.DPOConfig(
            output_dir=out, per_device_train_batch_size=p.pairs, max_length=p.seq_len, max_steps=steps,
            learning_rate=cfg.learning_rate, lr_scheduler_type="constant", weight_decay=cfg.weight_decay,
            max_grad_norm=cfg.grad_clip_norm, adam_beta1=cfg.b1, adam_beta2=cfg.b2, adam_epsilon=cfg.eps,
            beta=0.1, bf16=False, fp16=False, use_cpu=True, report_to=[], **_no_checkpointing(),
            logging_steps=10_000, save_strategy="no", dataloader_num_workers=0, seed=0,
            precompute_ref_log_probs=reference == "precomputed", disable_tqdm=True,
        )  # fmt: skip
        ref_model = None if reference == "precomputed" else copy.deepcopy(model).eval().requires_grad_(False)
        trainer = trl.DPOTrainer(
            model=model, ref_model=ref_model, args=args, train_dataset=datasets.Dataset.from_dict(rows),
            processing_class=_trl_tokenizer(p.model.vocab_size), callbacks=[StepTimes()],
        )  # fmt: skip
        batch = next(iter(trainer.get_train_dataloader()))
        if tuple(batch["input_ids"].shape) != (2 * p.pairs, p.seq_len):
            raise RuntimeError(f"TRL batch {tuple(batch['input_ids'].shape)} is not the benchmark's")
        with contextlib.redirect_stdout(io.StringIO()):  # its end-of-training metrics dict
            trainer.train()
    gaps = [b - a for a, b in zip(ends[:-1], ends[1:], strict=True)]
    return gaps[warmup - 1 :] if warmup > 0 else gaps


# ----------------------------------------------------------------------------------------------------
# The benchmark.


def _row(name, p, times, cpu_times, flops, peak_gflops):
    med = common.median(times)
    gflops = flops / med / 1e9
    return {
        "impl": name, "s/step": med, "cpu s/step": common.median(cpu_times) if cpu_times else None,
        "tokens/s": p.tokens_per_step / med, "GFLOP/step": flops / 1e9, "GFLOP/s": gflops,
        "MFU": gflops / peak_gflops if peak_gflops else None, "times": times, "cpu_times": cpu_times,
    }  # fmt: skip


# Implementations by their `--only` name, in the order of the table.
IMPLS = {"ours": "ours (jax)", "torch": "torch", "torch-masked": "torch-masked", "trl": "trl DPOTrainer"}


def _time_in_process(p, names, *, loss, reference, warmup, iters, profile):
    """{name: step seconds}, {name: CPU seconds or None} and our step's profile (or None) for the
    implementations `names` (IMPLS keys), all in this process: warmed up, then timed in turns, one step
    each, so machine drift hits all alike; TRL after them (its trainer runs its own loop)."""
    import time

    runners = {}
    if "ours" in names:
        runners["ours"] = common.JaxRunner(common.jax_dpo_step(p, loss=loss, reference=reference))
    for name, masked in (("torch", False), ("torch-masked", True)):
        if name in names:
            runners[name] = TorchDPO(p, reference=reference, masked_rows=masked).step
    for fn in runners.values():
        for _ in range(warmup):
            fn()
    times = {k: [] for k in runners}
    cpu = {k: [] for k in runners}
    for _ in range(iters):
        for name, fn in runners.items():
            w, c = time.perf_counter(), time.process_time()
            fn()
            times[name].append(time.perf_counter() - w)
            cpu[name].append(time.process_time() - c)
    if "trl" in names:
        times["trl"], cpu["trl"] = time_trl(p, reference=reference, warmup=warmup, iters=iters), None
    return times, cpu, (runners["ours"].profile() if profile and "ours" in runners else None)


def _time_isolated(names, child_args, *, profile):
    """As `_time_in_process`, each implementation in its own fresh process (`--only=NAME`), one after
    the other: no framework's idle worker threads or allocator state share the cores with another's
    step. On the 2-core AMD EPYC machine of 2026-12-04, PyTorch's steps in the same process slowed our
    step by a third (CPU seconds per step up from 15 to 23 at the same work)."""
    import json
    import os
    import subprocess
    import tempfile

    times, cpu, prof, pids = {}, {}, None, {}
    with tempfile.TemporaryDirectory() as tmp:
        for name in names:
            path = os.path.join(tmp, f"{name}.json")
            extra = ["--profile"] if profile and name == "ours" else []
            cmd = [sys.executable, "-m", "bench.train_step", *child_args, f"--only={name}", f"--json={path}"]
            cmd += extra
            done = subprocess.run(cmd, capture_output=True, text=True, check=False)
            if done.returncode != 0:
                tail = done.stdout[-2000:] + done.stderr[-4000:]
                raise RuntimeError(f"bench.train_step --only={name} failed:\n{tail}")
            with open(path, encoding="utf-8") as f:
                child = json.load(f)
            row = child["rows"][0]
            times[name], cpu[name], pids[name] = row["times"], row.get("cpu_times"), child["pid"]
            prof = child.get("profile", prof)
    return times, cpu, prof, pids


def run(
    preset: str = "small",
    *,
    loss: str = "dpo",
    reference: str = "online",
    dtype: str = "float32",
    compare: tuple[str, ...] = (),
    warmup: int = 2,
    iters: int = 5,
    layers: int | None = None,
    profile: bool = False,
    peak_sizes: tuple[int, ...] = peak.DEFAULT_SIZES,
    attention_impl: str | None = None,
    isolate: bool = True,
    only: str | None = None,
) -> dict:
    """Runs the benchmark; returns the JSON record (rows, peak, machine, settings).

    `isolate` (with `compare`): each implementation timed in its own process (`_time_isolated`);
    otherwise all in this one, in turns. `only`: time just that implementation (an IMPLS key), here."""
    overrides = {} if attention_impl is None else {"attention_impl": attention_impl}
    p = common.get_preset(preset, layers=layers, dtype=dtype, **overrides)
    flops = common.flops_per_step(p, reference_forward=reference == "online")
    if (compare or (only not in (None, "ours"))) and (loss != "dpo" or dtype != "float32"):
        raise ValueError("--compare runs DPO in float32 only (the PyTorch steps are written for that)")
    if only is not None and only not in IMPLS:
        raise ValueError(f"--only={only}: choose from {sorted(IMPLS)}")
    names = [only] if only else ["ours", *(("torch", "torch-masked") if "torch" in compare else ())]
    names += ["trl"] if "trl" in compare and not only else []
    if isolate and len(names) > 1:
        child_args = [f"--preset={preset}", f"--loss={loss}", f"--reference={reference}", f"--dtype={dtype}",
                      f"--warmup={warmup}", f"--iters={iters}", "--peak-sizes="]  # fmt: skip
        child_args += [f"--layers={layers}"] if layers is not None else []
        child_args += [f"--attention_impl={attention_impl}"] if attention_impl is not None else []
        times, cpu, prof, pids = _time_isolated(names, child_args, profile=profile)
    else:
        pids = dict.fromkeys(names, os.getpid())
        times, cpu, prof = _time_in_process(
            p, names, loss=loss, reference=reference, warmup=warmup, iters=iters, profile=profile
        )
    # The peak after the steps, in this process: a child's matmuls do not overlap it.
    peak_gflops = (
        peak.measure("bfloat16" if dtype == "bfloat16" else "float32", peak_sizes)["peak_gflops"]
        if peak_sizes else None
    )  # fmt: skip
    rows = [_row(IMPLS[n], p, times[n], cpu[n], flops, peak_gflops) for n in names]
    ours_tps = rows[0]["tokens/s"]
    for r in rows:
        r["ours/this"] = ours_tps / r["tokens/s"]
    torch_rows = [r for r in rows if r["impl"].startswith("torch")]
    record = {
        "benchmark": "train_step",
        "preset": preset,
        "loss": loss,
        "reference": reference,
        "dtype": dtype,
        "attention_impl": p.model.attention_impl,
        "pairs": p.pairs,
        "seq_len": p.seq_len,
        "tokens_per_step": p.tokens_per_step,
        "flops_per_step": flops,
        "flops_formula": "2BT(8N+16LAT)" if reference == "online" else "2BT(6N+12LAT)",
        "matmul_params": common.matmul_params(p.model),
        "peak_gflops": peak_gflops,
        "rows": rows,
        "tokens_per_s": ours_tps,
        "mfu": rows[0]["MFU"],
        "ratio_vs_torch": ours_tps / max(r["tokens/s"] for r in torch_rows) if torch_rows else None,
        "ratio_vs_trl": next((r["ours/this"] for r in rows if r["impl"].startswith("trl")), None),
        "isolated": bool(isolate and len(names) > 1),
        "pid": os.getpid(),
        "pids": pids,  # the process that timed each implementation
        "machine": common.machine(),
    }
    if prof is not None:
        record["profile"] = prof
    return record


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--preset", default="small", choices=sorted(common.PRESETS))
    ap.add_argument("--loss", default="dpo")
    ap.add_argument("--reference", default="online", choices=["online", "precomputed"])
    ap.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    ap.add_argument("--compare", default="", help="comma-separated: torch, trl")
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--iters", type=int, default=5)
    ap.add_argument("--layers", type=int, default=None, help="override the preset's layer count")
    ap.add_argument("--profile", action="store_true", help="also print our step's top ops")
    ap.add_argument(
        "--peak-sizes", default=",".join(map(str, peak.DEFAULT_SIZES)), help="see bench.peak; '' for none"
    )
    ap.add_argument(
        "--no-isolate", action="store_true",
        help="with --compare, time every implementation in this one process, in turns (default: each in "
        "its own process, one after the other)",
    )  # fmt: skip
    ap.add_argument("--only", default=None, choices=sorted(IMPLS), help=argparse.SUPPRESS)
    ap.add_argument(
        "--attention_impl",
        default=None,
        choices=[i for i in ATTENTION_IMPLS if i is not None],
        help="our step's ModelConfig.attention_impl (default: the preset's); cpu_ffi needs "
        "`python -m rlhf_jax.kernels.build` first",
    )
    ap.add_argument(
        "--json", default=None, help="default bench_results/train_step_<preset>.json; '' for none"
    )
    args = ap.parse_args(argv)
    compare = tuple(c for c in args.compare.split(",") if c)
    if unknown := set(compare) - {"torch", "trl"}:
        ap.error(f"unknown --compare {sorted(unknown)}")
    record = run(
        args.preset, loss=args.loss, reference=args.reference, dtype=args.dtype, compare=compare,
        warmup=args.warmup, iters=args.iters, layers=args.layers, profile=args.profile,
        peak_sizes=tuple(int(n) for n in args.peak_sizes.split(",") if n), attention_impl=args.attention_impl,
        isolate=not args.no_isolate, only=args.only,
    )  # fmt: skip
    print(
        f"preset={args.preset} loss={args.loss} reference={args.reference} dtype={args.dtype} "
        f"attention_impl={record['attention_impl']} "
        f"pairs={record['pairs']} T={record['seq_len']} N={record['matmul_params']:,} "
        f"FLOPs/step={record['flops_per_step']:.4g} ({record['flops_formula']}) "
        f"peak={record['peak_gflops'] or 0:.1f} GFLOP/s"
    )
    columns = ["impl", "s/step", "cpu s/step", "tokens/s", "GFLOP/s", "MFU", "ours/this"]
    common.print_table(record["rows"], columns)
    if args.profile:
        print("\nour step, top ops (ms per step, summed over threads):")
        common.print_table(record["profile"], ["op", "ms", "calls", "shape", "source"])
    common.write_json(
        f"bench_results/train_step_{args.preset}.json" if args.json is None else args.json, record
    )
    print(common.summary_line(record["tokens_per_s"], record["mfu"], record["ratio_vs_torch"]))
    return record


if __name__ == "__main__":
    sys.exit(main() and 0)
