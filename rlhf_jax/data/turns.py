"""Turn-level layout of multi-turn dialogues for EPO (`losses.epo`): each assistant token's turn id.

One dialogue (`synthetic_dialogue.DialogueExample`: text pieces, each assistant reply a piece of its own
turn u = 0, 1, ...) is one row of T tokens: BOS, then the pieces encoded one by one and their ids
concatenated (a piece never merges with its neighbour; `tokenize_sft` encodes a sentencepiece chat the
same way), no EOS (the next "Human:" turn, or the end of the row, closes a reply):

  tokens       BOS h_0 .. | a_0 .. | h_1 .. | a_1 .. | ... PAD
  targets      tokens shifted left by one, PAD last: targets[t] = tokens[t + 1]
  loss_mask    1.0 where targets[t] is an assistant token, else 0.0
  turn_ids     u where targets[t] is a token of reply u, -1 elsewhere (prompt, human turns, padding)
  segment_ids  1 on the real tokens, 0 on padding

plus `turn_rewards` [B, U] (reply u's reward) and `turn_mask` [B, U] (1 on the replies that have a token
in the row), with U = `max_turns`, and `weights` / `example_ids` as in `pipeline.py`.

Truncation: a dialogue longer than `max_len` loses its end (whole later turns, and maybe part of one
reply), never its start, so the kept replies are turns 0..k and stay a prefix of U as `losses.epo`
expects. It is counted, per dialogue, in `LoadStats.truncated`: "dialogue" (rows cut), "dialogue_turns_cut"
(replies that lost some of their tokens) and "dialogue_turns_dropped" (replies that lost all of them:
their turn is masked out, so their rewards no longer enter the kept turns' returns). A dialogue with more
replies than `max_turns` is an error.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence

import numpy as np

from rlhf_jax.data import records as rec
from rlhf_jax.data.synthetic_dialogue import DialogueExample
from rlhf_jax.data.tokenizer import Tokenizer


@dataclasses.dataclass(frozen=True)
class TokenizedDialogues:
    """Tokenised dialogues: each row's ids (BOS first), per-token turn ids (-1: not an assistant token;
    aligned with the ids, not yet shifted), per-turn rewards [X, U] and turn masks [X, U]."""

    ids: list[np.ndarray]
    token_turns: list[np.ndarray]
    turn_rewards: np.ndarray
    turn_mask: np.ndarray
    weights: np.ndarray
    pad_id: int
    max_len: int

    def __len__(self) -> int:
        return len(self.ids)

    def row_lengths(self, i: int) -> int:
        return len(self.ids[i])

    def batch(self, ids_B: np.ndarray, length: int) -> dict[str, np.ndarray]:
        """Returns the batch of dialogues `ids_B` (-1: padding row) padded to `length` tokens."""
        B, U = len(ids_B), self.turn_rewards.shape[1]
        tokens_BT = np.full((B, length), self.pad_id, np.int32)
        targets_BT = np.full((B, length), self.pad_id, np.int32)
        turn_ids_BT = np.full((B, length), -1, np.int32)
        segment_ids_BT = np.zeros((B, length), np.int32)
        rewards_BU = np.zeros((B, U), np.float32)
        turn_mask_BU = np.zeros((B, U), np.float32)
        for b, i in enumerate(ids_B):
            if i < 0:
                continue
            ids, turns = self.ids[i], self.token_turns[i]
            n = len(ids)
            tokens_BT[b, :n] = ids
            targets_BT[b, : n - 1] = ids[1:]
            turn_ids_BT[b, : n - 1] = turns[1:]  # the turn of the token each position predicts
            segment_ids_BT[b, :n] = 1
            rewards_BU[b], turn_mask_BU[b] = self.turn_rewards[i], self.turn_mask[i]
        valid_B = ids_B >= 0
        return {
            "tokens": tokens_BT,
            "targets": targets_BT,
            "loss_mask": (turn_ids_BT >= 0).astype(np.float32),
            "turn_ids": turn_ids_BT,
            "segment_ids": segment_ids_BT,
            "turn_rewards": rewards_BU,
            "turn_mask": turn_mask_BU,
            "weights": np.where(valid_B, self.weights[np.where(valid_B, ids_B, 0)], 0.0).astype(np.float32),
            "example_ids": ids_B.astype(np.int32),
        }


def tokenize_dialogues(
    dialogues: Sequence[DialogueExample],
    tokenizer: Tokenizer,
    *,
    max_len: int,
    max_turns: int,
    stats: rec.LoadStats | None = None,
) -> TokenizedDialogues:
    """Tokenises dialogues in the turn layout of the module docstring.

    Args:
      dialogues: the dialogues, each with at most `max_turns` replies.
      tokenizer: the tokenizer (its BOS starts every row).
      max_len: tokens per row; longer dialogues lose their end (counted in `stats.truncated`).
      max_turns: U, the turn axis of `turn_rewards` / `turn_mask`.
      stats: if given, truncation counts are added to `stats.truncated`.

    Returns:
      The tokenised dialogues, ready for `pipeline.batches`.
    """
    stats = stats if stats is not None else rec.LoadStats()
    pieces = [text for d in dialogues for text, _ in d.pieces]
    encoded = iter(tokenizer.encode_batch(pieces))
    bos = [] if tokenizer.bos_id is None else [tokenizer.bos_id]
    all_ids, all_turns = [], []
    rewards_XU = np.zeros((len(dialogues), max_turns), np.float32)
    mask_XU = np.zeros((len(dialogues), max_turns), np.float32)
    for x, dialogue in enumerate(dialogues):
        if dialogue.num_turns > max_turns:
            raise ValueError(
                f"dialogue {x} has {dialogue.num_turns} assistant turns, more than max_turns={max_turns}"
            )
        ids, turns = list(bos), [-1] * len(bos)
        for _, u in dialogue.pieces:
            piece = next(encoded)
            ids += piece
            turns += [u] * len(piece)
        full = np.array(turns, np.int32)
        ids, turns = np.array(ids[:max_len], np.int32), full[:max_len]
        if len(full) > max_len:
            stats.truncated["dialogue"] += 1
            for u in range(dialogue.num_turns):
                kept, total = int((turns == u).sum()), int((full == u).sum())
                if kept == 0:
                    stats.truncated["dialogue_turns_dropped"] += 1
                elif kept < total:
                    stats.truncated["dialogue_turns_cut"] += 1
        for u in range(dialogue.num_turns):
            if (turns == u).any():
                rewards_XU[x, u], mask_XU[x, u] = dialogue.turn_rewards[u], 1.0
        all_ids.append(ids)
        all_turns.append(turns)
    weights_X = np.ones(len(dialogues), np.float32)
    return TokenizedDialogues(all_ids, all_turns, rewards_XU, mask_XU, weights_X, tokenizer.pad_id, max_len)


def turn_prompts(
    dialogues: Sequence[DialogueExample],
    tokenizer: Tokenizer,
    *,
    max_prompt_len: int,
    stats: rec.LoadStats | None = None,
) -> tuple[list[tuple[int, int]], dict[str, np.ndarray]]:
    """The prompt of every assistant turn of `dialogues`, encoded as the training rows are (BOS, then the
    pieces before the turn's reply, each encoded on its own), for sampling replies.

    A prompt longer than `max_prompt_len` keeps BOS and its last tokens (counted under
    `stats.truncated["prompt"]`).

    Returns:
      ((dialogue, turn) of each prompt, {"prompt_tokens": [P, max_prompt_len] right-padded with PAD,
      "prompt_lengths": [P]}).
    """
    stats = stats if stats is not None else rec.LoadStats()
    bos = [] if tokenizer.bos_id is None else [tokenizer.bos_id]
    room = max_prompt_len - len(bos)
    keys, rows = [], []
    for x, dialogue in enumerate(dialogues):
        encoded = tokenizer.encode_batch([text for text, _ in dialogue.pieces])
        ids = []
        for (_, u), piece in zip(dialogue.pieces, encoded, strict=True):
            if u >= 0:
                cut = len(ids) > room
                keys.append((x, u))
                rows.append(ids[len(ids) - room :] if cut else ids)
                if cut:
                    stats.truncated["prompt"] += 1
            ids = ids + piece
    tokens_PT = np.full((len(rows), max_prompt_len), tokenizer.pad_id, np.int32)
    lengths_P = np.zeros(len(rows), np.int32)
    for p, ids in enumerate(rows):
        row = [*bos, *ids]
        tokens_PT[p, : len(row)] = row
        lengths_P[p] = len(row)
    return keys, {"prompt_tokens": tokens_PT, "prompt_lengths": lengths_P}
