"""Mamba-2's gated RMSNorm over many rows (a prefill's mixer output) in one pass: a Pallas Mosaic GPU kernel
(Hopper).

Computes `xlazoo.ops.norms.gated_rms_norm`: per row, with g = silu(z), v = y g (gate first) or v = y (norm
first), each of the G groups of v normalised by its RMS and scaled by w, then times g when the norm comes
first; in float32, returned in y's dtype. M rows, I channels (J = I / G a group), Z the width of in_proj's
output zx, whose first I columns are z (read in place: no slice of it is made).

XLA makes two kernels of this (the groups' sums of squares, then the scaling), which read y and z twice:
at the Mamba-2 2.7B shape (8192 rows of 5120) 89 + 112 us a layer on an H100. Here one CTA (a warpgroup)
takes one row: it reads y, z and w once into registers (J / 128 values a thread, 16-byte loads), sums
the squares across the warpgroup, and writes the row. Thousands of rows are in flight at once, so the
loads' latency hides behind each other.

Interpret mode (`interpret=` Mosaic GPU interpret params) runs the same kernel on the CPU; there the
register layouts are skipped.
"""

import functools

import jax
import jax.experimental.pallas as pl
import jax.experimental.pallas.mosaic_gpu as plgpu
import jax.numpy as jnp
from jax import lax

from xlazoo.ops.pallas import on_hopper
from xlazoo.ops.pallas.hopper import interpret_params, strided_vector

f32 = jnp.float32


def supported(y_MI: jax.Array, zx_MZ: jax.Array, w_I: jax.Array, groups: int) -> bool:
  """Whether `gated_rms_norm` handles these on this backend: Hopper, 16-bit y, zx and w alike, each group a
  multiple of 128 channels, zx's rows 16-byte aligned."""
  if y_MI.ndim != 2 or zx_MZ.ndim != 2 or y_MI.shape[0] != zx_MZ.shape[0] or y_MI.shape[1] % groups:
    return False
  I, Z = y_MI.shape[1], zx_MZ.shape[1]
  return (on_hopper() and y_MI.dtype in (jnp.bfloat16, jnp.float16) and zx_MZ.dtype == w_I.dtype == y_MI.dtype and Z >= I
          and Z * y_MI.dtype.itemsize % 16 == 0 and strided_vector(I // groups, y_MI.dtype) > 0)


def gated_rms_norm(y_MI, zx_MZ, w_I, *, eps: float, groups: int, norm_first: bool, interpret=False) -> jax.Array:
  """[M, I] in y's dtype; see the module docstring."""
  M, I = y_MI.shape
  if not (zx_MZ.shape[0] == M and zx_MZ.shape[1] >= I and w_I.shape == (I,) and I % groups == 0
          and strided_vector(I // groups, y_MI.dtype)):
    raise ValueError(f"gated norm kernel: y {y_MI.shape}, zx {zx_MZ.shape}, w {w_I.shape} and {groups} groups do not fit")
  kernel = functools.partial(_kernel, eps=float(eps), groups=groups, norm_first=norm_first,
                             vec=strided_vector(I // groups, y_MI.dtype), interpret=bool(interpret))
  return plgpu.kernel(
      kernel, out_type=jax.ShapeDtypeStruct((M, I), y_MI.dtype), grid=(M,), grid_names=("m",),
      compiler_params=plgpu.CompilerParams(approx_math=True), interpret=interpret_params(interpret),
  )(y_MI, zx_MZ, w_I)


def _kernel(y_ref, zx_ref, w_ref, out_ref, *, eps, groups, norm_first, vec, interpret):
  m = lax.axis_index("m")
  J = y_ref.shape[1] // groups

  def load(ref):
    if interpret:
      return ref[...].astype(f32)
    return plgpu.load(ref, (), layout=plgpu.Layout.WG_STRIDED((J,), vec_size=vec)).astype(f32)

  for g in range(groups):
    cols = pl.ds(g * J, J)
    z = load(zx_ref.at[m, cols])
    gate = z / (1.0 + jnp.exp(-z))  # silu
    v = load(y_ref.at[m, cols])
    if not norm_first:
      v = v * gate
    v = v * lax.rsqrt(jnp.sum(v * v) / J + eps) * load(w_ref.at[cols])
    if norm_first:
      v = v * gate
    out_ref[m, cols] = v.astype(out_ref.dtype)
