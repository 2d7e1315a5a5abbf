"""One decode step of the Mamba-2 mixer, from in_proj's output to the SSM's output, in one Pallas Mosaic GPU
kernel (Hopper).

Dimensions as in xlazoo.ops.ssd: B batch, N heads, P head dim (64), G groups (R = N / G heads each), Q
state size (64 or 128); I = N P, E = I + 2 G Q conv channels, W conv width, L layers of the stacks.

Computes `xlazoo.ops.ssd.mixer_step_reference`: with zx = [z | x B C | dt] (in_proj's output, one row
per batch row), the caches' layer l and the parameters' layer k,

    xBC = silu(conv over [conv state, xBC])  (rounded to zx's dtype)
    dt = softplus(dt + dt_bias),  h = exp(dt A) h + dt x B^T,  y = h C + D x  (y in zx's dtype)

and returns y [B, I] (with `gate=True`, y silu(z) instead, computed in float32 and rounded to zx's dtype),
the new conv state [B, W-1, E], and the SSM state stack with layer l's states replaced.

Design: one CTA per (head, batch row), one warpgroup. The caches and the parameters stay in their
stacks ([L, ...]) and are read in place. The conv runs 64 channels at a time on vectors in the layout of
the state tile's rows (two values a thread), read straight from global memory: the head's x channels,
then its group's B and C channels, which go through SMEM into the layout of the tile's columns (loading
B and C in that layout from global memory, 32 values a thread, made the kernel 8.1 us a layer instead of
6.7). TMA brings the head's state h [P, Q] (float32) meanwhile (issued first, then all of the conv's loads),
the update and y = h C are elementwise products and one row sum on the register tile, and h goes back by
TMA where it came from: the SSM stack is aliased to the output and written in place, one head per CTA.
The new conv state (the window's last W-1 inputs) goes to a separate [B, W-1, E] output that the caller
writes into its stack: the R heads of a group all read the group's B and C window, so none of them may
overwrite it in place. The per-head scalars (dt, dt_bias, A_log, D) are read from global memory directly.

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

# Whether `xlazoo.ops.ssd.mixer_step` takes this kernel where `supported` says it can (the switch the tests and
# the A/B timings in benchmarks/RESULTS.md use).
ENABLED = True
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
         groups: int, gate: bool = False, interpret=False):
  """(y [B, I] in zx's dtype (y silu(z) with gate), new conv state [B, W-1, E], the SSM stack with layer
  `layer` stepped); see the module docstring. The parameters are stacks [K, ...] read at `param_layer`;
  conv_b_LE may be None. The layers are ints or int32 scalars (may be traced), clamped as indexing does."""
  Bsz = zx_BZ.shape[0]
  N, P, Q = ssm_LBNPQ.shape[2:]
  W = conv_LBWE.shape[2] + 1
  E = conv_LBWE.shape[3]
  G = groups
  I = N * P
  if E != I + 2 * G * Q or zx_BZ.shape[1] < I + E + N or N % G:
    raise ValueError(f"mixer step kernel: zx {zx_BZ.shape}, conv {conv_LBWE.shape}, ssm {ssm_LBNPQ.shape} and "
                     f"{G} groups do not fit together")
  interpret = interpret_params(interpret)
  has_bias = conv_b_LE is not None
  dtype = zx_BZ.dtype
  body = functools.partial(_kernel, R=N // G, has_bias=has_bias, gate=gate, interpret=interpret is not None)

  def kernel(*refs):  # SMEM through run_scoped, as plgpu.kernel allocates it
    pl.run_scoped(functools.partial(body, *refs), tile((P, Q), f32), plgpu.SMEM((2, Q), f32),
                  plgpu.Barrier(num_barriers=1))

  # The SSM stack goes in as a Ref: pl.kernel aliases it in and out, and the kernel writes one layer of it
  # in place. (plgpu.kernel's batching wrapper takes no Refs.)
  ssm_ref = jax.new_ref(ssm_LBNPQ, memory_space=plgpu.GMEM)
  index = lambda i: jnp.asarray(i, jnp.int32).reshape(1)  # noqa: E731
  args = [index(layer), index(param_layer), zx_BZ, conv_LBWE, ssm_ref, conv_w_LWE, *([conv_b_LE] if has_bias else []),
          dt_bias_LN, A_log_LN, D_LN]
  y_BI, conv_BWE = pl.kernel(
      kernel,
      out_type=(jax.ShapeDtypeStruct((Bsz, I), dtype), jax.ShapeDtypeStruct((Bsz, W - 1, E), conv_LBWE.dtype)),
      mesh=plgpu.Mesh(grid=(N, Bsz), grid_names=("n", "b"), kernel_name="mixer_step"),
      compiler_params=plgpu.CompilerParams(approx_math=True),
      interpret=interpret,
  )(*args)
  # The caller writes conv_BWE into the conv stack that this kernel reads. Left to itself, XLA's GPU
  # dynamic-slice fusion has the kernel write it there directly, in place, and the heads that start late then
  # read a B and C window their group's leader has already shifted (wrong states from batch 8 at 80 heads on
  # the H100). The barrier keeps the output a buffer of its own.
  conv_BWE = jax.lax.optimization_barrier(conv_BWE)
  return y_BI, conv_BWE, ssm_ref[...]


def _kernel(layer_ref, k_ref, zx_ref, conv_ref, ssm_ref, w_ref, *refs, R, has_bias, gate, interpret):
  b_ref, refs = (refs[0], refs[1:]) if has_bias else (None, refs)
  dtb_ref, alog_ref, d_ref, y_ref, conv_out_ref, h_smem, bc_smem, h_bar = refs
  n, b = jax.lax.axis_index("n"), jax.lax.axis_index("b")
  # The caches' layer and the parameters', clamped as indexing does (here, not in XLA kernels of their own).
  layer = jnp.clip(layer_ref[0], 0, ssm_ref.shape[0] - 1)
  k = jnp.clip(k_ref[0], 0, w_ref.shape[0] - 1)
  dtype = zx_ref.dtype
  _, _, P, Q = ssm_ref.shape[1:]
  W, E = w_ref.shape[1:]
  I = ssm_ref.shape[2] * P
  GQ = (E - I) // 2
  g = jax.lax.div(n, jnp.int32(R))
  leader = jax.lax.rem(n, jnp.int32(R)) == 0  # the head of its group that writes the group's B and C conv state

  rows, cols = plgpu.Layout.WGMMA.reduce(1), plgpu.Layout.WGMMA.reduce(0)  # along the state's rows, columns

  def load(ref, layout=rows, smem=False):  # as float32, in a register layout of the [P, Q] state tile
    if interpret:
      return ref[...].astype(f32)
    return plgpu.load(ref, (), layout=layout, optimized=smem).astype(f32)  # GMEM: element by element

  def store(ref, value):
    ref[...] = value.astype(ref.dtype)

  # The conv, 64 channels at a time in the rows' layout (two values a thread): x, then B and C 64 columns at a
  # time, which go through SMEM into the columns' layout.
  silu = lambda v: v / (1.0 + jnp.exp(-v))  # noqa: E731
  chunks = [(n * P, None, 0)] + [(I + i * GQ + g * Q + j, i, j) for i in (0, 1) for j in range(0, Q, P)]
  # The state's TMA, then every chunk's loads, then the arithmetic and the stores: all the loads are in flight
  # at once (H100, Mamba-2 2.7B: 5.1 us a layer, against 7.3 with each chunk's loads, arithmetic and stores in
  # turn and the state's TMA after the conv).
  plgpu.copy_gmem_to_smem(ssm_ref.at[layer, b, n], h_smem, h_bar.at[0])
  inputs = []
  for ch0, _, _ in chunks:
    cols_ = pl.ds(ch0, P)
    window = [load(conv_ref.at[layer, b, w, cols_]) for w in range(W - 1)] + [load(zx_ref.at[b, pl.ds(I + ch0, P)])]
    taps = [load(w_ref.at[k, w, cols_]) for w in range(W)]
    inputs.append((window, taps, load(b_ref.at[k, cols_]) if has_bias else None))
  z = load(zx_ref.at[b, pl.ds(n * P, P)]) if gate else None
  dt = zx_ref[b, I + E + n].astype(f32) + dtb_ref[k, n].astype(f32)
  alog = alog_ref[k, n].astype(f32)
  D = d_ref[k, n].astype(f32)
  dt = jnp.maximum(dt, 0.0) + jnp.log(1.0 + jnp.exp(-jnp.abs(dt)))  # softplus
  decay = jnp.exp(-dt * jnp.exp(alog))
  for (ch0, i, j), (window, taps, bias) in zip(chunks, inputs):
    cols_ = pl.ds(ch0, P)
    acc = sum(t * v for t, v in zip(taps, window))
    if has_bias:
      acc = acc + bias
    v = silu(acc).astype(dtype).astype(f32)

    def shift(window=window, cols_=cols_):  # the new conv state: the window's last W - 1 inputs
      for w in range(W - 1):
        store(conv_out_ref.at[b, w, cols_], window[w + 1])

    if i is None:
      x = v
      shift()
    else:
      store(bc_smem.at[i, pl.ds(j, P)], v)
      pl.when(leader)(shift)
  B, C = load(bc_smem.at[0], cols, smem=True), load(bc_smem.at[1], cols, smem=True)

  plgpu.barrier_wait(h_bar.at[0])
  h = load(h_smem, plgpu.Layout.WGMMA, smem=True)
  bcast = lambda v, dim: jax.lax.broadcast_in_dim(v, (P, Q), [dim])  # noqa: E731
  h = h * decay + bcast(x * dt, 0) * bcast(B, 1)
  h_smem[...] = h
  plgpu.commit_smem()
  plgpu.copy_smem_to_gmem(h_smem, ssm_ref.at[layer, b, n])
  y = (h * bcast(C, 1)).sum(axis=1) + D * x
  if gate:  # y in zx's dtype, times silu(z), in float32
    y = y.astype(dtype).astype(f32) * silu(z)
  store(y_ref.at[b, pl.ds(n * P, P)], y)
  plgpu.wait_smem_to_gmem(0, wait_read_only=True)
