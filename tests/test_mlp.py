"""xlazoo.ops.mlp.linear on plain arrays (the prefill's GEMMs): the product's dtype and its values."""

import jax
import jax.numpy as jnp
import pytest

from tests.parity import rel_err
from xlazoo.ops.mlp import PreNorm, linear


def _dots(fn, *args):
  """The dtypes of the dot_generals' results in fn's jaxpr."""
  return [e.outvars[0].aval.dtype for e in jax.make_jaxpr(fn)(*args).eqns if e.primitive.name == "dot_general"]


@pytest.mark.parametrize("norm", [False, True])
def test_without_bias_the_gemm_returns_the_activations_dtype(norm):
  # A float32 product rounded after it made XLA pick a slower GEMM on the GPU, or add a rounding kernel.
  k = jax.random.split(jax.random.key(0), 3)
  x = jax.random.normal(k[0], (2, 5, 64), jnp.bfloat16)
  w = (0.1 * jax.random.normal(k[1], (64, 48))).astype(jnp.bfloat16)
  pre = PreNorm(jnp.ones((64,), jnp.bfloat16), 1e-6) if norm else None
  fn = lambda x, w: linear(x, w, "BTD,DF->BTF", norm=pre)  # noqa: E731
  assert _dots(fn, x, w) == [jnp.bfloat16]
  y = fn(x, w)
  h = pre(x) if norm else x
  ref = jnp.einsum("BTD,DF->BTF", h.astype(jnp.float32), w.astype(jnp.float32))
  assert y.dtype == jnp.bfloat16 and rel_err(y, ref) < 1e-2  # one bfloat16 rounding of float32 sums


def test_with_bias_the_product_stays_float32_for_the_bias_add():
  k = jax.random.split(jax.random.key(1), 3)
  x = jax.random.normal(k[0], (3, 64), jnp.bfloat16)
  w = (0.1 * jax.random.normal(k[1], (64, 32))).astype(jnp.bfloat16)
  b = (jax.random.normal(k[2], (32,))).astype(jnp.bfloat16)
  fn = lambda x, w, b: linear(x, w, "TD,DF->TF", b)  # noqa: E731
  assert _dots(fn, x, w, b) == [jnp.float32]
  y = fn(x, w, b)
  ref = x.astype(jnp.float32) @ w.astype(jnp.float32) + b.astype(jnp.float32)
  assert y.dtype == jnp.bfloat16 and rel_err(y, ref) < 1e-2


def test_float32_stays_float32():
  x, w = jnp.ones((4, 8), jnp.float32), jnp.ones((8, 3), jnp.float32)
  assert _dots(lambda x, w: linear(x, w, "TD,DF->TF"), x, w) == [jnp.float32]
