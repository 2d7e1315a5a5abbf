"""The whole-stack Mamba-2 decode kernel (xlazoo.ops.pallas.mamba2_stack_gpu) against a jnp loop over the same
layers: rms_norm, in_proj, `mixer_step_reference` with the gate, the gated rms_norm, out_proj, and the residual in
float32 (as the kernel keeps it).

It cannot run in the Mosaic GPU interpreter (grid barriers on global semaphores, atomic adds into GMEM), so on the
CPU only its lowering for the GPU is checked; the comparisons run on a Hopper GPU (results in
benchmarks/RESULTS.md).
"""

import functools

import jax
import jax.numpy as jnp
import pytest

from tests.parity import rel_err
from xlazoo.ops import ssd as ssd_ops
from xlazoo.ops.mlp import LayerWeight
from xlazoo.ops.norms import rms_norm
from xlazoo.ops.pallas import mamba2_stack_gpu, on_hopper

f32 = jnp.float32
TOL = 2e-2  # 16-bit roundings of zx and x met in another order (the kernel's sums run in any order)


def _inputs(L, D, N, Q, W, dtype, seed, P=64):
  """Residual, weights at a trained model's scales (dt_bias -4 to 1, A_log 0 to 3; in_proj padded to whole
  128-column tiles) and random caches."""
  I, E = N * P, N * P + 2 * Q
  Z = -(-(I + E + N) // 128) * 128
  k = jax.random.split(jax.random.key(seed), 12)
  normal = lambda key, shape, scale=1.0: (scale * jax.random.normal(key, shape)).astype(dtype)  # noqa: E731
  weights = dict(
      norm_w=normal(k[0], (L, D), 0.2) + 1, w_in=normal(k[1], (L, D, Z), D ** -0.5), conv_w=normal(k[2], (L, W, E), 0.5),
      conv_b=normal(k[3], (L, E), 0.5),
      dt_bias=jax.random.uniform(k[4], (L, N), f32, -4.0, 1.0).astype(dtype),
      A_log=jax.random.uniform(k[5], (L, N), f32, 0.0, 3.0).astype(dtype), D=normal(k[6], (L, N)),
      gate_norm_w=normal(k[7], (L, I), 0.2) + 1, w_out=normal(k[8], (L, I, D), I ** -0.5))
  h = jax.random.normal(k[9], (D,), f32)
  conv = normal(k[10], (L, 1, W - 1, E))
  ssm = jax.random.normal(k[11], (L, 1, N, P, Q), f32)
  return h, weights, conv, ssm


def _reference(h, w, conv, ssm, eps, gate_norm_eps):
  dtype = w["w_in"].dtype
  h = h.astype(f32)[None]
  for l in range(w["w_in"].shape[0]):
    x = rms_norm(h, w["norm_w"][l], eps).astype(dtype)
    zx = jnp.einsum("BD,DZ->BZ", x, w["w_in"][l], preferred_element_type=f32).astype(dtype)
    lw = lambda name: LayerWeight(w[name], l)  # noqa: B023, E731
    g, conv, ssm = ssd_ops.mixer_step_reference(zx, conv, ssm, l, lw("conv_w"), lw("conv_b"), lw("dt_bias"),
                                                lw("A_log"), lw("D"), groups=1, gate=True)
    v = rms_norm(g, w["gate_norm_w"][l], gate_norm_eps)
    h = h + jnp.einsum("BI,ID->BD", v, w["w_out"][l], preferred_element_type=f32)
  return h[0], conv, ssm


def _step(h, w, conv, ssm, eps, gate_norm_eps):
  return mamba2_stack_gpu.step(h, w["norm_w"], w["w_in"], w["conv_w"], w["conv_b"], w["dt_bias"], w["A_log"], w["D"],
                               w["gate_norm_w"], w["w_out"], conv, ssm, eps=eps, gate_norm_eps=gate_norm_eps)


CASES = [  # (L, D, N, Q, W, dtype)
    pytest.param(3, 256, 4, 64, 4, jnp.bfloat16, id="small-q64"),
    pytest.param(2, 384, 6, 128, 3, jnp.float16, id="q128-w3-f16"),
    pytest.param(5, 128, 2, 128, 2, jnp.bfloat16, id="w2-d128"),
    pytest.param(4, 2560, 80, 128, 4, jnp.bfloat16, id="mamba2-2.7b-4-layers"),
]


@pytest.mark.skipif(not on_hopper(), reason="needs a Hopper GPU (the kernel cannot be interpreted)")
@pytest.mark.parametrize("L,D,N,Q,W,dtype", CASES)
def test_matches_reference_on_gpu(L, D, N, Q, W, dtype):
  h, w, conv, ssm = _inputs(L, D, N, Q, W, dtype, seed=L * 7 + W)
  assert mamba2_stack_gpu.supported(h[None], w["w_in"], w["w_out"], conv, ssm, groups=1)
  step = jax.jit(functools.partial(_step, eps=1e-5, gate_norm_eps=1e-5))
  for call in range(2):  # twice: the grid barrier's semaphores must come back to 0
    h_k, conv_k, ssm_k = step(h, w, conv, ssm)
    h_r, conv_r, ssm_r = _reference(h, w, conv, ssm, 1e-5, 1e-5)
    errs = rel_err(h_k, h_r), rel_err(ssm_k, ssm_r), rel_err(conv_k, conv_r)
    assert max(errs) < TOL, (call, errs)
    assert rel_err(h_k, h) > 0.1  # the layers did something
    h, conv, ssm = h_k, conv_k, ssm_k


def test_lowers_for_the_gpu():
  """On any backend: the kernel traces and lowers to Mosaic GPU (register layouts, the union of the x tiles'
  views, the atomics), at a small shape."""
  h, w, conv, ssm = jax.eval_shape(lambda: _inputs(2, 256, 4, 64, 4, jnp.bfloat16, seed=0))
  step = jax.jit(functools.partial(_step, eps=1e-5, gate_norm_eps=1e-5))
  text = step.trace(h, w, conv, ssm).lower(lowering_platforms=("cuda",)).as_text()
  assert "mamba2_stack" in text
