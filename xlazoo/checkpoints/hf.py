"""Hugging Face checkpoints: read a local directory (safetensors, sharded or not, or PyTorch
`.bin`) into an xlazoo Model tensor by tensor, and write one back.

Reading is two passes: the first reads only the file headers and checks every name and shape
against the family's table (so a bad checkpoint fails before any data is read or compiled
work starts); the second copies one tensor at a time into the stacked parameter buffers.
"""

import dataclasses
import json
import math
import os
import re
import struct as pystruct
from pathlib import Path

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
from flax import traverse_util

from xlazoo.checkpoints import files
from xlazoo.models import Model, family_for
from xlazoo.models.params import shapes

_ST_DTYPES = {
    "F64": np.float64, "F32": np.float32, "F16": np.float16, "BF16": ml_dtypes.bfloat16,
    "I64": np.int64, "I32": np.int32, "I16": np.int16, "I8": np.int8, "U8": np.uint8, "BOOL": np.bool_,
}
_ST_NAMES = {np.dtype(v): k for k, v in _ST_DTYPES.items()}
# Non-parameter buffers that some checkpoints carry, and Nemotron-H's multi-token-prediction head
# (which transformers does not build either).
_IGNORED = re.compile(r".*rotary_emb\.inv_freq$|mtp\.")
PROGRESS_BYTES = 256 << 20  # show a progress bar above this checkpoint size


def is_hf_dir(path: Path) -> bool:
  return (path / "config.json").is_file() and bool(_weight_files(path, required=False))


def _weight_files(path: Path, required: bool = True) -> list[Path]:
  for index in ("model.safetensors.index.json", "pytorch_model.bin.index.json"):
    if (path / index).is_file():
      shards = sorted(set(json.loads((path / index).read_text())["weight_map"].values()))
      return [path / s for s in shards]
  for single in ("model.safetensors", "pytorch_model.bin"):
    if (path / single).is_file():
      return [path / single]
  found = sorted(path.glob("*.safetensors"))
  if not found and required:
    raise FileNotFoundError(
        f"{path} holds no weights: expected model.safetensors, model.safetensors.index.json or pytorch_model.bin"
    )
  return found


# ----------------------------------------------------------------------------- reading files


def _safetensors_header(f: Path) -> tuple[dict, int]:
  with open(f, "rb") as fh:
    raw = fh.read(8)
    if len(raw) < 8:
      raise ValueError(f"{f} is not a safetensors file (too short)")
    (n,) = pystruct.unpack("<Q", raw)
    header = json.loads(fh.read(n))
  header.pop("__metadata__", None)
  return header, 8 + n


class _Source:
  """Lazy access to the tensors of one weight file: names and shapes first, data on demand."""

  def __init__(self, f: Path):
    self.path = f
    if f.suffix == ".safetensors":
      self.header, self.offset = _safetensors_header(f)
      self.shapes = {k: tuple(v["shape"]) for k, v in self.header.items()}
      self.nbytes = {k: v["data_offsets"][1] - v["data_offsets"][0] for k, v in self.header.items()}
      self.mm = np.memmap(f, dtype=np.uint8, mode="r")
    else:
      try:
        import torch
      except ImportError as e:
        raise ImportError(f"reading {f.name} needs PyTorch: pip install 'xlazoo[test]' or torch") from e
      self.state = torch.load(f, map_location="cpu", weights_only=True, mmap=True)
      self.shapes = {k: tuple(v.shape) for k, v in self.state.items()}
      self.nbytes = {k: v.numel() * v.element_size() for k, v in self.state.items()}

  def get(self, name: str) -> np.ndarray:
    if hasattr(self, "header"):
      h = self.header[name]
      if h["dtype"] not in _ST_DTYPES:
        raise ValueError(f"{self.path.name}: tensor {name} has dtype {h['dtype']}, which is not supported")
      lo, hi = h["data_offsets"]
      return self.mm[self.offset + lo : self.offset + hi].view(_ST_DTYPES[h["dtype"]]).reshape(h["shape"])
    import torch

    t = self.state[name]
    if t.dtype == torch.bfloat16:
      return t.view(torch.int16).numpy().view(ml_dtypes.bfloat16)
    return t.numpy()


# ----------------------------------------------------------------------------- layout transforms


def _kind(kind: str) -> tuple[str, int | None]:
  """A row's layout, and the width of HF's last axis where ours has zero columns after it ("in:10576")."""
  base, _, cols = kind.partition(":")
  return base, int(cols) if cols else None


def to_ours(x: np.ndarray, kind: str, shape: tuple[int, ...]) -> np.ndarray:
  base, cols = _kind(kind)
  y = x.T if base in ("in", "out", "conv") else x
  if cols is None:
    return y.reshape(shape)
  y = y.reshape(*shape[:-1], cols)
  return np.pad(y, [(0, 0)] * (y.ndim - 1) + [(0, shape[-1] - cols)])


def to_hf(y: np.ndarray, kind: str) -> np.ndarray:
  base, cols = _kind(kind)
  if cols is not None:
    y = y[..., :cols]
  if base == "conv":  # ours [W, E] -> a depthwise Conv1d weight [E, 1, W]
    return y.T[:, None, :]
  if base == "in":
    return y.reshape(y.shape[0], -1).T
  if base == "out":
    return y.reshape(-1, y.shape[-1]).T
  if base == "flat":
    return y.reshape(-1)
  return y


def hf_shape(shape: tuple[int, ...], kind: str) -> tuple[int, ...]:
  """The shape that to_hf gives for our `shape`."""
  base, cols = _kind(kind)
  if cols is not None:
    shape = (*shape[:-1], cols)
  size = math.prod(shape)
  if base == "conv":
    return (shape[1], 1, shape[0])
  if base == "in":
    return (size // shape[0], shape[0])
  if base == "out":
    return (shape[-1], size // shape[-1])
  return (size,) if base == "flat" else tuple(shape)


def _expand(rows, num_layers: int) -> dict[str, tuple[str, int | tuple[int, int] | None, str]]:
  """{HF name: (our path, layer index or None, kind)} for every tensor the model needs.

  A row is (pattern, path, kind), or (pattern, path, kind, layers) where `layers` lists the
  (HF layer number, index in our stack) pairs that the row covers (default: layer i -> index i);
  an HF layer "number" may also be a dict of the pattern's fields ({"i": ..., "e": ...}), and an
  index a tuple (layer, expert).
  """
  out = {}
  for pattern, path, kind, *layers in rows:
    if "{i}" in pattern:
      for hf_i, i in layers[0] if layers else zip(range(num_layers), range(num_layers)):
        out[pattern.format(**hf_i) if isinstance(hf_i, dict) else pattern.format(i=hf_i)] = (path, i, kind)
    else:
      out[pattern] = (path, None, kind)
  return out


def _depth(index) -> int:
  """How many leading axes of a stacked parameter an _expand index selects."""
  return 0 if index is None else len(index) if isinstance(index, tuple) else 1


def hf_names(config, tied: bool = False) -> dict[str, tuple[str, int | tuple[int, int] | None, str]]:
  """The tensors of the family's table (tied copies only, with tied=True)."""
  from xlazoo.checkpoints import table_for

  names = _expand(table_for(config), config.num_layers)
  return {n: v for n, v in names.items() if (v[2] == "tied") == tied}


# ----------------------------------------------------------------------------- load / export


def read_config(path: Path):
  """The family Config of a checkpoint directory (config.json, stop tokens from generation_config.json)."""
  try:
    d = json.loads((path / "config.json").read_text())
  except (OSError, json.JSONDecodeError) as e:
    raise ValueError(f"{path / 'config.json'} could not be read: {e}") from e
  config = family_for(d.get("model_type")).Config.from_hf(d)
  gen = path / "generation_config.json"
  if gen.is_file():  # generate() follows generation_config's stop tokens, as transformers does
    eos = json.loads(gen.read_text()).get("eos_token_id")
    if eos is not None:
      config = dataclasses.replace(config, eos_token_ids=tuple(eos if isinstance(eos, list) else [eos]))
  return config


def load_hf(path: str | os.PathLike, dtype=None, progress: bool | None = None) -> Model:
  """Reads a local Hugging Face checkpoint directory into a Model (params on the default device)."""
  path = Path(path)
  config = read_config(path)
  dtype = dtype or config.hf.get("dtype") or config.hf.get("torch_dtype") or "float32"
  return fill(config, [_Source(f) for f in _weight_files(path)], str(path), dtype, progress)


def fill(config, sources, label: str, dtype, progress: bool | None = None) -> Model:
  """Builds the Model from `sources` of HF-named tensors (anything with .shapes, .nbytes and .get).

  Every name and shape is checked against the family's table first, and all problems are
  reported at once; only then is the data copied, one tensor at a time, into the stacked buffers.
  """
  family = family_for(config.model_type)
  flat_shapes = {"/".join(k): v for k, v in traverse_util.flatten_dict(shapes(family.param_decls(config))).items()}
  needed, tied = hf_names(config), hf_names(config, tied=True)
  where, unexpected, mismatched = {}, [], []
  for src in sources:
    for name, shape in src.shapes.items():
      if name in needed:
        our_path, layer, kind = needed[name]
        want = hf_shape(flat_shapes[our_path][_depth(layer):], kind)
        if shape != want:
          mismatched.append(f"{name}: expected shape {want}, got {shape}")
        where[name] = src
      elif not (_IGNORED.match(name) or name in tied or (name == "lm_head.weight" and config.tie_word_embeddings)):
        unexpected.append(name)
  missing = [n for n in needed if n not in where]
  problems = []
  if missing:
    problems.append(f"missing weights ({len(missing)}): {', '.join(missing[:20])}{' ...' if len(missing) > 20 else ''}")
  if unexpected:
    problems.append(
        f"unexpected weights ({len(unexpected)}): {', '.join(unexpected[:20])}{' ...' if len(unexpected) > 20 else ''}"
    )
  if mismatched:
    problems.append("shape mismatch: " + "; ".join(mismatched[:20]))
  if problems:
    raise ValueError(f"checkpoint {label} does not fit its {config.model_type} config: " + " | ".join(problems))

  np_dtype = np.dtype(jnp.dtype(dtype))
  buffers = {p: np.empty(s, np_dtype) for p, s in flat_shapes.items()}
  total = sum(src.nbytes[n] for n, src in where.items())
  show = progress if progress is not None else total > PROGRESS_BYTES
  with files.progress(total, f"loading {Path(label).name}", show, unit="B") as bar:
    for name, (our_path, layer, kind) in needed.items():
      src = where[name]
      buffers[our_path][layer if layer is not None else ...] = to_ours(
          src.get(name), kind, buffers[our_path].shape[_depth(layer):])
      bar.update(src.nbytes[name])
  params = traverse_util.unflatten_dict({tuple(k.split("/")): jnp.asarray(v) for k, v in buffers.items()})
  return Model(config=config, params=params)


def save_safetensors(tensors: dict[str, np.ndarray], f: Path) -> None:
  """Writes a safetensors file (bfloat16 included), tensor by tensor."""
  header, offset = {}, 0
  for name, x in tensors.items():
    header[name] = {"dtype": _ST_NAMES[x.dtype], "shape": list(x.shape), "data_offsets": [offset, offset + x.nbytes]}
    offset += x.nbytes
  raw = json.dumps(header, separators=(",", ":")).encode()
  raw += b" " * (-len(raw) % 8)
  with open(f, "wb") as fh:
    fh.write(pystruct.pack("<Q", len(raw)))
    fh.write(raw)
    for x in tensors.values():
      fh.write(np.ascontiguousarray(x).tobytes())


def hf_tensors(model: Model, on_device: bool = False) -> dict[str, np.ndarray | jax.Array]:
  """The model's parameters as Hugging Face names and layouts: numpy arrays on the host, or jax arrays left on the device."""
  flat = {"/".join(k): v for k, v in traverse_util.flatten_dict(model.params).items()}
  tensors = {}
  for name, (our_path, layer, kind) in hf_names(model.config).items():
    y = flat[our_path] if layer is None else flat[our_path][layer]
    tensors[name] = to_hf(y, kind) if on_device else np.ascontiguousarray(to_hf(np.asarray(jax.device_get(y)), kind))
  return tensors


def export_hf(model: Model, out: str | os.PathLike, extra: dict[str, Path | str] | None = None) -> Path:
  """Writes config.json + model.safetensors (+ extra side files, e.g. the tokenizer) that transformers loads."""
  tensors = hf_tensors(model)
  hf = model.config.hf
  hf["dtype"] = str(jnp.dtype(model.dtype))
  hf.pop("torch_dtype", None)
  with files.atomic_dir(out) as tmp:
    save_safetensors(tensors, tmp / "model.safetensors")
    (tmp / "config.json").write_text(json.dumps(hf, indent=2, sort_keys=True))
    files.put(tmp, extra or {})
  return Path(out)
