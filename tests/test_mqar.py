"""The MQAR benchmark's task generator: every scored target is the value paired with the queried key."""
import jax
import numpy as np
import pytest

from benchmarks.mqar import IGNORE, mqar_batch


@pytest.mark.parametrize("seq,pairs", [(32, 4), (24, 11)])
def test_mqar_targets_are_the_queried_keys_values(seq, pairs):
  vocab = 64
  inputs, targets = map(np.asarray, mqar_batch(jax.random.key(3), 5, seq, pairs, vocab))
  assert inputs.shape == targets.shape == (5, seq)
  for row_inputs, row_targets in zip(inputs, targets):
    keys, values = row_inputs[: 2 * pairs: 2], row_inputs[1: 2 * pairs: 2]
    assert len(set(keys)) == pairs and np.all((keys >= 1) & (keys < vocab // 2))
    assert np.all((values >= vocab // 2) & (values < vocab))
    scored = np.flatnonzero(row_targets != IGNORE)
    assert scored.size == min(pairs, seq - 1 - 2 * pairs) and np.all(scored >= 2 * pairs)
    pairing = dict(zip(keys, values))
    assert [pairing[k] for k in row_inputs[scored]] == list(row_targets[scored])


def test_mqar_refuses_a_task_that_does_not_fit():
  with pytest.raises(ValueError, match="seq > 2 \\* pairs \\+ 1"):
    mqar_batch(jax.random.key(0), 2, 16, 8, 64)
