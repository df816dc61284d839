"""Recurrence ops of linear attention: pure functions on [batch, seq, heads, dim] arrays."""

from linmoe.kernels.gla import gla, gla_step, simple_gla, simple_gla_step

__all__ = ["gla", "gla_step", "simple_gla", "simple_gla_step"]
