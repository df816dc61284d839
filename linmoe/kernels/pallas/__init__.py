"""Pallas kernels of the decay recurrence (Triton lowering on GPUs, interpret mode elsewhere)."""

from linmoe.kernels.pallas.recurrence import pallas_recurrence, supports

__all__ = ["pallas_recurrence", "supports"]
