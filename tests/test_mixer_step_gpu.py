"""The Mosaic GPU Mamba-2 mixer step (xlazoo.ops.pallas.mixer_step_gpu) against its jnp reference
(xlazoo.ops.ssd.mixer_step_reference) on the same inputs.

Batch 1 to 3, groups 1 to 3, state sizes 64 and 128, conv widths 2 to 4 with and without a bias, bfloat16 and
float16, the caches' layer apart from the parameters' layer. The new conv state is a copy (exact); y and the
state agree to the rounding of the 16-bit conv output (the kernel's sums run in another order). The other
layers of both stacks must come back untouched. On the CPU the kernel runs in the Mosaic GPU interpreter;
the compiled path's lowering (register layouts, the SSM stack aliased in place) is checked separately.

On the GPU, `test_mamba2_2p7b_shape_on_gpu` steps 64 layers in one jitted loop, as a decode step does, at
batch 1 and 8. Batch 8 (640 CTAs) is the case that once failed: XLA's dynamic-slice fusion had the kernel write
the new conv state straight into the stack it reads (see mixer_step_gpu.step).
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from tests.mosaic_gpu import AVAILABLE, INTERPRET, ON_GPU
from tests.parity import rel_err
from xlazoo.ops import ssd as ssd_ops
from xlazoo.ops.mlp import LayerWeight
from xlazoo.ops.pallas import mixer_step_gpu

if not AVAILABLE:
  pytest.skip("no GPU and no Mosaic GPU interpreter in this JAX", allow_module_level=True)

pytestmark = pytest.mark.usefixtures("mosaic_gpu_interpreter")

TOL = 2e-2  # one 16-bit rounding of the conv output, relative to the largest value


def _inputs(Bsz, N, G, Q, W, bias, dtype, seed, L=3, K=4, P=64):
  """zx (with trailing columns the step ignores: up to a multiple of 8, and 8 more), the two cache stacks of
  L layers, and K layers of parameters at a trained model's scales (dt_bias -4 to 1, A_log 0 to 3)."""
  I, E = N * P, N * P + 2 * G * Q
  k = jax.random.split(jax.random.key(seed), 8)
  normal = lambda key, shape, scale=1.0: (scale * jax.random.normal(key, shape)).astype(dtype)  # noqa: E731
  zx = normal(k[0], (Bsz, -(-(I + E + N) // 8) * 8 + 8))
  conv = normal(k[1], (L, Bsz, W - 1, E))
  ssm = jax.random.normal(k[2], (L, Bsz, N, P, Q), jnp.float32)
  params = dict(
      conv_w=normal(k[3], (K, W, E), 0.5),
      conv_b=normal(k[4], (K, E), 0.5) if bias else None,
      dt_bias=jax.random.uniform(k[5], (K, N), jnp.float32, -4.0, 1.0).astype(dtype),
      A_log=jax.random.uniform(k[6], (K, N), jnp.float32, 0.0, 3.0).astype(dtype),
      D=normal(k[7], (K, N)),
  )
  return zx, conv, ssm, params


CASES = [  # (B, N, G, Q, W, bias, dtype, gate)
    pytest.param(1, 4, 1, 128, 4, True, jnp.bfloat16, True, id="b1-g1-q128-gate"),
    pytest.param(2, 4, 2, 64, 4, False, jnp.bfloat16, False, id="b2-g2-q64-nobias"),
    pytest.param(3, 6, 3, 64, 3, True, jnp.float16, True, id="b3-g3-w3-f16-gate"),
    pytest.param(1, 2, 1, 64, 2, True, jnp.bfloat16, False, id="b1-w2"),
]


@pytest.mark.parametrize("Bsz,N,G,Q,W,bias,dtype,gate", CASES)
def test_matches_reference(Bsz, N, G, Q, W, bias, dtype, gate):
  """gate: y silu(z), with z the first I columns of zx."""
  zx, conv, ssm, params = _inputs(Bsz, N, G, Q, W, bias, dtype, seed=Bsz * 10 + W)
  layer, k = 1, 2
  args = (params["conv_w"], params["conv_b"], params["dt_bias"], params["A_log"], params["D"])
  y, conv_BWE, ssm_new = jax.jit(lambda *a: mixer_step_gpu.step(*a, groups=G, gate=gate, interpret=INTERPRET))(
      zx, conv, ssm, layer, *args, k)
  weights = [None if a is None else LayerWeight(a, k) for a in args]
  y_ref, conv_ref, ssm_ref = ssd_ops.mixer_step_reference(zx, conv, ssm, layer, *weights, groups=G, gate=gate)
  if gate:  # the gate applied: y differs from the ungated step's
    y_plain, _, _ = ssd_ops.mixer_step_reference(zx, conv, ssm, layer, *weights, groups=G)
    assert rel_err(y_ref, y_plain) > 0.1
  assert y.shape == y_ref.shape and y.dtype == dtype and conv_BWE.dtype == dtype and ssm_new.shape == ssm.shape
  np.testing.assert_array_equal(np.asarray(conv_BWE, np.float32), np.asarray(conv_ref[layer], np.float32))
  errs = rel_err(y, y_ref), rel_err(ssm_new[layer], ssm_ref[layer])
  assert max(errs) < TOL, errs
  others = [i for i in range(ssm.shape[0]) if i != layer]
  np.testing.assert_array_equal(np.asarray(ssm_new)[others], np.asarray(ssm)[others])


@pytest.mark.skipif(not ON_GPU, reason="the full shape takes minutes in the interpreter")
@pytest.mark.parametrize("Bsz,gate", [(1, True), (8, False)])
def test_mamba2_2p7b_shape_on_gpu(Bsz, gate):
  """Mamba-2 2.7B's mixer (80 heads in one group, Q = 128), stepping each of 64 layers in turn in one jitted
  loop, as a decode step does: every layer's state must match."""
  zx, conv, ssm, p = _inputs(Bsz, 80, 1, 128, 4, True, jnp.bfloat16, seed=11, L=64, K=64)
  args = (p["conv_w"], p["conv_b"], p["dt_bias"], p["A_log"], p["D"])

  def layers(step):
    def body(layer, carry):
      conv, ssm, ys = carry
      y, conv, ssm = step(zx, conv, ssm, layer, *[LayerWeight(a, layer) for a in args], groups=1, gate=gate)
      return conv, ssm, ys.at[layer].set(y)
    return jax.jit(lambda c, s: jax.lax.fori_loop(0, 64, body, (c, s, jnp.zeros((64, *zx.shape[:1], 80 * 64), zx.dtype))))

  out = layers(ssd_ops.mixer_step)(conv, ssm)
  ref = layers(ssd_ops.mixer_step_reference)(conv, ssm)
  np.testing.assert_array_equal(np.asarray(out[0], np.float32), np.asarray(ref[0], np.float32))
  errs = [rel_err(out[1][i], ref[1][i]) for i in range(64)]
  assert max(errs) < TOL and rel_err(out[2], ref[2]) < TOL, (np.argmax(errs), max(errs), rel_err(out[2], ref[2]))


def test_state_carries_over_steps():
  """Four steps in a row through the dispatch (ops.ssd.mixer_step), each on the state the last one left."""
  zx, conv, ssm, params = _inputs(2, 4, 2, 64, 4, True, jnp.bfloat16, seed=7)
  weights = [LayerWeight(params[n], 3) for n in ("conv_w", "conv_b", "dt_bias", "A_log", "D")]
  zxs = [zx] + [jax.random.normal(jax.random.key(s), zx.shape).astype(zx.dtype) for s in range(3)]

  def run(fn):
    step = jax.jit(lambda z, c, s: fn(z, c, s, 0, *weights, groups=2))
    c, s, ys = conv, ssm, []
    for z in zxs:
      y, c, s = step(z, c, s)
      ys.append(y)
    return jnp.stack(ys), c, s

  ref = run(ssd_ops.mixer_step_reference)
  with pytest.MonkeyPatch.context() as mp:
    kernel = mixer_step_gpu.step
    calls = []
    mp.setattr(mixer_step_gpu, "on_hopper", lambda: True)
    mp.setattr(mixer_step_gpu, "ENABLED", True)
    mp.setattr(mixer_step_gpu, "step", lambda *a, **kw: calls.append(1) or kernel(*a, **kw, interpret=INTERPRET))
    out = run(ssd_ops.mixer_step)
  assert len(calls) == 1  # traced once, run four times
  np.testing.assert_array_equal(np.asarray(out[1], np.float32), np.asarray(ref[1], np.float32))
  errs = rel_err(out[0], ref[0]), rel_err(out[2], ref[2])
  assert max(errs) < TOL, errs


@pytest.mark.parametrize("Q,bias", [(64, False), (128, True)])
def test_lowers_to_mosaic_gpu_in_place(Q, bias):
  """The compiled path lowers, also on a CPU-only machine, to one Mosaic GPU kernel whose SSM stack output is
  its input's buffer, and whose new conv state passes an optimization barrier (no fusion into the stack's
  update on the GPU)."""
  S = jax.ShapeDtypeStruct
  N, G, E, bf = 8, 2, 8 * 64 + 4 * Q, jnp.bfloat16
  i32 = S((), jnp.int32)
  args = (S((2, 64 * N + E + N + 8), bf), S((3, 2, 3, E), bf), S((3, 2, N, 64, Q), jnp.float32), i32,
          S((5, 4, E), bf), S((5, E), bf) if bias else None, S((5, N), bf), S((5, N), bf), S((5, N), bf), i32)
  text = jax.jit(lambda *a: mixer_step_gpu.step(*a, groups=G)).trace(*args).lower(lowering_platforms=("cuda",)).as_text()
  assert text.count("custom_call @mosaic_gpu") == 1
  assert "output_operand_aliases = [#stablehlo.output_operand_alias<output_tuple_indices = [2], operand_index = 4" in text
  assert text.count("stablehlo.optimization_barrier") == 1


def test_supported(monkeypatch):
  zx = jnp.zeros((1, 768), jnp.bfloat16)
  conv, ssm, w = jnp.zeros((2, 1, 3, 384), jnp.bfloat16), jnp.zeros((2, 1, 4, 64, 64)), jnp.zeros((2, 4, 384), jnp.bfloat16)
  assert mixer_step_gpu.supported(zx, conv, ssm, w) == ON_GPU
  monkeypatch.setattr(mixer_step_gpu, "on_hopper", lambda: True)  # the shape rules, on any machine
  assert mixer_step_gpu.supported(zx, conv, ssm, w)
  assert mixer_step_gpu.supported(zx.astype(jnp.float16), conv.astype(jnp.float16), ssm, w)
  assert not mixer_step_gpu.supported(zx[:, :644], conv, ssm, w)  # rows of 1288 bytes: not for TMA
  assert not mixer_step_gpu.supported(zx.astype(jnp.float32), conv.astype(jnp.float32), ssm, w)
  assert not mixer_step_gpu.supported(zx, conv.astype(jnp.float32), ssm, w)  # conv state in another dtype
  assert not mixer_step_gpu.supported(zx, conv, ssm.astype(jnp.bfloat16), w)
  assert not mixer_step_gpu.supported(zx, conv, ssm[..., :32, :], w)  # P != 64
  assert not mixer_step_gpu.supported(zx, conv, jnp.zeros((2, 1, 4, 64, 256)), w)  # Q = 256
  assert not mixer_step_gpu.supported(zx[0], conv, ssm, w)


def test_shape_mismatch_is_an_error():
  zx, conv, ssm, p = _inputs(1, 4, 1, 64, 4, True, jnp.bfloat16, seed=0)
  with pytest.raises(ValueError, match="do not fit together"):
    mixer_step_gpu.step(zx, conv, ssm, 0, p["conv_w"], p["conv_b"], p["dt_bias"], p["A_log"], p["D"], 0, groups=2)


def test_dispatch_switch_off(monkeypatch):
  """With the switch off, ops.ssd.mixer_step takes the reference even where the kernel's rules hold."""
  monkeypatch.setattr(mixer_step_gpu, "ENABLED", False)
  monkeypatch.setattr(mixer_step_gpu, "on_hopper", lambda: True)
  monkeypatch.setattr(mixer_step_gpu, "step", lambda *a, **kw: pytest.fail("the kernel was taken"))
  zx, conv, ssm, p = _inputs(1, 4, 1, 64, 4, True, jnp.bfloat16, seed=3)
  weights = [LayerWeight(p[n], 0) for n in ("conv_w", "conv_b", "dt_bias", "A_log", "D")]
  y, _, _ = ssd_ops.mixer_step(zx, conv, ssm, 0, *weights, groups=1)
  y_ref, _, _ = ssd_ops.mixer_step_reference(zx, conv, ssm, 0, *weights, groups=1)
  np.testing.assert_array_equal(np.asarray(y, np.float32), np.asarray(y_ref, np.float32))
