"""Parameter declarations: one declaration drives init, logical axes and sharding."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import Mesh, NamedSharding

import xlazoo
from xlazoo.models import config_from_hf, transformer
from xlazoo.models.params import Model, init_params, is_param, logical_axes
from xlazoo.sharding import AXES, partition_spec

HF = {
    "llama": dict(attention_bias=True, mlp_bias=True),
    "qwen3": dict(head_dim=16),
    "gemma2": dict(head_dim=16),
    "olmo2": dict(),
}


def _config(model_type):
  base = dict(model_type=model_type, vocab_size=64, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
              num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)
  return config_from_hf(base | HF[model_type])


@pytest.mark.parametrize("model_type", list(HF))
def test_declarations_drive_init_and_axes(model_type):
  c = _config(model_type)
  decls = transformer.param_decls(c)
  params = init_params(decls, jax.random.key(0), jnp.bfloat16)
  for p, x in zip(jax.tree.leaves(decls, is_leaf=is_param), jax.tree.leaves(params)):
    assert x.shape == p.shape and x.dtype == jnp.bfloat16
    assert all(a in AXES for a in p.axes)
  assert jax.tree.structure(logical_axes(decls), is_leaf=lambda a: isinstance(a, tuple)) == jax.tree.structure(params)


def test_sharded_by_logical_axes_equals_unsharded():
  c = _config("llama")
  model = Model(c, transformer.init(c, jax.random.key(1)))
  tokens = np.random.RandomState(0).randint(0, c.vocab_size, (4, 16))
  ref = np.asarray(xlazoo.forward(model, tokens))
  mesh = Mesh(np.array(jax.devices()[:4]).reshape(2, 2), ("data", "model"))
  rules = {"heads": "model", "kv_heads": "model", "mlp": "model", "vocab": "model"}
  axes = logical_axes(transformer.param_decls(c))
  params = jax.tree.map(
      lambda x, a: jax.device_put(x, NamedSharding(mesh, partition_spec(a, rules))),
      model.params, axes, is_leaf=lambda a: isinstance(a, tuple) and all(isinstance(s, str) for s in a),
  )
  out = np.asarray(xlazoo.forward(Model(c, params), tokens))
  np.testing.assert_allclose(out, ref, rtol=1e-5, atol=1e-5)


def test_unknown_logical_axis_is_an_error():
  with pytest.raises(ValueError, match="unknown logical axis"):
    partition_spec(("embed", "bogus"), {})
