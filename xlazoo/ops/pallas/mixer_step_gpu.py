"""One decode step of the Mamba-2 mixer, from in_proj's output to the SSM's output, in one Pallas Mosaic GPU
kernel (Hopper).

Dimensions as in xlazoo.ops.ssd: B batch, N heads, P head dim (64), G groups (R = N / G heads each), Q
state size (64 or 128); I = N P, E = I + 2 G Q conv channels, W conv width, L layers of the stacks.

Computes `xlazoo.ops.ssd.mixer_step_reference`: with zx = [z | x B C | dt] (in_proj's output, one row
per batch row), the caches' layer l and the parameters' layer k,

    xBC = silu(conv over [conv state, xBC])  (rounded to zx's dtype)
    dt = softplus(dt + dt_bias),  h = exp(dt A) h + dt x B^T,  y = h C + D x  (y in zx's dtype)

and returns y [B, I], the new conv state [B, W-1, E], and the SSM state stack with layer l's states
replaced. The gate and the gated norm stay in XLA, fused with the norm's reduction and out_proj's input.

Design: one CTA per (head, batch row), one warpgroup. The caches and the parameters stay in their
stacks ([L, ...]) and are read in place. TMA brings the head's state h [P, Q] (float32)
and, for each of the head's x channels and its group's B and C channels, the conv window (the W-1
cached inputs and the new one, side by side in SMEM), the conv taps and the bias. The conv runs on
vectors in the layouts of the state's rows (x) and columns (B, C), so the update and y = h C are
elementwise products and one row sum on the [P, Q] register tile. h goes back where it came from: the
SSM stack is aliased to the output and written in place, one head per CTA. The new conv state (the
window's last W-1 rows) goes to a separate [B, W-1, E] output that the caller writes into its stack:
the R heads of a group all read the group's B and C window, so none of them may overwrite it in place.
The per-head scalars (dt, dt_bias, A_log, D) are read from global memory directly.

Interpret mode (`interpret=` Mosaic GPU interpret params) runs the same kernel on the CPU; there the
register layouts are skipped.
"""

import functools

import jax
import jax.experimental.pallas as pl
import jax.experimental.pallas.mosaic_gpu as plgpu
import jax.numpy as jnp

from xlazoo.ops.pallas import on_hopper
from xlazoo.ops.pallas.hopper import interpret_params, tile

f32 = jnp.float32


def supported(zx_BZ, conv_LBWE, ssm_LBNPQ, conv_w_LWE) -> bool:
  """Whether `step` handles these on this backend: Hopper, 16-bit zx and conv state alike, P = 64, Q of 64
  or 128, and rows that TMA can address (16-byte multiples)."""
  if zx_BZ.ndim != 2 or conv_LBWE.ndim != 4 or ssm_LBNPQ.ndim != 5:
    return False
  _, _, N, P, Q = ssm_LBNPQ.shape
  E = conv_LBWE.shape[3]
  aligned = lambda n, dtype: n * jnp.dtype(dtype).itemsize % 16 == 0  # noqa: E731
  return (on_hopper() and zx_BZ.dtype in (jnp.bfloat16, jnp.float16) and conv_LBWE.dtype == zx_BZ.dtype
          and ssm_LBNPQ.dtype == f32 and P == 64 and Q in (64, 128) and aligned(zx_BZ.shape[1], zx_BZ.dtype)
          and aligned(E, zx_BZ.dtype) and aligned(E, conv_w_LWE.dtype))


def step(zx_BZ, conv_LBWE, ssm_LBNPQ, layer, conv_w_LWE, conv_b_LE, dt_bias_LN, A_log_LN, D_LN, param_layer, *,
         groups: int, interpret=False):
  """(y [B, I] in zx's dtype, new conv state [B, W-1, E], the SSM stack with layer `layer` stepped); see the
  module docstring. The parameters are stacks [K, ...] read at `param_layer`; conv_b_LE may be None. The
  layers are ints or int32 scalars (may be traced), clamped as indexing does."""
  Bsz = zx_BZ.shape[0]
  L, _, N, P, Q = ssm_LBNPQ.shape
  W = conv_LBWE.shape[2] + 1
  E = conv_LBWE.shape[3]
  G = groups
  I = N * P
  if E != I + 2 * G * Q or zx_BZ.shape[1] < I + E + N or N % G:
    raise ValueError(f"mixer step kernel: zx {zx_BZ.shape}, conv {conv_LBWE.shape}, ssm {ssm_LBNPQ.shape} and "
                     f"{G} groups do not fit together")
  interpret = interpret_params(interpret)
  has_bias = conv_b_LE is not None
  layers_2 = jnp.stack([jnp.clip(jnp.asarray(layer, jnp.int32), 0, L - 1),
                        jnp.clip(jnp.asarray(param_layer, jnp.int32), 0, conv_w_LWE.shape[0] - 1)])
  args = [layers_2, zx_BZ, conv_LBWE, ssm_LBNPQ, conv_w_LWE, *([conv_b_LE] if has_bias else []), dt_bias_LN,
          A_log_LN, D_LN]
  dtype, wdtype = zx_BZ.dtype, conv_w_LWE.dtype
  parts = dict(x=P, b=Q, c=Q)
  scratch = [tile((P, Q), f32)]  # h
  scratch += [plgpu.SMEM((W, n), dtype) for n in parts.values()]  # conv windows
  scratch += [plgpu.SMEM((W, n), wdtype) for n in parts.values()]  # conv taps
  scratch += [plgpu.SMEM((n,), conv_b_LE.dtype) for n in parts.values()] if has_bias else []
  scratch += [plgpu.SMEM((P,), dtype), plgpu.Barrier(num_barriers=1 + 3 * (3 + has_bias))]  # y
  body = functools.partial(_kernel, R=N // G, has_bias=has_bias, interpret=interpret is not None)

  def kernel(*refs):
    pl.run_scoped(functools.partial(body, *refs), *scratch)

  # The SSM stack goes in as a Ref: pl.kernel aliases it in and out, and the kernel writes one layer of it
  # in place. (plgpu.kernel's batching wrapper takes no Refs.)
  ssm_ref = jax.new_ref(ssm_LBNPQ, memory_space=plgpu.GMEM)
  y_BI, conv_BWE = pl.kernel(
      kernel,
      out_type=(jax.ShapeDtypeStruct((Bsz, I), dtype), jax.ShapeDtypeStruct((Bsz, W - 1, E), conv_LBWE.dtype)),
      mesh=plgpu.Mesh(grid=(N, Bsz), grid_names=("n", "b"), kernel_name="mixer_step"),
      compiler_params=plgpu.CompilerParams(approx_math=True),
      interpret=interpret,
  )(*args[:3], ssm_ref, *args[4:])
  return y_BI, conv_BWE, ssm_ref[...]


def _kernel(layers_ref, zx_ref, conv_ref, ssm_ref, w_ref, *refs, R, has_bias, interpret):
  b_ref, refs = (refs[0], refs[1:]) if has_bias else (None, refs)
  dtb_ref, alog_ref, d_ref, y_ref, conv_out_ref, h_smem, *refs = refs
  wins, taps, refs = refs[:3], refs[3:6], refs[6:]
  biases, refs = (refs[:3], refs[3:]) if has_bias else ((None,) * 3, refs)
  y_smem, bars = refs
  n, b = jax.lax.axis_index("n"), jax.lax.axis_index("b")
  layer, k = layers_ref[0], layers_ref[1]  # the caches' layer, the parameters'
  dtype = zx_ref.dtype
  _, _, P, Q = ssm_ref.shape[1:]
  W, E = w_ref.shape[1:]
  I = ssm_ref.shape[2] * P
  GQ = (E - I) // 2
  g = jax.lax.div(n, jnp.int32(R))
  starts = (n * P, I + g * Q, I + GQ + g * Q)  # the conv channels of x, B and C
  widths = (P, Q, Q)

  bar = iter(range(bars.shape[0]))
  waits = []

  def fetch(src, dst):
    i = next(bar)
    plgpu.copy_gmem_to_smem(src, dst, bars.at[i])
    waits.append(i)

  fetch(ssm_ref.at[layer, b, n], h_smem)
  for ch0, width, win, tap, bias in zip(starts, widths, wins, taps, biases):
    fetch(conv_ref.at[layer, b, :, pl.ds(ch0, width)], win.at[pl.ds(0, W - 1)])
    fetch(zx_ref.at[b, pl.ds(I + ch0, width)], win.at[W - 1])
    fetch(w_ref.at[k, :, pl.ds(ch0, width)], tap)
    if has_bias:
      fetch(b_ref.at[k, pl.ds(ch0, width)], bias)
  h_bar, *waits = waits

  def vector(ref, dim):  # a SMEM vector as float32, laid out along dimension `dim` of the [P, Q] state tile
    if interpret:
      return ref[...].astype(f32)
    return plgpu.load(ref, (), layout=plgpu.Layout.WGMMA.reduce(1 - dim), optimized=False).astype(f32)

  silu = lambda v: v / (1.0 + jnp.exp(-v))  # noqa: E731
  for i in waits:
    plgpu.barrier_wait(bars.at[i])
  xbc = []
  for dim, win, tap, bias in zip((0, 1, 1), wins, taps, biases):
    acc = sum(vector(tap.at[w], dim) * vector(win.at[w], dim) for w in range(W))
    if has_bias:
      acc = acc + vector(bias, dim)
    xbc.append(silu(acc).astype(dtype).astype(f32))
  x, B, C = xbc

  dt = zx_ref[b, I + E + n].astype(f32) + dtb_ref[k, n].astype(f32)
  dt = jnp.maximum(dt, 0.0) + jnp.log(1.0 + jnp.exp(-jnp.abs(dt)))  # softplus
  decay = jnp.exp(-dt * jnp.exp(alog_ref[k, n].astype(f32)))
  D = d_ref[k, n].astype(f32)

  plgpu.barrier_wait(bars.at[h_bar])
  h = h_smem[...] if interpret else plgpu.load(h_smem, (), layout=plgpu.Layout.WGMMA)
  bcast = lambda v, dim: jax.lax.broadcast_in_dim(v, (P, Q), [dim])  # noqa: E731
  h = h * decay + bcast(x * dt, 0) * bcast(B, 1)
  y = (h * bcast(C, 1)).sum(axis=1) + D * x
  h_smem[...] = h
  y_smem[...] = y.astype(dtype)
  plgpu.commit_smem()
  plgpu.copy_smem_to_gmem(h_smem, ssm_ref.at[layer, b, n])
  plgpu.copy_smem_to_gmem(y_smem, y_ref.at[b, pl.ds(n * P, P)])
  plgpu.copy_smem_to_gmem(wins[0].at[pl.ds(1, W - 1)], conv_out_ref.at[b, :, pl.ds(starts[0], P)])

  @pl.when(jax.lax.rem(n, jnp.int32(R)) == 0)  # one head of each group writes the group's B and C conv state
  def _():
    for ch0, win in zip(starts[1:], wins[1:]):
      plgpu.copy_smem_to_gmem(win.at[pl.ds(1, W - 1)], conv_out_ref.at[b, :, pl.ds(ch0, Q)])

  plgpu.wait_smem_to_gmem(0)
