"""rlhf_jax: preference optimization of language models in JAX/Flax.

Dimension key for shape-suffixed names
--------------------------------------
Arrays carry their shape in their name, so shapes never live in comments: ``logits_BTV`` is a
[batch, tokens, vocab] array, ``logps_B`` one value per sequence. Einsum strings use the same letters
(``"BTD,DHK->BTHK"``). Each letter has one meaning everywhere:

  B: batch: sequences (for preference data, pairs, or 2x pairs after concatenating chosen and
     rejected); in ``rejection.Pairs``, the pairs of one prompt
  T: tokens (sequence positions)
  S: key positions (attention keys, KV-cache slots): a second token axis
  E: the key positions up to the end of one query block (a prefix of S; blocked attention)
  R: flattened rows B·T (or the masked-in ones), for 2-D matmuls and the log-probs
  C: the rows of one chunk of a longer axis processed per loop step (of R in the log-probs, of T in
     blocked attention)
  I: chunks (R = I·C)
  D: model width (embedding dimension)
  V: vocabulary
  H: attention (query) heads
  G: key/value heads (grouped-query attention); in the policy-gradient losses' pinned names
     (``rewards_PG``, ``advantages_PG``) the group of samples of one prompt (= N there)
  Q: query heads per key/value head (H = G·Q)
  K: head dimension; k: half of it, the rotary frequencies (K/2)
  F: MLP hidden width
  L: layers
  P: prompts
  N: samples (candidates) per prompt
  U: turns of a multi-turn dialogue (the assistant turns that carry loss; ``losses.epo``)
  M: accepted samples per prompt (rejection sampling; M <= N)
  A: candidate tokens per row left by top-k / top-p (sampling; A <= V)
  X: examples of a whole dataset, before batching (``ids_B`` index into it)
  J: examples packed into one row (``data.packing``)
  Z: batch shards, the devices the batch is split over (``sharding.batch_shards``; the log-probs
     compact and chunk each shard's rows on its own device)
  1, 2: an axis of that literal size (``mask_B1TS`` broadcasts; ``used_PB2``: the two of a pair)

A dimension that is split names both parts (``x_BTHK``); a scalar has no suffix. A part of an axis is
named with a subscript in docstrings (``[P, Tp]``: the prompts' tokens).

Public modules:

  ``rlhf_jax.losses``     pure loss functions (the DPO family, TRL's loss types, reward-model losses,
                          log-probs) and their registry (``losses.registry``, ``losses.make``)
  ``rlhf_jax.models``     the Flax decoder, reward and ranking heads, KV cache, presets, sharded init
  ``rlhf_jax.sharding``   the device mesh and the logical-axis rules
  ``rlhf_jax.sampling``   decoding only: jitted KV-cached sampling and its policies
  ``rlhf_jax.scoring``    scoring sampled completions: training rows, reward and ranking scores,
                          padded-chunk runner
  ``rlhf_jax.rejection``  RSO's statistical rejection sampling and pair ranking
  ``rlhf_jax.rewards``    rewards for online RL: answer checks, format, length, reward models, combine
  ``rlhf_jax.data``       readers, record formats, tokenizer, grain pipelines, the synthetic TL;DR task
  ``rlhf_jax.train``      the jitted train step, loop, optimizers, checkpoints, metrics
  ``rlhf_jax.interop``    HuggingFace checkpoints in and out
  ``rlhf_jax.pipelines``  the stages (SFT, reward model, preference, RSO, INPO) and their fingerprints
"""

__version__ = "0.1.0"
