"""DeepSeek-V2-style MoE on the A0.3B-2B backbone: 64 fine-grained routed experts, softmax top-6
without renormalization, plus 2 ungated shared experts of the same width."""
from configs import a0p3b_2b


def get_config():
  c = a0p3b_2b.get_config()
  c.workdir = "workdirs/moe_deepseek_v2"
  c.model.moe.update(num_experts=64, top_k=6, d_ff=896, router="softmax", renormalize=False,
                     num_shared_experts=2, shared_d_ff=896, shared_expert_gate=False)
  return c
