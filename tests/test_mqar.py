"""The MQAR benchmark's task generator: every query slot holds a key, its answer is that key's value, and the
value follows the key in the input (Zoology's layout)."""
import jax
import numpy as np
import pytest

from benchmarks.mqar import mqar_batch


@pytest.mark.parametrize("seq,pairs", [(32, 4), (24, 11)])
def test_mqar_answers_are_the_queried_keys_values(seq, pairs):
  vocab = 64
  inputs, slots, answers = map(np.asarray, mqar_batch(jax.random.key(3), 5, seq, pairs, vocab))
  asked = min(pairs, (seq - 2 * pairs) // 2)
  assert inputs.shape == (5, seq) and slots.shape == answers.shape == (5, asked)
  for row_inputs, row_slots, row_answers in zip(inputs, slots, answers):
    keys, values = row_inputs[: 2 * pairs: 2], row_inputs[1: 2 * pairs: 2]
    assert len(set(keys)) == pairs and np.all((keys >= 1) & (keys < vocab // 2))
    assert np.all((values >= vocab // 2) & (values < vocab))
    assert np.all(np.diff(row_slots) >= 2) and row_slots[0] >= 2 * pairs and row_slots[-1] < seq - 1
    assert np.all((row_slots - 2 * pairs) % 2 == 0)
    others = np.setdiff1d(np.arange(2 * pairs, seq), np.concatenate([row_slots, row_slots + 1]))
    assert np.all(row_inputs[others] == 0)  # only the query pairs follow the context
    pairing = dict(zip(keys, values))
    assert [pairing[k] for k in row_inputs[row_slots]] == list(row_answers)
    assert list(row_inputs[row_slots + 1]) == list(row_answers)


def test_mqar_refuses_a_task_that_does_not_fit():
  with pytest.raises(ValueError, match="seq >= 2 \\* pairs \\+ 2"):
    mqar_batch(jax.random.key(0), 2, 17, 8, 64)
