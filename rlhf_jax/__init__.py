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

Public modules:

  ``rlhf_jax.losses``     pure loss functions (the DPO family, TRL's loss types, reward-model losses,
                          log-probs) and a registry (``losses.make``, ``losses.names``)
  ``rlhf_jax.models``     the Flax decoder, reward and ranking heads, KV cache, presets, sharded init
  ``rlhf_jax.sharding``   the device mesh and the logical-axis rules
  ``rlhf_jax.sampling``   jitted KV-cached sampling
  ``rlhf_jax.scoring``    samples as training rows, reward and ranking scores, log-probs, the chunk runner
  ``rlhf_jax.rejection``  RSO's statistical rejection sampling and pair ranking
  ``rlhf_jax.data``       readers, record formats, tokenizer, grain pipelines, the synthetic TL;DR task
  ``rlhf_jax.train``      the jitted train step, loop, optimizers, checkpoints, metrics
  ``rlhf_jax.interop``    HuggingFace checkpoints in and out
  ``rlhf_jax.pipelines``  the stages (SFT, reward model, preference, RSO, INPO) and their fingerprints
"""

__version__ = "0.1.0"
