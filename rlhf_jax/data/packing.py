"""Packing SFT examples several to a row, for models that attend within segments only.

`pack_sft` groups tokenised SFT examples, in a seeded shuffled order, into packs of at most `max_len`
tokens (next-fit: a pack is closed when the next example does not fit). A packed row holds each example's
`BOS + prompt + completion + EOS` one after the other, with `segment_ids` 1, 2, ... per example and 0 on
padding. Within a segment the layout is that of `pipeline.py`; the target of a segment's last token is
PAD with loss mask 0, so no example predicts the next one. The model must restart positions and mask
attention at segment boundaries (as `models.transformer.positions_from_segments` does). Batches from
`pipeline.batches(pack_sft(data), ...)` have keys tokens, targets, loss_mask, segment_ids [B, T] and
weights, num_examples [B] (0 on padding rows); `example_ids` [B, J] lists each row's examples, -1 padded,
with J the most examples in any pack.
"""

from __future__ import annotations

import dataclasses

import numpy as np

from rlhf_jax.data.pipeline import TokenizedSFT


@dataclasses.dataclass(frozen=True)
class PackedSFT:
    """SFT examples packed into rows: `packs[i]` lists the example indices of row i."""

    data: TokenizedSFT
    packs: list[np.ndarray]
    max_len: int

    def __len__(self) -> int:
        return len(self.packs)

    def row_lengths(self, i: int) -> int:
        """Returns the number of real tokens in pack `i`."""
        return sum(self.data.row_lengths(j) for j in self.packs[i])

    def batch(self, ids_B: np.ndarray, length: int) -> dict[str, np.ndarray]:
        """Returns the packed rows `ids_B` (-1: padding row) padded to `length` tokens."""
        B, J = len(ids_B), max(len(p) for p in self.packs)
        pad = self.data.pad_id
        tokens_BT = np.full((B, length), pad, np.int32)
        targets_BT = np.full((B, length), pad, np.int32)
        loss_mask_BT = np.zeros((B, length), np.float32)
        segment_ids_BT = np.zeros((B, length), np.int32)
        example_ids_BJ = np.full((B, J), -1, np.int32)
        for b, i in enumerate(ids_B):
            if i < 0:
                continue
            offset = 0
            for slot, j in enumerate(self.packs[i]):
                prompt, completion = self.data.prompt_ids[j], self.data.completion_ids[j]
                seq = np.concatenate([prompt, completion])
                seq_len, prompt_len = len(seq), len(prompt)
                tokens_BT[b, offset : offset + seq_len] = seq
                targets_BT[b, offset : offset + seq_len - 1] = seq[1:]
                masks = self.data.completion_masks
                loss_mask_BT[b, offset + prompt_len - 1 : offset + seq_len - 1] = (
                    1.0 if masks is None else masks[j]
                )
                segment_ids_BT[b, offset : offset + seq_len] = slot + 1
                example_ids_BJ[b, slot] = j
                offset += seq_len
        num_examples_B = (example_ids_BJ >= 0).sum(axis=1).astype(np.int32)
        return {
            "tokens": tokens_BT,
            "targets": targets_BT,
            "loss_mask": loss_mask_BT,
            "segment_ids": segment_ids_BT,
            "weights": (num_examples_B > 0).astype(np.float32),
            "num_examples": num_examples_B,
            "example_ids": example_ids_BJ,
        }


def pack_sft(data: TokenizedSFT, *, seed: int = 0) -> PackedSFT:
    """Packs tokenised SFT examples (module docstring); the packs are fixed, `batches` shuffles them.

    Args:
      data: tokenised SFT examples (each already fits `data.max_len`).
      seed: the seed of the order examples are packed in.

    Returns:
      The packs, usable wherever `pipeline.batches` takes tokenised data.
    """
    order = np.random.default_rng(seed).permutation(len(data))
    packs, current, used = [], [], 0
    for j in order:
        length = data.row_lengths(int(j))
        if current and used + length > data.max_len:
            packs.append(np.array(current, np.int64))
            current, used = [], 0
        current.append(int(j))
        used += length
    if current:
        packs.append(np.array(current, np.int64))
    return PackedSFT(data, packs, data.max_len)
