"""Mamba-2's chunked SSD scan (the prefill) for Hopper GPUs, in Pallas with the Mosaic GPU lowering.

Dimensions as in xlazoo.ops.ssd: B batch, T sequence, N heads, P head dim, G groups (R = N / G heads
each), Q state size; L tokens per chunk (the M of the wgmmas), t / s a target / source row of a chunk.

Computes `xlazoo.ops.ssd.ssd_reference`: per head, h_t = exp(dt_t A) h_{t-1} + dt_t x_t B_t^T and
y_t = h_t C_t + D x_t, from an initial state, returning y (in x's dtype) and the final state (float32).

Design: one CTA per (head, batch row) walks the head's chunks in order, so neither the [L, L] decays nor the
per-chunk states ever go to memory. A producer warpgroup streams each chunk's x, B, C and five float32 vectors
computed by XLA (cs, the running sum of dt A inside the chunk; x's row scale dt_s exp(cs_L - cs_s); cs and dt
again, for the columns: one SMEM vector cannot be read in both the row and the column layout; D) through a ring
of SMEM slots. Two consumer warpgroups share the work of a chunk, so that the chain of states runs beside the
outputs rather than in series with them:

    state:   x' = x * dt_s exp(cs_L - cs_s)   (row s; 16-bit, into SMEM)
             h = exp(cs_L) h + x'^T B         (h a float32 wgmma accumulator in registers; each state
                                               handed on in 16 bits through a ring of HB SMEM slots)
    output:  S = C B^T, masked and decayed    (before it waits for the state)
             Y = C h^T                        (h as the chunk entered it, from that ring)
             y = Y exp(cs_t) + (S * exp(cs_t - cs_s) dt_s [s <= t]) x + D x

H100, the Mamba-2 2.7B layer (80 heads, 8192 tokens), two runs: 210 us with one consumer warpgroup doing both in
turn against 187 with two; 203 with the output waiting for the state first against 176 as here
(benchmarks/RESULTS.md). The output warpgroup sends y out through SMEM by TMA, in x's dtype (as
mamba_ssm's scan does: half the bytes of float32); the state warpgroup sends the final state at the end. The
matmul operands are the inputs' 16-bit dtype with float32 accumulation, as in the reference. A padded step has
dt = 0, which leaves the state unchanged, so ragged T is padded to whole chunks.

Interpret mode (`interpret=` Mosaic GPU interpret params) runs the same kernel on the CPU, with the
matrix products as jnp.dot on the SMEM tiles (see `hopper.Ops`).
"""

import jax
import jax.experimental.pallas as pl
import jax.experimental.pallas.mosaic_gpu as plgpu
import jax.numpy as jnp
from jax import lax

from xlazoo.ops.pallas import on_hopper
from xlazoo.ops.pallas.hopper import (
  ROWS,
  Ops,
  interpret_params,
  produce,
  ring_slot,
  tile,
)

# Whether `xlazoo.ops.ssd.ssd` takes this kernel where `supported` says it can (the switch benchmarks/ssd.py
# and the tests use; benchmarks/RESULTS.md has its timings).
ENABLED = True
L = ROWS  # tokens per chunk
STAGES = 3  # chunks in SMEM at once: 3 x 41 KiB at Q = 128, beside 80 KiB of fixed buffers
HB = 2  # states in flight from the state warpgroup to the output one
STREAMS = ("x", "b", "c", "v")
f32 = jnp.float32


def supported(x_BTNP: jax.Array, B_BTGQ: jax.Array) -> bool:
  """Whether `ssd` handles these inputs on a Hopper GPU: 16-bit x, B and C, P = 64, Q of 64 or 128."""
  if x_BTNP.ndim != 4 or B_BTGQ.ndim != 4:
    return False
  N, P, G, Q = x_BTNP.shape[2], x_BTNP.shape[3], B_BTGQ.shape[2], B_BTGQ.shape[3]
  return (on_hopper() and x_BTNP.dtype in (jnp.bfloat16, jnp.float16) and B_BTGQ.dtype == x_BTNP.dtype
          and P == 64 and Q in (64, 128) and N % G == 0)


def ssd(x_BTNP, dt_BTN, A_N, B_BTGQ, C_BTGQ, state_BNPQ=None, D_N=None, *, interpret=False):
  """y [B, T, N, P] in x's dtype and the final state [B, N, P, Q] float32 (see the module docstring).

  interpret: False for the compiled kernel, or Mosaic GPU interpret params to run it on the CPU (where
  float32 x, B and C work too).
  """
  Bsz, T, N, P = x_BTNP.shape
  Q = B_BTGQ.shape[3]
  pad = -T % L
  if pad:
    widths = lambda x: [(0, 0), (0, pad)] + [(0, 0)] * (x.ndim - 2)  # noqa: E731
    x_BTNP, dt_BTN, B_BTGQ, C_BTGQ = (jnp.pad(x, widths(x)) for x in (x_BTNP, dt_BTN, B_BTGQ, C_BTGQ))
  dt_BNCL = dt_BTN.astype(f32).transpose(0, 2, 1).reshape(Bsz, N, (T + pad) // L, L)
  cs_BNCL = jnp.cumsum(dt_BNCL * A_N.astype(f32)[:, None, None], axis=-1)
  scale_BNCL = dt_BNCL * jnp.exp(cs_BNCL[..., -1:] - cs_BNCL)
  D_BNCL = jnp.broadcast_to((jnp.zeros((N,), f32) if D_N is None else D_N.astype(f32))[:, None, None], cs_BNCL.shape)
  v_BNCVL = jnp.stack([cs_BNCL, scale_BNCL, cs_BNCL, dt_BNCL, D_BNCL], axis=3)
  if state_BNPQ is None:
    state_BNPQ = jnp.zeros((Bsz, N, P, Q), f32)
  y_BTNP, h_BNPQ = _scan(x_BTNP, v_BNCVL, B_BTGQ.astype(x_BTNP.dtype), C_BTGQ.astype(x_BTNP.dtype),
                         state_BNPQ.astype(f32), interpret_params(interpret))
  return y_BTNP[:, :T], h_BNPQ


def _scan(x_BTNP, v_BNCVL, b_BTGQ, c_BTGQ, h_BNPQ, interpret):
  Bsz, T, N, P = x_BTNP.shape
  G, Q = b_BTGQ.shape[2:]
  R, nc, dtype = N // G, T // L, x_BTNP.dtype
  ops = Ops(interpret)
  bcast = lambda v, shape, dim: lax.broadcast_in_dim(v, shape, [dim])  # noqa: E731

  def kernel(x_ref, v_ref, b_ref, c_ref, h0_ref, y_ref, h_ref, *, xs, hb, y, hf, h_bar, hb_ready, hb_free, **ring):
    n, b, wg = lax.axis_index("n"), lax.axis_index("b"), lax.axis_index("wg")

    @pl.when(wg == 2)
    def _producer():
      plgpu.set_max_registers(40, action="decrease")
      plgpu.copy_gmem_to_smem(h0_ref.at[b, n], hf, h_bar.at[0])
      g = lax.div(n, jnp.int32(R))
      rows = lambda t: pl.ds(t * L, L)  # noqa: E731
      src = dict(x=lambda t: x_ref.at[b, rows(t), n], b=lambda t: b_ref.at[b, rows(t), g],
                 c=lambda t: c_ref.at[b, rows(t), g], v=lambda t: v_ref.at[b, n, t])
      produce([(src[k], ring[k], ring[k + "_ready"], ring[k + "_free"]) for k in STREAMS], nc, STAGES)

    @pl.when(wg == 0)
    def _state():  # the chain of states: h_c = exp(cs_L) h_{c-1} + x'^T B, each handed on in 16 bits (hb)
      plgpu.set_max_registers(232, action="increase")
      plgpu.barrier_wait(h_bar.at[0])
      h = ops.load(hf)
      hb.at[0][...] = h.astype(dtype)
      plgpu.commit_smem()
      plgpu.barrier_arrive(hb_ready.at[0])

      def body(c, h):
        s, nxt = ring_slot(c, STAGES), ring_slot(c + 1, HB)
        for k in ("x", "b", "v"):
          plgpu.barrier_wait(ring[k + "_ready"].at[s])
        v = ring["v"].at[s]
        xv = ops.load(ring["x"].at[s]).astype(f32)
        xs[...] = (xv * bcast(ops.vector(v.at[1], 0), xv.shape, 0)).astype(dtype)
        plgpu.commit_smem()
        h, = ops.mma(tn=[(h * jnp.exp(v[0, L - 1]), xs, ring["b"].at[s])])
        for k in ("x", "b", "v"):
          plgpu.barrier_arrive(ring[k + "_free"].at[s])
        @pl.when(c + 1 < nc)
        def _():  # chunk c + 1's state, once chunk c + 1 - HB has read the slot
          pl.when(c + 1 >= HB)(lambda: plgpu.barrier_wait(hb_free.at[nxt]))
          hb.at[nxt][...] = h.astype(dtype)
          plgpu.commit_smem()
          plgpu.barrier_arrive(hb_ready.at[nxt])

        return h

      h = lax.fori_loop(0, nc, body, h)
      for c in range(max(nc - HB, 0), nc):  # the last frees: every phase waited for
        plgpu.barrier_wait(hb_free.at[ring_slot(jnp.int32(c), HB)])
      hf[...] = h
      plgpu.commit_smem()
      plgpu.copy_smem_to_gmem(hf, h_ref.at[b, n])
      plgpu.wait_smem_to_gmem(0)

    @pl.when(wg == 1)
    def _output():  # y = (C h_{c-1}^T) exp(cs_t) + (C B^T * exp(cs_t - cs_s) dt_s [s <= t]) x + D x
      plgpu.set_max_registers(232, action="increase")

      def body(c, carry):
        s, hs = ring_slot(c, STAGES), ring_slot(c, HB)
        for k in STREAMS:
          plgpu.barrier_wait(ring[k + "_ready"].at[s])
        x, v = ring["x"].at[s], ring["v"].at[s]
        cs_t, cs_s, dt_s = ops.vector(v.at[0], 0), ops.vector(v.at[2], 1), ops.vector(v.at[3], 1)
        d = v[4, 0]
        S, = ops.mma(nt=[(ring["c"].at[s], ring["b"].at[s])])
        t_i, s_i = ops.iota(S.shape, 0), ops.iota(S.shape, 1)
        diff = bcast(cs_t, S.shape, 0) - bcast(cs_s, S.shape, 1)
        m = S * jnp.exp(jnp.where(t_i >= s_i, diff, -jnp.inf)) * bcast(dt_s, S.shape, 1)
        plgpu.barrier_wait(hb_ready.at[hs])
        Y, = ops.mma(nt=[(ring["c"].at[s], hb.at[hs])])
        plgpu.barrier_arrive(hb_free.at[hs])
        yv, = ops.mma(acc=[(Y * bcast(jnp.exp(cs_t), Y.shape, 0), m.astype(dtype), x)])
        xv = ops.load(x).astype(f32)
        for k in STREAMS:
          plgpu.barrier_arrive(ring[k + "_free"].at[s])
        plgpu.wait_smem_to_gmem(0, wait_read_only=True)  # the previous chunk's y has left SMEM
        y[...] = (yv + d * xv).astype(dtype)
        plgpu.commit_smem()
        plgpu.copy_smem_to_gmem(y, y_ref.at[b, pl.ds(c * L, L), n])
        return carry

      lax.fori_loop(0, nc, body, 0)
      plgpu.wait_smem_to_gmem(0)

  ring = dict(x=tile((STAGES, L, P), dtype), b=tile((STAGES, L, Q), dtype), c=tile((STAGES, L, Q), dtype),
              v=plgpu.SMEM((STAGES, 5, L), f32))
  for k in STREAMS:  # the state and the output warpgroups both free x, B and the vectors; C is the output's alone
    ring[k + "_ready"] = plgpu.Barrier(num_barriers=STAGES)
    ring[k + "_free"] = plgpu.Barrier(num_barriers=STAGES, num_arrivals=1 if k == "c" else 2)
  scratch = dict(xs=tile((L, P), dtype), hb=tile((HB, P, Q), dtype), y=tile((L, P), dtype), hf=tile((P, Q), f32),
                 h_bar=plgpu.Barrier(num_barriers=1), hb_ready=plgpu.Barrier(num_barriers=HB),
                 hb_free=plgpu.Barrier(num_barriers=HB), **ring)
  out_type = (jax.ShapeDtypeStruct((Bsz, T, N, P), dtype), jax.ShapeDtypeStruct(h_BNPQ.shape, f32))
  return plgpu.kernel(
      kernel, out_type=out_type, scratch_types=scratch, grid=(N, Bsz), grid_names=("n", "b"), num_threads=3,
      thread_name="wg", kernel_name="ssd_scan", compiler_params=plgpu.CompilerParams(approx_math=True),
      interpret=interpret,
  )(x_BTNP, v_BNCVL, b_BTGQ, c_BTGQ, h_BNPQ)
