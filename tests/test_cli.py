"""The `xlazoo` command line: generate (HF and xlazoo dirs, ids and text), convert, export, --help,
and argument errors. Runs main() in-process. (The default model and chat: test_default_model.py.)"""

import json
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.numpy import load_file

import xlazoo
from tests.parity import hf_model, save
from tests.tiny import byte_tokenizer, save_tiny, tiny_model
from xlazoo import cli
from xlazoo.decoding import generate as g

ROOT = Path(__file__).resolve().parents[1]


def run(capsys, *argv) -> tuple[int, str, str]:
  """(exit code, stdout, stderr) of `xlazoo ARGV`, as the process would exit."""
  try:
    code = cli.main([str(a) for a in argv])
  except SystemExit as e:
    code = e.code
  out, err = capsys.readouterr()
  if isinstance(code, str):  # sys.exit("message"): Python prints it to stderr and exits with 1
    err, code = err + code + "\n", 1
  return code or 0, out, err


def expected_ids(model, prompt, n, **sampling) -> list[int]:
  """What the CLI should print: xlazoo.generate's tokens up to the first stop token, without padding."""
  seed = sampling.pop("seed", 0)
  _, _, plan = g.prepare(model, [prompt], max_new_tokens=n, **sampling)
  toks = np.asarray(xlazoo.generate(model, [prompt], max_new_tokens=n, seed=seed, **sampling))[0].tolist()
  out = []
  for t in toks:
    out.append(t)
    if t in plan.stop_ids:
      break
  skip = {plan.pad_id} if plan.pad_id not in plan.stop_ids else set()
  return [t for t in out if t not in skip]


def assert_text(printed: str, tokenizer, ids: list[int]):
  """The CLI prints the decoded text of the new tokens, then a newline."""
  assert printed == tokenizer.decode(ids, skip_special_tokens=True) + "\n"


def timing(err: str, n_prompt: int, n_decode: int):
  assert re.search(rf"prefill: {n_prompt} tokens in [\d.]+ ms \([\d.]+ tokens/s\)", err), err
  rate = r"[\d.]+ tokens/s" if n_decode else "n/a"
  assert re.search(rf"decode: {n_decode} tokens in [\d.]+ ms \({rate}\)", err), err


@pytest.fixture(scope="module")
def llama_dir(tmp_path_factory):
  return Path(save(hf_model("llama"), tmp_path_factory.mktemp("cli") / "llama"))


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
  return save_tiny(tmp_path_factory.mktemp("cli") / "tiny")


@pytest.fixture(scope="module")
def llama(llama_dir):
  return xlazoo.load(llama_dir)


# ----------------------------------------------------------------------------- generate


def test_generate_xlazoo_dir(capsys, tiny_dir):
  code, out, err = run(capsys, "generate", "--model", tiny_dir, "--prompt-ids", "1,2,3", "--max-new-tokens", "5")
  assert code == 0, err
  ids = expected_ids(tiny_model(), [1, 2, 3], 5)
  assert 1 <= len(ids) <= 5
  assert_text(out, byte_tokenizer(), ids)
  timing(err, 3, len(ids) - 1)
  assert "compiled in" in err


PROMPT = [5, 17, 3, 99, 42]


@pytest.mark.parametrize(
    "flags, sampling",
    [
        ([], {}),
        (["--temperature", "0.9", "--top-k", "40", "--top-p", "0.95", "--min-p", "0.01", "--seed", "3"],
         dict(temperature=0.9, top_k=40, top_p=0.95, min_p=0.01, seed=3)),
    ],
    ids=["greedy", "sampled"],
)
def test_generate_hf_dir_prints_ids(capsys, llama_dir, llama, flags, sampling):
  assert not (llama_dir / "tokenizer.json").exists()
  prompt, n = PROMPT, 20  # 20 > STREAM_SEGMENT: several decode segments
  code, out, err = run(capsys, "generate", "--model", llama_dir, "--prompt-ids", " 5, 17,3,99,42", "--max-new-tokens", n, *flags)
  assert code == 0, err
  want = expected_ids(llama, prompt, n, **sampling)
  assert [int(t) for t in out.split()] == want
  timing(err, len(prompt), len(want) - 1)


def test_generate_stops_at_eos(capsys, llama_dir, llama, tmp_path):
  """With generation_config's eos set to a token of the greedy run, the CLI stops right after its first
  occurrence (generate follows generation_config.json's stop tokens)."""
  free = expected_ids(llama, PROMPT, 20)  # same call as the greedy test above: no new compile
  d = tmp_path / "eos"
  d.mkdir()
  for f in llama_dir.iterdir():
    (d / f.name).write_bytes(f.read_bytes())
  eos = free[3]
  gen_cfg = json.loads((d / "generation_config.json").read_text()) | {"eos_token_id": eos}
  (d / "generation_config.json").write_text(json.dumps(gen_cfg))
  code, out, err = run(capsys, "generate", "--model", d, "--prompt-ids", ",".join(map(str, PROMPT)), "--max-new-tokens", 20)
  assert code == 0, err
  printed = [int(t) for t in out.split()]
  assert printed == free[: free.index(eos) + 1]
  assert printed[-1] == eos and len(printed) < 20
  timing(err, len(PROMPT), len(printed) - 1)


def test_prompt_text_needs_tokenizer(capsys, llama_dir):
  code, out, err = run(capsys, "generate", "--model", llama_dir, "--prompt", "hello")
  assert code != 0
  assert "tokenizer.json" in err and "--prompt-ids" in err and str(llama_dir) in err
  assert "compiled" not in err and out == ""


def _byte_llama(path: Path, edit) -> Path:
  """A random llama over the byte tokenizer's 259 ids, its lm_head edited, with tokenizer.json."""
  ref = hf_model("llama", vocab_size=259)
  with torch.no_grad():
    edit(ref.lm_head.weight)
  d = Path(save(ref, path))
  byte_tokenizer().save(str(d / "tokenizer.json"))
  return d


def test_prompt_text_with_tokenizer(capsys, tmp_path):
  # Rows >= 128 of lm_head zeroed: those logits are 0 and the largest of the 128 random ASCII logits
  # wins, so the greedy output is ASCII (valid text) yet still depends on every weight.
  d = _byte_llama(tmp_path / "llama", lambda w: w[128:].zero_())
  tok = byte_tokenizer()
  text = "Hello, xlazoo! é"
  prompt = tok.encode(text).ids
  assert len(prompt) == len(text.encode())  # one token per byte
  code, out, err = run(capsys, "generate", "--model", d, "--prompt", text, "--max-new-tokens", 12)
  assert code == 0, err
  ids = expected_ids(xlazoo.load(d), prompt, 12)
  assert all(i < 128 for i in ids) and len(set(ids)) > 1
  assert_text(out, tok, ids)
  timing(err, len(prompt), len(ids) - 1)


def test_text_ending_mid_character_is_flushed(capsys, tmp_path):
  def lead_bytes_only(w):  # the logits depend on hidden dim 0 only: 0xE2 if it is > 0, else 0xC3
    w.zero_()
    w[0xE2, 0], w[0xC3, 0] = 1.0, -1.0

  d = _byte_llama(tmp_path / "llama", lead_bytes_only)
  code, out, err = run(capsys, "generate", "--model", d, "--prompt", "ab", "--max-new-tokens", 6)
  assert code == 0, err
  ids = expected_ids(xlazoo.load(d), byte_tokenizer().encode("ab").ids, 6)
  assert len(ids) == 6 and set(ids) <= {0xE2, 0xC3}
  assert_text(out, byte_tokenizer(), ids)  # the held-back partial character is flushed at the end


# ----------------------------------------------------------------------------- convert / export


def test_convert_then_export(capsys, llama_dir, llama, tmp_path):
  zoo, back = tmp_path / "zoo", tmp_path / "back"
  code, out, err = run(capsys, "convert", llama_dir, zoo)
  assert code == 0, err
  assert str(zoo) in out and (zoo / "xlazoo.json").is_file() and (zoo / "params").is_dir()
  tokens = [[1, 2, 3, 4, 5, 6]]
  assert np.array_equal(xlazoo.forward(xlazoo.load(zoo), tokens), xlazoo.forward(llama, tokens))

  code, out, err = run(capsys, "export", zoo, back)
  assert code == 0, err
  assert str(back) in out
  exported, original = load_file(back / "model.safetensors"), load_file(llama_dir / "model.safetensors")
  assert sorted(exported) == sorted(original)
  assert all(np.array_equal(exported[k], original[k]) for k in original)
  assert json.loads((back / "config.json").read_text()) == json.loads((llama_dir / "config.json").read_text())

  # --dtype is honoured
  code, _, err = run(capsys, "convert", llama_dir, tmp_path / "bf16", "--dtype", "bfloat16")
  assert code == 0, err
  assert json.loads((tmp_path / "bf16" / "xlazoo.json").read_text())["dtype"] == "bfloat16"
  for flags, dtype in (([], "bfloat16"), (["--dtype", "float32"], "float32")):
    hf_out = tmp_path / f"hf_{dtype}"
    code, _, err = run(capsys, "export", tmp_path / "bf16", hf_out, *flags)
    assert code == 0, err
    assert json.loads((hf_out / "config.json").read_text())["dtype"] == dtype
    assert str(load_file(hf_out / "model.safetensors")["model.norm.weight"].dtype) == dtype

  # the output must be new: error, non-zero exit, nothing touched
  code, out, err = run(capsys, "convert", llama_dir, back)
  assert code != 0 and "already exists" in err and str(back) in err
  assert sorted(p.name for p in back.iterdir()) == ["config.json", "generation_config.json", "model.safetensors"]
  code, out, err = run(capsys, "export", tmp_path / "missing", tmp_path / "x")
  assert code != 0 and "does not exist" in err and not (tmp_path / "x").exists()
  code, out, err = run(capsys, "convert", tmp_path, tmp_path / "y")  # not a checkpoint
  assert code != 0 and "is not a checkpoint" in err and not (tmp_path / "y").exists()


# ----------------------------------------------------------------------------- help


def _subparsers():
  p = cli.parser()
  (action,) = [a for a in p._actions if a.__class__.__name__ == "_SubParsersAction"]
  return p, action.choices


def test_top_level_help(capsys):
  code, out, _ = run(capsys, "--help")
  assert code == 0
  _, subs = _subparsers()
  assert set(subs) == {"generate", "chat", "convert", "export", "bench"}
  for name in subs:
    assert name in out


@pytest.mark.parametrize("command", ["generate", "chat", "convert", "export", "bench"])
def test_subcommand_help_lists_every_flag(capsys, monkeypatch, command):
  monkeypatch.setenv("COLUMNS", "200")
  code, out, _ = run(capsys, command, "--help")
  assert code == 0
  _, subs = _subparsers()
  actions = subs[command]._actions
  assert len(actions) > 2
  for a in actions:
    for opt in a.option_strings:
      assert re.search(rf"(^|[\s,\[]){re.escape(opt)}\b", out), f"{opt} missing from `{command} --help`"
    if not a.option_strings:
      assert a.dest in out
    if a.help and a.help != "==SUPPRESS==":
      assert a.help.split()[0] in out


def test_module_help_subprocess():
  r = subprocess.run(
      [sys.executable, "-m", "xlazoo.cli", "--help"], cwd=ROOT, capture_output=True, text=True, timeout=120, check=False
  )
  assert r.returncode == 0, r.stderr
  for name in ("generate", "chat", "convert", "export"):
    assert name in r.stdout


# ----------------------------------------------------------------------------- bad arguments


IDS = ["--prompt-ids", "1,2,3"]


@pytest.mark.parametrize(
    "argv, message",
    [
        ([*IDS, "--temperature", "-1"], "temperature must be"),
        ([*IDS, "--top-p", "0"], "top_p must be"),
        ([*IDS, "--top-p", "1.5"], "top_p must be"),
        ([*IDS, "--top-k", "-1"], "top_k must be"),
        ([*IDS, "--min-p", "1"], "min_p must be"),
        ([*IDS, "--max-new-tokens", "0"], "max_new_tokens must be"),
        ([*IDS, "--max-new-tokens", "2046"], "exceeds the model's context"),  # tiny model: 2048 positions
        ([*IDS, "--prompt", "hi"], "exactly one of --prompt"),
        (["--prompt-ids", "1,x,3"], "--prompt-ids must be comma-separated integers"),
        (["--prompt-ids", ","], "prompt 0 is empty"),
        (["--prompt-ids", "1,259"], "outside the vocabulary"),
        (["--prompt-ids", "-4"], "outside the vocabulary"),
        ([*IDS, "--max-new-tokens", "abc"], "invalid int value"),
        ([*IDS, "--model", "/nonexistent/xlazoo-model"], "does not exist"),
    ],
    ids=["temperature", "top_p_0", "top_p_1.5", "top_k", "min_p", "max_new_tokens_0", "context", "both_prompts",
         "bad_ids", "empty_ids", "id_too_big", "id_negative", "not_an_int", "no_such_model"],
)
def test_invalid_generate_arguments(capsys, tiny_dir, argv, message):
  code, out, err = run(capsys, "generate", "--model", tiny_dir, *argv)
  assert code != 0
  assert message in err
  assert "compiled in" not in err and out == ""  # rejected before any compilation


def test_neither_prompt(capsys, tiny_dir):
  code, _, err = run(capsys, "generate", "--model", tiny_dir)
  assert code != 0 and "exactly one of --prompt TEXT or --prompt-ids" in err


@pytest.mark.parametrize("argv", [["frobnicate"], [], ["convert", "only-src"], ["export", "a", "b", "--bogus"]])
def test_argparse_errors(capsys, argv):
  code, _, err = run(capsys, *argv)
  assert code == 2
  assert "usage: xlazoo" in err and "error:" in err
