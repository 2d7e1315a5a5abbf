"""The models with every Mosaic GPU kernel that applies switched on: flash attention, the SSD scan, the
conv and the gated norm (prefill), decode attention, the layer GEMVs and the Mamba-2 mixer step (decode steps).

Bfloat16 models of every family, shaped so that each kernel's shape rules hold, run a prefill with a cache
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
  conv_gpu,
  decode_gpu,
  gated_norm_gpu,
  matvec_gpu,
  mixer_step_gpu,
  ssd_gpu,
)

if not AVAILABLE:
  pytest.skip("no GPU and no Mosaic GPU interpreter in this JAX", allow_module_level=True)

pytestmark = pytest.mark.usefixtures("mosaic_gpu_interpreter")

BF16_TOL = 3e-2  # bfloat16 rounding, through two layers: about 1e-2 measured (Zamba2's shared blocks: up to 3.3e-2)
KERNELS = {  # module: its entry points that take `interpret`
    attention_gpu: ("flash_attention",),
    conv_gpu: ("causal_conv_silu",),
    decode_gpu: ("decode_attention",),
    gated_norm_gpu: ("gated_rms_norm",),
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


def _run(model, prompt_BT, steps_BS, max_len=128, dtype=jnp.bfloat16):
  """Last-position logits of a cached prefill, then of each decode step on the given tokens: [S + 1, B, V]."""
  c, fam = model.config, model.family
  B, T = prompt_BT.shape
  forward = jax.jit(lambda p, t, cache, pos: fam.forward(c, p, t, cache=cache, positions=pos))
  cache = fam.init_cache(c, B, max_len, dtype)
  logits, cache = forward(model.params, prompt_BT, cache, None)  # positions 0..T-1: causal attention
  out = [logits[:, -1]]
  for s in range(steps_BS.shape[1]):
    logits, cache = forward(model.params, steps_BS[:, s : s + 1], cache, jnp.full((B, 1), T + s))
    out.append(logits[:, 0])
  return np.asarray(jnp.stack(out), np.float32)


# Every other family, shaped for the kernels (head dims of 64, states of 64 or 128, GEMVs >= 128 columns), with
# the config fields that change what reaches a kernel: sliding windows shorter than the prompt, soft-caps, the
# norm's offset, biases (no rounding in the GEMV), q/k norms, post-norms, n_groups > 1, the gated norm's order,
# multipliers, MoE and shared-attention layers. Each maps to the kernels it must call.
ATTN = dict(vocab_size=97, hidden_size=128, intermediate_size=256, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, head_dim=64, max_position_embeddings=256)
DENSE = {"flash_attention", "decode_attention", "layer_matmuls", "layer_matmuls with the norm"}
FAMILIES = {
    "gemma2": (dict(ATTN, model_type="gemma2", sliding_window=16, attn_logit_softcapping=20.0,
                    final_logit_softcapping=15.0, query_pre_attn_scalar=48), DENSE),
    "gemma3": (dict(ATTN, model_type="gemma3_text", sliding_window=16, num_hidden_layers=3,
                    layer_types=["sliding_attention", "full_attention", "sliding_attention"]), DENSE),
    "qwen2-bias-window": (dict(ATTN, model_type="qwen2", use_sliding_window=True, sliding_window=16,
                               max_window_layers=1), DENSE),
    "qwen3-qknorm": (dict(ATTN, model_type="qwen3", attention_bias=True), DENSE),
    "mistral-window": (dict(ATTN, model_type="mistral", sliding_window=16), DENSE),
    "olmo2-postnorm": (dict(ATTN, model_type="olmo2", hidden_size=256, head_dim=None), DENSE - {"layer_matmuls with the norm"}),
    "mamba2-groups": (dict(MAMBA2, n_groups=2, use_conv_bias=False, layer_norm_epsilon=1e-3),
                      {"ssd", "causal_conv_silu", "gated_rms_norm", "step", "layer_matmuls with the norm", "layer_matmuls"}),
    "mamba2-bias-state128": (dict(MAMBA2, use_bias=True, state_size=128, time_step_limit=(0.05, 2.0)),
                             {"ssd", "causal_conv_silu", "gated_rms_norm", "step with the gate", "layer_matmuls with the norm"}),
    "bamba": (dict(ATTN, model_type="bamba", attn_layer_indices=[1], mamba_n_heads=4, mamba_d_head=64, mamba_d_state=64,
                   mamba_n_groups=1, mamba_chunk_size=32), DENSE | {"ssd", "causal_conv_silu", "gated_rms_norm", "step with the gate"}),
    "nemotron_h-moe": (dict(ATTN, model_type="nemotron_h", hybrid_override_pattern="M*-E", mamba_num_heads=4,
                            mamba_head_dim=64, ssm_state_size=128, n_groups=2, chunk_size=32, n_routed_experts=4,
                            num_experts_per_tok=2, moe_intermediate_size=128, moe_shared_expert_intermediate_size=128,
                            n_group=1, topk_group=1), DENSE | {"ssd", "causal_conv_silu", "gated_rms_norm", "step"}),
    "falcon_h1-gate_first": (dict(ATTN, model_type="falcon_h1", mamba_d_ssm=256, mamba_n_heads=4, mamba_d_state=64,
                                  mamba_n_groups=1, mamba_chunk_size=32, mamba_rms_norm=True, mamba_norm_before_gate=False,
                                  ssm_multipliers=[0.5, 1.5, 2.0, 0.25, 3.0], mlp_multipliers=[1.2, 0.6],
                                  embedding_multiplier=2.0, key_multiplier=0.7),
                             DENSE | {"ssd", "causal_conv_silu", "gated_rms_norm", "step with the gate"}),
    "falcon_h1-norm_first": (dict(ATTN, model_type="falcon_h1", mamba_d_ssm=256, mamba_n_heads=4, mamba_d_state=64,
                                  mamba_n_groups=2, mamba_chunk_size=32, mamba_rms_norm=True, ssm_in_multiplier=1.1),
                             DENSE | {"ssd", "causal_conv_silu", "gated_rms_norm", "step"}),
    "zamba2": (dict(ATTN, model_type="zamba2", layers_block_type=["mamba", "hybrid", "hybrid"], num_hidden_layers=3,
                    n_mamba_heads=4, mamba_d_state=64, mamba_ngroups=1, chunk_size=32, num_mem_blocks=2,
                    use_shared_attention_adapter=True, adapter_rank=8, use_mem_rope=True, num_key_value_heads=4),
               DENSE | {"ssd", "causal_conv_silu", "gated_rms_norm", "step with the gate"}),
}
# (config, batch, the kernels it calls). Batch 1: a decode step writes its one KV slot with an update in place;
# batch 2: with a scatter. In Mamba-2 (one group, the gate before the norm) the mixer step applies the gate and
# the gated norm goes into out_proj's GEMV.
CASES = {"llama-1": (LLAMA, 1, DENSE), "llama-2": (LLAMA, 2, DENSE),
         "mamba2-2": (MAMBA2, 2, {"ssd", "causal_conv_silu", "gated_rms_norm", "step with the gate", "layer_matmuls with the norm"})}
CASES |= {name: (hf, 2, want) for name, (hf, want) in FAMILIES.items()}


@pytest.mark.parametrize("case", list(CASES))
def test_kernels_match_the_references_in_a_model(monkeypatch, case):
  """Each step's logits with the kernels on against the jnp references in the same dtype (bfloat16): they
  must differ by less than 3e-2, or by less than bfloat16 itself moves the references from float32."""
  hf, batch, want = CASES[case]
  model = bench.random_model({k: v for k, v in hf.items() if v is not None})
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
  with jax.default_matmul_precision("float32"):  # no TF32 on the GPU
    ref32 = _run(model.replace(params=jax.tree.map(lambda a: a.astype(jnp.float32), model.params)), prompt_BT, steps_BS,
                 dtype=jnp.float32)

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

  assert set(calls) == want, calls
  for s, (o, r, r32) in enumerate(zip(out, ref, ref32, strict=True)):
    assert rel_err(o, r) < max(BF16_TOL, rel_err(r, r32)), (s, rel_err(o, r), rel_err(r, r32))
