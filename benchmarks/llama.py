"""Llama-3-8B shape, bfloat16: xlazoo beside transformers (PyTorch): SDPA prefill, static-cache compiled decode.

Prefill: a random prompt of --prompt-len tokens, batch 1. Decode: per-token time over --new-tokens
after a --decode-prompt-len prompt, at batch 1 and at --big-batch (xlazoo only). Both models get the
same random weights (ours, handed over under Hugging Face names), and the last position's logits of
a check prompt are compared before timing.

  python -m benchmarks.llama                       # the full shape (H100: about 5 minutes)
  python -m benchmarks.llama --layers 4 --prompt-len 2048
"""

import argparse
import dataclasses

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

CHECK_LEN = 512


def peer_transformers(model, prompt, decode_len, new_tokens, iters):
  import torch
  import transformers

  hf = {k: v for k, v in model.config.hf.items() if k != "model_type"}
  cfg = transformers.LlamaConfig(**hf, attn_implementation="sdpa")
  torch.set_default_dtype(torch.bfloat16)
  with torch.device("cuda"):
    peer = transformers.LlamaForCausalLM(cfg).eval()
  torch.set_default_dtype(torch.float32)
  peer.load_state_dict(peer_weights(model), strict=True)
  torch.cuda.empty_cache()
  ids = torch.from_dlpack(prompt).long()
  with torch.inference_mode():
    check = peer(ids[:, :CHECK_LEN], logits_to_keep=1).logits[:, -1].float().cpu().numpy()
    t_prefill = torch_time(lambda: peer(ids, logits_to_keep=1).logits, warmup=1, iters=iters)
    peer.generation_config.cache_implementation = "static"  # transformers then compiles the decode step
    kw = dict(do_sample=False, eos_token_id=None, pad_token_id=0)
    gen = lambda n: peer.generate(ids[:, :decode_len], max_new_tokens=n, min_new_tokens=n, **kw)  # noqa: E731
    t_all = torch_time(lambda: gen(new_tokens + 1), warmup=2, iters=iters)
    t_one = torch_time(lambda: gen(1), warmup=1, iters=iters)
  return check, t_prefill, (t_all - t_one) / new_tokens


def main():
  ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  shape_flags(ap, layers=32, new_tokens=128)
  ap.add_argument("--decode-prompt-len", type=int, default=512, help="prompt before the timed decode steps (default 512)")
  ap.add_argument("--big-batch", type=int, default=64, help="batch of the throughput decode run (default 64; 0 = skip)")
  ap.add_argument("--no-peer", action="store_true", help="time xlazoo only")
  args = ap.parse_args()

  hf = bench.shape("llama3-8b", args.layers)
  model = bench.random_model(hf)
  print(header())
  ceil = bench.ceilings()
  prompt = jnp.asarray(np.random.default_rng(1).integers(1, hf["vocab_size"], (1, args.prompt_len)), jnp.int32)
  ours = np.asarray(xlazoo.forward(model, prompt[:, :CHECK_LEN])[:, -1])
  peer = None
  if not args.no_peer:
    check, tp, td = peer_transformers(model, prompt, args.decode_prompt_len, args.new_tokens, args.iters)
    free_torch()
    print(f"transformers: last-position logits vs xlazoo, relative error {rel_err(check, ours):.2e} (bfloat16; T={CHECK_LEN})")
    peer = tp, td
  (prefill, _), _ = bench.run(model, prompt_len=args.prompt_len, new_tokens=2, iters=args.iters)
  (_, decode), _ = bench.run(model, prompt_len=args.decode_prompt_len, new_tokens=args.new_tokens + 1, iters=args.iters)
  rows = [dataclasses.replace(prefill, name=f"xlazoo {prefill.name}")]
  dec = [dataclasses.replace(decode, name=f"xlazoo {decode.name}")]
  if peer:
    rows.append(dataclasses.replace(prefill, name="transformers SDPA prefill", seconds=peer[0], ratio=peer[0] / prefill.seconds))
    dec.append(dataclasses.replace(decode, name="transformers static+compile decode", seconds=peer[1], ratio=peer[1] / decode.seconds, once=None))
  if args.big_batch:
    (_, big), _ = bench.run(model, batch=args.big_batch, prompt_len=args.decode_prompt_len, new_tokens=args.new_tokens + 1, iters=args.iters)
    dec.append(dataclasses.replace(big, name=f"xlazoo {big.name}"))
  print(bench.table(rows + dec, ceil))


if __name__ == "__main__":
  main()
