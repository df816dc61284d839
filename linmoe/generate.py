"""Text generation from a trained model: `python -m linmoe.generate --workdir W --prompt "..."`.

The prompts are prefilled with the parallel form (the chunked recurrence, causal attention) up to the
shortest prompt's length; from there one jitted loop decodes a token at a time with the recurrent state
(linmoe/decode.py: an fp32 memory of fixed size per LSM layer, a KV cache per attention layer). A row
whose prompt is longer is fed its own next prompt token instead of a sample until its prompt is used
up, so prompts of different lengths share one batch with no padding inside any row's context. A row
stops at its first end-of-document token or after `max_new_tokens`.
"""
import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np
from absl import app, flags, logging

from linmoe import checkpoint
from linmoe.config import ModelConfig, padded_vocab_size
from linmoe.data import Tokenizer, build_tokenizer
from linmoe.decode import decode_step, prefill
from linmoe.model import LinearMoELM


@dataclasses.dataclass(frozen=True)
class Sampling:
  """How the next token is drawn from the logits.

  Attributes:
    temperature: 0 = greedy (argmax); else logits are divided by it before sampling.
    top_k: Keep the k most likely tokens (0 = all).
    top_p: Keep the smallest set of most likely tokens whose probability reaches p (1 = all).
  """
  temperature: float = 0.0
  top_k: int = 0
  top_p: float = 1.0

  def __post_init__(self):
    if self.temperature < 0:
      raise ValueError(f"temperature must be >= 0, got {self.temperature}")
    if self.top_k < 0:
      raise ValueError(f"top_k must be >= 0, got {self.top_k}")
    if not 0 < self.top_p <= 1:
      raise ValueError(f"top_p must be in (0, 1], got {self.top_p}")


def sample(logits: jnp.ndarray, rng: jax.Array, sampling: Sampling,
           num_tokens: int | None = None) -> jnp.ndarray:
  """Draws one token per row: logits [batch, vocab] float32 -> [batch] int32.

  Only ids below `num_tokens` (the tokenizer's vocabulary, without the model's padding) are drawn.
  """
  if num_tokens is not None:
    logits = jnp.where(jnp.arange(logits.shape[-1]) < num_tokens, logits, -jnp.inf)
  if sampling.temperature == 0:
    return jnp.argmax(logits, axis=-1).astype(jnp.int32)
  logits = logits / sampling.temperature
  if sampling.top_k:
    kth = jax.lax.top_k(logits, min(sampling.top_k, logits.shape[-1]))[0][:, -1:]  # [batch, 1]
    logits = jnp.where(logits < kth, -jnp.inf, logits)
  if sampling.top_p < 1:
    sorted_logits = jnp.sort(logits, axis=-1)[:, ::-1]  # descending
    probs = jax.nn.softmax(sorted_logits, axis=-1)
    mass_before = jnp.cumsum(probs, axis=-1) - probs
    kept = jnp.where(mass_before < sampling.top_p, sorted_logits, jnp.inf)  # the most likely is kept
    cutoff = jnp.min(kept, axis=-1, keepdims=True)
    logits = jnp.where(logits < cutoff, -jnp.inf, logits)
  return jax.random.categorical(rng, logits, axis=-1).astype(jnp.int32)


@functools.partial(jax.jit, static_argnames=("model", "sampling", "num_tokens", "start"))
def _decode_loop(model: LinearMoELM, params, cache: dict, last_logits: jnp.ndarray,
                 tokens: jnp.ndarray, prompt_lens: jnp.ndarray, max_new_tokens: jnp.ndarray,
                 eod_id: jnp.ndarray, rng: jax.Array, sampling: Sampling, num_tokens: int | None,
                 start: int) -> jnp.ndarray:
  """Fills tokens [batch, total] from position `start` on and returns them.

  At position t a row takes its prompt token if t < its prompt length, else a sample from the logits
  of position t - 1; it is done after `max_new_tokens` samples or a sampled `eod_id`.
  """
  batch, total = tokens.shape

  def cond(carry):
    t, _, _, _, done, _ = carry
    return (t < total) & ~jnp.all(done)

  def body(carry):
    t, logits, cache, tokens, done, rng = carry
    rng, key = jax.random.split(rng)
    in_prompt = t < prompt_lens
    drawn = sample(logits, key, sampling, num_tokens)
    token = jnp.where(in_prompt, tokens[:, t], drawn)
    fresh = ~in_prompt & ~done
    tokens = tokens.at[:, t].set(jnp.where(done, eod_id, token))
    done = done | (fresh & ((token == eod_id) | (t + 1 - prompt_lens >= max_new_tokens)))
    logits, cache = decode_step(model, params, cache, token)
    return t + 1, logits, cache, tokens, done, rng

  done = jnp.zeros((batch,), bool)
  carry = (jnp.int32(start), last_logits, cache, tokens, done, rng)
  _, _, _, tokens, _, _ = jax.lax.while_loop(cond, body, carry)
  return tokens


_prefill = jax.jit(prefill, static_argnames=("model", "cache_len"))


def generate(model: LinearMoELM, params, prompts: list[list[int]], max_new_tokens: int,
             eod_id: int | None, sampling: Sampling = Sampling(), seed: int = 0,
             num_tokens: int | None = None) -> list[list[int]]:
  """Continues each prompt; returns the new tokens of each row, without the end-of-document token.

  Args:
    model: The language model.
    params: Its parameters.
    prompts: B token lists of any lengths >= 1.
    max_new_tokens: Most tokens generated per row, >= 1.
    eod_id: Generation of a row stops at this token; None never stops early.
    sampling: Greedy, temperature, top-k, top-p.
    seed: Seed of the sampling.
    num_tokens: Draw only ids below it (the tokenizer's vocabulary size); None: any id.

  Returns:
    B lists of generated token ids.
  """
  if not prompts or min(len(p) for p in prompts) < 1:
    raise ValueError("every prompt needs at least one token")
  if max_new_tokens < 1:
    raise ValueError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
  lens = np.array([len(p) for p in prompts])
  start, total = int(lens.min()), int(lens.max()) + max_new_tokens
  tokens = np.zeros((len(prompts), total), np.int32)
  for row, prompt in enumerate(prompts):
    tokens[row, :len(prompt)] = prompt
  logits, cache = _prefill(model, params, jnp.asarray(tokens[:, :start]), cache_len=total)
  stop = -1 if eod_id is None else eod_id  # -1 is never drawn
  out = _decode_loop(model, params, cache, logits, jnp.asarray(tokens), jnp.asarray(lens),
                     jnp.int32(max_new_tokens), jnp.int32(stop), jax.random.key(seed), sampling,
                     num_tokens, start)
  out = np.asarray(out)
  results = []
  for row, n in enumerate(lens):
    new = list(out[row, n:n + max_new_tokens])
    results.append(new[:new.index(stop)] if stop in new else new)
  return results


@dataclasses.dataclass(frozen=True)
class Loaded:
  """A trained model restored from a workdir."""
  model: LinearMoELM
  params: dict
  step: int
  tokenizer: Tokenizer


def load(workdir: str, step: int | None = None) -> Loaded:
  """Restores the model, parameters and tokenizer of checkpoint `step` (default: the latest)."""
  config = checkpoint.read_config(workdir)
  tokenizer = build_tokenizer(config.data.tokenizer)
  model_cfg = ModelConfig.from_config(config.model,
                                      padded_vocab_size(config.model, tokenizer.vocab_size))
  manager = checkpoint.checkpoint_manager(workdir, config.train.keep_checkpoints)
  restored = checkpoint.restore_params(manager, step)
  if restored is None:
    raise FileNotFoundError(f"no checkpoint in {workdir}/checkpoints")
  return Loaded(LinearMoELM(model_cfg), *restored, tokenizer=tokenizer)


def complete(loaded: Loaded, prompts: list[str], max_new_tokens: int,
             sampling: Sampling = Sampling(), seed: int = 0) -> list[str]:
  """Continues text prompts; each starts a document (it follows an end-of-document token, as every
  document does in training) and its continuation stops at the end of that document."""
  tok = loaded.tokenizer
  ids = [[tok.eod_id] + tok.encode(p) for p in prompts]
  new = generate(loaded.model, loaded.params, ids, max_new_tokens, tok.eod_id, sampling, seed,
                 tok.vocab_size)
  return [tok.decode(n) for n in new]


def define_flags() -> None:
  """The CLI's flags; defined only when run as a program, so importing this module beside another
  CLI module (linmoe.eval) does not define --workdir twice."""
  flags.DEFINE_string("workdir", None, "Workdir of a training run.", required=True)
  flags.DEFINE_multi_string("prompt", None, "A prompt; repeat the flag for a batch.", required=True)
  flags.DEFINE_integer("step", None, "Checkpoint step (default: the latest).")
  flags.DEFINE_integer("max_new_tokens", 200, "Most tokens generated per prompt.")
  flags.DEFINE_float("temperature", 0.0, "0 = greedy; else sampling temperature.")
  flags.DEFINE_integer("top_k", 0, "Sample from the k most likely tokens (0 = all).")
  flags.DEFINE_float("top_p", 1.0, "Sample from the top-p probability mass (1 = all).")
  flags.DEFINE_integer("seed", 0, "Sampling seed.")


def main(argv):
  del argv
  logging.set_verbosity(logging.WARNING)
  f = flags.FLAGS
  loaded = load(f.workdir, f.step)
  texts = complete(loaded, f.prompt, f.max_new_tokens, Sampling(f.temperature, f.top_k, f.top_p), f.seed)
  print(f"checkpoint step {loaded.step}")
  for prompt, text in zip(f.prompt, texts):
    print(f"--- {prompt!r}\n{prompt}{text}")


if __name__ == "__main__":
  define_flags()
  app.run(main)
