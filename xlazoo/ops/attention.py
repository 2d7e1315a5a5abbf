"""Causal multi-head attention with grouped KV heads, sliding window and logit soft-capping.

Dimensions: B batch, T query length, S key length, N query heads, K kv heads, G = N / K query
heads per kv head, H head dim.

This is the pure-jnp reference: einsums and a float32 softmax that XLA fuses. Keys carry their
absolute positions, so the same function serves a full forward (keys = queries) and a step over
a fixed-size cache (keys = every cache slot; slots past a row's position are masked by causality).
"""

import jax
import jax.numpy as jnp


def attention(
    q_BTNH: jax.Array,
    k_BSKH: jax.Array,
    v_BSKH: jax.Array,
    q_pos_BT: jax.Array,
    k_pos_BS: jax.Array,
    *,
    scale: float,
    window: jax.Array | int = 0,
    softcap: float | None = None,
) -> jax.Array:
  """Attention of each query over keys at positions <= its own (and > its own - window if window > 0)."""
  B, T, N, H = q_BTNH.shape
  K = k_BSKH.shape[2]
  q_BTKGH = q_BTNH.reshape(B, T, K, N // K, H)
  s_BKGTS = jnp.einsum("BTKGH,BSKH->BKGTS", q_BTKGH, k_BSKH, preferred_element_type=jnp.float32) * scale
  if softcap is not None:
    s_BKGTS = jnp.tanh(s_BKGTS / softcap) * softcap
  dist_BTS = q_pos_BT[:, :, None] - k_pos_BS[:, None, :]
  visible_BTS = (dist_BTS >= 0) & ((window <= 0) | (dist_BTS < window))
  s_BKGTS = jnp.where(visible_BTS[:, None, None], s_BKGTS, -jnp.inf)
  p_BKGTS = jax.nn.softmax(s_BKGTS, axis=-1)  # float32
  o_BTKGH = jnp.einsum("BKGTS,BSKH->BTKGH", p_BKGTS.astype(v_BSKH.dtype), v_BSKH, preferred_element_type=jnp.float32)
  return o_BTKGH.reshape(B, T, N, H).astype(q_BTNH.dtype)
