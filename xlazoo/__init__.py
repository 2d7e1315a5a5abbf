"""xlazoo: a compiler-first model zoo for JAX/XLA.

    import xlazoo
    model = xlazoo.load("path/to/checkpoint")          # HF dir (config.json + weights) or an xlazoo dir
    logits = xlazoo.forward(model, tokens)             # [B, T] int32 -> [B, T, V] float32
    out = xlazoo.generate(model, prompts, max_new_tokens=64, temperature=0.0, seed=0)  # -> [B, 64] int32
"""

import os

import jax
import numpy as np

from xlazoo.decoding.generate import check_ids
from xlazoo.models import MODEL_TYPES, Model

__version__ = "0.1.0"
__all__ = ["MODEL_TYPES", "Model", "forward", "generate", "load"]


def load(path: str | os.PathLike, dtype=None) -> Model:
  """Loads a model from a local directory.

  Args:
    path: a Hugging Face checkpoint directory (config.json and model.safetensors, a sharded
      model.safetensors.index.json, or pytorch_model.bin) or an xlazoo directory written by
      `xlazoo convert` (Orbax).
    dtype: parameter dtype (e.g. jnp.bfloat16); default: the checkpoint's own.

  Raises a ValueError naming the problem (missing, unexpected or misshapen weights, unknown
  model_type, unsupported config value, not a checkpoint) before any compiled work starts.
  """
  from xlazoo.checkpoints import load as _load

  return _load(path, dtype)


@jax.jit
def _forward(model: Model, tokens_BT: jax.Array) -> jax.Array:
  return model.family.forward(model.config, model.params, tokens_BT)[0]


def forward(model: Model, tokens) -> jax.Array:
  """Logits [B, T, V] float32 for token ids [B, T] (no cache; positions 0..T-1)."""
  arr = np.asarray(tokens)
  if arr.ndim != 2 or not np.issubdtype(arr.dtype, np.integer):
    raise ValueError(f"tokens must be a 2-D integer array [batch, length], got {arr.dtype} of shape {arr.shape}")
  check_ids(arr, model.config.vocab_size)
  if arr.shape[1] > model.config.max_position_embeddings:
    raise ValueError(
        f"sequence length {arr.shape[1]} exceeds the model's context (max_position_embeddings = "
        f"{model.config.max_position_embeddings})"
    )
  return _forward(model, jax.numpy.asarray(arr, jax.numpy.int32))


def generate(
    model: Model,
    prompts,
    *,
    max_new_tokens: int = 64,
    temperature: float = 0.0,
    top_k: int = 0,
    top_p: float = 1.0,
    min_p: float = 0.0,
    seed: int = 0,
    stop_ids=None,
    cache_len: int | None = None,
) -> jax.Array:
  """Generates `max_new_tokens` new tokens for each prompt; the whole loop runs compiled on the device.

  Args:
    prompts: a list of token-id lists (lengths may differ) or a 2-D int array [B, T].
    max_new_tokens: number of new tokens per row.
    temperature: 0 for greedy decoding, else softmax temperature.
    top_k: keep the k most likely tokens (0 = off). top_k=1 is greedy.
    top_p: keep the smallest set of most likely tokens with total probability >= top_p (1 = off).
    min_p: drop tokens less likely than min_p times the most likely one (0 = off).
    seed: random seed; the same seed gives the same tokens.
    stop_ids: token ids that end a row (default: the checkpoint's eos_token_id); after its stop
      token a row is filled with the pad id (pad_token_id, else the first stop id).
    cache_len: KV cache slots (default: padded prompt length + max_new_tokens), rounded up to a multiple of 64.

  Returns:
    int32 array [B, max_new_tokens].
  """
  from xlazoo.decoding.generate import generate as _generate

  return _generate(
      model, prompts, max_new_tokens=max_new_tokens, temperature=temperature, top_k=top_k, top_p=top_p, min_p=min_p,
      seed=seed, stop_ids=stop_ids, cache_len=cache_len,
  )
