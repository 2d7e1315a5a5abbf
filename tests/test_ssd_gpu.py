"""The Mosaic GPU SSD scan (xlazoo.ops.pallas.ssd_gpu) against the einsum reference (xlazoo.ops.ssd).

Ragged T, an initial state or none, groups 1 and 2, state sizes 64 and 128, float32 (in the
interpreter only, tolerance 1e-5) and 16-bit inputs (against the reference on the same values in
float32; tolerance 2e-2), padding steps with dt = 0. On the CPU the kernel runs in the Mosaic GPU
interpreter, whose matrix products are jnp.dot on the SMEM tiles (see `hopper.Ops`); the lowering of the
compiled path (wgmma with a transposed or register operand, register layouts) is checked separately.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from tests.mosaic_gpu import AVAILABLE, INTERPRET, ON_GPU
from xlazoo.ops import ssd as ssd_ops
from xlazoo.ops.pallas import ssd_gpu

if not AVAILABLE:
  pytest.skip("no GPU and no Mosaic GPU interpreter in this JAX", allow_module_level=True)

pytestmark = pytest.mark.usefixtures("mosaic_gpu_interpreter")

# wgmma transposes 16-bit operands only, so float32 runs in the interpreter alone; on the GPU the tests
# that would use it take bfloat16 and the 16-bit tolerance.
EXACT, EXACT_TOL = (jnp.bfloat16, 2e-2) if ON_GPU else (jnp.float32, 1e-5)


def _inputs(Bsz, T, N, G, Q, dtype, seed, init=True, P=64):
  k = jax.random.split(jax.random.key(seed), 7)
  x = jax.random.normal(k[0], (Bsz, T, N, P), jnp.float32).astype(dtype)
  dt = jax.random.uniform(k[1], (Bsz, T, N), jnp.float32, 0.001, 0.3)
  A = -jax.random.uniform(k[2], (N,), jnp.float32, 0.5, 8.0)
  B = jax.random.normal(k[3], (Bsz, T, G, Q), jnp.float32).astype(dtype)
  C = jax.random.normal(k[4], (Bsz, T, G, Q), jnp.float32).astype(dtype)
  h0 = jax.random.normal(k[5], (Bsz, N, P, Q), jnp.float32) if init else None
  D = jax.random.normal(k[6], (N,), jnp.float32)
  return x, dt, A, B, C, h0, D


def _rel(x, ref):
  x, ref = np.asarray(x, np.float32), np.asarray(ref, np.float32)
  return float(np.abs(x - ref).max() / np.abs(ref).max())


def _check(x, dt, A, B, C, h0, D):
  f32 = lambda a: a.astype(jnp.float32)  # noqa: E731
  y_ref, h_ref = ssd_ops.ssd_reference(f32(x), dt, A, f32(B), f32(C), chunk=32, state_BNPQ=h0, D_N=D)
  y, h = jax.jit(lambda *a: ssd_gpu.ssd(*a, interpret=INTERPRET))(x, dt, A, B, C, h0, D)
  assert y.shape == x.shape and y.dtype == x.dtype and h.dtype == jnp.float32 and h.shape == h_ref.shape
  tol = 1e-5 if x.dtype == jnp.float32 else 2e-2
  assert _rel(y, y_ref) < tol and _rel(h, h_ref) < tol, (_rel(y, y_ref), _rel(h, h_ref))


# (B, T, N, G, Q, dtype, init): T = 1 and ragged tails; 150 = two chunks and a part (3 chunks: the SMEM
# ring of 3 slots fills); 257 wraps around it.
CASES = [
    pytest.param(1, 1, 1, 1, 64, jnp.float32, True, id="f32-T1-init"),
    pytest.param(1, 150, 2, 1, 128, jnp.float32, True, id="f32-T150-Q128-init"),
    pytest.param(2, 100, 4, 2, 64, jnp.float32, False, id="f32-T100-batch2-groups2"),
    pytest.param(1, 257, 2, 1, 128, jnp.bfloat16, True, id="bf16-T257-Q128-init"),
    pytest.param(1, 64, 2, 2, 64, jnp.float16, False, id="f16-T64-groups2"),
]


@pytest.mark.parametrize("Bsz,T,N,G,Q,dtype,init", CASES)
def test_matches_reference(Bsz, T, N, G, Q, dtype, init):
  if dtype == jnp.float32:
    dtype = EXACT
  _check(*_inputs(Bsz, T, N, G, Q, dtype, seed=T, init=init))


def test_padding_steps_leave_the_state():
  """dt = 0 past each row's length (how the models pad a batch): the final state is the state at the
  row's length, as a scan of the row alone gives it."""
  x, dt, A, B, C, h0, _ = _inputs(2, 90, 2, 1, 64, EXACT, seed=3)
  lengths = jnp.array([90, 37])
  dt = jnp.where(jnp.arange(90)[None, :, None] < lengths[:, None, None], dt, 0.0)
  _, h = ssd_gpu.ssd(x, dt, A, B, C, h0, interpret=INTERPRET)
  f32 = lambda a: a[1:, :37].astype(jnp.float32)  # noqa: E731
  _, h_alone = ssd_ops.ssd_reference(f32(x), f32(dt), A, f32(B), f32(C), chunk=16, state_BNPQ=h0[1:])
  assert _rel(h[1:], h_alone) < EXACT_TOL


@pytest.mark.skipif(not ON_GPU, reason="the large case takes minutes in the interpreter")
def test_large_on_gpu():
  _check(*_inputs(1, 4096 + 37, 8, 1, 128, jnp.bfloat16, seed=1))
  _check(*_inputs(2, 2048, 8, 2, 64, jnp.bfloat16, seed=2, init=False))


@pytest.mark.parametrize("Q", [64, 128])
def test_lowers_to_mosaic_gpu(Q):
  """The compiled path that the interpreter does not run lowers to one Mosaic GPU kernel, also on a
  CPU-only machine."""
  S = jax.ShapeDtypeStruct
  args = (S((2, 200, 8, 64), jnp.bfloat16), S((2, 200, 8), jnp.float32), S((8,), jnp.float32),
          S((2, 200, 2, Q), jnp.bfloat16), S((2, 200, 2, Q), jnp.bfloat16), S((2, 8, 64, Q), jnp.float32))
  lowered = jax.jit(ssd_gpu.ssd).trace(*args).lower(lowering_platforms=("cuda",))
  assert lowered.as_text().count("custom_call @mosaic_gpu") == 1


def test_supported(monkeypatch):
  x = jnp.zeros((1, 8, 4, 64), jnp.bfloat16)
  B = jnp.zeros((1, 8, 2, 128), jnp.bfloat16)
  assert ssd_gpu.supported(x, B) == ON_GPU
  monkeypatch.setattr(ssd_gpu, "on_hopper", lambda: True)  # the shape rules, on any machine
  assert ssd_gpu.supported(x, B) and ssd_gpu.supported(x.astype(jnp.float16), B.astype(jnp.float16))
  assert ssd_gpu.supported(x, B[..., :64])
  assert not ssd_gpu.supported(x.astype(jnp.float32), B.astype(jnp.float32))
  assert not ssd_gpu.supported(x, B.astype(jnp.float32))
  assert not ssd_gpu.supported(x[..., :32], B)  # P != 64
  assert not ssd_gpu.supported(x, jnp.zeros((1, 8, 2, 256), jnp.bfloat16))  # Q = 256: too many registers
  assert not ssd_gpu.supported(x[:, :, :3], B)  # N % G != 0
  assert not ssd_gpu.supported(x[0], B[0])


def test_ssd_dispatch_and_gradients(monkeypatch):
  """ops.ssd.ssd takes the kernel where it is enabled and supported; its gradients are the reference's."""
  calls = []
  kernel = ssd_gpu.ssd
  monkeypatch.setattr(ssd_gpu, "ENABLED", True)
  monkeypatch.setattr(ssd_gpu, "supported", lambda x, B: True)
  monkeypatch.setattr(ssd_gpu, "ssd", lambda *a: calls.append(1) or kernel(*a, interpret=INTERPRET))
  x, dt, A, B, C, h0, D = _inputs(1, 70, 2, 1, 64, EXACT, seed=5)
  dy = jax.random.normal(jax.random.key(6), x.shape)

  def loss(fn):
    def f(*args):
      y, h = fn(*args[:5], chunk=32, state_BNPQ=args[5], D_N=args[6])
      return (y * dy).sum() + h.sum(), (y, h)
    return jax.grad(f, argnums=tuple(range(7)), has_aux=True)(x, dt, A, B, C, h0, D)

  grads, outs = loss(ssd_ops.ssd)
  assert calls
  ref_grads, ref_outs = loss(ssd_ops.ssd_reference)
  for out, out_ref in zip(outs, ref_outs, strict=True):
    assert _rel(out, out_ref) < EXACT_TOL
  for g, g_ref in zip(grads, ref_grads, strict=True):  # the same backward on the same values
    assert _rel(g, g_ref) < EXACT_TOL
