"""A decode step of a whole Mamba-2 layer stack for one sequence, in one persistent Pallas Mosaic GPU kernel (Hopper).

Dimensions (this file's letters): D model width, Z in_proj's width (z, x B C, dt, padding), I = N P inner width, N
heads of P = 64 channels, Q state size, E = I + 2 Q conv channels (one group), W conv width, L layers; TK x TN a
weight tile, S ring slots, NB blocks (one per SM).

Computes, for l = 0 .. L-1, on the residual h (float32):

    zx = rms_norm(h, norm_w[l]) @ w_in[l]
    y, conv[l], ssm[l] = the mixer step on zx (conv, silu, dt, state update, y = h C + D x; as
                         `xlazoo.ops.ssd.mixer_step_reference`), g = y silu(z)
    h = h + rms_norm(g, gate_norm_w[l]) @ w_out[l]

Why one kernel: a decode step streams every layer's weights once (80 MB a layer at the 2.7B shape), and a step of
separate kernels loses time at every kernel boundary (ramp-up and tail of each GEMV, the small kernels between
them, the layer loop's own overhead: 47 us a layer against the 28 that the bytes need). Here one producer
warpgroup a block streams its share of every layer's in_proj and out_proj tiles, back to back, through a ring of
S SMEM slots, and never waits for the computation except for a free slot. The consumer warpgroup runs the layer's
three phases, separated by grid barriers on a global semaphore; each block signals as soon as its writes are done
and waits only where it needs the others' (loads that do not depend on them go in between).

  A. in_proj: a block's units are consecutive tiles of one or two K tiles' rows, so it needs the x operand of only
     those K tiles: x = h nw (the norm's scale), and 1 / rms(h) (the block reads all of h for it) scales each
     unit's partial sum instead of x. Each unit's partial sum (wgmma, swap-AB: acc [TN, 8] = w^T x^T, column 0) is
     added into zx (float32, GMEM) by a TMA reduce-add; zx is double-buffered by layer parity, and phase B zeroes
     the other buffer.
  B. the mixer step, one head a block (N <= NB): the conv of the head's x channels and of the group's B and C, the
     state update (the state [P, Q] in registers), and g = y silu(z), written to GMEM in the activations' dtype
     with the head's sum of g^2; then the signal, and only then the state and the head's x channels' conv window
     are written in place (the signal's release would wait for those writes). The state goes back by a TMA store
     from SMEM: 32 KiB of stores from registers would queue ahead of phase C's loads. What the step reads that does not
     depend on A (the state, the conv's old window, taps and bias, the scalars dt_bias, A_log, D) comes by TMA into
     SMEM, issued at the layer's start: a read from HBM queues behind the weight stream for several microseconds,
     which A's matmul hides (loads into registers would not: the barriers' fences wait for them). The B and C
     window, which every head reads, is written by block 0 after the next barrier.
  C. out_proj: x = g gnw for the block's K tiles, and 1 / rms(g), from the heads' sums of g^2, scales each
     partial sum, added into the residual h (float32) by a TMA reduce-add.

While the consumer waits at a barrier or runs the step, the producer keeps filling the ring with the next
phase's tiles, so the stream does not stop.

The x operand: row 0 of an [8, TK] tile (swap-AB puts x in the wgmma's N = 8 columns; rows 1..7 stay zero). In
the 128-byte swizzle a tile's row 0 is stored unpermuted, so the consumer writes it through an untransformed
view of the same SMEM (a RefUnion) with plain vector stores. One sequence only: a batch of M rows would need the
swizzle's permutation of rows 1..7 and M steps a head.

Rounding differs from the layer-by-layer path: the residual stays float32 (the model's is in the activations'
dtype), the norms' 1 / rms multiply the float32 sums rather than the 16-bit operands, and the partial sums are
added in any order (not bitwise deterministic).

Time (H100, the 2.7B shape, 64 layers): the kernel 2.18 to 2.20 ms in a trace (34 us a layer; a TMA stream of the
same weights alone takes 29 to 31); the model's whole decode step about 2.29 ms with it (benchmarks/RESULTS.md,
"Decode, fourteenth session").
"""

import functools

import jax
import jax.experimental.pallas as pl
import jax.experimental.pallas.mosaic_gpu as plgpu
import jax.numpy as jnp
from jax import lax

from xlazoo.ops.pallas import on_hopper
from xlazoo.ops.pallas.hopper import tile

TK, TN = 64, 128  # weight tiles (16 KiB of bf16)
ENABLED = True  # hybrid.forward's decode step uses the kernel where `supported` (False: the layer-by-layer path)
SLOTS = 11  # ring slots: 176 KiB (12 or 13 were no faster at the 2.7B shape)
SMEM_BYTES = 225 * 1024  # of the 227 KiB a block may have on Hopper, with room for what Mosaic GPU adds
XR = 8  # rows of an x tile: the wgmma's N in swap-AB; row 0 is the token
P_ = 64  # head dim
f32 = jnp.float32
T = lambda ref: plgpu.transpose_ref(ref, (1, 0))  # noqa: E731


def _blocks() -> int:
  return int(getattr(jax.devices()[0], "core_count", 0) or 132)


def supported(h_MD, w_in_LDZ, w_out_LID, conv_LBWE, ssm_LBNPQ, groups: int) -> bool:
  """Whether `step` handles these on this backend: Hopper, one sequence, bf16 or f16 weights and conv state, one
  group, P = 64, Q of 64 or 128, widths in whole tiles, no more heads than SMs, and a block's buffers in SMEM."""
  if h_MD.ndim != 2 or w_in_LDZ.ndim != 3 or w_out_LID.ndim != 3 or conv_LBWE.ndim != 4 or ssm_LBNPQ.ndim != 5:
    return False
  L, D, Z = w_in_LDZ.shape
  _, Bsz, N, P, Q = ssm_LBNPQ.shape
  dtype = w_in_LDZ.dtype
  return (on_hopper() and h_MD.shape == (1, D) and Bsz == 1 and groups == 1 and P == P_ and Q in (64, 128)
          and dtype in (jnp.bfloat16, jnp.float16) and w_out_LID.dtype == dtype and conv_LBWE.dtype == dtype
          and ssm_LBNPQ.dtype == f32 and w_out_LID.shape == (L, N * P, D) and D % TN == 0 and Z % TN == 0
          and conv_LBWE.shape[0] == L and conv_LBWE.shape[2] >= 1 and N <= _blocks() and Z // TN <= _blocks()
          and _smem_bytes(D, Z, N, Q, conv_LBWE.shape[2] + 1) <= SMEM_BYTES)


def _smem_bytes(D, Z, N, Q, W):
  """An upper bound on the SMEM a block uses (16-bit weights; conv taps and bias of up to 4 bytes)."""
  NC, NS = 1 + 2 * Q // P_, _ns(N)
  ring_x = SLOTS * TK * TN + max(_x_tiles(D, Z, N * P_, _blocks())) * XR * TK
  small = 4 * (2 * Q + 2 * TN + 3 * NS) + NC * P_ * (2 * (W - 1) + 4 * (W + 1)) + 8 * (2 * SLOTS + 1)
  return 2 * ring_x + 4 * P_ * Q + small


def _ns(N):
  """A layer's row of each scalar (dt_bias, A_log, D): Mosaic GPU's copies move multiples of 128 bytes."""
  return -(-N // 32) * 32


def _kj(u, JT):
  """Unit u's (K tile, column tile): a block's units walk a K tile's column tiles in a row."""
  k = u // JT
  return k, u - k * JT


def _x_tiles(D, Z, I, NB):
  """The most x tiles (K tiles) a block needs in phase A (in_proj) and in phase C (out_proj)."""
  def most(KT, JT):
    U = KT * JT
    spans = [(p * U // NB, (p + 1) * U // NB) for p in range(NB)]
    return max((u1 - 1) // JT - u0 // JT + 1 for u0, u1 in spans if u1 > u0)
  return most(D // TK, Z // TN), most(I // TK, D // TN)


def _units(p, U, NB):
  return lax.div(p * U, NB), lax.div((p + 1) * U, NB)


def _kernel(work_ref, nw_ref, win_ref, cw_ref, cb_ref, gnw_ref, wout_ref, conv_ref, ssm_ref, g_ref, ss_ref,
            ring, ready, free, xs, bc_smem, sums, st_smem, win_smem, taps_smem, bias_smem, sc_smem, pre_bar, *, NB, S,
            eps, gn_eps):
  x_tiles, x_raw = xs  # the x operand's two views of one SMEM region
  p, wg = lax.axis_index("p"), lax.axis_index("wg")
  L, D, Z = win_ref.shape
  I = wout_ref.shape[1]
  N, P, Q = ssm_ref.shape[2:]
  NS = sc_smem.shape[1]
  h_ref = work_ref.at[pl.ds(0, D)]
  zx = lambda s, c, n: work_ref.at[pl.ds(D + s * Z + c, n)]  # noqa: E731  (zx's buffer s, columns c .. c + n)
  W, E = cw_ref.shape[1:]
  dtype = win_ref.dtype
  KA, KC = D // TK, I // TK  # K tiles of in_proj and out_proj
  JA, JC = Z // TN, D // TN  # their column tiles
  UA, UC = KA * JA, KC * JC  # their units (weight tiles)
  phases = ((win_ref, JA), (wout_ref, JC))  # what the producer streams

  @pl.when(wg == 1)
  def _producer():
    plgpu.set_max_registers(40, action="decrease")
    # The block's tiles in stream order, t = l (nA + nC) + i: its units of phase A, then of phase C, layer by layer.
    (a0, a1), (c0, c1) = _units(p, UA, NB), _units(p, UC, NB)
    nA, per = a1 - a0, a1 - a0 + c1 - c0
    total = L * per

    def at(t, op):  # op(the weight tile t of the block's stream)
      l = lax.div(t, per)
      i = t - l * per
      for (w_ref, JT), u, cond in ((phases[0], a0 + i, i < nA), (phases[1], c0 + i - nA, i >= nA)):
        k, j = _kj(u, JT)
        pl.when(cond)(lambda w_ref=w_ref, k=k, j=j: op(w_ref.at[l, pl.ds(k * TK, TK), pl.ds(j * TN, TN)]))

    @pl.loop(0, total)
    def _(t):
      s = lax.rem(t, S)
      pl.when(t >= S)(lambda: plgpu.barrier_wait(free.at[s]))
      at(t, lambda src: plgpu.copy_gmem_to_smem(src, ring.at[s], ready.at[s]))

    @pl.loop(jnp.maximum(total - S, 0), total)
    def _(i):
      plgpu.barrier_wait(free.at[lax.rem(i, S)])

  @pl.when(wg == 0)
  def _consumer():
    count = pl.get_global(plgpu.SemaphoreType.REGULAR)
    done = pl.get_global(plgpu.SemaphoreType.REGULAR)

    # Grid barrier k (from 1 in a call): every block signals once its writes for it are done, then wait(k) until all
    # have signalled k times. Loads that do not depend on the other blocks go between the two.
    def signal():
      plgpu.commit_smem()  # a warpgroup barrier first: one thread's release then covers the others' writes
      plgpu.semaphore_signal(count, 1, memory_scope="gpu")

    def wait(k):
      plgpu.semaphore_wait(count, NB * k, decrement=False, memory_scope="gpu")

    zeros = lambda: plgpu.layout_cast(jnp.zeros((TN,), f32), plgpu.Layout.WG_STRIDED((TN,), vec_size=1))  # noqa: E731
    rows = plgpu.Layout.WGMMA.reduce(1)  # a [64] vector along a [64, X] tile's rows (two values a thread)
    cols = plgpu.Layout.WGMMA.reduce(0)

    def load(ref, layout=rows, smem=False):  # as float32
      return plgpu.load(ref, (), layout=layout, optimized=smem).astype(f32)

    def rstd(vectors, n, eps):  # 1 / rms of n values, given as [64] chunks
      return lax.rsqrt(jnp.sum(sum(v * v for v in vectors)) / n + eps)

    def k_tiles(KT, JT, XN):  # the K tile of each of the block's x tiles in a phase (the last repeated)
      u0, u1 = _units(p, KT * JT, NB)
      return [jnp.minimum(u0 // JT + i, jnp.maximum(u1 - 1, u0) // JT) for i in range(XN)]

    def operands(values):  # x tile i (row 0) = values[i]: loaded before the first store, so all are in flight
      x_raw[...] = jnp.zeros(x_raw.shape, dtype)  # rows 1..7 zero
      plgpu.commit_smem()
      for i, v in enumerate(values):
        x_raw[i, 0, :] = v.astype(dtype)
      plgpu.commit_smem()

    def matmul(t, KT, JT, out, scale):  # the block's units of one phase; scale times each partial, added into out
      u0, u1 = _units(p, KT * JT, NB)

      def unit(u, t):
        k, j = _kj(u, JT)
        slot = lax.rem(t, S)

        def product(acc_ref):
          plgpu.barrier_wait(ready.at[slot])
          plgpu.wgmma(acc_ref, T(ring.at[slot]), T(x_tiles.at[k - u0 // JT]))
          plgpu.wgmma_wait(0)
          plgpu.barrier_arrive(free.at[slot])
          return acc_ref[...]

        acc = pl.run_scoped(product, plgpu.ACC((TN, XR), f32))
        b = lax.rem(u, 2)
        plgpu.wait_smem_to_gmem(1, wait_read_only=True)  # the sum that used this buffer two units ago was read
        sums[b] = acc.sum(axis=1) * scale  # x's rows 1..7 are zero: the sum is column 0
        plgpu.commit_smem()
        plgpu.copy_smem_to_gmem(sums.at[b], out.at[pl.ds(j * TN, TN)], reduction_op="add")
        return t + 1

      t = lax.fori_loop(u0, u1, unit, t)
      plgpu.wait_smem_to_gmem(0)  # the sums are in GMEM before the barrier's signal
      return t

    silu = lambda v: v / (1.0 + jnp.exp(-v))  # noqa: E731

    def put_window(l, c, window):  # the conv state's new window of channels c .. c + P
      for w in range(W - 1):
        conv_ref[l, 0, w, pl.ds(c, P)] = window[w].astype(conv_ref.dtype)

    bc_chunks = [(I + i * Q + j, i, j) for i in (0, 1) for j in range(0, Q, P)]
    XA, XC = _x_tiles(D, Z, I, NB)

    def layer(l, t):
      s = lax.rem(l, 2)  # zx's buffer
      # B's reads that do not depend on A, by TMA into SMEM while A runs (see the module docstring).
      n = p
      chunks = [(n * P, None, 0)] + bc_chunks

      @pl.when(p < N)
      def _():
        plgpu.commit_smem()  # the last layer's reads of these buffers are done
        plgpu.wait_smem_to_gmem(0, wait_read_only=True)  # and the TMA store of its state
        copy = lambda src, dst: plgpu.copy_gmem_to_smem(src, dst, pre_bar.at[0])  # noqa: E731
        copy(ssm_ref.at[l, 0, n], st_smem)
        for i in range(3):
          copy(work_ref.at[pl.ds(D + 2 * Z + (3 * l + i) * NS, NS)], sc_smem.at[i])
        for i, (c, _, _) in enumerate(chunks):
          copy(conv_ref.at[l, 0, :, pl.ds(c, P)], win_smem.at[i])
          copy(cw_ref.at[l, :, pl.ds(c, P)], taps_smem.at[i])
          copy(cb_ref.at[l, pl.ds(c, P)], bias_smem.at[i])

      # A. in_proj on rms_norm(h) = r h nw: x = h nw, and r scales the partial sums.
      ks = k_tiles(KA, JA, XA)
      nws = [load(nw_ref.at[l, pl.ds(k * TK, TK)]) for k in ks]
      wait(3 * l)  # the last layer's residual is complete
      hs = [load(h_ref.at[pl.ds(c * P, P)]) for c in range(D // P)]
      operands([load(h_ref.at[pl.ds(k * TK, TK)]) * w for k, w in zip(ks, nws)])
      t = matmul(t, KA, JA, zx(s, 0, Z), rstd(hs, D, eps))
      signal()

      # B. the mixer step, one head a block (blocks < N); zx's other buffer zeroed for the next layer.
      @pl.when(p < Z // TN)
      def _():
        zx(1 - s, p * TN, TN)[...] = zeros()

      # (rounded, as the layer-by-layer path has in_proj's output)
      new_zx = lambda c: load(zx(s, c, P)).astype(dtype).astype(f32)  # noqa: E731

      @pl.when(p < N)
      def _():
        plgpu.barrier_wait(pre_bar.at[0])
        st = load(st_smem, plgpu.Layout.WGMMA, smem=True)
        old = [([load(win_smem.at[i, w]) for w in range(W - 1)], [load(taps_smem.at[i, w]) for w in range(W)],
                load(bias_smem.at[i])) for i in range(len(chunks))]
        dtb, alog, Dn = sc_smem[0, n], sc_smem[1, n], sc_smem[2, n]
        wait(3 * l + 1)
        z = new_zx(n * P)
        inputs = [new_zx(I + c) for c, _, _ in chunks]
        dt = work_ref[D + s * Z + I + E + n].astype(dtype).astype(f32) + dtb
        dt = jnp.maximum(dt, 0.0) + jnp.log(1.0 + jnp.exp(-jnp.abs(dt)))  # softplus
        decay = jnp.exp(-dt * jnp.exp(alog))
        x, bc_windows = None, []
        for (c, i, j), (window, taps, bias), new in zip(chunks, old, inputs):
          window = window + [new]
          v = silu(sum(tp * w for tp, w in zip(taps, window)) + bias).astype(dtype).astype(f32)
          if i is None:
            x, x_window = v, (c, window[1:])
          else:
            bc_smem[i, pl.ds(j, P)] = v
            bc_windows.append((c, window[1:]))
        plgpu.commit_smem()
        B, C = load(bc_smem.at[0], cols, smem=True), load(bc_smem.at[1], cols, smem=True)
        bcast = lambda v, dim: lax.broadcast_in_dim(v, (P, Q), [dim])  # noqa: E731
        st = st * decay + bcast(x * dt, 0) * bcast(B, 1)
        y = (st * bcast(C, 1)).sum(axis=1) + Dn * x
        g = (y.astype(dtype).astype(f32) * silu(z)).astype(dtype)
        g_ref[pl.ds(n * P, P)] = g
        g = g.astype(f32)
        ss_ref[n] = jnp.sum(g * g)  # the gated norm's sum of squares, this head's share
        signal()
        # The caches' writes after the signal, whose release would otherwise wait for them.
        st_smem[...] = st
        plgpu.commit_smem()
        plgpu.copy_smem_to_gmem(st_smem, ssm_ref.at[l, 0, n])
        put_window(l, *x_window)

        @pl.when(p == 0)  # the B and C window's new state, once every head has read the old one
        def _():
          wait(3 * l + 2)
          for c, window in bc_windows:
            put_window(l, c, window)

      @pl.when(p >= N)
      def _():
        wait(3 * l + 1)
        signal()

      kc = k_tiles(KC, JC, XC)
      gnws = [load(gnw_ref.at[l, pl.ds(k * TK, TK)]) for k in kc]
      wait(3 * l + 2)

      # C. out_proj on rms_norm(g) = r g gnw: x = g gnw, and r scales the partial sums.
      sq = [load(ss_ref.at[pl.ds(c, P)]) for c in range(0, ss_ref.shape[0], P)]
      operands([load(g_ref.at[pl.ds(k * TK, TK)]) * w for k, w in zip(kc, gnws)])
      r = lax.rsqrt(jnp.sum(sum(sq)) / I + gn_eps)
      t = matmul(t, KC, JC, h_ref, r)
      signal()

      return t

    @pl.when(p == NB - 1)
    def _():  # the sums' padding, zeroed before layer 0's first barrier (the heads write theirs after it)
      if ss_ref.shape[0] > N:
        ss_ref[pl.ds(ss_ref.shape[0] - TN, TN)] = zeros()

    lax.fori_loop(0, L, layer, jnp.int32(0))
    plgpu.wait_smem_to_gmem(0)
    # Every block is past its last wait: the count back to 0 for the next call.
    plgpu.semaphore_signal(done, 1, memory_scope="gpu")

    @pl.when(p == 0)
    def _():
      plgpu.semaphore_wait(done, NB, memory_scope="gpu")
      plgpu.semaphore_signal(count, -NB * 3 * L, memory_scope="gpu")


def step(h_D, norm_w_LD, w_in_LDZ, conv_w_LWE, conv_b_LE, dt_bias_LN, A_log_LN, D_LN, gate_norm_w_LI, w_out_LID,
         conv_LBWE, ssm_LBNPQ, *, eps: float, gate_norm_eps: float):
  """(h [D] float32 after the L layers, the conv stack, the SSM stack), both stacks stepped; see the module
  docstring and `supported`. h_D: the residual entering layer 0 (any float dtype); the conv bias is required (zeros
  where a model has none)."""
  L, D, Z = w_in_LDZ.shape
  N, P, Q = ssm_LBNPQ.shape[2:]
  NB = _blocks()
  dtype = w_in_LDZ.dtype
  XS = max(_x_tiles(D, Z, N * P, NB))
  W = conv_w_LWE.shape[1]
  NC = 1 + 2 * Q // P  # the conv's chunks a head reads: its x channels, and B and C
  NS = _ns(N)
  scalars = jnp.pad(jnp.stack([dt_bias_LN, A_log_LN, D_LN], 1).astype(f32), ((0, 0), (0, 0), (0, NS - N)))
  # One float32 buffer, made by one fusion: the residual, zx's two buffers (zeros), each layer's scalars.
  work = jnp.concatenate([h_D.astype(f32), jnp.zeros((2 * Z,), f32), scalars.reshape(-1)])
  work_ref = jax.new_ref(work, memory_space=plgpu.GMEM)
  conv_ref = jax.new_ref(conv_LBWE, memory_space=plgpu.GMEM)
  ssm_ref = jax.new_ref(ssm_LBNPQ, memory_space=plgpu.GMEM)
  body = functools.partial(_kernel, NB=NB, S=SLOTS, eps=float(eps), gn_eps=float(gate_norm_eps))
  scratch = [
      tile((SLOTS, TK, TN), dtype), plgpu.Barrier(num_barriers=SLOTS), plgpu.Barrier(num_barriers=SLOTS),
      plgpu.RefUnion(tile((XS, XR, TK), dtype), plgpu.SMEM((XS, XR, TK), dtype)),
      plgpu.SMEM((2, Q), f32), plgpu.SMEM((2, TN), f32),
      tile((P, Q), f32), plgpu.SMEM((NC, W - 1, P), conv_LBWE.dtype), plgpu.SMEM((NC, W, P), conv_w_LWE.dtype),
      plgpu.SMEM((NC, P), conv_b_LE.dtype), plgpu.SMEM((3, NS), f32),
      plgpu.Barrier(num_arrivals=4 + 3 * NC, num_barriers=(1,)),
  ]

  def kernel(*refs):
    pl.run_scoped(functools.partial(body, *refs), *scratch, collective_axes="wg")

  # g and its sums of squares a head (padded to whole 128s) live only inside the call.
  out_type = (jax.ShapeDtypeStruct((N * P,), dtype), jax.ShapeDtypeStruct((-(-N // TN) * TN,), f32))
  mesh = plgpu.Mesh(grid=(NB,), grid_names=("p",), num_threads=2, thread_name="wg", kernel_name="mamba2_stack")
  pl.kernel(kernel, out_type=out_type, mesh=mesh, compiler_params=plgpu.CompilerParams(approx_math=True))(
      work_ref, norm_w_LD, w_in_LDZ, conv_w_LWE, conv_b_LE, gate_norm_w_LI, w_out_LID, conv_ref, ssm_ref)
  return work_ref[:D], conv_ref[...], ssm_ref[...]
