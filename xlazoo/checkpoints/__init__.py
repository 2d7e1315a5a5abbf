"""Checkpoints: Hugging Face (safetensors / .bin) and GGUF -> xlazoo -> Hugging Face, and Orbax save/restore."""

import os
from pathlib import Path

from xlazoo.checkpoints import hybrid as _hybrid
from xlazoo.checkpoints import transformer as _transformer
from xlazoo.models import Model, hybrid, transformer

# Extra files copied along with the weights on convert and export.
TOKENIZER_FILES = (
    "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "generation_config.json", "chat_template.jinja",
)


def table_for(config) -> list[tuple[str, str, str]]:
  """The family's HF name table for a config."""
  if isinstance(config, transformer.Config):
    return _transformer.table(config)
  if isinstance(config, hybrid.Config):
    return _hybrid.table(config)
  raise ValueError(f"no Hugging Face mapping for {type(config).__name__}")


def load(path: str | os.PathLike, dtype=None, progress: bool | None = None) -> Model:
  """Loads a Hugging Face directory, a GGUF file or an xlazoo (Orbax) directory; see xlazoo.load."""
  from xlazoo.checkpoints import gguf, hf, orbax

  p = Path(path)
  if not p.exists():
    raise FileNotFoundError(f"{p} does not exist")
  if (f := gguf.find(p)) is not None:
    return gguf.load(f, dtype, progress)
  if p.is_dir() and orbax.is_xlazoo_dir(p):
    return orbax.restore(p, dtype)
  if p.is_dir() and hf.is_hf_dir(p):
    return hf.load_hf(p, dtype, progress)
  raise ValueError(
      f"{p} is not a checkpoint: expected a Hugging Face directory (config.json with model.safetensors, "
      "model.safetensors.index.json or pytorch_model.bin), a .gguf file, or an xlazoo directory (xlazoo.json, "
      "written by `xlazoo convert`)"
  )


def side_files(src: Path) -> dict[str, Path | str]:
  """The tokenizer and generation-config files that travel with the weights."""
  from xlazoo.checkpoints import gguf

  if (f := gguf.find(src)) is not None:
    return gguf.side_files(f)
  return {f: src / f for f in TOKENIZER_FILES if (src / f).is_file()}


def convert(src: str | os.PathLike, out: str | os.PathLike, dtype=None, progress: bool | None = None) -> Path:
  """HF directory or GGUF file -> xlazoo directory (Orbax params + config + tokenizer files)."""
  from xlazoo.checkpoints import orbax

  return orbax.save(load(src, dtype, progress), out, side_files(Path(src)))


def export(src: str | os.PathLike, out: str | os.PathLike, dtype=None) -> Path:
  """xlazoo (or HF, or GGUF) -> HF directory (config.json + model.safetensors + tokenizer files)."""
  from xlazoo.checkpoints import hf

  return hf.export_hf(load(src, dtype), out, side_files(Path(src)))
