"""Model families. Each module exposes Config (with from_hf), param_decls, init, init_cache, forward."""

from types import ModuleType

from xlazoo.models import hybrid, transformer
from xlazoo.models.params import Model

_BY_MODEL_TYPE: dict[str, ModuleType] = {t: transformer for t in transformer.MODEL_TYPES} | {
    t: hybrid for t in hybrid.MODEL_TYPES
}
MODEL_TYPES = tuple(_BY_MODEL_TYPE)


def family_for(model_type: str | None) -> ModuleType:
  """The family module that implements a Hugging Face model_type."""
  if model_type not in _BY_MODEL_TYPE:
    raise ValueError(f"unknown model_type {model_type!r}; supported: {', '.join(MODEL_TYPES)}")
  return _BY_MODEL_TYPE[model_type]


def family_of(config) -> ModuleType:
  return family_for(config.model_type)


def config_from_hf(d: dict):
  """The family Config for a Hugging Face config.json dict."""
  return family_for(d.get("model_type")).Config.from_hf(d)


__all__ = ["MODEL_TYPES", "Model", "config_from_hf", "family_for", "family_of"]
