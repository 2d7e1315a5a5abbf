"""Tokenizers and chat templates read from a checkpoint directory, as transformers reads them:
the template from tokenizer_config.json (a string or named templates) or chat_template.jinja."""

import json

import pytest
import transformers

from tests.tiny import byte_tokenizer
from xlazoo import tokenizer

TEMPLATE = (
    "{% for m in messages %}{{ bos_token + m['role'] + ': ' + m['content'] + eos_token }}{% endfor %}"
    "{% if add_generation_prompt %}{{ 'assistant: ' }}{% endif %}"
)
OTHER = "{% for m in messages %}[{{ m['role'] }}] {{ m['content'] }}\n{% endfor %}"
MESSAGES = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi ünïcode"}]


def _dir(tmp_path, config: dict, jinja: str | None = None):
  d = tmp_path / "tok"
  d.mkdir()
  byte_tokenizer().save(str(d / "tokenizer.json"))
  (d / "tokenizer_config.json").write_text(json.dumps({"tokenizer_class": "PreTrainedTokenizerFast", **config}))
  if jinja is not None:
    (d / "chat_template.jinja").write_text(jinja)
  return d


SPECIALS = {"bos_token": "<bos>", "eos_token": {"content": "<eos>", "special": True, "__type": "AddedToken"}}


@pytest.mark.parametrize(
    "config, jinja, expect",
    [
        ({**SPECIALS, "chat_template": TEMPLATE}, None, TEMPLATE),
        ({**SPECIALS, "chat_template": [{"name": "tool_use", "template": OTHER}, {"name": "default", "template": TEMPLATE}]},
         None, TEMPLATE),
        (SPECIALS, TEMPLATE, TEMPLATE),
    ],
    ids=["config_string", "config_named", "jinja_file"],
)
def test_chat_template_sources(tmp_path, config, jinja, expect):
  d = _dir(tmp_path, config, jinja)
  ours = tokenizer.load(d)
  assert ours.chat_template == expect
  assert ours.special_tokens == {"bos_token": "<bos>", "eos_token": "<eos>"}
  theirs = transformers.AutoTokenizer.from_pretrained(d)
  for gen in (True, False):
    want = theirs.apply_chat_template(MESSAGES, tokenize=False, add_generation_prompt=gen)
    assert ours.render_chat(MESSAGES, gen) == want
  text = ours.render_chat(MESSAGES)
  assert text.startswith("<bos>system: Be brief.<eos><bos>user")
  ids = ours.encode_chat(MESSAGES)
  assert ids == theirs.apply_chat_template(MESSAGES, tokenize=True, add_generation_prompt=True, return_dict=False)
  assert ids[0] == 256 and ids.count(257) == 2  # the specials are single tokens
  assert ours.decode(ids) == text.replace("<bos>", "").replace("<eos>", "")


def test_no_template(tmp_path):
  ours = tokenizer.load(_dir(tmp_path, {}))
  assert ours.chat_template is None
  with pytest.raises(ValueError, match="has no chat template"):
    ours.render_chat(MESSAGES)
  assert tokenizer.load(tmp_path) is None  # no tokenizer.json at all
