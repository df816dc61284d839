"""Linear-MoE A0.3B-2B (the paper's smaller model): hidden 1024, 12 layers, 8 heads, 64 experts of
FFN 896, top-8. Pure LSM by default; `--config.model.pattern=LLLN` gives the hybrid."""
from linmoe.config import default_config


def get_config():
  c = default_config()
  c.workdir = "workdirs/a0p3b_2b"
  m = c.model
  m.d_model, m.n_layers, m.n_heads = 1024, 12, 8
  m.compute_dtype = "bfloat16"
  # Expert weights stored in bf16 (fp32 masters in the optimizer): no cast of 64 experts per call.
  m.moe.update(num_experts=64, top_k=8, d_ff=896, expert_param_dtype="bfloat16")
  c.train.update(batch_size=16, seq_len=2048, lr=1e-3, warmup_steps=1000, steps=100000,
                 log_every=50, eval_every=2000, ckpt_every=2000)
  return c
