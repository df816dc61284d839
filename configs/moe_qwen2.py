"""Qwen2-MoE-style MoE on the A0.3B-2B backbone: 64 fine-grained experts, softmax top-8 without
renormalization, plus one shared expert (4x wider) behind a sigmoid gate."""
from configs import a0p3b_2b


def get_config():
  c = a0p3b_2b.get_config()
  c.workdir = "workdirs/moe_qwen2"
  c.model.moe.update(num_experts=64, top_k=8, d_ff=896, router="softmax", renormalize=False,
                     num_shared_experts=1, shared_d_ff=4 * 896, shared_expert_gate=True)
  return c
