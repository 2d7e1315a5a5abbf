"""Feed-forward activations and the gated block (SwiGLU / GeGLU).

Dimensions: B batch, T sequence, D model width, F MLP width.
"""

import dataclasses
import math

import jax
import jax.numpy as jnp

from xlazoo.ops.norms import rms_norm
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


def as_array(w: jax.Array | LayerWeight) -> jax.Array:
  """w, or a LayerWeight's layer sliced out of its stack."""
  return w.get() if isinstance(w, LayerWeight) else w


@dataclasses.dataclass(frozen=True)
class PreNorm:
  """The RMSNorm that feeds a block's projections, handed to `linears` with its raw input: in a decode step,
  with the scale a LayerWeight, the GEMV kernel applies it itself (no XLA kernels for the norm)."""

  scale: jax.Array | LayerWeight
  eps: float
  offset: float = 0.0  # Gemma: 1.0

  def __call__(self, x: jax.Array) -> jax.Array:
    return rms_norm(x, as_array(self.scale), self.eps, self.offset)


def _layer_matmuls(x: jax.Array, ws, subscripts, out_dtype=None, norm: PreNorm | None = None) -> list[jax.Array] | None:
  """x's trailing dims (normed first, with a norm) contracted with each w's leading ones by one GEMV kernel
  launch (float32, or out_dtype where the kernel can round in place), or None where it does not apply (a
  weight not a LayerWeight, a contraction of another form, shapes the kernel lacks, a norm it cannot take)."""
  if not all(isinstance(w, LayerWeight) for w in ws):
    return None
  ks = []
  for w, sub in zip(ws, subscripts):
    ins, out = sub.split("->")
    xs, w_letters = ins.split(",")
    k = len(xs) - len(xs.rstrip(w_letters))  # contracted: x's trailing letters that lead w
    if not k or xs[-k:] != w_letters[:k] or out != xs[:-k] + w_letters[k:]:
      return None
    ks.append(k)
  k = ks[0]
  if any(kk != k for kk in ks):
    return None
  x_MK = x.reshape(-1, math.prod(x.shape[-k:]))
  ws_LKN = [w.stack.reshape(w.stack.shape[0], x_MK.shape[1], -1) for w in ws]
  if not matvec_gpu.supported(x_MK, *ws_LKN) or any(w.layer is not ws[0].layer for w in ws):
    return None
  if norm is not None:
    n = norm.scale
    if not (isinstance(n, LayerWeight) and n.layer is ws[0].layer and matvec_gpu.norm_supported(x_MK, n.stack, *ws_LKN)):
      return None
    norm = (n.stack, norm.eps, norm.offset)
  ys = matvec_gpu.layer_matmuls(x_MK, ws_LKN, ws[0].layer, norm=norm, out_dtype=out_dtype)
  return [y.reshape(*x.shape[:-k], *w.stack.shape[1 + k:]) for y, w in zip(ys, ws)]


def linear(x: jax.Array, w: jax.Array | LayerWeight, subscripts: str, b: jax.Array | None = None,
           norm: PreNorm | None = None) -> jax.Array:
  """einsum in the weights' dtype with float32 accumulation, plus an optional bias; of norm(x) with a norm."""
  return linears(x, [w], [subscripts], [b], norm)[0]


def linears(x: jax.Array, ws, subscripts, biases=None, norm: PreNorm | None = None) -> list[jax.Array]:
  """[linear(x, w, s, b, norm) for each weight]; in a decode step (LayerWeights of one layer) all of them in
  one GEMV kernel launch where it applies (the norm too), else each alone."""
  biases = [None] * len(ws) if biases is None else biases
  # Without a bias the sums are rounded to x's dtype at once, by the GEMV kernel or the GEMM itself. On the GPU a
  # float32 product took a slower GEMM, or cuBLAS plus a rounding kernel (8192-token prefills, H100: Mamba-2
  # 2.7B's in_proj 705 us against 567, Llama-3-8B's layers 13% slower).
  out_dtype = x.dtype if all(b is None for b in biases) else None
  ys = _layer_matmuls(x, ws, subscripts, out_dtype, norm) if norm is not None else None
  if ys is None:  # the norm (if any) in jnp, then the GEMV kernel without it or the einsums
    x = x if norm is None else norm(x)
    ys = _layer_matmuls(x, ws, subscripts, out_dtype) or [
        _matmul(x, w, s, x.dtype if b is None else None) for w, s, b in zip(ws, subscripts, biases)]
  return [(y if b is None else y + b.astype(jnp.float32)).astype(x.dtype) for y, b in zip(ys, biases)]


def _matmul(x, w, subscripts, out_dtype=None):
  """x w in float32 (or out_dtype), the sums in float32 either way."""
  ys = _layer_matmuls(x, [w], [subscripts], out_dtype)
  if ys is not None:
    return ys[0]
  return jnp.einsum(subscripts, x, as_array(w), preferred_element_type=out_dtype or jnp.float32)


def gated_mlp(x_BTD, w_gate_DF, w_up_DF, w_down_FD, act: str, b_gate_F=None, b_up_F=None, b_down_D=None,
              norm: PreNorm | None = None):
  """down(act(gate(x)) * up(x)), of norm(x) with a norm."""
  gate_BTF, up_BTF = linears(x_BTD, [w_gate_DF, w_up_DF], ["BTD,DF->BTF"] * 2, [b_gate_F, b_up_F], norm)
  h_BTF = (ACTIVATIONS[act](gate_BTF.astype(jnp.float32)) * up_BTF.astype(jnp.float32)).astype(x_BTD.dtype)
  return linear(h_BTF, w_down_FD, "BTF,FD->BTD", b_down_D)
