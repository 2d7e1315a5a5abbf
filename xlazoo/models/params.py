"""Parameter declarations: every parameter's shape, logical axes and initialiser, stated once.

Initialisation, sharding and checkpoint validation all derive from the same declaration tree.
"""

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp
from flax import struct


@dataclasses.dataclass(frozen=True)
class Param:
  shape: tuple[int, ...]
  axes: tuple[str, ...]
  init: str = "normal"  # "normal" (std 0.02), "zeros" or "ones"

  def __post_init__(self):
    assert len(self.shape) == len(self.axes), (self.shape, self.axes)


def is_param(x: Any) -> bool:
  return isinstance(x, Param)


def init_params(decls: dict, key: jax.Array, dtype) -> dict:
  """Random parameters for a declaration tree (normal(0, 0.02) weights, as transformers does)."""
  leaves, treedef = jax.tree.flatten(decls, is_leaf=is_param)
  keys = jax.random.split(key, len(leaves))

  def one(p: Param, k):
    if p.init == "zeros":
      return jnp.zeros(p.shape, dtype)
    if p.init == "ones":
      return jnp.ones(p.shape, dtype)
    return (0.02 * jax.random.normal(k, p.shape, jnp.float32)).astype(dtype)

  return jax.tree.unflatten(treedef, [one(p, k) for p, k in zip(leaves, keys)])


def shapes(decls: dict) -> dict:
  return jax.tree.map(lambda p: p.shape, decls, is_leaf=is_param)


def logical_axes(decls: dict) -> dict:
  return jax.tree.map(lambda p: p.axes, decls, is_leaf=is_param)


@struct.dataclass
class Model:
  """A model: a static, hashable config and a nested dict of arrays.

  It is a pytree, so it passes through `jax.jit`, `jax.grad`, `jax.tree.map` and Orbax.
  """

  config: Any = struct.field(pytree_node=False)
  params: dict

  @property
  def family(self):
    from xlazoo.models import family_of

    return family_of(self.config)

  @property
  def dtype(self):
    return jax.tree.leaves(self.params)[0].dtype

