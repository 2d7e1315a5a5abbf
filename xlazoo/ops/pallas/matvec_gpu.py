"""One layer's GEMV out of a stacked weight, read in place: a Pallas Mosaic GPU kernel (Hopper).

Dimensions (this file's own letters): M rows of x (decode batch, <= 64), K contraction, N output
columns, L layers of the stack, R = 64 rows of a wgmma tile (x zero-padded), TK x TN a weight tile,
U work units (weight tiles), P blocks, Q output segments per block.

A decode step scans its layers over weights stacked as w[L, K, N]; slicing w[layer] out of the stack
makes XLA copy it before the matmul. `layer_matmul` takes the whole stack and the (traced) layer
index and streams only w[layer]'s [K, N] block from HBM, once. `layer_matmuls` does the same for
several weights of one x (q, k and v; gate and up) in one launch: the weights' column tiles are laid
side by side, so the small ones (k and v: 4096 x 1024) pay no launch, fill and drain of their own.

Work: w[layer] is cut into U = (N / TN) x (K / TK) tiles, ordered column tile by column tile (all of a
column tile's K tiles in a row; with several weights, theirs one after the other). The grid is
persistent, P blocks (at most one per SM; see `_blocks`), and block p takes the contiguous units
[p U / P, (p + 1) U / P), so every block moves the same bytes (within one tile). Each block streams its tiles, with the matching
[M, TK] slice of x, from HBM into swizzled shared memory with TMA, STAGES tiles in flight, and
accumulates x @ w on the tensor cores (wgmma, x padded to R = 64 rows in shared memory; only its first
round_up(M, 8) rows are loaded). A block's units cover at most Q column tiles; for each one (a
segment) it writes its float32 partial [M, TN] to out[p, q]; `_combine` (jnp, small) adds the partials
of each column tile. Where every column tile lies whole in one block and the caller names a dtype for the
result (`out_dtype`), the block instead rounds each tile and writes it finished into out [M, N], and no
combine is left for XLA. The TMA pipeline runs across segment boundaries.

With a norm (`norm=`: the RMSNorm that precedes q/k/v, gate/up or in_proj, M <= 8), x goes in as it is
and the kernel normalises it: every block reads x's rows once from GMEM for their 1 / rms (while its first
tiles stream in), takes the norm's scale for the layer into SMEM, and scales each unit's x tile in
registers into a SMEM operand for the wgmma, rounded as `rms_norm` rounds. No XLA kernels are left for
the norm (its reduction, its scaling and the padding of x: three launches).

Ragged edges: tiles never leave w[layer]. The last column tile starts at N - TN (overlapping the one
before; both compute the same columns, `_combine` keeps one), and the last K tile starts at K - TK,
its first rows (already counted by the tile before) meeting zeros in x: x is laid out in jnp as
[round_up(M, 8), K tiles x TK] with those columns zeroed. TMA sees w as whole [8, S] tiles (S the
swizzle width in elements), so N must be a multiple of S: the swizzle is the widest of 128, 64, 32
bytes that divides N (N = 10576 = 16 x 661 would take 32 bytes: Mamba-2 2.7B's in_proj is padded to
10624 columns for that), and N % 16 != 0 or K % 8 != 0 are not
supported (tile starts are multiples of 8 rows and S columns).
"""

import functools

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import mosaic_gpu as plgpu

from xlazoo.ops.pallas import on_hopper
from xlazoo.ops.pallas.hopper import interpret_params, tile

R = 64  # wgmma tile rows: the M rows of x, zero-padded
BLOCK_N = 128  # TN: weight tile columns (the wgmma N; a multiple of 64)
BLOCK_K = 64  # TK: weight tile rows (a multiple of 64: one 128-byte swizzle row of bf16)
STAGES = 6  # tiles in shared memory at once: 6 x (16 KiB of w + 8 KiB of x) + 32 KiB for the output
GRID_MULTIPLE = 16  # persistent grid where no share is aligned (see _blocks): SMs rounded down to a multiple of this
INTERPRET_BLOCKS = 3  # grid size in interpret mode (no SMs to count)
# With a norm, each unit first scales its x tile: fewer, larger units (TK 128), 3 in flight (4 do not fit
# in SMEM). H100, one GEMV with its norm, us, TK 128 with 3 stages against TK 64 with 6: Mamba-2 2.7B
# in_proj 21.3 / 23.8, Llama-3-8B q/k/v 20.0 / 20.8, gate/up 79.1 / 83.3 (benchmarks/RESULTS.md).
NORM_BLOCK_K = 128
NORM_STAGES = 3
NORM_ROWS = 8  # with a norm: the rows of x that TMA brings (x's M <= 8, the rest zeros)


def supported(x_MK: jax.Array, *ws_LKN: jax.Array) -> bool:
  """Whether the kernel handles x times these weights (one stack of L layers each) on this backend:
  Hopper, bf16/f16 x and w alike, M <= 64."""
  if x_MK.ndim != 2 or not ws_LKN or any(w.ndim != 3 for w in ws_LKN):
    return False
  M, K = x_MK.shape
  return on_hopper() and x_MK.dtype in (jnp.bfloat16, jnp.float16) and 1 <= M <= R and K >= BLOCK_K and K % 8 == 0 and all(
      w.dtype == x_MK.dtype and w.shape[:2] == ws_LKN[0].shape[:2] and w.shape[1] == K and w.shape[2] >= BLOCK_N
      and w.shape[2] % 16 == 0  # TMA sees w as whole [8, 16 or more] tiles (swizzle >= 32 bytes)
      for w in ws_LKN
  )


def norm_supported(x_MK: jax.Array, n_LK: jax.Array, *ws_LKN: jax.Array) -> bool:
  """Whether the kernel also applies an RMSNorm of x with this scale stack (`layer_matmul`'s norm): as
  `supported`, and M <= 8, K a multiple of 128, the scale [L', K] (at most 32 KiB a layer: SMEM)."""
  K = x_MK.shape[-1]
  return (supported(x_MK, *ws_LKN) and x_MK.shape[0] <= NORM_ROWS and K % 128 == 0 and n_LK.ndim == 2
          and n_LK.shape[1] == K and K * n_LK.dtype.itemsize <= 32 * 1024)


def _blocks(NT: int, KT: int) -> int:
  """The persistent grid for NT column tiles of KT units: the most blocks, between half the SMs and all of
  them, whose equal shares of the units start and end on column tiles or on equal parts of one (an H100's
  132 SMs: Llama-3-8B's q/k/v 96, o 128, gate/up 112, down 128; Mamba-2 2.7B's in_proj 83, out_proj 100).
  No block then straddles a column tile, and none waits on a longer share. Measured on the H100, decode
  ms a token: Llama-3-8B 6.36 on 132 blocks, 6.30 on 128, 6.22 with this rule (6.29 on 128 in that
  A/B); Mamba-2 2.7B the same on 132 and 128 blocks, 3.80 -> 3.67 with this rule."""
  sms = int(getattr(jax.devices()[0], "core_count", 0) or 132)
  U = NT * KT
  aligned = [P for P in range(sms // 2, sms + 1) if U % P == 0 and (KT % (U // P) == 0 or (U // P) % KT == 0)]
  return max(aligned) if aligned else sms // GRID_MULTIPLE * GRID_MULTIPLE


def _swizzle(Ns, dtype) -> int:
  """The widest swizzle (bytes) whose tile width divides every N: TMA sees w as whole [8, swizzle] tiles."""
  itemsize = jnp.dtype(dtype).itemsize
  return next(s for s in (128, 64, 32) if all(N % (s // itemsize) == 0 for N in Ns))


def _plan(K: int, NT: int, P: int, TK: int):
  """The static work split of NT column tiles: units per column tile, units, blocks, segments per block,
  and each block's segments."""
  KT = -(-K // TK)
  U = KT * NT
  P = max(1, min(P, U))
  segments = []  # (block, segment, column tile) of every partial the kernel writes
  for p in range(P):
    u0, u1 = p * U // P, (p + 1) * U // P
    for q, j in enumerate(range(u0 // KT, (u1 - 1) // KT + 1)):
      segments.append((p, q, j))
  Q = 1 + max(q for _, q, _ in segments)
  return KT, U, P, Q, segments


def _kernel(layer_ref, x_ref, *refs, U, KT, TK, TN, P, stages, swizzle, first_tiles, direct, norm, interpret):
  """first_tiles[i]: the global column tile where weight i's columns start (and, last, the end). direct: every
  column tile lies in one block, which writes it finished to out [M, tiles x TN]; else out holds the blocks'
  float32 partials [P, Q, M, TN]. norm: None, or (eps, offset) of an RMSNorm of x that the kernel applies
  itself (see `_row_scales`); its weight stack comes first in refs, as [L', KT, TK]."""
  n_ref, refs = (refs[0], refs[1:]) if norm else (None, refs)
  w_refs, out_ref = refs[:-1], refs[-1]
  K = w_refs[0].shape[1]
  Mp = NORM_ROWS if norm else x_ref.shape[0]
  M = out_ref.shape[0] if direct else out_ref.shape[2]
  p = lax.axis_index("p")
  layer = jnp.clip(layer_ref[0], 0, w_refs[0].shape[0] - 1)  # clamped here, not in an XLA kernel of its own
  u0, u1 = lax.div(p * U, P), lax.div((p + 1) * U, P)  # this block's units: [u0, u1)
  n = u1 - u0
  j0 = lax.div(u0, KT)
  nseg = lax.div(u1 - 1, KT) - j0 + 1

  def pipeline(x_smem, w_smem, x_bar, w_bar, o_smem, n_smem=None, n_bar=None, a_smem=None):
    def fetch(i):  # unit u0 + i into slot i % stages
      u = u0 + i
      j = lax.div(u, KT)
      k0 = jnp.minimum((u - j * KT) * TK, K - TK)  # the last K tile moved back inside K (x zeroed there)
      slot = lax.rem(i, jnp.int32(stages))
      x_dst = x_smem.at[slot] if Mp == R else x_smem.at[slot, pl.ds(0, Mp)]
      # With a norm, x is [M, K] as it comes: TMA fills the rows past M with zeros.
      plgpu.copy_gmem_to_smem(x_ref.at[pl.ds(0, Mp), pl.ds((u - j * KT) * TK, TK)], x_dst, x_bar.at[slot])
      for w_ref, j0, j1 in zip(w_refs, first_tiles[:-1], first_tiles[1:]):

        def fetch_w(w_ref=w_ref, j0=j0):
          n0 = jnp.minimum((j - j0) * TN, w_ref.shape[2] - TN)  # the last column tile moved back inside N
          plgpu.copy_gmem_to_smem(w_ref.at[layer, pl.ds(k0, TK), pl.ds(n0, TN)], w_smem.at[slot], w_bar.at[slot])

        if len(w_refs) == 1:
          fetch_w()
        else:
          pl.when((j >= j0) & (j < j1))(fetch_w)

    for i in range(stages - 1):
      pl.when(i < n)(functools.partial(fetch, i))
    if norm:  # while the first tiles stream in: the norm's weights, and each row's 1 / rms
      plgpu.copy_gmem_to_smem(n_ref.at[jnp.clip(layer_ref[0], 0, n_ref.shape[0] - 1)], n_smem, n_bar.at[0])
      r_R = _row_scales(x_ref, norm[0], interpret)
      plgpu.barrier_wait(n_bar.at[0])

    def step(acc_ref, i, carry):
      slot = lax.rem(i, jnp.int32(stages))
      plgpu.barrier_wait(x_bar.at[slot])
      a = x_smem.at[slot]
      if norm:  # the wgmma's x: (x / rms) * (offset + w) in x's dtype, as rms_norm rounds it, through SMEM
        # (a register operand would have to outlive its asynchronous wgmma: unsafe in this loop). Rows past
        # M hold whatever the slot held: they only reach the output's rows past M, which are not kept.
        x_RK = _load(x_smem.at[slot], plgpu.Layout.WGMMA, interpret)
        w_K = _load(n_smem.at[lax.rem(u0 + i, jnp.int32(KT))], plgpu.Layout.WGMMA.reduce(0), interpret) + norm[1]
        x_RK = x_RK * lax.broadcast_in_dim(r_R, (R, TK), (0,))
        a = a_smem.at[lax.rem(i, 2)]  # unit i - 2's wgmma, the last to read it, is done (wgmma_wait(1) below)
        a[...] = (x_RK * lax.broadcast_in_dim(w_K, (R, TK), (1,))).astype(a.dtype)
        plgpu.commit_smem()
      plgpu.barrier_wait(w_bar.at[slot])
      plgpu.wgmma(acc_ref, a, w_smem.at[slot])
      plgpu.wgmma_wait(1)  # unit i - 1's wgmma is done: its slot is free
      pl.when(i + stages - 1 < n)(lambda: fetch(i + stages - 1))
      return carry

    def segment(q, carry):  # the block's units in column tile j0 + q
      lo = jnp.maximum(u0, (j0 + q) * KT) - u0
      hi = jnp.minimum(u1, (j0 + q + 1) * KT) - u0

      def accumulate(acc_ref):
        lax.fori_loop(lo, hi, functools.partial(step, acc_ref), 0)
        return acc_ref[...]

      acc_RN = pl.run_scoped(accumulate, plgpu.ACC((R, TN), jnp.float32))
      plgpu.wait_smem_to_gmem(0, wait_read_only=True)  # the previous segment's store has read o_smem
      o_smem[...] = acc_RN.astype(o_smem.dtype)
      plgpu.commit_smem()
      dst = out_ref.at[:, pl.ds((j0 + q) * TN, TN)] if direct else out_ref.at[p, q]
      plgpu.copy_smem_to_gmem(o_smem.at[pl.ds(0, M)], dst)
      return carry

    lax.fori_loop(0, nseg, segment, 0)
    plgpu.wait_smem_to_gmem(0)

  scratch = [
      tile((stages, R, TK), x_ref.dtype, swizzle),
      tile((stages, TK, TN), x_ref.dtype, swizzle),
      plgpu.Barrier(num_barriers=stages),
      plgpu.Barrier(num_barriers=stages),
      plgpu.SMEM((R, TN), out_ref.dtype),
  ]
  if norm:
    scratch += [plgpu.SMEM(n_ref.shape[1:], n_ref.dtype), plgpu.Barrier(num_barriers=1), tile((2, R, TK), x_ref.dtype, swizzle)]
  pl.run_scoped(pipeline, *scratch)


def _load(ref, layout, interpret):
  """A SMEM tile or vector in float32, in a register layout of the wgmma's [R, TK] x tile."""
  return (ref[...] if interpret else plgpu.load(ref, (), layout=layout)).astype(jnp.float32)


def _row_scales(x_ref, eps, interpret):
  """[R] float32: 1 / rms of each of x's rows (rsqrt(mean(x^2) + eps), as rms_norm), 0 past them; read from
  GMEM by every block (a few KiB, in L2), K / 128 elements a thread."""
  M, K = x_ref.shape
  r_R = jnp.zeros((R,), jnp.float32)
  if interpret:
    iota = lax.broadcasted_iota(jnp.int32, (R,), 0)
  else:
    rows = plgpu.Layout.WGMMA.reduce(1)
    r_R, iota = plgpu.layout_cast(r_R, rows), plgpu.broadcasted_iota(jnp.int32, (R,), 0, layout=rows)
  for m in range(min(M, NORM_ROWS)):
    if interpret:
      x_K = x_ref[m, :]
    else:
      x_K = plgpu.load(x_ref.at[m], (), layout=plgpu.Layout.WG_STRIDED((K,), vec_size=1), optimized=False)
    x_K = x_K.astype(jnp.float32)
    r = lax.rsqrt(jnp.sum(x_K * x_K) / K + eps)
    r_R = jnp.where(iota == m, r, r_R)
  return r_R


def _layout_x(x_MK, KT: int, TK: int):
  """x as [round_up(M, 8), KT TK]: column t TK + i meets weight row min(t TK, K - TK) + i of K tile t."""
  M, K = x_MK.shape
  Mp = -(-M // 8) * 8
  shift = KT * TK - K  # the last K tile starts `shift` rows early; those rows meet zeros
  x_MK = jnp.concatenate([x_MK[:, : (KT - 1) * TK], jnp.zeros((M, shift), x_MK.dtype), x_MK[:, (KT - 1) * TK :]], 1)
  return jnp.pad(x_MK, ((0, Mp - M), (0, 0)))


def _combine(out_PQMN, segments, Ns, first_tiles):
  """Adds each column tile's partials (one gather-and-sum) and lays each weight's tiles out along its N
  (its last tile ends at N)."""
  P, Q, M, TN = out_PQMN.shape
  by_tile = [[] for _ in range(first_tiles[-1])]
  for p, q, j in segments:
    by_tile[j].append(p * Q + q)
  C = max(len(rows) for rows in by_tile)
  rows_JC = np.array([rows + [P * Q] * (C - len(rows)) for rows in by_tile], np.int32)  # P Q: out of range, reads 0
  parts_JCMN = jnp.take(out_PQMN.reshape(P * Q, M, TN), rows_JC, axis=0, mode="fill", fill_value=0)
  tiles_JMN = parts_JCMN.sum(axis=1)
  ys = []
  for N, j0, j1 in zip(Ns, first_tiles[:-1], first_tiles[1:]):
    NT = j1 - j0
    if N % TN == 0:  # no overlapping last tile: no concatenate, which would keep XLA from fusing the sum onward
      ys.append(jnp.transpose(tiles_JMN[j0:j1], (1, 0, 2)).reshape(M, N))
      continue
    y_MN = jnp.transpose(tiles_JMN[j0 : j1 - 1], (1, 0, 2)).reshape(M, (NT - 1) * TN)
    last_MN = tiles_JMN[j1 - 1][:, (NT - 1) * TN - (N - TN) :]
    ys.append(jnp.concatenate([y_MN, last_MN], axis=1))
  return ys


def layer_matmul(x_MK: jax.Array, w_LKN: jax.Array, layer, *, norm=None, out_dtype=None, interpret=False) -> jax.Array:
  """x @ w[layer] in float32, reading w[layer] in place: [M, K] x [L, K, N] -> [M, N] float32.

  Same function as `jnp.einsum("MK,KN->MN", x, w[layer], preferred_element_type=jnp.float32)`;
  `layer` is an int or an int32 scalar (may be traced; clamped to [0, L) as indexing does).
  `norm`: None, or (scale stack [L', K], eps, offset): then x is first rms_norm(x, scale[layer], eps, offset),
  computed in the kernel (see `norm_supported`).
  `out_dtype`: where given and every column tile's sum lies in one block (no partials to add), the
  result comes in this dtype, rounded from the float32 sum in the kernel (a caller that rounds anyway
  then needs no XLA kernel for it); otherwise float32.
  `interpret`: True (or an InterpretGPUParams) runs the kernel in Mosaic GPU interpret mode.
  """
  return _layer_matmuls(x_MK, [w_LKN], layer, norm=norm, out_dtype=out_dtype, interpret=interpret)[0]


def layer_matmuls(x_MK: jax.Array, ws_LKN, layer, *, norm=None, out_dtype=None, interpret=False) -> list[jax.Array]:
  """[x @ w[layer] for w in ws_LKN] in one kernel launch; the weights share L and K. Float32, or out_dtype
  as `layer_matmul` says; norm as it says."""
  return _layer_matmuls(x_MK, list(ws_LKN), layer, norm=norm, out_dtype=out_dtype, interpret=interpret)


def _layer_matmuls(x_MK, ws_LKN, layer, *, norm=None, out_dtype=None, interpret=False, block_n=None, block_k=None,
                   stages=None, blocks=None):
  """`layer_matmuls` with its tiling open to tuning (None: the module's settings)."""
  TN, TK = block_n or BLOCK_N, block_k or (BLOCK_K if norm is None else NORM_BLOCK_K)
  stages = stages or (STAGES if norm is None else NORM_STAGES)
  M, K = x_MK.shape
  L = ws_LKN[0].shape[0]
  Ns = [w.shape[2] for w in ws_LKN]
  shapes = f"x {x_MK.shape}, w {' '.join(str(w.shape) for w in ws_LKN)} (tiles {TK}x{TN})"
  if not 1 <= M <= R or K < TK or K % 8 or TN % 64 or TK % 64 or any(
      w.shape[:2] != (L, K) or w.shape[2] < TN or w.shape[2] % 16 for w in ws_LKN):
    raise ValueError(f"layer_matmul kernel: unsupported shapes {shapes}")
  if x_MK.dtype not in (jnp.bfloat16, jnp.float16) or any(w.dtype != x_MK.dtype for w in ws_LKN):
    raise ValueError(f"layer_matmul kernel: x and w must be bf16 or f16 alike, got {x_MK.dtype}, {[str(w.dtype) for w in ws_LKN]}")
  first_tiles = tuple(np.cumsum([0] + [-(-N // TN) for N in Ns]).tolist())
  if blocks is None:
    blocks = INTERPRET_BLOCKS if interpret else _blocks(first_tiles[-1], -(-K // TK))
  KT, U, P, Q, segments = _plan(K, first_tiles[-1], blocks, TK)
  # Direct: each column tile in one segment (its sum finished in one block), no overlapping last tile.
  direct = (out_dtype is not None and all(N % TN == 0 for N in Ns)
            and sorted(j for _, _, j in segments) == list(range(first_tiles[-1])))
  norm_args = ()
  if norm is None:
    x_MpKp = _layout_x(x_MK, KT, TK)
  else:
    n_LK, eps, offset = norm
    if M > NORM_ROWS or K % 128 or n_LK.ndim != 2 or n_LK.shape[1] != K:
      raise ValueError(f"layer_matmul kernel: no norm for {shapes} and scale {n_LK.shape} (M <= {NORM_ROWS}, "
                       "K a multiple of 128)")
    norm_args, norm = (n_LK.reshape(-1, KT, TK),), (float(eps), float(offset))
    # On the GPU x goes in as it is (TMA reads zeros past its rows); the interpreter wants the rows there.
    x_MpKp = jnp.pad(x_MK, ((0, NORM_ROWS - M), (0, 0))) if interpret else x_MK
  layer_1 = jnp.asarray(layer, jnp.int32).reshape(1)
  kernel = functools.partial(_kernel, U=U, KT=KT, TK=TK, TN=TN, P=P, stages=stages, swizzle=_swizzle(Ns, x_MK.dtype),
                             first_tiles=first_tiles, direct=direct, norm=norm, interpret=bool(interpret))
  out = plgpu.kernel(
      kernel,
      out_type=jax.ShapeDtypeStruct((M, first_tiles[-1] * TN) if direct else (P, Q, M, TN),
                                    out_dtype if direct else jnp.float32),
      grid=(P,),
      grid_names=("p",),
      interpret=interpret_params(interpret),
  )(layer_1, x_MpKp, *norm_args, *ws_LKN)
  if direct:
    return [out[:, j0 * TN : j0 * TN + N] for N, j0 in zip(Ns, first_tiles)]
  return _combine(out, segments, Ns, first_tiles)
