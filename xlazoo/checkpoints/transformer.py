"""Hugging Face <-> xlazoo parameter names for the dense transformer family.

Each row: HF name pattern ({i} = layer index), xlazoo path, and how the HF tensor is laid out:
  "in"   HF Linear weight [out, in] -> ours [in, *out] (first axis is the input)
  "out"  HF Linear weight [out, in] -> ours [*in, out] (last axis is the output)
  "flat" a vector reshaped to our shape (biases [N*H] -> [N, H], norms)
  "same" the same layout (the embedding table [V, D])
A layout may end in ":n" ("in:10576"): HF's last axis has n entries, and ours zeros after them.
"""

from xlazoo.models.transformer import Config


def table(c: Config) -> list[tuple[str, str, str]]:
  a, m = "model.layers.{i}.self_attn", "model.layers.{i}.mlp"
  rows = [
      ("model.embed_tokens.weight", "embed/table_VD", "same"),
      ("model.norm.weight", "final_norm/scale", "flat"),
      (f"{a}.q_proj.weight", "layers/attn/wq_DNH", "in"),
      (f"{a}.k_proj.weight", "layers/attn/wk_DKH", "in"),
      (f"{a}.v_proj.weight", "layers/attn/wv_DKH", "in"),
      (f"{a}.o_proj.weight", "layers/attn/wo_NHD", "out"),
      (f"{m}.gate_proj.weight", "layers/mlp/w_gate_DF", "in"),
      (f"{m}.up_proj.weight", "layers/mlp/w_up_DF", "in"),
      (f"{m}.down_proj.weight", "layers/mlp/w_down_FD", "out"),
  ]
  if not c.tie_word_embeddings:
    rows.append(("lm_head.weight", "lm_head/w_DV", "in"))
  if c.qkv_bias:
    rows += [(f"{a}.{x}_proj.bias", f"layers/attn/b{x}_{s}", "flat") for x, s in (("q", "NH"), ("k", "KH"), ("v", "KH"))]
  if c.o_bias:
    rows.append((f"{a}.o_proj.bias", "layers/attn/bo_D", "flat"))
  if c.mlp_bias:
    rows += [
        (f"{m}.gate_proj.bias", "layers/mlp/b_gate_F", "flat"),
        (f"{m}.up_proj.bias", "layers/mlp/b_up_F", "flat"),
        (f"{m}.down_proj.bias", "layers/mlp/b_down_D", "flat"),
    ]
  if c.qk_norm:
    rows += [(f"{a}.q_norm.weight", "layers/attn/q_norm/scale", "flat"), (f"{a}.k_norm.weight", "layers/attn/k_norm/scale", "flat")]
  layer = "model.layers.{i}"
  if c.pre_norms and c.post_norms:  # Gemma: sandwich norms
    rows += [
        (f"{layer}.input_layernorm.weight", "layers/attn_norm/scale", "flat"),
        (f"{layer}.post_attention_layernorm.weight", "layers/attn_post_norm/scale", "flat"),
        (f"{layer}.pre_feedforward_layernorm.weight", "layers/mlp_norm/scale", "flat"),
        (f"{layer}.post_feedforward_layernorm.weight", "layers/mlp_post_norm/scale", "flat"),
    ]
  elif c.post_norms:  # OLMo 2/3: norms after the sublayers only
    rows += [
        (f"{layer}.post_attention_layernorm.weight", "layers/attn_post_norm/scale", "flat"),
        (f"{layer}.post_feedforward_layernorm.weight", "layers/mlp_post_norm/scale", "flat"),
    ]
  else:  # Llama: post_attention_layernorm is the norm before the MLP
    rows += [
        (f"{layer}.input_layernorm.weight", "layers/attn_norm/scale", "flat"),
        (f"{layer}.post_attention_layernorm.weight", "layers/mlp_norm/scale", "flat"),
    ]
  return rows
