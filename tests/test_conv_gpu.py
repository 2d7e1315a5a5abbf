"""The Mosaic GPU causal conv with SiLU (xlazoo.ops.pallas.conv_gpu) against its jnp reference
(xlazoo.ops.conv.causal_conv_silu_reference) on the same inputs.

Conv widths 2 to 4, with and without a bias and a conv state, sequences shorter than a block of rows and
ragged over one or several CTAs (T = 3, 17, 70), batches of 1 and 2, channel ranges that take 16-, 4- and
2-byte loads and start inside the conv's channels, bfloat16 and float16; the gradient through the dispatch.
On the CPU the kernel runs in the Mosaic GPU interpreter; the compiled path's lowering is checked separately.
On the GPU the Mamba-2 2.7B shape (8192 rows) runs too.
"""

import functools

import jax
import jax.numpy as jnp
import pytest

from tests.mosaic_gpu import AVAILABLE, INTERPRET, ON_GPU, assert_same_loss_and_grads
from tests.parity import rel_err
from xlazoo.ops import conv
from xlazoo.ops.pallas import conv_gpu

if not AVAILABLE:
  pytest.skip("no GPU and no Mosaic GPU interpreter in this JAX", allow_module_level=True)

pytestmark = pytest.mark.usefixtures("mosaic_gpu_interpreter")

TOL = 1e-2  # one 16-bit rounding of the output (the taps' sums run in another order)


def _inputs(Bsz, T, Z, W, F, bias, state, dtype, seed=0):
  k = jax.random.split(jax.random.key(seed), 4)
  normal = lambda key, shape, scale=1.0: (scale * jax.random.normal(key, shape)).astype(dtype)  # noqa: E731
  return (normal(k[0], (Bsz, T, Z)), normal(k[1], (W, F), 0.5), normal(k[2], (F,), 0.5) if bias else None,
          normal(k[3], (Bsz, W - 1, F)) if state else None)


@pytest.mark.parametrize("Bsz, T, W, channels, bias, state, dtype", [
    pytest.param(1, 70, 4, (0, 1024), True, True, jnp.bfloat16, id="w4-x-16byte"),
    pytest.param(2, 3, 4, (1024, 1280), True, True, jnp.bfloat16, id="t3-bc-4byte-state"),
    pytest.param(2, 70, 3, (1152, 1280), False, False, jnp.float16, id="w3-2byte-nobias"),
    pytest.param(1, 17, 2, (128, 1152), True, False, jnp.bfloat16, id="w2-offset"),
])
def test_matches_reference(Bsz, T, W, channels, bias, state, dtype):
  F, start = 1280, 200  # the conv's channels sit at columns 200 .. 1480 of a wider row
  xz, w, b, s = _inputs(Bsz, T, 1504, W, F, bias, state, dtype)
  out = conv_gpu.causal_conv_silu(xz, w, b, s, start=start, channels=channels, interpret=INTERPRET)
  ref = conv.causal_conv_silu_reference(xz, w, b, s, start=start, channels=channels)
  assert out.dtype == dtype and out.shape == (Bsz, T, channels[1] - channels[0])
  assert rel_err(out, ref) < TOL


@pytest.mark.skipif(not ON_GPU, reason="8192 rows take minutes in the interpreter; the GPU runs them")
def test_mamba2_2p7b_shape_on_gpu():
  xz, w, b, s = _inputs(1, 8192, 10624, 4, 5376, True, True, jnp.bfloat16, seed=1)
  for channels in ((0, 5120), (5120, 5376)):
    f = jax.jit(lambda *a, c=channels: conv_gpu.causal_conv_silu(*a, start=5120, channels=c))
    ref = conv.causal_conv_silu_reference(xz, w, b, s, start=5120, channels=channels)
    assert rel_err(f(xz, w, b, s), ref) < TOL


def test_dispatch_and_gradient(monkeypatch):
  """`conv.causal_conv_silu` takes the kernel where its rules hold and differentiates through the jnp form."""
  monkeypatch.setattr(conv_gpu, "on_hopper", lambda: True)
  calls = []
  kernel = conv_gpu.causal_conv_silu
  monkeypatch.setattr(conv_gpu, "causal_conv_silu", lambda *a, **kw: calls.append(1) or kernel(*a, interpret=INTERPRET, **kw))
  xz, w, b, s = _inputs(2, 9, 392, 4, 256, True, True, jnp.bfloat16, seed=2)
  same = dict(start=8, channels=(0, 256))
  assert_same_loss_and_grads(functools.partial(conv.causal_conv_silu, **same),
                             functools.partial(conv.causal_conv_silu_reference, **same), (xz, w, b, s), TOL)
  assert calls


def test_lowers_to_mosaic_gpu():
  """The compiled path lowers, also on a CPU-only machine, to one Mosaic GPU kernel."""
  S = jax.ShapeDtypeStruct
  bf = jnp.bfloat16
  args = (S((1, 256, 10624), bf), S((4, 5376), bf), S((5376,), bf), S((1, 3, 5376), bf))
  f = jax.jit(lambda *a: conv_gpu.causal_conv_silu(*a, start=5120, channels=(0, 5120)))
  assert f.trace(*args).lower(lowering_platforms=("cuda",)).as_text().count("custom_call @mosaic_gpu") == 1


def test_supported(monkeypatch):
  xz, w, s = jnp.zeros((1, 8, 1536), jnp.bfloat16), jnp.zeros((4, 1280), jnp.bfloat16), jnp.zeros((1, 3, 1280), jnp.bfloat16)
  assert conv_gpu.supported(xz, w, (0, 1024), s) == ON_GPU
  monkeypatch.setattr(conv_gpu, "on_hopper", lambda: True)  # the shape rules, on any machine
  assert conv_gpu.supported(xz, w, (0, 1024), s) and conv_gpu.supported(xz, w, (1024, 1280), None)
  assert not conv_gpu.supported(xz, w, (0, 1000), s)  # 1000 channels: no whole slabs of 128 vectors
  assert not conv_gpu.supported(xz, w, (1024, 1408), s)  # past the conv's channels
  assert not conv_gpu.supported(xz[..., :1532], w, (0, 1024), s)  # rows of 3064 bytes: not 16-byte aligned
  assert not conv_gpu.supported(xz.astype(jnp.float32), w.astype(jnp.float32), (0, 1024), None)
  assert not conv_gpu.supported(xz, w, (0, 1024), s.astype(jnp.float32))


def test_shape_mismatch_is_an_error():
  xz, w, b, s = _inputs(1, 8, 1024, 4, 1280, True, True, jnp.bfloat16)
  with pytest.raises(ValueError, match="do not fit"):
    conv_gpu.causal_conv_silu(xz, w, b, s, start=0, channels=(0, 1024))  # the conv's columns run past xz's
