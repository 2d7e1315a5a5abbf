"""TPU flash attention (forward and gradients) and decode attention against the reference `attention`.

On CPU the kernels run in TPU interpret mode (pltpu.InterpretParams: uninitialised memory and
out-of-range block padding read as NaN); with JAX_PLATFORMS=tpu the same tests run the compiled kernels.
"""

import itertools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.experimental.pallas import tpu as pltpu
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from xlazoo.ops.attention import attention
from xlazoo.ops.pallas import attention_tpu as at
from xlazoo.ops.pallas import partitioned

ON_TPU = jax.default_backend() == "tpu"
INTERPRET = False if ON_TPU else pltpu.InterpretParams()
f32, bf16 = jnp.float32, jnp.bfloat16


def _rel(x, ref):
  return float(jnp.max(jnp.abs(x.astype(f32) - ref)) / jnp.max(jnp.abs(ref)))


def _qkv(B, T, S, N, K, H, dtype, seed=0, decode=False):
  kq, kk, kv, kc = jax.random.split(jax.random.key(seed), 4)
  q = jax.random.normal(kq, (B, N, H) if decode else (B, T, N, H), f32).astype(dtype)
  k = jax.random.normal(kk, (B, S, K, H), f32).astype(dtype)
  v = jax.random.normal(kv, (B, S, K, H), f32).astype(dtype)
  return q, k, v, jax.random.normal(kc, q.shape, f32)


def _ref_causal(q, k, v, **kw):
  B, T = q.shape[:2]
  pos = jnp.broadcast_to(jnp.arange(T, dtype=jnp.int32), (B, T))
  return attention(q.astype(f32), k.astype(f32), v.astype(f32), pos, pos, **kw)


# Interpret-mode programs are large and run once: compile them with XLA's cheapest backend settings.
_FAST = {} if ON_TPU else {"xla_backend_optimization_level": 0}


def _run(fn, *args):
  return jax.jit(fn).trace(*args).lower().compile(compiler_options=_FAST)(*args)


def _out_and_grads(fn, cot, *args):
  """fn(*args) and the gradients of sum(fn(*args) * cot), in one compiled program."""
  loss = lambda *a: (lambda o: (jnp.sum(o.astype(f32) * cot), o))(fn(*a))  # noqa: E731
  (_, o), grads = _run(jax.value_and_grad(loss, argnums=(0, 1, 2), has_aux=True), *args)
  return o, grads


FLASH = [  # dtype, B, T, N, K, H, window, softcap, block_q, block_k (GQA 1 and a traced window: the scan test)
    (f32, 1, 300, 8, 2, 64, 70, None, 128, 256),  # GQA 4, H 64, window, block_q != block_k
    (bf16, 1, 260, 8, 1, 128, 0, 20.0, 256, 128),  # GQA 8, soft-cap
    (bf16, 1, 200, 4, 1, 128, 33, 10.0, None, None),  # GQA 4, window + soft-cap, default blocks (128, 256)
]


@pytest.mark.parametrize("case", [pytest.param(c, marks=pytest.mark.slow) if i == 1 else c for i, c in enumerate(FLASH)])
def test_flash_forward_and_grads(case):
  dtype, B, T, N, K, H, window, softcap, bq, bk = case
  q, k, v, cot = _qkv(B, T, T, N, K, H, dtype)
  kw = dict(scale=H**-0.5, window=window, softcap=softcap)
  kernel = lambda q, k, v: at.flash_attention(q, k, v, interpret=INTERPRET, block_q=bq, block_k=bk, **kw)  # noqa: E731
  reference = lambda q, k, v: _ref_causal(q, k, v, **kw)  # noqa: E731
  o, grads = _out_and_grads(kernel, cot, q, k, v)
  r, ref_grads = _out_and_grads(reference, cot, *(x.astype(f32) for x in (q, k, v)))
  assert o.shape == q.shape and o.dtype == dtype
  tol = 2e-2 if dtype == bf16 else 1e-4
  assert _rel(o, r) < tol
  for name, g, r in zip("qkv", grads, ref_grads):
    assert g.shape == r.shape and g.dtype == dtype, name
    assert _rel(g, r) < tol, (name, _rel(g, r))


def test_flash_traced_window_in_scan():
  """GQA 1, a ragged tail, and a per-layer window (Gemma 2) scanned, so traced: one compiled kernel serves every
  window (0 = none), gradients included."""
  q, k, v, cot = _qkv(2, 200, 200, 2, 2, 128, f32, seed=1)
  windows = jnp.array([0, 40], jnp.int32)

  def value_and_grads(attn):
    def loss(q, k, v):
      step = lambda c, w: (c + jnp.sum(attn(q, k, v, w) * cot * (w + 1)), None)  # noqa: E731
      return jax.lax.scan(step, 0.0, windows)[0]
    return _run(jax.value_and_grad(loss, argnums=(0, 1, 2)), q, k, v)

  val, grads = value_and_grads(lambda q, k, v, w: at.flash_attention(
      q, k, v, scale=0.1, window=w, interpret=INTERPRET, block_q=128, block_k=128))
  rval, rgrads = value_and_grads(lambda q, k, v, w: _ref_causal(q, k, v, scale=0.1, window=w))
  assert abs(float(val - rval)) < 1e-4 * abs(float(rval)) + 1e-3
  for g, r in zip(grads, rgrads):
    assert _rel(g, r) < 1e-4


DECODE = [  # dtype, N, K, H, S, block_s, window, softcap, lengths
    (f32, 2, 2, 128, 300, 128, 0, None, [1, 300, 129]),  # GQA 1, a partial last block
    (bf16, 8, 2, 128, 256, 128, 50, 30.0, [1, 256, 200]),  # GQA 4, window + soft-cap
    (f32, 8, 1, 64, 100, 1024, 7, None, [100, 3, 8]),  # GQA 8, H 64 with one kv head, one block
]


@pytest.mark.parametrize("case", DECODE)
def test_decode(case):
  """Per-row lengths (1 and S included), NaN in every slot past a row's length, window traced under jit."""
  dtype, N, K, H, S, bs, window, softcap, lengths = case
  B = len(lengths)
  q, k, v, _ = _qkv(B, 1, S, N, K, H, dtype, seed=2, decode=True)
  lengths = jnp.array(lengths, jnp.int32)
  past_BS11 = (jnp.arange(S)[None, :] >= lengths[:, None])[:, :, None, None]
  k0, v0 = jnp.where(past_BS11, 0, k), jnp.where(past_BS11, 0, v)  # what the reference sees
  kn, vn = jnp.where(past_BS11, jnp.nan, k), jnp.where(past_BS11, jnp.nan, v)  # never to reach the result
  kw = dict(scale=H**-0.5, softcap=softcap)
  o = _run(lambda q, k, v, n, w: at.decode_attention(q, k, v, n, window=w, interpret=INTERPRET, block_s=bs, **kw),
           q, kn, vn, lengths, jnp.int32(window))
  pos = jnp.broadcast_to(jnp.arange(S, dtype=jnp.int32), (B, S))
  r = attention(q[:, None].astype(f32), k0.astype(f32), v0.astype(f32), (lengths - 1)[:, None], pos, window=window,
                **kw)[:, 0]
  assert o.shape == q.shape and o.dtype == dtype and bool(jnp.all(jnp.isfinite(o)))
  assert _rel(o, r) < (2e-2 if dtype == bf16 else 1e-5)


def test_block_ranges_match_visibility():
  """The block ranges that decide what is skipped (and where index_maps clamp) are exactly the blocks holding a
  visible (query, key) pair, and "unmasked" blocks are exactly those wholly visible."""
  for (bq, bk), w in itertools.product([(128, 128), (128, 256), (256, 128)], [0, 1, 5, 128, 200, 1000]):
    Tp = 512
    t, s = np.arange(Tp)[:, None], np.arange(Tp)[None, :]
    vis = (t >= s) & ((w <= 0) | (t - s < w))
    nq, nk = Tp // bq, Tp // bk
    blk = vis.reshape(nq, bq, nk, bk)
    any_v, all_v = blk.any(axis=(1, 3)), blk.all(axis=(1, 3))
    for i, j in itertools.product(range(nq), range(nk)):
      lo, hi = at._kv_blocks(i, w, bq, bk)
      qlo, qhi = at._q_blocks(j, w, bq, bk, nq)
      assert (lo <= j <= hi) == any_v[i, j] == (qlo <= i <= qhi), (bq, bk, w, i, j)
      assert bool(at._unmasked(i, j, w, bq, bk)) == all_v[i, j], (bq, bk, w, i, j)
  for S, bs, length, w in itertools.product([256, 300], [64, 128], [1, 63, 64, 65, 256, 300, 400], [0, 1, 64, 100]):
    slots = np.arange(-(-S // bs) * bs)
    seen = (slots < min(length, S)) & ((w <= 0) | (slots >= length - w))
    lo, hi = at._slot_blocks(length, w, S, bs)
    assert [bool(lo <= j <= hi) for j in range(len(slots) // bs)] == list(seen.reshape(-1, bs).any(axis=1))


def test_lowers_for_tpu():
  """The Mosaic TPU lowering (run on any host) accepts every kernel: block shapes, scalar prefetch, primitives."""
  for dtype, (N, K, H) in itertools.product([f32, bf16], [(8, 1, 128), (4, 4, 64), (16, 2, 128)]):
    q, k, v = jnp.zeros((2, 1000, N, H), dtype), jnp.zeros((2, 1000, K, H), dtype), jnp.zeros((2, 1000, K, H), dtype)

    def fwd_bwd(q, k, v, w):
      attn = lambda q, k, v: at.flash_attention(q, k, v, scale=0.1, window=w, softcap=30.0)  # noqa: E731
      return jax.value_and_grad(lambda *a: jnp.sum(attn(*a).astype(f32)), argnums=(0, 1, 2))(q, k, v)

    text = jax.jit(fwd_bwd).trace(q, k, v, jnp.int32(5)).lower(lowering_platforms=("tpu",)).as_text()
    assert text.count("tpu_custom_call") >= 3
    if H % 128 == 0 or K == 1:
      dec = lambda q, k, v, n: at.decode_attention(q, k, v, n, scale=0.1, window=7, softcap=5.0)  # noqa: E731
      text = jax.jit(dec).trace(q[:, 0], k, v, jnp.ones((2,), jnp.int32)).lower(lowering_platforms=("tpu",)).as_text()
      assert "tpu_custom_call" in text


def _mesh():
  return Mesh(np.array(jax.devices()[:4]).reshape(2, 2), ("data", "model"))


def test_lowers_for_tpu_under_a_sharded_jit():
  """Under a jit over several devices (a TPU host or pod, the model sharded by batch and heads) the kernels lower:
  Mosaic TPU refuses a multi-device jit ("cannot be automatically partitioned"), so they go in as partitioned
  calls, and each shard's kernel lowers where every mesh axis is manual (as XLA's partitioner lowers it)."""
  mesh = _mesh()
  q = jax.ShapeDtypeStruct((4, 256, 8, 128), bf16, sharding=NamedSharding(mesh, P("data", None, "model", None)))
  k = jax.ShapeDtypeStruct((4, 256, 2, 128), bf16, sharding=NamedSharding(mesh, P("data", None, "model", None)))
  n = jax.ShapeDtypeStruct((4,), jnp.int32, sharding=NamedSharding(mesh, P("data")))
  flash = lambda q, k, v: at.flash_attention(q, k, v, scale=0.1, window=9, softcap=5.0)  # noqa: E731
  grads = jax.grad(lambda q, k, v: jnp.sum(flash(q, k, v).astype(f32)), argnums=(0, 1, 2))
  dec = lambda q, k, v, n: at.decode_attention(q, k, v, n, scale=0.1)  # noqa: E731
  qd = jax.ShapeDtypeStruct((4, 8, 128), bf16, sharding=NamedSharding(mesh, P("data", "model", None)))
  for fn, args in ((grads, (q, k, k)), (dec, (qd, k, k, n))):
    text = jax.jit(fn).trace(*args).lower(lowering_platforms=("tpu",)).as_text()
    assert "CustomSPMDPartitioning" in text
    specs = tuple(a.sharding.spec for a in args)
    local = jax.shard_map(fn, mesh=mesh, in_specs=specs, out_specs=specs[0] if fn is dec else specs, check_vma=False)
    assert "tpu_custom_call" in jax.jit(local).trace(*args).lower(lowering_platforms=("tpu",)).as_text()


def test_partitioned_runs_on_each_shard():
  """`partitioned` runs the kernel on each device's shard of the factors it may shard (batch and kv heads here,
  the query heads of a group with them), replicates the others first (T is sharded on the way in), and gives
  what the unsharded call gives. The kernel here is the reference (interpret mode's callbacks cannot be
  partitioned), recording the shapes it sees."""
  seen = []

  def kernel(q_BKGTH, k_BKSH, v_BKSH):
    seen.append(q_BKGTH.shape)
    B, K, G, T, H = q_BKGTH.shape
    pos = jnp.broadcast_to(jnp.arange(T), (B, T))
    q_BTNH = q_BKGTH.reshape(B, K * G, T, H).transpose(0, 2, 1, 3)
    o = attention(q_BTNH, k_BKSH.transpose(0, 2, 1, 3), v_BKSH.transpose(0, 2, 1, 3), pos, pos, scale=0.1, window=5)
    return o.transpose(0, 2, 1, 3).reshape(q_BKGTH.shape)

  run = jax.jit(partitioned(kernel, "b k g t h, b k s h, b k s h -> b k g t h", "bk"))
  q, k, v, _ = _qkv(4, 16, 16, 8, 2, 8, f32, seed=3)
  q, k, v = q.reshape(4, 16, 2, 4, 8).transpose(0, 2, 3, 1, 4), k.transpose(0, 2, 1, 3), v.transpose(0, 2, 1, 3)
  ref = run(q, k, v)
  mesh = _mesh()
  put = lambda x, *spec: jax.device_put(x, NamedSharding(mesh, P(*spec)))  # noqa: E731
  o = run(put(q, "data", "model", None, None, None), put(k, "data", "model", None, None),
          put(v, "data", None, "model", None))
  assert seen[0] == (4, 2, 4, 16, 8) and (2, 1, 4, 16, 8) in seen[1:]
  assert o.sharding.spec[:2] == ("data", "model")
  np.testing.assert_allclose(np.asarray(o), np.asarray(ref), rtol=1e-6, atol=1e-6)
  seen.clear()
  o = run(put(q, None, None, None, "model", None), k, v)  # T sharded: gathered, the kernel sees all of it
  assert seen and all(shape[3] == 16 for shape in seen)
  np.testing.assert_allclose(np.asarray(o), np.asarray(ref), rtol=1e-6, atol=1e-6)


def test_supported():
  q4, k4 = jnp.zeros((1, 8, 8, 128), bf16), jnp.zeros((1, 8, 2, 128), bf16)
  assert at.supported(q4, k4, window=0, softcap=None, backend="tpu")
  assert not at.supported(q4, k4, window=0, softcap=None, backend="gpu")
  assert not at.supported(q4[..., :96], k4[..., :96], window=0, softcap=None, backend="tpu")
  assert not at.supported(q4.astype(jnp.float16), k4.astype(jnp.float16), window=0, softcap=None, backend="tpu")
  assert at.supported(q4[:, 0], k4, window=4, softcap=30.0, backend="tpu")
  assert not at.supported(q4[:, 0, :, :64], k4[..., :64], window=0, softcap=None, backend="tpu")
  assert at.supported(q4[:, 0, :, :64], k4[:, :, :1, :64], window=0, softcap=None, backend="tpu")
  assert at.supported(q4, k4, window=0, softcap=None) == ON_TPU
