"""Causal multi-head attention with grouped KV heads, sliding window and logit soft-capping.

Dimensions: B batch, T query length, S key length, N query heads, K kv heads, G = N / K query
heads per kv head, H head dim.

`attention` is the pure-jnp reference: einsums and a float32 softmax that XLA fuses. Keys carry
their absolute positions, so it serves any query/key layout. The two hot cases have their own
entry points, which dispatch on backend and shape to a Pallas kernel (ops/pallas: Mosaic GPU on
Hopper, Mosaic TPU on TPU) or cuDNN, with the reference as the fallback:
- `causal_attention`: the tokens at positions 0..T-1 attending to each other (a forward, a prefill);
- `decode_attention`: one new token per row over a fixed-size cache, row b's keys at slots < lengths[b].
"""

import functools

import jax
import jax.numpy as jnp

from xlazoo.ops.pallas import attention_gpu, attention_tpu, decode_gpu

QUERY_BLOCK = 1024  # the reference's query block on long sequences (causal_attention)


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


def _cudnn_ok(q_BTNH: jax.Array, window, softcap) -> bool:
  """cuDNN's fused attention (through jax.nn.dot_product_attention) computes the same function."""
  return (
      jax.default_backend() == "gpu" and q_BTNH.dtype in (jnp.bfloat16, jnp.float16) and softcap is None
      and isinstance(window, int) and q_BTNH.shape[-1] % 8 == 0 and q_BTNH.shape[-1] <= 128
  )


def causal_attention(q_BTNH, k_BTKH, v_BTKH, *, scale: float, window: jax.Array | int = 0, softcap: float | None = None):
  """Attention among the tokens at positions 0..T-1 (queries, keys and values of the same tokens)."""
  if attention_tpu.supported(q_BTNH, k_BTKH, window=window, softcap=softcap):
    return attention_tpu.flash_attention(q_BTNH, k_BTKH, v_BTKH, scale=scale, window=window, softcap=softcap)
  flash = attention_gpu.supported(q_BTNH, k_BTKH, window=window, softcap=softcap)
  cudnn = _cudnn_ok(q_BTNH, window, softcap)
  if flash and cudnn:
    return _flash_cudnn_grad(q_BTNH, k_BTKH, v_BTKH, scale, window)
  if flash:
    return attention_gpu.flash_attention(q_BTNH, k_BTKH, v_BTKH, scale=scale, window=window, softcap=softcap)
  if cudnn:
    return _cudnn(q_BTNH, k_BTKH, v_BTKH, scale, window)
  return causal_reference(q_BTNH, k_BTKH, v_BTKH, scale=scale, window=window, softcap=softcap)


def _cudnn(q_BTNH, k_BTKH, v_BTKH, scale, window):
  local = (window - 1, 0) if window > 0 else None
  return jax.nn.dot_product_attention(
      q_BTNH, k_BTKH, v_BTKH, scale=scale, is_causal=True, local_window_size=local, implementation="cudnn"
  )


@functools.partial(jax.custom_vjp, nondiff_argnums=(3, 4))
def _flash_cudnn_grad(q_BTNH, k_BTKH, v_BTKH, scale, window):
  """The Mosaic flash kernel; under differentiation, cuDNN's forward and backward instead. On an H100 at
  8192 tokens (benchmarks/RESULTS.md) the kernel's forward is the faster one, cuDNN's backward."""
  return attention_gpu.flash_attention(q_BTNH, k_BTKH, v_BTKH, scale=scale, window=window)


def _flash_cudnn_grad_fwd(q_BTNH, k_BTKH, v_BTKH, scale, window):
  return jax.vjp(lambda q, k, v: _cudnn(q, k, v, scale, window), q_BTNH, k_BTKH, v_BTKH)


def _flash_cudnn_grad_bwd(scale, window, vjp, do_BTNH):
  return vjp(do_BTNH)


_flash_cudnn_grad.defvjp(_flash_cudnn_grad_fwd, _flash_cudnn_grad_bwd)


def causal_reference(q_BTNH, k_BTKH, v_BTKH, *, scale: float, window: jax.Array | int = 0, softcap: float | None = None):
  """`causal_attention` in plain jnp (`attention`), one query block at a time on long sequences."""
  B, T, N, H = q_BTNH.shape
  pos_BT = jnp.broadcast_to(jnp.arange(T, dtype=jnp.int32), (B, T))
  kw = dict(scale=scale, window=window, softcap=softcap)
  if T <= 2 * QUERY_BLOCK:
    return attention(q_BTNH, k_BTKH, v_BTKH, pos_BT, pos_BT, **kw)
  # Long sequences: query blocks in turn, so the scores in memory are [.., QUERY_BLOCK, T], not [.., T, T];
  # the backward recomputes each block's scores rather than keeping them all.
  C = -(-T // QUERY_BLOCK)
  q_CBQNH = jnp.pad(q_BTNH, ((0, 0), (0, C * QUERY_BLOCK - T), (0, 0), (0, 0))).reshape(B, C, QUERY_BLOCK, N, H).swapaxes(0, 1)
  pos_CBQ = jnp.broadcast_to(jnp.arange(C * QUERY_BLOCK, dtype=jnp.int32).reshape(C, 1, QUERY_BLOCK), (C, B, QUERY_BLOCK))
  block = jax.checkpoint(lambda a: attention(a[0], k_BTKH, v_BTKH, a[1], pos_BT, **kw))
  o_CBQNH = jax.lax.map(block, (q_CBQNH, pos_CBQ))
  return o_CBQNH.swapaxes(0, 1).reshape(B, C * QUERY_BLOCK, N, H)[:, :T]


def decode_attention(q_BNH, k, v, lengths_B, *, scale: float, window: jax.Array | int = 0, softcap: float | None = None, layer=None):
  """One query per row, at position lengths[b] - 1, over the cache slots [0, lengths[b]) of its row.

  k and v are [B, S, K, H], or a stacked cache [L, B, S, K, H] with `layer` naming the layer: the
  kernel then reads that layer in place (slicing it out first would copy it each step).
  """
  if decode_gpu.supported(q_BNH, k, window=window, softcap=softcap):
    return decode_gpu.decode_attention(q_BNH, k, v, lengths_B, scale=scale, window=window, softcap=softcap, layer=layer)
  k_BSKH, v_BSKH = (k, v) if layer is None else (k[layer], v[layer])
  if attention_tpu.supported(q_BNH, k_BSKH, window=window, softcap=softcap):
    return attention_tpu.decode_attention(q_BNH, k_BSKH, v_BSKH, lengths_B, scale=scale, window=window, softcap=softcap)
  S = k_BSKH.shape[1]
  k_pos_BS = jnp.broadcast_to(jnp.arange(S, dtype=jnp.int32), (q_BNH.shape[0], S))
  o_B1NH = attention(q_BNH[:, None], k_BSKH, v_BSKH, (lengths_B - 1)[:, None], k_pos_BS, scale=scale, window=window, softcap=softcap)
  return o_B1NH[:, 0]
