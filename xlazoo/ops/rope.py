"""Rotary position embeddings (RoPE) and the frequency schedules of the scaled variants.

Dimensions: B batch, T sequence, N heads, H head dim.

The frequencies are computed on the host in float64 from the config (they are constants of the
model), then applied on the device in float32.
"""

import dataclasses
import math

import jax
import jax.numpy as jnp
import numpy as np

ROPE_TYPES = ("default", "linear", "llama3", "yarn")


@dataclasses.dataclass(frozen=True)
class Rope:
  """One RoPE schedule. Fields follow the Hugging Face `rope_parameters` names."""

  theta: float = 10000.0
  rope_type: str = "default"
  factor: float = 1.0
  low_freq_factor: float = 1.0  # llama3
  high_freq_factor: float = 4.0  # llama3
  original_max_position_embeddings: int = 8192  # llama3, yarn
  attention_factor: float | None = None  # yarn
  beta_fast: float = 32.0  # yarn
  beta_slow: float = 1.0  # yarn
  truncate: bool = True  # yarn

  def inv_freq(self, head_dim: int) -> np.ndarray:
    """Inverse frequencies [H/2] as float32."""
    inv = 1.0 / self.theta ** (np.arange(0, head_dim, 2, dtype=np.float64) / head_dim)
    if self.rope_type == "linear":
      inv = inv / self.factor
    elif self.rope_type == "llama3":
      inv = _llama3(inv, self)
    elif self.rope_type == "yarn":
      inv = _yarn(inv, head_dim, self)
    return inv.astype(np.float32)

  def scale(self) -> float:
    """Multiplier on cos/sin (YaRN's attention temperature; 1 for the others)."""
    if self.rope_type != "yarn":
      return 1.0
    if self.attention_factor is not None:
      return float(self.attention_factor)
    return 0.1 * math.log(self.factor) + 1.0 if self.factor > 1 else 1.0


def _llama3(inv: np.ndarray, r: Rope) -> np.ndarray:
  # Llama 3.1: keep high frequencies, divide low ones by `factor`, blend in between.
  old = r.original_max_position_embeddings
  wavelen = 2 * math.pi / inv
  low_wavelen, high_wavelen = old / r.low_freq_factor, old / r.high_freq_factor
  scaled = np.where(wavelen > low_wavelen, inv / r.factor, inv)
  smooth = (old / wavelen - r.low_freq_factor) / (r.high_freq_factor - r.low_freq_factor)
  blended = (1 - smooth) * scaled / r.factor + smooth * scaled
  medium = (wavelen >= high_wavelen) & (wavelen <= low_wavelen)
  return np.where(medium, blended, scaled)


def _yarn(inv: np.ndarray, dim: int, r: Rope) -> np.ndarray:
  # YaRN (Peng et al. 2023, eq. 23): interpolate low frequencies, extrapolate high ones.
  def correction_dim(rotations):
    return dim * math.log(r.original_max_position_embeddings / (rotations * 2 * math.pi)) / (2 * math.log(r.theta))

  low, high = correction_dim(r.beta_fast), correction_dim(r.beta_slow)
  if r.truncate:
    low, high = math.floor(low), math.ceil(high)
  low, high = max(low, 0), min(high, dim - 1)
  if low == high:
    high += 0.001
  ramp = np.clip((np.arange(dim // 2, dtype=np.float64) - low) / (high - low), 0, 1)
  extrapolation = 1 - ramp
  # float32 ramp, as the reference computes it, so the blend matches to the last bit.
  extrapolation = extrapolation.astype(np.float32).astype(np.float64)
  return inv / r.factor * (1 - extrapolation) + inv * extrapolation


def apply_rope(x_BTNH: jax.Array, pos_BT: jax.Array, inv_freq_H: jax.Array, scale: jax.Array) -> jax.Array:
  """Rotates pairs (i, i + H/2) of each head by position * frequency (the "rotate half" layout)."""
  angle_BTH = pos_BT[..., None].astype(jnp.float32) * inv_freq_H.astype(jnp.float32)
  angle_BTH = jnp.concatenate([angle_BTH, angle_BTH], axis=-1)
  cos_BT1H = (jnp.cos(angle_BTH) * scale)[:, :, None, :]
  sin_BT1H = (jnp.sin(angle_BTH) * scale)[:, :, None, :]
  x = x_BTNH.astype(jnp.float32)
  half = x.shape[-1] // 2
  rotated = jnp.concatenate([-x[..., half:], x[..., :half]], axis=-1)
  return (x * cos_BT1H + rotated * sin_BT1H).astype(x_BTNH.dtype)
