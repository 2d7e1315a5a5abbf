"""The Mosaic GPU gated RMSNorm (xlazoo.ops.pallas.gated_norm_gpu) against its jnp reference
(xlazoo.ops.norms.gated_rms_norm_reference) on the same inputs.

Both orders of gate and norm, 1 to 4 groups, group widths that take 16-, 4- and 2-byte loads, bfloat16 and
float16, zx wider than I (in_proj's output: z, then the rest); the gradient through the dispatch. On the CPU
the kernel runs in the Mosaic GPU interpreter; the compiled path's lowering is checked separately. On the GPU
the Mamba-2 2.7B shape (8192 rows of 5120) runs too.
"""

import functools

import jax
import jax.numpy as jnp
import pytest

from tests.mosaic_gpu import AVAILABLE, INTERPRET, ON_GPU, assert_same_loss_and_grads
from tests.parity import rel_err
from xlazoo.ops import norms
from xlazoo.ops.pallas import gated_norm_gpu

if not AVAILABLE:
  pytest.skip("no GPU and no Mosaic GPU interpreter in this JAX", allow_module_level=True)

pytestmark = pytest.mark.usefixtures("mosaic_gpu_interpreter")

TOL = 1e-2  # one 16-bit rounding of the output (the sums run in another order)


def _inputs(M, I, Z, dtype, seed=0):
  k = jax.random.split(jax.random.key(seed), 3)
  y = (2.0 * jax.random.normal(k[0], (M, I))).astype(dtype)
  zx = (2.0 * jax.random.normal(k[1], (M, Z))).astype(dtype)
  w = (1.0 + 0.5 * jax.random.normal(k[2], (I,))).astype(dtype)
  return y, zx, w


@pytest.mark.parametrize("M, I, Z, G, norm_first, dtype", [
    pytest.param(5, 1024, 1048, 1, False, jnp.bfloat16, id="gate-first-g1"),  # 16-byte loads, zx wider than I
    pytest.param(3, 2048, 2048, 2, True, jnp.bfloat16, id="norm-first-g2"),
    pytest.param(2, 512, 520, 4, False, jnp.float16, id="g4-f16"),  # groups of 128: one value a thread
    pytest.param(4, 768, 776, 3, True, jnp.bfloat16, id="g3-4byte"),  # groups of 256: two values a thread
])
def test_matches_reference(M, I, Z, G, norm_first, dtype):
  y, zx, w = _inputs(M, I, Z, dtype)
  out = gated_norm_gpu.gated_rms_norm(y, zx, w, eps=1e-5, groups=G, norm_first=norm_first, interpret=INTERPRET)
  ref = norms.gated_rms_norm_reference(y, zx, w, 1e-5, groups=G, norm_first=norm_first)
  assert out.dtype == dtype and out.shape == (M, I)
  assert rel_err(out, ref) < TOL


@pytest.mark.skipif(not ON_GPU, reason="8192 rows take minutes in the interpreter; the GPU runs them")
def test_mamba2_2p7b_shape_on_gpu():
  y, zx, w = _inputs(8192, 5120, 10624, jnp.bfloat16, seed=1)
  out = jax.jit(lambda *a: gated_norm_gpu.gated_rms_norm(*a, eps=1e-5, groups=1, norm_first=False))(y, zx, w)
  ref = norms.gated_rms_norm_reference(y, zx, w, 1e-5)
  assert rel_err(out, ref) < TOL


def test_dispatch_and_gradient(monkeypatch):
  """`norms.gated_rms_norm` takes the kernel where its rules hold ([B, T, I] rows) and differentiates through the
  jnp form."""
  monkeypatch.setattr(gated_norm_gpu, "on_hopper", lambda: True)
  calls = []
  kernel = gated_norm_gpu.gated_rms_norm
  monkeypatch.setattr(gated_norm_gpu, "gated_rms_norm",
                      lambda *a, **kw: calls.append(1) or kernel(*a, interpret=INTERPRET, **kw))
  y, zx, w = _inputs(6, 1024, 1040, jnp.bfloat16, seed=2)
  y, zx = y.reshape(2, 3, 1024), zx.reshape(2, 3, 1040)
  assert_same_loss_and_grads(functools.partial(norms.gated_rms_norm, eps=1e-5, groups=2),
                             functools.partial(norms.gated_rms_norm_reference, eps=1e-5, groups=2), (y, zx, w), TOL)
  assert calls


def test_lowers_to_mosaic_gpu():
  """The compiled path lowers, also on a CPU-only machine, to one Mosaic GPU kernel."""
  S = jax.ShapeDtypeStruct
  args = (S((64, 5120), jnp.bfloat16), S((64, 10624), jnp.bfloat16), S((5120,), jnp.bfloat16))
  f = jax.jit(lambda *a: gated_norm_gpu.gated_rms_norm(*a, eps=1e-5, groups=1, norm_first=False))
  assert f.trace(*args).lower(lowering_platforms=("cuda",)).as_text().count("custom_call @mosaic_gpu") == 1


def test_supported(monkeypatch):
  y, zx, w = jnp.zeros((4, 1024), jnp.bfloat16), jnp.zeros((4, 1032), jnp.bfloat16), jnp.zeros((1024,), jnp.bfloat16)
  assert gated_norm_gpu.supported(y, zx, w, 1) == ON_GPU
  monkeypatch.setattr(gated_norm_gpu, "on_hopper", lambda: True)  # the shape rules, on any machine
  assert gated_norm_gpu.supported(y, zx, w, 1) and gated_norm_gpu.supported(y, zx, w, 8)
  assert not gated_norm_gpu.supported(y, zx, w, 3)  # groups of 341.3 channels
  assert not gated_norm_gpu.supported(y[:, :960], zx, w[:960], 1)  # 960 = 128 x 7.5
  assert not gated_norm_gpu.supported(y, zx[:, :1028], w, 1)  # rows of 2056 bytes: not 16-byte aligned
  assert not gated_norm_gpu.supported(y, zx[:, :1000], w, 1)  # zx narrower than I
  assert not gated_norm_gpu.supported(y.astype(jnp.float32), zx.astype(jnp.float32), w.astype(jnp.float32), 1)
  assert not gated_norm_gpu.supported(y, zx, w.astype(jnp.float32), 1)


def test_shape_mismatch_is_an_error():
  y, zx, w = _inputs(2, 1024, 1024, jnp.bfloat16)
  with pytest.raises(ValueError, match="do not fit"):
    gated_norm_gpu.gated_rms_norm(y, zx, w[:512], eps=1e-5, groups=1, norm_first=False)
