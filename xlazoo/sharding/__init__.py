"""Logical axis names -> mesh axes. Model code names logical axes only; this package maps them."""

from xlazoo.sharding.logical import AXES, partition_spec

__all__ = ["AXES", "partition_spec"]
