"""Feed-forward activations and the gated block (SwiGLU / GeGLU).

Dimensions: B batch, T sequence, D model width, F MLP width.
"""

import dataclasses
import math

import jax
import jax.numpy as jnp

from xlazoo.ops.pallas import matvec_gpu

ACTIVATIONS = {
    "silu": jax.nn.silu,
    "swish": jax.nn.silu,
    "gelu": lambda x: jax.nn.gelu(x, approximate=False),
    "gelu_pytorch_tanh": lambda x: jax.nn.gelu(x, approximate=True),
    "gelu_new": lambda x: jax.nn.gelu(x, approximate=True),
    "gelu_fast": lambda x: jax.nn.gelu(x, approximate=True),
    "relu2": lambda x: jnp.square(jax.nn.relu(x)),  # Nemotron-H
}


@dataclasses.dataclass(frozen=True)
class LayerWeight:
  """Layer `layer` of a weight stacked as [L, ...], left in the stack.

  In a scan over layers XLA copies each layer's slice out of the stack before its matmul; for a
  decode step (a few rows) that copy costs as much as the matmul itself, so `linear` hands the
  whole stack and the index to a kernel that reads the layer where it lies.
  """

  stack: jax.Array
  layer: jax.Array

  def get(self) -> jax.Array:
    return self.stack[self.layer]


def _layer_matmul(x: jax.Array, w: LayerWeight, subscripts: str) -> jax.Array | None:
  """x's trailing dims contracted with w's leading ones by the GEMV kernel, or None where it does not apply."""
  ins, out = subscripts.split("->")
  xs, ws = ins.split(",")
  k = len(xs) - len(xs.rstrip(ws))  # contracted: x's trailing letters that lead w
  if not k or xs[-k:] != ws[:k] or out != xs[:-k] + ws[k:]:
    return None
  x_MK = x.reshape(-1, math.prod(x.shape[-k:]))
  w_LKN = w.stack.reshape(w.stack.shape[0], x_MK.shape[1], -1)
  if not matvec_gpu.supported(x_MK, w_LKN):
    return None
  return matvec_gpu.layer_matmul(x_MK, w_LKN, w.layer).reshape(*x.shape[:-k], *w.stack.shape[1 + k:])


def linear(x: jax.Array, w: jax.Array | LayerWeight, subscripts: str, b: jax.Array | None = None) -> jax.Array:
  """einsum in the weights' dtype with float32 accumulation, plus an optional bias."""
  y = _layer_matmul(x, w, subscripts) if isinstance(w, LayerWeight) else None
  if y is None:
    y = jnp.einsum(subscripts, x, w.get() if isinstance(w, LayerWeight) else w, preferred_element_type=jnp.float32)
  if b is not None:
    y = y + b.astype(jnp.float32)
  return y.astype(x.dtype)


def gated_mlp(x_BTD, w_gate_DF, w_up_DF, w_down_FD, act: str, b_gate_F=None, b_up_F=None, b_down_D=None):
  """down(act(gate(x)) * up(x))."""
  gate_BTF = linear(x_BTD, w_gate_DF, "BTD,DF->BTF", b_gate_F)
  up_BTF = linear(x_BTD, w_up_DF, "BTD,DF->BTF", b_up_F)
  h_BTF = (ACTIVATIONS[act](gate_BTF.astype(jnp.float32)) * up_BTF.astype(jnp.float32)).astype(x_BTD.dtype)
  return linear(h_BTF, w_down_FD, "BTF,FD->BTD", b_down_D)
