"""Generation: prefill a fixed-size cache, then decode inside one compiled loop on the device.

Dimensions: B batch, T padded prompt length, N new tokens, V vocab.

Prompts of different lengths are right-padded; row b's token at position p lives in cache slot p,
so a row's own causal mask hides the padding, and each decode step writes one slot per row
(`positions` differ per row). The cache is allocated once inside the compiled prefill and is
donated to each decode call, so XLA updates it in place; no step copies it.
"""

import dataclasses
import functools
import math
from typing import Any, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import struct

from xlazoo.decoding.sampling import Sampler
from xlazoo.models import Model

PROMPT_BUCKET = 16  # prompts are padded to a multiple of this, so nearby lengths share one compile
CACHE_ALIGN = 64  # KV caches hold a multiple of this many slots: the GPU decode kernel reads whole tiles of 64


@struct.dataclass
class State:
  cache: Any
  tokens_BN: jax.Array  # new tokens so far; `pad` past each row's stop
  last_B: jax.Array  # the newest token of each row (input of the next step)
  start_B: jax.Array  # the position (= cache slot) of each row's first new token; last_B goes to start_B + step - 1
  done_B: jax.Array  # the row has produced a stop token
  step: jax.Array  # number of new tokens produced
  key: jax.Array


@dataclasses.dataclass(frozen=True)
class Plan:
  """Everything static about one generate call: it keys the compiled functions."""

  sampler: Sampler
  max_new_tokens: int
  cache_len: int
  stop_ids: tuple[int, ...]
  pad_id: int


def _stopped(tok_B, stop_ids):
  if not stop_ids:
    return jnp.zeros(tok_B.shape, bool)
  return jnp.isin(tok_B, jnp.asarray(stop_ids, jnp.int32))


def prefill(model: Model, prompt_BT: jax.Array, lengths_B: jax.Array, key: jax.Array, plan: Plan) -> State:
  """Runs the prompts through the model, fills the cache and samples the first new token."""
  config, family = model.config, model.family
  B = prompt_BT.shape[0]
  cache = family.init_cache(config, B, plan.cache_len, model.dtype)
  logits_B1V, cache = family.forward(
      config, model.params, prompt_BT, cache=cache, logits_at=lengths_B - 1, lengths=lengths_B
  )
  tok_B = plan.sampler(logits_B1V[:, 0], jax.random.fold_in(key, 0))
  tokens_BN = jnp.full((B, plan.max_new_tokens), plan.pad_id, jnp.int32).at[:, 0].set(tok_B)
  return State(cache, tokens_BN, tok_B, lengths_B, _stopped(tok_B, plan.stop_ids), jnp.int32(1), key)


def _step(model: Model, s: State, plan: Plan) -> State:
  """One decode step: the model on each row's newest token, then sampling; rows that have stopped emit `pad`."""
  logits_B1V, cache = model.family.forward(
      model.config, model.params, s.last_B[:, None], cache=s.cache, positions=(s.start_B + s.step - 1)[:, None]
  )
  tok_B = plan.sampler(logits_B1V[:, 0], jax.random.fold_in(s.key, s.step))
  done_B = s.done_B
  if plan.stop_ids:  # (without them no row ever stops)
    tok_B = jnp.where(done_B, plan.pad_id, tok_B)
    done_B = done_B | _stopped(tok_B, plan.stop_ids)
  tokens_BN = jax.lax.dynamic_update_slice(s.tokens_BN, tok_B[:, None], (0, s.step))
  return State(cache, tokens_BN, tok_B, s.start_B, done_B, s.step + 1, s.key)


def decode(model: Model, state: State, stop_at: jax.Array, plan: Plan) -> State:
  """Decodes until `stop_at` new tokens exist or every row has stopped; one token per loop step."""

  def cond(s: State):
    return (s.step < jnp.minimum(stop_at, plan.max_new_tokens)) & ~jnp.all(s.done_B)

  return jax.lax.while_loop(cond, functools.partial(_step, model, plan=plan), state)


def finish(model: Model, state: State, plan: Plan) -> State:
  """Decodes a state that `prefill` made to the end of the plan, as `generate` does.

  Without stop ids every row makes all max_new_tokens, so the loop runs a static number of steps: XLA runs a loop
  whose trip count it knows without copying its condition to the host after each step, a round trip that costs
  the GPU about 40 us a token. With stop ids, `decode`'s loop ends as soon as every row has stopped.
  """
  if plan.stop_ids:
    return decode(model, state, jnp.int32(plan.max_new_tokens), plan)
  return jax.lax.fori_loop(1, plan.max_new_tokens, lambda _, s: _step(model, s, plan), state)


prefill_jit = jax.jit(prefill, static_argnames="plan")
decode_jit = jax.jit(decode, static_argnames="plan", donate_argnames="state")
finish_jit = jax.jit(finish, static_argnames="plan", donate_argnames="state")


@functools.partial(jax.jit, static_argnames="plan")
def _generate(model, prompt_BT, lengths_B, key, plan: Plan):
  state = prefill(model, prompt_BT, lengths_B, key, plan)
  return finish(model, state, plan).tokens_BN


def check_ids(ids: np.ndarray, vocab_size: int, where: str = "") -> None:
  """Raises if any token id lies outside [0, vocab_size)."""
  bad = ids[(ids < 0) | (ids >= vocab_size)]
  if bad.size:
    raise ValueError(f"{where}token id(s) {bad[:5].tolist()} outside the vocabulary [0, {vocab_size})")


def prepare(
    model: Model,
    prompts: Sequence[Sequence[int]] | np.ndarray | jax.Array,
    *,
    max_new_tokens: int,
    temperature: float = 0.0,
    top_k: int = 0,
    top_p: float = 1.0,
    min_p: float = 0.0,
    stop_ids: Sequence[int] | None = None,
    cache_len: int | None = None,
) -> tuple[np.ndarray, np.ndarray, Plan]:
  """Checks every input on the host and builds the padded prompt array [B, T], lengths [B] and the plan."""
  config = model.config
  if isinstance(prompts, (np.ndarray, jax.Array)):
    arr = np.asarray(prompts)
    if arr.ndim != 2:
      raise ValueError(f"prompts as an array must be 2-D [batch, length], got shape {arr.shape}")
    rows = list(arr)
  else:
    if isinstance(prompts, (str, bytes)) or not hasattr(prompts, "__len__"):
      raise TypeError("prompts must be a list of token-id lists or a 2-D int array (tokenize text first)")
    rows = [np.asarray(list(p)) for p in prompts]
  if not rows:
    raise ValueError("prompts is empty: give at least one prompt")
  for i, r in enumerate(rows):
    if r.ndim != 1 or r.size == 0:
      raise ValueError(f"prompt {i} is empty or not a flat list of token ids")
    if not np.issubdtype(r.dtype, np.integer):
      raise TypeError(f"prompt {i} holds {r.dtype} values; token ids must be integers")
    check_ids(r, config.vocab_size, f"prompt {i} has ")
  if not (isinstance(max_new_tokens, (int, np.integer)) and max_new_tokens >= 1):
    raise ValueError(f"max_new_tokens must be an integer >= 1, got {max_new_tokens!r}")
  sampler = Sampler(temperature, top_k, top_p, min_p)
  longest = max(len(r) for r in rows)
  need = longest + max_new_tokens
  if need > config.max_position_embeddings:
    raise ValueError(
        f"longest prompt ({longest} tokens) + max_new_tokens ({max_new_tokens}) = {need} exceeds the model's context "
        f"(max_position_embeddings = {config.max_position_embeddings})"
    )
  T = math.ceil(longest / PROMPT_BUCKET) * PROMPT_BUCKET
  if cache_len is None:
    cache_len = T + max_new_tokens
  elif need > cache_len:
    raise ValueError(f"longest prompt ({longest}) + max_new_tokens ({max_new_tokens}) = {need} exceeds cache_len {cache_len}")
  cache_len = math.ceil(max(cache_len, T) / CACHE_ALIGN) * CACHE_ALIGN  # the padded prompt is written whole
  stop = tuple(config.eos_token_ids if stop_ids is None else (int(s) for s in stop_ids))
  pad = config.pad_token_id if config.pad_token_id is not None else (stop[0] if stop else 0)
  prompt_BT = np.full((len(rows), T), pad if 0 <= pad < config.vocab_size else 0, np.int32)
  for i, r in enumerate(rows):
    prompt_BT[i, : len(r)] = r
  lengths_B = np.array([len(r) for r in rows], np.int32)
  return prompt_BT, lengths_B, Plan(sampler, int(max_new_tokens), int(cache_len), stop, int(pad))


def generate(model: Model, prompts, *, max_new_tokens: int = 64, seed: int = 0, **kwargs) -> jax.Array:
  """New tokens [B, max_new_tokens] int32; see xlazoo.generate."""
  prompt_BT, lengths_B, plan = prepare(model, prompts, max_new_tokens=max_new_tokens, **kwargs)
  return _generate(model, jnp.asarray(prompt_BT), jnp.asarray(lengths_B), jax.random.key(seed), plan)
