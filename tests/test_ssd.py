"""ops/ssd and ops/conv against naive float64 recurrences: the chunked scan (any length, initial and
final state, groups), the one-step update, chunk-size invariance, padding that leaves the state alone."""

import numpy as np
import pytest

from xlazoo.ops.conv import causal_conv, conv_state, conv_step
from xlazoo.ops.ssd import ssd, ssd_step


def naive(x, dt, A, B, C, h0, D=None):
  """h_t = exp(dt_t A) h_{t-1} + dt_t x_t B_t^T, y_t = h_t C_t + D x_t, per head, in float64."""
  Bsz, T, N, P = x.shape
  G = B.shape[2]
  h, ys = h0.astype(np.float64).copy(), np.zeros((Bsz, T, N, P))
  for t in range(T):
    for n in range(N):
      g = n // (N // G)
      h[:, n] = np.exp(dt[:, t, n] * A[n])[:, None, None] * h[:, n] + (dt[:, t, n, None] * x[:, t, n])[:, :, None] * B[:, t, g, None]
      ys[:, t, n] = np.einsum("bpq,bq->bp", h[:, n], C[:, t, g]) + (0 if D is None else D[n] * x[:, t, n])
  return ys, h


def inputs(T, N=4, P=3, G=2, Q=5, Bsz=2, seed=0):
  rng = np.random.default_rng(seed)
  return (
      rng.standard_normal((Bsz, T, N, P)), rng.uniform(0.01, 0.6, (Bsz, T, N)), -rng.uniform(0.5, 6.0, N),
      rng.standard_normal((Bsz, T, G, Q)), rng.standard_normal((Bsz, T, G, Q)), rng.standard_normal((Bsz, N, P, Q)),
  )


def rel(a, b):
  return float(np.abs(np.asarray(a, np.float64) - b).max() / np.abs(b).max())


@pytest.mark.parametrize("T, chunk", [(5, 8), (8, 8), (13, 4), (64, 16)], ids=["below", "equal", "ragged", "many"])
@pytest.mark.parametrize("G", [1, 2, 4])
@pytest.mark.parametrize("with_init", [False, True])
def test_scan_matches_recurrence(T, chunk, G, with_init):
  x, dt, A, B, C, h0 = inputs(T, G=G, seed=T + G)
  D = np.random.default_rng(T).standard_normal(x.shape[2]) if with_init else None  # with and without the skip
  if not with_init:
    h0 = np.zeros_like(h0)
  y_ref, h_ref = naive(x, dt, A, B, C, h0, D)
  y, h = ssd(*(np.float32(v) for v in (x, dt, A, B, C)), chunk=chunk, state_BNPQ=np.float32(h0) if with_init else None,
             D_N=None if D is None else np.float32(D))
  assert y.shape == x.shape and h.shape == h0.shape
  assert rel(y, y_ref) < 1e-5 and rel(h, h_ref) < 1e-5


def test_steps_equal_scan():
  x, dt, A, B, C, h0 = (np.float32(v) for v in inputs(21))
  D = np.float32(np.random.default_rng(1).standard_normal(x.shape[2]))
  y_scan, h_scan = ssd(x, dt, A, B, C, chunk=8, state_BNPQ=h0, D_N=D)
  h, ys = h0, []
  for t in range(21):
    y, h = ssd_step(h, x[:, t], dt[:, t], A, B[:, t], C[:, t], D)
    ys.append(y)
  assert rel(np.stack(ys, 1), np.asarray(y_scan)) < 1e-5 and rel(h, np.asarray(h_scan)) < 1e-5


def test_bfloat16_inputs_use_bfloat16_matmuls_with_float32_state():
  """bf16 x, B, C: the matmuls take bf16 operands; decays and states stay float32, so the error is bf16
  rounding; y comes back in bf16 (the one-step update's too), the state in float32."""
  import jax.numpy as jnp
  x, dt, A, B, C, h0 = inputs(70, N=8, P=16, G=2, Q=16)
  D = np.random.default_rng(2).standard_normal(8)
  bf = lambda v: np.asarray(jnp.asarray(v, jnp.bfloat16), np.float64)  # noqa: E731
  y_ref, h_ref = naive(bf(x), dt, A, bf(B), bf(C), h0, D)
  y, h = ssd(jnp.asarray(x, jnp.bfloat16), np.float32(dt), np.float32(A), jnp.asarray(B, jnp.bfloat16),
             jnp.asarray(C, jnp.bfloat16), chunk=16, state_BNPQ=np.float32(h0), D_N=np.float32(D))
  assert y.dtype == jnp.bfloat16 and h.dtype == jnp.float32
  y1, h1 = ssd_step(h0, jnp.asarray(x[:, 0], jnp.bfloat16), dt[:, 0], A, B[:, 0], C[:, 0], D)
  assert y1.dtype == jnp.bfloat16 and h1.dtype == jnp.float32
  assert rel(y, y_ref) < 2e-2 and rel(h, h_ref) < 2e-2


def test_chunk_size_does_not_change_the_result():
  args = [np.float32(v) for v in inputs(48)]
  y1, h1 = ssd(*args[:5], chunk=48, state_BNPQ=args[5])
  for chunk in (1, 5, 16, 64):
    y, h = ssd(*args[:5], chunk=chunk, state_BNPQ=args[5])
    assert rel(y, np.asarray(y1)) < 1e-5 and rel(h, np.asarray(h1)) < 1e-5


def test_long_chunks_with_strong_decay_keep_precision():
  """Cumulative log-decays reach -1e4 inside a 256-long chunk; the decays between nearby steps
  must still be exact (a difference of two large cumsums would lose them)."""
  x, dt, A, B, C, h0 = inputs(256, seed=3)
  dt = dt * 0 + 2.0
  A = A * 0 - 20.0
  y_ref, h_ref = naive(x, dt, A, B, C, h0)
  y, h = ssd(*(np.float32(v) for v in (x, dt, A, B, C)), chunk=256, state_BNPQ=np.float32(h0))
  assert rel(y, y_ref) < 1e-5


def test_zero_dt_leaves_the_state_unchanged():
  x, dt, A, B, C, h0 = (np.float32(v) for v in inputs(12))
  _, h_short = ssd(x[:, :7], dt[:, :7], A, B[:, :7], C[:, :7], chunk=4, state_BNPQ=h0)
  dt_masked = dt.copy()
  dt_masked[:, 7:] = 0  # positions 7.. are padding
  _, h_padded = ssd(x, dt_masked, A, B, C, chunk=4, state_BNPQ=h0)
  np.testing.assert_allclose(h_padded, h_short, rtol=1e-6, atol=1e-6)


def naive_conv(x, w, b, ctx):
  xp = np.concatenate([ctx, x], 1)
  W, T = w.shape[0], x.shape[1]
  return np.stack([sum(xp[:, t + k] * w[k] for k in range(W)) + b for t in range(T)], 1)


def test_conv_and_state():
  rng = np.random.default_rng(0)
  Bsz, T, F, W = 3, 10, 6, 4
  x, w, b, ctx = rng.standard_normal((Bsz, T, F)), rng.standard_normal((W, F)), rng.standard_normal(F), rng.standard_normal((Bsz, W - 1, F))
  x32, w32, b32, ctx32 = (np.float32(v) for v in (x, w, b, ctx))
  np.testing.assert_allclose(causal_conv(x32, w32, b32), naive_conv(x, w, b, np.zeros_like(ctx)), rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(causal_conv(x32, w32, b32, ctx32), naive_conv(x, w, b, ctx), rtol=1e-5, atol=1e-5)
  # the state after a ragged prefix, then steps, equal the full convolution
  for t in (1, 2, 3):  # fewer inputs than the state holds
    np.testing.assert_allclose(causal_conv(x32[:, :t], w32, b32, ctx32), naive_conv(x[:, :t], w, b, ctx), rtol=1e-5, atol=1e-5)
  lengths = np.array([10, 2, 6])
  for t, n_B in ((T, lengths), (1, np.array([0, 1, 1])), (2, np.array([1, 2, 0]))):
    state = conv_state(x32[:, :t], n_B, W, ctx32)
    for i, n in enumerate(n_B):
      np.testing.assert_array_equal(state[i], np.concatenate([ctx32[i], x32[i]])[n : n + W - 1])
  full = naive_conv(x, w, b, ctx)
  s = conv_state(x32, np.array([3, 3, 3]), W, ctx32)
  for t in range(3, T):
    y, s = conv_step(s, x32[:, t], w32, b32)
    np.testing.assert_allclose(y, full[:, t], rtol=1e-5, atol=1e-5)
