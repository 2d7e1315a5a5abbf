"""Normalisation layers.

Dimensions: D model width (or whatever the last axis is).
"""

import jax
import jax.numpy as jnp

from xlazoo.ops.pallas import gated_norm_gpu, with_reference_grad


def rms_norm(x_TD: jax.Array, w_D: jax.Array, eps: float, offset: float = 0.0) -> jax.Array:
  """RMSNorm over the last axis, computed in float32 and cast back to the input dtype.

  `offset` is 1.0 for Gemma, whose checkpoints store the scale as (w - 1).
  """
  x = x_TD.astype(jnp.float32)
  x = x * jax.lax.rsqrt(jnp.mean(x * x, axis=-1, keepdims=True) + eps)
  return (x * (offset + w_D.astype(jnp.float32))).astype(x_TD.dtype)


def gated_rms_norm(y_XI: jax.Array, zx_XZ: jax.Array, w_I: jax.Array, eps: float, *, groups: int = 1,
                   norm_first: bool = False) -> jax.Array:
  """Mamba-2's gated RMSNorm, in float32 and returned in y's dtype: with g = silu(z), where z is the first I
  columns of zx (in_proj's output, read in place), the RMSNorm (scale w) of each of the G groups of I / G
  channels of y g; with `norm_first`, of y, then times g.

  On a Hopper GPU where `gated_norm_gpu.supported` (a prefill), one Pallas kernel with this jnp form's
  gradient; elsewhere the jnp form.
  """
  lead, I = y_XI.shape[:-1], y_XI.shape[-1]
  y_MI, zx_MZ = y_XI.reshape(-1, I), zx_XZ.reshape(-1, zx_XZ.shape[-1])
  if gated_norm_gpu.supported(y_MI, zx_MZ, w_I, groups):
    return _gated_kernel(y_MI, zx_MZ, w_I, eps=eps, groups=groups, norm_first=norm_first).reshape(*lead, I)
  return gated_rms_norm_reference(y_XI, zx_XZ, w_I, eps, groups=groups, norm_first=norm_first)


def gated_rms_norm_reference(y_XI, zx_XZ, w_I, eps, *, groups=1, norm_first=False):
  """`gated_rms_norm` in jnp."""
  I = y_XI.shape[-1]
  y, g = y_XI.astype(jnp.float32), jax.nn.silu(zx_XZ[..., :I].astype(jnp.float32))
  v_XGJ = (y if norm_first else y * g).reshape(*y.shape[:-1], groups, I // groups)
  v_XGJ = v_XGJ * jax.lax.rsqrt(jnp.mean(v_XGJ * v_XGJ, axis=-1, keepdims=True) + eps)
  v = v_XGJ.reshape(y.shape) * w_I.astype(jnp.float32)
  return (v * g if norm_first else v).astype(y_XI.dtype)


# gated_norm_gpu's entry point looked up at each call (tests wrap it).
_gated_kernel = with_reference_grad(lambda *a, **kw: gated_norm_gpu.gated_rms_norm(*a, **kw), gated_rms_norm_reference)
