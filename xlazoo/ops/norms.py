"""Normalisation layers.

Dimensions: D model width (or whatever the last axis is).
"""

import jax
import jax.numpy as jnp


def rms_norm(x_TD: jax.Array, w_D: jax.Array, eps: float, offset: float = 0.0) -> jax.Array:
  """RMSNorm over the last axis, computed in float32 and cast back to the input dtype.

  `offset` is 1.0 for Gemma, whose checkpoints store the scale as (w - 1).
  """
  x = x_TD.astype(jnp.float32)
  x = x * jax.lax.rsqrt(jnp.mean(x * x, axis=-1, keepdims=True) + eps)
  return (x * (offset + w_D.astype(jnp.float32))).astype(x_TD.dtype)
