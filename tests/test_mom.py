"""Mixture-of-Memories routing: a memory skips the tokens not routed to it, exactly."""
import jax
import numpy as np
import pytest

from linmoe.layers.lsm import FAMILIES, mask_updates


@pytest.mark.parametrize("family", ["gla", "delta_rule"])
def test_masked_tokens_leave_the_memory_unchanged(family):
  """Zeroing the gated inputs at unrouted tokens == running the op on the routed tokens alone."""
  b, t, h, d = 1, 19, 2, 8
  keys = jax.random.split(jax.random.key(0), 5)
  q, k, v = (jax.random.normal(kk, (b, t, h, d)) for kk in keys[:3])
  if family == "gla":
    g = -jax.nn.softplus(jax.random.normal(keys[3], (b, t, h, d)))
    inputs = (q, k, v, g)
  else:
    k = k / np.linalg.norm(k, axis=-1, keepdims=True)
    beta = jax.nn.sigmoid(jax.random.normal(keys[3], (b, t, h)))
    g = -jax.nn.softplus(jax.random.normal(keys[4], (b, t, h)))
    inputs = (q, k, v, beta, g)
  routed = np.array([[1, 0, 0, 1, 1, 0, 1, 0, 0, 0, 1, 1, 1, 0, 1, 0, 0, 1, 1]], np.float32)
  op = FAMILIES[family].sequence
  o_masked, state_masked = op(*mask_updates(inputs, FAMILIES[family].gated_inputs, routed),
                              impl="chunked", chunk_size=16)
  keep = routed[0] > 0
  o_alone, state_alone = op(*(a[:, keep] for a in inputs), impl="naive")
  np.testing.assert_allclose(state_masked, state_alone, atol=1e-5)
  np.testing.assert_allclose(o_masked[:, keep], o_alone, atol=1e-5)


def test_family_without_gated_inputs_is_refused():
  with pytest.raises(ValueError, match="cannot skip tokens"):
    mask_updates((None,), (), np.ones((1, 1)))
