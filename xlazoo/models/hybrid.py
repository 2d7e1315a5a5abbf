"""Mamba-2 and the Mamba-2 / attention hybrids (Bamba), as one config-driven family.

Dimensions: B batch, T sequence, S cache length, D model width, F MLP width, V vocab, N SSM heads,
P SSM head dim, G groups, Q state size, W conv width, I mixer width (N P), E conv channels
(x, B and C: I + 2 G Q), Z in_proj outputs (z, x B C and dt: I + E + N), L layers of one kind.

A model is a sequence of residual sublayers, x <- x + f(norm(x)), of three kinds: "mamba" (the
Mamba-2 mixer), "attn" (the dense family's attention block) and "mlp" (its gated MLP). Mamba-2 is
mamba sublayers only; a Bamba layer is a mamba or an attention sublayer followed by an MLP one.
Parameters of one kind are stacked on a leading axis; the sequence runs as a `lax.scan` over its
repeating block of kinds (a pattern that does not repeat is one block, unrolled).

The cache holds, per mamba sublayer, the conv state (the last W - 1 inputs of the conv) and the
SSM state [N, P, Q] in float32, and a KV cache for the attention sublayers: fixed shapes, so a
decode step costs the same at any position. Prompts are right-padded; the prefill takes each row's
states at its own length (dt = 0 on padding leaves the SSM state untouched).
"""

import dataclasses
import json
import math

import jax
import jax.numpy as jnp
from flax import struct

from xlazoo.models import transformer
from xlazoo.models.params import Param, init_params
from xlazoo.ops.conv import causal_conv, conv_state, conv_step
from xlazoo.ops.mlp import ACTIVATIONS, gated_mlp, linear
from xlazoo.ops.norms import rms_norm
from xlazoo.ops.rope import Rope
from xlazoo.ops.ssd import ssd, ssd_step

MODEL_TYPES = ("mamba2", "bamba")
KINDS = ("mamba", "attn", "mlp")
NO_POSITION_LIMIT = 1 << 30  # Mamba-2 has no position embeddings


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
  dt_min: float = 0.0  # dt is clamped to [dt_min, dt_max] (time_step_limit)
  dt_max: float = math.inf
  proj_bias: bool = False  # in_proj / out_proj biases
  conv_bias: bool = True
  norm_eps: float = 1e-5
  tie_word_embeddings: bool = False
  max_position_embeddings: int = NO_POSITION_LIMIT
  attn: transformer.Config | None = None  # attention and MLP sublayers (their num_layers is unused)
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
  def num_layers(self) -> int:  # as Hugging Face counts them: a Bamba layer is a mixer and an MLP
    return len(self.sublayers) - self.count("mlp")

  def count(self, kind: str) -> int:
    return self.sublayers.count(kind)

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
    D, L = int(d["hidden_size"]), int(d["num_hidden_layers"])
    act = get("hidden_act", "silu")
    if act != "silu":
      raise ValueError(f"config field hidden_act={act!r} is not supported: the Mamba-2 conv activation is silu")
    eos = get("eos_token_id", [])
    common = dict(
        model_type=mt, vocab_size=int(d["vocab_size"]), hidden_size=D,
        tie_word_embeddings=bool(get("tie_word_embeddings", False)), bos_token_id=get("bos_token_id"),
        eos_token_ids=tuple(int(e) for e in (eos if isinstance(eos, list) else [eos])), pad_token_id=get("pad_token_id"),
        hf_json=json.dumps(d, sort_keys=True),
    )
    if mt == "mamba2":
      prefix, expand = "", float(get("expand", 2))
      sublayers = ("mamba",) * L
      mamba = dict(
          num_heads=int(get("num_heads", 128)), head_dim=int(get("head_dim", 64)), n_groups=int(get("n_groups", 8)),
          state_size=int(get("state_size", 128)), conv_width=int(get("conv_kernel", 4)),
          chunk_size=int(get("chunk_size", 256)), proj_bias=bool(get("use_bias", False)),
          conv_bias=bool(get("use_conv_bias", True)), norm_eps=float(get("layer_norm_epsilon", 1e-5)),
      )
      attn = None
    else:  # bamba
      prefix, expand = "mamba_", float(get("mamba_expand", 2))
      attn_layers = set(get("attn_layer_indices", []))
      sublayers = tuple(k for i in range(L) for k in ("attn" if i in attn_layers else "mamba", "mlp"))
      heads = int(get("mamba_n_heads", 128))
      head_dim = get("mamba_d_head", "auto")
      mamba = dict(
          num_heads=heads, head_dim=int(expand * D) // heads if head_dim == "auto" else int(head_dim),
          n_groups=int(get("mamba_n_groups", 1)), state_size=int(get("mamba_d_state", 256)),
          conv_width=int(get("mamba_d_conv", 4)), chunk_size=int(get("mamba_chunk_size", 256)),
          proj_bias=bool(get("mamba_proj_bias", False)), conv_bias=bool(get("mamba_conv_bias", True)),
          norm_eps=float(get("rms_norm_eps", 1e-5)),
      )
      attn = _bamba_attention(d, get)
      common["max_position_embeddings"] = attn.max_position_embeddings
    if mamba["num_heads"] * mamba["head_dim"] != int(expand * D):
      raise ValueError(
          f"config fields {prefix}num_heads * head_dim ({mamba['num_heads']} * {mamba['head_dim']}) must equal "
          f"{prefix}expand * hidden_size ({int(expand * D)})"
      )
    if mamba["num_heads"] % mamba["n_groups"]:
      raise ValueError(f"config field {prefix}n_groups={mamba['n_groups']} must divide the {mamba['num_heads']} SSM heads")
    lo, hi = (_float(v) for v in get("time_step_limit", (0.0, math.inf)))
    return cls(sublayers=sublayers, dt_min=lo, dt_max=hi, attn=attn, **mamba, **common)


def _float(v) -> float:
  """A float of config.json; transformers writes infinity as {"__float__": "Infinity"}."""
  return float(v["__float__"] if isinstance(v, dict) else v)


def _bamba_attention(d: dict, get) -> transformer.Config:
  """The attention / MLP sub-config of Bamba: Llama-style GQA with RoPE on half of each head."""
  N, D = int(d["num_attention_heads"]), int(d["hidden_size"])
  H = int(get("head_dim", D // N))
  rope = dict(get("rope_parameters", {}) or {})
  kind = rope.get("rope_type", get("rope_scaling", {}).get("rope_type", "default") if d.get("rope_scaling") else "default")
  if kind != "default":
    raise ValueError(f"config field rope_parameters.rope_type={kind!r} is not supported for bamba (supported: default)")
  theta = float(rope.get("rope_theta", get("rope_theta", 10000.0)))
  act = get("hidden_act", "silu")
  if act not in ACTIVATIONS:
    raise ValueError(f"config field hidden_act={act!r} is not supported (supported: {', '.join(ACTIVATIONS)})")
  attn_bias = bool(get("attention_bias", False))
  return transformer.Config(
      model_type="bamba", vocab_size=int(d["vocab_size"]), hidden_size=D, intermediate_size=int(d["intermediate_size"]),
      num_layers=0, num_heads=N, num_kv_heads=int(get("num_key_value_heads", N)), head_dim=H,
      max_position_embeddings=int(get("max_position_embeddings", 262144)), layer_types=(),
      ropes=(("full_attention", Rope(theta=theta)),), rms_norm_eps=float(get("rms_norm_eps", 1e-5)), act=act,
      qkv_bias=attn_bias, o_bias=attn_bias, mlp_bias=bool(get("mlp_bias", False)),
      rotary_dim=int(H * 0.5),  # transformers fixes Bamba's partial_rotary_factor at 0.5
  )


# ----------------------------------------------------------------------------- parameters


def _stacked(n: int, decls: dict) -> dict:
  return jax.tree.map(lambda p: Param((n, *p.shape), ("layers", *p.axes), p.init), decls, is_leaf=lambda x: isinstance(x, Param))


def _norm_decl(dim: int) -> dict:
  return {"scale": Param((dim,), ("norm",), "ones")}


def param_decls(c: Config) -> dict:
  D, V, N, I, E, W = c.hidden_size, c.vocab_size, c.num_heads, c.inner, c.conv_dim, c.conv_width
  Z = I + E + N
  mamba = {
      "norm": _norm_decl(D),
      "w_in_DZ": Param((D, Z), ("embed", "ssm_in")),
      "conv_w_WE": Param((W, E), ("conv_width", "ssm_conv")),
      "dt_bias_N": Param((N,), ("ssm_heads",), "zeros"),
      "A_log_N": Param((N,), ("ssm_heads",), "zeros"),
      "D_N": Param((N,), ("ssm_heads",), "ones"),
      "gate_norm": {"scale": Param((I,), ("ssm_inner",), "ones")},
      "w_out_ID": Param((I, D), ("ssm_inner", "embed")),
  }
  if c.conv_bias:
    mamba["conv_b_E"] = Param((E,), ("ssm_conv",), "zeros")
  if c.proj_bias:
    mamba |= {"b_in_Z": Param((Z,), ("ssm_in",), "zeros"), "b_out_D": Param((D,), ("embed",), "zeros")}
  decls = {"embed": {"table_VD": Param((V, D), ("vocab", "embed"))}, "final_norm": _norm_decl(D)}
  if c.count("mamba"):
    decls["mamba"] = _stacked(c.count("mamba"), mamba)
  if c.count("attn"):
    attn = transformer.param_decls(dataclasses.replace(c.attn, num_layers=c.count("attn")))["layers"]["attn"]
    decls["attn"] = attn | {"norm": _stacked(c.count("attn"), _norm_decl(D))}
  if c.count("mlp"):
    mlp = transformer.param_decls(dataclasses.replace(c.attn, num_layers=c.count("mlp")))["layers"]["mlp"]
    decls["mlp"] = mlp | {"norm": _stacked(c.count("mlp"), _norm_decl(D))}
  if not c.tie_word_embeddings:
    decls["lm_head"] = {"w_DV": Param((D, V), ("embed", "vocab"))}
  return decls


def init(config: Config, key: jax.Array, dtype=jnp.float32) -> dict:
  return init_params(param_decls(config), key, dtype)


# ----------------------------------------------------------------------------- cache


@struct.dataclass
class Cache:
  conv_LBWE: jax.Array | None  # the last W - 1 conv inputs of each mamba sublayer
  ssm_LBNPQ: jax.Array | None  # float32
  kv: transformer.KVCache | None  # attention sublayers

  @property
  def max_len(self) -> int:
    return self.kv.max_len if self.kv is not None else NO_POSITION_LIMIT


def init_cache(config: Config, batch: int, max_len: int, dtype) -> Cache:
  c, M = config, config.count("mamba")
  conv = jnp.zeros((M, batch, c.conv_width - 1, c.conv_dim), dtype) if M else None
  ssm = jnp.zeros((M, batch, c.num_heads, c.head_dim, c.state_size), jnp.float32) if M else None
  kv = None
  if c.count("attn"):
    kv = transformer.init_cache(dataclasses.replace(c.attn, num_layers=c.count("attn")), batch, max_len, dtype)
  return Cache(conv, ssm, kv)


# ----------------------------------------------------------------------------- forward


def _mamba(c: Config, p: dict, h_BTD, cache: Cache | None, layer, lengths_B):
  """The Mamba-2 mixer; with a cache, one step (T == 1) or a prefill that leaves each row's states."""
  Bsz, T, _ = h_BTD.shape
  N, P, G, Q, I, W = c.num_heads, c.head_dim, c.n_groups, c.state_size, c.inner, c.conv_width
  zxbcdt_BTZ = linear(h_BTD, p["w_in_DZ"], "BTD,DZ->BTZ", p.get("b_in_Z"))
  z_BTI, xbc_BTE, dt_BTN = jnp.split(zxbcdt_BTZ, [I, I + c.conv_dim], axis=-1)
  step = cache is not None and T == 1
  if step:
    y_BE, new_conv = conv_step(cache.conv_LBWE[layer], xbc_BTE[:, 0], p["conv_w_WE"], p.get("conv_b_E"))
    xbc_BTE = y_BE[:, None]
  else:
    before = cache.conv_LBWE[layer] if cache is not None else None
    if cache is not None:
      n_B = lengths_B if lengths_B is not None else jnp.full((Bsz,), T, jnp.int32)
      new_conv = conv_state(xbc_BTE, n_B, W, before)
    xbc_BTE = causal_conv(xbc_BTE, p["conv_w_WE"], p.get("conv_b_E"), before)
  xbc_BTE = jax.nn.silu(xbc_BTE)
  x_BTI, b_BTG, c_BTG = jnp.split(xbc_BTE, [I, I + G * Q], axis=-1)
  x_BTNP = x_BTI.reshape(Bsz, T, N, P)
  b_BTGQ, c_BTGQ = b_BTG.reshape(Bsz, T, G, Q), c_BTG.reshape(Bsz, T, G, Q)
  dt_BTN = jax.nn.softplus(dt_BTN.astype(jnp.float32) + p["dt_bias_N"].astype(jnp.float32))
  dt_BTN = jnp.clip(dt_BTN, c.dt_min, c.dt_max)
  if lengths_B is not None and not step:  # padding: dt = 0 leaves the state as it is
    dt_BTN = jnp.where(jnp.arange(T)[None, :, None] < lengths_B[:, None, None], dt_BTN, 0.0)
  A_N = -jnp.exp(p["A_log_N"].astype(jnp.float32))
  if step:
    y_BNP, state = ssd_step(cache.ssm_LBNPQ[layer], x_BTNP[:, 0], dt_BTN[:, 0], A_N, b_BTGQ[:, 0], c_BTGQ[:, 0])
    y_BTNP = y_BNP[:, None]
  else:
    init = cache.ssm_LBNPQ[layer] if cache is not None else None
    y_BTNP, state = ssd(x_BTNP, dt_BTN, A_N, b_BTGQ, c_BTGQ, chunk=c.chunk_size, state_BNPQ=init)
  y_BTNP = y_BTNP + p["D_N"].astype(jnp.float32)[:, None] * x_BTNP.astype(jnp.float32)
  # Gated RMSNorm: gate first, then normalise each of the G groups of I / G channels.
  v_BTI = y_BTNP.reshape(Bsz, T, I) * jax.nn.silu(z_BTI.astype(jnp.float32))
  v_BTGI = v_BTI.reshape(Bsz, T, G, I // G)
  v_BTGI = v_BTGI * jax.lax.rsqrt(jnp.mean(v_BTGI * v_BTGI, axis=-1, keepdims=True) + c.norm_eps)
  v_BTI = v_BTGI.reshape(Bsz, T, I) * p["gate_norm"]["scale"].astype(jnp.float32)
  out_BTD = linear(v_BTI.astype(h_BTD.dtype), p["w_out_ID"], "BTI,ID->BTD", p.get("b_out_D"))
  if cache is not None:
    cache = cache.replace(
        conv_LBWE=cache.conv_LBWE.at[layer].set(new_conv.astype(cache.conv_LBWE.dtype)),
        ssm_LBNPQ=cache.ssm_LBNPQ.at[layer].set(state),
    )
  return out_BTD, cache


def _block(kinds: tuple[str, ...]) -> tuple[tuple[str, ...], int]:
  """The shortest block that the sequence of kinds repeats, and how many times."""
  n = len(kinds)
  for p in range(1, n + 1):
    if n % p == 0 and kinds == kinds[:p] * (n // p):
      return kinds[:p], n // p
  return kinds, 1


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
  c = config
  B, T = tokens_BT.shape
  pos_BT = jnp.broadcast_to(jnp.arange(T, dtype=jnp.int32), (B, T)) if positions is None else positions
  table_VD = params["embed"]["table_VD"]
  x_BTD = jnp.take(table_VD, tokens_BT, axis=0)
  block, reps = _block(c.sublayers)
  per_block = {k: block.count(k) for k in KINDS}
  if c.count("attn"):
    inv_freq_H = jnp.asarray(dict(c.attn.ropes)["full_attention"].inv_freq(c.attn.rope_dim))
  # Each kind's stack [n, ...] -> [reps, n / reps, ...]: the scan walks the blocks.
  xs = {k: jax.tree.map(lambda a: a.reshape(reps, per_block[k], *a.shape[1:]), params[k]) for k in KINDS if per_block[k]}

  def body(carry, xs_rep):
    x_BTD, cache = carry
    p_block, rep = xs_rep
    seen = dict.fromkeys(KINDS, 0)
    for kind in block:
      j = seen[kind]
      seen[kind] += 1
      p = jax.tree.map(lambda a: a[j], p_block[kind])  # noqa: B023
      layer = rep * per_block[kind] + j
      h_BTD = rms_norm(x_BTD, p["norm"]["scale"], c.norm_eps)
      if kind == "mamba":
        out_BTD, cache = _mamba(c, p, h_BTD, cache, layer, lengths)
      elif kind == "attn":
        kv = cache.kv if cache is not None else None
        out_BTD, kv = transformer._attention_block(c.attn, p, h_BTD, pos_BT, 0, inv_freq_H, 1.0, kv, layer)
        cache = cache.replace(kv=kv) if cache is not None else None
      else:
        out_BTD = gated_mlp(h_BTD, p["w_gate_DF"], p["w_up_DF"], p["w_down_FD"], c.attn.act, p.get("b_gate_F"),
                            p.get("b_up_F"), p.get("b_down_D"))
      x_BTD = x_BTD + out_BTD
    return (x_BTD, cache), None

  (x_BTD, cache), _ = jax.lax.scan(body, (x_BTD, cache), (xs, jnp.arange(reps)))
  if logits_at is not None:
    x_BTD = jnp.take_along_axis(x_BTD, logits_at[:, None, None], axis=1)
  x_BTD = rms_norm(x_BTD, params["final_norm"]["scale"], c.norm_eps)
  head_DV = table_VD.T if c.tie_word_embeddings else params["lm_head"]["w_DV"]
  return jnp.einsum("BTD,DV->BTV", x_BTD, head_DV, preferred_element_type=jnp.float32), cache
