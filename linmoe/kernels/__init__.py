"""Recurrence ops of linear attention: pure functions on [batch, seq, heads, dim] arrays."""

from linmoe.kernels.delta_rule import delta_rule, delta_rule_step
from linmoe.kernels.diagonal_ssm import diagonal_ssm, diagonal_ssm_step
from linmoe.kernels.dplr import dplr, dplr_step
from linmoe.kernels.gla import gla, gla_step, simple_gla, simple_gla_step
from linmoe.kernels.gla_bonus import gla_bonus, gla_bonus_step
from linmoe.kernels.grouped_matmul import grouped_matmul
from linmoe.kernels.titans import titans, titans_step

__all__ = ["delta_rule", "delta_rule_step", "diagonal_ssm", "diagonal_ssm_step", "gla", "gla_bonus",
           "gla_bonus_step", "gla_step", "grouped_matmul", "simple_gla", "simple_gla_step",
           "dplr", "dplr_step", "titans", "titans_step"]
