"""One GRPO iteration, ours against TRL's `GRPOTrainer`: generation and training timed apart.

    python -m bench.grpo_step --preset=small [--compare=trl,torch] [--old_logps] [--iters=3] [--warmup=1]
        [--json=PATH]

The workload (issue 16's): `--prompts` (8) prompts of the preset's prompt length (128 random tokens for
`small`), `--group` (8) samples of each, `--new_tokens` (64) new tokens per sample at temperature 1 with
no top-k and no early stop, float32, the preset's model, then one optimizer step (AdamW, clip at norm 1)
of the GRPO loss (token-mean "dapo" aggregation, ε = 0.2, β = 0, μ = 1) over all P·G rows in one
mini-batch. Rewards are random numbers (no reward model), so both sides time the loop, not a reward.

Ours: exactly what `rlhf_jax.pipelines.grpo.run` does per iteration, with its own functions.
  generation = `sampling.sample` (KV cache, one key per (prompt, sample), summing the logged entropy
               as it samples: `GRPOConfig.sampling()`), the samples to the host,
               `scoring.completions_to_batch`, group advantages; no old log-probs forward: with one
               optimizer step per iteration the loop lets the step use its own log-probs (the ratio
               is 1), as TRL does at μ = 1 (`--old_logps` computes them as the loop does at μ > 1);
  training   = the mini-batch placed on device and one jitted step of `steps.policy_gradient_objective`
               (`training.setup`, as the loop builds it: `entropy=False`, the entropy is the sampler's).
TRL: `GRPOTrainer` with `per_device_train_batch_size` = P·G, `steps_per_generation` = 1 (one generation
of P·G completions and one optimizer step per iteration), `num_iterations` = 1, `beta` = 0,
`loss_type="dapo"`, transformers generation (`use_vllm=False`, KV cache on, `min_new_tokens` =
`max_completion_length`), no activation checkpointing, the same Llama architecture (random init).
  generation = its `_generate_and_score_completions` (generate, decode, rewards, advantages; with
               μ = 1 and one step per generation TRL skips the old log-probs forward);
  training   = the rest of its optimizer step (forward, backward, clip, AdamW).
Torch (`--compare=torch`): the same iteration hand-written in PyTorch, as well as we would write it
ourselves, on `transformers.LlamaForCausalLM` (SDPA attention, float32, `torch.set_num_threads(cores)`):
  generation = `model.generate` under `torch.inference_mode()` with `num_return_sequences` = G (each
               prompt's cache prefilled once and expanded to its G rows), the same sampling settings and
               `min_new_tokens` = `max_new_tokens`, group advantages in torch; no old log-probs forward
               (at μ = 1 the ratio is exp(log π − sg(log π)), as TRL does);
  training   = one forward of the P·G rows, the LM head and log-softmax on the completion positions only
               (the trick our step uses), the token-mean clipped surrogate, backward, `clip_grad_norm_`,
               `torch.optim.AdamW(fused=True)`.
TRL's prompts are our token ids through a word-level tokenizer ("w17" -> 17, `bench.train_step`), and
its batch shape is checked against ours. The median over `--iters` timed iterations after `--warmup`
(which compiles ours) is reported; ours and TRL's run one after the other, so compare rows of one run.

Throughputs: gen_tok_s = P·G·new_tokens / generation seconds; train_tok_s = P·G·(prompt + new tokens) /
training seconds (every row's tokens go through the forward and backward). The last line is
`iter_s=<ours> gen_tok_s=<ours> train_tok_s=<ours> ratio_vs_trl=<TRL iter_s / ours, or na>
ratio_vs_torch=<torch iter_s / ours, or na>`.
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import sys
import time

import numpy as np

from bench import common


@dataclasses.dataclass(frozen=True)
class Workload:
    prompts: int
    group: int
    prompt_len: int
    new_tokens: int

    @property
    def rows(self) -> int:
        return self.prompts * self.group

    @property
    def generated_tokens(self) -> int:
        return self.rows * self.new_tokens

    @property
    def trained_tokens(self) -> int:
        return self.rows * (self.prompt_len + self.new_tokens)


def _prompts(w: Workload, vocab: int, iteration: int) -> np.ndarray:
    # Token ids from 3 up: clear of pad (0), eos (1) and bos (2).
    return np.random.default_rng([0, iteration]).integers(3, vocab, (w.prompts, w.prompt_len), dtype=np.int32)


def _row(name: str, w: Workload, gen: list[float], train: list[float]) -> dict:
    g, t = common.median(gen), common.median(train)
    it = common.median([a + b for a, b in zip(gen, train, strict=True)])
    return {
        "impl": name, "iter_s": it, "gen_s": g, "train_s": t, "gen_tok_s": w.generated_tokens / g,
        "train_tok_s": w.trained_tokens / t, "gen_times": gen, "train_times": train,
    }  # fmt: skip


# ----------------------------------------------------------------------------------------------------
# Ours.


def time_ours(
    p: common.BenchPreset, w: Workload, *, warmup: int, iters: int, old_logps: bool = False
) -> dict:
    """Generation and training seconds of `warmup + iters` iterations of our loop's steps; the first
    `warmup` are dropped."""
    import jax

    from rlhf_jax import losses, models, sampling, scoring, sharding
    from rlhf_jax.pipelines import config as pipeline_config
    from rlhf_jax.pipelines import grpo, training
    from rlhf_jax.train import steps

    mesh = sharding.make_mesh(sharding.MeshConfig())
    model = models.Transformer(p.model, mesh=mesh)
    params = models.init_params(model, jax.random.key(0))
    g = grpo.GRPOConfig(
        num_prompts=w.prompts, group_size=w.group, max_new_tokens=w.new_tokens, temperature=1.0
    )
    objective = functools.partial(
        steps.policy_gradient_objective, model=model, temperature=g.temperature, aggregation=g.aggregation,
        loss_kwargs=g.loss_kwargs(), max_length=g.max_new_tokens, entropy=False,
    )  # fmt: skip
    train_cfg = pipeline_config.TrainConfig(steps=warmup + iters, batch_size=w.rows)
    step_fn, state = training.setup(
        common.optim_config(), train_cfg, seed=0, mesh=mesh, model=model, params=params, objective=objective,
        weight_fn=lambda batch: np.float32(1.0),
    )  # fmt: skip
    del params
    lengths_P = np.full((w.prompts,), w.prompt_len, np.int32)
    gen, train = [], []
    for it in range(warmup + iters):
        prompts_PT = _prompts(w, p.model.vocab_size, it)
        t0 = time.perf_counter()
        out = sampling.sample(
            model, state.params, prompts_PT, lengths_P, config=g.sampling(), num_samples=w.group,
            rng=jax.random.fold_in(jax.random.key(31), it), eos_id=None, pad_id=0,
            prompt_ids=np.arange(w.prompts),
        )  # fmt: skip
        if out.tokens_PNT.shape != (w.prompts, w.group, w.new_tokens):
            raise RuntimeError(f"our samples {out.tokens_PNT.shape} are not the benchmark's")
        rows = scoring.completions_to_batch(prompts_PT, lengths_P, out.tokens_PNT, out.lengths_PN, pad_id=0)
        rewards_PG = np.random.default_rng(it).random((w.prompts, w.group), dtype=np.float32)
        rows["advantages"] = np.asarray(losses.group_advantages(rewards_PG=rewards_PG), np.float32).reshape(
            -1
        )
        if old_logps:
            rows["old_logps"] = grpo.rows_logps(
                model, state.params, rows, temperature=g.temperature, mesh=mesh, batch_size=w.rows
            )
        t1 = time.perf_counter()
        batch = sharding.shard_batch(grpo.minibatch(rows, np.arange(w.rows)), mesh)
        state, metrics = step_fn(state, batch, None)
        jax.block_until_ready((state, metrics))
        t2 = time.perf_counter()
        if it >= warmup:
            gen.append(t1 - t0)
            train.append(t2 - t1)
    return _row("ours (jax)", w, gen, train)


# ----------------------------------------------------------------------------------------------------
# TRL.


def time_trl(p: common.BenchPreset, w: Workload, *, warmup: int, iters: int) -> dict:
    """Generation and training seconds of TRL `GRPOTrainer` iterations (module docstring)."""
    import contextlib
    import io
    import tempfile

    import datasets
    import torch
    import transformers
    import trl

    from bench import train_step

    datasets.disable_progress_bars()
    torch.manual_seed(0)
    torch.set_num_threads(common.cores())
    text = lambda ids: " ".join(f"w{i}" for i in ids)  # noqa: E731
    steps = warmup + iters
    prompts = [text(row) for it in range(steps) for row in _prompts(w, p.model.vocab_size, it)]
    hf_config = common.hf_llama_config(p.model)
    hf_config.use_cache = True  # generation with the KV cache, as ours
    model = transformers.LlamaForCausalLM(hf_config).float()
    cfg = common.optim_config()
    begins, ends, gen_s, shapes = [], [], [], []

    class StepTimes(transformers.TrainerCallback):
        def on_step_begin(self, args, state, control, **kwargs):
            begins.append(time.perf_counter())

        def on_step_end(self, args, state, control, **kwargs):
            ends.append(time.perf_counter())

    def reward(completions, **kwargs):
        return list(np.random.default_rng(len(gen_s)).random(len(completions)))

    with tempfile.TemporaryDirectory() as out:
        args = trl.GRPOConfig(
            output_dir=out, per_device_train_batch_size=w.rows, steps_per_generation=1,
            num_generations=w.group, max_completion_length=w.new_tokens, num_iterations=1, beta=0.0,
            loss_type="dapo", epsilon=0.2,
            temperature=1.0, top_k=0, top_p=1.0, use_vllm=False, max_steps=steps,
            generation_kwargs={"min_new_tokens": w.new_tokens, "use_cache": True},
            learning_rate=cfg.learning_rate, lr_scheduler_type="constant", weight_decay=cfg.weight_decay,
            max_grad_norm=cfg.grad_clip_norm, adam_beta1=cfg.b1, adam_beta2=cfg.b2, adam_epsilon=cfg.eps,
            bf16=False, fp16=False, use_cpu=True, report_to=[], logging_steps=10_000, save_strategy="no",
            dataloader_num_workers=0, seed=0, disable_tqdm=True, shuffle_dataset=False,
            **train_step._no_checkpointing(),
        )  # fmt: skip
        trainer = trl.GRPOTrainer(
            model=model, reward_funcs=reward, args=args,
            train_dataset=datasets.Dataset.from_dict({"prompt": prompts}),
            processing_class=train_step._trl_tokenizer(p.model.vocab_size), callbacks=[StepTimes()],
        )  # fmt: skip
        generate = trainer._generate_and_score_completions

        def timed_generate(*a, **kw):
            t0 = time.perf_counter()
            batch = generate(*a, **kw)
            gen_s.append(time.perf_counter() - t0)
            shapes.append((tuple(batch["prompt_ids"].shape), tuple(batch["completion_ids"].shape)))
            return batch

        trainer._generate_and_score_completions = timed_generate
        with contextlib.redirect_stdout(io.StringIO()):  # its end-of-training metrics dict
            trainer.train()
    want = ((w.rows, w.prompt_len), (w.rows, w.new_tokens))
    if len(gen_s) != steps or any(s != want for s in shapes):
        raise RuntimeError(
            f"TRL generated {len(gen_s)} batches of shapes {set(shapes)}, not {steps} of {want}"
        )
    iteration = [b - a for a, b in zip(begins, ends, strict=True)]
    gen = gen_s[warmup:]
    train = [i - g for i, g in zip(iteration[warmup:], gen, strict=True)]
    row = _row("trl GRPOTrainer", w, gen, train)
    row.update(torch=torch.__version__, transformers=transformers.__version__, trl=trl.__version__,
               threads=torch.get_num_threads())  # fmt: skip
    return row


# ----------------------------------------------------------------------------------------------------
# A hand-written PyTorch iteration.


def time_torch(p: common.BenchPreset, w: Workload, *, warmup: int, iters: int) -> dict:
    """Generation and training seconds of a hand-written PyTorch GRPO iteration (module docstring)."""
    import torch
    import transformers

    torch.manual_seed(0)
    torch.set_num_threads(common.cores())
    hf_config = common.hf_llama_config(p.model)
    hf_config.use_cache = True
    model = transformers.LlamaForCausalLM(hf_config).float()
    cfg = common.optim_config()
    opt = torch.optim.AdamW(
        model.parameters(), lr=cfg.learning_rate, betas=(cfg.b1, cfg.b2), eps=cfg.eps,
        weight_decay=cfg.weight_decay, fused=True,
    )  # fmt: skip
    generation = transformers.GenerationConfig(
        do_sample=True, temperature=1.0, top_k=0, top_p=1.0, num_return_sequences=w.group,
        max_new_tokens=w.new_tokens, min_new_tokens=w.new_tokens, use_cache=True, pad_token_id=0,
        eos_token_id=None, bos_token_id=2,
    )  # fmt: skip
    eps = 0.2
    gen, train = [], []
    for it in range(warmup + iters):
        prompts = torch.from_numpy(_prompts(w, p.model.vocab_size, it)).long()
        t0 = time.perf_counter()
        model.eval()
        with torch.inference_mode():
            rows = model.generate(
                input_ids=prompts, attention_mask=torch.ones_like(prompts), generation_config=generation
            )
        if tuple(rows.shape) != (w.rows, w.prompt_len + w.new_tokens):
            raise RuntimeError(
                f"torch generated {tuple(rows.shape)}, not {(w.rows, w.prompt_len + w.new_tokens)}"
            )
        rewards = torch.from_numpy(np.random.default_rng(it).random((w.prompts, w.group), dtype=np.float32))
        advantages = (
            (rewards - rewards.mean(1, keepdim=True)) / (rewards.std(1, keepdim=True) + 1e-4)
        ).reshape(-1)
        rows = rows.clone()  # out of inference mode
        t1 = time.perf_counter()
        model.train()
        hidden = model.model(input_ids=rows, use_cache=False).last_hidden_state
        # Position t predicts token t + 1: the completion's tokens are predicted from prompt_len - 1 on.
        logits = model.lm_head(hidden[:, w.prompt_len - 1 : -1])
        targets = rows[:, w.prompt_len :]
        logps = torch.gather(logits.log_softmax(-1), 2, targets[..., None])[..., 0]
        ratio = torch.exp(logps - logps.detach())
        adv = advantages[:, None]
        loss = -torch.minimum(ratio * adv, torch.clamp(ratio, 1 - eps, 1 + eps) * adv).mean()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip_norm)
        opt.step()
        opt.zero_grad(set_to_none=True)
        float(loss.detach())
        t2 = time.perf_counter()
        if it >= warmup:
            gen.append(t1 - t0)
            train.append(t2 - t1)
    row = _row("torch (hand-written)", w, gen, train)
    row.update(
        torch=torch.__version__, transformers=transformers.__version__, threads=torch.get_num_threads()
    )
    return row


# ----------------------------------------------------------------------------------------------------
# The benchmark.


def summary_line(ours: dict, ratio: float | None, ratio_torch: float | None = None) -> str:
    """The last line, for scripts."""
    fmt = lambda r: "na" if r is None else format(r, ".4f")  # noqa: E731
    return (
        f"iter_s={ours['iter_s']:.4f} gen_tok_s={ours['gen_tok_s']:.2f} "
        f"train_tok_s={ours['train_tok_s']:.2f} "
        f"ratio_vs_trl={fmt(ratio)} ratio_vs_torch={fmt(ratio_torch)}"
    )


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--preset", default="small", choices=sorted(common.PRESETS))
    ap.add_argument("--compare", default="", help="comma-separated: trl, torch")
    ap.add_argument("--old_logps", action="store_true", help="also time the old-log-prob forward (μ > 1)")
    ap.add_argument("--prompts", type=int, default=8)
    ap.add_argument("--group", type=int, default=8)
    ap.add_argument("--new_tokens", type=int, default=64)
    ap.add_argument("--warmup", type=int, default=1)
    ap.add_argument("--iters", type=int, default=3)
    ap.add_argument("--json", default=None, help="default bench_results/grpo_step_<preset>.json; '' for none")
    args = ap.parse_args(argv)
    if min(args.prompts, args.new_tokens, args.iters) < 1 or args.group < 2 or args.warmup < 0:
        ap.error("--prompts, --new_tokens and --iters must be >= 1, --group >= 2, --warmup >= 0")
    compare = [c for c in args.compare.split(",") if c]
    if set(compare) - {"trl", "torch"}:
        ap.error(f"--compare takes trl and/or torch, got {args.compare!r}")
    p = common.get_preset(args.preset)
    w = Workload(args.prompts, args.group, p.prompt_len, args.new_tokens)
    if w.prompt_len + w.new_tokens > p.model.max_len:
        ap.error(
            f"prompt {w.prompt_len} + {w.new_tokens} new tokens exceed the preset's max_len {p.model.max_len}"
        )
    rows = [time_ours(p, w, warmup=args.warmup, iters=args.iters, old_logps=args.old_logps)]
    timers = {"trl": time_trl, "torch": time_torch}
    for name in compare:
        rows.append(timers[name](p, w, warmup=args.warmup, iters=args.iters))
    for r in rows:
        r["ours/this"] = r["iter_s"] / rows[0]["iter_s"]  # >1: ours is faster
    by_impl = dict(zip(["ours", *compare], rows, strict=True))
    ratio = by_impl["trl"]["iter_s"] / rows[0]["iter_s"] if "trl" in by_impl else None
    ratio_torch = by_impl["torch"]["iter_s"] / rows[0]["iter_s"] if "torch" in by_impl else None
    record = {
        "benchmark": "grpo_step",
        "preset": args.preset,
        "workload": dataclasses.asdict(w) | {"warmup": args.warmup, "iters": args.iters, "dtype": "float32"},
        "rows": rows,
        "iter_s": rows[0]["iter_s"],
        "gen_tok_s": rows[0]["gen_tok_s"],
        "train_tok_s": rows[0]["train_tok_s"],
        "ratio_vs_trl": ratio,
        "ratio_vs_torch": ratio_torch,
        "machine": common.machine(),
    }
    print(
        f"GRPO iteration: preset={args.preset} prompts={w.prompts} group={w.group} prompt_len={w.prompt_len} "
        f"new_tokens={w.new_tokens} rows={w.rows} float32 warmup={args.warmup} iters={args.iters}"
    )
    common.print_table(rows, ["impl", "iter_s", "gen_s", "train_s", "gen_tok_s", "train_tok_s", "ours/this"])
    common.write_json(
        f"bench_results/grpo_step_{args.preset}.json" if args.json is None else args.json, record
    )
    print(summary_line(rows[0], ratio, ratio_torch))
    return record


if __name__ == "__main__":
    sys.exit(main() and 0)
