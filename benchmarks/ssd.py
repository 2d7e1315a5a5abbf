"""The SSD scan of a Mamba-2 prefill, bfloat16, at the Mamba-2 2.7B layer shape (80 heads x 64, one group,
state 128), --seq tokens, batch 1: xlazoo's Mosaic GPU kernel (ops.pallas.ssd_gpu), its einsum graph
(ops.ssd.ssd_reference) at chunk 256 (the model's) and 128, and mamba2-jax's ssd_forward, on the same
inputs, each checked against the einsum graph in float32.

FLOPs are the matmuls of the chunked algorithm at 64-token chunks (the kernel's); bytes are x, B, C and
dt read and y (float32) written, the least any scan moves. The bar from the issue: 2e7 tokens/s, a fused
Triton SSD on the H100 at this shape.

  python -m benchmarks.ssd
"""

import argparse

import jax
import jax.numpy as jnp

from benchmarks.common import header, rel_err
from xlazoo import bench
from xlazoo.ops.pallas import ssd_gpu
from xlazoo.ops.ssd import ssd_reference

N, P, G, Q = 80, 64, 1, 128


def variants():
  out = {
      "xlazoo Mosaic SSD kernel": lambda x, dt, A, B, C: ssd_gpu.ssd(x, dt, A, B, C),
      "xlazoo einsum, chunk 256": lambda x, dt, A, B, C: ssd_reference(x, dt, A, B, C, chunk=256),
      "xlazoo einsum, chunk 128": lambda x, dt, A, B, C: ssd_reference(x, dt, A, B, C, chunk=128),
  }
  try:
    from mamba2_jax.modeling import ssd_forward

    def peer(x, dt, A, B, C):
      # dt goes in before its softplus (softplus^-1(dt), no bias or clamp); B and C per head; no D.
      heads = lambda m: jnp.broadcast_to(m, (*m.shape[:2], N, Q))  # noqa: E731
      return ssd_forward(x, jnp.log(jnp.expm1(dt)), A, heads(B), heads(C), 256, jnp.zeros(N), jnp.zeros(N),
                         0.0, float("inf"), return_final_states=True)

    out["mamba2-jax ssd_forward"] = peer
  except Exception as e:  # not installed, or not importable with this JAX
    print(f"mamba2-jax: {type(e).__name__}: {str(e).splitlines()[0][:150]}")
  return out


def main():
  ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
  ap.add_argument("--seq", type=int, default=8192, help="tokens (default 8192)")
  ap.add_argument("--iters", type=int, default=10, help="timed calls per variant; the median is reported (default 10)")
  args = ap.parse_args()
  print(header("mamba2-jax"))
  T = args.seq
  k = jax.random.split(jax.random.key(0), 5)
  x = jax.random.normal(k[0], (1, T, N, P), jnp.bfloat16)
  dt = jax.random.uniform(k[1], (1, T, N), jnp.float32, 0.001, 0.1)
  A = -jax.random.uniform(k[2], (N,), jnp.float32, 1.0, 16.0)
  B = jax.random.normal(k[3], (1, T, G, Q), jnp.bfloat16)
  C = jax.random.normal(k[4], (1, T, G, Q), jnp.bfloat16)
  with jax.default_matmul_precision("highest"):
    f32 = lambda a: a.astype(jnp.float32)  # noqa: E731
    ref = jax.jit(lambda *a: ssd_reference(*a, chunk=256)[0])(f32(x), dt, A, f32(B), f32(C))
  flops = 2.0 * T * N * (64 * Q + 64 * P + 2 * P * Q)
  nbytes = x.size * 2 + 2 * B.size * 2 + dt.size * 4 + x.size * 4
  ceil = bench.ceilings()
  rows = []
  for name, f in variants().items():
    fj = jax.jit(f)
    try:
      err = rel_err(fj(x, dt, A, B, C)[0], ref)
    except Exception as e:  # a variant that cannot run here says why; the table goes on
      print(f"{name}: {type(e).__name__}: {str(e).splitlines()[0][:200]}")
      continue
    print(f"{name}: y relative error vs float32 {err:.1e}")
    t = bench.median_time(lambda fj=fj: fj(x, dt, A, B, C), iters=args.iters, repeat=3)
    base = rows[0].seconds if rows else None
    rows.append(bench.Row(name, t, T, flops, nbytes, t / base if base else None))
  print(bench.table(rows, ceil))
  if rows:
    print(f"{rows[0].name}: {T / rows[0].seconds / 1e6:.1f}M tokens/s per layer (the bar: 20M)")


if __name__ == "__main__":
  main()
