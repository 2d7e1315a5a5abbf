"""The logical axis names that parameters and activations are annotated with, and the rule
tables that map them onto mesh axes.

A parameter's logical axes are declared once, beside its shape (see `xlazoo.models.params`);
a strategy is a table {logical name: mesh axis or None}. Names missing from a table are replicated.
"""

from jax.sharding import PartitionSpec

AXES = (
    "layers",  # stacked layer axis, scanned over: never sharded
    "vocab",
    "embed",  # model width D
    "heads",  # query heads N
    "kv_heads",  # K
    "head_dim",  # H
    "mlp",  # F
    "norm",  # the axis of a norm scale (D or H)
    "ssm_in",  # a Mamba-2 in_proj's fused outputs [z | x B C | dt]: never sharded (it would cut across them)
    "ssm_inner",  # mixer width I = N P (z, x, the gated norm, out_proj)
    "ssm_conv",  # conv channels: x, B and C
    "ssm_heads",  # SSM heads N
    "conv_width",  # conv kernel W
    "experts",  # routed experts X
)


def partition_spec(axes: tuple[str | None, ...], rules: dict[str, str | None]) -> PartitionSpec:
  """The PartitionSpec for an array with logical `axes` under a rule table."""
  unknown = [a for a in axes if a is not None and a not in AXES]
  if unknown:
    raise ValueError(f"unknown logical axis name(s) {unknown}; known: {AXES}")
  return PartitionSpec(*(rules.get(a) if a is not None else None for a in axes))
