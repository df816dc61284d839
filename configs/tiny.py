"""Tiny Linear-MoE on the bundled corpus: a few minutes on 2 CPU cores.

4 GLA blocks (d_model 128) with a 4-expert top-2 MoE (d_ff 128), byte tokenizer, 200 steps of
8 x 256 tokens.
"""
from linmoe.config import default_config


def get_config():
  c = default_config()
  c.workdir = "workdirs/tiny"
  c.model.moe.d_ff = 128
  c.train.steps = 200
  c.train.batch_size = 8
  c.train.seq_len = 256
  c.train.warmup_steps = 20
  c.train.log_every = 25
  c.train.eval_every = 50
  c.train.ckpt_every = 100
  return c
