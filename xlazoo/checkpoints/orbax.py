"""xlazoo checkpoints: an Orbax checkpoint of the params beside the model's config.json.

Layout of an xlazoo directory:
  xlazoo.json   format marker and the params' dtype
  config.json   the Hugging Face config the model was built from
  params/       Orbax (tensorstore) checkpoint of the parameter tree
  tokenizer.json, tokenizer_config.json, ...  copied from the source, if present
"""

import json
import os
from pathlib import Path

import jax
import jax.numpy as jnp
import orbax.checkpoint as ocp

from xlazoo.checkpoints import files
from xlazoo.checkpoints.hf import read_config
from xlazoo.models import Model, family_for
from xlazoo.models.params import shapes

FORMAT = "xlazoo"
MARKER = "xlazoo.json"


def is_xlazoo_dir(path: Path) -> bool:
  return (path / MARKER).is_file()


def save(model: Model, out: str | os.PathLike, extra: dict[str, Path | str] | None = None) -> Path:
  """Writes `model` to a new directory `out`, atomically (all of it or nothing under that name)."""
  with files.atomic_dir(out) as tmp:
    with ocp.StandardCheckpointer() as ckptr:
      ckptr.save((tmp / "params").absolute(), model.params)
      ckptr.wait_until_finished()
    (tmp / "config.json").write_text(json.dumps(model.config.hf, indent=2, sort_keys=True))
    files.put(tmp, extra or {})
    (tmp / MARKER).write_text(json.dumps({"format": FORMAT, "version": 1, "dtype": str(jnp.dtype(model.dtype))}))
  return Path(out)


def restore(path: str | os.PathLike, dtype=None) -> Model:
  path = Path(path).absolute()
  meta = json.loads((path / MARKER).read_text())
  config = read_config(path)
  family = family_for(config.model_type)
  stored = jnp.dtype(meta["dtype"])
  target = jax.tree.map(
      lambda s: jax.ShapeDtypeStruct(s, stored), shapes(family.param_decls(config)), is_leaf=lambda x: isinstance(x, tuple)
  )
  with ocp.StandardCheckpointer() as ckptr:
    params = ckptr.restore(path / "params", target)
  if dtype is not None and jnp.dtype(dtype) != stored:
    params = jax.tree.map(lambda x: x.astype(dtype), params)
  return Model(config=config, params=params)
