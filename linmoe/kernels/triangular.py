"""Unit lower-triangular solves by matmuls only, shared by the WY-form ops (delta rule, DPLR, Titans).

Not `jax.scipy.linalg.solve_triangular`: jaxlib 0.10's CPU LAPACK trsm splits its batch over XLA's
intra-op thread pool and waits for it, so two solves running at once can deadlock a 2-core machine (seen
here); the explicit inverse (as flash-linear-attention's WY kernels form it) is also faster on CPU.
"""
import jax
import jax.numpy as jnp

from linmoe.kernels import common


def _unit_lower_inverse(matrix: jax.Array) -> jax.Array:
  """(I + strictly_lower(matrix))^{-1} for [..., P, P], P a power of two, by 2 x 2 block inversion:
  [[A, 0], [B, D]]^{-1} = [[A^-1, 0], [-D^-1 B A^-1, D^-1]], both halves inverted in one batched call."""
  size = matrix.shape[-1]
  if size == 1:
    return jnp.ones_like(matrix)
  half = size // 2
  inverse = _unit_lower_inverse(jnp.stack([matrix[..., :half, :half], matrix[..., half:, half:]]))
  a_inv, d_inv = inverse[0], inverse[1]
  lower_left = -(d_inv @ matrix[..., half:, :half]) @ a_inv
  top = jnp.concatenate([a_inv, jnp.zeros_like(a_inv)], axis=-1)
  return jnp.concatenate([top, jnp.concatenate([lower_left, d_inv], axis=-1)], axis=-2)


def unit_lower_solve(matrix: jax.Array, rhs: jax.Array) -> jax.Array:
  """X with matrix X = rhs per chunk and head; matrix [n, C, C, heads] unit lower triangular (its
  diagonal and upper part are not read), rhs [n, C, heads, dim]. Returns [n, C, heads, dim] fp32.

  Matmuls only (module docstring).
  """
  size = matrix.shape[1]
  padded = 1 << (size - 1).bit_length()  # zero padding: the inverse of blockdiag(M, I)
  matrix = jnp.pad(jnp.moveaxis(matrix.astype(common.STATE_DTYPE), -1, 1),
                   [(0, 0), (0, 0), (0, padded - size), (0, padded - size)])
  inverse = _unit_lower_inverse(matrix)[..., :size, :size]  # [n, heads, C, C]
  return jnp.einsum("nhij,njhd->nihd", inverse, rhs, preferred_element_type=common.STATE_DTYPE)


def shift_down(x: jax.Array) -> jax.Array:
  """Row i of the result is row i - 1 of x along axis 1 (row 0 is zeros): [n, C, ...] -> same."""
  return jnp.concatenate([jnp.zeros_like(x[:, :1]), x[:, :-1]], axis=1)
