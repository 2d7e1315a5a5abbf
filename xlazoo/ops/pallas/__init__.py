"""Pallas kernels (Mosaic GPU, Mosaic TPU), each beside the pure-jnp reference in xlazoo.ops that it replaces."""

import functools

import jax
from jax.experimental.custom_partitioning import custom_partitioning
from jax.sharding import NamedSharding, PartitionSpec


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


def partitioned(kernel, rule: str, shardable: str):
  """kernel(*arrays) -> array or tuple, run shard by shard where a jit spans several devices.

  A kernel's custom call has no partitioning of its own: Mosaic TPU refuses to lower under a multi-device jit
  ("Mosaic kernels cannot be automatically partitioned"), and XLA would gather a Mosaic GPU kernel's operands
  onto every device. `rule` names each operand's and result's dimensions by factors in Shardy's notation
  ("b k g t h, b k s h -> b k g t h"); the factors in `shardable` (one letter each) may stay sharded and the
  kernel then runs on each device's shard; the others are replicated first. On one device it is the kernel."""
  f = custom_partitioning(lambda *arrays: kernel(*arrays))  # positional only (it binds the signature)
  operands, results = (side.split(",") for side in rule.split("->"))
  dims_in, dims_out = [d.split() for d in operands], [d.split() for d in results]

  def shardings(mesh, arg_shapes):  # the operands' and results': as the first operand with a factor shards it
    axes = {}
    for dims, arg in zip(dims_in, arg_shapes):
      spec = tuple(arg.sharding.spec) + (None,) * (len(dims) - len(arg.sharding.spec))
      for factor, a in zip(dims, spec):
        if factor in shardable and a is not None and a not in axes.values():
          axes.setdefault(factor, a)
    sharding = lambda dims: NamedSharding(mesh, PartitionSpec(*(axes.get(d) for d in dims)))  # noqa: E731
    outs = tuple(sharding(d) for d in dims_out)
    return tuple(sharding(d) for d in dims_in), outs if len(outs) > 1 else outs[0]

  def partition(mesh, arg_shapes, result_shape):
    ins, outs = shardings(mesh, arg_shapes)
    return mesh, kernel, outs, ins

  factors = dict.fromkeys(d for dims in dims_in + dims_out for d in dims)  # in order of appearance, as Shardy wants
  f.def_partition(partition, infer_sharding_from_operands=lambda mesh, args, _: shardings(mesh, args)[1],
                  sharding_rule=rule, need_replication_factors=tuple(d for d in factors if d not in shardable))
  return f
