"""Causal depthwise 1-D convolution (Mamba's short conv) and its rolling state.

Dimensions: B batch, T sequence, F channels, W kernel width. The state holds the W - 1 inputs
before the current position: y_t = b + sum_k w_k x_{t - (W-1) + k}.
"""

import jax
import jax.numpy as jnp


def causal_conv(x_BTF: jax.Array, w_WF: jax.Array, b_F: jax.Array | None = None, state_BWF: jax.Array | None = None):
  """y [B, T, F] (float32), with `state` [B, W-1, F] as the inputs before x (default zeros)."""
  B, T, F = x_BTF.shape
  W = w_WF.shape[0]
  if state_BWF is None:
    state_BWF = jnp.zeros((B, W - 1, F), x_BTF.dtype)
  xp_BTF = jnp.concatenate([state_BWF.astype(x_BTF.dtype), x_BTF], axis=1).astype(jnp.float32)
  w_WF = w_WF.astype(jnp.float32)
  y_BTF = sum(xp_BTF[:, k : k + T] * w_WF[k] for k in range(W))
  return y_BTF if b_F is None else y_BTF + b_F.astype(jnp.float32)


def conv_state(x_BTF: jax.Array, lengths_B: jax.Array, W: int, state_BWF: jax.Array | None = None) -> jax.Array:
  """The state after each row's first lengths[b] inputs: the W - 1 inputs before position lengths[b]."""
  B, _, F = x_BTF.shape
  if state_BWF is None:
    state_BWF = jnp.zeros((B, W - 1, F), x_BTF.dtype)
  xp_BTF = jnp.concatenate([state_BWF.astype(x_BTF.dtype), x_BTF], axis=1)
  idx_BW = lengths_B[:, None] + jnp.arange(W - 1)  # in xp, input t sits at t + W - 1
  return jnp.take_along_axis(xp_BTF, idx_BW[:, :, None], axis=1)


def conv_step(state_BWF: jax.Array, x_BF: jax.Array, w_WF: jax.Array, b_F: jax.Array | None = None):
  """One step: (y [B, F] float32, the new state [B, W-1, F])."""
  window_BWF = jnp.concatenate([state_BWF, x_BF[:, None].astype(state_BWF.dtype)], axis=1)
  y_BF = jnp.einsum("BWF,WF->BF", window_BWF.astype(jnp.float32), w_WF.astype(jnp.float32))
  if b_F is not None:
    y_BF = y_BF + b_F.astype(jnp.float32)
  return y_BF, window_BWF[:, 1:]
