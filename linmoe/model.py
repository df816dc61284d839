"""LinearMoELM: embedding -> blocks (LSM or attention mixer, MoE or dense FFN) -> RMSNorm -> logits."""
import flax.linen as nn
import jax
import jax.numpy as jnp

from linmoe.config import ModelConfig
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
  layer_idx: int
  mode: str = "train"  # see linmoe/layers/mixer.py
  cache_len: int = 0

  @nn.compact
  def __call__(self, x: jnp.ndarray) -> tuple[jnp.ndarray, dict]:
    mixer_cls = LSM_LAYERS[self.cfg.lsm] if self.kind == "L" else CausalAttention
    mixer = mixer_cls(self.cfg, self.layer_idx, self.mode, self.cache_len, name="mixer")
    x = x + mixer(rms_norm(self.cfg, "mixer_norm")(x))
    h = rms_norm(self.cfg, "ffn_norm")(x)
    if uses_moe(self.cfg):
      y, aux = MoE(self.cfg, training=self.mode == "train", name="moe")(h)
    else:
      y, aux = SwiGLU(self.cfg, name="mlp")(h), {}
    return x + y, aux


class LinearMoELM(nn.Module):
  """tokens [batch, seq] int32 -> (logits [batch, seq, vocab] float32, aux losses averaged over layers).

  `mode` and `cache_len` select training, prefill or one-token decoding (linmoe/decode.py).
  """
  cfg: ModelConfig

  @nn.compact
  def __call__(self, tokens: jnp.ndarray, mode: str = "train",
               cache_len: int = 0) -> tuple[jnp.ndarray, dict]:
    cfg = self.cfg
    embed = nn.Embed(cfg.vocab_size, cfg.d_model,
                     embedding_init=logical(nn.initializers.normal(EMBED_INIT_STD), "vocab", "embed"),
                     name="embed")
    x = constrain(embed(tokens).astype(compute_dtype(cfg)))
    aux_per_layer = []
    for i, kind in enumerate(cfg.layer_kinds):
      x, aux = Block(cfg, kind, i, mode, cache_len, name=f"block_{i}")(x)
      x = constrain(x)
      aux_per_layer.append(aux)
    x = rms_norm(cfg, "final_norm")(x)
    logits = nn.Dense(cfg.vocab_size, use_bias=False, dtype=compute_dtype(cfg),
                      kernel_init=dense_init("embed", "vocab"), name="lm_head")(x)
    aux = jax.tree.map(lambda *a: jnp.mean(jnp.stack(a), axis=0), *aux_per_layer) if uses_moe(
        cfg) else {}
    return logits.astype(jnp.float32), aux
