"""Logical axis names and the one rules table that maps them to mesh axes (the MaxText habit).

Layers name the axes of every parameter (`logical(init, *names)` on its initializer) and of the main
activations (`constrain(x, names)`); only this module turns names into mesh axes.

Parameter axes:   vocab, embed (the model width d_model), heads, head_dim, mlp (dense and expert hidden
                  width, Mamba's inner channels), channels (a flattened heads x head_dim, e.g. the short
                  convolutions of q, k, v), experts, and unsharded ones: lora (low-rank widths), state (SSM
                  state size), conv (convolution taps), norm (a normalized feature), mix (RWKV token-shift
                  mixes), memories (MoM memories), router (MoE router outputs).
Activation axes:  batch, seq, act_embed.

A dimension that its mesh axes do not divide (a batch of 1 at init, 5 RWKV mixes over tensor=2) stays
unsharded rather than failing: `fit_spec` drops those axes, so sharding never changes a result.
"""
import math
from typing import Callable, Sequence

import flax.linen as nn
import jax
from jax.sharding import Mesh, NamedSharding, PartitionSpec

# (logical name, mesh axes), first match wins; a mesh axis is used at most once per array.
RULES: tuple[tuple[str, str | tuple[str, ...] | None], ...] = (
    ("batch", ("data", "fsdp")),
    ("seq", "sequence"),
    ("act_embed", None),
    ("experts", "expert"),
    ("heads", "tensor"),
    ("mlp", "tensor"),
    ("channels", "tensor"),
    ("vocab", "tensor"),
    ("embed", "fsdp"),
)
ACTIVATION = ("batch", "seq", "act_embed")  # the residual stream [batch, seq, d_model]
DEFAULT_KERNEL_INIT = nn.initializers.lecun_normal()  # flax's nn.Dense default, named once here


def logical(init: Callable, *names: str | None) -> Callable:
  """`init` whose parameter carries one logical axis name per dimension."""
  return nn.with_logical_partitioning(init, names)


def dense_init(*names: str | None) -> Callable:
  """nn.Dense's default kernel initializer with logical names (in..., out...)."""
  return logical(DEFAULT_KERNEL_INIT, *names)


def zeros_init(*names: str | None) -> Callable:
  return logical(nn.initializers.zeros, *names)


def ones_init(*names: str | None) -> Callable:
  return logical(nn.initializers.ones, *names)


def fit_spec(spec: PartitionSpec, shape: Sequence[int], axis_sizes: dict[str, int]) -> PartitionSpec:
  """`spec` with, per dimension, only the leading mesh axes whose product divides that dimension; axes
  the mesh does not have are dropped (a test's or a tool's mesh may name only some)."""
  fitted = []
  for dim, axes in zip(shape, tuple(spec) + (None,) * (len(shape) - len(spec))):
    axes = (axes,) if isinstance(axes, str) else tuple(axes or ())
    kept = []
    for axis in (a for a in axes if a in axis_sizes):
      if dim % (math.prod(axis_sizes.get(a, 1) for a in (*kept, axis))) == 0:
        kept.append(axis)
      else:
        break
    fitted.append(None if not kept else kept[0] if len(kept) == 1 else tuple(kept))
  return PartitionSpec(*fitted)


def mesh_spec(names: Sequence[str | None], shape: Sequence[int],
              axis_sizes: dict[str, int]) -> PartitionSpec:
  """The mesh PartitionSpec of an array with logical axis `names`, fitted to its `shape`."""
  return fit_spec(nn.logical_to_mesh_axes(tuple(names), RULES), shape, axis_sizes)


def constrain(x: jax.Array, names: Sequence[str | None] = ACTIVATION) -> jax.Array:
  """Pins activation `x` to the sharding its logical `names` give on the ambient mesh (no mesh: x)."""
  mesh = jax.sharding.get_abstract_mesh()
  if mesh.empty:
    return x
  return jax.lax.with_sharding_constraint(x, mesh_spec(names, x.shape, dict(mesh.shape)))


def shardings(boxed_tree, mesh: Mesh):
  """NamedShardings for a pytree whose leaves may be logically partitioned (nn.LogicallyPartitioned
  boxes, as `init` returns them, or their abstract `eval_shape`); unnamed leaves are replicated."""
  axis_sizes = dict(mesh.shape)
  def one(leaf):
    if isinstance(leaf, nn.LogicallyPartitioned):
      return NamedSharding(mesh, mesh_spec(leaf.names, leaf.value.shape, axis_sizes))
    return NamedSharding(mesh, PartitionSpec())
  return jax.tree.map(one, boxed_tree, is_leaf=lambda x: isinstance(x, nn.LogicallyPartitioned))
