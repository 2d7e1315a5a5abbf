"""Atomic directory writes and progress bars."""

import contextlib
import os
import shutil
import sys
import uuid
from pathlib import Path

from tqdm import tqdm


@contextlib.contextmanager
def atomic_dir(out: str | os.PathLike):
  """Yields a temporary sibling directory that becomes `out` only if the block completes.

  A crash or kill leaves a hidden `.name.tmp-*` directory, never a directory named `out`.
  """
  out = Path(out)
  if out.exists() and (not out.is_dir() or any(out.iterdir())):
    raise FileExistsError(f"{out} already exists and is not empty; choose a new output directory or remove it")
  out.parent.mkdir(parents=True, exist_ok=True)
  tmp = out.parent / f".{out.name}.tmp-{uuid.uuid4().hex[:8]}"
  tmp.mkdir()
  try:
    yield tmp
    if out.exists():
      out.rmdir()
    os.rename(tmp, out)
  except BaseException:
    shutil.rmtree(tmp, ignore_errors=True)
    raise


def put(directory: Path, extra: dict[str, "Path | str"]) -> None:
  """Writes side files into `directory`: each name's source file is copied, or its text written."""
  for name, src in extra.items():
    if isinstance(src, Path):
      shutil.copyfile(src, directory / name)
    else:
      (directory / name).write_text(src)


def progress(total: int, desc: str, show: bool, unit: str = "it"):
  return tqdm(
      total=total, desc=desc, disable=not show, unit=unit, unit_scale=True, file=sys.stderr, leave=False, dynamic_ncols=True
  )
