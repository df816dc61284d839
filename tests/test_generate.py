"""Generation: recurrent decoding equals repeated full forwards; sampling rules; the CLI's loading."""
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from linmoe import checkpoint, generate
from linmoe.config import ModelConfig, default_config
from linmoe.decode import decode_step, prefill
from linmoe.model import LinearMoELM, init_params
from linmoe.optim import make_optimizer
from linmoe.steps import TrainState

VOCAB, NUM_TOKENS = 384, 257  # the byte tokenizer's 257 ids, padded to a multiple of 128
PROMPTS = [[256, 73, 110, 32], list(range(60, 78)), [256, 65, 110, 100, 32, 71, 111]]  # 4, 18, 7
NEW = 7  # 18 + 7 = 25 positions: more than one chunk of 16, not a multiple
LAYERS = {"L": 2, "LLLN": 4}


def model_config(pattern: str):
  m = default_config().model
  m.d_model, m.n_layers, m.n_heads, m.chunk_size, m.pattern = 32, LAYERS[pattern], 2, 16, pattern
  m.moe.num_experts, m.moe.top_k, m.moe.d_ff = 4, 2, 32
  return m


def build(pattern: str, seed: int = 0):
  model = LinearMoELM(ModelConfig.from_config(model_config(pattern), VOCAB))
  params = jax.jit(functools.partial(init_params, model))(jax.random.key(seed),
                                                        jnp.zeros((1, 16), jnp.int32))
  # Sharper logits than at init, so that argmax is not decided by rounding.
  params["lm_head"]["kernel"] = params["lm_head"]["kernel"] * 30
  return model, params


def greedy_by_full_forwards(model, params, prompts, new):
  """Reference: at each step the argmax of a full parallel forward over the row's whole context."""
  total = max(len(p) for p in prompts) + new
  forward = jax.jit(lambda t: model.apply({"params": params}, t, mode="eval")[0])
  out = []
  for prompt in prompts:
    tokens = np.zeros((1, total), np.int32)  # the model is causal: later positions do not matter
    tokens[0, :len(prompt)] = prompt
    for t in range(len(prompt), len(prompt) + new):
      tokens[0, t] = int(jnp.argmax(forward(jnp.asarray(tokens))[0, t - 1, :NUM_TOKENS]))
    out.append(list(tokens[0, len(prompt):len(prompt) + new]))
  return out


def run(model, params, eod_id, sampling=generate.Sampling(), seed=0):
  """Generates from PROMPTS with the arguments every test shares (one compile per model)."""
  return generate.generate(model, params, PROMPTS, NEW, eod_id, sampling, seed, NUM_TOKENS)


@pytest.fixture(scope="module", params=["L", "LLLN"])
def tiny(request):
  return build(request.param)


@pytest.fixture(scope="module")
def pure_lsm():
  """The "L" model alone, for tests that do not depend on the layers (the same compiled functions)."""
  return build("L")


def test_greedy_generation_equals_argmax_of_full_forwards(tiny):
  model, params = tiny
  got = run(model, params, None)
  assert got == greedy_by_full_forwards(model, params, PROMPTS, NEW)
  assert len({tuple(g) for g in got}) > 1


def test_generation_stops_at_end_of_document(tiny):
  model, params = tiny
  free = run(model, params, None)
  eod = free[0][3]
  stopped = run(model, params, eod)
  for row, tokens in enumerate(free):
    expected = tokens[:tokens.index(eod)] if eod in tokens else tokens
    assert stopped[row] == expected


def test_sampling_is_seeded(pure_lsm):
  model, params = pure_lsm
  hot = generate.Sampling(temperature=5.0)
  a = run(model, params, None, hot, seed=1)
  assert a == run(model, params, None, hot, seed=1)
  assert a != run(model, params, None, hot, seed=2)
  assert a != run(model, params, None)


def test_sample_keeps_only_top_k_and_top_p_tokens():
  probs = np.array([0.5, 0.25, 0.15, 0.06, 0.04])
  logits = jnp.log(jnp.asarray(np.tile(probs, (4000, 1)), jnp.float32))
  keys = jax.random.key(0)
  draws = lambda s: np.asarray(generate.sample(logits, keys, s))
  assert set(draws(generate.Sampling(1.0, top_k=2))) == {0, 1}
  assert set(np.asarray(generate.sample(logits, keys, generate.Sampling(1.0), 3))) == {0, 1, 2}
  assert set(draws(generate.Sampling(1.0, top_p=0.8))) == {0, 1, 2}  # 0.5 + 0.25 < 0.8
  assert set(draws(generate.Sampling(1.0, top_k=4, top_p=0.7))) == {0, 1}
  counts = np.bincount(draws(generate.Sampling(1.0)), minlength=5) / 4000
  np.testing.assert_allclose(counts, probs, atol=0.03)
  with pytest.raises(ValueError, match="top_p"):
    generate.Sampling(1.0, top_p=0.0)


def state_bytes(model, params, length: int) -> dict[str, int]:
  """Bytes of each block's decode state after a prompt of `length` tokens and one decode step."""
  def run(tokens):
    _, cache = prefill(model, params, tokens, cache_len=length + 1)
    return decode_step(model, params, cache, tokens[:, 0])[1]
  cache = jax.eval_shape(run, jax.ShapeDtypeStruct((2, length), jnp.int32))
  return {block: sum(int(np.prod(x.shape)) * x.dtype.itemsize for x in jax.tree.leaves(tree))
          for block, tree in cache.items()}


def test_lsm_decode_state_does_not_grow_with_context(tiny):
  model, params = tiny
  short, long = state_bytes(model, params, 8), state_bytes(model, params, 4000)
  for i, kind in enumerate(model.cfg.layer_kinds):
    block = f"block_{i}"
    assert (short[block] == long[block]) == (kind == "L"), (block, short[block], long[block])


def test_load_restores_a_checkpoint_and_completes_text(pure_lsm, tmp_path):
  model, params = pure_lsm
  config = default_config()
  config.workdir = str(tmp_path)
  config.model.update(model_config("L"))  # vocab_size 0: follows the byte tokenizer, 257 -> 384
  tx = make_optimizer(config.train)
  state = TrainState(step=jnp.int32(3), params=params, opt_state=tx.init(params),
                     nonfinite_step=jnp.int32(-1))
  checkpoint.write_config(config.workdir, config)
  manager = checkpoint.checkpoint_manager(config.workdir, 2)
  checkpoint.save(manager, 3, state)
  manager.wait_until_finished()
  loaded = generate.load(config.workdir)
  assert loaded.step == 3
  jax.tree.map(np.testing.assert_array_equal, loaded.params, params)
  prompts = ["In ", "And God said, Let", "And G"]  # after the eod: the shapes of PROMPTS
  texts = generate.complete(loaded, prompts, max_new_tokens=NEW)
  ids = [[256] + list(p.encode()) for p in prompts]
  expected = generate.generate(model, params, ids, NEW, 256, num_tokens=NUM_TOKENS)
  assert texts == [loaded.tokenizer.decode(e) for e in expected]
