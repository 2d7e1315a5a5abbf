"""Causal depthwise 1-D convolution (Mamba's short conv) and its rolling state.

Dimensions: B batch, T sequence, F channels, W kernel width. The state holds the W - 1 inputs
before the current position: y_t = b + sum_k w_k x_{t - (W-1) + k}.
"""

import jax
import jax.numpy as jnp

from xlazoo.ops.pallas import conv_gpu, with_reference_grad


def causal_conv(x_BTF: jax.Array, w_WF: jax.Array, b_F: jax.Array | None = None, state_BWF: jax.Array | None = None):
  """y [B, T, F] (float32), with `state` [B, W-1, F] as the inputs before x (default zeros).

  x's taps and the state's are two sums of zero-padded shifts, not one sum over [state, x]: XLA fuses the
  pads into the products, where it wrote the concatenation to memory (0.21 ms a layer of a Mamba-2 2.7B
  prefill of 8192 tokens on an H100).
  """
  B, T, F = x_BTF.shape
  W = w_WF.shape[0]
  w_WF = w_WF.astype(jnp.float32)
  xp_BTF = jnp.pad(x_BTF.astype(jnp.float32), ((0, 0), (W - 1, 0), (0, 0)))
  y_BTF = sum(xp_BTF[:, k : k + T] * w_WF[k] for k in range(W))
  if state_BWF is not None:  # the state's part of the first W - 1 outputs
    sp_BWF = jnp.pad(state_BWF.astype(x_BTF.dtype).astype(jnp.float32), ((0, 0), (0, W - 1), (0, 0)))
    head_BWF = sum(sp_BWF[:, k : k + W - 1] * w_WF[k] for k in range(W))
    y_BTF = y_BTF + (head_BWF[:, :T] if T < W - 1 else jnp.pad(head_BWF, ((0, 0), (0, T - W + 1), (0, 0))))
  return y_BTF if b_F is None else y_BTF + b_F.astype(jnp.float32)


def causal_conv_silu(xz_BTZ: jax.Array, w_WF: jax.Array, b_F: jax.Array | None = None, state_BWF: jax.Array | None = None,
                     *, start: int, channels: tuple[int, int]) -> jax.Array:
  """silu(causal_conv) of the conv's channels [c0, c1), rounded to xz's dtype, where the conv's F = w.shape[1]
  inputs are xz's columns start .. start + F (in_proj's output, read in place: no slice of it is made).

  On a Hopper GPU where `conv_gpu.supported` (a prefill), one Pallas kernel with this jnp form's gradient;
  elsewhere the jnp form.
  """
  if conv_gpu.supported(xz_BTZ, w_WF, channels, state_BWF):
    return _conv_kernel(xz_BTZ, w_WF, b_F, state_BWF, start=start, channels=channels)
  return causal_conv_silu_reference(xz_BTZ, w_WF, b_F, state_BWF, start=start, channels=channels)


def causal_conv_silu_reference(xz_BTZ, w_WF, b_F=None, state_BWF=None, *, start, channels):
  """`causal_conv_silu` in jnp."""
  c0, c1 = channels
  y_BTC = causal_conv(xz_BTZ[..., start + c0 : start + c1], w_WF[:, c0:c1], None if b_F is None else b_F[c0:c1],
                      None if state_BWF is None else state_BWF[..., c0:c1])
  return jax.nn.silu(y_BTC).astype(xz_BTZ.dtype)


# conv_gpu's entry point looked up at each call (tests wrap it).
_conv_kernel = with_reference_grad(lambda *a, **kw: conv_gpu.causal_conv_silu(*a, **kw), causal_conv_silu_reference)


def conv_state(x_BTF: jax.Array, lengths_B: jax.Array, W: int, state_BWF: jax.Array | None = None) -> jax.Array:
  """The state after each row's first lengths[b] inputs: the W - 1 inputs before position lengths[b]."""
  B, _, F = x_BTF.shape
  if state_BWF is None:
    state_BWF = jnp.zeros((B, W - 1, F), x_BTF.dtype)
  idx_BW = lengths_B[:, None] + jnp.arange(W - 1)  # in [state, x], input t sits at t + W - 1
  from_x = jnp.take_along_axis(x_BTF, jnp.maximum(idx_BW - (W - 1), 0)[:, :, None], axis=1)
  from_state = jnp.take_along_axis(state_BWF.astype(x_BTF.dtype), jnp.minimum(idx_BW, W - 2)[:, :, None], axis=1)
  return jnp.where((idx_BW >= W - 1)[:, :, None], from_x, from_state)


def conv_step(state_BWF: jax.Array, x_BF: jax.Array, w_WF: jax.Array, b_F: jax.Array | None = None):
  """One step: (y [B, F] float32, the new state [B, W-1, F])."""
  window_BWF = jnp.concatenate([state_BWF, x_BF[:, None].astype(state_BWF.dtype)], axis=1)
  y_BF = jnp.einsum("BWF,WF->BF", window_BWF.astype(jnp.float32), w_WF.astype(jnp.float32))
  if b_F is not None:
    y_BF = y_BF + b_F.astype(jnp.float32)
  return y_BF, window_BWF[:, 1:]
