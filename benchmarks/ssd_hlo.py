"""Compiles ops.ssd at Mamba-2 2.7B layer shapes and summarises the optimised HLO: the entry
computation's top-level ops (fusions, library matmuls) with their output sizes, and the compiled
memory analysis (peak temporaries)."""
import json
import re
import sys

import jax
import jax.numpy as jnp

from xlazoo.ops.ssd import ssd


def summarise(T, chunk, B=1, N=80, P=64, G=1, Q=128, dtype=jnp.bfloat16):
  args = (jax.ShapeDtypeStruct((B, T, N, P), dtype), jax.ShapeDtypeStruct((B, T, N), jnp.float32),
          jax.ShapeDtypeStruct((N,), jnp.float32), jax.ShapeDtypeStruct((B, T, G, Q), dtype),
          jax.ShapeDtypeStruct((B, T, G, Q), dtype))
  c = jax.jit(lambda *a: ssd(*a, chunk=chunk)).lower(*args).compile()
  m = c.memory_analysis()
  text = c.as_text()
  entry = text[text.index("ENTRY"):]
  entry = entry[: entry.index("\n}")]
  ops = []
  for line in entry.splitlines()[1:]:
    mm = re.match(r"\s*(?:ROOT )?%?([\w.\-]+) = (\w+)\[([\d,]*)\][^ ]* (\w+[-\w]*)\(", line)
    if not mm:
      mm2 = re.match(r"\s*(?:ROOT )?%?([\w.\-]+) = \((.*?)\) (\w+[-\w]*)\(", line)
      if mm2: ops.append((mm2.group(1), mm2.group(3), "tuple", 0, ""))
      continue
    name, dt, dims, op = mm.groups()
    if op in ("parameter", "constant", "get-tuple-element", "bitcast", "tuple"): continue
    n = 1
    for d in dims.split(","):
      if d: n *= int(d)
    size = n * {"f32": 4, "bf16": 2, "s32": 4, "pred": 1, "f16": 2}.get(dt, 4)
    kind = re.search(r"kind=(\w+)", line); target = re.search(r'custom_call_target="([^"]+)"', line)
    ops.append((name, op, f"{dt}[{dims}]", size, (kind.group(1) if kind else "") + (target.group(1) if target else "")))
  return {"T": T, "chunk": chunk, "temp_MiB": m.temp_size_in_bytes / 2**20, "args_MiB": m.argument_size_in_bytes / 2**20,
          "out_MiB": m.output_size_in_bytes / 2**20, "n_ops": len(ops),
          "ops": sorted(ops, key=lambda o: -o[3])[:14], "counts": {k: sum(1 for o in ops if o[1] == k) for k in set(o[1] for o in ops)}}

out = [summarise(T, ch) for T, ch in [(8192, 256), (8192, 128), (8192, 64), (2048, 256)]]
print(jax.devices()[0].platform, jax.__version__)
for r in out:
  print(json.dumps({k: v for k, v in r.items() if k != "ops"}))
  for o in r["ops"]: print("   ", o)
if len(sys.argv) > 1:
  json.dump(out, open(sys.argv[1], "w"), indent=1)
