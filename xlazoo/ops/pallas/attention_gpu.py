"""Causal flash attention for Hopper GPUs (forward and backward), in Pallas with the Mosaic GPU lowering.

Dimensions: B batch, T tokens (queries and keys are the same tokens, at positions 0..T-1), N query heads,
K kv heads, G = N / K query heads per kv head, H head dim.

Computes `xlazoo.ops.attention.causal_attention`: query t sees key s when s <= t and (window <= 0 or
t - s < window), with an optional soft-cap tanh(x / softcap) * softcap on the scaled scores.

Design (FlashAttention-3 on Mosaic GPU): every kernel runs three warpgroups per CTA. Warpgroup 2 is a
producer that only issues TMA copies into swizzled SMEM, through a ring of `stages` slots guarded by
mbarriers ("ready": the copy landed; "free": both consumers are done with the slot). Warpgroups 0 and 1
are consumers, each owning 64 rows of a 128-row tile, computing with wgmma (float32 accumulators in
registers) and an online softmax in float32 in base 2 (exp2 of scores pre-multiplied by log2(e)).
In the forward pass the two consumers ping-pong (FA3): a consumer issues its two GEMMs (P_{j-1} V_{j-1}
and Q K_j^T) only while holding a "turn" token, which it hands over as soon as they finish, so one
warpgroup's softmax overlaps the other's GEMMs. KV blocks above the diagonal and below the window are
never loaded; only the blocks that cross the diagonal or the window edge compute a mask.

The backward pass saves the float32 log-sum-exp per query row (base 2) and uses two kernels: dK/dV
(a CTA per 128 keys of a kv head, streaming the query blocks of all G heads of its group, so the GQA sum
happens in registers) and dQ (a CTA per 128 queries of a head, streaming key blocks). Neither writes
with atomics, so gradients are deterministic.

Ragged T is padded to a multiple of 128 with zeros: a padded key is only visible to padded queries, and
a padded query has dO = 0, so neither changes any real output or gradient.

Interpret mode (`interpret=` Mosaic GPU interpret params, e.g. InterpretGPUParams()) runs the same
kernels on the CPU: the same warpgroups, barriers, TMA copies, loop bounds and masks (the matrix products
there are jnp.dot on the SMEM tiles: see `hopper.Ops`).
"""

import functools
import math
from typing import Any, NamedTuple

import jax
import jax.experimental.pallas as pl
import jax.experimental.pallas.mosaic_gpu as plgpu
import jax.numpy as jnp
import numpy as np
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

BLOCK = 128  # tile of a CTA: 2 consumers x ROWS; also the forward's KV block
STEP = 64  # backward: the query block streamed by dK/dV, the key block streamed by dQ
LOG2E = math.log2(math.e)
NO_WINDOW = 1 << 30  # a traced window <= 0 becomes this: every causal key is inside it
M_INIT = -1e30  # running max before any key: finite, so a fully masked row gives p = 0, never NaN
SMEM_BYTES = 200 * 1024  # what the SMEM rings may use (H100: 227 KiB per CTA)


def supported(q_BTNH, k_BTKH, *, window, softcap) -> bool:
  """Whether `flash_attention` handles these inputs on a Hopper GPU."""
  if q_BTNH.ndim != 4 or k_BTKH.ndim != 4:
    return False
  (B, T, N, H), (B2, T2, K, H2) = q_BTNH.shape, k_BTKH.shape
  return (
      on_hopper() and q_BTNH.dtype in (jnp.bfloat16, jnp.float16) and k_BTKH.dtype == q_BTNH.dtype
      and (B, T, H) == (B2, T2, H2)
      and H in (64, 128) and N % K == 0
      and (softcap is None or (isinstance(softcap, (int, float)) and softcap > 0))
      and (isinstance(window, (int, np.integer)) or jnp.issubdtype(jnp.asarray(window).dtype, jnp.integer))
  )


class _Cfg(NamedTuple):
  scale: float
  window: int | None  # static window (<= 0: none); None: traced, read from an int32[1] operand
  softcap: float | None
  interpret: Any  # None, or Mosaic GPU interpret params


def flash_attention(q_BTNH, k_BTKH, v_BTKH, *, scale: float, window=0, softcap: float | None = None, interpret=False):
  """Causal attention among the tokens at positions 0..T-1 (see the module docstring); differentiable.

  window: a Python int (the KV loop bounds are specialised to it) or a traced int32 scalar (read by the
  kernels at run time); <= 0 means no window. softcap: a static float or None. interpret: False for the
  compiled kernels, or Mosaic GPU interpret params (JAX 0.10: jax._src.pallas.mosaic_gpu.interpret.params
  .InterpretGPUParams()) to run them on the CPU. float32 inputs work only when interpreting.
  """
  if isinstance(window, (int, np.integer)):
    w_1, static = None, int(window)
  else:
    w_1, static = jnp.asarray(window, jnp.int32).reshape(1), None
  cfg = _Cfg(float(scale), static, None if softcap is None else float(softcap), interpret_params(interpret))
  return _flash(q_BTNH, k_BTKH, v_BTKH, w_1, cfg)


@functools.partial(jax.custom_vjp, nondiff_argnums=(4,))
def _flash(q_BTNH, k_BTKH, v_BTKH, w_1, cfg):
  return _flash_fwd(q_BTNH, k_BTKH, v_BTKH, w_1, cfg)[0]


def _flash_fwd(q_BTNH, k_BTKH, v_BTKH, w_1, cfg):
  T = q_BTNH.shape[1]
  q_BTNH, k_BTKH, v_BTKH = (_pad(x, BLOCK) for x in (q_BTNH, k_BTKH, v_BTKH))
  o_BTNH, lse_BNT = _forward(q_BTNH, k_BTKH, v_BTKH, w_1, cfg)
  return o_BTNH[:, :T], (q_BTNH, k_BTKH, v_BTKH, w_1, o_BTNH, lse_BNT)


def _flash_bwd(cfg, res, do_BTNH):
  q_BTNH, k_BTKH, v_BTKH, w_1, o_BTNH, lse_BNT = res
  T = do_BTNH.shape[1]
  do_BTNH = _pad(do_BTNH, BLOCK)
  # delta = rowsum(dO * O) = rowsum(dP * P): the softmax backward's per-row term (padded rows: 0).
  delta_BNT = jnp.einsum("BTNH,BTNH->BNT", o_BTNH.astype(jnp.float32), do_BTNH.astype(jnp.float32))
  args = (q_BTNH, k_BTKH, v_BTKH, do_BTNH, lse_BNT, delta_BNT)
  dq_BTNH = _backward_dq(*args, w_1, cfg)
  dk_BTKH, dv_BTKH = _backward_dkv(*args, w_1, cfg)
  return dq_BTNH[:, :T], dk_BTKH[:, :T], dv_BTKH[:, :T], None


_flash.defvjp(_flash_fwd, _flash_bwd)


def _pad(x, multiple):
  T = x.shape[1]
  return jnp.pad(x, ((0, 0), (0, -T % multiple), (0, 0), (0, 0))) if T % multiple else x


# ------------------------------------------------------------------------------------------------
# Pieces shared by the kernels.


def _window(w_ref, cfg):
  """The window as the kernels use it: None (no window), a Python int, or a traced int32 scalar."""
  if cfg.window is None:
    w = w_ref[0]
    return jnp.where(w > 0, w, NO_WINDOW)
  return cfg.window if cfg.window > 0 else None


def _mask(x, t, s, w):
  """x where query position t sees key position s, else -inf (two selects: no boolean and)."""
  x = jnp.where(t >= s, x, -jnp.inf)
  return x if w is None else jnp.where(t - s < w, x, -jnp.inf)


def _logits(s, cfg):
  """Raw q.k -> (x, c) with c > 0 such that x * c is the scaled, soft-capped score in log2 units; with a
  soft-cap x is the tanh. Maxima are taken on x and scaled after, so exp2(x * c - m) is one FMA each."""
  if cfg.softcap is None:
    return s, cfg.scale * LOG2E
  return jnp.tanh(s * (cfg.scale / cfg.softcap)), cfg.softcap * LOG2E


def _div(x, d):
  return lax.div(x, jnp.int32(d))  # x >= 0 here, so truncation is floor


def _clamp_bounds(lo, a, b, hi):
  a = jnp.minimum(jnp.maximum(a, lo), hi)
  return lo, a, jnp.minimum(jnp.maximum(b, a), hi), hi


def _key_blocks(q_lo, q_hi, bk, w):
  """Key blocks (size bk) seen by queries [q_lo, q_hi): (lo, a, b, hi); those in [a, b) need no mask."""
  hi = _div(q_hi + bk - 1, bk)  # keys < q_hi
  b = _div(q_lo + 1, bk)  # blocks whose last key <= q_lo
  if w is None:
    return _clamp_bounds(jnp.int32(0), jnp.int32(0), b, hi)
  lo = _div(jnp.maximum(q_lo - w + 1, 0), bk)  # keys > q_lo - w
  a = _div(jnp.maximum(q_hi - w, 0) + bk - 1, bk)  # blocks whose first key >= q_hi - w
  return _clamp_bounds(lo, a, b, hi)


def _query_blocks(k_lo, k_hi, bq, nq, w):
  """Query blocks (size bq, nq of them) that see keys [k_lo, k_hi): (lo, a, b, hi), [a, b) unmasked."""
  lo = _div(k_lo, bq)  # queries >= k_lo
  a = _div(k_hi - 1 + bq - 1, bq)  # blocks whose first query >= k_hi - 1
  if w is None:
    return _clamp_bounds(lo, a, jnp.int32(nq), jnp.int32(nq))
  hi = jnp.minimum(_div(k_hi + w - 2 + bq, bq), nq)  # queries <= k_hi + w - 2
  b = _div(k_lo + w, bq)  # blocks whose last query < k_lo + w
  return _clamp_bounds(lo, a, b, hi)


def _split_loop(lo, a, b, hi, body, carry):
  """body(j, carry, masked) for j in [lo, hi), with masked=False on [a, b) (lo <= a <= b <= hi)."""
  carry = lax.fori_loop(lo, a, functools.partial(body, masked=True), carry)
  carry = lax.fori_loop(a, b, functools.partial(body, masked=False), carry)
  return lax.fori_loop(b, hi, functools.partial(body, masked=True), carry)


def _stages(fixed_bytes, per_stage_bytes):
  return int(max(2, min(3, (SMEM_BYTES - fixed_bytes) // per_stage_bytes)))


def _call(body, name, operands, out_type, grid, grid_names, scratch, cfg):
  return plgpu.kernel(
      body, out_type=out_type, scratch_types=scratch, grid=grid, grid_names=grid_names, num_threads=3,
      thread_name="wg", kernel_name=name, compiler_params=plgpu.CompilerParams(approx_math=True),
      interpret=cfg.interpret,
  )(*operands)


def _operands(w_1, *arrays):
  return arrays if w_1 is None else (w_1, *arrays)


def _unpack(refs, cfg):
  return (None, refs) if cfg.window is not None else (refs[0], refs[1:])


# ------------------------------------------------------------------------------------------------
# Forward.


def _forward(q_BTNH, k_BTKH, v_BTKH, w_1, cfg):
  B, T, N, H = q_BTNH.shape
  K, dtype, nq = k_BTKH.shape[2], q_BTNH.dtype, T // BLOCK
  size = jnp.dtype(dtype).itemsize
  stages = _stages(BLOCK * H * size, 2 * BLOCK * H * size)
  ops = Ops(cfg.interpret)

  def kernel(*refs, qo, k, v, lse, q_bar, k_bar, v_bar, k_free, v_free, turn):
    w_ref, (q_ref, k_ref, v_ref, o_ref, lse_ref) = _unpack(refs, cfg)
    b, n, wg = lax.axis_index("b"), lax.axis_index("n"), lax.axis_index("wg")
    q_lo = (nq - 1 - lax.axis_index("q")) * BLOCK  # the longest rows of keys first: less tail at the end
    w = _window(w_ref, cfg)
    lo, a, c, hi = _key_blocks(q_lo, q_lo + BLOCK, BLOCK, w)

    @pl.when(wg == 2)
    def _producer():
      plgpu.set_max_registers(40, action="decrease")
      for i in range(2):
        plgpu.copy_gmem_to_smem(q_ref.at[b, pl.ds(q_lo + i * ROWS, ROWS), n], qo.at[i], q_bar.at[i])
      kh = _div(n, N // K)
      blocks = lambda ref: lambda t: ref.at[b, pl.ds((lo + t) * BLOCK, BLOCK), kh]
      produce([(blocks(k_ref), k, k_bar, k_free), (blocks(v_ref), v, v_bar, v_free)], hi - lo, stages)

    @pl.when(wg < 2)
    def _consumer():
      plgpu.set_max_registers(232, action="increase")
      row0 = q_lo + wg * ROWS
      q_smem = qo.at[wg]
      slot = lambda j: ring_slot(j - lo, stages)

      def gemms(nt=(), acc=()):
        # Ping-pong: issue the GEMMs only while holding the turn, hand it over once they are done.
        plgpu.barrier_wait(turn.at[wg])
        out = ops.mma(nt, acc)
        plgpu.barrier_arrive(turn.at[1 - wg])
        return out

      def softmax(s, j, m, l, acc, masked):
        x, c = _logits(s, cfg)
        if masked:
          x = _mask(x, row0 + ops.iota(x.shape, 0), j * BLOCK + ops.iota(x.shape, 1), w)
        m_new = jnp.maximum(m, x.max(axis=1) * c)
        alpha = jnp.exp2(m - m_new)
        p = jnp.exp2(x * c - lax.broadcast_in_dim(m_new, x.shape, [0]))
        l = l * alpha + p.sum(axis=1)
        acc = acc * lax.broadcast_in_dim(alpha, acc.shape, [0])
        return p.astype(dtype), m_new, l, acc

      @pl.when(wg == 1)
      def _():
        plgpu.barrier_arrive(turn.at[0])  # warpgroup 0 takes the first turn

      plgpu.barrier_wait(q_bar.at[wg])
      # Prologue: S_lo = Q K_lo^T.
      # Block lo sits in slot(lo) = 0, a traced index: JAX 0.11 cannot lower a constant one inside ops.mma.
      plgpu.barrier_wait(k_bar.at[slot(lo)])
      s, = gemms(nt=[(q_smem, k.at[slot(lo)])])
      plgpu.barrier_arrive(k_free.at[slot(lo)])
      state = softmax(s, lo, ops.full_rows(M_INIT), ops.full_rows(0.0), ops.zeros((ROWS, H)), masked=True)

      def body(j, state, masked):
        # Block j: P_{j-1} V_{j-1} and S_j = Q K_j^T in one go, then the softmax of S_j.
        p, m, l, acc = state
        cur, prev = slot(j), slot(j - 1)
        plgpu.barrier_wait(k_bar.at[cur])
        plgpu.barrier_wait(v_bar.at[prev])
        s, acc = gemms(nt=[(q_smem, k.at[cur])], acc=[(acc, p, v.at[prev])])
        plgpu.barrier_arrive(k_free.at[cur])
        plgpu.barrier_arrive(v_free.at[prev])
        return softmax(s, j, m, l, acc, masked)

      p, m, l, acc = _split_loop(lo + 1, jnp.maximum(a, lo + 1), jnp.maximum(c, lo + 1), hi, body, state)
      # Epilogue: the last block's P V.
      last = slot(hi - 1)
      plgpu.barrier_wait(v_bar.at[last])
      acc, = gemms(acc=[(acc, p, v.at[last])])
      plgpu.barrier_arrive(v_free.at[last])

      @pl.when(wg == 0)
      def _():
        plgpu.barrier_wait(turn.at[0])  # warpgroup 1's last hand-over

      qo.at[wg][...] = (acc / lax.broadcast_in_dim(l, acc.shape, [0])).astype(dtype)
      lse.at[wg][...] = m + jnp.log(l) * (1 / math.log(2))  # log2 units, as the backward's scores
      plgpu.commit_smem()
      plgpu.copy_smem_to_gmem(q_smem, o_ref.at[b, pl.ds(row0, ROWS), n], commit_group=False)
      plgpu.copy_smem_to_gmem(lse.at[wg], lse_ref.at[b, n, pl.ds(row0, ROWS)], commit_group=False)
      plgpu.commit_smem_to_gmem_group()
      plgpu.wait_smem_to_gmem(0)

  ring = lambda: tile((stages, BLOCK, H), dtype)
  scratch = dict(
      qo=tile((2, ROWS, H), dtype), k=ring(), v=ring(), lse=plgpu.SMEM((2, ROWS), jnp.float32),
      q_bar=plgpu.Barrier(num_barriers=2), k_bar=plgpu.Barrier(num_barriers=stages),
      v_bar=plgpu.Barrier(num_barriers=stages), k_free=plgpu.Barrier(num_arrivals=2, num_barriers=stages),
      v_free=plgpu.Barrier(num_arrivals=2, num_barriers=stages), turn=plgpu.Barrier(num_barriers=2),
  )
  out_type = (jax.ShapeDtypeStruct(q_BTNH.shape, dtype), jax.ShapeDtypeStruct((B, N, T), jnp.float32))
  return _call(kernel, "flash_attention_fwd", _operands(w_1, q_BTNH, k_BTKH, v_BTKH), out_type,
               (N, nq, B), ("n", "q", "b"), scratch, cfg)


# ------------------------------------------------------------------------------------------------
# Backward. With s = q.k * scale (soft-capped: c * tanh(q.k * scale / c)), P = softmax(s) and
# dP = dO V^T: dS = P * (dP - delta), d(q.k) = dS * scale (* (1 - tanh^2) with the soft-cap),
# dQ = d(q.k) K, dK = d(q.k)^T Q, dV = P^T dO. The scale is applied once, to the final dQ and dK.


def _ds(p, dp, delta, th):
  ds = p * (dp - delta)
  return ds if th is None else ds * (1.0 - th * th)


def _backward_dq(q_BTNH, k_BTKH, v_BTKH, do_BTNH, lse_BNT, delta_BNT, w_1, cfg):
  B, T, N, H = q_BTNH.shape
  K, dtype, nq = k_BTKH.shape[2], q_BTNH.dtype, T // BLOCK
  size = jnp.dtype(dtype).itemsize
  stages = _stages(2 * BLOCK * H * size, 2 * STEP * H * size)
  ops = Ops(cfg.interpret)

  def kernel(*refs, q, do, lse, delta, k, v, q_bar, do_bar, lse_bar, delta_bar, k_bar, v_bar, k_free, v_free):
    w_ref, (q_ref, k_ref, v_ref, do_ref, lse_ref, delta_ref, dq_ref) = _unpack(refs, cfg)
    b, n, wg = lax.axis_index("b"), lax.axis_index("n"), lax.axis_index("wg")
    q_lo = (nq - 1 - lax.axis_index("q")) * BLOCK
    w = _window(w_ref, cfg)
    lo, a, c, hi = _key_blocks(q_lo, q_lo + BLOCK, STEP, w)

    @pl.when(wg == 2)
    def _producer():
      plgpu.set_max_registers(40, action="decrease")
      for i in range(2):
        rows = pl.ds(q_lo + i * ROWS, ROWS)
        plgpu.copy_gmem_to_smem(q_ref.at[b, rows, n], q.at[i], q_bar.at[i])
        plgpu.copy_gmem_to_smem(do_ref.at[b, rows, n], do.at[i], do_bar.at[i])
        plgpu.copy_gmem_to_smem(lse_ref.at[b, n, rows], lse.at[i], lse_bar.at[i])
        plgpu.copy_gmem_to_smem(delta_ref.at[b, n, rows], delta.at[i], delta_bar.at[i])
      kh = _div(n, N // K)
      blocks = lambda ref: lambda t: ref.at[b, pl.ds((lo + t) * STEP, STEP), kh]
      produce([(blocks(k_ref), k, k_bar, k_free), (blocks(v_ref), v, v_bar, v_free)], hi - lo, stages)

    @pl.when(wg < 2)
    def _consumer():
      plgpu.set_max_registers(232, action="increase")
      row0 = q_lo + wg * ROWS
      for bar in (q_bar, do_bar, lse_bar, delta_bar):
        plgpu.barrier_wait(bar.at[wg])
      lse_r, delta_r = ops.vector(lse.at[wg], 0), ops.vector(delta.at[wg], 0)

      def body(j, dq, masked):
        slot = ring_slot(j - lo, stages)
        plgpu.barrier_wait(k_bar.at[slot])
        plgpu.barrier_wait(v_bar.at[slot])
        s, dp = ops.mma(nt=[(q.at[wg], k.at[slot]), (do.at[wg], v.at[slot])])
        plgpu.barrier_arrive(v_free.at[slot])
        x, c = _logits(s, cfg)
        th = None if cfg.softcap is None else x
        if masked:
          x = _mask(x, row0 + ops.iota(x.shape, 0), j * STEP + ops.iota(x.shape, 1), w)
        p = jnp.exp2(x * c - lax.broadcast_in_dim(lse_r, x.shape, [0]))
        ds = _ds(p, dp, lax.broadcast_in_dim(delta_r, x.shape, [0]), th)
        dq, = ops.mma(acc=[(dq, ds.astype(dtype), k.at[slot])])
        plgpu.barrier_arrive(k_free.at[slot])
        return dq

      dq = _split_loop(lo, a, c, hi, body, ops.zeros((ROWS, H)))
      q.at[wg][...] = (dq * cfg.scale).astype(dtype)
      plgpu.commit_smem()
      plgpu.copy_smem_to_gmem(q.at[wg], dq_ref.at[b, pl.ds(row0, ROWS), n])
      plgpu.wait_smem_to_gmem(0)

  ring = lambda: tile((stages, STEP, H), dtype)
  pair = lambda: plgpu.Barrier(num_barriers=2)
  scratch = dict(
      q=tile((2, ROWS, H), dtype), do=tile((2, ROWS, H), dtype), lse=plgpu.SMEM((2, ROWS), jnp.float32),
      delta=plgpu.SMEM((2, ROWS), jnp.float32), k=ring(), v=ring(), q_bar=pair(), do_bar=pair(),
      lse_bar=pair(), delta_bar=pair(), k_bar=plgpu.Barrier(num_barriers=stages),
      v_bar=plgpu.Barrier(num_barriers=stages), k_free=plgpu.Barrier(num_arrivals=2, num_barriers=stages),
      v_free=plgpu.Barrier(num_arrivals=2, num_barriers=stages),
  )
  operands = _operands(w_1, q_BTNH, k_BTKH, v_BTKH, do_BTNH, lse_BNT, delta_BNT)
  return _call(kernel, "flash_attention_dq", operands, jax.ShapeDtypeStruct(q_BTNH.shape, dtype),
               (N, nq, B), ("n", "q", "b"), scratch, cfg)


def _backward_dkv(q_BTNH, k_BTKH, v_BTKH, do_BTNH, lse_BNT, delta_BNT, w_1, cfg):
  B, T, N, H = q_BTNH.shape
  K, dtype = k_BTKH.shape[2], q_BTNH.dtype
  G, nk, nq = N // K, T // BLOCK, T // STEP
  size = jnp.dtype(dtype).itemsize
  stages = _stages(2 * BLOCK * H * size, 2 * STEP * (H * size + 4))
  ops = Ops(cfg.interpret)
  streams = ("q", "do", "lse", "delta")

  def kernel(*refs, k, v, k_bar, v_bar, **ring):
    w_ref, (q_ref, k_ref, v_ref, do_ref, lse_ref, delta_ref, dk_ref, dv_ref) = _unpack(refs, cfg)
    b, kh, wg = lax.axis_index("b"), lax.axis_index("k"), lax.axis_index("wg")
    k_lo = (nk - 1 - lax.axis_index("kv")) * BLOCK
    w = _window(w_ref, cfg)
    lo, a, c, hi = _query_blocks(k_lo, k_lo + BLOCK, STEP, nq, w)
    nb = hi - lo  # query blocks per head; the stream is head-major: step t = g * nb + (i - lo)

    @pl.when(wg == 2)
    def _producer():
      plgpu.set_max_registers(40, action="decrease")
      for i in range(2):
        rows = pl.ds(k_lo + i * ROWS, ROWS)
        plgpu.copy_gmem_to_smem(k_ref.at[b, rows, kh], k.at[i], k_bar.at[i])
        plgpu.copy_gmem_to_smem(v_ref.at[b, rows, kh], v.at[i], v_bar.at[i])

      def src(ref, per_token, t):
        n, i = kh * G + lax.div(t, nb), lo + lax.rem(t, nb)
        rows = pl.ds(i * STEP, STEP)
        return ref.at[b, rows, n] if per_token else ref.at[b, n, rows]

      gmem = dict(q=(q_ref, True), do=(do_ref, True), lse=(lse_ref, False), delta=(delta_ref, False))
      produce([(functools.partial(src, *gmem[x]), ring[x], ring[x + "_bar"], ring[x + "_free"]) for x in streams],
               G * nb, stages)

    @pl.when(wg < 2)
    def _consumer():
      plgpu.set_max_registers(232, action="increase")
      row0 = k_lo + wg * ROWS
      plgpu.barrier_wait(k_bar.at[wg])
      plgpu.barrier_wait(v_bar.at[wg])

      def body(i, carry, masked, g):
        # Rows of these tiles are keys, columns are queries: S^T, P^T, dP^T, dS^T.
        dk, dv = carry
        slot = ring_slot(g * nb + i - lo, stages)
        for x in streams:
          plgpu.barrier_wait(ring[x + "_bar"].at[slot])
        s, dp = ops.mma(nt=[(k.at[wg], ring["q"].at[slot]), (v.at[wg], ring["do"].at[slot])])
        lse_r, delta_r = ops.vector(ring["lse"].at[slot], 1), ops.vector(ring["delta"].at[slot], 1)
        plgpu.barrier_arrive(ring["lse_free"].at[slot])
        plgpu.barrier_arrive(ring["delta_free"].at[slot])
        x, c = _logits(s, cfg)
        th = None if cfg.softcap is None else x
        if masked:
          x = _mask(x, i * STEP + ops.iota(x.shape, 1), row0 + ops.iota(x.shape, 0), w)
        p = jnp.exp2(x * c - lax.broadcast_in_dim(lse_r, x.shape, [1]))
        ds = _ds(p, dp, lax.broadcast_in_dim(delta_r, x.shape, [1]), th)
        dv, dk = ops.mma(
            acc=[(dv, p.astype(dtype), ring["do"].at[slot]), (dk, ds.astype(dtype), ring["q"].at[slot])])
        plgpu.barrier_arrive(ring["q_free"].at[slot])
        plgpu.barrier_arrive(ring["do_free"].at[slot])
        return dk, dv

      def head(g, carry):
        return _split_loop(lo, a, c, hi, functools.partial(body, g=g), carry)

      dk, dv = lax.fori_loop(0, G, head, (ops.zeros((ROWS, H)), ops.zeros((ROWS, H))))
      k.at[wg][...] = (dk * cfg.scale).astype(dtype)
      v.at[wg][...] = dv.astype(dtype)
      plgpu.commit_smem()
      plgpu.copy_smem_to_gmem(k.at[wg], dk_ref.at[b, pl.ds(row0, ROWS), kh], commit_group=False)
      plgpu.copy_smem_to_gmem(v.at[wg], dv_ref.at[b, pl.ds(row0, ROWS), kh], commit_group=False)
      plgpu.commit_smem_to_gmem_group()
      plgpu.wait_smem_to_gmem(0)

  ring = dict(q=tile((stages, STEP, H), dtype), do=tile((stages, STEP, H), dtype),
              lse=plgpu.SMEM((stages, STEP), jnp.float32), delta=plgpu.SMEM((stages, STEP), jnp.float32))
  for x in streams:
    ring[x + "_bar"] = plgpu.Barrier(num_barriers=stages)
    ring[x + "_free"] = plgpu.Barrier(num_arrivals=2, num_barriers=stages)
  scratch = dict(k=tile((2, ROWS, H), dtype), v=tile((2, ROWS, H), dtype), k_bar=plgpu.Barrier(num_barriers=2),
                 v_bar=plgpu.Barrier(num_barriers=2), **ring)
  operands = _operands(w_1, q_BTNH, k_BTKH, v_BTKH, do_BTNH, lse_BNT, delta_BNT)
  out_type = (jax.ShapeDtypeStruct(k_BTKH.shape, dtype),) * 2
  return _call(kernel, "flash_attention_dkv", operands, out_type, (K, nk, B), ("k", "kv", "b"), scratch, cfg)
