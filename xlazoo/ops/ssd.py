"""Mamba-2's state-space duality (SSD): the chunked scan and the one-step recurrence.

Dimensions: B batch, T sequence, N SSM heads, P head dim, G groups, R heads per group (N = G R),
Q state size, C chunks, and T / S for a target / source position inside one chunk.

Per head n, with a scalar decay a_t = exp(dt_t A_n) < 1, a state h of shape [P, Q] and a skip D_n:
    h_t = a_t h_{t-1} + dt_t x_t B_t^T        y_t = h_t C_t + D_n x_t
The chunked form (Dao & Gu 2024, "Transformers are SSMs", section 6) computes, per chunk of length
T, the quadratic attention-like part inside the chunk, each chunk's contribution to the state at
its end, a short recurrence over the chunk states, and the states' contribution to the outputs.
All of it is einsums; decays, their cumulative sums and the states are float32, and the matmuls take
their operands in the inputs' dtype (bfloat16 runs on the tensor cores) with float32 accumulation. y is
computed in float32 and returned in x's dtype, as mamba_ssm's kernels return it. A step with dt = 0
leaves the state unchanged (that is how padding is kept out of it).

Groups: heads n = g R + r share B and C of group g. B and C stay [.., G, Q] and are broadcast in
the einsums; they are never repeated to N heads.
"""

import jax
import jax.numpy as jnp

from xlazoo.ops.conv import conv_step
from xlazoo.ops.mlp import LayerWeight
from xlazoo.ops.pallas import mixer_step_gpu, ssd_gpu, with_reference_grad

f32 = jnp.float32


def _segsum(a_XT: jax.Array) -> jax.Array:
  """seg[..., t, s] = a[s+1] + ... + a[t] for s <= t (a running sum, not a difference of cumsums,
  so long segments keep their precision); -inf above the diagonal. a: [..., T] -> [..., T, T]."""
  T = a_XT.shape[-1]
  lower = jnp.tril(jnp.ones((T, T), bool), -1)
  a_XTS = jnp.where(lower, a_XT[..., :, None], 0.0)  # a_t at (t, s) for t > s
  seg = jnp.cumsum(a_XTS, axis=-2)
  return jnp.where(jnp.tril(jnp.ones((T, T), bool)), seg, -jnp.inf)


def ssd(
    x_BTNP: jax.Array,
    dt_BTN: jax.Array,
    A_N: jax.Array,
    B_BTGQ: jax.Array,
    C_BTGQ: jax.Array,
    *,
    chunk: int,
    state_BNPQ: jax.Array | None = None,
    D_N: jax.Array | None = None,
) -> tuple[jax.Array, jax.Array]:
  """y [B, T, N, P] (x's dtype) and the final state [B, N, P, Q] (float32), from an optional initial state.

  Any T works: the tail is padded to a whole chunk with dt = 0, which leaves the state unchanged. On a
  Hopper GPU (`ssd_gpu.ENABLED` and `ssd_gpu.supported`) the forward is the fused Pallas scan, with the
  einsum graph's gradient; elsewhere this is `ssd_reference`.
  """
  if ssd_gpu.ENABLED and ssd_gpu.supported(x_BTNP, B_BTGQ):
    if state_BNPQ is None:
      state_BNPQ = jnp.zeros((x_BTNP.shape[0], *x_BTNP.shape[2:], B_BTGQ.shape[3]), f32)
    if D_N is None:
      D_N = jnp.zeros(x_BTNP.shape[2:3], f32)
    return _ssd_kernel(x_BTNP, dt_BTN, A_N, B_BTGQ, C_BTGQ, state_BNPQ, D_N, chunk=chunk)
  return ssd_reference(x_BTNP, dt_BTN, A_N, B_BTGQ, C_BTGQ, chunk=chunk, state_BNPQ=state_BNPQ, D_N=D_N)


# ssd_gpu's entry point looked up at each call (tests wrap it); the kernel has no chunk of its own.
_ssd_kernel = with_reference_grad(lambda *a, chunk: ssd_gpu.ssd(*a), lambda *a, chunk: ssd_reference(
    *a[:5], chunk=chunk, state_BNPQ=a[5], D_N=a[6]))


def ssd_reference(
    x_BTNP: jax.Array,
    dt_BTN: jax.Array,
    A_N: jax.Array,
    B_BTGQ: jax.Array,
    C_BTGQ: jax.Array,
    *,
    chunk: int,
    state_BNPQ: jax.Array | None = None,
    D_N: jax.Array | None = None,
) -> tuple[jax.Array, jax.Array]:
  """`ssd` as einsums over chunks of `chunk` tokens (see the module docstring)."""
  Bsz, T, N, P = x_BTNP.shape
  G, Q = B_BTGQ.shape[2:]
  R = N // G
  pad = -T % chunk
  if pad:
    widths = lambda x: [(0, 0), (0, pad)] + [(0, 0)] * (x.ndim - 2)  # noqa: E731
    x_BTNP, dt_BTN, B_BTGQ, C_BTGQ = (jnp.pad(x, widths(x)) for x in (x_BTNP, dt_BTN, B_BTGQ, C_BTGQ))
  C = (T + pad) // chunk
  mm = x_BTNP.dtype  # the matmuls' operand dtype (float32 accumulation); decays and states stay float32
  x = x_BTNP.astype(f32).reshape(Bsz, C, chunk, G, R, P)
  dt = dt_BTN.astype(f32).reshape(Bsz, C, chunk, G, R)
  Bm = B_BTGQ.astype(mm).reshape(Bsz, C, chunk, G, Q)
  Cm = C_BTGQ.astype(mm).reshape(Bsz, C, chunk, G, Q)
  a_BCGRT = jnp.moveaxis(dt * A_N.astype(f32).reshape(G, R), 2, -1)  # log-decay of each step
  xdt_BCSGRP = x * dt[..., None]
  dot = lambda spec, a, b: jnp.einsum(spec, a.astype(mm), b.astype(mm), preferred_element_type=f32)  # noqa: E731

  # 1. Inside each chunk: y_t = sum_{s<=t} (C_t . B_s) exp(a_{s+1} + ... + a_t) dt_s x_s.
  decay_BCGRTS = jnp.exp(_segsum(a_BCGRT))
  CB_BCGTS = dot("BCTGQ,BCSGQ->BCGTS", Cm, Bm)
  y_BCTGRP = dot("BCGRTS,BCSGRP->BCTGRP", CB_BCGTS[:, :, :, None] * decay_BCGRTS, xdt_BCSGRP)

  # 2. Each chunk's own contribution to the state at its end.
  to_end_BCSGR = jnp.moveaxis(decay_BCGRTS[..., -1, :], -1, 2)
  local_BCGRPQ = dot("BCSGRP,BCSGQ->BCGRPQ", xdt_BCSGRP * to_end_BCSGR[..., None], Bm)

  # 3. The states entering each chunk: a recurrence over chunks, written as one more decay matrix.
  if state_BNPQ is None:
    state_BNPQ = jnp.zeros((Bsz, N, P, Q), f32)
  init_B1GRPQ = state_BNPQ.astype(f32).reshape(Bsz, 1, G, R, P, Q)
  states_BCGRPQ = jnp.concatenate([init_B1GRPQ, local_BCGRPQ], axis=1)  # C + 1 entries
  total_BGRC = jnp.moveaxis(a_BCGRT.sum(-1), 1, -1)
  total_BGRC = jnp.pad(total_BGRC, [(0, 0)] * 3 + [(1, 0)])
  chunk_decay_BGRCS = jnp.exp(_segsum(total_BGRC))  # (C + 1) x (C + 1)
  states_BCGRPQ = jnp.einsum("BGRCS,BSGRPQ->BCGRPQ", chunk_decay_BGRCS, states_BCGRPQ)
  entering_BCGRPQ, final_BGRPQ = states_BCGRPQ[:, :-1], states_BCGRPQ[:, -1]

  # 4. The entering state's contribution: y_t += exp(a_1 + ... + a_t) C_t h_entering.
  from_start_BCTGR = jnp.moveaxis(jnp.exp(jnp.cumsum(a_BCGRT, axis=-1)), -1, 2)
  y_BCTGRP += dot("BCTGQ,BCGRPQ->BCTGRP", Cm, entering_BCGRPQ) * from_start_BCTGR[..., None]

  y_BTNP = y_BCTGRP.reshape(Bsz, C * chunk, N, P)[:, :T]
  if D_N is not None:
    y_BTNP = y_BTNP + D_N.astype(f32)[:, None] * x.reshape(Bsz, C * chunk, N, P)[:, :T]
  return y_BTNP.astype(mm), final_BGRPQ.reshape(Bsz, N, P, Q)


def ssd_step(
    state_BNPQ: jax.Array, x_BNP: jax.Array, dt_BN: jax.Array, A_N: jax.Array, B_BGQ: jax.Array, C_BGQ: jax.Array,
    D_N: jax.Array | None = None,
) -> tuple[jax.Array, jax.Array]:
  """One recurrence step: (y [B, N, P] in x's dtype, the new state [B, N, P, Q] float32)."""
  Bsz, N, P, Q = state_BNPQ.shape
  G = B_BGQ.shape[1]
  R = N // G
  dt_BGR = dt_BN.astype(f32).reshape(Bsz, G, R)
  decay_BGR = jnp.exp(dt_BGR * A_N.astype(f32).reshape(G, R))
  xdt_BGRP = x_BNP.astype(f32).reshape(Bsz, G, R, P) * dt_BGR[..., None]
  state = state_BNPQ.reshape(Bsz, G, R, P, Q) * decay_BGR[..., None, None]
  state = state + jnp.einsum("BGRP,BGQ->BGRPQ", xdt_BGRP, B_BGQ.astype(f32))
  y_BNP = jnp.einsum("BGRPQ,BGQ->BGRP", state, C_BGQ.astype(f32)).reshape(Bsz, N, P)
  if D_N is not None:
    y_BNP = y_BNP + D_N.astype(f32)[:, None] * x_BNP.astype(f32)
  return y_BNP.astype(x_BNP.dtype), state.reshape(Bsz, N, P, Q)


def mixer_step(
    zx_BZ: jax.Array, conv_LBWE: jax.Array, ssm_LBNPQ: jax.Array, layer, conv_w: LayerWeight, conv_b: LayerWeight | None,
    dt_bias: LayerWeight, A_log: LayerWeight, D: LayerWeight, *, groups: int, gate: bool = False,
) -> tuple[jax.Array, jax.Array, jax.Array]:
  """One decode step of the Mamba-2 mixer on layer `layer` of the caches: (y [B, N P] in zx's dtype, the conv
  state stack, the SSM state stack), both stacks with that layer stepped. With `gate`, y silu(z) instead of y
  (in float32 from y in zx's dtype, then rounded to it).

  zx: in_proj's output [B, >= I + E + N] (z, x B C, dt; trailing columns are ignored). The parameters are
  LayerWeights (stacks [K, ...] and their layer; conv_b may be None). On a Hopper GPU, where
  `mixer_step_gpu.ENABLED` and `mixer_step_gpu.supported`, this is one Mosaic GPU kernel; elsewhere
  `mixer_step_reference`.
  """
  if mixer_step_gpu.ENABLED and mixer_step_gpu.supported(zx_BZ, conv_LBWE, ssm_LBNPQ, conv_w.stack):
    y_BI, conv_BWE, ssm_LBNPQ = mixer_step_gpu.step(
        zx_BZ, conv_LBWE, ssm_LBNPQ, layer, conv_w.stack, None if conv_b is None else conv_b.stack, dt_bias.stack,
        A_log.stack, D.stack, conv_w.layer, groups=groups, gate=gate)
    return y_BI, jax.lax.dynamic_update_index_in_dim(conv_LBWE, conv_BWE, layer, 0), ssm_LBNPQ
  return mixer_step_reference(zx_BZ, conv_LBWE, ssm_LBNPQ, layer, conv_w, conv_b, dt_bias, A_log, D, groups=groups,
                              gate=gate)


def mixer_step_reference(zx_BZ, conv_LBWE, ssm_LBNPQ, layer, conv_w, conv_b, dt_bias, A_log, D, *, groups, gate=False):
  """`mixer_step` in jnp: the conv step, silu, then `ssd_step`."""
  Bsz = zx_BZ.shape[0]
  N, P, Q = ssm_LBNPQ.shape[2:]
  I, E, GQ = N * P, conv_LBWE.shape[3], groups * Q
  xbc_BE, new_conv_BWE = conv_step(conv_LBWE[layer], zx_BZ[:, I : I + E], conv_w.get(),
                                   None if conv_b is None else conv_b.get())
  xbc_BE = jax.nn.silu(xbc_BE).astype(zx_BZ.dtype)
  x_BNP = xbc_BE[:, :I].reshape(Bsz, N, P)
  B_BGQ, C_BGQ = (a.reshape(Bsz, groups, Q) for a in (xbc_BE[:, I : I + GQ], xbc_BE[:, I + GQ :]))
  dt_BN = jax.nn.softplus(zx_BZ[:, I + E : I + E + N].astype(f32) + dt_bias.get().astype(f32))
  y_BNP, state_BNPQ = ssd_step(ssm_LBNPQ[layer], x_BNP, dt_BN, -jnp.exp(A_log.get().astype(f32)), B_BGQ, C_BGQ,
                               D.get())
  conv_LBWE = jax.lax.dynamic_update_index_in_dim(conv_LBWE, new_conv_BWE.astype(conv_LBWE.dtype), layer, 0)
  y_BI = y_BNP.reshape(Bsz, I)
  if gate:
    y_BI = (y_BI.astype(f32) * jax.nn.silu(zx_BZ[:, :I].astype(f32))).astype(y_BI.dtype)
  return y_BI, conv_LBWE, jax.lax.dynamic_update_index_in_dim(ssm_LBNPQ, state_BNPQ, layer, 0)
