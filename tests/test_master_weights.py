"""optim.with_master_weights: bf16 parameters follow an fp32 run of the same optimizer on their values."""
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax

from linmoe.optim import MasterWeightsState, with_master_weights

STEPS = 4


def _inner() -> optax.GradientTransformation:
  return optax.chain(optax.clip_by_global_norm(1.0), optax.adamw(0.05, weight_decay=0.1))


def _fp32(tree):
  return jax.tree.map(lambda a: a.astype(jnp.float32), tree)


def test_bf16_parameters_follow_the_fp32_run():
  """A tree of an fp32 and a bf16 parameter, random gradients: the wrapper's fp32 parameter and the bf16
  parameter's master equal a plain fp32 run from the same values; the bf16 parameter is its master in
  bf16 (within one bf16 rounding: p + (master - p) is computed in fp32)."""
  rng = np.random.default_rng(0)
  params = {"dense": jnp.asarray(rng.standard_normal((3, 5)), jnp.float32),
            "experts": jnp.asarray(rng.standard_normal((2, 3, 4)), jnp.bfloat16)}
  plain_params = _fp32(params)
  tx, plain_tx = with_master_weights(_inner()), _inner()
  state, plain_state = tx.init(params), plain_tx.init(plain_params)
  assert isinstance(state.master["dense"], optax.MaskedNode)
  for _ in range(STEPS):
    grads = jax.tree.map(lambda p: jnp.asarray(rng.standard_normal(p.shape), p.dtype), params)
    updates, state = tx.update(grads, state, params)
    params = optax.apply_updates(params, updates)
    plain_updates, plain_state = plain_tx.update(_fp32(grads), plain_state, plain_params)
    plain_params = optax.apply_updates(plain_params, plain_updates)
  assert params["experts"].dtype == jnp.bfloat16 and params["dense"].dtype == jnp.float32
  np.testing.assert_allclose(params["dense"], plain_params["dense"], rtol=1e-6, atol=1e-7)
  np.testing.assert_allclose(state.master["experts"], plain_params["experts"], rtol=1e-6, atol=1e-7)
  np.testing.assert_allclose(np.asarray(params["experts"], np.float32), plain_params["experts"],
                             rtol=2 ** -8, atol=1e-7)


def test_master_copies_keep_the_logical_axis_boxes():
  """Initialized on boxed parameters (as the trainer derives shardings), a bf16 parameter's master keeps
  its logical axis names and an fp32 parameter has none."""
  boxed = {"w": nn.LogicallyPartitioned(jnp.zeros((2, 3), jnp.bfloat16), ("experts", "embed")),
           "b": nn.LogicallyPartitioned(jnp.zeros((3,), jnp.float32), ("embed",))}
  state = with_master_weights(_inner()).init(boxed)
  assert isinstance(state, MasterWeightsState)
  assert state.master["w"].names == ("experts", "embed") and state.master["w"].value.dtype == jnp.float32
  assert isinstance(state.master["b"], optax.MaskedNode)
