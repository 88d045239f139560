"""Decoder-only transformer (policy, reference, sampler) and reward model on one shared trunk.

Parameter layout (scan_layers=True: a leading L axis on everything under `layers`)::

    decoder/embedding                      [V, D]
    decoder/layers/attn/{q,k,v}_kernel     [L, D, H|G|G, K]   (+ {q,k,v}_bias [L, H|G|G, K], Qwen2)
    decoder/layers/attn/o_kernel           [L, H, K, D]
    decoder/layers/mlp/{gate,up}_kernel    [L, D, F]
    decoder/layers/mlp/down_kernel         [L, F, D]
    decoder/layers/{attn,mlp}_norm/scale   [L, D]
    decoder/layers/post_{attn,mlp}_norm/scale  [L, D]   sandwich_norms (Gemma 2/3)
    decoder/layers/attn/{q,k}_norm/scale   [L, K]       qk_norm (Qwen3, Gemma 3)
    decoder/final_norm/scale               [D]
    lm_head                                [D, V]   Transformer with untied embeddings
    reward_head/{kernel, bias}             [D, 1], [1]   RewardModel

A reward model is initialised from an LM by copying `params["decoder"]`.
"""

import functools

import jax
import jax.numpy as jnp
from flax import linen as nn
from jax.sharding import Mesh

from rlhf_jax import sharding
from rlhf_jax.models.cache import KVCache
from rlhf_jax.models.config import ModelConfig
from rlhf_jax.models.layers import Block, RMSNorm, fan_in, layer_values, rope_tables

_REMAT_POLICIES = {"full": None, "save_dots": jax.checkpoint_policies.dots_with_no_batch_dims_saveable}


def positions_from_segments(segment_ids_BT: jax.Array) -> jax.Array:
    """Position of each token within its segment: 0, 1, ... restarting wherever the segment id changes."""
    B, T = segment_ids_BT.shape
    idx_T = jnp.arange(T, dtype=jnp.int32)
    is_start_BT = jnp.concatenate(
        [jnp.ones((B, 1), bool), segment_ids_BT[:, 1:] != segment_ids_BT[:, :-1]], axis=1
    )
    start_BT = jax.lax.cummax(jnp.where(is_start_BT, idx_T[None, :], 0), axis=1)
    return idx_T[None, :] - start_BT


def last_token_index(segment_ids_BT: jax.Array) -> jax.Array:
    """Index of the last non-padding (segment id != 0) token of each row; works for left or right padding."""
    T = segment_ids_BT.shape[1]
    return T - 1 - jnp.argmax(segment_ids_BT[:, ::-1] != 0, axis=1)


class Decoder(nn.Module):
    """Embedding, the stack of layers, and the final norm; returns normalised hidden states."""

    config: ModelConfig
    mesh: Mesh | None = None
    rules: tuple = sharding.LOGICAL_RULES

    def setup(self):
        c = self.config
        # Untied: unit-variance inputs. Tied: the table is also the output projection of unit-RMS hidden
        # states, so it is scaled to give unit-variance logits (Gemma then rescales inputs by sqrt(D)).
        std = c.d_model**-0.5 if c.tie_embeddings else 1.0
        self.embedding = self.param(
            "embedding",
            nn.with_logical_partitioning(nn.initializers.normal(std), ("vocab", "embed")),
            (c.vocab_size, c.d_model),
            jnp.dtype(c.param_dtype),
        )
        block = Block
        if c.remat != "none":
            # Under a rolled scan the loop already stops XLA's CSE from undoing remat, so prevent_cse is
            # not needed there; unrolled layers (scan_unroll > 1 included) need it.
            rolled = c.scan_layers and c.scan_unroll == 1
            block = nn.remat(Block, policy=_REMAT_POLICIES[c.remat], prevent_cse=not rolled)
        if c.scan_layers:
            block = nn.scan(
                block,
                variable_axes={"params": 0},
                split_rngs={"params": True},
                in_axes=(nn.broadcast, nn.broadcast, nn.broadcast, 0, nn.broadcast, 0, nn.broadcast),
                length=c.num_layers,
                unroll=c.scan_unroll,
                metadata_params={nn.PARTITION_NAME: "layers"},
            )
            self.layers = block(c, self.mesh, self.rules)
        else:
            self.layers = [block(c, self.mesh, self.rules) for _ in range(c.num_layers)]
        self.final_norm = RMSNorm(c)

    def embed(self, tokens_BT: jax.Array, table_VD: jax.Array | None = None) -> jax.Array:
        """Token embeddings [B, T, D] in the compute dtype (times sqrt(D) with `embed_scale`), looked up in
        the model's table, or in `table_VD` (same shape; IFT's frozen copy, `rlhf_jax.train.ift`)."""
        table_VD = self.embedding if table_VD is None else table_VD
        # Gather the table's `embed` shards first (as FSDP does for every weight at use), so the lookup
        # result can be split over the batch without a full rematerialisation by the partitioner.
        table_VD = sharding.constrain(table_VD, self.mesh, ("vocab", None), self.rules)
        x_BTD = jnp.take(table_VD, tokens_BT, axis=0).astype(self.config.dtype)
        if self.config.embed_scale:
            x_BTD = x_BTD * jnp.asarray(self.config.d_model**0.5, x_BTD.dtype)
        return sharding.constrain(x_BTD, self.mesh, ("batch", "length", "act_embed"), self.rules)

    def attend(self, h_BTD: jax.Array) -> jax.Array:
        """Float32 logits against the embedding table (tied LM head)."""
        emb_VD = self.embedding.astype(self.config.dtype)
        return jnp.einsum("BTD,VD->BTV", h_BTD, emb_VD, preferred_element_type=jnp.float32)

    def __call__(
        self, x_BTD, positions_BT, mask_B1TS, start_B=None, kv=None, dist_B1TS=None, segment_ids_BT=None,
        last_B=None,
    ):  # fmt: skip
        """Runs the layers and the final norm.

        Args:
          x_BTD: input embeddings.
          positions_BT: rotary positions.
          mask_B1TS: attention mask (and-ed with causal when `kv` is None), or None.
          start_B: cache slot of each row's first token (with `kv`).
          kv: (k, v) cache buffers (`KVCache` layout), or None for a plain forward.
          dist_B1TS: query position minus key position, for sliding windows (read only when the model
            has a `sliding_window`); default, without a cache, query index minus key index.
          segment_ids_BT: the segment ids `mask_B1TS` was built from, for kernels that take ids instead
            of a mask (splash attention on a TPU, `layers.attention_kernel`), or None.
          last_B: if given, only position last_B[b] of each row is final-normed and returned (T = 1):
            a prefill needs the last prompt token's state only, and XLA:CPU fused the norm of every
            position with the last layer's output matmul into one slow loop (~70 ms of a 1.6 s
            64-prompt sampling call, `bench.sample --profile`).

        Returns:
          (hidden_BTD, kv): final-normed hidden states and the updated buffers (None without a cache).
        """
        c = self.config
        rope_BTk = rope_tables(positions_BT, c.head_dim, c.rope_theta, c.rope_scaling)
        if c.local_rope_theta is not None:  # Gemma 3: sliding layers use a local base, unscaled
            local_BTk = rope_tables(positions_BT, c.head_dim, c.local_rope_theta)
            rope_BTk = {"global": rope_BTk, "local": local_BTk}
        if c.sliding_window is None:
            dist_B1TS = None
        elif dist_B1TS is None:
            idx_T = jnp.arange(x_BTD.shape[1], dtype=jnp.int32)
            dist_B1TS = (idx_T[:, None] - idx_T[None, :])[None, None]
        values_L = {k: jnp.asarray(v) for k, v in layer_values(c).items()} or None
        if c.scan_layers:
            x_BTD, kv = self.layers(
                x_BTD, rope_BTk, mask_B1TS, start_B, kv, dist_B1TS, values_L, segment_ids_BT
            )
        else:
            # The cache of an unrolled model is one buffer per layer, so each layer updates its own in
            # place (a stacked buffer would be sliced and re-stacked, copying it at every step).
            new_kv = []
            for i, layer in enumerate(self.layers):
                layer_kv = None if kv is None else tuple(buffers[i] for buffers in kv)
                values = None if values_L is None else {k: v[i] for k, v in values_L.items()}
                x_BTD, layer_kv = layer(
                    x_BTD, rope_BTk, mask_B1TS, start_B, layer_kv, dist_B1TS, values, segment_ids_BT
                )
                new_kv.append(layer_kv)
            if kv is not None:
                kv = tuple(tuple(layer_kv[j] for layer_kv in new_kv) for j in range(len(kv)))
        if last_B is not None:
            x_BTD = jnp.take_along_axis(x_BTD, last_B[:, None, None], axis=1)
        return self.final_norm(x_BTD), kv


def _positions_and_mask(x_BTD, positions_BT, segment_ids_BT):
    """Default positions (per segment) and the same-segment mask; None mask when there are no segments."""
    B, T = x_BTD.shape[:2]
    if segment_ids_BT is None:
        mask_B1TS = None
        default_BT = jnp.broadcast_to(jnp.arange(T, dtype=jnp.int32), (B, T))
    else:
        mask_B1TS = segment_ids_BT[:, None, :, None] == segment_ids_BT[:, None, None, :]
        default_BT = positions_from_segments(segment_ids_BT)
    return (default_BT if positions_BT is None else positions_BT), mask_B1TS


class Transformer(nn.Module):
    """Decoder-only language model: tokens -> float32 next-token logits.

    For preference training, chosen and rejected sequences go through as one concatenated batch of 2B
    rows (`jnp.concatenate([chosen_BT, rejected_BT])`), one forward pass for both.

    Attributes:
      config: the architecture.
      mesh: if given, activations are constrained to the logical sharding at every block boundary.
      rules: the logical-axis rules table.
    """

    config: ModelConfig
    mesh: Mesh | None = None
    rules: tuple = sharding.LOGICAL_RULES

    def setup(self):
        c = self.config
        self.decoder = Decoder(c, self.mesh, self.rules)
        if not c.tie_embeddings:
            self.lm_head = self.param(
                "lm_head",
                nn.with_logical_partitioning(fan_in(0, 1), ("embed", "vocab")),
                (c.d_model, c.vocab_size),
                jnp.dtype(c.param_dtype),
            )

    def __call__(
        self, tokens_BT=None, *, embeds_BTD=None, positions_BT=None, segment_ids_BT=None, return_hidden=False
    ):
        """Full forward.

        Args:
          tokens_BT: int token ids (or None with `embeds_BTD`).
          embeds_BTD: input embeddings instead of token ids (exactly one of the two is given), in the
            compute dtype and scale of `embed`'s output: `embed(tokens_BT)` here gives the same result,
            bit for bit, as `tokens_BT` (IFT's mixed inputs, `rlhf_jax.train.ift`).
          positions_BT: rotary positions; default 0, 1, ... per row, restarting at each segment.
          segment_ids_BT: packed-sequence ids, 0 = padding; tokens attend only within their segment.
            None: every token is real and the row is one sequence.
          return_hidden: also return the final-normed hidden states.

        Returns:
          float32 logits_BTV, or (logits_BTV, hidden_BTD) with `return_hidden`.
        """
        x_BTD = self._inputs(tokens_BT, embeds_BTD)
        return self.from_embeddings(
            x_BTD, positions_BT=positions_BT, segment_ids_BT=segment_ids_BT, return_hidden=return_hidden
        )

    def embed(self, tokens_BT, *, table_VD=None):
        """The input embeddings [B, T, D] of token ids (`Decoder.embed`), from the model's table or from
        `table_VD` [V, D] (a frozen copy of it); `__call__(embeds_BTD=embed(tokens_BT))` is
        `__call__(tokens_BT)`."""
        return self.decoder.embed(tokens_BT, table_VD)

    def _inputs(self, tokens_BT, embeds_BTD):
        """The input embeddings from exactly one of token ids and embeddings; ValueError otherwise."""
        if (tokens_BT is None) == (embeds_BTD is None):
            raise ValueError(
                "give exactly one of tokens_BT and embeds_BTD, got "
                f"{'both' if tokens_BT is not None else 'neither'}"
            )
        if embeds_BTD is None:
            return self.decoder.embed(tokens_BT)
        if embeds_BTD.ndim != 3 or embeds_BTD.shape[-1] != self.config.d_model:
            raise ValueError(f"embeds_BTD must be [B, T, D={self.config.d_model}], got {embeds_BTD.shape}")
        return sharding.constrain(embeds_BTD, self.mesh, ("batch", "length", "act_embed"), self.rules)

    def from_embeddings(self, x_BTD, *, positions_BT=None, segment_ids_BT=None, return_hidden=False):
        """The forward from input embeddings [B, T, D] (same arguments and result as `__call__`)."""
        positions_BT, mask_B1TS = _positions_and_mask(x_BTD, positions_BT, segment_ids_BT)
        hidden_BTD, _ = self.decoder(x_BTD, positions_BT, mask_B1TS, segment_ids_BT=segment_ids_BT)
        logits_BTV = self.logits(hidden_BTD)
        return (logits_BTV, hidden_BTD) if return_hidden else logits_BTV

    def logits(self, hidden_BTD: jax.Array) -> jax.Array:
        """LM head: float32 logits from final-normed hidden states (bf16 inputs, f32 accumulation),
        soft-capped, cap · tanh(logits / cap), when the model has a `final_softcap` (Gemma 2)."""
        if self.config.tie_embeddings:
            logits_BTV = self.decoder.attend(hidden_BTD)
        else:
            w_DV = self.lm_head.astype(self.config.dtype)
            logits_BTV = jnp.einsum("BTD,DV->BTV", hidden_BTD, w_DV, preferred_element_type=jnp.float32)
        if self.config.final_softcap is not None:
            cap = self.config.final_softcap
            logits_BTV = cap * jnp.tanh(logits_BTV / cap)
        return sharding.constrain(logits_BTV, self.mesh, ("batch", "length", "act_vocab"), self.rules)

    def hidden_and_head(
        self, tokens_BT=None, *, embeds_BTD=None, positions_BT=None, segment_ids_BT=None, return_softcap=False
    ):
        """The forward without the LM head: (final-normed hidden_BTD, LM-head kernel w_DV).

        `hidden_BTD @ w_DV` are the logits of `__call__` before soft-capping; a caller that only needs
        log-probs of some positions (`rlhf_jax.losses.sequence_logps_from_hidden`) applies the head
        itself, to those rows only, and never materialises [B, T, V] logits. Both are in the compute
        dtype.

        Args:
          tokens_BT, embeds_BTD, positions_BT, segment_ids_BT: as for `__call__`.
          return_softcap: also return the model's `final_softcap` (a float, or None), which the caller
            must apply to `hidden_BTD @ w_DV` (`sequence_logps_from_hidden(..., softcap=)`).

        Returns:
          (hidden_BTD, w_DV), or (hidden_BTD, w_DV, softcap) with `return_softcap`.

        Raises:
          ValueError: the model soft-caps its logits and `return_softcap` is False (the caller would
            compute the log-probs of logits the model does not have).
        """
        if self.config.final_softcap is not None and not return_softcap:
            raise ValueError(
                f"the model soft-caps its logits (final_softcap={self.config.final_softcap}): call "
                "hidden_and_head with return_softcap=True and apply the cap (sequence_logps_from_hidden's "
                "softcap=)"
            )
        x_BTD = self._inputs(tokens_BT, embeds_BTD)
        positions_BT, mask_B1TS = _positions_and_mask(x_BTD, positions_BT, segment_ids_BT)
        hidden_BTD, _ = self.decoder(x_BTD, positions_BT, mask_B1TS, segment_ids_BT=segment_ids_BT)
        if self.config.tie_embeddings:
            w_DV = self.decoder.embedding.astype(self.config.dtype).T
        else:
            w_DV = self.lm_head.astype(self.config.dtype)
        return (hidden_BTD, w_DV, self.config.final_softcap) if return_softcap else (hidden_BTD, w_DV)

    def extend(self, tokens_BT, lengths_B, cache: KVCache) -> tuple[jax.Array, KVCache]:
        """Appends right-padded tokens to the cache; returns logits at each row's last new token.

        See `rlhf_jax.models.cache` (`prefill`, `decode_step`) for the layout.
        """
        T, S = tokens_BT.shape[1], jax.tree.leaves(cache.k)[0].shape[-2]
        start_B = cache.lengths_B
        slots_S = jnp.arange(S, dtype=jnp.int32)
        if cache.prefix_k is None:
            # Row b's token at position p sits in slot p: slot <= position is causal, and position - slot
            # is the distance a sliding window limits.
            positions_BT = start_B[:, None] + jnp.arange(T, dtype=jnp.int32)[None, :]
            dist_B1TS = positions_BT[:, None, :, None] - slots_S[None, None, None, :]
            mask_B1TS = dist_B1TS >= 0
            kv = (cache.k, cache.v)
        else:
            # A shared prefix (see `KVCache`): row b continues prefix row b // N, whose first
            # prefix_lengths_P slots hold positions 0, 1, ...; its own slot j holds position prefix + j.
            # The attention's columns are the prefix's R slots, then the row's own S.
            B, P = start_B.shape[0], cache.prefix_lengths_P.shape[0]
            R = jax.tree.leaves(cache.prefix_k)[0].shape[-2]
            prefix_B = jnp.repeat(cache.prefix_lengths_P, B // P)
            positions_BT = (prefix_B + start_B)[:, None] + jnp.arange(T, dtype=jnp.int32)[None, :]
            slots_R = jnp.arange(R, dtype=jnp.int32)
            slots_BC = jnp.concatenate(
                [jnp.broadcast_to(slots_R[None, :], (B, R)), prefix_B[:, None] + slots_S[None, :]], axis=1
            )
            dist_B1TS = positions_BT[:, None, :, None] - slots_BC[:, None, None, :]
            filled_BC = jnp.concatenate(
                [slots_R[None, :] < prefix_B[:, None], jnp.ones((B, S), bool)], axis=1
            )
            mask_B1TS = (dist_B1TS >= 0) & filled_BC[:, None, None, :]
            kv = (cache.k, cache.v, cache.prefix_k, cache.prefix_v)
        x_BTD = self.decoder.embed(tokens_BT)
        last_B1D, kv = self.decoder(
            x_BTD, positions_BT, mask_B1TS, start_B, kv, dist_B1TS, last_B=lengths_B - 1
        )
        logits_BV = self.logits(last_B1D)[:, 0]
        return logits_BV, cache._replace(k=kv[0], v=kv[1], lengths_B=start_B + lengths_B)


class RewardModel(nn.Module):
    """Scalar reward: a linear head on the hidden state of each row's last non-padding token.

    The same module is RSO's pairwise preference ("ranking") model when its input holds prompt +
    response A + response B (formatted by the caller): the reward is then the logit of P(A > B), trained
    with a sigmoid cross-entropy on which response was preferred.

    Attributes:
      config: the architecture of the trunk (identical to the policy's, so the trunk can be copied from
        an LM's `params["decoder"]`).
      mesh: as for `Transformer`.
      rules: the logical-axis rules table.
    """

    config: ModelConfig
    mesh: Mesh | None = None
    rules: tuple = sharding.LOGICAL_RULES

    def setup(self):
        self.decoder = Decoder(self.config, self.mesh, self.rules)
        self.reward_head = nn.Dense(
            1,
            dtype=jnp.float32,
            param_dtype=jnp.dtype(self.config.param_dtype),
            kernel_init=nn.with_logical_partitioning(fan_in(0, 1), ("embed", None)),
            bias_init=nn.with_logical_partitioning(nn.initializers.zeros, (None,)),
        )

    def __call__(self, tokens_BT, segment_ids_BT=None, *, positions_BT=None):
        """Rewards of a batch of sequences.

        Args:
          tokens_BT: int token ids, left- or right-padded.
          segment_ids_BT: 1 for real tokens, 0 for padding (one sequence per row); None = no padding.
          positions_BT: rotary positions; default 0, 1, ... from the first real token.

        Returns:
          float32 rewards_B.
        """
        x_BTD = self.decoder.embed(tokens_BT)
        positions_BT, mask_B1TS = _positions_and_mask(x_BTD, positions_BT, segment_ids_BT)
        hidden_BTD, _ = self.decoder(x_BTD, positions_BT, mask_B1TS, segment_ids_BT=segment_ids_BT)
        if segment_ids_BT is None:
            last_BD = hidden_BTD[:, -1]
        else:
            last_B = last_token_index(segment_ids_BT)
            last_BD = jnp.take_along_axis(hidden_BTD, last_B[:, None, None], axis=1)[:, 0]
        return self.reward_head(last_BD)[:, 0]

    def values(self, tokens_BT, segment_ids_BT=None, *, positions_BT=None):
        """The head at every position: PPO's critic V(s_t), [B, T] float32.

        Position t reads tokens 0..t, the state before the token that follows it, so `values_BT[:, t]`
        is the value of emitting `targets[:, t]` (the pipeline layout's `tokens` are the row shifted
        right of its `targets`). The reward of a row is its value at its last real token, so a critic
        initialised from a reward model starts from that reward model's scores (Ouyang et al. 2022's
        value function "initialized from the RM"; TRL's `PPOTrainer` value model).
        """
        x_BTD = self.decoder.embed(tokens_BT)
        positions_BT, mask_B1TS = _positions_and_mask(x_BTD, positions_BT, segment_ids_BT)
        hidden_BTD, _ = self.decoder(x_BTD, positions_BT, mask_B1TS, segment_ids_BT=segment_ids_BT)
        return self.reward_head(hidden_BTD)[..., 0]


def _boxed_params(model: nn.Module):
    """Abstract parameters, still boxed with their logical axes (shapes do not depend on the mesh)."""
    tokens = jnp.zeros((1, 1), jnp.int32)
    return jax.eval_shape(lambda: model.clone(mesh=None).init(jax.random.key(0), tokens)["params"])


def param_logical_axes(model: nn.Module):
    """Pytree of logical-axis tuples, one per parameter (same structure as the params)."""
    return jax.tree.map(
        lambda b: b.names, _boxed_params(model), is_leaf=lambda x: isinstance(x, nn.Partitioned)
    )


def param_shapes(model: nn.Module):
    """Pytree of `jax.ShapeDtypeStruct`, one per parameter; nothing is allocated."""
    return nn.meta.unbox(_boxed_params(model))


def param_shardings(model: nn.Module, mesh: Mesh | None = None):
    """NamedSharding of every parameter under `model.rules`; raises ValueError on indivisible dimensions.

    Args:
      model: a `Transformer` or `RewardModel`.
      mesh: default `model.mesh`.

    Returns:
      A pytree of NamedSharding with the structure of the params.
    """
    mesh = model.mesh if mesh is None else mesh
    if mesh is None:
        raise ValueError("param_shardings needs a mesh (pass one, or build the model with mesh=...)")

    def one(path, box):
        what = f"param {jax.tree_util.keystr(path)}"
        return sharding.logical_sharding(mesh, box.names, model.rules, shape=box.value.shape, what=what)

    return jax.tree_util.tree_map_with_path(
        one, _boxed_params(model), is_leaf=lambda x: isinstance(x, nn.Partitioned)
    )


@functools.lru_cache(maxsize=16)
def _jitted_init(model: nn.Module):
    """The jitted initialiser of `model`, compiled once per model (and mesh) however many keys are used."""
    tokens = jnp.zeros((1, 1), jnp.int32)
    init = lambda rng: nn.meta.unbox(model.clone(mesh=None).init(rng, tokens)["params"])
    return jax.jit(init, out_shardings=None if model.mesh is None else param_shardings(model))


def init_params(model: nn.Module, rng: jax.Array):
    """Initialises parameters, born sharded on `model.mesh` (never whole on one device) if it has one.

    Args:
      model: a `Transformer` or `RewardModel`.
      rng: a PRNG key. The values do not depend on the mesh (partitionable threefry).

    Returns:
      The params pytree (unboxed arrays), to be used as `model.apply({"params": params}, ...)`.
    """
    return _jitted_init(model)(rng)


def unstack_layers(params, num_layers: int):
    """Scanned layout (`decoder/layers` with a leading L axis) -> unrolled (`decoder/layers_0`, ...)."""
    decoder = dict(params["decoder"])
    stacked = decoder.pop("layers")
    for i in range(num_layers):
        decoder[f"layers_{i}"] = jax.tree.map(lambda x, i=i: x[i], stacked)
    return {**params, "decoder": decoder}


def stack_layers(params, num_layers: int):
    """Unrolled layout (`decoder/layers_0`, ...) -> scanned (`decoder/layers` with a leading L axis)."""
    decoder = dict(params["decoder"])
    layers = [decoder.pop(f"layers_{i}") for i in range(num_layers)]
    decoder["layers"] = jax.tree.map(lambda *xs: jnp.stack(xs), *layers)
    return {**params, "decoder": decoder}
