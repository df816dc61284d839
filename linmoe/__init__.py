"""linmoe: Linear-MoE language models in JAX/Flax."""
