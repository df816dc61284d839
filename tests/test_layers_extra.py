"""What the zoo harness does not reach: Based with its sliding-window softmax attention, and GSA's two passes
against the slot recurrence of its paper."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from linmoe import kernels
from linmoe.decode import cache_bytes
from linmoe.layers.based import Based
from linmoe.layers.gsa import per_slot_heads
from linmoe.layers.window_attention import sliding_window_attention
from tests.test_lsm_zoo import zoo_config

SEQ, PROMPT, WINDOW = 21, 9, 4  # SEQ spans several windows and is not a multiple of WINDOW


class WindowedBased(Based):
  window = WINDOW


@pytest.mark.parametrize("window", [WINDOW, 32])
def test_sliding_window_attention_matches_band_masked_attention(window):
  q, k, v = jax.random.normal(jax.random.key(0), (3, 2, SEQ, 2, 8))
  i, j = jnp.arange(SEQ)[:, None], jnp.arange(SEQ)[None, :]
  band = (j <= i) & (j > i - window)
  expected = jax.nn.dot_product_attention(q, k, v, mask=band[None, None])
  actual = jax.jit(sliding_window_attention, static_argnums=3)(q, k, v, window)
  np.testing.assert_allclose(actual, expected, atol=1e-6)


def test_windowed_based_decodes_like_the_parallel_forward():
  cfg = zoo_config("based")
  x = jax.random.normal(jax.random.key(1), (2, SEQ, cfg.d_model))
  layer = lambda mode: WindowedBased(cfg, 0, mode)
  params = jax.jit(layer("train").init)(jax.random.key(0), x)
  assert "window_q_proj" in params["params"]
  forward = jax.jit(layer("train").apply)
  y = forward(params, x)

  # Causal: changing inputs after t leaves the outputs up to t unchanged.
  t = 13
  changed = forward(params, x.at[:, t + 1:].add(1.0))
  np.testing.assert_allclose(changed[:, :t + 1], y[:, :t + 1], atol=1e-6)

  prefill = jax.jit(lambda x: layer("prefill").apply(params, x, mutable=["cache"]))
  y_prompt, variables = prefill(x[:, :PROMPT])
  np.testing.assert_allclose(y_prompt, y[:, :PROMPT], atol=1e-5)
  cache, size = variables["cache"], cache_bytes(variables["cache"])
  step = jax.jit(lambda cache, x_t: layer("decode").apply({**params, "cache": cache}, x_t,
                                                          mutable=["cache"]))
  for t in range(PROMPT, SEQ):
    y_t, variables = step(cache, x[:, t:t + 1])
    cache = variables["cache"]
    assert cache_bytes(cache) == size
    np.testing.assert_allclose(y_t[:, 0], y[:, t], atol=1e-5)

  grads = jax.jit(jax.grad(lambda p: jnp.mean(forward(p, x) ** 2)))(params)
  assert all(np.isfinite(np.asarray(g)).all() for g in jax.tree.leaves(grads))


def test_gsa_slot_heads_match_the_slot_recurrence():
  """GSA's first pass (simple GLA with one head per slot) and second pass (GLA over slots) give the paper's
  o_t = V_t^T softmax(K_t q_t) with K_t, V_t the gated slot memories."""
  batch, seq, heads, dim, slots = 2, 19, 2, 8, 6
  keys = jax.random.split(jax.random.key(2), 4)
  q, k, v = (jax.random.normal(key, (batch, seq, heads, dim)) for key in keys[:3])
  log_forget = jax.nn.log_sigmoid(jax.random.normal(keys[3], (batch, seq, heads, slots))) / 8
  forget, written = jnp.exp(log_forget), -jnp.expm1(log_forget)

  def step(memories, token):  # memories: slot keys and slot values [batch, heads, slots, dim]
    q_t, k_t, v_t, forget_t, written_t = token
    memories = tuple(forget_t[..., None] * m + written_t[..., None] * x[:, :, None]
                     for m, x in zip(memories, (k_t, v_t)))
    weights = jax.nn.softmax(jnp.einsum("bhsd,bhd->bhs", memories[0], q_t), axis=-1)
    return memories, jnp.einsum("bhsd,bhs->bhd", memories[1], weights)

  zeros = jnp.zeros((batch, heads, slots, dim))
  tokens = tuple(jnp.moveaxis(x, 1, 0) for x in (q, k, v, forget, written))
  expected = jnp.moveaxis(jax.lax.scan(step, (zeros, zeros), tokens)[1], 0, 1)

  @jax.jit
  def two_passes(q, k, v, written, log_forget):
    scores, _ = kernels.simple_gla(*per_slot_heads(q, k, written, log_forget), scale=1.0, chunk_size=8)
    weights = jax.nn.softmax(scores.reshape(log_forget.shape), axis=-1)
    return kernels.gla(weights, written, v, log_forget, scale=1.0, chunk_size=8, sub_chunk_size=4)[0]

  np.testing.assert_allclose(two_passes(q, k, v, written, log_forget), expected, atol=1e-5)
