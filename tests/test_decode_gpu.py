"""The Mosaic GPU decode-attention kernel against the jnp reference.

On the CPU the kernel runs in Mosaic GPU interpret mode (small shapes); with JAX_PLATFORMS=cuda the same
tests compile and run the real kernel, plus a large case.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from xlazoo.ops import attention
from xlazoo.ops.pallas import decode_gpu

ON_GPU = jax.default_backend() == "gpu"
INTERPRET = not ON_GPU


def _inputs(B, S, K, G, H, lengths, dtype, seed=0, fill=None):
  kq, kk, kv = jax.random.split(jax.random.key(seed), 3)
  q = jax.random.normal(kq, (B, K * G, H), jnp.float32).astype(dtype)
  k = jax.random.normal(kk, (B, S, K, H), jnp.float32).astype(dtype)
  v = jax.random.normal(kv, (B, S, K, H), jnp.float32).astype(dtype)
  lengths = jnp.asarray(lengths, jnp.int32)
  if fill is not None:  # slots at or past each row's length hold `fill`
    past = (jnp.arange(S)[None, :] >= lengths[:, None])[:, :, None, None]
    k, v = jnp.where(past, jnp.asarray(fill, dtype), k), jnp.where(past, jnp.asarray(fill, dtype), v)
  return q, k, v, lengths


def _reference(q, k, v, lengths, **kw):
  f32 = lambda x: x.astype(jnp.float32)
  return attention.decode_attention(f32(q), f32(k), f32(v), lengths, **kw)


def _kernel(q, k, v, lengths, **kw):
  if ON_GPU and not decode_gpu.supported(q, k, window=kw.get("window", 0), softcap=kw.get("softcap")):
    pytest.skip(f"{q.dtype} / these shapes go to the reference on the GPU")
  return decode_gpu.decode_attention(q, k, v, lengths, interpret=INTERPRET, **kw)


def _rel_err(out, ref):
  out, ref = np.asarray(out, np.float32), np.asarray(ref, np.float32)
  assert np.isfinite(out).all()
  return np.abs(out - ref).max() / np.abs(ref).max()


def _tol(dtype):
  return 2e-2 if dtype == jnp.bfloat16 else (1e-5 if INTERPRET else 2e-3)


def _check(B, S, K, G, H, lengths, dtype, **kw):
  q, k, v, lengths = _inputs(B, S, K, G, H, lengths, dtype)
  kw = dict(scale=H**-0.5, **kw)
  out = _kernel(q, k, v, lengths, **kw)
  assert out.shape == q.shape and out.dtype == q.dtype
  assert _rel_err(out, _reference(q, k, v, lengths, **kw)) < _tol(dtype)


@pytest.mark.parametrize(
    "S, K, G, H, lengths, dtype, window, softcap",
    [
        (320, 2, 4, 64, [1, 320], jnp.float32, 0, None),  # length 1 beside a full row
        (256, 1, 8, 128, [130, 77], jnp.bfloat16, 0, None),
        (192, 2, 1, 64, [191, 64], jnp.bfloat16, 50, None),  # window
        (128, 1, 4, 64, [100, 3], jnp.float32, 0, 5.0),  # soft-cap
        pytest.param(192, 1, 4, 128, [150, 1], jnp.bfloat16, 70, 20.0, marks=pytest.mark.slow),  # both
    ],
)
def test_matches_reference(S, K, G, H, lengths, dtype, window, softcap):
  _check(2, S, K, G, H, lengths, dtype, window=window, softcap=softcap)


@pytest.mark.slow
def test_many_tiles_per_split(monkeypatch):
  """Fewer, longer splits: each block streams several tiles through the shared-memory stages. Splits are
  sized per row in whole tiles: 8 tiles as 4 + 4, 5 as 3 + 2; with a window, from the tile of its start."""
  monkeypatch.setattr(decode_gpu, "SPLITS", 2)
  _check(2, 512, 1, 4, 64, [512, 300], jnp.bfloat16)
  _check(1, 512, 1, 4, 64, [460], jnp.bfloat16 if ON_GPU else jnp.float32, window=300, softcap=10.0)


def test_traced_window_in_jit():
  q, k, v, lengths = _inputs(2, 192, 1, 4, 64, [180, 40], jnp.bfloat16)
  f = jax.jit(lambda q, k, v, lengths, w: _kernel(q, k, v, lengths, scale=0.125, window=w))
  for w in (0, 33, 100):
    ref = _reference(q, k, v, lengths, scale=0.125, window=w)
    assert _rel_err(f(q, k, v, lengths, jnp.int32(w)), ref) < 2e-2


def test_stacked_cache_layer_in_jit():
  """A stacked [L, B, S, K, H] cache with a traced layer index reads that layer in place."""
  layers = [_inputs(2, 128, 1, 4, 64, [100, 9], jnp.bfloat16, seed=s) for s in range(3)]
  q, lengths = layers[0][0], layers[0][3]
  k_L, v_L = jnp.stack([x[1] for x in layers]), jnp.stack([x[2] for x in layers])
  f = jax.jit(lambda k, v, layer: decode_gpu.decode_attention(q, k, v, lengths, scale=0.125, layer=layer, interpret=INTERPRET))
  for layer in (0, 2):
    ref = _reference(q, k_L[layer], v_L[layer], lengths, scale=0.125)
    assert _rel_err(f(k_L, v_L, jnp.int32(layer)), ref) < 2e-2


@pytest.mark.parametrize("window", [0, 45])
def test_slots_past_length_never_used(window):
  """NaN in every slot at or past a row's length leaves the output finite and unchanged."""
  kw = dict(scale=0.125, window=window)
  q, k, v, lengths = _inputs(2, 192, 1, 4, 64, [1, 97], jnp.bfloat16, fill=jnp.nan)
  _, k0, v0, _ = _inputs(2, 192, 1, 4, 64, [1, 97], jnp.bfloat16, fill=0.0)
  out = _kernel(q, k, v, lengths, **kw)
  np.testing.assert_array_equal(np.asarray(out, np.float32), np.asarray(_kernel(q, k0, v0, lengths, **kw), np.float32))
  assert _rel_err(out, _reference(q, k0, v0, lengths, **kw)) < 2e-2


def test_supported(monkeypatch):
  q, k, _, _ = _inputs(1, 128, 2, 4, 128, [5], jnp.bfloat16)
  assert decode_gpu.supported(q, k, window=0, softcap=None) == ON_GPU
  monkeypatch.setattr(decode_gpu, "on_hopper", lambda: True)  # the shape rules, on any machine
  assert decode_gpu.supported(q, k, window=0, softcap=None)
  assert not decode_gpu.supported(q, k[:, :100], window=0, softcap=None)  # S: not whole tiles of 64
  with pytest.raises(ValueError, match="unsupported shapes"):
    decode_gpu.decode_attention(q, k[:, :100], k[:, :100], jnp.array([5]), scale=0.1)
  assert not decode_gpu.supported(q.astype(jnp.float32), k.astype(jnp.float32), window=0, softcap=None)
  assert not decode_gpu.supported(q[..., :32], k[..., :32], window=0, softcap=None)  # H = 32


@pytest.mark.skipif(not ON_GPU, reason="large shapes need the real kernel")
@pytest.mark.parametrize("window, softcap", [(0, None), (4096, 30.0)])
def test_large_cache(window, softcap):
  B, S, K, G, H = 8, 32768, 8, 4, 128
  lengths = jax.random.randint(jax.random.key(1), (B,), 1, S + 1).at[0].set(1).at[1].set(S)
  _check(B, S, K, G, H, lengths, jnp.bfloat16, window=window, softcap=softcap)


@pytest.mark.skipif(not ON_GPU, reason="a grid of several waves needs the real kernel")
def test_layer_loop_over_stacked_cache():
  """As a decode step runs it: a jitted loop over 16 layers of a stacked cache, batch 4 (1024 CTAs, several
  waves), each layer its own query; every layer must match the reference on that layer."""
  L, B, S, K, G, H = 16, 4, 8192, 8, 4, 128
  ks = jax.random.split(jax.random.key(2), 3)
  q_L = jax.random.normal(ks[0], (L, B, K * G, H)).astype(jnp.bfloat16)
  k_L, v_L = (jax.random.normal(k, (L, B, S, K, H)).astype(jnp.bfloat16) for k in ks[1:])
  lengths = jnp.array([2733, 1, 8192, 1654], jnp.int32)

  def run(attend):
    def layers(q, k, v):
      body = lambda l, out: out.at[l].set(attend(q, k, v, l))  # noqa: E731
      return jax.lax.fori_loop(0, L, body, jnp.zeros(q.shape, jnp.float32))
    return jax.jit(layers)(q_L, k_L, v_L)

  out = run(lambda q, k, v, l: decode_gpu.decode_attention(q[l], k, v, lengths, scale=H**-0.5, layer=l).astype(jnp.float32))
  ref = run(lambda q, k, v, l: _reference(q[l], k[l], v[l], lengths, scale=H**-0.5))
  errs = [_rel_err(out[l], ref[l]) for l in range(L)]
  assert max(errs) < 2e-2, errs


@pytest.mark.parametrize("H", [64, 128])
def test_lowers_to_mosaic_gpu(H):
  """The compiled kernel (wgmma, register layouts, TMA of the stacked cache) lowers to Mosaic GPU, also on
  a CPU-only machine, with a traced layer and window."""
  S = jax.ShapeDtypeStruct
  args = (S((2, 8, H), jnp.bfloat16), S((3, 2, 256, 2, H), jnp.bfloat16), S((3, 2, 256, 2, H), jnp.bfloat16),
          S((2,), jnp.int32), S((), jnp.int32), S((), jnp.int32))
  f = lambda q, k, v, lengths, layer, w: decode_gpu.decode_attention(  # noqa: E731
      q, k, v, lengths, scale=0.1, window=w, softcap=30.0, layer=layer)
  lowered = jax.jit(f).trace(*args).lower(lowering_platforms=("cuda",))
  assert lowered.as_text().count("custom_call @mosaic_gpu") == 1
