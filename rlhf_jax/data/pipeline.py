"""Tokenisation to fixed shapes, and deterministic, sharded, resumable grain batch pipelines.

(Over 400 lines: the SFT, pair, prompt and ranking layouts share one tokeniser-to-row contract.)

Sequence layout (one row of T tokens; P = prompt tokens including BOS, R = response tokens including EOS):

  tokens       BOS p_1 .. p_{P-1} r_1 .. r_{R-1} EOS PAD .. PAD      the model's input, all T positions
  targets      tokens shifted left by one, PAD last: targets[t] = tokens[t + 1]
  loss_mask    1.0 where targets[t] is a response token or the EOS, i.e. for P-1 <= t < P-1+R; else 0.0
               (an SFT example with per-token weights, `token_weights.py`: the token's weight there)
  segment_ids  1 on the P+R real tokens, 0 on padding

so the logits at position t predict `targets[t]`, and `sum_t loss_mask[t] * log p(targets[t] | tokens[:t+1])`
is log pi(response + EOS | prompt). The prompt and the response are encoded separately and their ids
concatenated, so the boundary never merges pieces across it.

BOS and EOS are not doubled: a prompt whose text begins with the BOS token (a chat template's
rendering, Llama 3 and Gemma write it) gets no second one, and a response whose ids end with one of the
tokenizer's EOS ids (a templated response ends with its turn's marker, e.g. Qwen's `<|im_end|>`) gets
no EOS appended. SFT examples rendered from a conversation (`SFTExample.segments`) are one text whose
loss mask covers the assistant turns only (`tokenize_sft`).

Truncation policy: the prompt keeps its *last* `max_prompt_len - 1` tokens after BOS (cut from the left,
keeping the "TL;DR:" or "Assistant:" cue next to the response); the response plus EOS is then cut from
the right to the `max_len - P` tokens left (a cut response loses its EOS). Each cut is counted per
example in `LoadStats.truncated` (keys "prompt", "chosen", "rejected", "completion", and
"identical_after_truncation" for pairs whose two responses then coincide; those pairs are kept).

Ranking layout (RSO's pairwise ranking model, `tokenize_ranking`): one row holds the prompt and two
responses in `RANKING_TEMPLATE`, each piece encoded separately and the ids concatenated,

  BOS prompt | "\n\nResponse A:" a | "\n\nResponse B:" b | "\n\nWhich response is better?" EOS

and the model reads the hidden state of that final EOS. The prompt is cut as above; the two responses
then share the room left, each cut from the right to the same budget, so the question and the EOS are
always in the row. `RankingLayout.max_len` leaves every response at least `max_response_len` tokens.
Rows with a response cut are counted under "ranking_response".

Batch dicts (numpy; B = this process's rows, T = `max_len` or the bucket length; dtypes in brackets):

  preference  chosen_{tokens,targets,segment_ids} [B,T] int32, chosen_loss_mask [B,T] float32, the same
              four for rejected_, prompt_lengths (P) / chosen_lengths / rejected_lengths (R) [B] int32
  sft         tokens, targets, segment_ids [B,T] int32, loss_mask [B,T] float32, prompt_lengths,
              lengths [B] int32
  prompts     prompt_tokens [B,T] int32 (BOS + prompt, right-padded with PAD), prompt_lengths [B] int32
  all         weights [B] float32 (the example weight; 0 on padding rows), example_ids [B] int32 (index
              into the tokenised examples; -1 on padding rows)

Pipelines. `batches` builds a grain `MapDataset` of example indices: shuffled per epoch with the seed
(each epoch a different permutation), repeated, grouped into *global* batches, and each process keeps its
contiguous slice `[process_index * B, (process_index + 1) * B)` of every global batch, so processes read
disjoint examples whose union is the single-process batch. The padded length of a batch (with
`bucket_lengths`, the smallest bucket that fits its longest row) is computed from the global batch, so
every process pads to the same shape. The iterator's `get_state()`/`set_state()` (a small dict, and
`grain.checkpoint.CheckpointSave`/`CheckpointRestore` with Orbax) resume at exactly the next batch.
`make_global_batch` assembles the per-process arrays into global `jax.Array`s. SFT examples can also be
packed several to a row (`packing.py`).
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Sequence
from typing import Protocol

import grain
import jax
import numpy as np

from rlhf_jax.data import records as rec
from rlhf_jax.data import token_weights
from rlhf_jax.data.tokenizer import Tokenizer

log = logging.getLogger("rlhf_jax")


@dataclasses.dataclass(frozen=True)
class SequenceLayout:
    """Fixed shapes: `max_len` tokens per row, at most `max_prompt_len` of them (with BOS) prompt."""

    max_len: int
    max_prompt_len: int

    def __post_init__(self):
        if not 2 <= self.max_prompt_len < self.max_len:
            raise ValueError(
                f"need 2 <= max_prompt_len < max_len, got max_prompt_len={self.max_prompt_len}, "
                f"max_len={self.max_len}"
            )


# The pieces around the two responses of a ranking-model input (RSO, Liu et al. 2024, Sec. 3).
RANKING_TEMPLATE = ("\n\nResponse A:", "\n\nResponse B:", "\n\nWhich response is better?")

# Above this share of ranking-model inputs with a response cut, a warning is logged.
RANKING_TRUNCATION_WARN = 0.05


@dataclasses.dataclass(frozen=True)
class RankingLayout:
    """Shapes of the pairwise ranking model's input (module docstring, "Ranking layout").

    Attributes:
      max_prompt_len: prompt tokens, BOS included (cut from the left, as in `SequenceLayout`).
      max_response_len: tokens every response has room for (a row whose prompt is shorter than
        `max_prompt_len` gives each of its responses the spare half too); longer ones are cut.
      template_len: tokens of the `RANKING_TEMPLATE` pieces, each encoded on its own, with the tokenizer
        the layout was built for (`for_tokenizer`); `tokenize_ranking` checks it.
    """

    max_prompt_len: int
    max_response_len: int
    template_len: int

    def __post_init__(self):
        if self.max_prompt_len < 2 or self.max_response_len < 1 or self.template_len < 0:
            raise ValueError(
                f"RankingLayout needs max_prompt_len >= 2, max_response_len >= 1 and template_len >= 0, "
                f"got {self.max_prompt_len}, {self.max_response_len}, {self.template_len}"
            )

    @property
    def max_len(self) -> int:
        """Row width: prompt + two responses + template + EOS."""
        return self.max_prompt_len + 2 * self.max_response_len + self.template_len + 1

    @classmethod
    def for_tokenizer(cls, tokenizer: Tokenizer, *, max_prompt_len: int, max_response_len: int):
        """The layout with `template_len` counted by `tokenizer`."""
        template_len = sum(len(ids) for ids in tokenizer.encode_batch(list(RANKING_TEMPLATE)))
        return cls(max_prompt_len, max_response_len, template_len)

    def response_budget(self, prompt_len: int) -> int:
        """Tokens each response of a row keeps when its prompt (BOS included) has `prompt_len` tokens."""
        return (self.max_len - 1 - self.template_len - prompt_len) // 2


@dataclasses.dataclass(frozen=True)
class TokenizedPreference:
    """Tokenised pairs: prompt ids (BOS + prompt), response ids (+ EOS), all truncated; see module doc."""

    prompt_ids: list[np.ndarray]
    chosen_ids: list[np.ndarray]
    rejected_ids: list[np.ndarray]
    weights: np.ndarray
    pad_id: int
    max_len: int

    def __post_init__(self):
        for i, (p, c, r) in enumerate(zip(self.prompt_ids, self.chosen_ids, self.rejected_ids, strict=True)):
            if len(p) + max(len(c), len(r)) > self.max_len:
                raise ValueError(
                    f"pair {i}: prompt ({len(p)} tokens) + response ({max(len(c), len(r))}) exceeds "
                    f"max_len={self.max_len}; build sampled pairs with TokenizedPreference.fitted"
                )

    @classmethod
    def fitted(cls, prompt_ids, chosen_ids, rejected_ids, weights, pad_id: int, max_len: int):
        """Pairs of token arrays (e.g. samples: a prompt of up to max_prompt_len tokens plus up to
        max_new_tokens) with each response cut to max_len - len(prompt) tokens, the truncation rule of
        text pairs. Returns (pairs, the number of pairs with a response cut)."""
        cut = 0
        chosen, rejected = [], []
        for p, c, r in zip(prompt_ids, chosen_ids, rejected_ids, strict=True):
            room = max_len - len(p)
            cut += int(len(c) > room or len(r) > room)
            chosen.append(c[:room])
            rejected.append(r[:room])
        return cls(list(prompt_ids), chosen, rejected, weights, pad_id, max_len), cut

    def __len__(self) -> int:
        return len(self.prompt_ids)

    def row_lengths(self, i: int) -> int:
        """Returns the longest of the pair's two sequences."""
        return len(self.prompt_ids[i]) + max(len(self.chosen_ids[i]), len(self.rejected_ids[i]))

    def batch(self, ids_B: np.ndarray, length: int) -> dict[str, np.ndarray]:
        """Returns the batch of examples `ids_B` (-1: padding row) padded to `length` tokens."""
        chosen = _sequences(self.prompt_ids, self.chosen_ids, ids_B, length, self.pad_id)
        rejected = _sequences(self.prompt_ids, self.rejected_ids, ids_B, length, self.pad_id)
        out = {f"chosen_{k}": v for k, v in chosen.items() if k != "prompt_lengths"}
        out.update({f"rejected_{k}": v for k, v in rejected.items() if k != "prompt_lengths"})
        out["prompt_lengths"] = chosen["prompt_lengths"]
        out.update(_ids_and_weights(ids_B, self.weights))
        return out


@dataclasses.dataclass(frozen=True)
class TokenizedSFT:
    """Tokenised SFT examples: prompt ids (BOS + prompt) and completion ids (+ EOS), truncated.

    `completion_masks` (float32, one per completion) is each completion token's loss weight when they
    are not all 1: 0 on tokens out of the loss (a templated conversation: later user turns, headers),
    the token's weight for an example with `weight_spans` (`token_weights.py`); None: all are 1.
    """

    prompt_ids: list[np.ndarray]
    completion_ids: list[np.ndarray]
    weights: np.ndarray
    pad_id: int
    max_len: int
    completion_masks: list[np.ndarray] | None = None

    def __len__(self) -> int:
        return len(self.prompt_ids)

    def row_lengths(self, i: int) -> int:
        """Returns the sequence length of example `i`."""
        return len(self.prompt_ids[i]) + len(self.completion_ids[i])

    def batch(self, ids_B: np.ndarray, length: int) -> dict[str, np.ndarray]:
        """Returns the batch of examples `ids_B` (-1: padding row) padded to `length` tokens."""
        out = _sequences(
            self.prompt_ids, self.completion_ids, ids_B, length, self.pad_id, self.completion_masks
        )
        out.update(_ids_and_weights(ids_B, self.weights))
        return out


@dataclasses.dataclass(frozen=True)
class TokenizedPrompts:
    """Tokenised prompts for sampling and evaluation: BOS + prompt, left-truncated."""

    prompt_ids: list[np.ndarray]
    weights: np.ndarray
    pad_id: int
    max_len: int

    def __len__(self) -> int:
        return len(self.prompt_ids)

    def row_lengths(self, i: int) -> int:
        """Returns the prompt length of example `i`."""
        return len(self.prompt_ids[i])

    def batch(self, ids_B: np.ndarray, length: int) -> dict[str, np.ndarray]:
        """Returns `prompt_tokens` [B, length] right-padded, `prompt_lengths`, ids and weights."""
        tokens_BT = np.full((len(ids_B), length), self.pad_id, np.int32)
        lengths_B = np.zeros(len(ids_B), np.int32)
        for b, i in enumerate(ids_B):
            if i >= 0:
                ids = self.prompt_ids[i]
                tokens_BT[b, : len(ids)] = ids
                lengths_B[b] = len(ids)
        return {
            "prompt_tokens": tokens_BT,
            "prompt_lengths": lengths_B,
            **_ids_and_weights(ids_B, self.weights),
        }


def tokenize_preference(
    examples: Sequence[rec.PreferenceExample],
    tokenizer: Tokenizer,
    layout: SequenceLayout,
    stats: rec.LoadStats | None = None,
) -> TokenizedPreference:
    """Tokenises pairs with the truncation policy of the module docstring.

    Args:
      examples: the pairs.
      tokenizer: the tokenizer.
      layout: the sequence shapes.
      stats: if given, truncation counts are added to `stats.truncated`.

    Returns:
      The tokenised pairs, ready for `batches`.
    """
    stats = stats if stats is not None else rec.LoadStats()
    prompts = _prompt_ids(tokenizer, [ex.prompt for ex in examples], layout.max_prompt_len, stats)
    budgets = [layout.max_len - len(p) for p in prompts]
    chosen = _response_ids(tokenizer, [ex.chosen for ex in examples], budgets, "chosen", stats)
    rejected = _response_ids(tokenizer, [ex.rejected for ex in examples], budgets, "rejected", stats)
    _count(
        stats,
        "identical_after_truncation",
        sum(np.array_equal(c, r) for c, r in zip(chosen, rejected, strict=True)),
    )
    weights_X = np.array([ex.weight for ex in examples], np.float32)
    return TokenizedPreference(prompts, chosen, rejected, weights_X, tokenizer.pad_id, layout.max_len)


def tokenize_sft(
    examples: Sequence[rec.SFTExample],
    tokenizer: Tokenizer,
    layout: SequenceLayout,
    stats: rec.LoadStats | None = None,
) -> TokenizedSFT:
    """Tokenises SFT examples with the truncation policy of the module docstring.

    An example with `segments` (a conversation rendered by a chat template, `conversations.py`) is
    encoded as one text, so its ids are the template's (`transformers`' `apply_chat_template(...,
    tokenize=True)`; with a `tokenizers` tokenizer, the tokens overlapping a trainable segment are in
    the loss; a sentencepiece one encodes segment by segment), and gets no EOS: the template closes each
    turn. Its prompt is the ids before the first trainable token, its completion the rest, with a loss
    mask (`TokenizedSFT.completion_masks`); truncation is the plain examples'.

    Args:
      examples: the SFT examples.
      tokenizer: the tokenizer.
      layout: the sequence shapes.
      stats: if given, truncation counts are added to `stats.truncated`.

    Returns:
      The tokenised examples, ready for `batches` (or `packing.pack_sft`).
    """
    stats = stats if stats is not None else rec.LoadStats()
    plain = [i for i, ex in enumerate(examples) if not ex.segments]
    prompts, completions, masks = [None] * len(examples), [None] * len(examples), [None] * len(examples)
    plain_prompts = _prompt_ids(tokenizer, [examples[i].prompt for i in plain], layout.max_prompt_len, stats)
    budgets = [layout.max_len - len(p) for p in plain_prompts]
    texts = [examples[i].completion for i in plain]
    plain_completions = _response_ids(tokenizer, texts, budgets, "completion", stats)
    for i, prompt, completion in zip(plain, plain_prompts, plain_completions, strict=True):
        prompts[i], completions[i], masks[i] = prompt, completion, np.ones(len(completion), np.float32)
        if examples[i].weight_spans:
            masks[i] = _weighted_mask(tokenizer, examples[i], completion, i)
    for i, ex in enumerate(examples):
        if ex.segments:
            prompts[i], completions[i], masks[i] = _segmented(tokenizer, ex.segments, layout, stats)
    plain_unweighted = len(plain) == len(examples) and not any(ex.weight_spans for ex in examples)
    masks = None if plain_unweighted else masks
    weights_X = np.ones(len(examples), np.float32)
    return TokenizedSFT(prompts, completions, weights_X, tokenizer.pad_id, layout.max_len, masks)


def tokenize_prompts(
    prompts: Sequence[str], tokenizer: Tokenizer, max_prompt_len: int, stats: rec.LoadStats | None = None
) -> TokenizedPrompts:
    """Tokenises prompts for sampling and evaluation.

    Args:
      prompts: the prompt texts.
      tokenizer: the tokenizer.
      max_prompt_len: the row width; prompts keep their last `max_prompt_len - 1` tokens after BOS.
      stats: if given, truncated prompts are counted in `stats.truncated["prompt"]`.

    Returns:
      The tokenised prompts; `batches` gives `prompt_tokens` [B, max_prompt_len] right-padded.
    """
    stats = stats if stats is not None else rec.LoadStats()
    ids = _prompt_ids(tokenizer, list(prompts), max_prompt_len, stats)
    return TokenizedPrompts(ids, np.ones(len(ids), np.float32), tokenizer.pad_id, max_prompt_len)


def tokenize_ranking(
    prompts: Sequence[str],
    responses_a: Sequence[str],
    responses_b: Sequence[str],
    tokenizer: Tokenizer,
    layout: RankingLayout,
    stats: rec.LoadStats | None = None,
) -> TokenizedSFT:
    """Tokenises ranking-model inputs in the ranking layout (module docstring).

    The prompt keeps its last `max_prompt_len - 1` tokens after BOS; responses A and B are each cut from
    the right to `layout.response_budget(prompt tokens)` (>= `max_response_len`); the template pieces
    and the final EOS are always kept, so the head reads the EOS after the question in every row.

    Args:
      prompts: the prompt texts.
      responses_a: response A of each row.
      responses_b: response B of each row.
      tokenizer: the tokenizer the layout was built for.
      layout: the ranking layout.
      stats: if given, rows with a response cut are added to `stats.truncated["ranking_response"]` and
        cut prompts to `stats.truncated["prompt"]`.

    Returns:
      One SFT example per row: prompt ids (BOS + prompt) and, as the completion, template + responses +
      EOS, `layout.max_len` wide.
    """
    if not len(prompts) == len(responses_a) == len(responses_b):
        raise ValueError(f"{len(prompts)} prompts, {len(responses_a)} A and {len(responses_b)} B responses")
    stats = stats if stats is not None else rec.LoadStats()
    before, middle, question = tokenizer.encode_batch(list(RANKING_TEMPLATE))
    template_len = len(before) + len(middle) + len(question)
    if template_len != layout.template_len:
        raise ValueError(
            f"the ranking template is {template_len} tokens with this tokenizer but the layout was built "
            f"for {layout.template_len}: the ranking model was trained with another tokenizer"
        )
    prompt_ids = _prompt_ids(tokenizer, list(prompts), layout.max_prompt_len, stats)
    a_ids, b_ids = tokenizer.encode_batch(list(responses_a)), tokenizer.encode_batch(list(responses_b))
    completions, cut = [], 0
    for p, a, b in zip(prompt_ids, a_ids, b_ids, strict=True):
        budget = layout.response_budget(len(p))
        cut += len(a) > budget or len(b) > budget
        ids = [*before, *a[:budget], *middle, *b[:budget], *question, tokenizer.eos_id]
        completions.append(np.array(ids, np.int32))
    _count(stats, "ranking_response", cut)
    weights_X = np.ones(len(prompt_ids), np.float32)
    return TokenizedSFT(prompt_ids, completions, weights_X, tokenizer.pad_id, layout.max_len)


def ranking_truncated_fraction(stats: rec.LoadStats, num_inputs: int, what: str) -> float:
    """The share of `num_inputs` ranking-model inputs with a response cut (counted in `stats` by
    `tokenize_ranking`); logs a warning naming `what` above `RANKING_TRUNCATION_WARN`."""
    share = stats.truncated["ranking_response"] / num_inputs if num_inputs else 0.0
    if share > RANKING_TRUNCATION_WARN:
        log.warning(
            "%s: %.1f%% of the ranking model's inputs (%d of %d) have a response cut to fit its layout; "
            "give the ranking model a longer response budget",
            what, 100 * share, stats.truncated["ranking_response"], num_inputs,
        )  # fmt: skip
    return share


class Batchable(Protocol):
    """What `batches` needs of tokenised data (the three classes above and `packing.PackedSFT`)."""

    max_len: int

    def __len__(self) -> int: ...

    def row_lengths(self, i: int) -> int: ...

    def batch(self, ids_B: np.ndarray, length: int) -> dict[str, np.ndarray]: ...


def batches(
    data: Batchable,
    *,
    global_batch_size: int,
    seed: int = 0,
    shuffle: bool = True,
    num_epochs: int | None = None,
    drop_remainder: bool = True,
    process_index: int | None = None,
    process_count: int | None = None,
    bucket_lengths: Sequence[int] = (),
    read_options: grain.ReadOptions | None = None,
) -> grain.IterDataset:
    """Returns this process's batches as a grain dataset; `iter()` it for a checkpointable iterator.

    Args:
      data: tokenised examples.
      global_batch_size: rows per global batch, across all processes.
      seed: the shuffle seed (the same on every process).
      shuffle: shuffle each epoch (a different permutation per epoch); False keeps file order.
      num_epochs: passes over the data, or None to repeat forever.
      drop_remainder: drop a last partial global batch; if False it is filled with padding rows
        (`weights` 0, `example_ids` -1), e.g. for one evaluation pass.
      process_index: this process (default `jax.process_index()`).
      process_count: the number of processes (default `jax.process_count()`).
      bucket_lengths: if given, pad each batch to the smallest of these lengths that fits its longest
        row (fewer shapes than one per batch; each is one compilation), else to `data.max_len`.
      read_options: grain read options; default no background threads (batches are cheap to build).

    Returns:
      A grain `IterDataset` of batch dicts (module docstring) with `global_batch_size // process_count`
      rows each.
    """
    process_index = jax.process_index() if process_index is None else process_index
    process_count = jax.process_count() if process_count is None else process_count
    if global_batch_size % process_count:
        raise ValueError(
            f"global_batch_size={global_batch_size} is not divisible by {process_count} processes"
        )
    if len(data) == 0:
        raise ValueError("no examples to batch")
    buckets = sorted(bucket_lengths)
    if buckets and buckets[-1] < data.max_len:
        buckets.append(data.max_len)
    local = global_batch_size // process_count
    start = process_index * local
    lengths_X = np.array([data.row_lengths(i) for i in range(len(data))], np.int32)

    def to_batch(global_ids: np.ndarray) -> dict[str, np.ndarray]:
        ids_B = np.full(global_batch_size, -1, np.int64)
        ids_B[: len(global_ids)] = global_ids
        length = data.max_len
        if buckets:
            longest = int(lengths_X[ids_B[ids_B >= 0]].max())
            length = next(b for b in buckets if b >= longest)
        return data.batch(ids_B[start : start + local], length)

    ds = grain.MapDataset.range(len(data))
    if shuffle:
        ds = ds.shuffle(seed=seed)
    ds = ds.repeat(num_epochs).batch(global_batch_size, drop_remainder=drop_remainder).map(to_batch)
    return ds.to_iter_dataset(read_options or grain.ReadOptions(num_threads=0, prefetch_buffer_size=0))


def steps_per_epoch(num_examples: int, global_batch_size: int) -> int:
    """Returns the number of full global batches in one pass over `num_examples`."""
    return num_examples // global_batch_size


def make_global_batch(
    local_batch: dict[str, np.ndarray], sharding: jax.sharding.Sharding
) -> dict[str, jax.Array]:
    """Assembles each process's rows into global arrays sharded along the batch axis.

    Process p's rows are rows `[p * B, (p + 1) * B)` of the global batch (see `batches`), which is the
    layout `jax.make_array_from_process_local_data` expects when the mesh's batch axis orders devices by
    process, as `jax.make_mesh` does.

    Args:
      local_batch: this process's batch dict.
      sharding: the batch sharding, e.g. `NamedSharding(mesh, PartitionSpec("data"))`.

    Returns:
      The same keys, as global `jax.Array`s.
    """
    return {k: jax.make_array_from_process_local_data(sharding, v) for k, v in local_batch.items()}


def _fit_prompt(tokenizer: Tokenizer, ids: list[int], max_len: int, text: str) -> tuple[np.ndarray, bool]:
    """BOS first when the tokenizer has one (a HF tokenizer may not: Qwen), added unless the text begins
    with it (a chat template's rendering: Llama 3, Gemma), then the prompt's last pieces; and whether it
    was cut."""
    bos = [] if tokenizer.bos_id is None else [tokenizer.bos_id]
    if bos and list(ids[:1]) == bos:
        ids = ids[1:]
    room = max_len - len(bos)
    cut = len(ids) > room
    kept = ids[len(ids) - room :] if cut else ids
    if not bos and not len(kept):
        raise ValueError(
            f"empty prompt {text!r}: the tokenizer has no BOS token, so a prompt needs at least one "
            "token to predict the response's first token from"
        )
    return np.array([*bos, *kept], np.int32), cut


def _prompt_ids(
    tokenizer: Tokenizer, texts: list[str], max_len: int, stats: rec.LoadStats
) -> list[np.ndarray]:
    unique = list(dict.fromkeys(texts))  # Pairs often share a prompt: encode each distinct one once.
    cache = {
        text: _fit_prompt(tokenizer, ids, max_len, text)
        for text, ids in zip(unique, tokenizer.encode_batch(unique), strict=True)
    }
    _count(stats, "prompt", sum(cache[t][1] for t in texts))
    return [cache[t][0] for t in texts]


def _response_ids(
    tokenizer: Tokenizer, texts: list[str], budgets: list[int], name: str, stats: rec.LoadStats
) -> list[np.ndarray]:
    out = []
    for ids, budget in zip(tokenizer.encode_batch(texts), budgets, strict=True):
        if not (ids and ids[-1] in tokenizer.eos_ids):  # a templated response ends with its turn's marker
            ids = [*ids, tokenizer.eos_id]
        if len(ids) > budget:
            ids = ids[:budget]
            _count(stats, name, 1)
        out.append(np.array(ids, np.int32))
    return out


def segment_ids(tokenizer: Tokenizer, segments) -> tuple[list[int], np.ndarray]:
    """The ids of the text `segments` ((text, trainable) pieces) join to, and a float32 mask of the
    tokens in the loss: encoded as one text when the tokenizer gives character offsets (a token is in
    the loss when it overlaps a trainable piece), else piece by piece."""
    if not hasattr(tokenizer, "encode_offsets"):
        pieces = tokenizer.encode_batch([text for text, _ in segments])
        ids = [i for piece in pieces for i in piece]
        mask = [float(t) for piece, (_, t) in zip(pieces, segments, strict=True) for _ in piece]
        return ids, np.array(mask, np.float32)
    ids, offsets = tokenizer.encode_offsets("".join(text for text, _ in segments))
    spans_X2 = np.array(offsets, np.int64).reshape(-1, 2)
    mask_X = np.zeros(len(ids), bool)
    start = 0
    for text, trainable in segments:
        if trainable:
            mask_X |= (spans_X2[:, 0] < start + len(text)) & (spans_X2[:, 1] > start)
        start += len(text)
    return list(ids), mask_X.astype(np.float32)


def _weighted_mask(tokenizer: Tokenizer, example: rec.SFTExample, completion_ids: np.ndarray, i: int):
    """The loss mask of a plain example with `weight_spans`: each (kept) completion token's weight
    (`token_weights.py`), 1 on the appended EOS."""
    ids, spans_X2 = token_weights.char_offsets(tokenizer, example.completion)
    if ids != tokenizer.encode_batch([example.completion])[0]:
        raise ValueError(f"SFT example {i}: the tokenizer's char_offsets ids differ from its encode ids")
    weights = token_weights.token_weights(spans_X2, example.weight_spans)
    weights = np.concatenate([weights, np.ones(max(len(completion_ids) - len(weights), 0), np.float32)])
    return weights[: len(completion_ids)]


def _segmented(tokenizer: Tokenizer, segments, layout: SequenceLayout, stats: rec.LoadStats):
    """Prompt ids, completion ids and completion loss mask of a segmented SFT example (`tokenize_sft`)."""
    ids, mask = segment_ids(tokenizer, segments)
    first = int(np.argmax(mask)) if mask.any() else len(ids)
    prompt, cut = _fit_prompt(tokenizer, ids[:first], layout.max_prompt_len, segments[0][0])
    _count(stats, "prompt", cut)
    budget = layout.max_len - len(prompt)
    if len(ids) - first > budget:
        _count(stats, "completion", 1)
    end = first + min(budget, len(ids) - first)
    return prompt, np.array(ids[first:end], np.int32), mask[first:end]


def _count(stats: rec.LoadStats, key: str, n: int) -> None:
    """Adds `n` truncations under `key`, leaving absent keys absent when `n` is 0."""
    if n:
        stats.truncated[key] += int(n)


def _sequences(
    prompt_ids: list[np.ndarray],
    response_ids: list[np.ndarray],
    ids_B: np.ndarray,
    length: int,
    pad_id: int,
    response_masks: list[np.ndarray] | None = None,
) -> dict[str, np.ndarray]:
    """Builds tokens/targets/loss_mask/segment_ids and lengths for prompt + response rows (the loss on
    every response token, or on those of `response_masks`)."""
    B = len(ids_B)
    tokens_BT = np.full((B, length), pad_id, np.int32)
    targets_BT = np.full((B, length), pad_id, np.int32)
    loss_mask_BT = np.zeros((B, length), np.float32)
    segment_ids_BT = np.zeros((B, length), np.int32)
    prompt_lengths_B = np.zeros(B, np.int32)
    lengths_B = np.zeros(B, np.int32)
    for b, i in enumerate(ids_B):
        if i < 0:
            continue
        prompt, response = prompt_ids[i], response_ids[i]
        prompt_len, response_len = len(prompt), len(response)
        end = prompt_len + response_len
        tokens_BT[b, :prompt_len] = prompt
        tokens_BT[b, prompt_len:end] = response
        targets_BT[b, : end - 1] = tokens_BT[b, 1:end]
        loss_mask_BT[b, prompt_len - 1 : end - 1] = 1.0 if response_masks is None else response_masks[i]
        segment_ids_BT[b, :end] = 1
        prompt_lengths_B[b], lengths_B[b] = prompt_len, response_len
    return {
        "tokens": tokens_BT,
        "targets": targets_BT,
        "loss_mask": loss_mask_BT,
        "segment_ids": segment_ids_BT,
        "prompt_lengths": prompt_lengths_B,
        "lengths": lengths_B,
    }


def _ids_and_weights(ids_B: np.ndarray, weights_X: np.ndarray) -> dict[str, np.ndarray]:
    valid_B = ids_B >= 0
    weights_B = np.where(valid_B, weights_X[np.where(valid_B, ids_B, 0)], 0.0).astype(np.float32)
    return {"weights": weights_B, "example_ids": ids_B.astype(np.int32)}
