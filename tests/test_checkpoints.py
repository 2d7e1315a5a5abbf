"""Checkpoint I/O: HF <-> xlazoo round trips, the weight formats, atomic writes, bad input and
config.json parsing (transformers 4.x and 5.x layouts)."""

import json
import shutil
from pathlib import Path

import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest
import torch
import transformers
from safetensors.numpy import load_file

import xlazoo
import xlazoo.decoding.generate as gen_mod
from tests.parity import hf_logits, hf_model, rel_err, save
from xlazoo import checkpoints
from xlazoo.checkpoints import files, hf
from xlazoo.models.transformer import Config

TOKENS = np.array([[5, 17, 3, 99, 42, 0, 7, 64, 23, 11, 88, 2], [1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 100, 50]])


def _hf_tensors(model) -> dict[str, np.ndarray]:
  return {k: v.detach().float().numpy() for k, v in model.state_dict().items()}


def _leftovers(parent: Path) -> list[str]:
  return sorted(p.name for p in parent.iterdir() if ".tmp-" in p.name)


def _rewrite_config(d: Path, **changes) -> None:
  cfg = json.loads((d / "config.json").read_text())
  for k, v in changes.items():
    if v is None:
      cfg.pop(k, None)
    else:
      cfg[k] = v
  (d / "config.json").write_text(json.dumps(cfg))


@pytest.fixture(scope="module")
def llama_dir(tmp_path_factory):
  """A small random llama, saved once; tests that modify it work on a copy."""
  model = hf_model("llama")
  return model, Path(save(model, tmp_path_factory.mktemp("llama") / "hf"))


@pytest.fixture
def llama_copy(llama_dir, tmp_path):
  return Path(shutil.copytree(llama_dir[1], tmp_path / "ckpt"))


# ----------------------------------------------------------------------------- 1. round trip


ROUND_TRIP = {
    "llama": dict(attention_bias=True, mlp_bias=True),  # untied, every bias
    "gemma2": dict(head_dim=16, sliding_window=4),  # tied embeddings, sandwich norms
    "olmo2": dict(),  # post-norms only, q/k norm over the whole projection
}


@pytest.mark.parametrize("model_type", list(ROUND_TRIP))
def test_round_trip_hf_xlazoo_hf(model_type, tmp_path):
  ref = hf_model(model_type, **ROUND_TRIP[model_type])
  src = Path(save(ref, tmp_path / "hf"))
  original = load_file(src / "model.safetensors")
  assert ref.config.tie_word_embeddings == (model_type == "gemma2")

  zoo = checkpoints.convert(src, tmp_path / "zoo")
  assert (zoo / "xlazoo.json").is_file() and (zoo / "params").is_dir()
  assert (zoo / "generation_config.json").read_text() == (src / "generation_config.json").read_text()
  back = checkpoints.export(zoo, tmp_path / "back")
  assert sorted(p.name for p in back.iterdir()) == ["config.json", "generation_config.json", "model.safetensors"]

  exported = load_file(back / "model.safetensors")
  assert sorted(exported) == sorted(original)
  state = _hf_tensors(ref)
  for name, x in exported.items():
    assert x.dtype == original[name].dtype, name
    assert np.array_equal(x, original[name]), name
    assert np.array_equal(x, state[name]), name
  assert json.loads((back / "config.json").read_text()) == json.loads((src / "config.json").read_text())

  reloaded = transformers.AutoModelForCausalLM.from_pretrained(str(back), attn_implementation="eager").eval()
  ref_logits = hf_logits(ref, TOKENS)
  assert np.array_equal(hf_logits(reloaded, TOKENS), ref_logits)

  from_hf = np.asarray(xlazoo.forward(xlazoo.load(src), TOKENS))
  from_zoo = np.asarray(xlazoo.forward(xlazoo.load(zoo), TOKENS))
  assert np.array_equal(from_zoo, from_hf)
  assert rel_err(from_hf, ref_logits) < 1e-4


def test_convert_dtype_and_export_of_hf_dir(llama_dir, tmp_path):
  _, src = llama_dir
  zoo = checkpoints.convert(src, tmp_path / "zoo", dtype="bfloat16")
  assert json.loads((zoo / "xlazoo.json").read_text())["dtype"] == "bfloat16"
  model = xlazoo.load(zoo)
  assert model.dtype == jnp.bfloat16
  assert xlazoo.load(zoo, dtype="float32").dtype == jnp.float32
  # export also takes a Hugging Face directory directly
  back = checkpoints.export(src, tmp_path / "back")
  exported, original = load_file(back / "model.safetensors"), load_file(src / "model.safetensors")
  assert sorted(exported) == sorted(original)
  assert all(np.array_equal(exported[k], original[k]) for k in original)


# ----------------------------------------------------------------------------- 2. formats


def test_sharded_safetensors(llama_dir, tmp_path):
  ref, _ = llama_dir
  ref.save_pretrained(str(tmp_path), max_shard_size="20KB")
  index = json.loads((tmp_path / "model.safetensors.index.json").read_text())
  assert len(set(index["weight_map"].values())) > 1
  assert not (tmp_path / "model.safetensors").exists()
  logits = xlazoo.forward(xlazoo.load(tmp_path), TOKENS)
  assert rel_err(logits, hf_logits(ref, TOKENS)) < 1e-4


def _save_bin(model, d: Path, shards: int = 1) -> None:
  """pytorch_model.bin (transformers 5 no longer writes it), or shards + pytorch_model.bin.index.json."""
  model.config.save_pretrained(str(d))
  _rewrite_config(d, dtype=str(next(model.parameters()).dtype).removeprefix("torch."))  # as save_pretrained does
  state = {k: v.detach().clone().contiguous() for k, v in model.state_dict().items()}
  if shards == 1:
    torch.save(state, d / "pytorch_model.bin")
    return
  names, weight_map = list(state), {}
  for s in range(shards):
    f = f"pytorch_model-{s + 1:05d}-of-{shards:05d}.bin"
    part = {n: state[n] for n in names[s::shards]}
    torch.save(part, d / f)
    weight_map |= {n: f for n in part}
  (d / "pytorch_model.bin.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))


@pytest.mark.parametrize("shards", [1, 3])
def test_pytorch_bin(llama_dir, tmp_path, shards):
  ref, _ = llama_dir
  _save_bin(ref, tmp_path, shards)
  assert not list(tmp_path.glob("*.safetensors"))
  logits = xlazoo.forward(xlazoo.load(tmp_path), TOKENS)
  assert rel_err(logits, hf_logits(ref, TOKENS)) < 1e-4


@pytest.mark.parametrize("fmt", ["safetensors", "bin"])
def test_bfloat16_checkpoint(tmp_path, fmt):
  ref = hf_model("gemma2", head_dim=16).to(torch.bfloat16)  # tied: the .bin also holds lm_head.weight
  if fmt == "safetensors":
    save(ref, tmp_path)
  else:
    _save_bin(ref, tmp_path)
  assert json.loads((tmp_path / "config.json").read_text())["dtype"] == "bfloat16"

  model = xlazoo.load(tmp_path)
  assert model.dtype == jnp.bfloat16
  table = np.asarray(model.params["embed"]["table_VD"])
  want = ref.model.embed_tokens.weight.detach().view(torch.int16).numpy().view(ml_dtypes.bfloat16)
  assert np.array_equal(table.view(np.uint16), want.view(np.uint16))

  f32 = xlazoo.load(tmp_path, dtype="float32")
  assert f32.dtype == jnp.float32
  # the float32 load holds exactly the bfloat16 values; its logits match transformers on them in float32
  assert np.array_equal(np.asarray(f32.params["embed"]["table_VD"]), table.astype(np.float32))
  assert rel_err(xlazoo.forward(f32, TOKENS), hf_logits(ref.float(), TOKENS)) < 1e-4


# ----------------------------------------------------------------------------- 3. atomic writes


@pytest.mark.parametrize("exc", [RuntimeError, KeyboardInterrupt])
@pytest.mark.parametrize("step", ["convert", "export"])
def test_crash_leaves_nothing(llama_dir, tmp_path, monkeypatch, exc, step):
  _, src = llama_dir
  out = tmp_path / "out"
  source = src
  if step == "export":
    source = checkpoints.convert(src, tmp_path / "zoo")
  calls = []

  def crash(directory, extra):
    calls.append(extra)
    assert directory.name.startswith(".out.tmp-")  # written into the hidden temp dir, not `out`
    assert not out.exists()
    raise exc("simulated crash")

  monkeypatch.setattr(files, "put", crash)
  with pytest.raises(exc, match="simulated crash"):
    getattr(checkpoints, step)(source, out)
  assert calls, "the crash was never triggered"
  assert not out.exists()
  assert _leftovers(tmp_path) == []

  monkeypatch.undo()  # the name is free: a second attempt succeeds
  getattr(checkpoints, step)(source, out)
  assert out.is_dir() and _leftovers(tmp_path) == []


def test_crash_in_orbax_write(llama_dir, tmp_path, monkeypatch):
  """A failure while the params are being written (before any side file) also leaves nothing."""
  import orbax.checkpoint as ocp

  _, src = llama_dir

  def boom(self, *a, **k):
    raise OSError("disk full (simulated)")

  monkeypatch.setattr(ocp.StandardCheckpointer, "save", boom)
  with pytest.raises(OSError, match="disk full"):
    checkpoints.convert(src, tmp_path / "out")
  assert sorted(p.name for p in tmp_path.iterdir()) == []


def test_output_dir_must_be_new_or_empty(llama_dir, tmp_path):
  _, src = llama_dir
  out = tmp_path / "taken"
  out.mkdir()
  (out / "keep.txt").write_text("mine")
  for step in (checkpoints.convert, checkpoints.export):
    with pytest.raises(FileExistsError, match="already exists") as e:
      step(src, out)
    assert str(out) in str(e.value)
  assert sorted(p.name for p in out.iterdir()) == ["keep.txt"] and (out / "keep.txt").read_text() == "mine"
  assert _leftovers(tmp_path) == []

  a_file = tmp_path / "file"
  a_file.write_text("x")
  with pytest.raises(FileExistsError, match="file"):
    checkpoints.convert(src, a_file)

  empty = tmp_path / "empty"
  empty.mkdir()
  checkpoints.convert(src, empty)  # an existing empty directory is fine
  assert (empty / "xlazoo.json").is_file()
  nested = checkpoints.export(empty, tmp_path / "a" / "b" / "hf")  # missing parents are created
  assert (nested / "model.safetensors").is_file()


# ----------------------------------------------------------------------------- 4. bad input


@pytest.fixture
def no_data_reads(monkeypatch):
  """Header checks must fail before any tensor data is read."""

  def fail(self, name):
    raise AssertionError(f"tensor data of {name} was read before the checkpoint was validated")

  monkeypatch.setattr(hf._Source, "get", fail)


def _edit_weights(d: Path, edit) -> None:
  tensors = dict(load_file(d / "model.safetensors"))
  edit(tensors)
  hf.save_safetensors(tensors, d / "model.safetensors")


def test_missing_weight(llama_copy, no_data_reads):
  name = "model.layers.1.mlp.up_proj.weight"
  _edit_weights(llama_copy, lambda t: t.pop(name))
  with pytest.raises(ValueError, match="missing weights") as e:
    xlazoo.load(llama_copy)
  assert name in str(e.value) and "unexpected" not in str(e.value)


def test_unexpected_weight(llama_copy, no_data_reads):
  name = "model.layers.0.self_attn.extra_proj.weight"
  _edit_weights(llama_copy, lambda t: t.update({name: np.ones((4, 4), np.float32)}))
  with pytest.raises(ValueError, match="unexpected weights") as e:
    xlazoo.load(llama_copy)
  assert name in str(e.value) and "missing" not in str(e.value)


def test_shape_mismatch(llama_copy, no_data_reads):
  name = "model.layers.2.mlp.down_proj.weight"

  def edit(t):
    t[name] = t[name][:, :-1].copy()

  _edit_weights(llama_copy, edit)
  with pytest.raises(ValueError, match="shape mismatch") as e:
    xlazoo.load(llama_copy)
  assert name in str(e.value)
  assert "expected shape (64, 96)" in str(e.value) and "got (64, 95)" in str(e.value)


def test_rewritten_checkpoint_loads(llama_dir, llama_copy):
  """Control for the tests above: rewriting the file unchanged with save_safetensors loads fine."""
  ref, _ = llama_dir
  _edit_weights(llama_copy, lambda t: None)
  assert rel_err(xlazoo.forward(xlazoo.load(llama_copy), TOKENS), hf_logits(ref, TOKENS)) < 1e-4


@pytest.mark.parametrize(
    "changes, words",
    [
        (dict(model_type="bert"), ["model_type", "bert"]),
        (dict(rope_parameters=None, rope_scaling={"rope_type": "dynamic", "factor": 2.0}), ["rope_type", "dynamic"]),
        (dict(rope_parameters={"rope_type": "dynamic", "factor": 2.0, "rope_theta": 1e4}), ["rope_type", "dynamic"]),
        (dict(hidden_act="quick_gelu"), ["hidden_act", "quick_gelu"]),
        (dict(quantization_config={"quant_method": "fp8"}), ["quantization_config", "not supported"]),
        (dict(layer_types=["full_attention"] * 2), ["layer_types", "num_hidden_layers"]),
    ],
    ids=["model_type", "rope_scaling_dynamic", "rope_parameters_dynamic", "hidden_act", "quantized", "layer_types"],
)
def test_unsupported_config(llama_copy, no_data_reads, changes, words):
  _rewrite_config(llama_copy, **changes)
  with pytest.raises(ValueError) as e:
    xlazoo.load(llama_copy)
  for w in words:
    assert w in str(e.value)


def test_broken_config_json(llama_copy):
  (llama_copy / "config.json").write_text("{not json")
  with pytest.raises(ValueError, match="config.json could not be read"):
    xlazoo.load(llama_copy)


def test_not_a_checkpoint(llama_dir, tmp_path):
  empty = tmp_path / "empty"
  empty.mkdir()
  config_only = tmp_path / "config_only"
  config_only.mkdir()
  shutil.copy(llama_dir[1] / "config.json", config_only)
  for d in (empty, config_only):
    with pytest.raises(ValueError, match="is not a checkpoint") as e:
      xlazoo.load(d)
    assert str(d) in str(e.value) and "model.safetensors" in str(e.value)

  missing = tmp_path / "nope"
  with pytest.raises(FileNotFoundError, match="does not exist") as e:
    xlazoo.load(missing)
  assert str(missing) in str(e.value)
  with pytest.raises(FileNotFoundError):
    checkpoints.convert(missing, tmp_path / "out")
  assert not (tmp_path / "out").exists()


@pytest.fixture(scope="module")
def model(llama_dir):
  return xlazoo.load(llama_dir[1])


@pytest.fixture
def no_compile(monkeypatch):
  """Replaces the compiled entry points by recorders: bad input must be rejected before them."""
  calls = []
  monkeypatch.setattr(xlazoo, "_forward", lambda *a, **k: calls.append("forward"))
  monkeypatch.setattr(gen_mod, "_generate", lambda *a, **k: calls.append("generate"))
  return calls


def test_host_checks_reach_compiled_code_when_valid(model, no_compile):
  """Control: valid input does reach the (replaced) compiled functions."""
  xlazoo.forward(model, [[1, 2, 3]])
  xlazoo.generate(model, [[1, 2, 3]], max_new_tokens=4)
  assert no_compile == ["forward", "generate"]


@pytest.mark.parametrize("tokens", [[[1, 2, 101]], [[-1, 2]], [[0, 5000]]])
def test_token_ids_outside_vocab(model, no_compile, tokens):
  with pytest.raises(ValueError, match=r"outside the vocabulary \[0, 101\)"):
    xlazoo.forward(model, tokens)
  with pytest.raises(ValueError, match=r"prompt 0 has token id.*outside the vocabulary \[0, 101\)"):
    xlazoo.generate(model, tokens, max_new_tokens=2)
  with pytest.raises(ValueError, match="prompt 1 has token id"):
    xlazoo.generate(model, [[1, 2]] + tokens, max_new_tokens=2)
  assert no_compile == []


def test_bad_forward_input(model, no_compile):
  with pytest.raises(ValueError, match="2-D integer"):
    xlazoo.forward(model, [1, 2, 3])
  with pytest.raises(ValueError, match="2-D integer"):
    xlazoo.forward(model, [[1.0, 2.0]])
  with pytest.raises(ValueError, match="max_position_embeddings = 256"):
    xlazoo.forward(model, np.ones((1, 257), np.int32))
  assert no_compile == []


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(prompts=[[1] * 250], max_new_tokens=7), r"250 tokens\) \+ max_new_tokens \(7\) = 257 exceeds .*max_position_embeddings = 256"),
        (dict(prompts=[[1] * 5], max_new_tokens=4, cache_len=8), r"\(5\) \+ max_new_tokens \(4\) = 9 exceeds cache_len 8"),
        (dict(temperature=-1.0), "temperature"),
        (dict(temperature=float("nan")), "temperature"),
        (dict(top_p=0.0), "top_p"),
        (dict(top_p=1.5), "top_p"),
        (dict(min_p=1.0), "min_p"),
        (dict(top_k=-1), "top_k"),
        (dict(max_new_tokens=0), "max_new_tokens"),
        (dict(prompts=[]), "prompts is empty"),
        (dict(prompts=[[1, 2], []]), "prompt 1 is empty"),
        (dict(prompts="hello"), "tokenize text first"),
        (dict(prompts=[[1.5, 2.0]]), "token ids must be integers"),
    ],
    ids=["context", "cache_len", "temperature", "temperature_nan", "top_p_0", "top_p_1.5", "min_p_1", "top_k", "max_new_tokens",
         "no_prompts", "empty_prompt", "text_prompt", "float_ids"],
)
def test_bad_generate_input(model, no_compile, kwargs, match):
  kwargs = {"prompts": [[1, 2, 3]], "max_new_tokens": 4, **kwargs}
  with pytest.raises((ValueError, TypeError), match=match):
    xlazoo.generate(model, kwargs.pop("prompts"), **kwargs)
  assert no_compile == []


def test_limits_are_inclusive(model, no_compile):
  """Exactly at the context / cache limit is allowed."""
  xlazoo.generate(model, [[1] * 250], max_new_tokens=6)
  xlazoo.generate(model, [[1] * 5], max_new_tokens=3, cache_len=8)
  assert no_compile == ["generate", "generate"]


# ----------------------------------------------------------------------------- 5. config layouts


def _llama_json(llama_dir) -> dict:
  return json.loads((llama_dir[1] / "config.json").read_text())


LLAMA3 = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 2.0, "high_freq_factor": 8.0,
          "original_max_position_embeddings": 64}


def test_llama_rope_layouts_agree(llama_dir):
  base = _llama_json(llama_dir)
  d5 = {**base, "rope_parameters": {**LLAMA3, "rope_theta": 500000.0}}
  d4 = {**base, "rope_theta": 500000.0, "rope_scaling": dict(LLAMA3)}
  del d4["rope_parameters"]
  c4, c5 = Config.from_hf(d4), Config.from_hf(d5)
  assert c4.ropes == c5.ropes and c4 == c5
  (kind, rope), = c5.ropes
  assert kind == "full_attention"
  assert (rope.rope_type, rope.theta, rope.factor, rope.low_freq_factor, rope.high_freq_factor) == ("llama3", 5e5, 8.0, 2.0, 8.0)
  assert rope.original_max_position_embeddings == 64
  assert c5.ropes != Config.from_hf(base).ropes

  # transformers reads the 4.x layout into the same parameters, and its frequencies match ours
  from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

  t4 = transformers.LlamaConfig(**{k: v for k, v in d4.items() if k != "model_type"})
  assert t4.rope_parameters == d5["rope_parameters"]
  inv, _ = ROPE_INIT_FUNCTIONS["llama3"](t4, "cpu")
  np.testing.assert_allclose(rope.inv_freq(c5.head_dim), inv.numpy(), rtol=1e-6)


def test_yarn_truncate_in_4x_layout(llama_dir):
  base = _llama_json(llama_dir)
  yarn = {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 64, "truncate": False}
  d5 = {**base, "rope_parameters": {**yarn, "rope_theta": 10000.0}}
  d4 = {**base, "rope_theta": 10000.0, "rope_scaling": dict(yarn)}
  del d4["rope_parameters"]
  assert transformers.LlamaConfig(**{k: v for k, v in d4.items() if k != "model_type"}).rope_parameters["truncate"] is False
  assert dict(Config.from_hf(d5).ropes)["full_attention"].truncate is False
  assert Config.from_hf(d4).ropes == Config.from_hf(d5).ropes


def test_gemma3_4x_layout(tmp_path):
  types = ["sliding_attention", "full_attention", "sliding_attention"]
  ref = hf_model(
      "gemma3_text", head_dim=16, sliding_window=4, layer_types=types,
      rope_parameters={"full_attention": {"rope_type": "linear", "factor": 8.0, "rope_theta": 50000.0},
                       "sliding_attention": {"rope_type": "default", "rope_theta": 500.0}},
  )
  d5_dir = Path(save(ref, tmp_path / "v5"))
  d4_dir = Path(shutil.copytree(d5_dir, tmp_path / "v4"))
  _rewrite_config(
      d4_dir, layer_types=None, rope_parameters=None, _sliding_window_pattern=None, sliding_window_pattern=2,
      rope_theta=50000.0, rope_local_base_freq=500.0, rope_scaling={"rope_type": "linear", "factor": 8.0},
  )
  d4 = json.loads((d4_dir / "config.json").read_text())
  assert "rope_parameters" not in d4 and "layer_types" not in d4

  c4, c5 = Config.from_hf(d4), Config.from_hf(json.loads((d5_dir / "config.json").read_text()))
  assert c4 == c5
  assert c4.layer_types == tuple(types)
  full, local = dict(c4.ropes)["full_attention"], dict(c4.ropes)["sliding_attention"]
  assert (full.rope_type, full.factor, full.theta) == ("linear", 8.0, 50000.0)
  assert (local.rope_type, local.factor, local.theta) == ("default", 1.0, 500.0)

  ref_logits = hf_logits(ref, TOKENS)
  t4 = transformers.AutoModelForCausalLM.from_pretrained(str(d4_dir), attn_implementation="eager").eval()
  np.testing.assert_allclose(hf_logits(t4, TOKENS), ref_logits, rtol=0, atol=1e-6)  # transformers agrees
  assert rel_err(xlazoo.forward(xlazoo.load(d4_dir), TOKENS), ref_logits) < 1e-4


def test_progress_bar_on_large_loads(llama_dir, capsys, monkeypatch):
  from xlazoo.checkpoints import hf

  _, llama_dir = llama_dir
  hf.load_hf(llama_dir, progress=False)
  assert "loading" not in capsys.readouterr().err
  monkeypatch.setattr(hf, "PROGRESS_BYTES", 0)  # every checkpoint counts as large
  hf.load_hf(llama_dir)
  assert "loading hf" in capsys.readouterr().err
