"""Wall-clock timing of jitted JAX calls as a training loop issues them: asynchronously, in batches."""

import statistics
import time
from collections.abc import Callable

import jax


def time_ms(fn: Callable, *args, budget_s: float = 1.5, max_batches: int = 9) -> float:
  """Median ms per call of fn(*args), timed in batches of async calls (one sync per batch).

  A call synced on its own also times the host's dispatch of every kernel while the GPU waits (tens of µs
  to 0.1 ms for a call of ~10 kernels); queued calls hide it, as they do in training. The first call
  (compilation) is not timed; a batch lasts about 50 ms, at most `max_batches` of them within `budget_s`.
  """
  jax.block_until_ready(fn(*args))
  start = time.perf_counter()
  jax.block_until_ready(fn(*args))
  once = time.perf_counter() - start
  per_batch = max(1, min(50, int(0.05 / max(once, 1e-6))))
  num_batches = int(max(3, min(max_batches, budget_s / (once * per_batch))))
  times = []
  for _ in range(num_batches):
    start = time.perf_counter()
    for _ in range(per_batch):
      out = fn(*args)
    jax.block_until_ready(out)  # One stream: the last call ends after the others.
    times.append((time.perf_counter() - start) / per_batch)
  return 1e3 * statistics.median(times)
