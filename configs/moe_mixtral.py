"""Mixtral-style MoE on the A0.3B-2B backbone: 8 large experts, softmax top-2, weights renormalized,
no shared expert."""
from configs import a0p3b_2b


def get_config():
  c = a0p3b_2b.get_config()
  c.workdir = "workdirs/moe_mixtral"
  c.model.moe.update(num_experts=8, top_k=2, d_ff=3584, router="softmax", renormalize=True,
                     num_shared_experts=0)
  return c
