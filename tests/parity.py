"""Helpers shared by the parity tests: build a random Hugging Face checkpoint, compare logits."""

import numpy as np
import torch
import transformers

# model_type -> the transformers Config class name
CONFIGS = {
    "llama": "LlamaConfig", "mistral": "MistralConfig", "qwen2": "Qwen2Config", "qwen3": "Qwen3Config",
    "gemma2": "Gemma2Config", "gemma3_text": "Gemma3TextConfig", "olmo2": "Olmo2Config", "olmo3": "Olmo3Config",
}
SMALL = dict(
    vocab_size=101, hidden_size=64, intermediate_size=96, num_hidden_layers=3, num_attention_heads=4,
    num_key_value_heads=2, max_position_embeddings=256,
)


def hf_model(model_type: str, seed: int = 0, noise: float = 0.1, **overrides):
  """A random transformers model (eager attention, float32) with every parameter perturbed away
  from its init value (norm weights start at 1 or 0, biases at 0), so a wrongly mapped tensor shows."""
  torch.manual_seed(seed)
  cfg = getattr(transformers, CONFIGS[model_type])(**{**SMALL, **overrides})
  cfg._attn_implementation = "eager"
  model = transformers.AutoModelForCausalLM.from_config(cfg, attn_implementation="eager").eval()
  with torch.no_grad():
    for p in model.parameters():
      p.add_(torch.randn_like(p) * noise)
  return model


def save(model, path) -> str:
  model.save_pretrained(str(path))
  return str(path)


def hf_logits(model, tokens) -> np.ndarray:
  with torch.no_grad():
    return model(torch.as_tensor(np.asarray(tokens), dtype=torch.long)).logits.float().numpy()


def rel_err(out, ref) -> float:
  out, ref = np.asarray(out, np.float64), np.asarray(ref, np.float64)
  return float(np.abs(out - ref).max() / np.abs(ref).max())


def hf_greedy(model, prompt: list[int], n: int) -> np.ndarray:
  """transformers' greedy continuation of one prompt, exactly n tokens (no EOS stop)."""
  ids = torch.tensor([prompt])
  with torch.no_grad():  # an explicit mask: else generate takes prompt tokens equal to pad_token_id for padding
    out = model.generate(
        ids, attention_mask=torch.ones_like(ids), max_new_tokens=n, min_new_tokens=n, do_sample=False, eos_token_id=None,
        pad_token_id=0,
    )
  return out[0, len(prompt) :].numpy()
