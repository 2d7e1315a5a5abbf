"""Mamba's causal depthwise conv with its SiLU over a prefill, read in place from in_proj's output: a Pallas
Mosaic GPU kernel (Hopper).

Computes `xlazoo.ops.conv.causal_conv_silu`: for the conv's channels [c0, c1) (of F = w's width, whose inputs are
the columns start .. start + F of xz), silu(b + sum_k w_k x_{t-(W-1)+k}) rounded to xz's dtype, the inputs
before t = 0 taken from the conv state (or zeros). Dimensions: B batch, T sequence, Z the width of xz, W the
conv width, C = c1 - c0 output channels.

XLA's fusion of this reads each input row once per tap and takes 121 us a layer for Mamba-2 2.7B's x channels
(8192 rows of 5120) on an H100, about half the copy ceiling; and slicing x, B and C out of in_proj's output for
the SSD kernel would cost a copy. Here a CTA (a warpgroup) walks ROWS rows of a slab of 128 v channels (v
values a thread, 16-byte loads where the width allows) in blocks of ROWS_IN_FLIGHT rows, each block's rows
loaded during the block before, and keeps the last W - 1 inputs in registers: each input is read from memory
once, and each output written once. At the 2.7B shape it takes 65 us (2.6 TB/s) a layer for x: 85 us with
64 rows a CTA and no loads across blocks.

Interpret mode (`interpret=` Mosaic GPU interpret params) runs the same kernel on the CPU; there the register
layouts are skipped.
"""

import functools

import jax
import jax.experimental.pallas as pl
import jax.experimental.pallas.mosaic_gpu as plgpu
import jax.numpy as jnp
from jax import lax

from xlazoo.ops.pallas import on_hopper
from xlazoo.ops.pallas.hopper import interpret_params, strided_vector

ROWS = 32  # rows a CTA walks
ROWS_IN_FLIGHT = 8  # rows loaded at once (their loads are independent)
f32 = jnp.float32


def _slab(C: int, dtype) -> tuple[int, int]:
  """(channels a slab, values a thread) for C channels: slabs of 128 vectors; (0, 0) where none fits."""
  vec = strided_vector(C, dtype)
  return 128 * vec, vec


def supported(xz_BTZ, w_WF, channels, state_BWF=None) -> bool:
  """Whether `causal_conv_silu` handles these on this backend: Hopper, 16-bit xz, w (and state) alike, the channels
  a multiple of 128 that start on a 16-byte boundary of xz's rows."""
  if xz_BTZ.ndim != 3 or w_WF.ndim != 2:
    return False
  c0, c1 = channels
  ok = (on_hopper() and xz_BTZ.dtype in (jnp.bfloat16, jnp.float16) and w_WF.dtype == xz_BTZ.dtype
        and (state_BWF is None or state_BWF.dtype == xz_BTZ.dtype) and 0 <= c0 < c1 <= w_WF.shape[1])
  return ok and _slab(c1 - c0, xz_BTZ.dtype)[0] > 0 and xz_BTZ.shape[2] * xz_BTZ.dtype.itemsize % 16 == 0


def causal_conv_silu(xz_BTZ, w_WF, b_F, state_BWF, *, start: int, channels: tuple[int, int], interpret=False):
  """[B, T, C] in xz's dtype; see the module docstring. b_F and state_BWF may be None."""
  Bsz, T, Z = xz_BTZ.shape
  W, F = w_WF.shape
  c0, c1 = channels
  S, vec = _slab(c1 - c0, xz_BTZ.dtype)
  if not (S and 0 <= c0 < c1 <= F and start + F <= Z and (state_BWF is None or state_BWF.shape == (Bsz, W - 1, F))):
    raise ValueError(f"conv kernel: xz {xz_BTZ.shape}, w {w_WF.shape}, state "
                     f"{None if state_BWF is None else state_BWF.shape} and channels {channels} do not fit")
  kernel = functools.partial(_kernel, start=start, c0=c0, S=S, vec=vec, has_bias=b_F is not None,
                             has_state=state_BWF is not None, interpret=bool(interpret))
  args = [xz_BTZ, w_WF] + [a for a in (b_F, state_BWF) if a is not None]
  return plgpu.kernel(
      kernel, out_type=jax.ShapeDtypeStruct((Bsz, T, c1 - c0), xz_BTZ.dtype),
      grid=(Bsz, -(-T // ROWS), (c1 - c0) // S), grid_names=("b", "t", "s"),
      compiler_params=plgpu.CompilerParams(approx_math=True), interpret=interpret_params(interpret),
  )(*args)


def _kernel(xz_ref, w_ref, *refs, start, c0, S, vec, has_bias, has_state, interpret):
  b_ref = refs[0] if has_bias else None
  state_ref = refs[int(has_bias)] if has_state else None
  out_ref = refs[-1]
  b, t0, s = lax.axis_index("b"), lax.axis_index("t") * ROWS, lax.axis_index("s")
  T = xz_ref.shape[1]
  W = w_ref.shape[0]
  ch = c0 + s * S  # the slab's first conv channel

  def load(ref):
    if interpret:
      return ref[...].astype(f32)
    return plgpu.load(ref, (), layout=plgpu.Layout.WG_STRIDED((S,), vec_size=vec)).astype(f32)

  def row(t):  # conv input t of the slab (t >= 0)
    return load(xz_ref.at[b, jnp.minimum(t, T - 1), pl.ds(start + ch, S)])

  first = [row(t0 + u) for u in range(ROWS_IN_FLIGHT)]  # the first block's rows
  taps = [load(w_ref.at[k, pl.ds(ch, S)]) for k in range(W)]
  bias = load(b_ref.at[pl.ds(ch, S)]) if has_bias else None
  window = []  # inputs t0 - (W - 1) .. t0 - 1: from the rows before, or (t0 = 0) the state or zeros
  for k in range(W - 1):
    t = t0 - (W - 1) + k
    inside = (t >= 0).astype(f32)  # a 0/1 factor: Mosaic GPU does not broadcast a scalar predicate
    x = inside * row(jnp.maximum(t, 0))
    if has_state:
      x = x + (1.0 - inside) * load(state_ref.at[b, jnp.clip(t + W - 1, 0, W - 2), pl.ds(ch, S)])
    window.append(x)

  blocks = lax.div(jnp.minimum(ROWS, T - t0) + ROWS_IN_FLIGHT - 1, ROWS_IN_FLIGHT)

  def block(i, carry):  # ROWS_IN_FLIGHT rows from t0 + i ROWS_IN_FLIGHT, loaded during the block before
    window, inputs = carry
    t = t0 + i * ROWS_IN_FLIGHT
    # The next block's rows go out before this block's arithmetic; the last block reloads its own (cached).
    t_next = jnp.where(i + 1 < blocks, t + ROWS_IN_FLIGHT, t)
    next_inputs = [row(t_next + u) for u in range(ROWS_IN_FLIGHT)]
    for u, x in enumerate(inputs):
      window = [*window, x]
      acc = sum(w * v for w, v in zip(taps, window))
      if has_bias:
        acc = acc + bias
      y = acc / (1.0 + jnp.exp(-acc))  # silu

      @pl.when(t + u < T)
      def _(y=y, u=u):
        out_ref[b, t + u, pl.ds(ch - c0, S)] = y.astype(out_ref.dtype)

      window = window[1:]
    return window, next_inputs

  lax.fori_loop(0, blocks, block, (window, first))
