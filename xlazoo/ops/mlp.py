"""Feed-forward activations and the gated block (SwiGLU / GeGLU).

Dimensions: B batch, T sequence, D model width, F MLP width.
"""

import jax
import jax.numpy as jnp

ACTIVATIONS = {
    "silu": jax.nn.silu,
    "swish": jax.nn.silu,
    "gelu": lambda x: jax.nn.gelu(x, approximate=False),
    "gelu_pytorch_tanh": lambda x: jax.nn.gelu(x, approximate=True),
    "gelu_new": lambda x: jax.nn.gelu(x, approximate=True),
    "gelu_fast": lambda x: jax.nn.gelu(x, approximate=True),
    "relu2": lambda x: jnp.square(jax.nn.relu(x)),  # Nemotron-H
}


def linear(x: jax.Array, w: jax.Array, subscripts: str, b: jax.Array | None = None) -> jax.Array:
  """einsum in the weights' dtype with float32 accumulation, plus an optional bias."""
  y = jnp.einsum(subscripts, x, w, preferred_element_type=jnp.float32)
  if b is not None:
    y = y + b.astype(jnp.float32)
  return y.astype(x.dtype)


def gated_mlp(x_BTD, w_gate_DF, w_up_DF, w_down_FD, act: str, b_gate_F=None, b_up_F=None, b_down_D=None):
  """down(act(gate(x)) * up(x))."""
  gate_BTF = linear(x_BTD, w_gate_DF, "BTD,DF->BTF", b_gate_F)
  up_BTF = linear(x_BTD, w_up_DF, "BTD,DF->BTF", b_up_F)
  h_BTF = (ACTIVATIONS[act](gate_BTF.astype(jnp.float32)) * up_BTF.astype(jnp.float32)).astype(x_BTD.dtype)
  return linear(h_BTF, w_down_FD, "BTF,FD->BTD", b_down_D)
