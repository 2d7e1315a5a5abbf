"""The Mosaic GPU flash attention (xlazoo.ops.pallas.attention_gpu) against the reference attention.

Forward and gradients (dQ, dK, dV), ragged T, GQA groups 1/4/8, H 64 and 128, static and traced windows,
soft-cap. On a GPU (JAX_PLATFORMS=cuda) the compiled kernels run; on the CPU the same kernels run in the
Mosaic GPU interpreter, where the warpgroups, barriers, TMA copies, loop bounds and masks are the real
ones but the matrix products are jnp.dot on the SMEM tiles (the interpreter of JAX 0.10 has no wgmma
with a transposed or register operand; see the kernel's module docstring). float32 runs only in the
interpreter (tolerance 1e-4); on the GPU the float32 cases run in bfloat16 (tolerance 2e-2).
"""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from tests.mosaic_gpu import AVAILABLE, INTERPRET, ON_GPU
from xlazoo.ops.attention import attention, causal_attention
from xlazoo.ops.pallas import attention_gpu

if not AVAILABLE:
  pytest.skip("no GPU and no Mosaic GPU interpreter in this JAX", allow_module_level=True)

pytestmark = pytest.mark.usefixtures("mosaic_gpu_interpreter")


def _rel(x, ref):
  """max|x - ref| / max|ref|; max|x| where ref is all zeros (T = 1: dQ of a lone token is 0)."""
  x, ref = np.asarray(x, np.float32), np.asarray(ref, np.float32)
  return float(np.abs(x - ref).max() / (np.abs(ref).max() or 1.0))


def _inputs(B, T, N, K, H, dtype, seed):
  ks = jax.random.split(jax.random.key(seed), 4)
  q = jax.random.normal(ks[0], (B, T, N, H), jnp.float32).astype(dtype)
  k = jax.random.normal(ks[1], (B, T, K, H), jnp.float32).astype(dtype)
  v = jax.random.normal(ks[2], (B, T, K, H), jnp.float32).astype(dtype)
  do = jax.random.normal(ks[3], (B, T, N, H), jnp.float32).astype(dtype)
  return q, k, v, do


@functools.partial(jax.jit, static_argnames=("window", "softcap", "scale"))
def _reference(q, k, v, do, *, window, softcap, scale):
  """Output and gradients of the reference in float32 (on the inputs as given, upcast)."""
  B, T = q.shape[:2]
  pos = jnp.broadcast_to(jnp.arange(T, dtype=jnp.int32), (B, T))
  f = lambda q, k, v: attention(q, k, v, pos, pos, scale=scale, window=window, softcap=softcap)
  o, vjp = jax.vjp(f, *(x.astype(jnp.float32) for x in (q, k, v)))
  return o, vjp(do.astype(jnp.float32))


def _kernel_vjp(q, k, v, do, window, softcap, scale):
  f = lambda q, k, v: attention_gpu.flash_attention(
      q, k, v, scale=scale, window=window, softcap=softcap, interpret=INTERPRET)
  o, vjp = jax.vjp(f, q, k, v)
  return o, vjp(do)


# Output and gradients of the kernel, with a static window or with the window as a jit argument (traced).
_kernel = jax.jit(_kernel_vjp, static_argnames=("window", "softcap", "scale"))
_kernel_traced_window = jax.jit(_kernel_vjp, static_argnames=("softcap", "scale"))


def _check(B, T, N, K, H, dtype, window=0, softcap=None, traced=False, seed=0):
  if ON_GPU:  # float32 runs only in the interpreter (Hopper's wgmma transposes only 16-bit operands)
    dtype = jnp.bfloat16
  q, k, v, do = _inputs(B, T, N, K, H, dtype, seed)
  assert attention_gpu.supported(q, k, window=window, softcap=softcap) == ON_GPU
  scale = H**-0.5
  tol = 1e-4 if dtype == jnp.float32 else 2e-2
  o_ref, grads_ref = _reference(q, k, v, do, window=window, softcap=softcap, scale=scale)
  if traced:  # through jax.jit as an argument
    o, grads_out = _kernel_traced_window(q, k, v, do, jnp.int32(window), softcap=softcap, scale=scale)
  else:
    o, grads_out = _kernel(q, k, v, do, window=window, softcap=softcap, scale=scale)
  assert o.shape == q.shape and o.dtype == dtype
  assert _rel(o, o_ref) < tol, ("o", _rel(o, o_ref))
  for name, g, g_ref in zip(("dq", "dk", "dv"), grads_out, grads_ref):
    assert g.dtype == dtype
    assert _rel(g, g_ref) < tol, (name, _rel(g, g_ref))


# (B, T, N, K, H, dtype, window, softcap): each case crosses several features, as the interpreter is slow
# (about 0.3 s per CTA and 4 s of compilation per case on 2 CPU cores).
CASES = [
    pytest.param(1, 77, 4, 1, 64, jnp.float32, 40, None, id="f32-T77-gqa4-h64-window"),
    pytest.param(2, 1, 1, 1, 128, jnp.float32, 0, None, id="f32-T1-mha-h128-batch2"),
    # 3 KV blocks of 128 for 2 SMEM slots (5 of 64 for 3 in dQ): the rings wrap around.
    pytest.param(1, 300, 1, 1, 64, jnp.float32, 130, 20.0, id="f32-T300-mha-h64-window-softcap"),
    pytest.param(1, 77, 8, 1, 128, jnp.bfloat16, 0, 30.0, id="bf16-T77-gqa8-h128-softcap"),
]


@pytest.mark.parametrize("B,T,N,K,H,dtype,window,softcap", CASES)
def test_forward_and_gradients(B, T, N, K, H, dtype, window, softcap):
  _check(B, T, N, K, H, dtype, window, softcap)


def test_traced_window_in_jit():
  """Gemma 2 scans over layers with the window as data: one compiled kernel serves every window (0: none)."""
  _check(1, 200, 1, 1, 64, jnp.bfloat16, window=50, softcap=25.0, traced=True)
  _check(1, 200, 1, 1, 64, jnp.bfloat16, window=0, softcap=25.0, traced=True)


@pytest.mark.slow
def test_three_slot_rings_wrap():
  """bf16 at H = 64 has 3 SMEM slots per ring: 4 KV blocks of 128 (T = 450) refill the forward's slots."""
  _check(1, 450, 2, 1, 64, jnp.bfloat16, window=300, softcap=50.0)


@pytest.mark.skipif(not ON_GPU, reason="the large case takes minutes in the interpreter")
@pytest.mark.parametrize("window,softcap", [(0, None), (700, 50.0)])
def test_large_on_gpu(window, softcap):
  _check(2, 2048, 16, 2, 128, jnp.bfloat16, window, softcap, seed=1)
  _check(1, 2048 - 37, 8, 8, 64, jnp.bfloat16, window, softcap, seed=2)


@pytest.mark.parametrize("H", [64, 128])
def test_lowers_to_mosaic_gpu(H):
  """The compiled path (wgmma with transposed and register operands, register layouts, SMEM budget) that
  the interpreter does not run lowers to the three Mosaic GPU kernels, also on a CPU-only machine."""
  q = jax.ShapeDtypeStruct((2, 200, 8, H), jnp.bfloat16)
  k = jax.ShapeDtypeStruct((2, 200, 2, H), jnp.bfloat16)
  for window, softcap in [(0, None), (100, 50.0), (jax.ShapeDtypeStruct((), jnp.int32), 30.0)]:
    def loss(q, k, v, *w):
      o = attention_gpu.flash_attention(q, k, v, scale=0.1, window=w[0] if w else window, softcap=softcap)
      return o.astype(jnp.float32).sum()

    args = (q, k, k) if isinstance(window, int) else (q, k, k, window)
    lowered = jax.jit(jax.grad(loss, argnums=(0, 1, 2))).trace(*args).lower(lowering_platforms=("cuda",))
    assert lowered.as_text().count("custom_call @mosaic_gpu") == 3  # forward, dQ, dK/dV


def test_supported(monkeypatch):
  q = jnp.zeros((1, 8, 4, 128), jnp.bfloat16)
  k = jnp.zeros((1, 8, 2, 128), jnp.bfloat16)
  assert attention_gpu.supported(q, k, window=0, softcap=None) == ON_GPU
  monkeypatch.setattr(attention_gpu, "on_hopper", lambda: True)  # the shape rules, on any machine
  assert attention_gpu.supported(q, k, window=0, softcap=None)
  assert attention_gpu.supported(q, k, window=jnp.int32(5), softcap=50.0)
  assert not attention_gpu.supported(q.astype(jnp.float32), k.astype(jnp.float32), window=0, softcap=None)
  assert not attention_gpu.supported(q[..., :96], k[..., :96], window=0, softcap=None)
  assert not attention_gpu.supported(q[:, :, :3], k, window=0, softcap=None)  # N % K != 0
  assert not attention_gpu.supported(q[0], k[0], window=0, softcap=None)
  assert not attention_gpu.supported(q, k[:, :4], window=0, softcap=None)
  assert not attention_gpu.supported(q, k, window=0, softcap=jnp.float32(50.0))  # a traced soft-cap


@pytest.mark.skipif(not ON_GPU, reason="the dispatch picks the kernels only on a GPU")
@pytest.mark.parametrize("window,softcap", [(0, None), (300, None), (300, 30.0)])
def test_causal_attention_dispatch(window, softcap):
  """ops.attention.causal_attention on the GPU: the kernel's forward (its own backward with a soft-cap,
  cuDNN's otherwise), matching the reference in value and gradients."""
  q, k, v, do = _inputs(2, 1000, 8, 2, 128, jnp.bfloat16, 3)
  f = jax.jit(lambda q, k, v: causal_attention(q, k, v, scale=0.1, window=window, softcap=softcap))
  o, vjp = jax.vjp(f, q, k, v)
  o_ref, grads_ref = _reference(q, k, v, do, window=window, softcap=softcap, scale=0.1)
  assert _rel(o, o_ref) < 2e-2
  kernel = attention_gpu.flash_attention(q, k, v, scale=0.1, window=window, softcap=softcap)
  np.testing.assert_array_equal(np.asarray(f(q, k, v), np.float32), np.asarray(kernel, np.float32))  # no grad: the kernel
  for g, g_ref in zip(vjp(do), grads_ref):
    assert _rel(g, g_ref) < 2e-2
