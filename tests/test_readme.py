"""The README's commands and examples run as written."""

import re
import subprocess
import sys
from pathlib import Path

import numpy as np

from tests.parity import hf_model, save

ROOT = Path(__file__).resolve().parent.parent
README = (ROOT / "README.md").read_text()


def _blocks(lang: str) -> list[str]:
  return re.findall(rf"```{lang}\n(.*?)```", README, re.S)


def test_ci_runs_the_readme_test_command():
  test_cmd = next(b.strip() for b in _blocks("sh") if "pytest" in b)
  ci = (ROOT / ".ci" / "run").read_text()
  assert test_cmd in ci.splitlines()


def test_readme_main_command_runs():
  main_cmd = next(b.strip() for b in _blocks("sh") if "xlazoo generate" in b and "venv" in b)
  generate = main_cmd.split("&& ")[-1]  # the part after the install steps
  assert generate.startswith("xlazoo generate")
  exe = Path(sys.executable).parent / "xlazoo"
  cmd = generate.replace("xlazoo", str(exe), 1)
  r = subprocess.run(cmd, shell=True, capture_output=True, text=True, timeout=600)
  assert r.returncode == 0, r.stderr
  assert "Paris" in r.stdout and "tokens/s" in r.stderr


def test_readme_python_example_runs(tmp_path):
  code = next(b for b in _blocks("python") if "xlazoo.generate" in b)
  path = save(hf_model("llama", vocab_size=64), tmp_path / "hf")
  scope = {}
  exec(code.replace("path/to/hf_or_xlazoo_dir", path), scope)
  assert np.asarray(scope["logits"]).shape == (1, 4, 64)
  assert np.asarray(scope["out"]).shape == (2, 64)
