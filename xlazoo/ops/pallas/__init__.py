"""Pallas kernels (Mosaic GPU, Mosaic TPU), each beside the pure-jnp reference in xlazoo.ops that it replaces."""

import jax


def on_hopper() -> bool:
  """Whether the default device is a Hopper GPU (H100/H200): the Mosaic GPU kernels use wgmma, sm_90a only."""
  if jax.default_backend() != "gpu":
    return False
  return str(getattr(jax.devices()[0], "compute_capability", "")).startswith("9.")
