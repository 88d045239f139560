"""Published per-chip figures of Cloud TPU generations, for memory checks and roofline bounds.

Every number is a vendor figure, not a measurement here:

- v4: 275 TFLOP/s bf16, 32 GiB HBM2 at 1200 GB/s (https://cloud.google.com/tpu/docs/v4, "Key
  specifications"); ICI 6 links x 50 GB/s = 300 GB/s per chip (Jouppi et al. 2023, "TPU v4: An Optically
  Reconfigurable Supercomputer for Machine Learning with Hardware Support for Embeddings", ISCA, Table 1).
- v5e: 197 TFLOP/s bf16, 16 GB HBM2 at 819 GB/s, 400 GB/s bidirectional ICI per chip
  (https://cloud.google.com/tpu/docs/v5e, "System architecture").
- v5p: 459 TFLOP/s bf16, 95 GiB HBM2e at 2765 GB/s, 1200 GB/s bidirectional ICI per chip
  (https://cloud.google.com/tpu/docs/v5p, "System architecture").
- v6e (Trillium): 918 TFLOP/s bf16, 32 GB HBM at 1640 GB/s, 800 GB/s bidirectional ICI per chip
  (https://cloud.google.com/tpu/docs/v6e, "System architecture").

HBM capacities are taken as GiB (what XLA's memory analysis and the runtime report against); the v5e
and v6e pages say "GB", a 7% difference that the plans' headroom should not depend on.
"""

from __future__ import annotations

import dataclasses

GiB = 2**30


@dataclasses.dataclass(frozen=True)
class Chip:
    """One TPU chip's published figures.

    Attributes:
      name: the generation as in a topology name ("v5e").
      hbm_bytes: HBM capacity.
      bf16_flops: peak dense bf16 FLOP/s.
      hbm_bytes_per_s: HBM bandwidth.
      ici_bytes_per_s: inter-chip interconnect bandwidth per chip, all links, both directions.
    """

    name: str
    hbm_bytes: int
    bf16_flops: float
    hbm_bytes_per_s: float
    ici_bytes_per_s: float


CHIPS: dict[str, Chip] = {
    "v4": Chip("v4", 32 * GiB, 275e12, 1200e9, 300e9),
    "v5e": Chip("v5e", 16 * GiB, 197e12, 819e9, 400e9),
    "v5p": Chip("v5p", 95 * GiB, 459e12, 2765e9, 1200e9),
    "v6e": Chip("v6e", 32 * GiB, 918e12, 1640e9, 800e9),
}


def chip(topology: str) -> Chip:
    """The chip of a topology name such as "v5e:4x4" or "v5p:4x4x2" (raises ValueError naming the known
    generations)."""
    name = topology.split(":", 1)[0].lower().replace("litepod", "e").replace("lite", "e")
    if name not in CHIPS:
        raise ValueError(f"unknown TPU generation in {topology!r}; known: {sorted(CHIPS)}")
    return CHIPS[name]
