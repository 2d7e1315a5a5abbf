"""Decode attention over a fixed-size KV cache with per-row lengths: a Pallas Mosaic GPU kernel (Hopper).

Dimensions: B batch, S cache slots, N query heads, K kv heads, G = N / K query heads per kv head,
H head dim, M = 64 rows of a wgmma tile (the G query heads of one kv head, zero-padded),
T cache slots per KV tile (S is a multiple of T), P splits of the S axis.

Flash-decoding: the grid is (B, K, P). Row b's visible slots ([max(0, lengths[b] - window), lengths[b]),
all slots before lengths[b] when window <= 0) are cut into P splits of whole tiles, sized per row:
each row's work is spread over all P of its blocks, so no block idles while others stream (a split
size fixed from S left most blocks of the short rows empty and the GPU in a partial last wave).
Block (b, k, p) streams the KV tiles of split p of row b from HBM into shared memory with TMA,
STAGES tiles in flight, and runs an online
softmax on them: scores = [M, H] x [H, T] and output += [M, T] x [T, H] on the tensor cores (wgmma),
so each K/V byte is read once for all G query heads. A block with no visible slot loads nothing.
Each block writes its normalised float32 output and log-sum-exp; `_combine` (jnp) merges the splits.
Tiles are whole, so the one tile that straddles lengths[b] also brings in up to T - 1 slots past
it; their scores are masked and their V rows zeroed in shared memory before the second product, so
whatever those slots hold (even NaN) never reaches the output. No tile past it is loaded.
Interpret mode (CPU): the interpreter's wgmma takes no transposed operand, so there q @ k.T is a
plain einsum of the shared-memory tiles; everything else runs as on the GPU.
"""

import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import mosaic_gpu as plgpu

from xlazoo.ops.pallas import on_hopper
from xlazoo.ops.pallas.hopper import interpret_params, tile

M = 64  # wgmma tile rows: the G query heads of a kv head, zero-padded
BLOCK_KV = 64  # T: cache slots per KV tile
STAGES = 2  # KV tiles in shared memory at once (one loading while one is used)
SPLITS = 32  # P: splits per row, fewer where S has fewer tiles


def supported(q_BNH: jax.Array, k_BSKH: jax.Array, *, window, softcap) -> bool:
  """Whether the kernel handles these shapes on this backend (any window and soft-cap are fine); k may be stacked [L, B, S, K, H]."""
  del window, softcap
  B, N, H = q_BNH.shape
  S, K, _ = k_BSKH.shape[-3:]
  return (
      on_hopper() and q_BNH.dtype in (jnp.bfloat16, jnp.float16) and k_BSKH.dtype == q_BNH.dtype
      and N % K == 0 and N // K <= M and H in (64, 128, 256)
      and S >= BLOCK_KV and S % BLOCK_KV == 0  # xlazoo.generate allocates caches in multiples of 64 slots
  )


def _kernel(layer_ref, window_ref, lengths_ref, q_ref, k_ref, v_ref, o_ref, lse_ref, *, scale, softcap, interpret):
  S, H = k_ref.shape[2], k_ref.shape[4]
  T, P, G, dtype = BLOCK_KV, o_ref.shape[2], o_ref.shape[3], k_ref.dtype
  b, kh, sp = lax.axis_index("b"), lax.axis_index("k"), lax.axis_index("p")
  # Row b's visible slots [lo, length), cut into P splits of `split` slots (whole tiles) from lo's tile:
  # computed here rather than by XLA, which would launch kernels for them in every layer of a step.
  layer, window, length = layer_ref[0], window_ref[0], lengths_ref[b]
  lo = jnp.where(window > 0, jnp.maximum(length - window, 0), 0)
  length = jnp.minimum(length, S)
  base = lax.div(lo, T) * T  # splits start on a tile boundary, so no tile is read by two of them
  split = jnp.maximum(lax.div(lax.div(length - base + T - 1, T) + P - 1, P), 1) * T
  first = jnp.maximum(lo, base + sp * split)  # this split's visible slots: [first, end)
  end = jnp.minimum(length, base + (sp + 1) * split)
  t0 = lax.div(first, T)
  n = jnp.where(end > first, lax.div(end + T - 1, T) - t0, 0)  # tiles to visit; 0: nothing visible here
  layout = (lambda x, _: x) if interpret else plgpu.layout_cast  # the interpreter has no register layouts
  wgmma_layout, row_layout = plgpu.Layout.WGMMA, plgpu.Layout.WGMMA.reduce(1)

  def tile_start(i):  # tile i covers slots [(t0 + i) T, (t0 + i + 1) T), inside S as S is a multiple of T
    return (t0 + i) * T

  def matmul(a_smem, b_smem, shape, transpose_b=False):  # a @ b (a @ b.T) on the tensor cores, float32
    if interpret and transpose_b:  # the interpreter's wgmma takes no transposed operand
      return jnp.einsum("mh,th->mt", a_smem[...], b_smem[...], preferred_element_type=jnp.float32)

    def scope(acc_ref):
      plgpu.wgmma(acc_ref, a_smem, plgpu.transpose_ref(b_smem, (1, 0)) if transpose_b else b_smem)
      return acc_ref[...]
    return pl.run_scoped(scope, plgpu.ACC(shape, jnp.float32))

  def attend(q_smem, k_smem, v_smem, p_smem, q_bar, k_bar, v_bar):
    def fetch(i):
      slot, rows = lax.rem(i, jnp.int32(STAGES)), pl.ds(tile_start(i), T)
      plgpu.copy_gmem_to_smem(k_ref.at[layer, b, rows, kh], k_smem.at[slot], k_bar.at[slot])
      plgpu.copy_gmem_to_smem(v_ref.at[layer, b, rows, kh], v_smem.at[slot], v_bar.at[slot])

    @pl.when(n > 0)
    def _():
      plgpu.copy_gmem_to_smem(q_ref.at[b, kh], q_smem, q_bar)
      for i in range(STAGES - 1):
        pl.when(i < n)(functools.partial(fetch, i))
      plgpu.barrier_wait(q_bar)

    def step(i, carry):
      acc_MH, m_M, l_M = carry
      slot, start = lax.rem(i, jnp.int32(STAGES)), tile_start(i)
      pl.when(i + STAGES - 1 < n)(lambda: fetch(i + STAGES - 1))  # its slot was freed by step i - 1
      plgpu.barrier_wait(k_bar.at[slot])
      s_MT = matmul(q_smem, k_smem.at[slot], (M, T), transpose_b=True) * scale
      if softcap is not None:
        s_MT = jnp.tanh(s_MT / softcap) * softcap
      pos_MT = layout(plgpu.broadcasted_iota(jnp.int32, (M, T), 1), wgmma_layout) + start
      visible_MT = (pos_MT >= jnp.maximum(first, (t0 + i) * T)) & (pos_MT < end)
      s_MT = jnp.where(visible_MT, s_MT, -jnp.inf)
      m_new_M = jnp.maximum(m_M, s_MT.max(axis=1))
      alpha_M = jnp.exp(m_M - m_new_M)
      p_MT = jnp.exp(s_MT - lax.broadcast_in_dim(m_new_M, (M, T), [0]))
      l_M = l_M * alpha_M + p_MT.sum(axis=1)
      plgpu.barrier_wait(v_bar.at[slot])

      @pl.when(start + T > length)  # the tile straddling the length: zero V past it (0 * NaN is NaN)
      def _():
        row_TH = layout(plgpu.broadcasted_iota(jnp.int32, (T, H), 0), wgmma_layout) + start
        v_TH = v_smem.at[slot][...]
        v_smem.at[slot][...] = jnp.where(row_TH < length, v_TH, 0)

      p_smem[...] = p_MT.astype(dtype)
      plgpu.commit_smem()
      pv_MH = matmul(p_smem, v_smem.at[slot], (M, H))
      acc_MH = acc_MH * lax.broadcast_in_dim(alpha_M, (M, H), [0]) + pv_MH
      return acc_MH, m_new_M, l_M

    init = (
        layout(jnp.zeros((M, H), jnp.float32), wgmma_layout),
        layout(jnp.full((M,), -jnp.inf, jnp.float32), row_layout),
        layout(jnp.zeros((M,), jnp.float32), row_layout),
    )
    return lax.fori_loop(0, n, step, init)

  acc_MH, m_M, l_M = pl.run_scoped(
      attend,
      tile((M, H), dtype),
      tile((STAGES, T, H), dtype),
      tile((STAGES, T, H), dtype),
      tile((M, T), dtype),
      plgpu.Barrier(num_barriers=1),
      plgpu.Barrier(num_barriers=STAGES),
      plgpu.Barrier(num_barriers=STAGES),
  )

  def store(o_smem, lse_smem):  # a split with nothing visible stores o = 0, lse = -inf
    live_M = l_M > 0
    inv_M = jnp.where(live_M, 1.0 / l_M, 0.0)
    o_smem[...] = acc_MH * lax.broadcast_in_dim(inv_M, (M, H), [0])
    lse_smem[...] = jnp.where(live_M, m_M + jnp.log(l_M), -jnp.inf)
    plgpu.commit_smem()
    plgpu.copy_smem_to_gmem(o_smem.at[pl.ds(0, G)], o_ref.at[b, kh, sp])
    plgpu.copy_smem_to_gmem(lse_smem, lse_ref.at[b, kh, sp])
    plgpu.wait_smem_to_gmem(0)

  pl.run_scoped(store, plgpu.SMEM((M, H), jnp.float32), plgpu.SMEM((M,), jnp.float32))


def _combine(o_BKPGH, lse_BKPM):
  """Merges the splits' normalised outputs, weighting each by its share of the softmax mass."""
  G = o_BKPGH.shape[3]
  lse_BKPG = lse_BKPM[..., :G]
  w_BKPG = jnp.exp(lse_BKPG - lse_BKPG.max(axis=2, keepdims=True))
  o_BKGH = jnp.einsum("BKPG,BKPGH->BKGH", w_BKPG, o_BKPGH) / w_BKPG.sum(axis=2)[..., None]
  B, K, _, G, H = o_BKPGH.shape
  return o_BKGH.reshape(B, K * G, H)


def decode_attention(q_BNH, k, v, lengths_B, *, scale: float, window=0, softcap: float | None = None, layer=None,
                     interpret=False):
  """One query per row, at position lengths[b] - 1, over the cache slots [0, lengths[b]) of its row.

  Same function as `xlazoo.ops.attention.decode_attention`: k and v are [B, S, K, H], or the stacked
  cache [L, B, S, K, H] with `layer` (an int32 scalar, may be traced) naming the layer to read in place.
  `window` may be an int or a traced int32 scalar. `interpret`: True (or an InterpretGPUParams) runs
  the kernel in Mosaic GPU interpret mode.
  """
  if layer is None:
    k, v, layer = k[None], v[None], 0
  B, N, H = q_BNH.shape
  _, _, S, K, _ = k.shape
  G, T = N // K, BLOCK_KV
  if N % K or G > M or S < T or S % T or k.shape != v.shape or (k.shape[1], k.shape[4]) != (B, H):
    raise ValueError(f"decode_attention kernel: unsupported shapes q {q_BNH.shape}, k/v {k.shape} {v.shape}")
  if not q_BNH.dtype == k.dtype == v.dtype:
    raise ValueError(f"decode_attention kernel: q, k, v dtypes differ: {q_BNH.dtype}, {k.dtype}, {v.dtype}")
  P = min(SPLITS, S // T)
  q_BKMH = jnp.pad(q_BNH.reshape(B, K, G, H), ((0, 0), (0, 0), (0, M - G), (0, 0)))
  kernel = functools.partial(_kernel, scale=scale, softcap=softcap, interpret=bool(interpret))
  o_BKPGH, lse_BKPM = plgpu.kernel(
      kernel,
      out_type=(jax.ShapeDtypeStruct((B, K, P, G, H), jnp.float32), jax.ShapeDtypeStruct((B, K, P, M), jnp.float32)),
      grid=(B, K, P),
      grid_names=("b", "k", "p"),
      interpret=interpret_params(interpret),
  )(jnp.asarray(layer, jnp.int32).reshape(1), jnp.asarray(window, jnp.int32).reshape(1), lengths_B.astype(jnp.int32),
    q_BKMH, k, v)
  return _combine(o_BKPGH, lse_BKPM).astype(q_BNH.dtype)
