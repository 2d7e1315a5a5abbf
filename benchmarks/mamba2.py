"""Mamba-2 2.7B shape, bfloat16, batch 1: xlazoo beside mamba2-jax 1.1.2 and transformers' Mamba2 (PyTorch).

Prefill: a random prompt of --prompt-len tokens. Decode: per-token time over --new-tokens, after a prompt of
--decode-prompt-len tokens (a Mamba-2 step costs the same after any prompt). Every model gets the same random
weights (ours, handed over under Hugging Face names), and the last position's logits of a check prompt are
compared before timing.

  python -m benchmarks.mamba2                      # the full shape (H100: about 4 minutes)
  python -m benchmarks.mamba2 --layers 8 --prompt-len 2048
"""

import argparse
import dataclasses
import time

import jax
import jax.numpy as jnp
import numpy as np

import xlazoo
from benchmarks.common import (
  free_torch,
  header,
  peer_weights,
  rel_err,
  shape_flags,
  torch_time,
)
from xlazoo import bench
from xlazoo.checkpoints.hf import hf_tensors

CHECK_LEN = 256  # transformers 5.17's PyTorch Mamba2 path is wrong past one chunk; check within one


def peer_mamba2_jax(model, prompt, decode_prompt_len, new_tokens, iters):
  from flax import nnx
  from mamba2_jax import Mamba2Config, Mamba2ForCausalLM, modeling, params

  c = model.config
  cfg = Mamba2Config(
      vocab_size=c.vocab_size, hidden_size=c.hidden_size, state_size=c.state_size, head_dim=c.head_dim,
      chunk_size=c.chunk_size, expand=c.inner // c.hidden_size, conv_kernel=c.conv_width,
      num_hidden_layers=c.count("mamba"), layer_norm_epsilon=c.norm_eps, tie_word_embeddings=True,
  )
  peer = Mamba2ForCausalLM(cfg, rngs=nnx.Rngs(0))
  sd = {k.replace("backbone.embeddings.", "backbone.embedding."): v for k, v in hf_tensors(model, on_device=True).items()}
  params.load_pytorch_weights(peer, sd, dtype=jnp.bfloat16, strict=True)
  fwd = modeling.forward

  check = fwd(peer, prompt[:, :CHECK_LEN])["logits"][:, -1]
  t_prefill = bench.median_time(lambda: fwd(peer, prompt)["logits"], warmup=1, iters=iters)

  def decode():
    out = fwd(peer, prompt[:, :decode_prompt_len])
    cache, tok = out["cache"], jnp.argmax(out["logits"][:, -1:], -1)
    t = time.perf_counter()
    for _ in range(new_tokens):
      out = fwd(peer, tok, cache=cache)
      cache, tok = out["cache"], jnp.argmax(out["logits"][:, -1:], -1)
    jax.block_until_ready(tok)
    return (time.perf_counter() - t) / new_tokens

  decode()  # compile
  t_decode = float(np.median([decode() for _ in range(iters)]))
  return check, t_prefill, t_decode


def peer_transformers(model, prompt, decode_prompt_len, new_tokens, iters):
  import torch
  import transformers

  hf = {k: v for k, v in model.config.hf.items() if k != "model_type"}
  cfg = transformers.Mamba2Config(**hf)
  with torch.device("cuda"):
    peer = transformers.Mamba2ForCausalLM(cfg).to(torch.bfloat16).eval()
  missing, unexpected = peer.load_state_dict(peer_weights(model), strict=False)
  assert not unexpected and set(missing) <= {"lm_head.weight"}, (missing, unexpected)
  peer.tie_weights()
  ids = torch.from_dlpack(prompt).long()
  with torch.inference_mode():
    check = peer(ids[:, :CHECK_LEN], logits_to_keep=1).logits[:, -1].float().cpu().numpy()
    try:
      t_prefill = torch_time(lambda: peer(ids, logits_to_keep=1).logits, warmup=1, iters=iters)
    except torch.OutOfMemoryError:
      t_prefill = None
    kw = dict(do_sample=False, eos_token_id=None, pad_token_id=0)
    gen = lambda n: peer.generate(ids[:, :decode_prompt_len], max_new_tokens=n, min_new_tokens=n, **kw)  # noqa: E731
    t_decode = (torch_time(lambda: gen(new_tokens + 1), warmup=1, iters=iters) - torch_time(lambda: gen(1), warmup=1, iters=iters)) / new_tokens
  return check, t_prefill, t_decode


def main():
  ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  shape_flags(ap, layers=64, new_tokens=256)
  ap.add_argument("--decode-prompt-len", type=int, default=16, help="prompt before the timed decode steps (default 16)")
  ap.add_argument("--peers", default="mamba2-jax,transformers", help="comma-separated peers to run (default both)")
  args = ap.parse_args()

  hf = bench.shape("mamba2-2.7b", args.layers)
  model = bench.random_model(hf)
  print(header("mamba2-jax", "flax"))
  ceil = bench.ceilings()
  (prefill, _), _ = bench.run(model, prompt_len=args.prompt_len, new_tokens=2, iters=args.iters)
  (_, decode), _ = bench.run(model, prompt_len=args.decode_prompt_len, new_tokens=args.new_tokens + 1, iters=args.iters)
  prompt = jnp.asarray(np.random.default_rng(1).integers(1, hf["vocab_size"], (1, args.prompt_len)), jnp.int32)
  ours = np.asarray(xlazoo.forward(model, prompt[:, :CHECK_LEN])[:, -1])
  rows = [dataclasses.replace(prefill, name=f"xlazoo {prefill.name}")]
  dec_rows = [dataclasses.replace(decode, name=f"xlazoo {decode.name}")]
  runs = {"mamba2-jax": peer_mamba2_jax, "transformers": peer_transformers}
  for name in args.peers.split(","):
    if not name:
      continue
    try:
      check, tp, td = runs[name](model, prompt, args.decode_prompt_len, args.new_tokens, args.iters)
    except Exception as e:  # a peer that cannot run here says why; the table goes on
      print(f"{name}: {type(e).__name__}: {str(e).splitlines()[0][:200]}")
      continue
    finally:
      free_torch()
    print(f"{name}: last-position logits vs xlazoo, relative error {rel_err(check, ours):.2e} (bfloat16; T={CHECK_LEN})")
    if tp is None:
      print(f"{name}: prefill of {args.prompt_len} tokens ran out of GPU memory")
    else:
      rows.append(dataclasses.replace(prefill, name=f"{name} prefill", seconds=tp, ratio=tp / prefill.seconds))
    dec_rows.append(dataclasses.replace(decode, name=f"{name} decode", seconds=td, ratio=td / decode.seconds, once=None))
  print(bench.table(rows + dec_rows, ceil))


if __name__ == "__main__":
  main()
