"""Checkpoints: Hugging Face (safetensors / .bin) <-> xlazoo, and Orbax save/restore."""

import os
from pathlib import Path

from xlazoo.checkpoints import transformer as _transformer
from xlazoo.models import Model, transformer

# Extra files copied along with the weights on convert and export.
TOKENIZER_FILES = (
    "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "generation_config.json", "chat_template.jinja",
)


def table_for(config) -> list[tuple[str, str, str]]:
  """The family's HF name table for a config."""
  if isinstance(config, transformer.Config):
    return _transformer.table(config)
  raise ValueError(f"no Hugging Face mapping for {type(config).__name__}")


def load(path: str | os.PathLike, dtype=None) -> Model:
  """Loads a local Hugging Face directory or an xlazoo (Orbax) directory; see xlazoo.load."""
  from xlazoo.checkpoints import hf, orbax

  p = Path(path)
  if not p.exists():
    raise FileNotFoundError(f"{p} does not exist")
  if p.is_dir() and orbax.is_xlazoo_dir(p):
    return orbax.restore(p, dtype)
  if p.is_dir() and hf.is_hf_dir(p):
    return hf.load_hf(p, dtype)
  raise ValueError(
      f"{p} is not a checkpoint: expected a Hugging Face directory (config.json with model.safetensors, "
      f"model.safetensors.index.json or pytorch_model.bin) or an xlazoo directory (xlazoo.json, written by `xlazoo convert`)"
  )


def side_files(src: Path) -> list[Path]:
  return [src / f for f in TOKENIZER_FILES if (src / f).is_file()]


def convert(src: str | os.PathLike, out: str | os.PathLike, dtype=None) -> Path:
  """HF directory -> xlazoo directory (Orbax params + config + tokenizer files)."""
  from xlazoo.checkpoints import orbax

  return orbax.save(load(src, dtype), out, side_files(Path(src)))


def export(src: str | os.PathLike, out: str | os.PathLike, dtype=None) -> Path:
  """xlazoo (or HF) directory -> HF directory (config.json + model.safetensors + tokenizer files)."""
  from xlazoo.checkpoints import hf

  return hf.export_hf(load(src, dtype), out, side_files(Path(src)))
