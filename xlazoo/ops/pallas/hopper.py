"""Pieces shared by the Mosaic GPU kernels.

The warp-specialised ones (flash attention, the SSD scan) run consumer warpgroups that compute with wgmma (float32 accumulators in registers) and one
producer warpgroup that only issues TMA copies into swizzled SMEM, through rings of slots guarded by
mbarriers ("ready": the copy landed; "free": the consumers are done with the slot).
"""

import functools

import jax.experimental.pallas as pl
import jax.experimental.pallas.mosaic_gpu as plgpu
import jax.numpy as jnp
from jax import lax

ROWS = 64  # rows of a tile owned by one consumer warpgroup (the M of its wgmmas)


class Ops:
  """The operations whose form differs between the Mosaic GPU lowering and its CPU interpreter.

  The interpreter of JAX 0.10 cannot run wgmma with a transposed operand or a register operand, nor
  layout casts, so there (and only there) the matrix products are jnp.dot on the SMEM tiles and layout
  casts are skipped.
  """

  def __init__(self, interpret):
    self.interpret = interpret is not None

  def layout(self, x, layout):
    return x if self.interpret else plgpu.layout_cast(x, layout)

  def zeros(self, shape):
    return self.layout(jnp.zeros(shape, jnp.float32), plgpu.Layout.WGMMA)

  def full_rows(self, value):
    return self.layout(jnp.full((ROWS,), value, jnp.float32), plgpu.Layout.WGMMA.reduce(1))

  def iota(self, shape, dim):
    if self.interpret:
      return lax.broadcasted_iota(jnp.int32, shape, dim)
    return plgpu.broadcasted_iota(jnp.int32, shape, dim, layout=plgpu.Layout.WGMMA)

  def load(self, ref):
    """A tiled SMEM tile into registers, in the wgmma accumulator layout."""
    return ref[...] if self.interpret else plgpu.load(ref, (), layout=plgpu.Layout.WGMMA)

  def vector(self, ref, dim):
    """A float32 SMEM vector laid out along dimension `dim` of a [ROWS, X] wgmma tile."""
    if self.interpret:
      return ref[...]
    return plgpu.load(ref, (), layout=plgpu.Layout.WGMMA.reduce(1 - dim))

  def mma(self, nt=(), acc=(), tn=()):
    """One list, in this order: a @ b.T for (a, b) in nt (SMEM a, b); c + a @ b for (c, a, b) in acc
    (register a, SMEM b); c + a.T @ b for (c, a, b) in tn (SMEM a, b; 16-bit a). float32. On the GPU all
    of them issue as wgmmas before one wait."""
    if self.interpret:
      dot = functools.partial(jnp.dot, preferred_element_type=jnp.float32)
      return ([dot(a[...], b[...].T) for a, b in nt] + [c + dot(a, b[...]) for c, a, b in acc]
              + [c + dot(a[...].T, b[...]) for c, a, b in tn])

    T = lambda ref: plgpu.transpose_ref(ref, (1, 0))  # noqa: E731
    operands = [(a, T(b)) for a, b in nt] + [(a, b) for _, a, b in acc] + [(T(a), b) for _, a, b in tn]

    def body(refs):
      for ref, (a, b) in zip(refs, operands, strict=True):
        plgpu.wgmma(ref, a, b)

    init = [self.zeros((a.shape[0], b.shape[0])) for a, b in nt] + [c for c, _, _ in (*acc, *tn)]
    return list(pl.run_state(body)(tuple(plgpu.ACC.init(x) for x in init)))


def ring_slot(t, stages):
  return lax.rem(t, jnp.int32(stages))


def produce(streams, n, stages):
  """The producer's loop: block t of every stream (src(t): GMEM ref, smem ring, ready, free) goes to slot
  t % stages once the consumers freed that slot. The final waits observe the last frees, so that every
  barrier phase is waited for (mbarrier parity tracking) and no copy outlives the CTA's use of SMEM."""

  @pl.loop(0, n)
  def _(t):
    s = ring_slot(t, stages)
    for src, smem, ready, free in streams:
      @pl.when(t >= stages)
      def _():
        plgpu.barrier_wait(free.at[s])

      plgpu.copy_gmem_to_smem(src(t), smem.at[s], ready.at[s])

  @pl.loop(jnp.maximum(n - stages, 0), n)
  def _(t):
    for *_, free in streams:
      plgpu.barrier_wait(free.at[ring_slot(t, stages)])


def strided_vector(width: int, dtype) -> int:
  """Values a thread of a warpgroup takes at once in a WG_STRIDED layout of `width` elements: 16 bytes where the
  width allows it (a multiple of 128 such vectors), else fewer; 0 where none fits."""
  widest = 16 // jnp.dtype(dtype).itemsize
  return next((v for v in (widest, widest // 2, widest // 4, 1) if v and width % (128 * v) == 0), 0)


def tile(shape, dtype, swizzle=128):
  """SMEM tiles in the layout wgmma and TMA want: (8, swizzle bytes) tiles, swizzled (128 bytes unless the
  operand's width needs a narrower one)."""
  tiling = plgpu.TilingTransform((8, swizzle // jnp.dtype(dtype).itemsize))
  return plgpu.SMEM(shape, dtype, transforms=(tiling, plgpu.SwizzleTransform(swizzle)))


def interpret_params(interpret):
  """A kernel's `interpret` argument as Mosaic GPU takes it: None (compile), or interpreter params (True:
  the defaults; there is no public path to them yet)."""
  if interpret is True:
    from jax._src.pallas.mosaic_gpu.interpret.params import InterpretGPUParams
    return InterpretGPUParams()
  return interpret or None
