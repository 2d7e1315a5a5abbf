"""Hugging Face <-> xlazoo parameter names for Mamba-2 and its hybrids (rows as in
checkpoints/transformer.py, plus "conv": a depthwise Conv1d weight [E, 1, W] <-> ours [W, E], and
"tied": a copy that transformers ties to another entry, ignored on load and not written).

HF numbers layers globally; our stacks hold one kind each, so each layered row lists its
(HF layer, stack index) pairs.
"""

import functools

from flax import traverse_util

from xlazoo.models.hybrid import Config, param_decls


def _mixer(c: Config, hf: str, ours: str) -> list[tuple]:
  """The Mamba-2 mixer at HF module `hf` (a pattern in {i}) and our group `ours`."""
  z = c.in_proj_outputs  # ours has zero columns after them
  return [
      (f"{hf}.in_proj.weight", f"{ours}/w_in_DZ", f"in:{z}"),
      (f"{hf}.conv1d.weight", f"{ours}/conv_w_WE", "conv"),
      (f"{hf}.dt_bias", f"{ours}/dt_bias_N", "flat"),
      (f"{hf}.A_log", f"{ours}/A_log_N", "flat"),
      (f"{hf}.D", f"{ours}/D_N", "flat"),
      (f"{hf}.norm.weight", f"{ours}/gate_norm/scale", "flat"),
      (f"{hf}.out_proj.weight", f"{ours}/w_out_ID", "out"),
      (f"{hf}.conv1d.bias", f"{ours}/conv_b_E", "flat"),
      (f"{hf}.in_proj.bias", f"{ours}/b_in_Z", f"flat:{z}"),
      (f"{hf}.out_proj.bias", f"{ours}/b_out_D", "flat"),
  ]


def _attention(hf: str, ours: str) -> list[tuple]:
  return [
      (f"{hf}.q_proj.weight", f"{ours}/wq_DNH", "in"),
      (f"{hf}.k_proj.weight", f"{ours}/wk_DKH", "in"),
      (f"{hf}.v_proj.weight", f"{ours}/wv_DKH", "in"),
      (f"{hf}.o_proj.weight", f"{ours}/wo_NHD", "out"),
      *[(f"{hf}.{x}_proj.bias", f"{ours}/b{x}_{s}", "flat") for x, s in (("q", "NH"), ("k", "KH"), ("v", "KH"))],
      (f"{hf}.o_proj.bias", f"{ours}/bo_D", "flat"),
  ]


def _mlp(hf: str, ours: str) -> list[tuple]:
  return [
      *[(f"{hf}.{w}_proj.weight", f"{ours}/w_{w}_{s}", k) for w, s, k in (("gate", "DF", "in"), ("up", "DF", "in"), ("down", "FD", "out"))],
      *[(f"{hf}.{w}_proj.bias", f"{ours}/b_{w}_{s}", "flat") for w, s in (("gate", "F"), ("up", "F"), ("down", "D"))],
  ]


def _layered(rows: list[tuple], layers) -> list[tuple]:
  return [(*r, layers) for r in rows]


def _index(kinds, kind: str) -> list[tuple[int, int]]:
  """(HF layer, index in our stack of `kind`) for each layer of that kind."""
  return [(i, kinds[:i].count(kind)) for i, k in enumerate(kinds) if k == kind]


def _norm(hf: str, ours: str) -> tuple:
  return (f"{hf}.weight", f"{ours}/norm/scale", "flat")


def _mamba2(c: Config) -> list[tuple]:
  layer = "backbone.layers.{i}"
  return [
      ("backbone.embeddings.weight", "embed/table_VD", "same"),
      ("backbone.norm_f.weight", "final_norm/scale", "flat"),
      *_layered([_norm(f"{layer}.norm", "mamba"), *_mixer(c, f"{layer}.mixer", "mamba")], _index(c.sublayers, "mamba")),
  ]


def _bamba(c: Config) -> list[tuple]:  # layer i: sublayers 2i (mamba or attention) and 2i + 1 (MLP)
  mixers, layer = c.sublayers[0::2], "model.layers.{i}"
  return [
      ("model.embed_tokens.weight", "embed/table_VD", "same"),
      ("model.final_layernorm.weight", "final_norm/scale", "flat"),
      *_layered([_norm(f"{layer}.input_layernorm", "mamba"), *_mixer(c, f"{layer}.mamba", "mamba")], _index(mixers, "mamba")),
      *_layered([_norm(f"{layer}.input_layernorm", "attn"), *_attention(f"{layer}.self_attn", "attn")], _index(mixers, "attn")),
      *_layered([_norm(f"{layer}.pre_ff_layernorm", "mlp"), *_mlp(f"{layer}.feed_forward", "mlp")],
                [(i, i) for i in range(len(mixers))]),
  ]


def _moe(hf: str, ours: str) -> list[tuple]:
  return [
      (f"{hf}.gate.weight", f"{ours}/router_DX", "in"),
      (f"{hf}.gate.e_score_correction_bias", f"{ours}/router_bias_X", "flat"),
      *_mlp(f"{hf}.shared_experts", f"{ours}/shared"),
      (f"{hf}.fc1_latent_proj.weight", f"{ours}/latent_in_DL", "in"),
      (f"{hf}.fc1_latent_proj.bias", f"{ours}/latent_in_b_L", "flat"),
      (f"{hf}.fc2_latent_proj.weight", f"{ours}/latent_out_LD", "out"),
      (f"{hf}.fc2_latent_proj.bias", f"{ours}/latent_out_b_D", "flat"),
  ]


def _nemotron_h(c: Config) -> list[tuple]:  # one sublayer per layer, each a "mixer"
  layer, kinds = "backbone.layers.{i}", c.sublayers
  return [
      ("backbone.embeddings.weight", "embed/table_VD", "same"),
      ("backbone.norm_f.weight", "final_norm/scale", "flat"),
      *[r for kind, rows in (("mamba", functools.partial(_mixer, c)), ("attn", _attention), ("mlp", _mlp), ("moe", _moe))
        for r in _layered([_norm(f"{layer}.norm", kind), *rows(f"{layer}.mixer", kind)], _index(kinds, kind))],
      *_layered([(f"{layer}.mixer.experts.{{e}}.up_proj.weight", "moe/w_up_XDF", "in"),  # one tensor per expert
                 (f"{layer}.mixer.experts.{{e}}.down_proj.weight", "moe/w_down_XFD", "out")],
                [({"i": i, "e": e}, (j, e)) for i, j in _index(kinds, "moe") for e in range(c.moe.experts if c.moe else 0)]),
  ]


def _falcon_h1(c: Config) -> list[tuple]:  # layer i: a hybrid sublayer, then the MLP
  layer, layers = "model.layers.{i}", [(i, i) for i in range(c.num_layers)]
  return [
      ("model.embed_tokens.weight", "embed/table_VD", "same"),
      ("model.final_layernorm.weight", "final_norm/scale", "flat"),
      *_layered([_norm(f"{layer}.input_layernorm", "hybrid"), *_mixer(c, f"{layer}.mamba", "hybrid/mamba"),
                 *_attention(f"{layer}.self_attn", "hybrid/attn"),
                 _norm(f"{layer}.pre_ff_layernorm", "mlp"), *_mlp(f"{layer}.feed_forward", "mlp")], layers),
  ]


def _zamba2(c: Config) -> list[tuple]:
  """Mamba layers, and hybrid layers: each with its mixer, its linear and its adapters. Hybrid layer
  j uses block j % shared_blocks, stored under the first hybrid layer that uses it, and adapter slot
  j, stored in the block of hybrid layer j % num_mem_blocks. Checkpoints may also hold copies under
  later layers (tied to the first) and slots that a layer does not use: "tied" rows."""
  kinds, layer, t = c.sublayers, "model.layers.{i}", "model.layers.{i}.shared_transformer"
  hybrid, n, B = [i for i, k in enumerate(kinds) if k == "shared"], c.num_mem_blocks, c.shared_blocks
  adapters = [(f"{t}.self_attn.linear_{x}_adapter_list.{{j}}.{m}.weight", f"shared/adapters/{x}_{ab}", "in")
              for x, kv in (("q", "N"), ("k", "K"), ("v", "K")) for m, ab in ((0, "a_CR"), (1, f"b_R{kv}H"))]
  adapters += [(f"{t}.feed_forward.gate_up_proj_adapter_list.{{j}}.{m}.weight", f"shared/adapters/gate_up_{ab}", "in")
               for m, ab in ((0, "a_DR"), (1, "b_RJ"))]
  block = [
      (f"{t}.input_layernorm.weight", "blocks/attn_norm/scale", "flat"),
      *_attention(f"{t}.self_attn", "blocks/attn"),
      (f"{t}.pre_ff_layernorm.weight", "blocks/mlp_norm/scale", "flat"),
      (f"{t}.feed_forward.gate_up_proj.weight", "blocks/mlp/w_gate_up_DJ", "in"),
      (f"{t}.feed_forward.gate_up_proj.bias", "blocks/mlp/b_gate_up_J", "flat"),
      (f"{t}.feed_forward.down_proj.weight", "blocks/mlp/w_down_FD", "out"),
      (f"{t}.feed_forward.down_proj.bias", "blocks/mlp/b_down_D", "flat"),
  ]
  slots = [(j, k) for j in range(len(hybrid)) for k in range(len(hybrid)) if k % n == j % n]  # (layer, slot) pairs
  reads = lambda j, k: hybrid[j] == hybrid[k % B]  # noqa: E731
  tied = lambda rows: [(r[0], r[1], "tied") for r in rows]  # noqa: E731
  return [
      ("model.embed_tokens.weight", "embed/table_VD", "same"),
      ("model.final_layernorm.weight", "final_norm/scale", "flat"),
      *_layered([_norm(f"{layer}.input_layernorm", "mamba"), *_mixer(c, f"{layer}.mamba", "mamba")], _index(kinds, "mamba")),
      *_layered([_norm(f"{layer}.mamba_decoder.input_layernorm", "shared/mamba"),
                 *_mixer(c, f"{layer}.mamba_decoder.mamba", "shared/mamba"),
                 (f"{layer}.linear.weight", "shared/w_DD", "in")], _index(kinds, "shared")),
      *_layered(adapters, [({"i": hybrid[j], "j": k}, k) for j, k in slots if reads(j, k)]),
      *_layered(tied(adapters), [({"i": hybrid[j], "j": k}, k) for j, k in slots if not reads(j, k)]),
      *_layered(block, [(hybrid[j], j) for j in range(min(B, len(hybrid)))]),
      *_layered(tied(block), [(hybrid[j], j % B) for j in range(B, len(hybrid))]),
  ]


_TABLES = {"mamba2": _mamba2, "bamba": _bamba, "nemotron_h": _nemotron_h, "falcon_h1": _falcon_h1, "zamba2": _zamba2}


def table(c: Config) -> list[tuple]:
  rows = [*_TABLES[c.model_type](c), ("lm_head.weight", "lm_head/w_DV", "in")]
  # Optional parameters (biases, the untied head, gated norms) have rows only where the config declares them.
  declared = {"/".join(k) for k in traverse_util.flatten_dict(param_decls(c))}
  return [r for r in rows if r[1] in declared]
