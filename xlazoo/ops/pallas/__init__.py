"""Pallas kernels (Mosaic GPU, Mosaic TPU), each beside the pure-jnp reference in xlazoo.ops that it replaces."""

import functools

import jax


def on_hopper() -> bool:
  """Whether the default device is a Hopper GPU (H100/H200): the Mosaic GPU kernels use wgmma, sm_90a only."""
  if jax.default_backend() != "gpu":
    return False
  return str(getattr(jax.devices()[0], "compute_capability", "")).startswith("9.")


def with_reference_grad(kernel, reference):
  """kernel(*arrays, **static), differentiated as reference(*arrays, **static) is: for the kernels that have no
  backward of their own. arrays may hold None (an absent operand); static's values must be hashable."""

  @functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
  def f(static, *arrays):
    return kernel(*arrays, **dict(static))

  def fwd(static, *arrays):
    return f(static, *arrays), arrays

  def bwd(static, arrays, grad):
    return jax.vjp(functools.partial(reference, **dict(static)), *arrays)[1](grad)

  f.defvjp(fwd, bwd)
  return lambda *arrays, **static: f(tuple(sorted(static.items())), *arrays)
