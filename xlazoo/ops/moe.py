"""Mixture of experts: a sigmoid top-k router with group-limited choice (DeepSeek-V3, Nemotron-H)
and the routed experts as grouped matmuls (`lax.ragged_dot`) over tokens sorted by expert.

Dimensions: M tokens, D input width, F expert width, X experts, K experts per token.
"""

import jax
import jax.numpy as jnp

from xlazoo.ops.mlp import ACTIVATIONS


def route_sigmoid(x_MD, w_DX, bias_X, *, k: int, n_group: int, topk_group: int, norm: bool, scale: float):
  """(experts [M, K], weights [M, K] float32). Scores are sigmoid(x w); the choice adds `bias_X`
  and keeps the `topk_group` best of `n_group` expert groups (a group scores its top two); the
  weights are the chosen scores without the bias, normalised to sum 1 if `norm`, times `scale`."""
  M, X = x_MD.shape[0], w_DX.shape[1]
  scores_MX = jax.nn.sigmoid(jnp.einsum("MD,DX->MX", x_MD.astype(jnp.float32), w_DX.astype(jnp.float32)))
  choice_MX = scores_MX + bias_X.astype(jnp.float32)
  if topk_group < n_group:
    group_MGX = choice_MX.reshape(M, n_group, X // n_group)
    group_MG = jax.lax.top_k(group_MGX, 2)[0].sum(-1)
    kept_MG = jnp.zeros_like(group_MG, bool).at[jnp.arange(M)[:, None], jax.lax.top_k(group_MG, topk_group)[1]].set(True)
    choice_MX = jnp.where(jnp.repeat(kept_MG, X // n_group, axis=1), choice_MX, -jnp.inf)
  experts_MK = jax.lax.top_k(choice_MX, k)[1]
  weights_MK = jnp.take_along_axis(scores_MX, experts_MK, axis=1)
  if norm:
    weights_MK = weights_MK / (weights_MK.sum(-1, keepdims=True) + 1e-20)
  return experts_MK, weights_MK * scale


def routed_mlp(x_MD, experts_MK, weights_MK, w_up_XDF, w_down_XFD, act: str):
  """sum_k weights[m, k] down_e(act(up_e(x_m))) with e = experts[m, k] (non-gated experts): each
  token is copied once per chosen expert, the copies sorted by expert and run through grouped matmuls."""
  M, K = experts_MK.shape
  X = w_up_XDF.shape[0]
  flat_N = experts_MK.reshape(-1)  # N = M K (token, choice) pairs
  order_N = jnp.argsort(flat_N, stable=True)
  token_N = order_N // K
  sizes_X = jnp.bincount(flat_N, length=X).astype(jnp.int32)
  h_NF = jax.lax.ragged_dot(x_MD[token_N], w_up_XDF, sizes_X, preferred_element_type=jnp.float32)
  h_NF = ACTIVATIONS[act](h_NF).astype(x_MD.dtype)
  y_ND = jax.lax.ragged_dot(h_NF, w_down_XFD, sizes_X, preferred_element_type=jnp.float32)
  y_ND = y_ND * weights_MK.reshape(-1)[order_N][:, None]
  return jnp.zeros((M, x_MD.shape[1]), jnp.float32).at[token_N].add(y_ND).astype(x_MD.dtype)
