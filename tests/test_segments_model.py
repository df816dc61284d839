"""Packed documents through the layers and the model: each document's logits packed in one row equal those
of the document alone, and the loss of a document has exactly zero gradient w.r.t. the embeddings of the
document before it.

One batch holds both: row 0 packs documents of 10, 6, 1 and 23 tokens (boundaries inside a chunk of 16, on
a chunk edge, a one-token document), row 1 + i holds document i alone at the start of its row (the padding
after it cannot reach it: every layer is causal). Two models, one compile each: a stack of one layer of
every LSM instance that reads earlier tokens outside its recurrence (token shift, short convolutions, GSA's
two passes, MoM's memories, Based's sliding window) with the token-loop ops (forward only), and an LLLN
hybrid `LinearMoELM` with the chunked ops and softmax attention (forward and gradient in one call).
Parameters are random normals of the initialised shapes (jitting the initialisers costs more than the
test). fp32; tolerance 1e-5.
"""
import functools

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from linmoe.config import ConfigError, ModelConfig, default_config, validate
from linmoe.layers import LSM_LAYERS
from linmoe.layers.common import rms_norm
from linmoe.model import LinearMoELM, init_params
from linmoe.steps import cross_entropy
from tests.test_layers_extra import WindowedBased

VOCAB, SEQ, CHUNK = 64, 40, 16
LENGTHS = (10, 6, 1, 23)  # starts at 0, 10, 16 (a chunk edge), 17
FIRST_DOC_VOCAB = 16  # the first document's tokens are below this id, the others' at or above it
TOL = 1e-5
# Every instance with token mixing outside its recurrence (MoM over gated_deltanet: convs and routing).
MIXING = ("rwkv6", "rwkv7", "mamba", "mamba2", "gsa", "ttt", "titans", "deltanet", "gated_deltanet", "mom")


def _config(lsm: str, pattern: str, impl: str) -> ModelConfig:
  m = default_config().model
  m.d_model, m.n_heads, m.chunk_size, m.compute_dtype, m.kernel_impl = 32, 2, CHUNK, "float32", impl
  m.lsm, m.pattern, m.n_layers = lsm, pattern, len(pattern)
  m.moe.num_experts = 1  # capacity-dropping MoE mixes the batch's tokens; a dense MLP does not
  m.mom.inner = "gated_deltanet"
  return ModelConfig.from_config(m, VOCAB)


class MixingStack(nn.Module):
  """tokens [batch, seq] -> (logits, {}): embed, a residual pre-norm layer of every MIXING instance and
  WindowedBased, norm, head."""
  cfg: ModelConfig

  @nn.compact
  def __call__(self, tokens: jax.Array, segment_ids: jax.Array | None = None) -> tuple[jax.Array, dict]:
    x = nn.Embed(VOCAB, self.cfg.d_model, name="embed")(tokens)
    layers = [LSM_LAYERS[name] for name in MIXING] + [WindowedBased]
    for i, layer in enumerate(layers):
      x = x + layer(self.cfg, i, name=f"layer_{i}")(rms_norm(self.cfg, f"norm_{i}")(x), segment_ids)
    return nn.Dense(VOCAB, use_bias=False)(rms_norm(self.cfg, "final_norm")(x)), {}


MODELS = {
    "mixing_stack": lambda: MixingStack(_config("gla", "L", "naive")),
    "llln_hybrid": lambda: LinearMoELM(_config("gated_deltanet", "LLLN", "chunked")),
}
WITH_GRADIENT = ("llln_hybrid",)
PARAM_STD = 0.2


def _batch() -> tuple[jax.Array, jax.Array, np.ndarray]:
  """tokens and segment ids [1 + documents, SEQ] (row 0 packed, row 1 + i document i alone), and the
  documents' start positions in row 0."""
  rng = np.random.default_rng(0)
  docs = [rng.integers(0, FIRST_DOC_VOCAB, LENGTHS[0])]
  docs += [rng.integers(FIRST_DOC_VOCAB, VOCAB, n) for n in LENGTHS[1:]]
  tokens = [np.concatenate(docs)] + [np.pad(d, (0, SEQ - len(d))) for d in docs]
  ids = [np.repeat(np.arange(1, len(docs) + 1), LENGTHS)]
  ids += [np.repeat([1, 2], [n, SEQ - n]) for n in LENGTHS]
  starts = np.cumsum((0,) + LENGTHS[:-1])
  return jnp.asarray(np.stack(tokens), jnp.int32), jnp.asarray(np.stack(ids), jnp.int32), starts


def _random_params(model: nn.Module, tokens: jax.Array) -> dict:
  shapes = jax.eval_shape(functools.partial(init_params, model), jax.random.key(0), tokens)
  leaves, tree = jax.tree.flatten(shapes)
  keys = jax.random.split(jax.random.key(1), len(leaves))
  return jax.tree.unflatten(tree, [PARAM_STD * jax.random.normal(key, leaf.shape, leaf.dtype)
                                   for key, leaf in zip(keys, leaves)])


@functools.cache
def packed_run(name: str) -> tuple:
  """(logits [1 + documents, SEQ, VOCAB], for WITH_GRADIENT models the gradient of the second document's
  loss in row 0 w.r.t. the embedding table [VOCAB, d_model] (else None)), from one jitted call."""
  model = MODELS[name]()
  tokens, ids, starts = _batch()
  params = _random_params(model, tokens[:1, :CHUNK])
  second = slice(starts[1], starts[1] + LENGTHS[1])

  def second_doc_loss(params):
    logits, _ = model.apply({"params": params}, tokens, segment_ids=ids)
    targets = jnp.roll(tokens[0], -1)[second]
    return jnp.sum(cross_entropy(logits[0, second], targets)), logits

  if name not in WITH_GRADIENT:
    return jax.jit(second_doc_loss)(params)[1], None
  (_, logits), grads = jax.jit(jax.value_and_grad(second_doc_loss, has_aux=True))(params)
  return logits, grads["embed"]["embedding"]


@pytest.mark.parametrize("name", MODELS)
def test_each_document_packed_equals_alone(name):
  logits, _ = packed_run(name)
  starts = _batch()[2]
  for i, (start, n) in enumerate(zip(starts, LENGTHS)):
    np.testing.assert_allclose(logits[0, start:start + n], logits[1 + i, :n], atol=TOL,
                               err_msg=f"document {i} ({n} tokens at {start})")


@pytest.mark.parametrize("name", WITH_GRADIENT)
def test_no_gradient_reaches_the_previous_document(name):
  """Exactly zero, not rounding-small: the chunked ops' in-chunk cumulative decays restart their gradient
  at each document (segments.chunk_cumsum)."""
  _, embed_grad = packed_run(name)
  assert np.any(np.asarray(embed_grad[FIRST_DOC_VOCAB:]) != 0.0)  # the document's own tokens do
  assert np.all(np.asarray(embed_grad[:FIRST_DOC_VOCAB]) == 0.0)


def test_reset_at_doc_boundary_must_be_a_bool():
  config = default_config()
  config.data.reset_at_doc_boundary = None
  with pytest.raises(ConfigError, match="data.reset_at_doc_boundary"):
    validate(config, 1)


def test_packed_flash_attention_matches_masked_attention():
  """The GPU path of attention with segment ids (JAX's Pallas flash kernel, interpret mode here) equals
  XLA's masked attention, outputs and gradients, at a length that needs padding to whole blocks."""
  from linmoe.layers.attention import PACKED_FLASH_BLOCK, packed_flash_attention
  seq = PACKED_FLASH_BLOCK + 3
  q, k, v = jax.random.normal(jax.random.key(0), (3, 1, seq, 2, 16))
  ids = jnp.asarray(np.repeat(np.arange(4), [60, 1, 68, 2])[None], jnp.int32)

  def masked(q, k, v):
    same = ids[:, None, :, None] == ids[:, None, None, :]
    return jax.nn.dot_product_attention(q, k, v, mask=same, is_causal=True)

  def flash(q, k, v):
    return packed_flash_attention(q, k, v, ids, interpret=True)

  cotangent = jax.random.normal(jax.random.key(1), q.shape)
  outs = [jax.vjp(f, q, k, v) for f in (masked, flash)]
  np.testing.assert_allclose(outs[1][0], outs[0][0], atol=TOL)
  for got, want in zip(outs[1][1](cotangent), outs[0][1](cotangent)):
    np.testing.assert_allclose(got, want, atol=1e-4)
