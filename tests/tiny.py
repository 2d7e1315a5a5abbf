"""A tiny deterministic random Llama-style model with a byte-level tokenizer, for CLI tests."""

from pathlib import Path

import jax
from tokenizers import Tokenizer, decoders, models, pre_tokenizers

from xlazoo.checkpoints import orbax
from xlazoo.models import Model, config_from_hf, family_of

SPECIALS = ("<bos>", "<eos>", "<pad>")
CONFIG = dict(
    model_type="llama", vocab_size=256 + len(SPECIALS), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
    num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=2048, bos_token_id=256, eos_token_id=257,
    pad_token_id=258, tie_word_embeddings=True, rope_theta=10000.0,
)


def tiny_model() -> Model:
  config = config_from_hf(CONFIG)
  return Model(config, family_of(config).init(config, jax.random.key(0)))


def save_tiny(path: Path) -> Path:
  """The tiny model as an xlazoo directory with its tokenizer.json."""
  return orbax.save(tiny_model(), path, {"tokenizer.json": byte_tokenizer().to_str()})


def byte_tokenizer() -> Tokenizer:
  """Byte-level BPE with no merges: one token per UTF-8 byte, ids 0..255, then the specials."""
  vocab = {c: i for i, c in enumerate(_byte_chars())}
  vocab |= {s: 256 + i for i, s in enumerate(SPECIALS)}
  tok = Tokenizer(models.BPE(vocab=vocab, merges=[]))
  tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
  tok.decoder = decoders.ByteLevel()
  tok.add_special_tokens(list(SPECIALS))
  return tok


def _byte_chars() -> list[str]:
  """The printable stand-in character of each byte 0..255, as GPT-2's byte-level BPE maps them."""
  keep = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
  chars, n = {}, 0
  for b in range(256):
    if b in keep:
      chars[b] = chr(b)
    else:
      chars[b] = chr(256 + n)
      n += 1
  return [chars[b] for b in range(256)]
