"""Parameter declarations: every parameter's shape, logical axes and initialiser, stated once.

Initialisation, sharding and checkpoint validation all derive from the same declaration tree.
"""

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp
from flax import struct

from xlazoo.ops.mlp import LayerWeight


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



# The Mamba-2 mixer's per-layer vectors, which its decode step (ops.ssd.mixer_step) reads in their stacks.
MIXER_STEP_KEYS = ("conv_w_WE", "conv_b_E", "dt_bias_N", "A_log_N", "D_N")


# The norms that go with their input to the projections after them (ops.mlp.PreNorm), whose scales a GEMV kernel
# may apply: the layers' pre-norms and the Mamba-2 mixer's gated norm (before out_proj).
PRE_NORM_KEYS = ("norm", "attn_norm", "mlp_norm", "gate_norm")


def _in_place(path) -> bool:
  """Matrices that `linear` reads (w..._<dims>), not the experts' stacks (..._X..), which the MoE op reads;
  the mixer step's vectors; and the pre-norms' scales."""
  key, parent = (getattr(k, "key", "") for k in (path[-1], path[-2] if len(path) > 1 else None))
  return (key.startswith("w") and "X" not in key.rsplit("_", 1)[-1]) or key in MIXER_STEP_KEYS or parent in PRE_NORM_KEYS


def layer_params(tree: dict, i: jax.Array, *, in_place: bool = False) -> dict:
  """Layer i of a tree of [L, ...] stacks. in_place (decode): `linear`'s matrices, the mixer step's vectors
  and the pre-norms' scales stay in their stacks as LayerWeight, which a kernel reads where they lie;
  everything else is sliced out."""
  def one(path, a):
    if in_place and _in_place(path):
      return LayerWeight(a, i)
    return a[i]
  return jax.tree_util.tree_map_with_path(one, tree)
