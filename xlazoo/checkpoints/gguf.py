"""GGUF files (llama.cpp's format): the model config from the metadata, the weights dequantised by
the `gguf` package, and the tokenizer rebuilt from the metadata.

GGUF names map to Hugging Face names by a table, so loading goes through the same checks and
copies as a Hugging Face checkpoint (hf.fill). llama.cpp stores the Q and K projections of
llama-architecture models with their rows reordered for its interleaved rotary layout; that is
undone here. Shapes are checked from the header before any tensor is dequantised.
"""

import functools
import json
import re
from pathlib import Path

import numpy as np

from xlazoo.ops.rope import Rope

# GGUF architecture -> HF model_type. llama.cpp writes Mistral models as "llama".
ARCHITECTURES = {"llama": "llama", "mistral": "mistral", "qwen2": "qwen2", "qwen3": "qwen3"}
# Architectures whose Q/K rows llama.cpp permutes (its "normal" rope; qwen2/qwen3 use the "neox" one).
PERMUTED = ("llama", "mistral")
TENSOR_TYPES = ("F32", "F16", "BF16", "Q8_0", "Q4_0", "Q4_1", "Q5_0", "Q5_1", "Q2_K", "Q3_K", "Q4_K", "Q5_K", "Q6_K")

_LAYER = "model.layers.{i}"
NAMES = (  # GGUF name -> HF name ({i}: layer index)
    ("token_embd.weight", "model.embed_tokens.weight"),
    ("output_norm.weight", "model.norm.weight"),
    ("output.weight", "lm_head.weight"),
    ("blk.{i}.attn_norm.weight", f"{_LAYER}.input_layernorm.weight"),
    ("blk.{i}.ffn_norm.weight", f"{_LAYER}.post_attention_layernorm.weight"),
    *((f"blk.{{i}}.attn_{g}.{w}", f"{_LAYER}.self_attn.{h}_proj.{w}") for g, h in
      (("q", "q"), ("k", "k"), ("v", "v"), ("output", "o")) for w in ("weight", "bias")),
    ("blk.{i}.attn_q_norm.weight", f"{_LAYER}.self_attn.q_norm.weight"),
    ("blk.{i}.attn_k_norm.weight", f"{_LAYER}.self_attn.k_norm.weight"),
    *((f"blk.{{i}}.ffn_{p}.weight", f"{_LAYER}.mlp.{p}_proj.weight") for p in ("gate", "up", "down")),
)
_PATTERNS = [(re.compile(re.escape(g).replace(r"\{i\}", r"(\d+)") + "$"), h) for g, h in NAMES]
ROPE_FREQS = "rope_freqs.weight"  # llama.cpp's per-frequency RoPE divisors (Llama 3.1 and later)

# Pre-tokenizer splits of byte-level BPE vocabularies, by `tokenizer.ggml.pre` (as each model's
# tokenizer.json has them).
_LLAMA3_SPLIT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
_QWEN2_SPLIT = _LLAMA3_SPLIT.replace(r"\p{N}{1,3}", r"\p{N}")
PRE_TOKENIZERS = {
    "default": "gpt2", "gpt2": "gpt2", "gpt-2": "gpt2", "smollm": "smollm",
    "llama3": "llama3", "llama-v3": "llama3", "llama-bpe": "llama3", "smaug-bpe": "llama3", "falcon3": "llama3",
    "qwen2": "qwen2", "deepseek-r1-qwen": "qwen2",
}


def find(path: Path) -> Path | None:
  """The GGUF file `path` names: the file itself, or the one .gguf in a directory without config.json."""
  if path.is_file():
    return path if path.suffix.lower() == ".gguf" else None
  if not path.is_dir() or (path / "config.json").exists() or (path / "xlazoo.json").exists():
    return None
  found = sorted(path.glob("*.gguf"))
  if len(found) > 1:
    raise ValueError(f"{path} holds {len(found)} GGUF files ({', '.join(f.name for f in found)}); pass the file itself")
  return found[0] if found else None


@functools.lru_cache(maxsize=2)
def _reader(path: Path, stamp: tuple):
  import gguf

  try:
    r = gguf.GGUFReader(path)
  except Exception as e:  # the reader raises bare ValueErrors / IndexErrors on bad bytes
    raise ValueError(f"{path} is not a readable GGUF file (corrupt or truncated?): {e}") from e
  size = path.stat().st_size
  for t in r.tensors:
    if t.data_offset + t.n_bytes > size:
      raise ValueError(f"{path} is truncated: tensor {t.name} ends past the end of the file")
  return r


def reader(path: Path):
  path = Path(path).absolute()
  st = path.stat()
  return _reader(path, (st.st_size, st.st_mtime_ns))


def metadata(r) -> dict:
  """Scalar and small-array metadata as Python values (the token lists are read by `tokenizer`)."""
  skip = ("tokenizer.ggml.tokens", "tokenizer.ggml.merges", "tokenizer.ggml.token_type", "tokenizer.ggml.scores")
  return {k: f.contents() for k, f in r.fields.items() if k not in skip and not k.startswith("GGUF.")}


# ----------------------------------------------------------------------------- config


def hf_config(r, label: str) -> dict:
  """The Hugging Face config.json dict that the file's metadata describes."""
  meta = metadata(r)
  arch = meta.get("general.architecture")
  if arch not in ARCHITECTURES:
    raise ValueError(
        f"{label}: GGUF architecture {arch!r} is not supported; xlazoo reads {', '.join(ARCHITECTURES)} GGUF files"
    )

  def get(key, default=KeyError):
    v = meta.get(f"{arch}.{key}", default)
    if v is KeyError:
      raise ValueError(f"{label}: GGUF metadata lacks {arch}.{key}")
    return v

  if get("expert_count", 0):
    raise ValueError(f"{label}: mixture-of-experts GGUF files ({arch}.expert_count > 0) are not supported yet")
  heads = get("attention.head_count")
  kv_heads = get("attention.head_count_kv", heads)
  for name, v in (("head_count", heads), ("head_count_kv", kv_heads)):
    if isinstance(v, list) and len(set(v)) != 1:
      raise ValueError(f"{label}: per-layer {arch}.attention.{name} {v} is not supported (all layers must match)")
  heads, kv_heads = (v[0] if isinstance(v, list) else v for v in (heads, kv_heads))
  hidden = get("embedding_length")
  head_dim = get("attention.key_length", hidden // heads)
  if get("attention.value_length", head_dim) != head_dim:
    raise ValueError(f"{label}: {arch}.attention.value_length differs from key_length, which is not supported")
  if get("rope.dimension_count", head_dim) != head_dim:
    raise ValueError(f"{label}: partial rotary embeddings ({arch}.rope.dimension_count < head dim) are not supported")
  shapes = {t.name: tuple(int(n) for n in reversed(t.shape)) for t in r.tensors}
  if "token_embd.weight" not in shapes:
    raise ValueError(f"{label}: GGUF file has no token_embd.weight")
  eos = [meta[f"tokenizer.ggml.{k}_token_id"] for k in ("eos", "eot") if f"tokenizer.ggml.{k}_token_id" in meta]
  eos = list(dict.fromkeys(eos))  # the end of a chat turn stops generation too
  d = {
      "model_type": ARCHITECTURES[arch],
      "vocab_size": shapes["token_embd.weight"][0],
      "hidden_size": hidden,
      "intermediate_size": get("feed_forward_length"),
      "num_hidden_layers": get("block_count"),
      "num_attention_heads": heads,
      "num_key_value_heads": kv_heads,
      "head_dim": head_dim,
      "max_position_embeddings": get("context_length"),
      "rms_norm_eps": get("attention.layer_norm_rms_epsilon"),
      "tie_word_embeddings": "output.weight" not in shapes,
      "bos_token_id": meta.get("tokenizer.ggml.bos_token_id"),
      "eos_token_id": eos[0] if len(eos) == 1 else (eos or None),
      "pad_token_id": meta.get("tokenizer.ggml.padding_token_id"),
      "dtype": "float32",
      "rope_parameters": _rope(r, meta, arch, head_dim, label),
  }
  if arch in ("llama", "mistral"):
    d["attention_bias"] = "blk.0.attn_q.bias" in shapes
  if (window := get("attention.sliding_window", None)) is not None:
    d["sliding_window"] = window
    if arch == "qwen2":
      d["use_sliding_window"] = True
  return d


def _rope(r, meta: dict, arch: str, head_dim: int, label: str) -> dict:
  theta = float(meta.get(f"{arch}.rope.freq_base", 10000.0))
  kind = meta.get(f"{arch}.rope.scaling.type", "none")
  factor = float(meta.get(f"{arch}.rope.scaling.factor", 1.0))
  original = meta.get(f"{arch}.rope.scaling.original_context_length")
  freqs = next((t for t in r.tensors if t.name == ROPE_FREQS), None)
  if freqs is not None:
    return _llama3_from_freqs(np.asarray(freqs.data, np.float64), theta, head_dim, label)
  if kind == "none" or (kind == "linear" and factor == 1.0):
    return {"rope_type": "default", "rope_theta": theta}
  if kind == "linear":
    return {"rope_type": "linear", "rope_theta": theta, "factor": factor}
  if kind == "yarn":
    extra = {k: meta[f"{arch}.rope.scaling.yarn_{k}"] for k in ("beta_fast", "beta_slow") if f"{arch}.rope.scaling.yarn_{k}" in meta}
    return {"rope_type": "yarn", "rope_theta": theta, "factor": factor, "original_max_position_embeddings": original, **extra}
  raise ValueError(f"{label}: RoPE scaling type {kind!r} is not supported (supported: none, linear, yarn, llama3)")


def _llama3_from_freqs(divisors: np.ndarray, theta: float, head_dim: int, label: str) -> dict:
  """Llama 3.1's RoPE parameters, recognised from llama.cpp's per-frequency divisors.

  GGUF keeps only the divisors; the parameters that produce them are checked against the ones every
  Llama 3.1 / 3.2 / 3.3 release uses (low 1, high 4, original context 8192), with `factor` read off.
  """
  params = {"rope_type": "llama3", "rope_theta": theta, "factor": float(divisors.max()), "low_freq_factor": 1.0,
            "high_freq_factor": 4.0, "original_max_position_embeddings": 8192}
  rope = Rope(**{("theta" if k == "rope_theta" else k): v for k, v in params.items()})
  plain = Rope(theta=theta).inv_freq(head_dim).astype(np.float64)
  if divisors.shape != plain.shape or not np.allclose(plain / divisors, rope.inv_freq(head_dim), rtol=1e-5):
    raise ValueError(
        f"{label}: {ROPE_FREQS} does not match Llama 3 RoPE scaling (factor {params['factor']}, low 1, high 4, "
        "original context 8192); other per-frequency RoPE factors are not supported"
    )
  return params


# ----------------------------------------------------------------------------- weights


def hf_name(name: str) -> str:
  """The Hugging Face name of a GGUF tensor (unknown names are returned as they are)."""
  for pattern, hf in _PATTERNS:
    if m := pattern.match(name):
      return hf.format(i=m.group(1)) if m.groups() else hf
  return name


class Source:
  """A GGUF file's tensors under their HF names and shapes, dequantised to float32 on demand."""

  def __init__(self, r, config: dict, label: str):
    import gguf

    self.tensors, self.shapes, self.nbytes, self.label = {}, {}, {}, label
    self.heads = {"q": config["num_attention_heads"], "k": config["num_key_value_heads"]}
    self.permuted = config["model_type"] in PERMUTED
    bad = sorted({t.tensor_type.name for t in r.tensors if t.tensor_type.name not in TENSOR_TYPES})
    if bad:
      raise ValueError(f"{label}: tensor type(s) {', '.join(bad)} are not supported (supported: {', '.join(TENSOR_TYPES)})")
    self._dequantize = gguf.quants.dequantize
    for t in r.tensors:
      if t.name == ROPE_FREQS:
        continue  # read into the config
      name = hf_name(t.name)
      self.tensors[name] = t
      self.shapes[name] = tuple(int(n) for n in reversed(t.shape))
      self.nbytes[name] = int(t.n_bytes)

  def get(self, name: str) -> np.ndarray:
    t = self.tensors[name]
    x = self._dequantize(t.data, t.tensor_type).reshape(self.shapes[name])
    if not np.isfinite(x).all():
      raise ValueError(f"{self.label}: tensor {t.name} holds non-finite values; the file is corrupt")
    if self.permuted and (m := re.search(r"\.([qk])_proj\.", name)):
      x = unpermute(x, self.heads[m.group(1)])
    return x


def unpermute(x: np.ndarray, heads: int) -> np.ndarray:
  """Undoes llama.cpp's Q/K row order: per head, rows (0, H/2, 1, H/2+1, ...) back to (0, 1, ..., H-1)."""
  half = x.shape[0] // heads // 2
  return x.reshape(heads, half, 2, *x.shape[1:]).swapaxes(1, 2).reshape(x.shape)


def load(path: Path, dtype=None, progress: bool | None = None):
  from xlazoo.checkpoints import hf
  from xlazoo.models import family_for

  r = reader(path)
  d = hf_config(r, str(path))
  config = family_for(d["model_type"]).Config.from_hf(d)
  return hf.fill(config, [Source(r, d, str(path))], str(path), dtype or "float32", progress)


# ----------------------------------------------------------------------------- tokenizer


def tokenizer(path: Path):
  """The file's tokenizer rebuilt as a `tokenizers` tokenizer (byte-level BPE vocabularies)."""
  from tokenizers import (
    AddedToken,
    Regex,
    decoders,
    models,
    normalizers,
    pre_tokenizers,
    processors,
  )
  from tokenizers import Tokenizer as Backend

  from xlazoo.tokenizer import Tokenizer

  r = reader(path)
  meta = metadata(r)
  kind = meta.get("tokenizer.ggml.model")
  if kind != "gpt2":
    raise ValueError(
        f"{path}: GGUF tokenizer model {kind!r} cannot be rebuilt exactly; xlazoo rebuilds byte-level BPE ('gpt2': "
        "Llama 3, Qwen, SmolLM) tokenizers only. Put the model's original tokenizer.json beside the converted "
        "checkpoint, or pass token ids with --prompt-ids"
    )
  pre = meta.get("tokenizer.ggml.pre", "default")
  if pre not in PRE_TOKENIZERS:
    raise ValueError(
        f"{path}: GGUF pre-tokenizer {pre!r} is not known to xlazoo (known: {', '.join(sorted(PRE_TOKENIZERS))}); "
        "its text splitting cannot be rebuilt exactly"
    )
  split = PRE_TOKENIZERS[pre]
  tokens, types, merges = (
      r.fields[f"tokenizer.ggml.{k}"].contents() if f"tokenizer.ggml.{k}" in r.fields else []
      for k in ("tokens", "token_type", "merges")
  )
  merges = [tuple(m.split(" ")) for m in merges]
  vocab = {t: i for i, t in enumerate(tokens)}
  backend = Backend(models.BPE(vocab, merges, ignore_merges=split == "llama3"))
  byte_level = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=split in ("gpt2", "smollm"))
  if split == "smollm":
    backend.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.Digits(individual_digits=True), byte_level])
  elif split in ("llama3", "qwen2"):
    regex = Regex(_LLAMA3_SPLIT if split == "llama3" else _QWEN2_SPLIT)
    backend.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.Split(regex, behavior="isolated"), byte_level])
  else:
    backend.pre_tokenizer = byte_level
  if split == "qwen2":
    backend.normalizer = normalizers.NFC()
  backend.decoder = decoders.ByteLevel()
  # CONTROL (3) tokens are special; USER_DEFINED (4) ones are matched whole but kept in decoded text.
  backend.add_special_tokens([AddedToken(t, special=True, normalized=False) for t, k in zip(tokens, types) if k == 3])
  backend.add_tokens([AddedToken(t, special=False, normalized=False) for t, k in zip(tokens, types) if k == 4])

  special = {}
  for name, key in (("bos_token", "bos"), ("eos_token", "eos"), ("unk_token", "unknown"), ("pad_token", "padding")):
    i = meta.get(f"tokenizer.ggml.{key}_token_id")
    if i is not None and 0 <= i < len(tokens):
      special[name] = tokens[i]
  if meta.get("tokenizer.ggml.add_bos_token", False) and "bos_token" in special:
    bos = special["bos_token"]
    backend.post_processor = processors.TemplateProcessing(
        single=f"{bos} $A", pair=f"{bos} $A {bos} $B", special_tokens=[(bos, vocab[bos])]
    )
  return Tokenizer(backend, meta.get("tokenizer.chat_template"), special)


def side_files(path: Path) -> dict[str, str]:
  """tokenizer.json, tokenizer_config.json and generation_config.json for a converted GGUF file."""
  import sys

  r = reader(path)
  d = hf_config(r, str(path))
  out = {}
  if "tokenizer.ggml.tokens" in r.fields:
    try:
      out |= tokenizer(path).files()
    except ValueError as e:
      print(f"note: the tokenizer was not converted: {e}", file=sys.stderr)
  gen = {k: d[k] for k in ("bos_token_id", "eos_token_id", "pad_token_id") if d[k] is not None}
  out["generation_config.json"] = json.dumps(gen, indent=2)
  return out

