"""Tokenizers and chat templates.

A checkpoint's tokenizer is a `tokenizers` tokenizer plus what a chat needs: the chat template
(jinja2) and the special-token strings the template refers to. It comes from a directory
(tokenizer.json, tokenizer_config.json, chat_template.jinja) or is rebuilt from a GGUF file's
metadata (see checkpoints.gguf).
"""

import dataclasses
import datetime
import json
from pathlib import Path

import tokenizers

SPECIAL_NAMES = ("bos_token", "eos_token", "unk_token", "pad_token")


@dataclasses.dataclass
class Tokenizer:
  backend: tokenizers.Tokenizer
  chat_template: str | None = None
  special_tokens: dict[str, str] = dataclasses.field(default_factory=dict)  # bos_token, eos_token, ...

  def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
    return self.backend.encode(text, add_special_tokens=add_special_tokens).ids

  def decode(self, ids) -> str:
    return self.backend.decode(list(ids), skip_special_tokens=True)

  def render_chat(self, messages: list[dict], add_generation_prompt: bool = True) -> str:
    """The prompt text for `messages` ([{"role": ..., "content": ...}]) by the chat template."""
    if self.chat_template is None:
      raise ValueError("this model's tokenizer has no chat template; use a chat model or leave out --chat")
    return render(self.chat_template, messages, add_generation_prompt, self.special_tokens)

  def encode_chat(self, messages: list[dict]) -> list[int]:
    # The template writes the special tokens itself (BOS included), as transformers' apply_chat_template.
    return self.encode(self.render_chat(messages), add_special_tokens=False)

  def files(self) -> dict[str, str]:
    """tokenizer.json and tokenizer_config.json, as transformers reads them."""
    config = {"tokenizer_class": "PreTrainedTokenizerFast", **self.special_tokens}
    if self.chat_template is not None:
      config["chat_template"] = self.chat_template
    return {"tokenizer.json": self.backend.to_str(), "tokenizer_config.json": json.dumps(config, indent=2)}


def load(path: str | Path) -> Tokenizer | None:
  """The tokenizer of a checkpoint directory or GGUF file, or None if it has none."""
  from xlazoo.checkpoints import gguf

  path = Path(path)
  if (f := gguf.find(path)) is not None:
    return gguf.tokenizer(f)
  if not (path / "tokenizer.json").is_file():
    return None
  backend = tokenizers.Tokenizer.from_file(str(path / "tokenizer.json"))
  config = {}
  if (path / "tokenizer_config.json").is_file():
    config = json.loads((path / "tokenizer_config.json").read_text())
  template = config.get("chat_template")
  if isinstance(template, list):  # named templates: [{"name": "default", "template": ...}, ...]
    template = {t["name"]: t["template"] for t in template}.get("default")
  if (path / "chat_template.jinja").is_file():
    template = (path / "chat_template.jinja").read_text()
  special = {}
  for name in SPECIAL_NAMES:
    tok = config.get(name)
    if isinstance(tok, dict):  # {"content": "<s>", ...}
      tok = tok.get("content")
    if isinstance(tok, str):
      special[name] = tok
  return Tokenizer(backend, template, special)


def render(template: str, messages: list[dict], add_generation_prompt: bool, special_tokens: dict[str, str]) -> str:
  """Renders a chat template in a sandbox, with the same environment as transformers' apply_chat_template."""
  import jinja2
  from jinja2.sandbox import ImmutableSandboxedEnvironment

  def raise_exception(message):
    raise jinja2.TemplateError(message)

  def tojson(x, ensure_ascii=False, indent=None, separators=None, sort_keys=False):
    return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)

  env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True, extensions=["jinja2.ext.loopcontrols"])
  env.filters["tojson"] = tojson
  env.globals["raise_exception"] = raise_exception
  env.globals["strftime_now"] = lambda fmt: datetime.datetime.now().strftime(fmt)
  try:
    return env.from_string(template).render(
        messages=messages, add_generation_prompt=add_generation_prompt, **special_tokens
    )
  except jinja2.TemplateError as e:
    raise ValueError(f"the chat template failed: {e}") from e
