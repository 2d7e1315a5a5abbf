"""Writes small GGUF files from random transformers models, as llama.cpp's converter lays them out."""

import numpy as np
from gguf import GGMLQuantizationType as Q
from gguf import GGUFWriter, quants

from tests.tiny import _byte_chars

# HF name pattern -> GGUF name ({i}: layer)
NAMES = {
    "model.embed_tokens.weight": "token_embd.weight",
    "model.norm.weight": "output_norm.weight",
    "lm_head.weight": "output.weight",
    "model.layers.{i}.input_layernorm.weight": "blk.{i}.attn_norm.weight",
    "model.layers.{i}.post_attention_layernorm.weight": "blk.{i}.ffn_norm.weight",
    **{f"model.layers.{{i}}.self_attn.{h}_proj.{w}": f"blk.{{i}}.attn_{g}.{w}"
       for h, g in (("q", "q"), ("k", "k"), ("v", "v"), ("o", "output")) for w in ("weight", "bias")},
    "model.layers.{i}.self_attn.q_norm.weight": "blk.{i}.attn_q_norm.weight",
    "model.layers.{i}.self_attn.k_norm.weight": "blk.{i}.attn_k_norm.weight",
    **{f"model.layers.{{i}}.mlp.{p}_proj.weight": f"blk.{{i}}.ffn_{p}.weight" for p in ("gate", "up", "down")},
}
# Block layout of the K-quants: bytes per 256 values, and the byte offsets of their float16 scales.
K_QUANTS = {Q.Q2_K: (84, (80, 82)), Q.Q3_K: (110, (108,)), Q.Q4_K: (144, (0, 2)), Q.Q5_K: (176, (0, 2)), Q.Q6_K: (210, (208,))}


def gguf_name(hf: str) -> str:
  parts = hf.split(".")
  if len(parts) > 2 and parts[2].isdigit():
    return NAMES[".".join(parts[:2] + ["{i}"] + parts[3:])].format(i=parts[2])
  return NAMES[hf]


def permute(w: np.ndarray, heads: int) -> np.ndarray:
  """llama.cpp's Q/K row order for its interleaved rotary layout."""
  return w.reshape(heads, 2, w.shape[0] // heads // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def random_k_blocks(qtype, shape, rng) -> np.ndarray:
  """Random K-quant bytes for a [rows, cols] tensor, with small finite float16 scales."""
  size, scale_at = K_QUANTS[qtype]
  rows, cols = shape
  blocks = rng.integers(0, 256, (rows * cols // 256, size), dtype=np.uint8)
  for at in scale_at:
    blocks[:, at : at + 2] = rng.uniform(1e-3, 2e-2, (len(blocks), 1)).astype(np.float16).view(np.uint8)
  return blocks.reshape(rows, cols // 256 * size)


def write(model, path, arch: str, qtype=Q.F32, *, tokens=None, meta=(), rope_freqs=None, raw_k=None, seed=0) -> str:
  """Writes `model` (a transformers llama / qwen2 / qwen3) as a GGUF file of `arch`.

  2-D weights are stored as `qtype` (norms and biases stay F32, as llama.cpp keeps them); with
  `raw_k` (a K-quant type) they are random K-quant blocks instead, which then define the model.
  Returns the path. `tokens`: a byte-level vocabulary (default: the 256 byte characters + specials).
  """
  c = model.config
  rng = np.random.default_rng(seed)
  head_dim = getattr(c, "head_dim", None) or c.hidden_size // c.num_attention_heads
  tokens = tokens or [*_byte_chars(), "<s>", "</s>", "<pad>"][: c.vocab_size]
  kv = {  # metadata as llama.cpp's converter writes it; `meta` adds to it or overrides it
      **{f"{arch}.{k}": v for k, v in {
          "block_count": c.num_hidden_layers, "context_length": c.max_position_embeddings,
          "embedding_length": c.hidden_size, "feed_forward_length": c.intermediate_size,
          "attention.head_count": c.num_attention_heads, "attention.head_count_kv": c.num_key_value_heads,
          "attention.key_length": head_dim, "attention.value_length": head_dim, "rope.dimension_count": head_dim,
          "rope.freq_base": float(c.rope_parameters["rope_theta"]), "attention.layer_norm_rms_epsilon": c.rms_norm_eps,
      }.items()},
      "tokenizer.ggml.model": "gpt2", "tokenizer.ggml.pre": "default", "tokenizer.ggml.bos_token_id": len(tokens) - 3,
      "tokenizer.ggml.eos_token_id": len(tokens) - 2, **dict(meta),
  }
  w = GGUFWriter(str(path), arch)
  for key, value in kv.items():
    (w.add_string if isinstance(value, str) else w.add_float32 if isinstance(value, float) else w.add_uint32)(key, value)
  w.add_token_list(tokens)
  w.add_token_types([3 if t.startswith("<") and len(t) > 1 else 1 for t in tokens])
  w.add_token_merges([])
  if rope_freqs is not None:
    w.add_tensor("rope_freqs.weight", np.asarray(rope_freqs, np.float32))
  for name, t in model.state_dict().items():
    if name == "lm_head.weight" and c.tie_word_embeddings:
      continue
    x = t.detach().float().numpy()
    if arch in ("llama", "mistral") and ".q_proj." in name:
      x = permute(x, c.num_attention_heads)
    elif arch in ("llama", "mistral") and ".k_proj." in name:
      x = permute(x, c.num_key_value_heads)
    if x.ndim == 1:
      w.add_tensor(gguf_name(name), x)
    elif raw_k is not None:
      w.add_tensor(gguf_name(name), random_k_blocks(raw_k, x.shape, rng), raw_dtype=raw_k)
    elif qtype == Q.F32:
      w.add_tensor(gguf_name(name), x)
    elif qtype == Q.F16:
      w.add_tensor(gguf_name(name), x.astype(np.float16))
    else:
      w.add_tensor(gguf_name(name), quants.quantize(x, qtype), raw_dtype=qtype)
  w.write_header_to_file()
  w.write_kv_data_to_file()
  w.write_tensors_to_file()
  w.close()
  return str(path)
