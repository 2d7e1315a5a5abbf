"""The models with every Mosaic GPU kernel that applies switched on: flash attention, the SSD scan (prefill),
decode attention, the layer GEMVs and the Mamba-2 mixer step (decode steps).

A bfloat16 Llama and Mamba-2, shaped so that each kernel's shape rules hold, run a prefill with a cache
and then decode steps on fixed tokens; each step's logits must match those of the same model on the jnp
references (the path the float32 parity tests hold to transformers). On the CPU the kernels run in the
Mosaic GPU interpreter; on a Hopper GPU, compiled.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from tests.mosaic_gpu import AVAILABLE, INTERPRET
from tests.parity import rel_err
from xlazoo import bench
from xlazoo.ops.pallas import (
  attention_gpu,
  decode_gpu,
  matvec_gpu,
  mixer_step_gpu,
  ssd_gpu,
)

if not AVAILABLE:
  pytest.skip("no GPU and no Mosaic GPU interpreter in this JAX", allow_module_level=True)

pytestmark = pytest.mark.usefixtures("mosaic_gpu_interpreter")

BF16_TOL = 3e-2  # bfloat16 rounding, through two layers: about 1e-2 measured
KERNELS = {  # module: its entry points that take `interpret`
    attention_gpu: ("flash_attention",),
    decode_gpu: ("decode_attention",),
    matvec_gpu: ("layer_matmuls",),
    mixer_step_gpu: ("step",),
    ssd_gpu: ("ssd",),
}
LLAMA = dict(  # head dim 64 (flash), the q/k/v, o, gate/up and down GEMVs >= 128 columns
    model_type="llama", vocab_size=97, hidden_size=128, intermediate_size=256, num_hidden_layers=2,
    num_attention_heads=4, num_key_value_heads=2, head_dim=64, max_position_embeddings=256, tie_word_embeddings=False,
)
MAMBA2 = dict(  # P = 64, Q = 64 (the SSD kernel); GEMVs: in_proj 128 x 768 (644 columns padded), out_proj 256 x 128
    model_type="mamba2", vocab_size=97, hidden_size=128, num_hidden_layers=2, state_size=64, head_dim=64, num_heads=4,
    n_groups=1, expand=2, conv_kernel=4, chunk_size=32, use_conv_bias=True, tie_word_embeddings=True,
)


def _run(model, prompt_BT, steps_BS, max_len=128):
  """Last-position logits of a cached prefill, then of each decode step on the given tokens: [S + 1, B, V]."""
  c, fam = model.config, model.family
  B, T = prompt_BT.shape
  forward = jax.jit(lambda p, t, cache, pos: fam.forward(c, p, t, cache=cache, positions=pos))
  cache = fam.init_cache(c, B, max_len, jnp.bfloat16)
  logits, cache = forward(model.params, prompt_BT, cache, None)  # positions 0..T-1: causal attention
  out = [logits[:, -1]]
  for s in range(steps_BS.shape[1]):
    logits, cache = forward(model.params, steps_BS[:, s : s + 1], cache, jnp.full((B, 1), T + s))
    out.append(logits[:, 0])
  return np.asarray(jnp.stack(out), np.float32)


@pytest.mark.parametrize("hf, batch", [(LLAMA, 1), (LLAMA, 2), (MAMBA2, 2)], ids=["llama-1", "llama-2", "mamba2-2"])
def test_kernels_match_the_references_in_a_model(monkeypatch, hf, batch):
  """batch 1: a decode step writes its one KV slot with an update in place; batch 2: with a scatter."""
  model = bench.random_model(hf)
  rng = np.random.default_rng(0)
  # Every weight perturbed by N(0, 0.1), as the parity tests do: at the init's scale the mixer's output is
  # mostly D x, and the scan's part would not show in the logits.
  noisy = lambda a: (a + rng.normal(0, 0.1, a.shape)).astype(a.dtype)  # noqa: E731
  model = model.replace(params=jax.tree.map(noisy, model.params))
  prompt_BT = jnp.asarray(rng.integers(0, hf["vocab_size"], (batch, 37)), jnp.int32)  # ragged: 37 is no tile multiple
  steps_BS = jnp.asarray(rng.integers(0, hf["vocab_size"], (batch, 3)), jnp.int32)
  for module in KERNELS:
    monkeypatch.setattr(module, "on_hopper", lambda: False)  # every dispatch takes its reference
  ref = _run(model, prompt_BT, steps_BS)

  calls = {}
  for module, entries in KERNELS.items():
    monkeypatch.setattr(module, "on_hopper", lambda: True)  # the shape rules decide
    for name in entries:
      def counted(*a, _f=getattr(module, name), _name=name, **kw):
        _name += " with the norm" if kw.get("norm") is not None else ""
        _name += " with the gate" if kw.get("gate") else ""
        calls[_name] = calls.get(_name, 0) + 1
        return _f(*a, interpret=INTERPRET, **kw)
      monkeypatch.setattr(module, name, counted)
  out = _run(model, prompt_BT, steps_BS)

  # The pre-norms go into the GEMVs that follow them (q/k/v, gate/up; in_proj); in Mamba-2 the mixer step
  # applies the gate, and the gated norm goes into out_proj's GEMV.
  if hf is LLAMA:
    want = {"decode_attention", "layer_matmuls", "flash_attention", "layer_matmuls with the norm"}
  else:
    want = {"ssd", "step with the gate", "layer_matmuls with the norm"}
  assert set(calls) == want, calls
  for s, (o, r) in enumerate(zip(out, ref, strict=True)):
    assert rel_err(o, r) < BF16_TOL, (s, rel_err(o, r))
