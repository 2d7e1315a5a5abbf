"""Pallas kernels (Mosaic GPU, Mosaic TPU), each beside the pure-jnp reference in xlazoo.ops that it replaces."""
