"""The embedded multi-turn dialogue task (`data.task=dialogue`): a running total kept over HH-style turns,
with a programmatic reward for every assistant turn.

A dialogue is Anthropic-HH text, `"\\n\\nHuman: ...\\n\\nAssistant: ..."` repeated, in which the human
sets a running total and then changes it, one instruction per turn, and the assistant states the total
after each instruction:

  \\n\\nHuman: Start a running total at 7.\\n\\nAssistant: The total is 7.
  \\n\\nHuman: Add 5.\\n\\nAssistant: The total is 12.
  \\n\\nHuman: Subtract 3.\\n\\nAssistant: The total is 9.

Gold per-turn reward (`turn_reward`): +1 when the first integer of the reply (up to its first newline)
is the true total after that turn's instruction, −1 otherwise (no integer, or a wrong one). The truth
depends on every earlier instruction, so the task needs the dialogue's history.

Training dialogues are demonstrations with slips, like the arithmetic task's (`synthetic_arith`): at
each assistant turn, with probability `error_rate`, the assistant states a total off by 1 to 3 and keeps
counting from its own (wrong) total afterwards, so every later turn of that dialogue is wrong too. SFT
imitates them; the per-turn rewards say which turns were right (EPO's offline data). Held-out dialogues
(`eval`) are slip-free: evaluation replies to each turn after the correct history.
"""

from __future__ import annotations

import dataclasses
import re

import numpy as np

from rlhf_jax.data import records as rec

HUMAN, ASSISTANT = "\n\nHuman:", "\n\nAssistant:"
_INTEGER_RE = re.compile(r"-?\d+")


@dataclasses.dataclass(frozen=True)
class DialogueExample:
    """A multi-turn dialogue as text pieces, with one reward per assistant turn.

    `pieces` are (text, turn) in order: turn -1 for the text around the replies (human turns and the
    "Assistant:" cue), u = 0, 1, ... for the u-th assistant reply, in order, each reply one piece.
    `turn_rewards[u]` is reply u's reward; `meta` carries extras (the true totals).
    """

    pieces: tuple[tuple[str, int], ...]
    turn_rewards: tuple[float, ...]
    meta: dict = dataclasses.field(default_factory=dict, compare=False, hash=False)

    def __post_init__(self):
        turns = [u for _, u in self.pieces if u >= 0]
        if turns != list(range(len(turns))):
            raise ValueError(f"DialogueExample: reply turns must be 0, 1, ... in order, got {turns}")
        if len(self.turn_rewards) != len(turns):
            raise ValueError(f"DialogueExample: {len(turns)} replies but {len(self.turn_rewards)} rewards")

    @property
    def num_turns(self) -> int:
        return len(self.turn_rewards)

    def text(self) -> str:
        return "".join(t for t, _ in self.pieces)

    def to_sft(self) -> rec.SFTExample:
        """The SFT view: the whole dialogue, every assistant reply trained (`SFTExample.segments`)."""
        segments = tuple((t, u >= 0) for t, u in self.pieces)
        first = next(i for i, (_, trained) in enumerate(segments) if trained)
        prompt = "".join(t for t, _ in segments[:first])
        return rec.SFTExample(prompt=prompt, completion=self.text()[len(prompt) :], segments=segments)

    def turn_prompts(self) -> list[str]:
        """The prompt of each assistant turn: the dialogue up to and including its "Assistant:" cue."""
        out, text = [], ""
        for piece, u in self.pieces:
            if u >= 0:
                out.append(text)
            text += piece
        return out


@dataclasses.dataclass(frozen=True)
class DialogueConfig:
    """Attributes: min_turns, max_turns (assistant turns per dialogue), error_rate (per-turn slip
    probability of the training demonstrations), start (the first total's range, inclusive) and step
    (the range of each addend or subtrahend, inclusive)."""

    min_turns: int = 2
    max_turns: int = 4
    error_rate: float = 0.3
    start: tuple[int, int] = (1, 20)
    step: tuple[int, int] = (1, 9)

    def __post_init__(self):
        if not 1 <= self.min_turns <= self.max_turns:
            raise ValueError(f"need 1 <= min_turns <= max_turns, got {self.min_turns}, {self.max_turns}")
        if not 0 <= self.error_rate <= 1:
            raise ValueError(f"error_rate must be in [0, 1], got {self.error_rate}")


def first_integer(reply: str) -> int | None:
    """The first integer of the reply's first line, or None."""
    match = _INTEGER_RE.search(reply.split("\n", 1)[0])
    return None if match is None else int(match.group())


def turn_reward(reply: str, total: int) -> float:
    """The gold reward of one assistant reply: +1 if it states `total` (its first integer), else −1."""
    return 1.0 if first_integer(reply) == total else -1.0


def generate(
    n: int, *, seed: int, config: DialogueConfig = DialogueConfig(), slips: bool = True
) -> list[DialogueExample]:
    """`n` dialogues from `seed` (module docstring); `slips=False` gives correct demonstrations."""
    rng = np.random.default_rng(seed)
    out = []
    for _ in range(n):
        turns = int(rng.integers(config.min_turns, config.max_turns + 1))
        truth = said = int(rng.integers(config.start[0], config.start[1] + 1))
        pieces, rewards, totals = [], [], []
        for u in range(turns):
            if u == 0:
                instruction = f"Start a running total at {truth}."
            else:
                k = int(rng.integers(config.step[0], config.step[1] + 1))
                sign = 1 if rng.random() < 0.5 else -1
                instruction = f"{'Add' if sign > 0 else 'Subtract'} {k}."
                truth, said = truth + sign * k, said + sign * k
            if slips and rng.random() < config.error_rate:
                said += int(rng.choice([-3, -2, -1, 1, 2, 3]))
            reply = f" The total is {said}."
            pieces += [(f"{HUMAN} {instruction}{ASSISTANT}", -1), (reply, u)]
            rewards.append(turn_reward(reply, truth))
            totals.append(truth)
        out.append(DialogueExample(tuple(pieces), tuple(rewards), meta={"totals": tuple(totals)}))
    return out
