"""Linear-MoE A1B-7B (the paper's larger model): hidden 2048, 16 layers, 16 heads, 64 experts of
FFN 1024, top-8."""
from configs import a0p3b_2b


def get_config():
  c = a0p3b_2b.get_config()
  c.workdir = "workdirs/a1b_7b"
  c.model.update(d_model=2048, n_layers=16, n_heads=16)
  c.model.moe.update(d_ff=1024)
  return c
