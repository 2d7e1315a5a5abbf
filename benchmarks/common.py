"""What the benchmark scripts share: the run's header, PyTorch timing, and our weights handed to a peer."""

import os
import platform
import subprocess
from importlib import metadata
from pathlib import Path

os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")  # JAX and PyTorch share the GPU

import jax  # noqa: E402
import numpy as np  # noqa: E402

from xlazoo import bench  # noqa: E402
from xlazoo.checkpoints.hf import hf_tensors  # noqa: E402


def versions(*packages: str) -> str:
  out = []
  for p in ("jax", "jaxlib", "torch", "transformers", *packages):
    try:
      out.append(f"{p} {metadata.version(p)}")
    except metadata.PackageNotFoundError:
      pass
  return ", ".join(out)


def commit() -> str:
  """The xlazoo commit: $XLAZOO_COMMIT (set where the tree travels without .git), else git's ("-dirty" where
  the tree differs from it)."""
  if os.environ.get("XLAZOO_COMMIT"):
    return os.environ["XLAZOO_COMMIT"]
  try:
    root = Path(__file__).resolve().parents[1]
    return subprocess.run(["git", "describe", "--always", "--dirty", "--abbrev=7"], cwd=root, capture_output=True, text=True, check=True).stdout.strip()
  except (OSError, subprocess.CalledProcessError):
    return "unknown"


def header(*packages: str) -> str:
  return f"{jax.devices()[0].device_kind}; {versions(*packages)}; Python {platform.python_version()}; xlazoo {commit()}"


def torch_time(fn, **kw) -> float:
  """bench.median_time for a PyTorch function on the GPU."""
  import torch

  return bench.median_time(fn, sync=lambda _: torch.cuda.synchronize(), **kw)


def to_torch(x):
  """A jax array as a contiguous torch tensor on the same GPU (through DLPack, one device copy)."""
  import torch

  return torch.from_dlpack(x).contiguous().clone()


def peer_weights(model) -> dict:
  """Our weights under Hugging Face names and layouts, as torch tensors on the GPU."""
  return {name: to_torch(x) for name, x in hf_tensors(model, on_device=True).items()}


def rel_err(a, b) -> float:
  a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
  return float(np.linalg.norm(a - b) / np.linalg.norm(b))


def agree(a, b) -> float:
  """Fraction of equal entries (e.g. greedy tokens, argmaxes)."""
  return float(np.mean(np.asarray(a) == np.asarray(b)))


def free_torch() -> None:
  """Returns the GPU memory of PyTorch objects that are gone to the device (JAX shares the GPU)."""
  import gc

  import torch

  gc.collect()
  torch.cuda.empty_cache()


def shape_flags(ap, layers: int, new_tokens: int) -> None:
  """The flags every model script takes."""
  ap.add_argument("--prompt-len", type=int, default=8192, help="prefill length (default 8192)")
  ap.add_argument("--new-tokens", type=int, default=new_tokens, help=f"decode steps timed (default {new_tokens})")
  ap.add_argument("--iters", type=int, default=5, help="timed runs per measurement; medians (default 5)")
  ap.add_argument("--layers", type=int, help=f"fewer layers than the {layers} of the shape, for a quick run")
