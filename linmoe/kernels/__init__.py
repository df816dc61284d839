"""Recurrence ops of linear attention: pure functions on [batch, seq, heads, dim] arrays."""

from linmoe.kernels.delta_rule import delta_rule, delta_rule_step
from linmoe.kernels.gla import gla, gla_step, simple_gla, simple_gla_step
from linmoe.kernels.grouped_matmul import grouped_matmul

__all__ = ["delta_rule", "delta_rule_step", "gla", "gla_step", "grouped_matmul", "simple_gla",
           "simple_gla_step"]
