"""`xlazoo bench` and the counting behind its table; the attention entry points that the hot paths dispatch to."""

import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from tests.test_cli import run
from tests.tiny import CONFIG, save_tiny
from xlazoo import bench
from xlazoo.decoding import generate as g
from xlazoo.models import Model, config_from_hf, family_of
from xlazoo.ops import attention as A


def _abstract(hf: dict) -> Model:
  c = config_from_hf(hf)
  return Model(c, jax.eval_shape(lambda: family_of(c).init(c, jax.random.key(0), jnp.bfloat16)))


def test_named_shapes_have_their_published_sizes():
  llama = bench.count(_abstract(bench.SHAPES["llama3-8b"]))
  assert llama.matmul_weights + 128256 * 4096 == pytest.approx(8.03e9, rel=2e-3)  # + the untied embedding
  assert llama.attn == ((32, 32, 8, 128),)
  assert llama.weight_bytes == 2 * llama.matmul_weights + 2 * (65 * 4096)  # bf16; plus the 65 norm scales
  mamba = bench.count(_abstract(bench.SHAPES["mamba2-2.7b"]))
  padding = 64 * 2560 * (10624 - 10576)  # in_proj's padding columns: read and multiplied, so counted
  assert mamba.matmul_weights - padding == pytest.approx(2.70e9, rel=2e-3) and mamba.attn == ()


def test_flops_and_bytes_follow_the_conventions():
  c = bench.Counts(matmul_weights=1000, weight_bytes=2000, attn=((2, 4, 2, 8),))
  assert bench.prefill_flops(c, 3, 10) == 3 * (2 * 1000 * 10 + 4 * 2 * 4 * 8 * 55)
  assert bench.decode_flops(c, np.array([5, 7])) == 2 * 1000 * 2 + 4 * 2 * 4 * 8 * 12
  model = Model(config_from_hf(CONFIG), None)
  cache = jax.eval_shape(lambda: family_of(model.config).init_cache(model.config, 2, 64, jnp.bfloat16))
  assert bench.decode_bytes(c, cache, np.array([5, 7])) == 2000 + 2 * 2 * 2 * 8 * 12 * 2  # k and v, bf16


def test_run_times_what_generate_computes():
  from tests.tiny import tiny_model

  model = tiny_model()
  rows, tokens = bench.run(model, batch=2, prompt_len=5, new_tokens=4, iters=1, progress=False)
  assert [r.name for r in rows] == ["prefill 2x5", "decode 2x3 steps"] and all(r.seconds > 0 for r in rows)
  prompts = np.random.default_rng(0).integers(1, model.config.vocab_size, (2, 5))
  np.testing.assert_array_equal(tokens, np.asarray(g.generate(model, prompts, max_new_tokens=4, stop_ids=())))


def test_decode_rate_leaves_out_what_a_call_costs_once(monkeypatch):
  """The decode row's time is the difference between calls of two lengths over their steps; the rest, which a call
  costs once, is reported apart. A fake clock: each call takes 1 ms plus 2 ms a decode step."""
  from tests.tiny import tiny_model

  def fake_median_time(fn, *, setup=None, **_):
    out = fn(setup()) if setup else fn()
    return 1e-3 + 2e-3 * (out.shape[1] - 1) if isinstance(out, jax.Array) else 5e-3  # decode: tokens [B, N]

  monkeypatch.setattr(bench, "median_time", fake_median_time)
  (prefill, decode), _ = bench.run(tiny_model(), prompt_len=5, new_tokens=9, iters=1, progress=False)
  assert prefill.seconds == 5e-3 and prefill.once is None
  np.testing.assert_allclose([decode.seconds, decode.once], [2e-3, 1e-3], rtol=1e-9)
  assert "decode 1x8 steps: a call also costs 1.00 ms once" in bench.table([prefill, decode], bench.Ceilings(1.0, 1.0))


def test_bench_command_prints_the_table(capsys, tmp_path):
  path = save_tiny(tmp_path / "tiny")
  code, out, err = run(capsys, "bench", "--model", path, "--prompt-len", "8", "--new-tokens", "3", "--iters", "1")
  assert code == 0, err
  assert re.search(r"^prefill 1x8 +[\d.]+ ms", out, re.M) and re.search(r"^decode 1x2 steps +[\d.]+ ms", out, re.M)
  assert "ceilings measured" in out and "TFLOP/s" in out


@pytest.mark.parametrize(
    "argv, message",
    [(["--model", "llama3-8b", "--batch", "0"], "--batch must be at least 1"),
     (["--model", "llama3-8b", "--new-tokens", "1"], "--new-tokens must be at least 2"),
     (["--model", "MISSING_DIR", "--layers", "2"], "--layers applies to the named shapes")],
)
def test_bench_command_rejects_bad_flags(capsys, argv, message):
  code, _, err = run(capsys, "bench", *argv)
  assert code == 2 and message in err


@pytest.mark.parametrize("T, window, softcap", [(7, 0, None), (2049 + 1024, 0, None), (2600, 700, 30.0)])
def test_causal_attention_equals_the_reference(T, window, softcap):
  """Short and long (query-blocked) sequences, ragged block tails, windows and soft-caps; values and gradients."""
  ks = jax.random.split(jax.random.key(T), 4)
  q, g_ = (jax.random.normal(k, (2, T, 4, 16)) for k in (ks[0], ks[3]))
  k, v = (jax.random.normal(kk, (2, T, 2, 16)) for kk in ks[1:3])
  pos = jnp.broadcast_to(jnp.arange(T), (2, T))
  kw = dict(scale=0.25, window=window, softcap=softcap)
  fast = lambda q, k, v: jnp.vdot(A.causal_attention(q, k, v, **kw), g_)  # noqa: E731
  ref = lambda q, k, v: jnp.vdot(A.attention(q, k, v, pos, pos, **kw), g_)  # noqa: E731
  np.testing.assert_allclose(A.causal_attention(q, k, v, **kw), A.attention(q, k, v, pos, pos, **kw), atol=2e-5)
  for a, b in zip(jax.grad(fast, argnums=(0, 1, 2))(q, k, v), jax.grad(ref, argnums=(0, 1, 2))(q, k, v)):
    np.testing.assert_allclose(a, b, atol=1e-4)


def test_decode_attention_reads_each_row_up_to_its_length():
  ks = jax.random.split(jax.random.key(0), 3)
  q = jax.random.normal(ks[0], (3, 4, 16))
  k, v = (jax.random.normal(kk, (3, 32, 2, 16)) for kk in ks[1:])
  lengths = jnp.array([1, 17, 32])
  out = A.decode_attention(q, k, v, lengths, scale=0.25, window=8)
  for b, n in enumerate(lengths.tolist()):
    lo = max(0, n - 8)
    want = A.attention(q[b : b + 1, None], k[b : b + 1, lo:n], v[b : b + 1, lo:n], jnp.array([[n - 1]]), jnp.arange(lo, n)[None], scale=0.25)
    np.testing.assert_allclose(out[b], want[0, 0], atol=1e-5)
  # slots past a row's length do not matter
  np.testing.assert_allclose(A.decode_attention(q, k.at[0, 1:].set(1e4), v, lengths, scale=0.25, window=8), out, atol=1e-6)
