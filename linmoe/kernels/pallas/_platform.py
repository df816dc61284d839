"""Backend and JAX-version dependent pieces of the Pallas calls, kept in one place.

On a GPU backend the kernels lower through Pallas' Triton backend (deprecated from JAX 0.11 on, which warns at
each lowering, but still the portable path); on any other backend they run with `interpret=True`.
"""

from collections.abc import Callable, Sequence
from typing import Any

import jax
from jax.experimental import pallas as pl

DEFAULT_NUM_WARPS = 4
DEFAULT_NUM_STAGES = 2


def interpret_mode() -> bool:
  """Whether the kernels run interpreted: True unless the default backend is a GPU."""
  return jax.default_backend() != "gpu"


def _triton_compiler_params(num_warps: int, num_stages: int) -> Any:
  """Triton compiler parameters under the class name of the installed JAX."""
  try:
    from jax.experimental.pallas import triton as pltriton  # JAX >= 0.6 (0.10 and 0.11 included).
    return pltriton.CompilerParams(num_warps=num_warps, num_stages=num_stages)
  except (ImportError, AttributeError):
    from jax.experimental.pallas import gpu as plgpu  # Older JAX.
    return plgpu.TritonCompilerParams(num_warps=num_warps, num_stages=num_stages)


def pallas_call(kernel: Callable[..., None], *, name: str, grid: tuple[int, ...],
                in_specs: Sequence[pl.BlockSpec], out_specs: Sequence[pl.BlockSpec],
                out_shape: Sequence[jax.ShapeDtypeStruct], num_warps: int = DEFAULT_NUM_WARPS,
                num_stages: int = DEFAULT_NUM_STAGES) -> Callable[..., tuple[jax.Array, ...]]:
  """`pl.pallas_call` with the Triton parameters on a GPU and interpret mode elsewhere.

  Args:
    kernel: the kernel body over refs (inputs, then outputs).
    name: the kernel's name in profiles.
    grid: at most three grid axes (Triton's limit); the first may be the largest.
    in_specs: one block spec per input.
    out_specs: one block spec per output.
    out_shape: one shape and dtype per output.
    num_warps: warps per program on the GPU.
    num_stages: software-pipelining depth of the loops on the GPU.

  Returns:
    The callable returned by `pl.pallas_call`; it returns a tuple of outputs.
  """
  interpret = interpret_mode()
  params = None if interpret else _triton_compiler_params(num_warps, num_stages)
  return pl.pallas_call(kernel, name=name, grid=grid, in_specs=list(in_specs), out_specs=list(out_specs),
                        out_shape=list(out_shape), interpret=interpret, compiler_params=params)
