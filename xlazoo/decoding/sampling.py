"""Token samplers: greedy, temperature, top-k, top-p (nucleus) and min-p.

Dimensions: B batch, V vocab.

The filters apply in the order transformers applies them (temperature, top-k, top-p, min-p), so a
seeded run samples from the same distribution as the reference.
"""

import dataclasses
import math

import jax
import jax.numpy as jnp


@dataclasses.dataclass(frozen=True)
class Sampler:
  temperature: float = 0.0  # 0 = greedy
  top_k: int = 0  # 0 = off
  top_p: float = 1.0  # 1 = off
  min_p: float = 0.0  # 0 = off

  def __post_init__(self):
    t, k, p, m = self.temperature, self.top_k, self.top_p, self.min_p
    if not (isinstance(t, (int, float)) and math.isfinite(t) and t >= 0):
      raise ValueError(f"temperature must be a finite number >= 0 (0 = greedy), got {t!r}")
    if not (isinstance(k, int) and k >= 0):
      raise ValueError(f"top_k must be an integer >= 0 (0 = off), got {k!r}")
    if not (isinstance(p, (int, float)) and 0 < p <= 1):
      raise ValueError(f"top_p must be in (0, 1] (1 = off), got {p!r}")
    if not (isinstance(m, (int, float)) and 0 <= m < 1):
      raise ValueError(f"min_p must be in [0, 1) (0 = off), got {m!r}")

  @property
  def greedy(self) -> bool:
    return self.temperature == 0 or self.top_k == 1

  def filter(self, logits_BV: jax.Array) -> jax.Array:
    """Logits with the filtered-out tokens at -inf (float32)."""
    x = logits_BV.astype(jnp.float32) / self.temperature
    if self.top_k > 0 and self.top_k < x.shape[-1]:
      kth_B1 = jax.lax.top_k(x, self.top_k)[0][:, -1:]
      x = jnp.where(x < kth_B1, -jnp.inf, x)
    if self.top_p < 1:
      # Keep the smallest set of most likely tokens whose probability reaches top_p.
      sorted_BV = jnp.sort(x, axis=-1)[:, ::-1]
      p_BV = jax.nn.softmax(sorted_BV, axis=-1)
      before_BV = jnp.cumsum(p_BV, axis=-1) - p_BV  # mass strictly above each token
      keep = before_BV < self.top_p
      cutoff_B1 = jnp.min(jnp.where(keep, sorted_BV, jnp.inf), axis=-1, keepdims=True)
      x = jnp.where(x < cutoff_B1, -jnp.inf, x)
    if self.min_p > 0:
      p_BV = jax.nn.softmax(x, axis=-1)
      x = jnp.where(p_BV < self.min_p * jnp.max(p_BV, axis=-1, keepdims=True), -jnp.inf, x)
    return x

  def __call__(self, logits_BV: jax.Array, key: jax.Array) -> jax.Array:
    """One token id per row, int32 [B]."""
    if self.greedy:
      return jnp.argmax(logits_BV, axis=-1).astype(jnp.int32)
    return jax.random.categorical(key, self.filter(logits_BV), axis=-1).astype(jnp.int32)
