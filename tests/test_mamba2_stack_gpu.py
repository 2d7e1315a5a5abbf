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
import numpy as np
import pytest

from tests.parity import rel_err
from xlazoo import bench
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


def test_supported_only_where_a_block_fits_in_smem(monkeypatch):
  """`supported` refuses shapes whose SMEM buffers (the ring, the x tiles, the step's prefetched state and conv
  window) would not fit a block: D = 8192 with 8 heads needs 2 x tiles a phase on 132 SMs, but 8 on 16, and then
  the buffers outgrow the SMEM; a conv of width 1 (no window to prefetch) is refused too."""
  monkeypatch.setattr(mamba2_stack_gpu, "on_hopper", lambda: True)
  _, w, conv, ssm = jax.eval_shape(lambda: _inputs(1, 8192, 8, 128, 4, jnp.bfloat16, seed=0))
  args = (jax.ShapeDtypeStruct((1, 8192), jnp.bfloat16), w["w_in"], w["w_out"])
  monkeypatch.setattr(mamba2_stack_gpu, "_blocks", lambda: 132)
  assert mamba2_stack_gpu.supported(*args, conv, ssm, groups=1)
  no_window = jax.ShapeDtypeStruct(conv.shape[:2] + (0,) + conv.shape[3:], conv.dtype)
  assert not mamba2_stack_gpu.supported(*args, no_window, ssm, groups=1)
  monkeypatch.setattr(mamba2_stack_gpu, "_blocks", lambda: 16)  # still enough SMs for the heads and zx's tiles
  assert not mamba2_stack_gpu.supported(*args, conv, ssm, groups=1)


def test_lowers_for_the_gpu():
  """On any backend: the kernel traces and lowers to Mosaic GPU (register layouts, the union of the x tiles'
  views, the TMA reduce-adds), at a small shape."""
  h, w, conv, ssm = jax.eval_shape(lambda: _inputs(2, 256, 4, 64, 4, jnp.bfloat16, seed=0))
  step = jax.jit(functools.partial(_step, eps=1e-5, gate_norm_eps=1e-5))
  text = step.trace(h, w, conv, ssm).lower(lowering_platforms=("cuda",)).as_text()
  assert "mamba2_stack" in text


MAMBA2 = dict(model_type="mamba2", vocab_size=97, hidden_size=128, num_hidden_layers=3, state_size=64, head_dim=64,
              num_heads=4, n_groups=1, expand=2, conv_kernel=4, chunk_size=32, use_conv_bias=True,
              tie_word_embeddings=True)


def _decode_logits(hf, batch=1, steps=3):
  """Logits of a cached prefill's last position and of each decode step after it, on a bfloat16 random model
  (weights perturbed as in test_kernels_in_models, so that the scan's part shows in the logits): [S + 1, B, V]."""
  model = bench.random_model(hf)
  rng = np.random.default_rng(0)
  model = model.replace(params=jax.tree.map(lambda a: (a + rng.normal(0, 0.1, a.shape)).astype(a.dtype), model.params))
  c, fam = model.config, model.family
  forward = jax.jit(lambda p, t, cache: fam.forward(c, p, t, cache=cache))
  tokens = jnp.asarray(rng.integers(0, hf["vocab_size"], (batch, 20 + steps)), jnp.int32)
  logits, cache = forward(model.params, tokens[:, :20], fam.init_cache(c, batch, 64, jnp.bfloat16))
  out = [logits[:, -1]]
  for s in range(steps):
    logits, cache = forward(model.params, tokens[:, 20 + s : 21 + s], cache)
    out.append(logits[:, 0])
  return np.asarray(jnp.stack(out), np.float32)


def _emulated(h, norm_w, w_in, conv_w, conv_b, dt_bias, A_log, D, gate_norm_w, w_out, conv, ssm, *, eps, gate_norm_eps):
  """`mamba2_stack_gpu.step` in jnp (the loop the GPU tests hold the kernel to)."""
  w = dict(norm_w=norm_w, w_in=w_in, conv_w=conv_w, conv_b=conv_b, dt_bias=dt_bias, A_log=A_log, D=D,
           gate_norm_w=gate_norm_w, w_out=w_out)
  return _reference(h, w, conv, ssm, eps, gate_norm_eps)


@pytest.mark.parametrize("hf,batch,used", [
    pytest.param(MAMBA2, 1, True, id="mamba2"),
    pytest.param(dict(MAMBA2, use_conv_bias=False, layer_norm_epsilon=1e-3, state_size=128), 1, True,
                 id="no-conv-bias-q128"),
    pytest.param(MAMBA2, 2, False, id="batch-2"),
    pytest.param(dict(MAMBA2, n_groups=2), 1, False, id="groups-2"),
    pytest.param(dict(MAMBA2, use_bias=True), 1, False, id="biases"),
])
def test_model_decode_dispatch(monkeypatch, hf, batch, used):
  """hybrid.forward's decode step hands a Mamba-2 stack for one sequence to the kernel (here its jnp emulation,
  with `supported` as on a Hopper GPU) and takes the layer-by-layer path otherwise: the logits match that path's
  either way, and the kernel is called exactly where it applies."""
  ref = _decode_logits(hf, batch)
  calls = []
  monkeypatch.setattr(mamba2_stack_gpu, "on_hopper", lambda: True)
  monkeypatch.setattr(mamba2_stack_gpu, "step", lambda *a, **kw: calls.append(1) or _emulated(*a, **kw))
  out = _decode_logits(hf, batch)
  assert bool(calls) == used
  for s, (o, r) in enumerate(zip(out, ref, strict=True)):
    assert rel_err(o, r) < 3e-2, (s, rel_err(o, r))  # bfloat16 residual (the path) against float32 (the kernel)
  if used:
    assert np.abs(out - ref).max() > 0  # the kernel's path ran: its float32 residual rounds differently


@pytest.mark.skipif(not on_hopper(), reason="needs a Hopper GPU (the kernel cannot be interpreted)")
def test_model_decode_on_gpu(monkeypatch):
  """The model's decode steps with the kernel against the layer-by-layer path (itself on its own kernels)."""
  monkeypatch.setattr(mamba2_stack_gpu, "ENABLED", False)
  ref = _decode_logits(MAMBA2)
  monkeypatch.setattr(mamba2_stack_gpu, "ENABLED", True)
  calls = []
  step = mamba2_stack_gpu.step
  monkeypatch.setattr(mamba2_stack_gpu, "step", lambda *a, **kw: calls.append(1) or step(*a, **kw))
  out = _decode_logits(MAMBA2)
  assert calls
  for s, (o, r) in enumerate(zip(out, ref, strict=True)):
    assert rel_err(o, r) < 3e-2, (s, rel_err(o, r))
