"""Causal depthwise short convolution (Mamba, DeltaNet, ...) that carries its left context for decoding."""
import flax.linen as nn
import jax.numpy as jnp

from linmoe.kernels import segments
from linmoe.layers.mixer import cache_variable
from linmoe.parallel import sequence
from linmoe.parallel.rules import logical, zeros_init


class ShortConv(nn.Module):
  """y_t = sum_{i < width} w_i * x_{t - width + 1 + i} per channel; [batch, seq, channels] -> same.

  The left context is zeros in "train" and "prefill", and the last width - 1 inputs (kept in the
  cache) in "decode". One code path: concatenate context and input, then a valid convolution. With the
  sequence split over the mesh ("train", "eval"), each shard's context is the end of the previous shard
  (inputs and segment ids). With segment_ids [batch, seq] a tap reading token t - j contributes only if
  that token is in the document of token t, so no document sees the one before it.
  """
  mode: str = "train"
  width: int = 4
  activation: bool = True  # SiLU after the convolution

  @nn.compact
  def __call__(self, x: jnp.ndarray, segment_ids: jnp.ndarray | None = None) -> jnp.ndarray:
    batch, seq, channels = x.shape
    kernel_init = logical(nn.initializers.lecun_normal(in_axis=0, out_axis=1), "conv", "channels")
    kernel = self.param("kernel", kernel_init, (self.width, channels)).astype(x.dtype)
    bias = self.param("bias", zeros_init("channels"), (channels,)).astype(x.dtype)
    context_width = self.width - 1
    if sequence.is_split(self.mode):
      # The first shard's context is zeros, as unsplit: no need to know where the tokens start.
      convolve = lambda full, start, kernel, bias: self.convolve(*full, kernel, bias)
      return sequence.with_left_context(convolve, (x, segment_ids), context_width, whole=(kernel, bias))
    zeros = jnp.zeros((batch, context_width, channels), x.dtype)
    cache = cache_variable(self, self.mode, "context", lambda: zeros)
    context = cache.value.astype(x.dtype) if self.mode == "decode" else zeros
    full = jnp.concatenate([context, x], axis=1)  # [B, width - 1 + seq, C]
    if cache is not None:
      cache.value = full[:, seq:]
    if segment_ids is not None:  # the zero context may take any id: it adds nothing
      segment_ids = jnp.pad(segment_ids, [(0, 0), (context_width, 0)], mode="edge")
    return self.convolve(full, segment_ids, kernel, bias)

  def convolve(self, full: jnp.ndarray, full_ids: jnp.ndarray | None, kernel: jnp.ndarray,
               bias: jnp.ndarray) -> jnp.ndarray:
    """[batch, width - 1 + seq, C] context and input, with their segment ids [batch, width - 1 + seq]
    or None -> [batch, seq, C]."""
    seq = full.shape[1] - (self.width - 1)
    windows = jnp.stack([full[:, i:i + seq] for i in range(self.width)], axis=2)  # [B, T, W, C]
    if full_ids is not None:
      own = full_ids[:, self.width - 1:]
      same = jnp.stack([full_ids[:, i:i + seq] == own for i in range(self.width)], axis=2)  # [B, T, W]
      windows = segments.keep(same, windows)
    y = jnp.einsum("btwc,wc->btc", windows, kernel) + bias
    return nn.silu(y) if self.activation else y
