"""Rejection-sampling fine-tuning (RFT): keep the verified, distinct samples of each problem as SFT data.

The data recipe of RFT (Yuan et al. 2023, arXiv 2308.01825, "Scaling Relationship on Learning
Mathematical Reasoning with LLMs"), used at scale by OpenMathInstruct-2 (Toshniwal et al. 2024, arXiv
2410.01560) and Light-R1 (arXiv 2503.10460): for each problem p draw N solutions y_1..y_N ~ π(·|p), keep

    D_p = dedup({ y_n : verify(y_n, a_p) = 1 })

and fine-tune on ∪_p {(p, y) : y ∈ D_p}; with the fine-tuned policy as π, repeat for K rounds.

Deduplication is exact text equality after whitespace normalisation (`normalise`: runs of whitespace
become one space, ends stripped), within a problem and against the problem's earlier keeps (the first
occurrence is kept, in sample order). Yuan et al. deduplicate by the sequence of equations instead; the
whitespace rule is the stricter-to-merge, task-agnostic one and is what the counts here report.
Verification is the caller's (on `arith`, `rewards.gsm8k`: the number after `####` equals the gold).
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Sequence

_SPACE = re.compile(r"\s+")


def normalise(text: str) -> str:
    """Whitespace-normalised text: runs of whitespace become one space, ends stripped (the dedup key)."""
    return _SPACE.sub(" ", text).strip()


@dataclasses.dataclass(frozen=True)
class Selection:
    """The kept solutions of one round and its counts.

    Attributes:
      kept: `(problem_index, solution)` pairs, problems in order, each problem's solutions in sample order.
      problems: number of problems.
      problems_solved: problems with at least one verified solution.
      samples: solutions drawn in all.
      verified: solutions whose answer verifies.
      duplicates: verified solutions dropped as duplicates (`verified = len(kept) + duplicates`).
    """

    kept: list[tuple[int, str]]
    problems: int
    problems_solved: int
    samples: int
    verified: int
    duplicates: int

    def counts(self) -> dict[str, int]:
        """The counts as a flat dict (for metrics)."""
        return {
            "problems": self.problems,
            "problems_solved": self.problems_solved,
            "samples": self.samples,
            "verified": self.verified,
            "kept": len(self.kept),
            "duplicates": self.duplicates,
        }


def select(solutions_PN: Sequence[Sequence[str]], correct_PN: Sequence[Sequence[bool]]) -> Selection:
    """Keeps the verified, whitespace-distinct solutions of each problem (module docstring).

    Args:
      solutions_PN: per problem, its N sampled solutions (N may differ between problems).
      correct_PN: per problem, whether each solution's answer verifies (same shape).

    Returns:
      The `Selection`.
    """
    if len(solutions_PN) != len(correct_PN):
        raise ValueError(f"{len(solutions_PN)} problems of solutions but {len(correct_PN)} of verdicts")
    kept, solved, samples, verified, duplicates = [], 0, 0, 0, 0
    for p, (sols, oks) in enumerate(zip(solutions_PN, correct_PN, strict=True)):
        if len(sols) != len(oks):
            raise ValueError(f"problem {p}: {len(sols)} solutions but {len(oks)} verdicts")
        samples += len(sols)
        seen = set()
        for s, ok in zip(sols, oks, strict=True):
            if not ok:
                continue
            verified += 1
            key = normalise(s)
            if key in seen:
                duplicates += 1
                continue
            seen.add(key)
            kept.append((p, s))
        solved += bool(seen)
    return Selection(kept, len(solutions_PN), solved, samples, verified, duplicates)
