"""Prefill and decode benchmarks: times, rates, and their fractions of ceilings measured in the same run.

Counting conventions (stated once, used by `xlazoo bench` and every script in benchmarks/):
- Model FLOPs = 2 x (matmul weights a token uses) x tokens + 4 N H per (query, key) pair of each
  attention layer (the causal half only). Embedding lookups are free; a tied head counts as a
  matmul; of routed experts, top-k / E of the weights count. The SSD scan's own arithmetic is not
  counted (about 3% at the Mamba-2 2.7B shape); in_proj's padding columns are (0.3% there).
- Bytes of a decode step = every weight the step reads once + the cache it must read (each row's
  KV entries up to its own length, and the SSM and conv states read and written).
- Ceilings: a large bfloat16 matrix product and a large device-to-device copy (bytes read + written),
  timed on the device at hand.
"""

import dataclasses
import functools
import math
import statistics
import time
from typing import Callable

import jax
import jax.numpy as jnp
import numpy as np

from xlazoo.models import Model, config_from_hf, family_of
from xlazoo.models.params import is_param
from xlazoo.models.transformer import KVCache

# Named shapes: the published configs of the models the benchmarks target, with random weights.
SHAPES = {
    "llama3-8b": {
        "model_type": "llama", "vocab_size": 128256, "hidden_size": 4096, "intermediate_size": 14336,
        "num_hidden_layers": 32, "num_attention_heads": 32, "num_key_value_heads": 8, "rms_norm_eps": 1e-5,
        "rope_theta": 500000.0, "max_position_embeddings": 131072, "tie_word_embeddings": False,
        "bos_token_id": 128000, "eos_token_id": 128001,
    },
    "mamba2-2.7b": {
        "model_type": "mamba2", "vocab_size": 50288, "hidden_size": 2560, "num_hidden_layers": 64,
        "state_size": 128, "head_dim": 64, "num_heads": 80, "n_groups": 1, "expand": 2, "conv_kernel": 4,
        "chunk_size": 256, "use_bias": False, "use_conv_bias": True, "layer_norm_epsilon": 1e-5,
        "tie_word_embeddings": True, "bos_token_id": 0, "eos_token_id": 0, "pad_token_id": 0,
    },
}


def shape(name: str, layers: int | None = None) -> dict:
  """The config of a named shape, optionally with fewer layers (a quick run)."""
  hf = dict(SHAPES[name])
  if layers:
    hf["num_hidden_layers"] = layers
  return hf


def random_model(hf_config: dict, dtype=jnp.bfloat16, seed: int = 0) -> Model:
  """A model of the config's shape with random weights made on the device (no host copy)."""
  config = config_from_hf(hf_config)
  family = family_of(config)
  params = jax.jit(family.init, static_argnums=(0, 2))(config, jax.random.key(seed), dtype)
  return Model(config, params)


# ----------------------------------------------------------------------------- counting


@dataclasses.dataclass(frozen=True)
class Counts:
  matmul_weights: int  # weights a token multiplies by (active experts only)
  weight_bytes: int  # bytes a decode step reads of the weights
  attn: tuple[tuple[int, int, int, int], ...]  # per attention stack: (layers, query heads, kv heads, head dim)


def count(model: Model) -> Counts:
  """Weights and attention shapes, from the family's parameter declarations."""
  c = model.config
  decls = model.family.param_decls(c)
  by_name = {jax.tree_util.keystr(path): p for path, p in jax.tree_util.tree_flatten_with_path(decls, is_leaf=is_param)[0]}
  tied = getattr(c, "tie_word_embeddings", False)
  itemsize = jnp.dtype(model.dtype).itemsize
  top_k = getattr(getattr(c, "moe", None), "top_k", 0)
  matmul = nbytes = 0
  attn = []
  for name, p in by_name.items():
    size = math.prod(p.shape)
    if "table_VD" in name and not tied:
      continue  # a lookup: B rows read, no arithmetic
    nbytes += size * itemsize
    axes = p.axes[1:] if p.axes[0] == "layers" else p.axes
    if len(axes) >= 2 and "conv_width" not in axes:  # matrices, not norms, biases or the depthwise conv
      matmul += size * top_k // p.shape[-len(axes)] if axes[0] == "experts" else size  # routed: top-k of E
    if name.endswith("['wq_DNH']"):
      kv = by_name[name.replace("wq_DNH", "wk_DKH")]
      attn.append((math.prod(p.shape[:-3]), p.shape[-2], kv.shape[-2], p.shape[-1]))
  return Counts(matmul, nbytes, tuple(attn))


def prefill_flops(counts: Counts, batch: int, tokens: int) -> float:
  pairs = tokens * (tokens + 1) / 2
  attn = sum(4 * L * N * H * pairs for L, N, _, H in counts.attn)
  return batch * (2 * counts.matmul_weights * tokens + attn)


def decode_bytes(counts: Counts, cache, lengths_B: np.ndarray) -> float:
  """Bytes one decode step must move: the weights, each row's KV up to its length, the recurrent states (r + w)."""
  kv = cache if isinstance(cache, KVCache) else cache.kv
  kv_bytes = 0
  if kv is not None:
    kv_bytes = sum(2 * L * K * H for L, _, K, H in counts.attn) * int(np.sum(lengths_B)) * kv.k_LBSKH.dtype.itemsize
  states = [getattr(cache, f, None) for f in ("conv_LBWE", "ssm_LBNPQ")]
  return counts.weight_bytes + kv_bytes + sum(2 * math.prod(a.shape) * a.dtype.itemsize for a in states if a is not None)


def decode_flops(counts: Counts, lengths_B: np.ndarray) -> float:
  attn = sum(4 * L * N * H for L, N, _, H in counts.attn) * float(np.sum(lengths_B))
  return 2 * counts.matmul_weights * len(lengths_B) + attn


# ----------------------------------------------------------------------------- timing


def median_time(fn: Callable, *, warmup: int = 2, iters: int = 10, sync: Callable = jax.block_until_ready, setup=None, repeat: int = 1) -> float:
  """Median wall-clock seconds of fn() (or fn(setup()), setup untimed), synchronised after each sample.

  repeat > 1 queues that many calls per sample and divides, hiding the launch latency of short kernels.
  """
  times = []
  for i in range(warmup + iters):
    arg = setup() if setup else None
    if setup:
      sync(arg)
    t = time.perf_counter()
    for _ in range(repeat):
      out = fn(arg) if setup else fn()
    sync(out)
    if i >= warmup:
      times.append((time.perf_counter() - t) / repeat)
  return statistics.median(times)


@dataclasses.dataclass(frozen=True)
class Ceilings:
  tflops: float  # bf16 matrix product, TFLOP/s
  tbps: float  # device-to-device copy, TB/s (read + write)


def ceilings(iters: int = 10) -> Ceilings:
  """Measures the matmul and copy ceilings of the default device (smaller sizes on a CPU)."""
  cpu = jax.default_backend() == "cpu"
  matmul_n, copy_bytes = (1024, 1 << 26) if cpu else (8192, 1 << 31)
  k1, k2 = jax.random.split(jax.random.key(0))
  a = jax.random.normal(k1, (matmul_n, matmul_n), jnp.bfloat16)
  b = jax.random.normal(k2, (matmul_n, matmul_n), jnp.bfloat16)
  mm = jax.jit(lambda a, b: a @ b)
  t_mm = median_time(lambda: mm(a, b), iters=iters, repeat=5)
  x = jax.random.normal(k1, (copy_bytes // 4,), jnp.float32)
  cp = jax.jit(lambda x: x * 1.0001)  # an elementwise pass: read once, write once
  t_cp = median_time(lambda: cp(x), iters=iters, repeat=5)
  return Ceilings(2 * matmul_n**3 / t_mm / 1e12, 2 * x.nbytes / t_cp / 1e12)


# ----------------------------------------------------------------------------- the model benchmark


@dataclasses.dataclass(frozen=True)
class Row:
  name: str
  seconds: float  # per call (prefill) or per token step (decode)
  tokens: int  # tokens per call / step (batch x length for prefill, batch for decode)
  flops: float
  nbytes: float
  ratio: float | None = None  # a peer's row: its time / xlazoo's for the same work (> 1: xlazoo is faster)
  once: float | None = None  # xlazoo's decode: seconds a call costs once, beside its steps (not in `seconds`)


def table(rows: list[Row], ceil: Ceilings) -> str:
  head = f"{'':34} {'time':>10} {'tokens/s':>10} {'TFLOP/s':>8} {'TB/s':>6} {'%mm':>5} {'%copy':>5}"
  head += f" {'xlazoo speed-up':>15}" if any(r.ratio for r in rows) else ""
  lines = [head, f"{'ceilings measured':34} {'':10} {'':10} {ceil.tflops:8.1f} {ceil.tbps:6.2f}"]
  for r in rows:
    tf, tb = r.flops / r.seconds / 1e12, r.nbytes / r.seconds / 1e12
    ms = f"{r.seconds * 1e3:.3f} ms" if r.seconds < 0.01 else f"{r.seconds * 1e3:.1f} ms"
    ratio = f"{r.ratio:.2f}x" if r.ratio else ""
    lines.append(
        f"{r.name:34} {ms:>10} {r.tokens / r.seconds:10.1f} {tf:8.1f} {tb:6.2f} "
        f"{100 * tf / ceil.tflops:5.1f} {100 * tb / ceil.tbps:5.1f} {ratio:>15}".rstrip()
    )
  lines += [f"{r.name}: a call also costs {r.once * 1e3:.2f} ms once (dispatch, first launches, sync)"
            for r in rows if r.once is not None]
  return "\n".join(lines)


def run(model: Model, *, batch: int = 1, prompt_len: int = 512, new_tokens: int = 128, iters: int = 5, progress: bool = True):
  """Times xlazoo's compiled prefill and decode loop (as `xlazoo.generate` runs them).

  A decode step's time is the difference between calls of new_tokens - 1 and (new_tokens - 1) // 2 steps over the
  same cache, divided by the steps between them: what a call costs once (its dispatch, the first step's launches,
  the final sync; about 1 ms on an H100) is left out of the rate and reported apart (`Row.once`).
  Returns the two table rows and the tokens of the last decode run [batch, new_tokens].
  """
  from xlazoo.checkpoints.files import progress as bar
  from xlazoo.decoding import generate as g

  rng = np.random.default_rng(0)
  prompts = rng.integers(1, model.config.vocab_size, (batch, prompt_len)).astype(np.int32)
  # No stop tokens: every row decodes all new_tokens, whatever the random weights say.
  prompt_BT, lengths_B, plan = g.prepare(model, prompts, max_new_tokens=new_tokens, stop_ids=())
  prompt_BT, lengths = jnp.asarray(prompt_BT), jnp.asarray(lengths_B)
  key = jax.random.key(0)
  steps = new_tokens - 1  # the prefill makes the first new token
  half = dataclasses.replace(plan, max_new_tokens=1 + steps // 2)
  counts = count(model)
  with bar(3 * (1 + iters), f"bench {batch}x{prompt_len}+{new_tokens}", progress) as pb:

    def prefill():
      return g.prefill_jit(model, prompt_BT, lengths, key, plan)

    def short_prefill():  # the same state with room for fewer new tokens
      s = prefill()
      return s.replace(tokens_BN=s.tokens_BN[:, : half.max_new_tokens])

    last = {}

    def decode(state, plan=plan):
      last["tokens"] = g.finish_jit(model, state, plan).tokens_BN
      pb.update()
      return last["tokens"]

    def timed_prefill():
      out = prefill()
      pb.update()  # while the GPU works (median_time waits for out): the bar's drawing is not timed
      return out

    t_prefill = median_time(timed_prefill, warmup=1, iters=iters)
    cache = jax.eval_shape(prefill).cache
    t_half = median_time(functools.partial(decode, plan=half), warmup=1, iters=iters, setup=short_prefill)
    t_full = median_time(decode, warmup=1, iters=iters, setup=prefill)
  t_decode, once = (t_full - t_half) / (steps - steps // 2), None
  if t_decode > 0:
    once = t_full - steps * t_decode
  else:  # the timings' noise exceeds the steps between them (a few steps of a small model): the plain mean
    t_decode = t_full / steps
  mid_B = lengths_B + new_tokens // 2  # the average decode step's context
  rows = [
      Row(f"prefill {batch}x{prompt_len}", t_prefill, batch * prompt_len, prefill_flops(counts, batch, prompt_len), counts.weight_bytes),
      Row(f"decode {batch}x{steps} steps", t_decode, batch, decode_flops(counts, mid_B), decode_bytes(counts, cache, mid_B),
          once=once),
  ]
  return rows, np.asarray(last["tokens"])
