"""The Mosaic GPU layer-GEMV kernel (x @ w[layer] read in place from a stacked weight) against the reference.

On the CPU the kernel runs in Mosaic GPU interpret mode (small shapes); with JAX_PLATFORMS=cuda the same
tests compile and run the real kernel, plus the real decode shapes, a throughput print and an HLO check.
"""

import re
import time

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax import lax

from xlazoo.ops.pallas import matvec_gpu, on_hopper

ON_GPU = jax.default_backend() == "gpu"
INTERPRET = not ON_GPU
TOL = 1e-2  # max |diff| / max |ref| of the bf16 kernel against the float32 reference


def _inputs(M, K, N, L, dtype=jnp.bfloat16, seed=0):
  kx, kw = jax.random.split(jax.random.key(seed))
  x_MK = jax.random.normal(kx, (M, K), jnp.float32).astype(dtype)
  w_LKN = jax.random.normal(kw, (L, K, N), jnp.float32).astype(dtype)
  return x_MK, w_LKN


def _reference(x_MK, w_LKN, layer):
  f32 = lambda a: a.astype(jnp.float32)
  return jnp.einsum("MK,KN->MN", f32(x_MK), f32(w_LKN[layer]), precision=lax.Precision.HIGHEST)


def _rel_err(out, ref):
  out, ref = np.asarray(out, np.float32), np.asarray(ref, np.float32)
  assert np.isfinite(out).all()
  return np.abs(out - ref).max() / np.abs(ref).max()


def _kernel_fn():
  """The kernel, jitted with a traced layer index."""
  return jax.jit(lambda x, w, layer: matvec_gpu.layer_matmul(x, w, layer, interpret=INTERPRET))


def _check(M, K, N, L=3, dtype=jnp.bfloat16, layers=None):
  x_MK, w_LKN = _inputs(M, K, N, L, dtype)
  if ON_GPU and not matvec_gpu.supported(x_MK, w_LKN):
    pytest.skip("not a Hopper GPU: these shapes go to the reference")
  f = _kernel_fn()
  for layer in range(L) if layers is None else layers:
    y_MN = f(x_MK, w_LKN, jnp.int32(layer))
    assert y_MN.shape == (M, N) and y_MN.dtype == jnp.float32
    assert _rel_err(y_MN, _reference(x_MK, w_LKN, layer)) < TOL, (M, K, N, layer)


@pytest.mark.parametrize(
    "M, K, N",
    [
        (1, 256, 208),  # ragged N: the last column tile overlaps the one before; 32-byte swizzle
        (3, 200, 256),  # ragged K: the last K tile overlaps, its first rows meet zeros in x
        (8, 128, 224),  # 64-byte swizzle
        (64, 192, 128),  # a full wgmma tile of rows
    ],
)
def test_matches_reference(M, K, N):
  _check(M, K, N)


@pytest.mark.slow
@pytest.mark.parametrize("blocks", [1, 2, 7])
def test_block_splits(blocks):
  """One block taking every tile (many segments), and blocks whose units start and end inside a column tile."""
  x_MK, w_LKN = _inputs(5, 320, 272, 2)
  if ON_GPU and not matvec_gpu.supported(x_MK, w_LKN):
    pytest.skip("not a Hopper GPU")
  y_MN = matvec_gpu._layer_matmuls(x_MK, [w_LKN], jnp.int32(1), interpret=INTERPRET, blocks=blocks)[0]
  assert _rel_err(y_MN, _reference(x_MK, w_LKN, 1)) < TOL


@pytest.mark.slow
def test_float16_few_stages():
  x_MK, w_LKN = _inputs(2, 384, 192, 2, jnp.float16)
  if ON_GPU and not matvec_gpu.supported(x_MK, w_LKN):
    pytest.skip("not a Hopper GPU")
  y_MN = matvec_gpu._layer_matmuls(x_MK, [w_LKN], 1, interpret=INTERPRET, stages=2)[0]
  assert _rel_err(y_MN, _reference(x_MK, w_LKN, 1)) < TOL


@pytest.mark.parametrize("blocks", [2, 5])
def test_several_weights_in_one_launch(blocks):
  """q, k, v style: weights of different widths (ragged, a single tile) side by side; blocks whose units
  cross from one weight to the next."""
  x_MK, w_LKN = _inputs(2, 192, 208, 3)
  ws = [w_LKN, w_LKN[..., :128] * 2, w_LKN[..., 16:]]  # widths 208, 128, 192
  if ON_GPU and not matvec_gpu.supported(x_MK, *ws):
    pytest.skip("not a Hopper GPU")
  ys = matvec_gpu._layer_matmuls(x_MK, ws, jnp.int32(2), interpret=INTERPRET, blocks=blocks)
  assert [y.shape for y in ys] == [(2, 208), (2, 128), (2, 192)]
  for y, w in zip(ys, ws):
    assert _rel_err(y, _reference(x_MK, w, 2)) < TOL


@pytest.mark.parametrize("blocks, direct", [(4, True), (1, True), (3, False)])
def test_out_dtype_rounds_in_the_kernel(blocks, direct):
  """out_dtype: where every column tile's sum lies in one block (4 column tiles of 3 K tiles each, on 4
  blocks or on 1), the kernel rounds it and writes it finished, the same bits as its float32 result rounded
  by XLA; where tiles are split across blocks (3 blocks of 4 units) the result stays float32. Two weights
  side by side, 384 and 128 wide."""
  x_MK, w_LKN = _inputs(3, 192, 384, 2)
  ws = [w_LKN, w_LKN[..., 64:192] * 2]
  if ON_GPU and not matvec_gpu.supported(x_MK, *ws):
    pytest.skip("not a Hopper GPU")
  run = lambda out_dtype: matvec_gpu._layer_matmuls(x_MK, ws, 1, out_dtype=out_dtype, interpret=INTERPRET,  # noqa: E731
                                                    blocks=blocks, block_k=64)
  f32, rounded = run(None), run(jnp.bfloat16)
  for y32, y, w in zip(f32, rounded, ws):
    assert y32.dtype == jnp.float32 and y.shape == y32.shape
    assert y.dtype == (jnp.bfloat16 if direct else jnp.float32)
    np.testing.assert_array_equal(np.asarray(y.astype(jnp.float32)), np.asarray(y32.astype(y.dtype).astype(jnp.float32)))
    assert _rel_err(y, _reference(x_MK, w, 1)) < TOL


@pytest.mark.parametrize("M, K, Ns, offset, scale_dtype, blocks, layer", [
    (1, 256, (256,), 0.0, jnp.bfloat16, 2, 1),  # decode at batch 1; 2 blocks of 2 column tiles: direct
    (3, 384, (128, 192), 1.0, jnp.float32, 3, 2),  # Gemma's 1 + scale (float32); two weights, split K tiles
    (8, 128, (208,), 0.0, jnp.bfloat16, 2, 7),  # all 8 rows; ragged N; the layer clamped to the last
])
def test_norm_in_the_kernel(M, K, Ns, offset, scale_dtype, blocks, layer):
  """norm=(scale stack, eps, offset): the kernel computes rms_norm(x, scale[layer], eps, offset) itself (each
  row's 1 / rms in every block, the scale per K tile) and matches the GEMV of the norm that XLA computes."""
  from xlazoo.ops.norms import rms_norm

  x_MK, w_LKN = _inputs(M, K, max(Ns), 3)
  ws = [w_LKN[..., :N] for N in Ns]
  if ON_GPU and not matvec_gpu.norm_supported(x_MK, w_LKN[:, 0], *ws):
    pytest.skip("not a Hopper GPU")
  x_MK = x_MK * 4.0  # rms 4: a norm left out shows
  n_LK = (jax.random.normal(jax.random.key(5), (3, K)) * 0.5 + 1.0 - offset).astype(scale_dtype)
  eps = 1e-5
  ys = matvec_gpu._layer_matmuls(x_MK, ws, jnp.int32(layer), norm=(n_LK, eps, offset), out_dtype=x_MK.dtype,
                                 interpret=INTERPRET, blocks=blocks)
  h_MK = rms_norm(x_MK, n_LK[min(layer, 2)], eps, offset)
  for y, w in zip(ys, ws):
    assert y.shape == (M, w.shape[2])
    assert _rel_err(y, _reference(h_MK, w, min(layer, 2))) < TOL


@pytest.mark.skipif(not ON_GPU, reason="the real shapes need the real kernel")
@pytest.mark.parametrize("K, Ns", [(2560, (10624,)), (4096, (4096, 1024, 1024)), (4096, (14336, 14336))],
                         ids=["mamba2-in_proj", "llama-qkv", "llama-gate_up"])
@pytest.mark.parametrize("M", [1, 8])
def test_norm_in_the_kernel_real_shapes(M, K, Ns):
  """The decode GEMVs that follow a norm, at their real shapes and grids (blocks that split a column tile's K
  tiles: q/k/v), every layer."""
  from xlazoo.ops.norms import rms_norm

  L = 3
  x_MK, _ = _inputs(M, K, 128, 1)
  ws = [_inputs(M, K, N, L, seed=i + 1)[1] for i, N in enumerate(Ns)]
  n_LK = (jax.random.normal(jax.random.key(5), (L, K)) * 0.5 + 1.0).astype(jnp.bfloat16)
  if not matvec_gpu.norm_supported(x_MK, n_LK, *ws):
    pytest.skip("not a Hopper GPU")
  f = jax.jit(lambda x, n, ws, layer: matvec_gpu.layer_matmuls(x, ws, layer, norm=(n, 1e-5, 0.0), out_dtype=x.dtype))
  for layer in range(L):
    ys = f(x_MK * 4.0, n_LK, ws, jnp.int32(layer))
    h_MK = rms_norm(x_MK * 4.0, n_LK[layer], 1e-5)
    for y, w in zip(ys, ws):
      assert _rel_err(y, _reference(h_MK, w, layer)) < TOL, (layer, w.shape)


def test_norm_rejects_what_it_cannot_do():
  x_MK, w_LKN = _inputs(9, 128, 128, 2)
  n_LK = jnp.ones((2, 128), jnp.bfloat16)
  with pytest.raises(ValueError, match="no norm"):  # 9 rows
    matvec_gpu.layer_matmul(x_MK, w_LKN, 0, norm=(n_LK, 1e-6, 0.0), interpret=INTERPRET)
  x_MK, w_LKN = _inputs(1, 192, 128, 2)
  with pytest.raises(ValueError, match="no norm"):  # K not a multiple of 128
    matvec_gpu.layer_matmul(x_MK, w_LKN, 0, norm=(jnp.ones((2, 192)), 1e-6, 0.0), interpret=INTERPRET)


def test_layer_out_of_range_clamps_like_indexing():
  x_MK, w_LKN = _inputs(1, 128, 128, 2)
  if ON_GPU and not matvec_gpu.supported(x_MK, w_LKN):
    pytest.skip("not a Hopper GPU")
  y_MN = matvec_gpu.layer_matmul(x_MK, w_LKN, 5, interpret=INTERPRET)
  assert _rel_err(y_MN, _reference(x_MK, w_LKN, 1)) < TOL


def test_grid_shares_start_on_column_tiles(monkeypatch):
  """The grid: the most blocks (from half the SMs up) whose equal shares of the units start and end on
  column tiles or equal parts of one; Llama-3-8B's and Mamba-2 2.7B's GEMVs on an H100's 132 SMs."""
  monkeypatch.setattr(jax, "devices", lambda: [type("Device", (), {"core_count": 132})()])
  shapes = {"q/k/v": (48, 64), "o": (32, 64), "gate/up": (224, 64), "down": (32, 224), "in_proj": (83, 40),
            "out_proj": (20, 80)}
  assert {k: matvec_gpu._blocks(*v) for k, v in shapes.items()} == {
      "q/k/v": 96, "o": 128, "gate/up": 112, "down": 128, "in_proj": 83, "out_proj": 100}
  assert matvec_gpu._blocks(7, 61) == 128  # nothing aligned (427 units): a multiple of 16 SMs


def test_supported(monkeypatch):
  x_MK, w_LKN = _inputs(8, 128, 256, 2)
  assert matvec_gpu.supported(x_MK, w_LKN) == on_hopper()
  monkeypatch.setattr(matvec_gpu, "on_hopper", lambda: True)  # the shape rules, on any machine
  assert matvec_gpu.supported(x_MK, w_LKN)
  f32 = lambda a: a.astype(jnp.float32)
  assert not matvec_gpu.supported(f32(x_MK), f32(w_LKN))
  assert not matvec_gpu.supported(x_MK, w_LKN.astype(jnp.float16))  # dtypes differ
  assert not matvec_gpu.supported(jnp.zeros((65, 128), jnp.bfloat16), w_LKN)  # M > 64
  assert not matvec_gpu.supported(x_MK, w_LKN[..., :200])  # N: not a multiple of 16
  assert not matvec_gpu.supported(x_MK, w_LKN[..., :112])  # N < the column tile
  assert not matvec_gpu.supported(x_MK, w_LKN[:, :100])  # K mismatch
  assert matvec_gpu.supported(x_MK, w_LKN, w_LKN[..., :128])  # several weights of one x
  assert not matvec_gpu.supported(x_MK, w_LKN, w_LKN[:1])  # L differs
  assert not matvec_gpu.supported(x_MK)  # no weight


def test_unsupported_shapes_raise():
  x_MK, w_LKN = _inputs(8, 128, 256, 2)
  with pytest.raises(ValueError, match="unsupported shapes"):
    matvec_gpu.layer_matmul(jnp.zeros((65, 128), jnp.bfloat16), w_LKN, 0, interpret=INTERPRET)
  with pytest.raises(ValueError, match="bf16 or f16 alike"):
    matvec_gpu.layer_matmul(x_MK.astype(jnp.float32), w_LKN, 0, interpret=INTERPRET)


@pytest.mark.parametrize("M, K, N", [(1, 4096, 14336), (8, 2560, 10576), (64, 14336, 4096), (3, 200, 208), (5, 320, 224)])
def test_lowers_for_cuda(M, K, N):
  """The Mosaic GPU lowering (layouts, TMA tiling, wgmma operands) accepts the kernel, checked without a GPU."""
  x = jax.ShapeDtypeStruct((M, K), jnp.bfloat16)
  w = jax.ShapeDtypeStruct((3, K, N), jnp.bfloat16)
  f = jax.jit(lambda x, w, layer: matvec_gpu._layer_matmuls(x, [w, w[..., :N - 64]], layer, blocks=132)
              + matvec_gpu._layer_matmuls(x, [w[..., :N // 128 * 128]], layer, out_dtype=jnp.bfloat16, blocks=N // 128)
              + (matvec_gpu._layer_matmuls(x, [w, w[..., :N - 64]], layer, norm=(w[:, :, 0], 1e-6, 0.0), blocks=132)
                 if M <= 8 and K % 128 == 0 else []))  # with the norm inside
  traced = f.trace(x, w, jax.ShapeDtypeStruct((), jnp.int32))
  try:
    lowered = traced.lower(lowering_platforms=("cuda",))
  except TypeError:  # no cross-platform lowering in this JAX
    pytest.skip("this JAX cannot lower for cuda from here")
  assert "mosaic_gpu" in lowered.as_text()


# The real decode shapes (Llama-3-8B, Mamba-2, Nemotron-H widths), GPU only.
REAL_KN = [(4096, 14336), (14336, 4096), (4096, 1024), (2560, 10576), (5120, 28672), (4096, 4096)]


@pytest.mark.skipif(not ON_GPU, reason="the real shapes need the real kernel")
@pytest.mark.parametrize("K, N", REAL_KN)
@pytest.mark.parametrize("M", [1, 8, 64])
def test_real_shapes(M, K, N):
  _check(M, K, N, L=3)


def _stack_copies(hlo: str, L: int, K: int, N: int) -> list[str]:
  """Instructions of the optimised HLO that materialise a [K, N] layer or the [L, K, N] stack."""
  dims = (f"[{L},{K},{N}]", f"[{K},{N}]")
  free = {"parameter", "get-tuple-element", "tuple", "bitcast", "while", "call", "conditional", "opt-barrier"}
  found = []
  for line in hlo.splitlines():
    m = re.match(r"\s*(?:ROOT\s+)?%?[\w.\-]+\s*=\s*\w+(\[[\d,]*\])\S*\s+([\w\-]+)\(", line)
    if m and m.group(1) in dims and m.group(2) not in free:
      found.append(line.strip())
  return found


def _scan_layers(matmul, x_MK, w_LKN):
  """A decode-like scan over the layers, the weight stack closed over (not scanned over)."""
  L, _, N = w_LKN.shape

  def body(acc_MN, layer):
    return acc_MN + matmul(x_MK, w_LKN, layer), None

  return lax.scan(body, jnp.zeros((x_MK.shape[0], N), jnp.float32), jnp.arange(L, dtype=jnp.int32))[0]


def test_stack_copy_detector_sees_the_reference_slice():
  """The HLO check below is meaningful: it flags the reference's w[layer] slice (on the CPU)."""
  if ON_GPU:
    pytest.skip("on the GPU, XLA may or may not materialise the reference's slice; the CPU check suffices")
  x_MK, w_LKN = _inputs(8, 256, 384, 3)
  ref = lambda x, w, layer: jnp.einsum("MK,KN->MN", x, w[layer], preferred_element_type=jnp.float32)
  hlo = jax.jit(lambda x, w: _scan_layers(ref, x, w)).lower(x_MK, w_LKN).compile().as_text()
  assert _stack_copies(hlo, 3, 256, 384)


@pytest.mark.skipif(not ON_GPU, reason="the optimised GPU HLO")
def test_scan_over_layers_does_not_copy_the_stack():
  L, K, N = 4, 4096, 14336
  x_MK, w_LKN = _inputs(1, K, N, L)
  if not matvec_gpu.supported(x_MK, w_LKN):
    pytest.skip("not a Hopper GPU")
  f = jax.jit(lambda x, w: _scan_layers(matvec_gpu.layer_matmul, x, w))
  hlo = f.lower(x_MK, w_LKN).compile().as_text()
  assert not _stack_copies(hlo, L, K, N), "\n".join(_stack_copies(hlo, L, K, N))
  ref = sum(_reference(x_MK, w_LKN, layer) for layer in range(L))
  assert _rel_err(f(x_MK, w_LKN), ref) < TOL


def _time(f, *args, reps=20):
  jax.block_until_ready(f(*args))
  best = float("inf")
  for _ in range(reps):
    t0 = time.perf_counter()
    jax.block_until_ready(f(*args))
    best = min(best, time.perf_counter() - t0)
  return best


@pytest.mark.skipif(not ON_GPU, reason="timing needs the GPU")
@pytest.mark.parametrize("K, N", REAL_KN)
@pytest.mark.parametrize("M", [1, 8])
def test_throughput(M, K, N):
  """Prints the kernel's achieved HBM bandwidth in a scan over 8 layers beside the reference's (no assertion)."""
  L = 8
  x_MK, w_LKN = _inputs(M, K, N, L)
  if not matvec_gpu.supported(x_MK, w_LKN):
    pytest.skip("not a Hopper GPU")
  ref = lambda x, w, layer: jnp.einsum("MK,KN->MN", x, w[layer], preferred_element_type=jnp.float32)
  nbytes = L * K * N * w_LKN.dtype.itemsize
  line = [f"layer_matmul M={M} K={K} N={N}:"]
  for name, matmul in (("kernel", matvec_gpu.layer_matmul), ("reference", ref)):
    seconds = _time(jax.jit(lambda x, w, matmul=matmul: _scan_layers(matmul, x, w)), x_MK, w_LKN)
    line.append(f"{name} {seconds / L * 1e6:.1f} us/layer {nbytes / seconds / 1e12:.2f} TB/s;")
  print(" ".join(line))


def test_linears_send_one_layers_weights_to_one_launch(monkeypatch):
  """mlp.linears in a decode step: q, k, v as LayerWeights of [L, D, N, H] stacks go to one layer_matmuls
  launch (on a CPU too, with the kernel interpreted) and give what the einsums on w[layer] give, biases added."""
  from xlazoo.ops.mlp import LayerWeight, linear, linears

  launches = []

  def spy(x_MK, ws_LKN, layer, **kw):
    launches.append(len(ws_LKN))
    return matvec_gpu._layer_matmuls(x_MK, list(ws_LKN), layer, interpret=INTERPRET, **kw)

  monkeypatch.setattr(matvec_gpu, "supported", lambda x_MK, *ws: True)
  monkeypatch.setattr(matvec_gpu, "layer_matmuls", spy)
  ks = jax.random.split(jax.random.key(3), 5)
  x_BTD = jax.random.normal(ks[0], (2, 1, 128), jnp.bfloat16)
  stacks = [jax.random.normal(k, (3, 128) + s, jnp.bfloat16) for k, s in zip(ks[1:], [(4, 32), (2, 64), (2, 64)])]
  biases = [None, jax.random.normal(ks[4], (2, 64), jnp.bfloat16), None]
  subs = ["BTD,DNH->BTNH", "BTD,DKH->BTKH", "BTD,DKH->BTKH"]
  layer = jnp.int32(1)
  outs = linears(x_BTD, [LayerWeight(w, layer) for w in stacks], subs, biases)
  assert launches == [3]
  for out, w, sub, b in zip(outs, stacks, subs, biases):
    want = linear(x_BTD.astype(jnp.float32), w[1].astype(jnp.float32), sub, None if b is None else b.astype(jnp.float32))
    assert out.shape == want.shape and out.dtype == jnp.bfloat16
    assert _rel_err(out, want) < TOL
