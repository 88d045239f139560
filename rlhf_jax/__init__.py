"""rlhf_jax: preference optimization of language models in JAX/Flax.

Dimension key for shape-suffixed names
--------------------------------------
Arrays carry their shape in their name, so shapes never live in comments: ``logits_BTV`` is a
[batch, tokens, vocab] array, ``logps_B`` one value per sequence. Einsum strings use the same letters
(``"BTD,DHK->BTHK"``). The letters:

  B: batch (sequences; for preference data, pairs or 2x pairs after concatenating chosen and rejected)
  T: tokens (sequence positions; S for a second sequence axis, e.g. key positions in attention)
  D: model width (embedding dimension)
  V: vocabulary
  H: attention (query) heads; G: key/value heads (grouped-query attention)
  K: head dimension
  F: MLP hidden width
  N: samples per prompt
  M: accepted samples per prompt (rejection sampling)
  L: layers
  P: prompts

A dimension that is split names both parts (``x_BTHK``); a scalar has no suffix.

Public modules: ``rlhf_jax.losses`` (preference and reward-model losses).
"""

__version__ = "0.1.0"
