"""Hugging Face <-> xlazoo parameter names for Mamba-2 and its hybrids (rows as in
checkpoints/transformer.py, plus "conv": a depthwise Conv1d weight [E, 1, W] <-> ours [W, E]).

HF numbers layers globally; our stacks hold one kind each, so each layered row lists its
(HF layer, stack index) pairs.
"""

from flax import traverse_util

from xlazoo.models.hybrid import Config, param_decls


def _mamba_rows(prefix: str, mixer: str, norm: str, layers) -> list[tuple]:
  m = f"{prefix}.{{i}}.{mixer}"
  rows = [
      (f"{prefix}.{{i}}.{norm}.weight", "mamba/norm/scale", "flat"),
      (f"{m}.in_proj.weight", "mamba/w_in_DZ", "in"),
      (f"{m}.conv1d.weight", "mamba/conv_w_WE", "conv"),
      (f"{m}.dt_bias", "mamba/dt_bias_N", "flat"),
      (f"{m}.A_log", "mamba/A_log_N", "flat"),
      (f"{m}.D", "mamba/D_N", "flat"),
      (f"{m}.norm.weight", "mamba/gate_norm/scale", "flat"),
      (f"{m}.out_proj.weight", "mamba/w_out_ID", "out"),
      (f"{m}.conv1d.bias", "mamba/conv_b_E", "flat"),
      (f"{m}.in_proj.bias", "mamba/b_in_Z", "flat"),
      (f"{m}.out_proj.bias", "mamba/b_out_D", "flat"),
  ]
  return [(*r, layers) for r in rows]


def table(c: Config) -> list[tuple]:
  if c.model_type == "mamba2":
    rows = [
        ("backbone.embeddings.weight", "embed/table_VD", "same"),
        ("backbone.norm_f.weight", "final_norm/scale", "flat"),
        *_mamba_rows("backbone.layers", "mixer", "norm", list(enumerate(range(c.count("mamba"))))),
    ]
  else:  # bamba: layer i is sublayers 2i (mamba or attention) and 2i + 1 (MLP)
    mixers = c.sublayers[0::2]
    index = lambda kind: [(i, mixers[:i].count(kind)) for i, k in enumerate(mixers) if k == kind]  # noqa: E731
    a, layers = "model.layers.{i}.self_attn", [(i, i) for i in range(len(mixers))]
    rows = [
        ("model.embed_tokens.weight", "embed/table_VD", "same"),
        ("model.final_layernorm.weight", "final_norm/scale", "flat"),
        *_mamba_rows("model.layers", "mamba", "input_layernorm", index("mamba")),
        *[(*r, index("attn")) for r in [
            ("model.layers.{i}.input_layernorm.weight", "attn/norm/scale", "flat"),
            (f"{a}.q_proj.weight", "attn/wq_DNH", "in"),
            (f"{a}.k_proj.weight", "attn/wk_DKH", "in"),
            (f"{a}.v_proj.weight", "attn/wv_DKH", "in"),
            (f"{a}.o_proj.weight", "attn/wo_NHD", "out"),
            *[(f"{a}.{x}_proj.bias", f"attn/b{x}_{s}", "flat") for x, s in (("q", "NH"), ("k", "KH"), ("v", "KH"))],
            (f"{a}.o_proj.bias", "attn/bo_D", "flat"),
        ]],
        *[(*r, layers) for r in [
            ("model.layers.{i}.pre_ff_layernorm.weight", "mlp/norm/scale", "flat"),
            *[(f"model.layers.{{i}}.feed_forward.{w}_proj.weight", f"mlp/w_{w}_{s}", k)
              for w, s, k in (("gate", "DF", "in"), ("up", "DF", "in"), ("down", "FD", "out"))],
            *[(f"model.layers.{{i}}.feed_forward.{w}_proj.bias", f"mlp/b_{w}_{s}", "flat")
              for w, s in (("gate", "F"), ("up", "F"), ("down", "D"))],
        ]],
    ]
  rows.append(("lm_head.weight", "lm_head/w_DV", "in"))
  # Optional parameters (biases, the untied head) have rows only where the config declares them.
  declared = {"/".join(k) for k in traverse_util.flatten_dict(param_decls(c))}
  return [r for r in rows if r[1] in declared]
