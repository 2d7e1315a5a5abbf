"""Dense decoder-only transformers: Llama 1/2/3, Mistral, Qwen2/2.5, Qwen3, Gemma 2, Gemma 3 (text),
OLMo 2 and Olmo 3, as one config-driven family.

Dimensions: B batch, T query length, S cache length, D model width, F MLP width, V vocab,
N query heads, K kv heads, H head dim, L layers.

What differs between the variants is data in `Config`: which norms exist (pre, post or both),
the norm scale offset (Gemma stores w - 1), QKV / output / MLP biases, Q/K norm per head (Qwen3,
Gemma 3) or over the whole projection (OLMo 2/3), the attention kind of each layer (full or sliding
window) with its own RoPE schedule, soft-capping, embedding scaling and the MLP activation.
Layers are stacked on a leading L axis and run with `lax.scan`; the per-layer attention window
and RoPE frequencies ride along as scanned constants.
"""

import dataclasses
import json
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import struct

from xlazoo.models.params import Param, init_params, layer_params
from xlazoo.ops.attention import attention, causal_attention, decode_attention
from xlazoo.ops.mlp import ACTIVATIONS, PreNorm, gated_mlp, linear, linears
from xlazoo.ops.norms import rms_norm
from xlazoo.ops.rope import ROPE_TYPES, Rope, apply_rope

LAYER_TYPES = ("full_attention", "sliding_attention")

# Per model_type: the transformers defaults of fields that a config.json may leave out, and the
# architectural traits that the model_type fixes.
_FAMILIES: dict[str, dict[str, Any]] = {
    "llama": dict(rms_norm_eps=1e-6, tie_word_embeddings=False, max_position_embeddings=2048),
    "mistral": dict(rms_norm_eps=1e-6, tie_word_embeddings=False, max_position_embeddings=131072, sliding_window=4096),
    "qwen2": dict(rms_norm_eps=1e-6, tie_word_embeddings=False, max_position_embeddings=32768, qkv_bias=True),
    "qwen3": dict(rms_norm_eps=1e-6, tie_word_embeddings=False, max_position_embeddings=32768, qk_norm="head", head_dim=128),
    "gemma2": dict(
        rms_norm_eps=1e-6, tie_word_embeddings=True, max_position_embeddings=8192, head_dim=256, gemma=True,
        attn_logit_softcapping=50.0, final_logit_softcapping=30.0, sliding_window=4096, sliding_pattern=2,
    ),
    "gemma3_text": dict(
        rms_norm_eps=1e-6, tie_word_embeddings=True, max_position_embeddings=131072, head_dim=256, gemma=True,
        qk_norm="head", sliding_window=4096, sliding_pattern=6, local_theta=10000.0, rope_theta=1e6,
    ),
    "olmo2": dict(rms_norm_eps=1e-5, tie_word_embeddings=False, max_position_embeddings=2048, qk_norm="full", post_only=True),
    "olmo3": dict(
        rms_norm_eps=1e-5, tie_word_embeddings=False, max_position_embeddings=2048, qk_norm="full", post_only=True,
        sliding_window=4096, sliding_pattern=4, rope_theta=500000.0,
    ),
}
MODEL_TYPES = tuple(_FAMILIES)


@dataclasses.dataclass(frozen=True)
class Config:
  model_type: str
  vocab_size: int
  hidden_size: int  # D
  intermediate_size: int  # F
  num_layers: int  # L
  num_heads: int  # N
  num_kv_heads: int  # K
  head_dim: int  # H
  max_position_embeddings: int
  layer_types: tuple[str, ...]
  ropes: tuple[tuple[str, Rope], ...]  # (layer type, its RoPE schedule)
  sliding_window: int | None = None
  rms_norm_eps: float = 1e-6
  act: str = "silu"
  qkv_bias: bool = False
  o_bias: bool = False
  mlp_bias: bool = False
  qk_norm: str | None = None  # "head": RMSNorm over H per head; "full": over the whole N*H projection
  pre_norms: bool = True  # norm before attention / MLP
  post_norms: bool = False  # norm of the attention / MLP output before the residual add
  norm_offset: float = 0.0  # Gemma: scale = 1 + w
  embed_scale: bool = False  # Gemma: embeddings * sqrt(D)
  query_scale: float = 0.0  # attention logit scale; 0 means H ** -0.5
  attn_softcap: float | None = None
  final_softcap: float | None = None
  tie_word_embeddings: bool = False
  rotary_dim: int | None = None  # RoPE on the first rotary_dim dims of each head; None = all, 0 = no RoPE
  bos_token_id: int | None = None
  eos_token_ids: tuple[int, ...] = ()
  pad_token_id: int | None = None
  # The config.json this came from, kept for export; not part of equality or hashing.
  hf_json: str = dataclasses.field(default="{}", compare=False, repr=False)

  @property
  def hf(self) -> dict:
    return json.loads(self.hf_json)

  @property
  def attn_scale(self) -> float:
    return self.query_scale or self.head_dim**-0.5

  @property
  def rope_dim(self) -> int:
    return self.head_dim if self.rotary_dim is None else self.rotary_dim

  @classmethod
  def from_hf(cls, d: dict) -> "Config":
    """Reads a Hugging Face config.json dict (transformers 4.x or 5.x layout)."""
    mt = d.get("model_type")
    if mt not in _FAMILIES:
      raise ValueError(f"model_type {mt!r} is not a dense transformer family here (supported: {', '.join(MODEL_TYPES)})")
    fam = _FAMILIES[mt]

    def get(key, default=None):  # for fields where null means "the default"
      v = d.get(key)
      return default if v is None else v

    _reject(d, "quantization_config", None, "quantised checkpoints are not supported; use unquantised weights")
    _reject(d, "use_bidirectional_attention", (None, False), "only causal attention is implemented")
    _reject(d, "partial_rotary_factor", (None, 1, 1.0), "only full-width RoPE is implemented")
    gemma = fam.get("gemma", False)
    act_field = "hidden_activation" if gemma else "hidden_act"  # Gemma reads hidden_activation only
    act = get(act_field, "gelu_pytorch_tanh" if gemma else "silu")
    if act not in ACTIVATIONS:
      raise ValueError(f"config field {act_field}={act!r} is not supported (supported: {', '.join(ACTIVATIONS)})")
    N = int(d["num_attention_heads"])
    L = int(d["num_hidden_layers"])
    D = int(d["hidden_size"])
    max_pos = int(get("max_position_embeddings", fam["max_position_embeddings"]))
    layer_types, window = _layer_types(d, fam, L)
    attn_bias = bool(get("attention_bias", False))
    eos = get("eos_token_id", [])
    return cls(
        model_type=mt,
        vocab_size=int(d["vocab_size"]),
        hidden_size=D,
        intermediate_size=int(d["intermediate_size"]),
        num_layers=L,
        num_heads=N,
        num_kv_heads=int(get("num_key_value_heads", N)),
        head_dim=int(get("head_dim", fam.get("head_dim", D // N))),
        max_position_embeddings=max_pos,
        layer_types=layer_types,
        ropes=_ropes(d, fam, layer_types, max_pos),
        sliding_window=window,
        rms_norm_eps=float(get("rms_norm_eps", fam["rms_norm_eps"])),
        act=act,
        qkv_bias=fam.get("qkv_bias", False) or attn_bias,
        o_bias=attn_bias,
        mlp_bias=bool(get("mlp_bias", False)),
        qk_norm=fam.get("qk_norm"),
        pre_norms=not fam.get("post_only", False),
        post_norms=gemma or fam.get("post_only", False),
        norm_offset=1.0 if gemma else 0.0,
        embed_scale=gemma,
        query_scale=float(get("query_pre_attn_scalar", 256)) ** -0.5 if gemma else 0.0,
        # Gemma 3 configs carry attn_logit_softcapping but the reference model never applies it.
        attn_softcap=d.get("attn_logit_softcapping", fam.get("attn_logit_softcapping")) if mt == "gemma2" else None,
        final_softcap=d.get("final_logit_softcapping", fam.get("final_logit_softcapping")) if gemma else None,
        tie_word_embeddings=bool(get("tie_word_embeddings", fam["tie_word_embeddings"])),
        bos_token_id=get("bos_token_id"),
        eos_token_ids=tuple(int(e) for e in (eos if isinstance(eos, list) else [eos])),
        pad_token_id=get("pad_token_id"),
        hf_json=json.dumps(d, sort_keys=True),
    )


def _reject(d: dict, key: str, allowed, why: str):
  v = d.get(key)
  ok = v is None if allowed is None else v in allowed
  if not ok:
    raise ValueError(f"config field {key}={v!r} is not supported: {why}")


def _layer_types(d: dict, fam: dict, L: int) -> tuple[tuple[str, ...], int | None]:
  """Each layer's attention kind, and the sliding window (None if no layer slides)."""
  window = d.get("sliding_window", fam.get("sliding_window"))
  if d.get("model_type") in ("qwen2", "qwen3") and not d.get("use_sliding_window", False):
    window = None  # Qwen keeps sliding_window in its config but uses it only with use_sliding_window
  types = d.get("layer_types")
  if types is None:
    if window is None:
      types = ["full_attention"] * L
    elif "sliding_pattern" in fam:
      p = int(d.get("sliding_window_pattern", d.get("_sliding_window_pattern", fam["sliding_pattern"])))
      types = ["sliding_attention" if (i + 1) % p else "full_attention" for i in range(L)]
    elif d.get("model_type") in ("qwen2", "qwen3"):
      m = int(d.get("max_window_layers", 28))
      types = ["sliding_attention" if i >= m else "full_attention" for i in range(L)]
    else:  # Mistral: every layer slides
      types = ["sliding_attention"] * L
  if len(types) != L:
    raise ValueError(f"config field layer_types has {len(types)} entries but num_hidden_layers is {L}")
  bad = sorted(set(types) - set(LAYER_TYPES))
  if bad:
    raise ValueError(f"config field layer_types contains {bad}, not supported (supported: {LAYER_TYPES})")
  if "sliding_attention" in types and window is None:
    raise ValueError("config field layer_types has sliding_attention layers but sliding_window is null")
  return tuple(types), (int(window) if "sliding_attention" in types else None)


def _ropes(d: dict, fam: dict, layer_types, max_pos: int) -> tuple[tuple[str, Rope], ...]:
  params = d.get("rope_parameters")
  theta = d.get("rope_theta", fam.get("rope_theta", 10000.0))
  if params and set(params) <= set(LAYER_TYPES):  # 5.x, one dict per layer type
    per_type = {t: dict(params.get(t) or {}) for t in LAYER_TYPES}
    per_type["sliding_attention"].setdefault("rope_theta", fam.get("local_theta", theta))
    per_type["full_attention"].setdefault("rope_theta", theta)
  elif "local_theta" in fam or d.get("model_type") == "olmo3":
    # 4.x Gemma 3 / Olmo 3: rope_scaling applies to the global (full attention) layers only.
    scaling = dict(d.get("rope_scaling") or params or {})
    scaling.setdefault("rope_theta", theta)
    local = {"rope_theta": d.get("rope_local_base_freq", fam.get("local_theta", scaling["rope_theta"]))}
    per_type = {"full_attention": scaling, "sliding_attention": local}
  else:
    one = dict(d.get("rope_scaling") or params or {})  # transformers lets rope_scaling win
    one.setdefault("rope_theta", theta)
    per_type = {t: one for t in LAYER_TYPES}
  truncate = (d.get("rope_scaling") or params or {}).get("truncate", True)
  return tuple((t, _rope(per_type[t], max_pos, truncate)) for t in LAYER_TYPES if t in layer_types)


def _rope(p: dict, max_pos: int, truncate: bool) -> Rope:
  kind = p.get("rope_type", p.get("type", "default"))
  if kind not in ROPE_TYPES:
    raise ValueError(f"config field rope_type={kind!r} is not supported (supported: {', '.join(ROPE_TYPES)})")
  for key, allowed in (("mscale", (None,)), ("mscale_all_dim", (None,)), ("partial_rotary_factor", (None, 1, 1.0))):
    if p.get(key) not in allowed:
      raise ValueError(f"config field rope_parameters.{key}={p[key]!r} is not supported")
  original = int(p.get("original_max_position_embeddings") or max_pos)
  factor = p.get("factor")
  if factor is None:
    factor = max_pos / original if kind == "yarn" else 1.0
  return Rope(
      theta=float(p["rope_theta"]),
      rope_type=kind,
      factor=float(factor),
      low_freq_factor=float(p.get("low_freq_factor", 1.0)),
      high_freq_factor=float(p.get("high_freq_factor", 4.0)),
      original_max_position_embeddings=original,
      attention_factor=p.get("attention_factor"),
      beta_fast=float(p.get("beta_fast") or 32.0),
      beta_slow=float(p.get("beta_slow") or 1.0),
      truncate=bool(truncate),
  )


def param_decls(c: Config) -> dict:
  """The parameter tree: shapes, logical axes and initialisers. Layer leaves carry a leading L."""
  L, D, F, V, N, K, H = c.num_layers, c.hidden_size, c.intermediate_size, c.vocab_size, c.num_heads, c.num_kv_heads, c.head_dim
  norm_init = "zeros" if c.norm_offset else "ones"

  def stacked(shape, axes, init="normal"):
    return Param((L, *shape), ("layers", *axes), init)

  def norm(dim, axis="norm"):
    return {"scale": stacked((dim,), (axis,), norm_init)}

  attn = {
      "wq_DNH": stacked((D, N, H), ("embed", "heads", "head_dim")),
      "wk_DKH": stacked((D, K, H), ("embed", "kv_heads", "head_dim")),
      "wv_DKH": stacked((D, K, H), ("embed", "kv_heads", "head_dim")),
      "wo_NHD": stacked((N, H, D), ("heads", "head_dim", "embed")),
  }
  if c.qkv_bias:
    attn |= {
        "bq_NH": stacked((N, H), ("heads", "head_dim"), "zeros"),
        "bk_KH": stacked((K, H), ("kv_heads", "head_dim"), "zeros"),
        "bv_KH": stacked((K, H), ("kv_heads", "head_dim"), "zeros"),
    }
  if c.o_bias:
    attn["bo_D"] = stacked((D,), ("embed",), "zeros")
  if c.qk_norm == "head":
    attn |= {"q_norm": norm(H), "k_norm": norm(H)}
  elif c.qk_norm == "full":
    attn |= {"q_norm": norm(N * H), "k_norm": norm(K * H)}
  mlp = {
      "w_gate_DF": stacked((D, F), ("embed", "mlp")),
      "w_up_DF": stacked((D, F), ("embed", "mlp")),
      "w_down_FD": stacked((F, D), ("mlp", "embed")),
  }
  if c.mlp_bias:
    mlp |= {
        "b_gate_F": stacked((F,), ("mlp",), "zeros"),
        "b_up_F": stacked((F,), ("mlp",), "zeros"),
        "b_down_D": stacked((D,), ("embed",), "zeros"),
    }
  layers = {"attn": attn, "mlp": mlp}
  if c.pre_norms:
    layers |= {"attn_norm": norm(D), "mlp_norm": norm(D)}
  if c.post_norms:
    layers |= {"attn_post_norm": norm(D), "mlp_post_norm": norm(D)}
  decls = {
      "embed": {"table_VD": Param((V, D), ("vocab", "embed"))},
      "layers": layers,
      "final_norm": {"scale": Param((D,), ("norm",), norm_init)},
  }
  if not c.tie_word_embeddings:
    decls["lm_head"] = {"w_DV": Param((D, V), ("embed", "vocab"))}
  return decls


def init(config: Config, key: jax.Array, dtype=jnp.float32) -> dict:
  return init_params(param_decls(config), key, dtype)


@struct.dataclass
class KVCache:
  """Keys and values of every layer at every cache slot; slot s holds the token at position s."""

  k_LBSKH: jax.Array
  v_LBSKH: jax.Array

  @property
  def max_len(self) -> int:
    return self.k_LBSKH.shape[2]


def init_cache(config: Config, batch: int, max_len: int, dtype) -> KVCache:
  shape = (config.num_layers, batch, max_len, config.num_kv_heads, config.head_dim)
  return KVCache(jnp.zeros(shape, dtype), jnp.zeros(shape, dtype))


def _layer_constants(c: Config):
  """Per-layer window (0 = none), RoPE inverse frequencies [L, H/2] and cos/sin scale [L]."""
  ropes = dict(c.ropes)
  window = np.array([c.sliding_window if t == "sliding_attention" else 0 for t in c.layer_types], np.int32)
  inv_freq = np.stack([ropes[t].inv_freq(c.rope_dim) for t in c.layer_types])
  scale = np.array([ropes[t].scale() for t in c.layer_types], np.float32)
  return window, inv_freq, scale


def _norm(c: Config, x, p):
  return rms_norm(x, p["scale"], c.rms_norm_eps, c.norm_offset)


def _attention_block(c: Config, p, x_BTD, pos_BT, window, inv_freq_H, rope_scale, cache, layer, qkv_delta=None,
                     kv_len_B=None, norm: PreNorm | None = None):
  """pos_BT: the tokens' positions, or None for 0..T-1 (a forward or prefill from the start).
  qkv_delta: optional (q [B,T,N,H], k, v [B,T,K,H]) added to the projections (Zamba2's adapters).
  kv_len_B: a decode step's pos_BT[:, 0] + 1, computed once outside the layer scan (XLA leaves it in the
  loop, a kernel launch in every layer).
  norm: the norm of x that feeds q, k and v, if not applied already."""
  B, T, _ = x_BTD.shape
  fresh = pos_BT is None
  if fresh:
    pos_BT = jnp.broadcast_to(jnp.arange(T, dtype=jnp.int32), (B, T))
  N, K, H = c.num_heads, c.num_kv_heads, c.head_dim
  q_BTNH, k_BTKH, v_BTKH = linears(
      x_BTD, [p["wq_DNH"], p["wk_DKH"], p["wv_DKH"]], ["BTD,DNH->BTNH", "BTD,DKH->BTKH", "BTD,DKH->BTKH"],
      [p.get("bq_NH"), p.get("bk_KH"), p.get("bv_KH")], norm,
  )
  if qkv_delta is not None:
    q_BTNH, k_BTKH, v_BTKH = (a + d.astype(a.dtype) for a, d in zip((q_BTNH, k_BTKH, v_BTKH), qkv_delta))
  if c.qk_norm == "head":
    q_BTNH, k_BTKH = _norm(c, q_BTNH, p["q_norm"]), _norm(c, k_BTKH, p["k_norm"])
  elif c.qk_norm == "full":
    q_BTNH = _norm(c, q_BTNH.reshape(B, T, N * H), p["q_norm"]).reshape(B, T, N, H)
    k_BTKH = _norm(c, k_BTKH.reshape(B, T, K * H), p["k_norm"]).reshape(B, T, K, H)
  if c.rope_dim == H:
    q_BTNH = apply_rope(q_BTNH, pos_BT, inv_freq_H, rope_scale)
    k_BTKH = apply_rope(k_BTKH, pos_BT, inv_freq_H, rope_scale)
  elif c.rope_dim:  # partial rotary: the other dims pass through
    r = c.rope_dim
    q_BTNH = jnp.concatenate([apply_rope(q_BTNH[..., :r], pos_BT, inv_freq_H, rope_scale), q_BTNH[..., r:]], -1)
    k_BTKH = jnp.concatenate([apply_rope(k_BTKH[..., :r], pos_BT, inv_freq_H, rope_scale), k_BTKH[..., r:]], -1)
  if cache is not None and B == T == 1:
    # One slot: an update in place. A one-row scatter costs XLA a second kernel that reads the slot back
    # first, to drop an update out of range (positions must be < max_len: see forward).
    at = (layer, 0, pos_BT[0, 0], 0, 0)
    cache = KVCache(*(jax.lax.dynamic_update_slice(buf, new[None].astype(buf.dtype), at)
                      for buf, new in ((cache.k_LBSKH, k_BTKH), (cache.v_LBSKH, v_BTKH))))
  elif cache is not None:  # write this layer's new entries in place (a scatter into the carried cache)
    b_B1 = jnp.arange(B)[:, None]
    cache = KVCache(
        cache.k_LBSKH.at[layer, b_B1, pos_BT].set(k_BTKH.astype(cache.k_LBSKH.dtype), mode="drop"),
        cache.v_LBSKH.at[layer, b_B1, pos_BT].set(v_BTKH.astype(cache.v_LBSKH.dtype), mode="drop"),
    )
  kw = dict(scale=c.attn_scale, window=window, softcap=c.attn_softcap)
  if fresh:  # tokens at 0..T-1: the cache holds nothing else they can see
    o_BTNH = causal_attention(q_BTNH, k_BTKH, v_BTKH, **kw)
  elif cache is None:
    o_BTNH = attention(q_BTNH, k_BTKH, v_BTKH, pos_BT, pos_BT, **kw)
  elif T == 1:  # a decode step: each row reads its cache up to its own position
    kv_len_B = pos_BT[:, 0] + 1 if kv_len_B is None else kv_len_B
    o_BTNH = decode_attention(q_BTNH[:, 0], cache.k_LBSKH, cache.v_LBSKH, kv_len_B, layer=layer, **kw)[:, None]
  else:
    k_pos_BS = jnp.broadcast_to(jnp.arange(cache.max_len), (B, cache.max_len))
    o_BTNH = attention(q_BTNH, cache.k_LBSKH[layer], cache.v_LBSKH[layer], pos_BT, k_pos_BS, **kw)
  return linear(o_BTNH, p["wo_NHD"], "BTNH,NHD->BTD", p.get("bo_D")), cache


def forward(
    config: Config,
    params: dict,
    tokens_BT: jax.Array,
    *,
    cache: KVCache | None = None,
    positions: jax.Array | None = None,
    logits_at: jax.Array | None = None,
    lengths: jax.Array | None = None,
) -> tuple[jax.Array, KVCache | None]:
  """Logits [B, T, V] (float32) for `tokens` [B, T] int32, and the updated cache.

  positions: [B, T] absolute positions (default 0..T-1). With a cache, token t of row b is written
  to slot positions[b, t] (which must be < the cache's max_len) and attends to the slots at positions
  <= its own.
  logits_at: optional [B] index into T; then only those positions' logits are computed ([B, 1, V]).
  lengths: [B] real tokens per right-padded row. Attention needs nothing from it (a row's padding
  sits at later positions, which its causal mask hides); it is there for the recurrent families.
  """
  c = config
  table_VD = params["embed"]["table_VD"]
  x_BTD = jnp.take(table_VD, tokens_BT, axis=0)
  if c.embed_scale:
    x_BTD = x_BTD * jnp.asarray(c.hidden_size**0.5, x_BTD.dtype)  # rounded to the dtype, as the reference does
  window_L, inv_freq_LH, scale_L = _layer_constants(c)
  same_window = int(window_L[0]) if np.all(window_L == window_L[0]) else None  # static: kernels can specialise

  # A decode step reads the weights from their stacks in place (see LayerWeight); elsewhere the scan slices them.
  decode = cache is not None and tokens_BT.shape[1] == 1
  kv_len_B = positions[:, 0] + 1 if decode and positions is not None else None

  def body(carry, xs):
    x_BTD, cache = carry
    p, window, inv_freq_H, rope_scale, layer = xs
    if decode:
      p = layer_params(params["layers"], layer, in_place=True)
    window = window if same_window is None else same_window

    def pre_norm(name):  # handed with x to the projections, which apply it (a decode step's GEMV kernel does)
      return PreNorm(p[name]["scale"], c.rms_norm_eps, c.norm_offset) if c.pre_norms else None

    a_BTD, cache = _attention_block(c, p["attn"], x_BTD, positions, window, inv_freq_H, rope_scale, cache, layer,
                                    kv_len_B=kv_len_B, norm=pre_norm("attn_norm"))
    if c.post_norms:
      a_BTD = _norm(c, a_BTD, p["attn_post_norm"])
    x_BTD = x_BTD + a_BTD
    m = p["mlp"]
    m_BTD = gated_mlp(x_BTD, m["w_gate_DF"], m["w_up_DF"], m["w_down_FD"], c.act, m.get("b_gate_F"), m.get("b_up_F"),
                      m.get("b_down_D"), norm=pre_norm("mlp_norm"))
    if c.post_norms:
      m_BTD = _norm(c, m_BTD, p["mlp_post_norm"])
    return (x_BTD + m_BTD, cache), None

  xs = (None if decode else params["layers"], window_L, inv_freq_LH, scale_L, jnp.arange(c.num_layers))
  # A decode step runs two layers per loop iteration: each iteration boundary leaves the GPU idle a few
  # microseconds (H100, Llama-3-8B: 6.35 -> 6.33 ms a step). Not in the hybrid family's scan, where it
  # makes XLA copy the recurrent states.
  (x_BTD, cache), _ = jax.lax.scan(body, (x_BTD, cache), xs, unroll=2 if decode else 1)
  if logits_at is not None:
    x_BTD = jnp.take_along_axis(x_BTD, logits_at[:, None, None], axis=1)
  x_BTD = _norm(c, x_BTD, params["final_norm"])
  if c.tie_word_embeddings:
    logits_BTV = jnp.einsum("BTD,VD->BTV", x_BTD, table_VD, preferred_element_type=jnp.float32)
  else:
    logits_BTV = jnp.einsum("BTD,DV->BTV", x_BTD, params["lm_head"]["w_DV"], preferred_element_type=jnp.float32)
  if c.final_softcap is not None:
    logits_BTV = jnp.tanh(logits_BTV / c.final_softcap) * c.final_softcap
  return logits_BTV, cache
