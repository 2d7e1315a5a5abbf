"""Mamba-2 and the Mamba-2 / attention hybrids (Bamba, Nemotron-H, Falcon-H1, Zamba2), one
config-driven family.

Dimensions: B batch, T sequence, S cache length, D model width, F MLP width, V vocab, N SSM heads,
P SSM head dim, G groups, Q state size, W conv width, I mixer width (N P), E conv channels
(x, B and C: I + 2 G Q), Z in_proj outputs (z, x B C and dt: I + E + N), L layers of one kind;
Zamba2's shared blocks: C their input width (2 D), J = 2 F (fused gate and up), R adapter rank.

A model is a sequence of residual sublayers of six kinds:
  "mamba"   x += mixer(norm(x))                      the Mamba-2 mixer
  "attn"    x += attention(norm(x))                  the dense family's attention block
  "mlp"     x += mlp(norm(x))                        gated (Bamba, Falcon-H1) or relu² (Nemotron-H)
  "moe"     x += experts(norm(x)) + shared expert    Nemotron-H: sigmoid-routed relu² experts
  "hybrid"  h = norm(x); x += mixer(h) + attention(h)             Falcon-H1: both in parallel
  "shared"  t = block(concat(x, e)); x += mixer(norm(x + t))      Zamba2: e the embeddings; the
            block (attention then MLP, no residuals inside, then a per-layer linear) is one of
            num_mem_blocks shared blocks, taken round robin, with per-layer LoRA adapters.
Mamba-2 is mamba sublayers only; a Bamba layer is mamba or attn, then mlp; Nemotron-H spells its
layers as a pattern string of M (mamba), * (attn), - (mlp) and E (moe); a Falcon-H1 layer is hybrid, then
mlp; Zamba2 layers are mamba or shared. Parameters of one kind are stacked on a leading axis; the
sequence runs as a loop over its repeating block of kinds (a pattern that does not repeat is one block,
unrolled): a `lax.scan`, or in a decode step a `lax.while_loop` whose counter is the block index.

The cache holds, per mixer, the conv state (the last W - 1 inputs of the conv) and the SSM state
[N, P, Q] in float32, and a KV cache per attention: fixed shapes, so a decode step costs the same
at any position. Prompts are right-padded; the prefill takes each row's states at its own length
(dt = 0 on padding leaves the SSM state untouched).
"""

import dataclasses
import functools
import json
import math

import jax
import jax.numpy as jnp
import numpy as np
from flax import struct

from xlazoo.models import transformer
from xlazoo.models.params import Param, init_params, layer_params
from xlazoo.ops.conv import causal_conv_silu, conv_state
from xlazoo.ops.mlp import ACTIVATIONS, PreNorm, as_array, linear, linears
from xlazoo.ops.moe import route_sigmoid, routed_mlp
from xlazoo.ops.norms import gated_rms_norm, rms_norm
from xlazoo.ops.pallas import mamba2_stack_gpu
from xlazoo.ops.rope import Rope
from xlazoo.ops.ssd import mixer_step, ssd

MODEL_TYPES = ("mamba2", "bamba", "nemotron_h", "falcon_h1", "zamba2")
KINDS = ("mamba", "attn", "mlp", "moe", "hybrid", "shared")
MIXES = ("mamba", "hybrid", "shared")  # kinds with a Mamba mixer (a conv and SSM state each)
ATTENDS = ("attn", "hybrid", "shared")  # kinds with an attention (a KV cache each)
NO_POSITION_LIMIT = 1 << 30  # no position embeddings: Mamba-2, Nemotron-H


@dataclasses.dataclass(frozen=True)
class Multipliers:
  """Falcon-H1's fixed multipliers (1 for the other families)."""

  embed: float = 1.0  # embeddings
  logits: float = 1.0
  attn_in: float = 1.0  # attention input and output (in a hybrid sublayer)
  attn_out: float = 1.0
  ssm_in: float = 1.0  # mixer input and output
  ssm_out: float = 1.0
  ssm: tuple[float, ...] = (1.0,) * 5  # the in_proj output slices z, x, B, C, dt
  mlp_gate: float = 1.0  # the gate projection, before the activation
  mlp_down: float = 1.0  # the MLP output


@dataclasses.dataclass(frozen=True)
class MoE:
  """Nemotron-H's mixture of experts (relu² experts, a sigmoid router, one shared expert)."""

  experts: int  # X
  top_k: int
  width: int  # each expert's
  shared_width: int
  latent: int | None = None  # experts run in a latent width, projected from and back to D
  n_group: int = 1  # the choice keeps the topk_group best of n_group expert groups
  topk_group: int = 1
  norm_topk_prob: bool = True
  scale: float = 1.0  # routed_scaling_factor


@dataclasses.dataclass(frozen=True)
class Config:
  model_type: str
  vocab_size: int
  hidden_size: int  # D
  sublayers: tuple[str, ...]  # the kind of each residual sublayer, in order
  num_heads: int  # N
  head_dim: int  # P
  n_groups: int  # G
  state_size: int  # Q
  conv_width: int  # W
  chunk_size: int
  # dt is clamped to [dt_min, dt_max] in multi-token passes, not in the one-token decode step
  # (as transformers and mamba_ssm do)
  dt_min: float = 0.0
  dt_max: float = math.inf
  in_bias: bool = False  # in_proj / out_proj biases
  out_bias: bool = False
  conv_bias: bool = True
  # The mixer's gated RMSNorm: "gate_first" norm(y * silu(z)) * w (Mamba-2), "norm_first"
  # norm(y) * w * silu(z) (Falcon-H1), or None: y * silu(z).
  gate_norm: str | None = "gate_first"
  gate_norm_eps: float = 1e-5
  norm_eps: float = 1e-5
  mlp_gated: bool = True  # gate and up projections; else up only (Nemotron-H)
  mults: Multipliers = Multipliers()
  num_mem_blocks: int = 0  # Zamba2's shared blocks (each holds the adapters of the layers that use it)
  tie_blocks: bool = True  # transformers ties Zamba2's blocks only with the embeddings; else each layer has its own
  adapter_rank: int = 0  # R
  attn_adapters: bool = False  # Zamba2's q, k, v adapters (the MLP one is always there)
  tie_word_embeddings: bool = False
  max_position_embeddings: int = NO_POSITION_LIMIT
  attn: transformer.Config | None = None  # attention and MLP sublayers (their num_layers is unused)
  moe: MoE | None = None
  bos_token_id: int | None = None
  eos_token_ids: tuple[int, ...] = ()
  pad_token_id: int | None = None
  hf_json: str = dataclasses.field(default="{}", compare=False, repr=False)

  @property
  def hf(self) -> dict:
    return json.loads(self.hf_json)

  @property
  def inner(self) -> int:  # I
    return self.num_heads * self.head_dim

  @property
  def conv_dim(self) -> int:  # E
    return self.inner + 2 * self.n_groups * self.state_size

  @property
  def in_proj_outputs(self) -> int:  # I + E + N: in_proj's z, x B C and dt
    return self.inner + self.conv_dim + self.num_heads

  @property
  def in_proj_width(self) -> int:  # Z: in_proj_outputs, then unused columns up to a multiple of 128
    return -(-self.in_proj_outputs // 128) * 128

  @property
  def num_layers(self) -> int:  # as Hugging Face counts them: a Bamba or Falcon-H1 layer ends with its MLP
    return len(self.sublayers) - (self.count("mlp") if self.model_type in ("bamba", "falcon_h1") else 0)

  @property
  def shared_blocks(self) -> int:  # Zamba2: shared sublayer s uses block s % shared_blocks
    return self.num_mem_blocks if self.tie_blocks else self.count("shared")

  def count(self, *kinds: str) -> int:
    return sum(self.sublayers.count(k) for k in kinds)

  @classmethod
  def from_hf(cls, d: dict) -> "Config":
    mt = d.get("model_type")
    if mt not in MODEL_TYPES:
      raise ValueError(f"model_type {mt!r} is not a Mamba-2 family here (supported: {', '.join(MODEL_TYPES)})")

    def get(key, default=None):
      v = d.get(key)
      return default if v is None else v

    if d.get("quantization_config") is not None:
      raise ValueError("config field quantization_config is not supported: quantised checkpoints are not supported")
    eos = get("eos_token_id", [])
    common = dict(
        model_type=mt, vocab_size=int(d["vocab_size"]), hidden_size=int(d["hidden_size"]),
        tie_word_embeddings=bool(get("tie_word_embeddings", False)), bos_token_id=get("bos_token_id"),
        eos_token_ids=tuple(int(e) for e in (eos if isinstance(eos, list) else [eos])), pad_token_id=get("pad_token_id"),
        hf_json=json.dumps(d, sort_keys=True),
    )
    fields = _FROM_HF[mt](d, get)
    c = cls(**(common | fields))
    if c.num_heads % c.n_groups:
      raise ValueError(f"config field n_groups={c.n_groups} must divide the {c.num_heads} SSM heads")
    return c


def _float(v) -> float:
  """A float of config.json; transformers writes infinity as {"__float__": "Infinity"}."""
  return float(v["__float__"] if isinstance(v, dict) else v)


def _check_act(field: str, act: str):
  if act != "silu":
    raise ValueError(f"config field {field}={act!r} is not supported: the Mamba-2 conv activation is silu")


def _check_width(fields: str, heads: int, head_dim: int, width: int, what: str):
  if heads * head_dim != width:
    raise ValueError(f"config fields {fields} ({heads} * {head_dim}) must equal {what} ({width})")


def _mamba_heads(get, width: int, what: str) -> tuple[int, int]:
  """Bamba's and Falcon-H1's mamba_n_heads and mamba_d_head ("auto": width / heads)."""
  heads, head_dim = int(get("mamba_n_heads", 128)), get("mamba_d_head", "auto")
  head_dim = width // heads if head_dim == "auto" else int(head_dim)
  _check_width("mamba_n_heads * mamba_d_head", heads, head_dim, width, what)
  return heads, head_dim


def _limits(get) -> dict:
  lo, hi = (_float(v) for v in get("time_step_limit", (0.0, math.inf)))
  return dict(dt_min=lo, dt_max=hi)


def _rope(d: dict, get, max_pos: int, drop=()) -> Rope:
  """The attention's RoPE schedule from rope_parameters (5.x) or rope_theta / rope_scaling (4.x)."""
  p = dict(get("rope_scaling") or get("rope_parameters") or {})
  p.setdefault("rope_theta", float(get("rope_theta", 10000.0)))
  for k in drop:
    p.pop(k, None)
  return transformer._rope(p, max_pos, bool(p.get("truncate", True)))


def _attention(d: dict, get, mt: str, *, heads: int, head_dim: int, width: int, rope, act: str, **fields):
  """The attention / MLP sub-config (a dense transformer.Config whose num_layers is unused)."""
  if act not in ACTIVATIONS:
    raise ValueError(f"config field hidden_act={act!r} is not supported (supported: {', '.join(ACTIVATIONS)})")
  return transformer.Config(
      model_type=mt, vocab_size=int(d["vocab_size"]), hidden_size=width, intermediate_size=int(fields.pop("F")),
      num_layers=0, num_heads=heads, num_kv_heads=int(get("num_key_value_heads", heads)), head_dim=head_dim,
      max_position_embeddings=int(fields.pop("max_pos")), layer_types=(), ropes=(("full_attention", rope),),
      act=act, **fields,
  )


def _mamba2(d, get) -> dict:
  D, L = int(d["hidden_size"]), int(d["num_hidden_layers"])
  _check_act("hidden_act", get("hidden_act", "silu"))
  f = dict(
      sublayers=("mamba",) * L, num_heads=int(get("num_heads", 128)), head_dim=int(get("head_dim", 64)),
      n_groups=int(get("n_groups", 8)), state_size=int(get("state_size", 128)), conv_width=int(get("conv_kernel", 4)),
      chunk_size=int(get("chunk_size", 256)), in_bias=bool(get("use_bias", False)), out_bias=bool(get("use_bias", False)),
      conv_bias=bool(get("use_conv_bias", True)), norm_eps=float(get("layer_norm_epsilon", 1e-5)), **_limits(get),
  )
  _check_width("num_heads * head_dim", f["num_heads"], f["head_dim"], int(float(get("expand", 2)) * D), "expand * hidden_size")
  return f | {"gate_norm_eps": f["norm_eps"]}


def _bamba(d, get) -> dict:
  D, L = int(d["hidden_size"]), int(d["num_hidden_layers"])
  _check_act("hidden_act", get("hidden_act", "silu"))  # Bamba's conv and MLP share hidden_act
  attn_layers = set(get("attn_layer_indices", []))
  heads, head_dim = _mamba_heads(get, int(float(get("mamba_expand", 2)) * D), "mamba_expand * hidden_size")
  N = int(d["num_attention_heads"])
  H, eps, max_pos = int(get("head_dim", D // N)), float(get("rms_norm_eps", 1e-5)), int(get("max_position_embeddings", 262144))
  attn = _attention(
      d, get, "bamba", heads=N, head_dim=H, width=D, F=d["intermediate_size"], max_pos=max_pos, act="silu",
      rope=_rope(d, get, max_pos, drop=("partial_rotary_factor",)), rotary_dim=H // 2,  # fixed at half by transformers
      qkv_bias=bool(get("attention_bias", False)), o_bias=bool(get("attention_bias", False)),
      mlp_bias=bool(get("mlp_bias", False)), rms_norm_eps=eps,
  )
  return dict(
      sublayers=tuple(k for i in range(L) for k in ("attn" if i in attn_layers else "mamba", "mlp")),
      num_heads=heads, head_dim=head_dim, n_groups=int(get("mamba_n_groups", 1)),
      state_size=int(get("mamba_d_state", 256)), conv_width=int(get("mamba_d_conv", 4)),
      chunk_size=int(get("mamba_chunk_size", 256)), in_bias=bool(get("mamba_proj_bias", False)),
      out_bias=bool(get("mamba_proj_bias", False)), conv_bias=bool(get("mamba_conv_bias", True)),
      norm_eps=eps, gate_norm_eps=eps, attn=attn, max_position_embeddings=max_pos, **_limits(get),
  )


_NEMOTRON_KINDS = {"M": "mamba", "*": "attn", "-": "mlp", "E": "moe", "linear_attention": "mamba", "mamba": "mamba",
                   "full_attention": "attn", "attention": "attn", "mlp": "mlp", "moe": "moe"}


def _nemotron_h(d, get) -> dict:
  types = get("layers_block_type") or get("layer_types") or list(get("hybrid_override_pattern", ""))
  if not types:
    raise ValueError("config has no layer pattern: expected layers_block_type or hybrid_override_pattern")
  bad = sorted(set(types) - set(_NEMOTRON_KINDS))
  if bad:
    raise ValueError(f"config layer pattern has unknown layer kinds {bad} (supported: M, *, -, E or {sorted(_NEMOTRON_KINDS)[4:]})")
  _check_act("mamba_hidden_act", get("mamba_hidden_act", "silu"))
  eps, N = float(get("layer_norm_epsilon", 1e-5)), int(get("num_attention_heads", 32))
  attn = _attention(
      d, get, "nemotron_h", heads=N, head_dim=int(get("head_dim", 128)), width=int(d["hidden_size"]),
      F=get("intermediate_size", 21504), max_pos=NO_POSITION_LIMIT, act=get("mlp_hidden_act", "relu2"),
      rope=Rope(theta=10000.0), rotary_dim=0,  # no position encoding at all
      mlp_bias=bool(get("mlp_bias", False)), rms_norm_eps=eps,
  )
  moe = None
  if any(_NEMOTRON_KINDS[t] == "moe" for t in types):
    X = int(get("n_routed_experts", get("num_local_experts", 8)))
    moe = MoE(
        experts=X, top_k=int(get("num_experts_per_tok", 2)), width=int(get("moe_intermediate_size", 7688)),
        shared_width=int(get("moe_shared_expert_intermediate_size", 7688)), latent=get("moe_latent_size"),
        n_group=int(get("n_group", 1)), topk_group=int(get("topk_group", 1)), norm_topk_prob=bool(get("norm_topk_prob", True)),
        scale=float(get("routed_scaling_factor", 1.0)),
    )
    if X % moe.n_group or X // moe.n_group < 2 or not 0 < moe.topk_group <= moe.n_group:
      raise ValueError(
          f"config fields n_group={moe.n_group} and topk_group={moe.topk_group} do not fit {X} experts: n_group must divide "
          "n_routed_experts into groups of at least 2, and 0 < topk_group <= n_group"
      )
    if not 0 < moe.top_k <= X:
      raise ValueError(f"config field num_experts_per_tok={moe.top_k} must be between 1 and n_routed_experts={X}")
  return dict(
      sublayers=tuple(_NEMOTRON_KINDS[t] for t in types), num_heads=int(get("mamba_num_heads", 128)),
      head_dim=int(get("mamba_head_dim", 64)), n_groups=int(get("n_groups", 8)), state_size=int(get("ssm_state_size", 128)),
      conv_width=int(get("conv_kernel", 4)), chunk_size=int(get("chunk_size", 128)), in_bias=bool(get("use_bias", False)),
      out_bias=bool(get("use_bias", False)), conv_bias=bool(get("use_conv_bias", True)), norm_eps=eps, gate_norm_eps=eps,
      dt_min=float(get("time_step_min", 1e-3)), mlp_gated=False, attn=attn, moe=moe,
      tie_word_embeddings=False,  # transformers never ties Nemotron-H's head, whatever the config says
  )


def _falcon_h1(d, get) -> dict:
  D, L = int(d["hidden_size"]), int(d["num_hidden_layers"])
  _check_act("hidden_act", get("hidden_act", "silu"))  # Falcon-H1's conv and MLP share hidden_act
  width = d.get("mamba_d_ssm", 1024)  # null: mamba_expand * hidden_size
  width = int(float(get("mamba_expand", 2)) * D) if width is None else int(width)
  heads, head_dim = _mamba_heads(get, width, "mamba_d_ssm")
  N = int(d["num_attention_heads"])
  H, eps, max_pos = int(get("head_dim", D // N)), float(get("rms_norm_eps", 1e-5)), int(get("max_position_embeddings", 8192))
  attn = _attention(
      d, get, "falcon_h1", heads=N, head_dim=H, width=D, F=d["intermediate_size"], max_pos=max_pos, act="silu",
      rope=_rope(d, get, max_pos), query_scale=float(get("key_multiplier", 1.0)) * H**-0.5,
      qkv_bias=bool(get("attention_bias", False)), o_bias=bool(get("attention_bias", False)),
      mlp_bias=bool(get("mlp_bias", False)), rms_norm_eps=eps,
  )
  ssm = tuple(float(m) for m in get("ssm_multipliers", [1.0] * 5))
  gate, down = (float(m) for m in get("mlp_multipliers", [1.0, 1.0]))
  if len(ssm) != 5:
    raise ValueError(f"config field ssm_multipliers has {len(ssm)} values; it needs 5 (z, x, B, C, dt)")
  mults = Multipliers(
      embed=float(get("embedding_multiplier", 1.0)), logits=float(get("lm_head_multiplier", 1.0)),
      attn_in=float(get("attention_in_multiplier", 1.0)), attn_out=float(get("attention_out_multiplier", 1.0)),
      ssm_in=float(get("ssm_in_multiplier", 1.0)), ssm_out=float(get("ssm_out_multiplier", 1.0)), ssm=ssm,
      mlp_gate=gate, mlp_down=down,
  )
  norm = bool(get("mamba_rms_norm", False))
  return dict(
      sublayers=("hybrid", "mlp") * L, num_heads=heads, head_dim=head_dim, n_groups=int(get("mamba_n_groups", 1)),
      state_size=int(get("mamba_d_state", 256)), conv_width=int(get("mamba_d_conv", 4)),
      chunk_size=int(get("mamba_chunk_size", 256)), in_bias=bool(get("mamba_proj_bias", False)),
      out_bias=bool(get("projectors_bias", False)), conv_bias=bool(get("mamba_conv_bias", True)),
      gate_norm=("norm_first" if get("mamba_norm_before_gate", True) else "gate_first") if norm else None,
      norm_eps=eps, gate_norm_eps=eps, mults=mults, attn=attn, max_position_embeddings=max_pos, **_limits(get),
  )


def _zamba2(d, get) -> dict:
  D = int(d["hidden_size"])
  types, tie = get("layers_block_type") or get("layer_types"), bool(get("tie_word_embeddings", True))
  if not types:
    raise ValueError("config field layers_block_type is missing: Zamba2 needs its list of mamba / hybrid layers")
  heads, width = int(get("n_mamba_heads", 8)), int(float(get("mamba_expand", 2)) * D)
  head_dim = int(get("mamba_headdim", width // heads))
  _check_width("n_mamba_heads * mamba_headdim", heads, head_dim, width, "mamba_expand * hidden_size")
  N = int(d["num_attention_heads"])
  H, eps = 2 * D // N, float(get("rms_norm_eps", 1e-5))  # the shared blocks attend over concat(x, embeddings)
  max_pos, adapters, bias = int(get("max_position_embeddings", 4096)), bool(get("use_shared_attention_adapter", False)), bool(
      get("add_bias_linear", False))
  attn = _attention(
      d, get, "zamba2", heads=N, head_dim=H, width=2 * D, F=get("intermediate_size", 4 * D), max_pos=max_pos,
      act=get("hidden_act", "gelu"), rope=_rope(d, get, max_pos), rotary_dim=None if get("use_mem_rope", False) else 0,
      query_scale=(H / 2) ** -0.5, mlp_bias=bias, rms_norm_eps=eps,
  )
  if adapters and attn.num_kv_heads != N:
    raise ValueError(
        f"config fields num_key_value_heads={attn.num_kv_heads} and use_shared_attention_adapter=true do not go together: "
        "Zamba2's k and v adapters need as many key/value heads as query heads"
    )
  return dict(
      sublayers=tuple("shared" if t == "hybrid" else "mamba" for t in types), num_heads=heads, head_dim=head_dim,
      n_groups=int(get("mamba_ngroups", 1)), state_size=int(get("mamba_d_state", 64)), conv_width=int(get("mamba_d_conv", 4)),
      chunk_size=int(get("chunk_size", 256)), in_bias=bias, out_bias=bias, conv_bias=True,  # use_conv_bias is ignored
      dt_min=float(get("time_step_min", 1e-3)), norm_eps=eps, gate_norm_eps=1e-5,  # fixed in transformers
      num_mem_blocks=int(get("num_mem_blocks", 1)), adapter_rank=int(get("adapter_rank", 128)), attn_adapters=adapters,
      attn=attn, max_position_embeddings=max_pos, tie_word_embeddings=tie, tie_blocks=tie,
  )


_FROM_HF = {"mamba2": _mamba2, "bamba": _bamba, "nemotron_h": _nemotron_h, "falcon_h1": _falcon_h1, "zamba2": _zamba2}


# ----------------------------------------------------------------------------- parameters


def _stacked(n: int, decls: dict) -> dict:
  return jax.tree.map(lambda p: Param((n, *p.shape), ("layers", *p.axes), p.init), decls, is_leaf=lambda x: isinstance(x, Param))


def _norm_decl(dim: int) -> dict:
  return {"scale": Param((dim,), ("norm",), "ones")}


def _mixer_decls(c: Config) -> dict:
  D, N, I, E, W = c.hidden_size, c.num_heads, c.inner, c.conv_dim, c.conv_width
  # in_proj's width padded to a multiple of 128 (Mamba-2 2.7B: 10576 -> 10624): the decode GEMV then reads
  # its tiles in 128-byte TMA rows, not 32-byte ones (H100: a token 4.10 -> 3.82 ms). The padding columns
  # are zero on conversion and their outputs are dropped; export writes only the real ones.
  Z = c.in_proj_width
  p = {
      "w_in_DZ": Param((D, Z), ("embed", "ssm_in")),
      "conv_w_WE": Param((W, E), ("conv_width", "ssm_conv")),
      "dt_bias_N": Param((N,), ("ssm_heads",), "zeros"),
      "A_log_N": Param((N,), ("ssm_heads",), "zeros"),
      "D_N": Param((N,), ("ssm_heads",), "ones"),
      "w_out_ID": Param((I, D), ("ssm_inner", "embed")),
  }
  if c.gate_norm:
    p["gate_norm"] = {"scale": Param((I,), ("ssm_inner",), "ones")}
  if c.conv_bias:
    p["conv_b_E"] = Param((E,), ("ssm_conv",), "zeros")
  if c.in_bias:
    p["b_in_Z"] = Param((Z,), ("ssm_in",), "zeros")
  if c.out_bias:
    p["b_out_D"] = Param((D,), ("embed",), "zeros")
  return p


def _dense(c: Config) -> dict:
  """The dense family's attention and MLP declarations for one layer."""
  layers = transformer.param_decls(dataclasses.replace(c.attn, num_layers=1))["layers"]
  return jax.tree.map(lambda p: Param(p.shape[1:], p.axes[1:], p.init), layers, is_leaf=lambda x: isinstance(x, Param))


def _mlp_decls(c: Config) -> dict:
  mlp = _dense(c)["mlp"]
  if not c.mlp_gated:
    mlp = {k: v for k, v in mlp.items() if "gate" not in k}
  return mlp


def _moe_decls(c: Config) -> dict:
  m, D = c.moe, c.hidden_size
  X, F, S, Din = m.experts, m.width, m.shared_width, m.latent or c.hidden_size
  p = {
      "router_DX": Param((D, X), ("embed", "experts")),
      "router_bias_X": Param((X,), ("experts",), "zeros"),
      "w_up_XDF": Param((X, Din, F), ("experts", "embed", "mlp")),
      "w_down_XFD": Param((X, F, Din), ("experts", "mlp", "embed")),
      "shared": {"w_up_DF": Param((D, S), ("embed", "mlp")), "w_down_FD": Param((S, D), ("mlp", "embed"))},
  }
  if m.latent:
    p |= {"latent_in_DL": Param((D, Din), ("embed", None)), "latent_out_LD": Param((Din, D), (None, "embed"))}
  if c.attn.mlp_bias:
    p["shared"] |= {"b_up_F": Param((S,), ("mlp",), "zeros"), "b_down_D": Param((D,), ("embed",), "zeros")}
    if m.latent:
      p |= {"latent_in_b_L": Param((Din,), (None,), "zeros"), "latent_out_b_D": Param((D,), ("embed",), "zeros")}
  return p


def _shared_decls(c: Config) -> tuple[dict, dict]:
  """Zamba2: one shared block (attention over C = 2 D inputs, output D; fused gate/up MLP), and
  each shared sublayer's own parameters (adapters, the linear after the block, its mixer)."""
  D, C, F, R = c.hidden_size, 2 * c.hidden_size, c.attn.intermediate_size, c.adapter_rank
  N, K, H = c.attn.num_heads, c.attn.num_kv_heads, c.attn.head_dim
  attn = _dense(c)["attn"] | {"wo_NHD": Param((N, H, D), ("heads", "head_dim", "embed"))}
  mlp = {"w_gate_up_DJ": Param((D, 2 * F), ("embed", "mlp")), "w_down_FD": Param((F, D), ("mlp", "embed"))}
  if c.attn.mlp_bias:
    mlp |= {"b_gate_up_J": Param((2 * F,), ("mlp",), "zeros"), "b_down_D": Param((D,), ("embed",), "zeros")}
  block = {"attn_norm": _norm_decl(C), "attn": attn, "mlp_norm": _norm_decl(D), "mlp": mlp}
  adapters = {"gate_up_a_DR": Param((D, R), ("embed", None)), "gate_up_b_RJ": Param((R, 2 * F), (None, "mlp"))}
  if c.attn_adapters:
    for x, out, heads in (("q", (N, H), "heads"), ("k", (K, H), "kv_heads"), ("v", (K, H), "kv_heads")):
      adapters |= {f"{x}_a_CR": Param((C, R), ("embed", None)), f"{x}_b_R{'N' if x == 'q' else 'K'}H": Param((R, *out), (None, heads, "head_dim"))}
  own = {"adapters": adapters, "w_DD": Param((D, D), ("embed", "embed")), "mamba": _mixer_decls(c) | {"norm": _norm_decl(D)}}
  return block, own


def param_decls(c: Config) -> dict:
  D, V = c.hidden_size, c.vocab_size
  decls = {"embed": {"table_VD": Param((V, D), ("vocab", "embed"))}, "final_norm": _norm_decl(D)}
  groups = {
      "mamba": lambda: _mixer_decls(c) | {"norm": _norm_decl(D)},
      "attn": lambda: _dense(c)["attn"] | {"norm": _norm_decl(D)},
      "mlp": lambda: _mlp_decls(c) | {"norm": _norm_decl(D)},
      "moe": lambda: _moe_decls(c) | {"norm": _norm_decl(D)},
      "hybrid": lambda: {"norm": _norm_decl(D), "mamba": _mixer_decls(c), "attn": _dense(c)["attn"]},
      "shared": lambda: _shared_decls(c)[1],
  }
  for kind in KINDS:
    if c.count(kind):
      decls[kind] = _stacked(c.count(kind), groups[kind]())
  if c.count("shared"):
    decls["blocks"] = _stacked(min(c.shared_blocks, c.count("shared")), _shared_decls(c)[0])
  if not c.tie_word_embeddings:
    decls["lm_head"] = {"w_DV": Param((D, V), ("embed", "vocab"))}
  return decls


def init(config: Config, key: jax.Array, dtype=jnp.float32) -> dict:
  return init_params(param_decls(config), key, dtype)


# ----------------------------------------------------------------------------- cache


@struct.dataclass
class Cache:
  conv_LBWE: jax.Array | None  # the last W - 1 conv inputs of each mixer
  ssm_LBNPQ: jax.Array | None  # float32
  kv: transformer.KVCache | None  # each attention's

  @property
  def max_len(self) -> int:
    return self.kv.max_len if self.kv is not None else NO_POSITION_LIMIT


def init_cache(config: Config, batch: int, max_len: int, dtype) -> Cache:
  c, M, A = config, config.count(*MIXES), config.count(*ATTENDS)
  conv = jnp.zeros((M, batch, c.conv_width - 1, c.conv_dim), dtype) if M else None
  ssm = jnp.zeros((M, batch, c.num_heads, c.head_dim, c.state_size), jnp.float32) if M else None
  kv = transformer.init_cache(dataclasses.replace(c.attn, num_layers=A), batch, max_len, dtype) if A else None
  return Cache(conv, ssm, kv)


# ----------------------------------------------------------------------------- forward


def _mamba(c: Config, p: dict, h_BTD, cache: Cache | None, layer, lengths_B, norm: PreNorm | None = None):
  """The Mamba-2 mixer on h (normed first, with a norm); with a cache, one step (T == 1) or a prefill that
  leaves each row's states."""
  Bsz, T, _ = h_BTD.shape
  N, P, G, Q, I, W = c.num_heads, c.head_dim, c.n_groups, c.state_size, c.inner, c.conv_width
  m = c.mults
  if m.ssm_in != 1.0:
    h_BTD = (norm(h_BTD) if norm else h_BTD) * jnp.asarray(m.ssm_in, h_BTD.dtype)
    norm = None
  zxbcdt_BTZ = linear(h_BTD, p["w_in_DZ"], "BTD,DZ->BTZ", p.get("b_in_Z"), norm)  # z, x B C, dt, then padding
  if m.ssm != (1.0,) * 5:  # Falcon-H1: one multiplier per slice z, x, B, C, dt
    sizes = (I, I, G * Q, G * Q, N, c.in_proj_width - c.in_proj_outputs)
    zxbcdt_BTZ = zxbcdt_BTZ * jnp.asarray(np.repeat(m.ssm + (1.0,), sizes), zxbcdt_BTZ.dtype)
  z_BTI, xbc_BTE, dt_BTN, _ = jnp.split(zxbcdt_BTZ, [I, I + c.conv_dim, c.in_proj_outputs], axis=-1)
  step = cache is not None and T == 1
  # A decode step with norm(y silu(z)) over all I channels: the step applies the gate, and the norm goes to
  # out_proj with its input (into the GEMV kernel, where it applies).
  gated_step = step and c.gate_norm == "gate_first" and G == 1
  if step:  # the caches and the mixer's vectors read in their stacks
    y_BI, conv_LBWE, ssm_LBNPQ = mixer_step(
        zxbcdt_BTZ[:, 0], cache.conv_LBWE, cache.ssm_LBNPQ, layer, p["conv_w_WE"], p.get("conv_b_E"), p["dt_bias_N"],
        p["A_log_N"], p["D_N"], groups=G, gate=gated_step)
    y_BTNP, cache = y_BI.reshape(Bsz, 1, N, P), cache.replace(conv_LBWE=conv_LBWE, ssm_LBNPQ=ssm_LBNPQ)
  else:
    before = cache.conv_LBWE[layer] if cache is not None else None
    if cache is not None:
      n_B = lengths_B if lengths_B is not None else jnp.full((Bsz,), T, jnp.int32)
      new_conv = conv_state(xbc_BTE, n_B, W, before)
    # x, B and C in the activations' dtype (as transformers and mamba_ssm have them): bfloat16 operands of
    # the SSD's matmuls in a bfloat16 model. x apart from B and C: the SSD takes each as an array of its own.
    conv = functools.partial(causal_conv_silu, zxbcdt_BTZ, p["conv_w_WE"], p.get("conv_b_E"), before, start=I)
    x_BTI, bc_BTG = conv(channels=(0, I)), conv(channels=(I, c.conv_dim))
    b_BTG, c_BTG = jnp.split(bc_BTG, 2, axis=-1)
    x_BTNP = x_BTI.reshape(Bsz, T, N, P)
    b_BTGQ, c_BTGQ = b_BTG.reshape(Bsz, T, G, Q), c_BTG.reshape(Bsz, T, G, Q)
    dt_BTN = jax.nn.softplus(dt_BTN.astype(jnp.float32) + p["dt_bias_N"].astype(jnp.float32))
    A_N = -jnp.exp(p["A_log_N"].astype(jnp.float32))
    dt_BTN = jnp.clip(dt_BTN, c.dt_min, c.dt_max)  # the step has no dt limits, as in transformers and mamba_ssm
    if lengths_B is not None:  # padding: dt = 0 leaves the state as it is
      dt_BTN = jnp.where(jnp.arange(T)[None, :, None] < lengths_B[:, None, None], dt_BTN, 0.0)
    init = cache.ssm_LBNPQ[layer] if cache is not None else None
    y_BTNP, state = ssd(x_BTNP, dt_BTN, A_N, b_BTGQ, c_BTGQ, chunk=c.chunk_size, state_BNPQ=init, D_N=p["D_N"])
    if cache is not None:
      cache = cache.replace(
          conv_LBWE=jax.lax.dynamic_update_index_in_dim(cache.conv_LBWE, new_conv.astype(cache.conv_LBWE.dtype), layer, 0),
          ssm_LBNPQ=jax.lax.dynamic_update_index_in_dim(cache.ssm_LBNPQ, state, layer, 0),
      )
  if gated_step:
    out_BTD = linear(y_BTNP.reshape(Bsz, T, I), p["w_out_ID"], "BTI,ID->BTD", p.get("b_out_D"),
                     PreNorm(p["gate_norm"]["scale"], c.gate_norm_eps))
  else:
    y_BTI = y_BTNP.reshape(Bsz, T, I)
    if c.gate_norm is None:
      v_BTI = (y_BTI.astype(jnp.float32) * jax.nn.silu(z_BTI.astype(jnp.float32))).astype(h_BTD.dtype)
    else:  # RMSNorm over each of the G groups of I / G channels, before or after the gate
      v_BTI = gated_rms_norm(y_BTI, zxbcdt_BTZ, as_array(p["gate_norm"]["scale"]), c.gate_norm_eps, groups=G,
                             norm_first=c.gate_norm == "norm_first").astype(h_BTD.dtype)
    out_BTD = linear(v_BTI, p["w_out_ID"], "BTI,ID->BTD", p.get("b_out_D"))
  if m.ssm_out != 1.0:
    out_BTD = out_BTD * jnp.asarray(m.ssm_out, out_BTD.dtype)
  return out_BTD, cache


def _mlp(c: Config, p: dict, h_BTD, lora_BTJ=None, norm: PreNorm | None = None):
  """down(act(gate(h)) * up(h)), or down(act(up(h))) when not gated; Zamba2 fuses gate and up. With a norm,
  of norm(h) (not with Zamba2's adapters)."""
  m, act = c.mults, ACTIVATIONS[c.attn.act]
  if "w_gate_up_DJ" in p:
    gate_up_BTJ = linear(h_BTD, p["w_gate_up_DJ"], "BTD,DJ->BTJ", p.get("b_gate_up_J")).astype(jnp.float32) + lora_BTJ
    gate_BTF, up_BTF = jnp.split(gate_up_BTJ, 2, axis=-1)
    a_BTF = act(gate_BTF) * up_BTF
  elif c.mlp_gated:
    gate_BTF, up_BTF = (y.astype(jnp.float32) for y in linears(
        h_BTD, [p["w_gate_DF"], p["w_up_DF"]], ["BTD,DF->BTF"] * 2, [p.get("b_gate_F"), p.get("b_up_F")], norm))
    a_BTF = act(gate_BTF * m.mlp_gate) * up_BTF
  else:
    a_BTF = act(linear(h_BTD, p["w_up_DF"], "BTD,DF->BTF", p.get("b_up_F"), norm).astype(jnp.float32))
  out_BTD = linear(a_BTF.astype(h_BTD.dtype), p["w_down_FD"], "BTF,FD->BTD", p.get("b_down_D"))
  return out_BTD * jnp.asarray(m.mlp_down, out_BTD.dtype) if m.mlp_down != 1.0 else out_BTD


def _moe(c: Config, p: dict, h_BTD):
  """Routed experts (in the latent width, if any) plus the shared expert."""
  m, (B, T, D) = c.moe, h_BTD.shape
  x_MD = h_BTD.reshape(B * T, D)
  experts_MK, weights_MK = route_sigmoid(x_MD, p["router_DX"], p["router_bias_X"], k=m.top_k, n_group=m.n_group,
                                         topk_group=m.topk_group, norm=m.norm_topk_prob, scale=m.scale)
  if m.latent:
    x_MD = linear(x_MD, p["latent_in_DL"], "MD,DL->ML", p.get("latent_in_b_L"))
  y_MD = routed_mlp(x_MD, experts_MK, weights_MK, p["w_up_XDF"], p["w_down_XFD"], c.attn.act)
  if m.latent:
    y_MD = linear(y_MD, p["latent_out_LD"], "ML,LD->MD", p.get("latent_out_b_D"))
  return y_MD.reshape(B, T, D) + _mlp(c, p["shared"], h_BTD)


def _attend(c: Config, p: dict, h_BTD, pos_BT, rope, cache: Cache | None, slot, qkv_delta=None,
            norm: PreNorm | None = None):
  """The dense family's attention block on the cache's KV slot `slot` (on norm(h), with a norm)."""
  inv_freq_H, rope_scale = rope
  kv = cache.kv if cache is not None else None
  out_BTD, kv = transformer._attention_block(c.attn, p, h_BTD, pos_BT, 0, inv_freq_H, rope_scale, kv, slot, qkv_delta,
                                             norm=norm)
  return out_BTD, cache.replace(kv=kv) if cache is not None else None


def _shared(c: Config, blk: dict, p: dict, x_BTD, e_BTD, pos_BT, rope, cache: Cache | None, slot):
  """Zamba2's shared block on concat(x, embeddings): attention, then the MLP (no residuals inside),
  each with this layer's adapters; then this layer's linear."""
  a, f32 = p["adapters"], jnp.float32
  h_BTC = rms_norm(jnp.concatenate([x_BTD, e_BTD], axis=-1), as_array(blk["attn_norm"]["scale"]), c.norm_eps)
  delta = None
  if c.attn_adapters:
    r_BTR = {x: jnp.einsum("BTC,CR->BTR", h_BTC, a[f"{x}_a_CR"], preferred_element_type=f32) for x in "qkv"}
    delta = (jnp.einsum("BTR,RNH->BTNH", r_BTR["q"], a["q_b_RNH"], preferred_element_type=f32),
             *(jnp.einsum("BTR,RKH->BTKH", r_BTR[x], a[f"{x}_b_RKH"], preferred_element_type=f32) for x in "kv"))
  o_BTD, cache = _attend(c, blk["attn"], h_BTC, pos_BT, rope, cache, slot, delta)
  h_BTD = rms_norm(o_BTD, as_array(blk["mlp_norm"]["scale"]), c.norm_eps)
  r_BTR = jnp.einsum("BTD,DR->BTR", h_BTD, a["gate_up_a_DR"], preferred_element_type=f32)
  t_BTD = _mlp(c, blk["mlp"], h_BTD, jnp.einsum("BTR,RJ->BTJ", r_BTR, a["gate_up_b_RJ"], preferred_element_type=f32))
  return linear(t_BTD, p["w_DD"], "BTD,DE->BTE"), cache


def _block(kinds: tuple[str, ...]) -> tuple[tuple[str, ...], int]:
  """The shortest block that the sequence of kinds repeats, and how many times."""
  n = len(kinds)
  for p in range(1, n + 1):
    if n % p == 0 and kinds == kinds[:p] * (n // p):
      return kinds[:p], n // p
  return kinds, 1


def _mamba_stack_step(c: Config, params: dict, x_BTD, cache: Cache):
  """(x, cache) after a decode step of a Mamba-2 stack for one sequence in one kernel (`mamba2_stack_gpu`),
  where it applies: mamba sublayers only, one group, the gate before the norm, no in/out biases, no multipliers
  on the mixer; None elsewhere. The kernel keeps the residual in float32 and rounds it once, at the end."""
  m, p = c.mults, params.get("mamba")
  if (set(c.sublayers) != {"mamba"} or c.gate_norm != "gate_first" or c.in_bias or c.out_bias
      or (m.ssm_in, m.ssm_out, m.ssm) != (1.0, 1.0, (1.0,) * 5) or not mamba2_stack_gpu.ENABLED
      or not mamba2_stack_gpu.supported(x_BTD[:, 0], p["w_in_DZ"], p["w_out_ID"], cache.conv_LBWE, cache.ssm_LBNPQ,
                                        c.n_groups)):
    return None
  conv_b_LE = p.get("conv_b_E")
  if conv_b_LE is None:
    conv_b_LE = jnp.zeros(p["conv_w_WE"].shape[::2], p["conv_w_WE"].dtype)
  h_D, conv_LBWE, ssm_LBNPQ = mamba2_stack_gpu.step(
      x_BTD[0, 0], p["norm"]["scale"], p["w_in_DZ"], p["conv_w_WE"], conv_b_LE, p["dt_bias_N"], p["A_log_N"], p["D_N"],
      p["gate_norm"]["scale"], p["w_out_ID"], cache.conv_LBWE, cache.ssm_LBNPQ, eps=c.norm_eps,
      gate_norm_eps=c.gate_norm_eps)
  return h_D.astype(x_BTD.dtype)[None, None], cache.replace(conv_LBWE=conv_LBWE, ssm_LBNPQ=ssm_LBNPQ)


def forward(
    config: Config,
    params: dict,
    tokens_BT: jax.Array,
    *,
    cache: Cache | None = None,
    positions: jax.Array | None = None,
    logits_at: jax.Array | None = None,
    lengths: jax.Array | None = None,
) -> tuple[jax.Array, Cache | None]:
  """Logits [B, T, V] (float32) and the updated cache; arguments as transformer.forward.

  lengths: [B] real tokens of each right-padded row; the cache keeps each row's states after its
  own last token (default: all T tokens are real). With a cache and T == 1 it is one decode step.
  """
  c, m = config, config.mults
  B, T = tokens_BT.shape
  pos_BT = positions  # None: 0..T-1
  table_VD = params["embed"]["table_VD"]
  x_BTD = jnp.take(table_VD, tokens_BT, axis=0)
  if m.embed != 1.0:
    x_BTD = x_BTD * jnp.asarray(m.embed, x_BTD.dtype)
  e_BTD = x_BTD  # Zamba2's shared blocks see the embeddings
  rope = None
  if c.count(*ATTENDS):
    r = dict(c.attn.ropes)["full_attention"]
    rope = (jnp.asarray(r.inv_freq(c.attn.rope_dim)), r.scale())
  block, reps = _block(c.sublayers)
  per_block = {k: block.count(k) for k in KINDS}
  mixes, attends = sum(per_block[k] for k in MIXES), sum(per_block[k] for k in ATTENDS)
  # Each kind's stack [n, ...] -> [reps, n / reps, ...]: the scan walks the blocks.
  xs = {k: jax.tree.map(lambda a: a.reshape(reps, per_block[k], *a.shape[1:]), params[k]) for k in KINDS if per_block[k]}
  # A decode step reads the weights from their stacks in place (see LayerWeight); elsewhere the scan slices them.
  decode = cache is not None and T == 1

  def body(carry, xs_rep):
    x_BTD, cache = carry
    p_block, rep = xs_rep
    seen = dict.fromkeys(KINDS, 0)
    mix = att = 0  # cache slots: conv / SSM states for mixers, KV for attention
    for kind in block:
      j = seen[kind]
      seen[kind] += 1
      i = rep * per_block[kind] + j
      if decode:
        p = layer_params(params[kind], i, in_place=True)
      else:
        p = jax.tree.map(lambda a: a[j], p_block[kind])  # noqa: B023
      ms, at = rep * mixes + mix, rep * attends + att
      mix, att = mix + (kind in MIXES), att + (kind in ATTENDS)
      # The norm goes with its input to the projections, which apply it (a decode step's GEMV kernel does,
      # the scale read in its stack).
      norm = PreNorm((p["mamba"] if kind == "shared" else p)["norm"]["scale"], c.norm_eps)
      if kind == "shared":
        blk = layer_params(params["blocks"], i % c.shared_blocks, in_place=decode)
        t_BTD, cache = _shared(c, blk, p, x_BTD, e_BTD, pos_BT, rope, cache, at)
        out_BTD, cache = _mamba(c, p["mamba"], x_BTD + t_BTD, cache, ms, lengths, norm)
      elif kind == "mamba":
        out_BTD, cache = _mamba(c, p, x_BTD, cache, ms, lengths, norm)
      elif kind == "attn":
        out_BTD, cache = _attend(c, p, x_BTD, pos_BT, rope, cache, at, norm=norm)
      elif kind == "mlp":
        out_BTD = _mlp(c, p, x_BTD, norm=norm)
      elif kind == "moe":
        out_BTD = _moe(c, p, norm(x_BTD))
      else:  # hybrid: mixer and attention side by side
        h_BTD = norm(x_BTD)
        mix_BTD, cache = _mamba(c, p["mamba"], h_BTD, cache, ms, lengths)
        a_BTD, cache = _attend(c, p["attn"], h_BTD * jnp.asarray(m.attn_in, h_BTD.dtype), pos_BT, rope, cache, at)
        out_BTD = mix_BTD + a_BTD * jnp.asarray(m.attn_out, a_BTD.dtype)
      x_BTD = x_BTD + out_BTD
    return (x_BTD, cache), None

  stacked = _mamba_stack_step(c, params, x_BTD, cache) if decode and B == 1 else None
  if stacked:
    x_BTD, cache = stacked
  elif decode:  # the block index as the loop's own counter: a scan would slice it out of an arange, in a kernel

    def step(c):
      rep, x_BTD, cache = c
      (x_BTD, cache), _ = body((x_BTD, cache), ({}, rep))
      return rep + 1, x_BTD, cache

    _, x_BTD, cache = jax.lax.while_loop(lambda c: c[0] < reps, step, (0, x_BTD, cache))
  else:
    (x_BTD, cache), _ = jax.lax.scan(body, (x_BTD, cache), (xs, jnp.arange(reps)))
  if logits_at is not None:
    x_BTD = jnp.take_along_axis(x_BTD, logits_at[:, None, None], axis=1)
  x_BTD = rms_norm(x_BTD, params["final_norm"]["scale"], c.norm_eps)
  head_DV = table_VD.T if c.tie_word_embeddings else params["lm_head"]["w_DV"]
  logits_BTV = jnp.einsum("BTD,DV->BTV", x_BTD, head_DV, preferred_element_type=jnp.float32)
  return logits_BTV * m.logits if m.logits != 1.0 else logits_BTV, cache
