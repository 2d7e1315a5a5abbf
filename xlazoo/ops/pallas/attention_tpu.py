"""Causal flash attention (forward and backward) and decode attention for TPU: Pallas, Mosaic TPU lowering.

Dimensions: B batch, T query length, S key length, N query heads, K kv heads, G = N / K query heads
per kv head, H head dim. Inside a kernel T and S are one query block and one key block.

The functions are those of `xlazoo.ops.attention.causal_attention` and `decode_attention` (the
pure-jnp reference is `xlazoo.ops.attention.attention`): causal, an optional sliding window
(t - s < window when window > 0), an optional soft-cap tanh(s * scale / c) * c applied before the
mask, query head n reading kv head n // G. Softmax statistics and accumulators are float32.

Layout. The flash kernels work on [B, N, T, H] (queries) and [B, K, T, H] (keys, values), padded
to whole blocks: one grid step takes the G query heads of a kv group together, so a K/V block is
read once per group. The log-sum-exp is saved as [B, N, 1, T] (lanes along T). The grid runs over
key blocks last ("arbitrary"); blocks wholly above the diagonal or wholly outside the window are
skipped (pl.when) and their index_map is clamped to the nearest visible block, so the pipeline
issues no DMA for them. Decode reads the cache as [B, S, K * H] (a free reshape, no copy) with one
kv head's lanes per block, and key blocks past a row's length are neither fetched nor computed.
`window` travels by scalar prefetch, so it may be traced (a per-layer window under lax.scan).
"""

import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import tpu as pltpu

from xlazoo.ops.pallas import partitioned

NEG = -1e30  # masked score: finite, so exp(NEG - NEG) is 1, never NaN
BIG = 1 << 30  # "no window"
LANES = 128  # per-row statistics are kept broadcast over one vreg's lanes
_NT = (((1,), (1,)), ((), ()))  # a @ b.T


def _dot_nt(a, b):
  return lax.dot_general(a, b, _NT, preferred_element_type=jnp.float32)


def _dot(a, b):
  return lax.dot_general(a, b, (((1,), (0,)), ((), ())), preferred_element_type=jnp.float32)


def _scores(q, k, scale, softcap):
  """Capped scores, float32: q [R, H] x k [S, H] -> [R, S] (or k x q for the transposed form)."""
  s = _dot_nt(q, k) * scale
  return s if softcap is None else jnp.tanh(s / softcap) * softcap


def _bias(t_pos, s_pos, w):
  """0 where query position t sees key position s, NEG elsewhere (float32, shape of the positions)."""
  d = t_pos - s_pos
  return jnp.where((d >= 0) & (d < jnp.where(w > 0, w, BIG)), 0.0, NEG).astype(jnp.float32)


def _iota(shape, dim):
  return lax.broadcasted_iota(jnp.int32, shape, dim)


def _kv_blocks(i, w, bq, bk):
  """The key blocks [lo, hi] that query block i sees (ints >= 0; scalar arithmetic, no floor of negatives)."""
  hi = lax.div((i + 1) * bq - 1, bk)
  lo = jnp.where(w > 0, lax.div(jnp.maximum(i * bq - w + 1, 0), bk), 0)
  return lo, hi


def _q_blocks(j, w, bq, bk, nq):
  """The query blocks [lo, hi] that see key block j."""
  lo = lax.div(j * bk, bq)
  hi = jnp.where(w > 0, jnp.minimum(lax.div(j * bk + bk - 2 + jnp.maximum(w, 1), bq), nq - 1), nq - 1)
  return lo, hi


def _unmasked(i, j, w, bq, bk):
  """Block (i, j) is wholly visible: below the diagonal and inside the window."""
  return (j * bk + bk - 1 <= i * bq) & ((w <= 0) | (i * bq + bq - 1 - j * bk < w))


def _column(row_ref, g, T):
  """Row g of a [G, 1, T] block as a column [T, LANES] (a lane-to-sublane transpose)."""
  return jnp.broadcast_to(row_ref[g], (LANES, T)).T


# ------------------------------------------------------------------------------------------ forward


def _fwd_kernel(w_ref, q_ref, k_ref, v_ref, o_ref, lse_ref, m_scr, l_scr, acc_scr, *, scale, softcap):
  i, j, w = pl.program_id(2), pl.program_id(3), w_ref[0]
  G, T, H = q_ref.shape
  S = k_ref.shape[0]
  lo, hi = _kv_blocks(i, w, T, S)

  @pl.when(j == 0)
  def _init():
    m_scr[...] = jnp.full(m_scr.shape, NEG, jnp.float32)
    l_scr[...] = jnp.zeros(l_scr.shape, jnp.float32)
    acc_scr[...] = jnp.zeros(acc_scr.shape, jnp.float32)

  def step(masked):
    s_GTS = _scores(q_ref[...].reshape(G * T, H), k_ref[...], scale, softcap).reshape(G, T, S)
    if masked:
      s_GTS = s_GTS + _bias(i * T + _iota((T, S), 0), j * S + _iota((T, S), 1), w)
    m_prev = m_scr[...]
    m_new = jnp.maximum(m_prev, s_GTS.max(axis=-1, keepdims=True))
    alpha = jnp.exp(m_prev - m_new)
    p_GTS = jnp.exp(s_GTS - m_new[..., :1])
    l_scr[...] = alpha * l_scr[...] + p_GTS.sum(axis=-1, keepdims=True)
    pv = _dot(p_GTS.reshape(G * T, S).astype(v_ref.dtype), v_ref[...]).reshape(G, T, H)
    acc_scr[...] = acc_scr[...] * alpha[..., :1] + pv
    m_scr[...] = m_new

  visible, unmasked = (j >= lo) & (j <= hi), _unmasked(i, j, w, T, S)
  pl.when(visible & unmasked)(lambda: step(False))
  pl.when(visible & jnp.logical_not(unmasked))(lambda: step(True))

  @pl.when(j == pl.num_programs(3) - 1)
  def _finish():
    l = l_scr[...]
    o_ref[...] = (acc_scr[...] / l[..., :1]).astype(o_ref.dtype)
    lse = m_scr[...] + jnp.log(l)  # [G, T, LANES], equal lanes
    for g in range(G):
      lse_ref[g] = lse[g].T[:1]


def _specs(G, H, bq, bk, w_of_kv, clamp):
  """BlockSpecs of q-like [B, N, Tp, H], row-stat [B, N, 1, Tp] and kv-like [B, K, Tp, H] arrays.
  w_of_kv: grid is (B, K, q block, kv block) if False, (B, K, kv block, q block) if True; clamp
  maps the inner grid index to a visible block."""
  if w_of_kv:
    qi = lambda b, k, j, i, w: clamp(i, j, w)  # noqa: E731
    kj = lambda b, k, j, i, w: j  # noqa: E731
  else:
    qi = lambda b, k, i, j, w: i  # noqa: E731
    kj = lambda b, k, i, j, w: clamp(j, i, w)  # noqa: E731
  q = pl.BlockSpec((None, G, bq, H), lambda *a: (a[0], a[1], qi(*a), 0))
  row = pl.BlockSpec((None, G, 1, bq), lambda *a: (a[0], a[1], 0, qi(*a)))
  kv = pl.BlockSpec((None, None, bk, H), lambda *a: (a[0], a[1], kj(*a), 0))
  return q, row, kv


def _params(interpret):
  return dict(
      compiler_params=pltpu.CompilerParams(dimension_semantics=("parallel", "parallel", "parallel", "arbitrary")),
      interpret=interpret,
  )


def _fwd(q_BNTH, k_BKTH, v_BKTH, w_1, *, scale, softcap, bq, bk, interpret):
  B, N, Tp, H = q_BNTH.shape
  K = k_BKTH.shape[1]
  G, nq, nk = N // K, Tp // bq, Tp // bk

  def clamp(j, i, w):
    lo, hi = _kv_blocks(i, w[0], bq, bk)
    return jnp.minimum(jnp.maximum(j, lo), hi)

  q, row, kv = _specs(G, H, bq, bk, False, clamp)
  return pl.pallas_call(
      functools.partial(_fwd_kernel, scale=scale, softcap=softcap),
      grid_spec=pltpu.PrefetchScalarGridSpec(
          num_scalar_prefetch=1, grid=(B, K, nq, nk), in_specs=[q, kv, kv], out_specs=[q, row],
          scratch_shapes=[pltpu.VMEM((G, bq, LANES), jnp.float32), pltpu.VMEM((G, bq, LANES), jnp.float32),
                          pltpu.VMEM((G, bq, H), jnp.float32)],
      ),
      out_shape=[jax.ShapeDtypeStruct(q_BNTH.shape, q_BNTH.dtype), jax.ShapeDtypeStruct((B, N, 1, Tp), jnp.float32)],
      **_params(interpret),
  )(w_1, q_BNTH, k_BKTH, v_BKTH)


# ----------------------------------------------------------------------------------------- backward


def _dq_kernel(w_ref, q_ref, k_ref, v_ref, do_ref, lse_ref, d_ref, dq_ref, dq_scr, *, scale, softcap):
  i, j, w = pl.program_id(2), pl.program_id(3), w_ref[0]
  G, T, H = q_ref.shape
  S = k_ref.shape[0]
  lo, hi = _kv_blocks(i, w, T, S)

  @pl.when(j == 0)
  def _init():
    dq_scr[...] = jnp.zeros(dq_scr.shape, jnp.float32)

  def step(masked):
    sc_GTS = _scores(q_ref[...].reshape(G * T, H), k_ref[...], scale, softcap).reshape(G, T, S)
    s_GTS = sc_GTS + _bias(i * T + _iota((T, S), 0), j * S + _iota((T, S), 1), w) if masked else sc_GTS
    lse = jnp.stack([_column(lse_ref, g, T) for g in range(G)])[..., :1]
    dd = jnp.stack([_column(d_ref, g, T) for g in range(G)])[..., :1]
    p_GTS = jnp.exp(s_GTS - lse)
    dp_GTS = _dot_nt(do_ref[...].reshape(G * T, H), v_ref[...]).reshape(G, T, S)
    ds_GTS = p_GTS * (dp_GTS - dd)
    if softcap is not None:
      ds_GTS = ds_GTS * (1.0 - jnp.square(sc_GTS / softcap))
    dq_scr[...] += _dot(ds_GTS.reshape(G * T, S).astype(k_ref.dtype), k_ref[...]).reshape(G, T, H)

  visible, unmasked = (j >= lo) & (j <= hi), _unmasked(i, j, w, T, S)
  pl.when(visible & unmasked)(lambda: step(False))
  pl.when(visible & jnp.logical_not(unmasked))(lambda: step(True))

  @pl.when(j == pl.num_programs(3) - 1)
  def _finish():
    dq_ref[...] = (dq_scr[...] * scale).astype(dq_ref.dtype)


def _dkv_kernel(w_ref, q_ref, k_ref, v_ref, do_ref, lse_ref, d_ref, dk_ref, dv_ref, dk_scr, dv_scr, *, scale,
                softcap, nq):
  """Transposed form: scores [S, T] (keys on sublanes), so the row statistics broadcast along sublanes."""
  j, i, w = pl.program_id(2), pl.program_id(3), w_ref[0]
  G, T, H = q_ref.shape
  S = k_ref.shape[0]
  lo, hi = _q_blocks(j, w, T, S, nq)

  @pl.when(i == 0)
  def _init():
    dk_scr[...] = jnp.zeros(dk_scr.shape, jnp.float32)
    dv_scr[...] = jnp.zeros(dv_scr.shape, jnp.float32)

  def step(masked):
    k, v = k_ref[...], v_ref[...]
    bias = _bias(i * T + _iota((S, T), 1), j * S + _iota((S, T), 0), w) if masked else 0.0
    dk, dv = dk_scr[...], dv_scr[...]
    for g in range(G):  # the heads of the group: dK and dV sum over them
      q, do = q_ref[g], do_ref[g]
      sc_ST = _scores(k, q, scale, softcap)
      p_ST = jnp.exp(sc_ST + bias - lse_ref[g])
      dv += _dot(p_ST.astype(do.dtype), do)
      ds_ST = p_ST * (_dot_nt(v, do) - d_ref[g])
      if softcap is not None:
        ds_ST = ds_ST * (1.0 - jnp.square(sc_ST / softcap))
      dk += _dot(ds_ST.astype(q.dtype), q)
    dk_scr[...], dv_scr[...] = dk, dv

  visible, unmasked = (i >= lo) & (i <= hi), _unmasked(i, j, w, T, S)
  pl.when(visible & unmasked)(lambda: step(False))
  pl.when(visible & jnp.logical_not(unmasked))(lambda: step(True))

  @pl.when(i == pl.num_programs(3) - 1)
  def _finish():
    dk_ref[...] = (dk_scr[...] * scale).astype(dk_ref.dtype)
    dv_ref[...] = dv_scr[...].astype(dv_ref.dtype)


def _bwd(q_BNTH, k_BKTH, v_BKTH, w_1, lse_BN1T, d_BN1T, do_BNTH, *, scale, softcap, bq, bk, interpret):
  B, N, Tp, H = q_BNTH.shape
  K = k_BKTH.shape[1]
  G, nq, nk = N // K, Tp // bq, Tp // bk
  kw = dict(scale=scale, softcap=softcap)
  args = (w_1, q_BNTH, k_BKTH, v_BKTH, do_BNTH, lse_BN1T, d_BN1T)

  def clamp_kv(j, i, w):
    lo, hi = _kv_blocks(i, w[0], bq, bk)
    return jnp.minimum(jnp.maximum(j, lo), hi)

  q, row, kv = _specs(G, H, bq, bk, False, clamp_kv)
  dq_BNTH = pl.pallas_call(
      functools.partial(_dq_kernel, **kw),
      grid_spec=pltpu.PrefetchScalarGridSpec(
          num_scalar_prefetch=1, grid=(B, K, nq, nk), in_specs=[q, kv, kv, q, row, row], out_specs=q,
          scratch_shapes=[pltpu.VMEM((G, bq, H), jnp.float32)],
      ),
      out_shape=jax.ShapeDtypeStruct(q_BNTH.shape, q_BNTH.dtype),
      **_params(interpret),
  )(*args)

  def clamp_q(i, j, w):
    lo, hi = _q_blocks(j, w[0], bq, bk, nq)
    return jnp.minimum(jnp.maximum(i, lo), hi)

  q, row, kv = _specs(G, H, bq, bk, True, clamp_q)
  dk_BKTH, dv_BKTH = pl.pallas_call(
      functools.partial(_dkv_kernel, nq=nq, **kw),
      grid_spec=pltpu.PrefetchScalarGridSpec(
          num_scalar_prefetch=1, grid=(B, K, nk, nq), in_specs=[q, kv, kv, q, row, row], out_specs=[kv, kv],
          scratch_shapes=[pltpu.VMEM((bk, H), jnp.float32), pltpu.VMEM((bk, H), jnp.float32)],
      ),
      out_shape=[jax.ShapeDtypeStruct(k_BKTH.shape, k_BKTH.dtype), jax.ShapeDtypeStruct(v_BKTH.shape, v_BKTH.dtype)],
      **_params(interpret),
  )(*args)
  return dq_BNTH, dk_BKTH, dv_BKTH


# ------------------------------------------------------------------------------------ entry points


def _blocks(T, G, block_q, block_k):
  """Block sizes (multiples of 128; by default G * block_q = 512 rows where G <= 4, block_k 512, or 256 past
  512 rows) and the padded length, a multiple of both."""
  bq = block_q or max(128, 512 // G)
  bk = block_k or (512 if G * bq <= 512 else 256)
  Tr = -(-T // 128) * 128
  bq, bk = min(bq, Tr), min(bk, Tr)
  if bq % 128 or bk % 128:
    raise ValueError(f"block sizes must be multiples of 128, got block_q={bq}, block_k={bk}")
  m = max(bq, bk)
  if m % bq or m % bk:
    raise ValueError(f"block_q={bq} and block_k={bk} must divide one another")
  return bq, bk, -(-T // m) * m


@functools.cache
def _sharded(kernel, scale, softcap, bq, bk, interpret):
  """kernel (_fwd or _bwd) partitioned over batch rows and kv heads (`partitioned`): its queries and their
  rows (the q, o, lse, d arrays [B, N, ...]) go in and out as [B, K, G, ...], so that a shard of kv heads
  keeps its query heads."""
  fwd = kernel is _fwd
  rule = ("b k g t h, b k s h, b k s h, w -> b k g t h, b k g o t" if fwd else
          "b k g t h, b k s h, b k s h, w, b k g o t, b k g o t, b k g t h -> b k g t h, b k s h, b k s h")

  def run(q, k_BKTH, v_BKTH, w_1, *rows):
    B, K, G = q.shape[:3]
    flat = lambda x: x.reshape(B, K * G, *x.shape[3:])  # noqa: E731
    outs = kernel(flat(q), k_BKTH, v_BKTH, w_1, *map(flat, rows), scale=scale, softcap=softcap, bq=bq, bk=bk,
                  interpret=interpret)
    return (outs[0].reshape(q.shape), *(o.reshape(B, K, G, *o.shape[2:]) if fwd else o for o in outs[1:]))

  return run if interpret else partitioned(run, rule, "bk")  # interpret mode's callbacks cannot be partitioned


def _grouped(K, *xs_BNX):
  return [x.reshape(x.shape[0], K, x.shape[1] // K, *x.shape[2:]) for x in xs_BNX]


def _to_blocks(x_BTXH, Tp):
  return jnp.pad(x_BTXH, ((0, 0), (0, Tp - x_BTXH.shape[1]), (0, 0), (0, 0))).transpose(0, 2, 1, 3)


@functools.partial(jax.custom_vjp, nondiff_argnums=(4, 5, 6, 7, 8))
def _flash(q_BTNH, k_BTKH, v_BTKH, w_1, scale, softcap, bq, bk, interpret):
  return _flash_fwd(q_BTNH, k_BTKH, v_BTKH, w_1, scale, softcap, bq, bk, interpret)[0]


def _flash_fwd(q_BTNH, k_BTKH, v_BTKH, w_1, scale, softcap, bq, bk, interpret):
  T = q_BTNH.shape[1]
  bq, bk, Tp = _blocks(T, q_BTNH.shape[2] // k_BTKH.shape[2], bq, bk)
  q_BNTH, k_BKTH, v_BKTH = (_to_blocks(x, Tp) for x in (q_BTNH, k_BTKH, v_BTKH))
  K = k_BKTH.shape[1]
  o, lse = _sharded(_fwd, scale, softcap, bq, bk, interpret)(*_grouped(K, q_BNTH), k_BKTH, v_BKTH, w_1)
  o_BNTH, lse_BN1T = (x.reshape(x.shape[0], -1, *x.shape[3:]) for x in (o, lse))
  return o_BNTH.transpose(0, 2, 1, 3)[:, :T], (q_BNTH, k_BKTH, v_BKTH, w_1, o_BNTH, lse_BN1T)


def _flash_bwd(scale, softcap, bq, bk, interpret, res, do_BTNH):
  q_BNTH, k_BKTH, v_BKTH, w_1, o_BNTH, lse_BN1T = res
  T, Tp = do_BTNH.shape[1], q_BNTH.shape[2]
  bq, bk, _ = _blocks(T, q_BNTH.shape[1] // k_BKTH.shape[1], bq, bk)
  do_BNTH = _to_blocks(do_BTNH, Tp)
  d_BN1T = jnp.sum(do_BNTH.astype(jnp.float32) * o_BNTH.astype(jnp.float32), axis=-1)[:, :, None]
  K = k_BKTH.shape[1]
  q, lse, d, do = _grouped(K, q_BNTH, lse_BN1T, d_BN1T, do_BNTH)
  dq, dk, dv = _sharded(_bwd, scale, softcap, bq, bk, interpret)(q, k_BKTH, v_BKTH, w_1, lse, d, do)
  dq = dq.reshape(q_BNTH.shape)
  back = lambda x: x.transpose(0, 2, 1, 3)[:, :T]  # noqa: E731
  return back(dq), back(dk), back(dv), None


_flash.defvjp(_flash_fwd, _flash_bwd)


def flash_attention(q_BTNH, k_BTKH, v_BTKH, *, scale: float, window=0, softcap: float | None = None, interpret=False,
                    block_q: int | None = None, block_k: int | None = None):
  """causal_attention's function (positions 0..T-1), differentiable; window may be a traced int32 scalar.
  interpret: False on TPU; True or pltpu.InterpretParams() to run on CPU."""
  w_1 = jnp.asarray(window, jnp.int32).reshape(1)
  softcap = None if softcap is None else float(softcap)
  return _flash(q_BTNH, k_BTKH, v_BTKH, w_1, float(scale), softcap, block_q, block_k, interpret)


def _slot_range(length, w, S):
  """The slots [first, end) that a query at position length - 1 sees in a cache of S slots."""
  return jnp.where(w > 0, jnp.maximum(length - w, 0), 0), jnp.minimum(length, S)


def _slot_blocks(length, w, S, bs):
  """The cache blocks [lo, hi] holding those slots (lo = hi + 1 when there are none)."""
  first, end = _slot_range(length, w, S)
  hi = lax.div(jnp.maximum(end - 1, 0), bs)
  return jnp.where(first < end, lax.div(first, bs), hi + 1), hi


def _decode_kernel(len_ref, w_ref, q_ref, k_ref, v_ref, o_ref, m_scr, l_scr, acc_scr, *, scale, softcap, S):
  b, j, w = pl.program_id(0), pl.program_id(2), w_ref[0]
  G, H = q_ref.shape
  bs = k_ref.shape[0]
  first, end = _slot_range(len_ref[b], w, S)
  lo, hi = _slot_blocks(len_ref[b], w, S, bs)

  @pl.when(j == 0)
  def _init():
    m_scr[...] = jnp.full(m_scr.shape, NEG, jnp.float32)
    l_scr[...] = jnp.zeros(l_scr.shape, jnp.float32)
    acc_scr[...] = jnp.zeros(acc_scr.shape, jnp.float32)

  @pl.when((j >= lo) & (j <= hi))
  def _step():
    pos_GS = j * bs + _iota((G, bs), 1)
    s_GS = jnp.where((pos_GS >= first) & (pos_GS < end), _scores(q_ref[...], k_ref[...], scale, softcap), NEG)
    pos_SH = j * bs + _iota((bs, H), 0)  # slots past the length may hold anything, NaN included: zero them
    v_SH = jnp.where((pos_SH >= first) & (pos_SH < end), v_ref[...], jnp.zeros((), v_ref.dtype))
    m_prev = m_scr[...]
    m_new = jnp.maximum(m_prev, s_GS.max(axis=-1, keepdims=True))
    alpha = jnp.exp(m_prev - m_new)
    p_GS = jnp.exp(s_GS - m_new[:, :1])
    l_scr[...] = alpha * l_scr[...] + p_GS.sum(axis=-1, keepdims=True)
    acc_scr[...] = acc_scr[...] * alpha[:, :1] + _dot(p_GS.astype(v_SH.dtype), v_SH)
    m_scr[...] = m_new

  @pl.when(j == pl.num_programs(2) - 1)
  def _finish():
    o_ref[...] = (acc_scr[...] / l_scr[...][:, :1]).astype(o_ref.dtype)


def _decode(kernel, lengths_B, w_1, q_BKGH, k_BSKH, v_BSKH, *, bs, interpret):
  B, K, G, H = q_BKGH.shape
  S = k_BSKH.shape[1]

  def kv_index(b, k, j, len_ref, w_ref):
    lo, hi = _slot_blocks(len_ref[b], w_ref[0], S, bs)
    return b, jnp.minimum(jnp.maximum(j, lo), hi), k

  qo = pl.BlockSpec((None, None, G, H), lambda b, k, j, *_: (b, k, 0, 0))
  kv = pl.BlockSpec((None, bs, H), kv_index)
  return pl.pallas_call(
      kernel,
      grid_spec=pltpu.PrefetchScalarGridSpec(
          num_scalar_prefetch=2, grid=(B, K, pl.cdiv(S, bs)), in_specs=[qo, kv, kv], out_specs=qo,
          scratch_shapes=[pltpu.VMEM((G, LANES), jnp.float32), pltpu.VMEM((G, LANES), jnp.float32),
                          pltpu.VMEM((G, H), jnp.float32)],
      ),
      out_shape=jax.ShapeDtypeStruct((B, K, G, H), q_BKGH.dtype),
      compiler_params=pltpu.CompilerParams(dimension_semantics=("parallel", "parallel", "arbitrary")),
      interpret=interpret,
  )(lengths_B, w_1, q_BKGH, k_BSKH.reshape(B, S, K * H), v_BSKH.reshape(B, S, K * H))


def decode_attention(q_BNH, k_BSKH, v_BSKH, lengths_B, *, scale: float, window=0, softcap: float | None = None,
                     interpret=False, block_s: int = 1024):
  """decode_attention's function: row b's query at position lengths[b] - 1 over cache slots [0, lengths[b]).
  lengths must be >= 1. Needs H % 128 == 0 or K == 1 (one kv head's lanes per block). Cache blocks holding
  none of a row's visible slots are neither fetched nor computed; slots past the length may hold NaN."""
  B, N, H = q_BNH.shape
  S, K = k_BSKH.shape[1], k_BSKH.shape[2]
  G = N // K
  if H % 128 and K > 1:
    raise ValueError(f"decode_attention (TPU) needs head dim % 128 == 0 or one kv head, got H={H}, K={K}")
  bs = S if S <= block_s else block_s
  if bs != S and bs % 16:
    raise ValueError(f"block_s must be a multiple of 16, got {block_s}")
  lengths_B = jnp.asarray(lengths_B, jnp.int32)
  w_1 = jnp.asarray(window, jnp.int32).reshape(1)

  kernel = functools.partial(_decode_kernel, scale=float(scale), softcap=None if softcap is None else float(softcap), S=S)
  run = functools.partial(_decode, kernel, bs=bs, interpret=interpret)
  if not interpret:
    run = partitioned(run, "b, w, b k g h, b s k h, b s k h -> b k g h", "bk")
  o_BKGH = run(lengths_B, w_1, q_BNH.reshape(B, K, G, H), k_BSKH, v_BSKH)
  return o_BKGH.reshape(B, N, H)


def supported(q, k, *, window, softcap, backend: str | None = None) -> bool:
  """Whether these kernels take this call: a TPU backend, float32/bfloat16, N % K == 0, and head dim H % 64 == 0
  (flash, q [B, T, N, H]) or H % 128 == 0 or K == 1 (decode, q [B, N, H]). window and softcap: any."""
  del window, softcap
  backend = backend or jax.default_backend()
  H, N, K = q.shape[-1], q.shape[-2], k.shape[-2]
  ok = backend == "tpu" and q.dtype == k.dtype and q.dtype in (jnp.float32, jnp.bfloat16) and N % K == 0
  if q.ndim == 4:
    return ok and H % 64 == 0 and H <= 256
  return ok and q.ndim == 3 and (H % 128 == 0 or K == 1)
