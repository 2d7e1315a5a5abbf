"""GGUF import: small GGUF files written here with the `gguf` writer load with the values and logits
that transformers' GGUF loader gives (and the original model's, where transformers cannot read the
config); K-quant blocks dequantise as `gguf.quants.dequantize` does; bad files give clear errors."""

import json
from pathlib import Path

import numpy as np
import pytest
import torch
import transformers
from gguf import GGMLQuantizationType as Q
from gguf import GGUFReader, GGUFWriter, quants

import xlazoo
from tests import gguf_files
from tests.parity import hf_logits, hf_model, rel_err
from xlazoo import cli, tokenizer
from xlazoo.checkpoints import gguf
from xlazoo.checkpoints.hf import hf_tensors

V = 259  # the byte vocabulary of gguf_files.write
TOKENS = np.random.default_rng(0).integers(0, V, (2, 12))
QWEN3 = {"head_dim": 128}  # transformers reads no head_dim from a qwen3 GGUF and assumes Qwen3's 128


def transformers_gguf(path) -> torch.nn.Module:
  path = Path(path)
  return transformers.AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name, dtype=torch.float32).eval()


def assert_same_weights(model, ref: torch.nn.Module):
  want = {k: v.detach().numpy() for k, v in ref.state_dict().items()}
  got = hf_tensors(model)
  assert set(got) <= set(want)
  for name, x in got.items():
    np.testing.assert_allclose(x, want[name], rtol=1e-6, atol=1e-7, err_msg=name)


CASES = [("llama", t, {}) for t in (Q.F32, Q.F16, Q.BF16, Q.Q8_0, Q.Q4_0, Q.Q4_1, Q.Q5_0, Q.Q5_1)]
CASES += [("qwen2", t, {}) for t in (Q.F16, Q.Q4_1, Q.Q8_0)]
CASES += [("qwen3", t, QWEN3) for t in (Q.BF16, Q.Q5_0, Q.Q4_0)]
CASES += [("llama", Q.Q8_0, {"tie_word_embeddings": True, "num_key_value_heads": 4})]


@pytest.mark.parametrize("arch, qtype, overrides", CASES, ids=[f"{a}-{t.name}-{i}" for i, (a, t, _) in enumerate(CASES)])
def test_matches_transformers_gguf_loader(tmp_path, arch, qtype, overrides):
  ref = hf_model(arch, vocab_size=V, **overrides)
  f = gguf_files.write(ref, tmp_path / "m.gguf", arch, qtype)
  theirs = transformers_gguf(f)
  model = xlazoo.load(f)
  assert model.dtype == np.float32
  assert model.config.tie_word_embeddings == ref.config.tie_word_embeddings
  assert_same_weights(model, theirs)
  out, want = np.asarray(xlazoo.forward(model, TOKENS)), hf_logits(theirs, TOKENS)
  assert rel_err(out, want) < 1e-4
  if qtype in (Q.F32,):  # unquantised: the original model's logits too
    assert rel_err(out, hf_logits(ref, TOKENS)) < 1e-4


K_SHAPE = {"hidden_size": 256, "intermediate_size": 512, "num_hidden_layers": 1, "num_attention_heads": 4}


@pytest.mark.parametrize("qtype", [Q.Q2_K, Q.Q3_K, Q.Q4_K, Q.Q5_K, Q.Q6_K], ids=lambda t: t.name)
def test_k_quants(tmp_path, qtype):
  """Random K-quant blocks (finite scales): each weight equals gguf.quants.dequantize of its bytes
  (un-permuted for Q/K), transformers' own dequantiser agrees, and so do the logits."""
  ref = hf_model("llama", vocab_size=V, num_key_value_heads=2, **K_SHAPE)
  f = gguf_files.write(ref, tmp_path / "m.gguf", "llama", raw_k=qtype)
  model = xlazoo.load(f)
  ours = hf_tensors(model)
  raw = {t.name: t for t in GGUFReader(f).tensors}
  for hf_name, g_name, heads in [
      ("model.layers.0.mlp.down_proj.weight", "blk.0.ffn_down.weight", None),
      ("model.embed_tokens.weight", "token_embd.weight", None),
      ("model.layers.0.self_attn.k_proj.weight", "blk.0.attn_k.weight", 2),
  ]:
    t = raw[g_name]
    assert t.tensor_type == qtype
    want = quants.dequantize(t.data, qtype)
    if heads:
      want = gguf.unpermute(want, heads)
    np.testing.assert_array_equal(ours[hf_name], want)
  assert all(np.isfinite(x).all() for x in ours.values())
  theirs = transformers_gguf(f)
  assert_same_weights(model, theirs)
  assert rel_err(xlazoo.forward(model, TOKENS), hf_logits(theirs, TOKENS)) < 1e-4


def _llama3_divisors(head_dim: int, theta: float, factor: float) -> np.ndarray:
  """llama.cpp's rope_freqs for Llama 3.1 scaling (low 1, high 4, original context 8192)."""
  inv = 1.0 / theta ** (np.arange(0, head_dim, 2) / head_dim)
  wavelen = 2 * np.pi / inv
  smooth = (8192 / wavelen - 1) / (4 - 1)
  mid = 1 / ((1 - smooth) / factor + smooth)
  return np.where(wavelen < 8192 / 4, 1.0, np.where(wavelen > 8192 / 1, factor, mid))


ROPE_THETA = 5e5
ORIGINAL = [
    # (arch, HF config overrides, extra GGUF metadata, rope_freqs)
    ("llama", {"rope_parameters": {"rope_type": "linear", "rope_theta": 1e4, "factor": 2.0}},
     [("llama.rope.scaling.type", "linear"), ("llama.rope.scaling.factor", 2.0)], None),
    ("llama", {"rope_parameters": {"rope_type": "llama3", "rope_theta": ROPE_THETA, "factor": 8.0, "low_freq_factor": 1.0,
                                   "high_freq_factor": 4.0, "original_max_position_embeddings": 8192},
               "head_dim": 64, "hidden_size": 64, "num_attention_heads": 1, "num_key_value_heads": 1},
     [], _llama3_divisors(64, ROPE_THETA, 8.0)),
    ("qwen2", {"rope_parameters": {"rope_type": "yarn", "rope_theta": 1e4, "factor": 4.0, "original_max_position_embeddings": 4}},
     [("qwen2.rope.scaling.type", "yarn"), ("qwen2.rope.scaling.factor", 4.0), ("qwen2.rope.scaling.original_context_length", 4)],
     None),
    ("qwen3", {"head_dim": 32}, [], None),
    ("llama", {"attention_bias": True}, [], None),
    ("mistral", {"sliding_window": 4}, [("mistral.attention.sliding_window", 4)], None),
]


@pytest.mark.parametrize("arch, overrides, meta, rope_freqs", ORIGINAL,
                         ids=["linear", "llama3_rope_freqs", "yarn", "qwen3_head_dim", "llama_bias", "mistral_window"])
def test_config_fields_match_original_model(tmp_path, arch, overrides, meta, rope_freqs):
  """Config fields that transformers' GGUF reader drops, checked against the original model (F32 file)."""
  ref = hf_model(arch, vocab_size=V, **overrides)
  f = gguf_files.write(ref, tmp_path / "m.gguf", arch, meta=meta, rope_freqs=rope_freqs)
  model = xlazoo.load(f)
  np.testing.assert_array_equal(hf_tensors(model)["model.layers.0.self_attn.q_proj.weight"],
                                ref.model.layers[0].self_attn.q_proj.weight.detach().numpy())
  assert rel_err(xlazoo.forward(model, TOKENS), hf_logits(ref, TOKENS)) < 1e-4


def test_convert_export_roundtrip(tmp_path, capsys):
  """GGUF -> `xlazoo convert` -> `xlazoo export` -> a directory transformers loads: same logits,
  same tokenizer, chat template and stop tokens."""
  ref = hf_model("llama", vocab_size=V)
  f = gguf_files.write(ref, tmp_path / "m.gguf", "llama", Q.Q8_0)
  assert cli.main(["convert", f, str(tmp_path / "zoo")]) == 0
  assert cli.main(["export", str(tmp_path / "zoo"), str(tmp_path / "hf")]) == 0
  capsys.readouterr()
  hf_dir = tmp_path / "hf"
  assert {"config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json", "generation_config.json"} <= {
      p.name for p in hf_dir.iterdir()}
  back = transformers.AutoModelForCausalLM.from_pretrained(hf_dir, dtype=torch.float32).eval()
  want = np.asarray(xlazoo.forward(xlazoo.load(f), TOKENS))
  assert rel_err(hf_logits(back, TOKENS), want) < 1e-6
  assert rel_err(xlazoo.forward(xlazoo.load(tmp_path / "zoo"), TOKENS), want) < 1e-6
  assert json.loads((hf_dir / "generation_config.json").read_text())["eos_token_id"] == V - 2
  text = "Hello, GGUF! ünïcode\n\tend"
  theirs = transformers.AutoTokenizer.from_pretrained(hf_dir)
  ours = tokenizer.load(tmp_path / "zoo")
  assert theirs(text).input_ids == ours.encode(text) == list(text.encode())
  assert theirs.eos_token == "</s>" and theirs.bos_token == "<s>"


# ----------------------------------------------------------------------------- bad files


@pytest.fixture
def good(tmp_path) -> Path:
  return Path(gguf_files.write(hf_model("llama", vocab_size=V), tmp_path / "good.gguf", "llama", Q.Q8_0))


def test_truncated_and_corrupt_files(good, tmp_path):
  data = good.read_bytes()
  end = max(t.data_offset + t.n_bytes for t in GGUFReader(good).tensors)  # the alignment padding follows
  for name, content, message in [
      ("half.gguf", data[: len(data) // 2], "truncated"),
      ("header.gguf", data[:300], "not a readable GGUF file"),
      ("last.gguf", data[: end - 1], "truncated"),
      ("magic.gguf", b"GGUX" + data[4:], "not a readable GGUF file"),
      ("empty.gguf", b"", "not a readable GGUF file"),
  ]:
    f = tmp_path / name
    f.write_bytes(content)
    with pytest.raises(ValueError, match=message):
      xlazoo.load(f)


def test_cli_reports_a_corrupt_file(good, tmp_path, capsys):
  bad = tmp_path / "bad.gguf"
  bad.write_bytes(good.read_bytes()[:1000])
  assert cli.main(["generate", "--model", str(bad), "--prompt", "hi"]) == 2
  assert cli.main(["convert", str(bad), str(tmp_path / "out")]) == 2
  err = capsys.readouterr().err
  assert err.count("error: ") == 2 and "bad.gguf" in err and "truncated" in err
  assert not (tmp_path / "out").exists()


def test_non_finite_values(tmp_path):
  ref = hf_model("llama", vocab_size=V)
  with torch.no_grad():
    ref.model.layers[1].mlp.up_proj.weight[3, 5] = float("nan")
  f = gguf_files.write(ref, tmp_path / "m.gguf", "llama", Q.F16)
  with pytest.raises(ValueError, match="blk.1.ffn_up.weight holds non-finite values"):
    xlazoo.load(f)


@pytest.mark.parametrize(
    "arch, meta, message",
    [
        ("llama", [("llama.expert_count", 4)], "mixture-of-experts"),
        ("llama", [("llama.rope.dimension_count", 8)], "partial rotary"),
        ("llama", [("llama.attention.value_length", 8)], "value_length"),
    ],
)
def test_unsupported_metadata(tmp_path, arch, meta, message):
  f = gguf_files.write(hf_model("llama", vocab_size=V), tmp_path / "m.gguf", arch, meta=meta)
  with pytest.raises(ValueError, match=message):
    xlazoo.load(f)


def test_unsupported_architecture(tmp_path):
  f = gguf_files.write(hf_model("llama", vocab_size=V), tmp_path / "g.gguf", "gemma2")
  with pytest.raises(ValueError, match=r"GGUF architecture 'gemma2' is not supported; xlazoo reads llama, mistral"):
    xlazoo.load(f)


def _rewrite(r: GGUFReader, path: Path, tensors) -> Path:
  """A copy of `r`'s metadata with `tensors` ((name, data, raw type or None), ...)."""
  w = GGUFWriter(str(path), "llama")
  for k, field in r.fields.items():
    if not k.startswith("GGUF.") and k != "general.architecture":
      w.add_key_value(k, field.contents(), field.types[0], field.types[-1] if len(field.types) > 1 else None)
  for name, data, raw in tensors:
    w.add_tensor(name, data, raw_dtype=raw)
  w.write_header_to_file()
  w.write_kv_data_to_file()
  w.write_tensors_to_file()
  w.close()
  return path


def test_unsupported_tensor_type_and_missing_tensors(tmp_path):
  ref = hf_model("llama", vocab_size=V, num_hidden_layers=1)
  r = GGUFReader(gguf_files.write(ref, tmp_path / "m.gguf", "llama"))
  kept = [t for t in r.tensors if t.name != "blk.0.ffn_up.weight"]
  # One weight as IQ4_NL (which xlazoo does not read), one weight left out: the type is named first.
  iq = [(t.name, np.zeros((t.data.shape[0], t.data.shape[1] // 32 * 18), np.uint8), Q.IQ4_NL) if t.name ==
        "blk.0.ffn_gate.weight" else (t.name, np.asarray(t.data), None) for t in kept]
  with pytest.raises(ValueError, match=r"tensor type\(s\) IQ4_NL are not supported \(supported: F32, F16"):
    xlazoo.load(_rewrite(r, tmp_path / "iq.gguf", iq))
  (tmp_path / "iq.gguf").unlink()
  # Only the missing tensor: the same error as for a Hugging Face checkpoint.
  with pytest.raises(ValueError, match=r"missing weights \(1\): model.layers.0.mlp.up_proj.weight"):
    xlazoo.load(_rewrite(r, tmp_path / "miss.gguf", [(t.name, np.asarray(t.data), None) for t in kept]))


def test_llama3_rope_freqs_must_match(tmp_path):
  ref = hf_model("llama", vocab_size=V)
  f = gguf_files.write(ref, tmp_path / "m.gguf", "llama", rope_freqs=np.linspace(1, 3, 8))
  with pytest.raises(ValueError, match="rope_freqs.weight does not match Llama 3 RoPE scaling"):
    xlazoo.load(f)


def test_directory_with_gguf(tmp_path, good):
  d = tmp_path / "dir"
  d.mkdir()
  (d / "model.gguf").write_bytes(good.read_bytes())
  assert np.array_equal(xlazoo.forward(xlazoo.load(d), TOKENS), xlazoo.forward(xlazoo.load(good), TOKENS))
  (d / "other.gguf").write_bytes(good.read_bytes())
  with pytest.raises(ValueError, match="holds 2 GGUF files"):
    xlazoo.load(d)


def test_sentencepiece_tokenizer_is_a_clear_error(tmp_path, capsys):
  ref = hf_model("llama", vocab_size=V)
  f = gguf_files.write(ref, tmp_path / "m.gguf", "llama", meta=[("tokenizer.ggml.model", "llama")])
  with pytest.raises(ValueError, match=r"tokenizer model 'llama' cannot be rebuilt exactly"):
    tokenizer.load(f)
  # The weights still convert; the note says the tokenizer did not.
  assert cli.main(["convert", f, str(tmp_path / "zoo")]) == 0
  assert "the tokenizer was not converted" in capsys.readouterr().err
  assert not (tmp_path / "zoo" / "tokenizer.json").exists()
  assert rel_err(xlazoo.forward(xlazoo.load(tmp_path / "zoo"), TOKENS), hf_logits(ref, TOKENS)) < 1e-4
