"""LinearMoELM: embedding -> blocks (LSM or attention mixer, MoE or dense FFN) -> RMSNorm -> logits."""
import flax.linen as nn
import jax
import jax.numpy as jnp

from linmoe.config import ModelConfig
from linmoe.kernels import segments
from linmoe.layers import LSM_LAYERS
from linmoe.layers.attention import CausalAttention
from linmoe.layers.common import EMBED_INIT_STD, compute_dtype, rms_norm
from linmoe.layers.mlp import SwiGLU
from linmoe.layers.moe import MoE
from linmoe.parallel.rules import constrain, dense_init, logical

def uses_moe(cfg: ModelConfig) -> bool:
  return cfg.moe.num_experts > 1


class Block(nn.Module):
  """x + Mixer(norm(x)), then + FFN(norm(x)); [batch, seq, d_model] -> same, plus aux losses."""
  cfg: ModelConfig
  kind: str  # "L" (LSM mixer) or "N" (softmax attention)
  layer_idx: int | jax.Array  # depth in the stack (a traced scalar in a scanned stack)
  mode: str = "train"  # see linmoe/layers/mixer.py
  cache_len: int = 0

  @nn.compact
  def __call__(self, x: jnp.ndarray, segment_ids: jnp.ndarray | None = None) -> tuple[jnp.ndarray, dict]:
    """segment_ids [batch, seq] int32 | None: the document of each token (only the mixer mixes tokens)."""
    mixer_cls = LSM_LAYERS[self.cfg.lsm] if self.kind == "L" else CausalAttention
    mixer = mixer_cls(self.cfg, self.layer_idx, self.mode, self.cache_len, name="mixer")
    x = x + mixer(rms_norm(self.cfg, "mixer_norm")(x), segment_ids)
    h = rms_norm(self.cfg, "ffn_norm")(x)
    if uses_moe(self.cfg):
      y, aux = MoE(self.cfg, training=self.mode == "train", name="moe")(h)
    else:
      y, aux = SwiGLU(self.cfg, name="mlp")(h), {}
    return x + y, aux


REMAT_POLICIES = {  # model.remat -> what a rematerialized block keeps from its forward pass
    "block": jax.checkpoint_policies.nothing_saveable,  # only the block's input
    "save_matmuls": jax.checkpoint_policies.dots_with_no_batch_dims_saveable,  # and its matmul outputs
}


def block_class(cfg: ModelConfig) -> type[Block]:
  """Block, or Block under `nn.remat` with the policy of `model.remat`."""
  if cfg.remat == "none":
    return Block
  return nn.remat(Block, policy=REMAT_POLICIES[cfg.remat], prevent_cse=not cfg.scan_layers)


def stack_aux(auxes: list[dict]) -> dict:
  """Per-block aux dicts -> one dict of arrays with a leading [blocks] axis."""
  return jax.tree.map(lambda *a: jnp.stack(a), *auxes)


class Unit(nn.Module):
  """One repeat of `model.pattern` (e.g. LLLN), the body of the scanned layer stack:
  [batch, seq, d_model] and segment_ids [batch, seq] | None (the same in every repeat) -> (x, aux stacked
  over the unit's blocks).

  `repeat` (int32 scalar, scanned over) numbers the repeat, so each block gets its depth in the whole stack,
  layer_idx = repeat * len(pattern) + j, as a traced scalar: the LSMs that depend on their depth
  (lightning, hgrn2, rwkv6, rwkv7) use it in array arithmetic only, so they scan too."""
  cfg: ModelConfig
  mode: str = "train"
  cache_len: int = 0

  @nn.compact
  def __call__(self, x: jnp.ndarray, segment_ids: jnp.ndarray | None,
               repeat: jnp.ndarray) -> tuple[jnp.ndarray, dict]:
    auxes = []
    for j, kind in enumerate(self.cfg.pattern):
      layer_idx = repeat * len(self.cfg.pattern) + j
      block = block_class(self.cfg)(self.cfg, kind, layer_idx, self.mode, self.cache_len, name=f"block_{j}")
      x, aux = block(x, segment_ids)
      x = constrain(x)
      auxes.append(aux)
    return x, stack_aux(auxes)


class LinearMoELM(nn.Module):
  """tokens [batch, seq] int32 -> (logits [batch, seq, vocab] float32, aux losses averaged over layers).

  `segment_ids` [batch, seq] int32 | None numbers the packed documents of each row (a new document where
  the id changes, linmoe/kernels/segments.py): no layer lets information cross a document boundary, so
  each document's logits are those of the document alone. None: one document per row (decoding).

  `logits_at` [batch, n] int32 | None: the positions whose logits are returned ([batch, n, vocab]); the
  others never reach the output head, so a long prefill or a loss on a few positions does not form the
  [batch, seq, vocab] logits. None: every position.

  `mode` and `cache_len` select training, prefill or one-token decoding (linmoe/decode.py). With
  `model.scan_layers` the whole repeats of the pattern run as one `nn.scan` over a `Unit` (parameters
  and caches under "layers" with a leading [repeats] axis, logical name "layers"), so compile time does
  not grow with depth; the blocks past the last whole repeat follow unrolled as block_{i}.
  """
  cfg: ModelConfig

  @nn.compact
  def __call__(self, tokens: jnp.ndarray, mode: str = "train", cache_len: int = 0,
               segment_ids: jnp.ndarray | None = None,
               logits_at: jnp.ndarray | None = None) -> tuple[jnp.ndarray, dict]:
    cfg = self.cfg
    segments.check(segment_ids, *tokens.shape)
    embed = nn.Embed(cfg.vocab_size, cfg.d_model,
                     embedding_init=logical(nn.initializers.normal(EMBED_INIT_STD), "vocab", "embed"),
                     name="embed")
    x = constrain(embed(tokens).astype(compute_dtype(cfg)))
    aux_stacks, first_unrolled = [], 0
    if cfg.scan_layers:
      repeats = cfg.n_layers // len(cfg.pattern)
      scanned = nn.scan(Unit, variable_axes={"params": 0, "cache": 0}, split_rngs={"params": True},
                        in_axes=(nn.broadcast, 0), length=repeats,
                        metadata_params={nn.PARTITION_NAME: "layers"})
      x, aux = scanned(cfg, mode, cache_len, name="layers")(x, segment_ids, jnp.arange(repeats))
      aux_stacks.append(jax.tree.map(lambda a: a.reshape(-1, *a.shape[2:]), aux))  # [repeats * unit]
      first_unrolled = repeats * len(cfg.pattern)
    for i in range(first_unrolled, cfg.n_layers):
      x, aux = block_class(cfg)(cfg, cfg.layer_kinds[i], i, mode, cache_len, name=f"block_{i}")(
          x, segment_ids)
      x = constrain(x)
      aux_stacks.append(stack_aux([aux]))
    if logits_at is not None:
      x = jnp.take_along_axis(x, logits_at[..., None], axis=1)  # [batch, n, d_model]
    x = rms_norm(cfg, "final_norm")(x)
    logits = nn.Dense(cfg.vocab_size, use_bias=False, dtype=compute_dtype(cfg),
                      kernel_init=dense_init("embed", "vocab"), name="lm_head")(x)
    aux = jax.tree.map(lambda *a: jnp.mean(jnp.concatenate(a), axis=0), *aux_stacks) if uses_moe(
        cfg) else {}
    return logits.astype(jnp.float32), aux


def init_params(module: nn.Module, rng: jax.Array, *inputs) -> dict:
  """`module.init(rng, *inputs)["params"]` as plain arrays (the trainer keeps the logical-axis boxes to
  derive shardings; everything else wants the arrays)."""
  return nn.meta.unbox(module.init(rng, *inputs)["params"])
