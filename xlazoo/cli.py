"""The `xlazoo` command: generate, convert, export."""

import argparse
import sys
import time
from pathlib import Path

STREAM_SEGMENT = 8  # decode steps per compiled segment when streaming to the terminal


def _parse_ids(text: str) -> list[int]:
  try:
    return [int(t) for t in text.replace(" ", "").split(",") if t]
  except ValueError:
    raise SystemExit(f"error: --prompt-ids must be comma-separated integers, got {text!r}")


def _load(args):
  """The model and its tokenizer (or None) for --model, or the built-in tiny model."""
  if args.model is None:
    from xlazoo.checkpoints.tiny import NOTICE, byte_tokenizer, tiny_model

    print(NOTICE, file=sys.stderr)
    return tiny_model(), byte_tokenizer()
  import xlazoo

  model = xlazoo.load(args.model, args.dtype)
  tok_file = Path(args.model) / "tokenizer.json"
  if not tok_file.is_file():
    return model, None
  from tokenizers import Tokenizer

  return model, Tokenizer.from_file(str(tok_file))


class _Printer:
  """Prints the text of a growing token list, holding back an incomplete UTF-8 character."""

  def __init__(self, tokenizer):
    self.tokenizer, self.ids, self.shown = tokenizer, [], ""

  def add(self, ids, final: bool = False):
    self.ids += ids
    if self.tokenizer is None:
      sys.stdout.write("".join(f"{i} " for i in ids))
    else:
      text = self.tokenizer.decode(self.ids, skip_special_tokens=True)
      if text.endswith("\ufffd") and not final:
        return  # the next token may complete the character
      sys.stdout.write(text[len(self.shown) :] if text.startswith(self.shown) else text)
      self.shown = text
    sys.stdout.flush()


def cmd_generate(args) -> int:
  import jax
  import jax.numpy as jnp
  import numpy as np

  from xlazoo.decoding import generate as g

  if (args.prompt is None) == (args.prompt_ids is None):
    raise SystemExit("error: give exactly one of --prompt TEXT or --prompt-ids 1,2,3")
  model, tokenizer = _load(args)
  if args.prompt is not None:
    if tokenizer is None:
      raise SystemExit(f"error: {args.model} has no tokenizer.json; pass token ids with --prompt-ids instead")
    ids = tokenizer.encode(args.prompt).ids
  else:
    ids = _parse_ids(args.prompt_ids)
  prompt, lengths, plan = g.prepare(
      model, [ids], max_new_tokens=args.max_new_tokens, temperature=args.temperature, top_k=args.top_k,
      top_p=args.top_p, min_p=args.min_p,
  )
  prompt, lengths, key = jnp.asarray(prompt), jnp.asarray(lengths), jax.random.key(args.seed)

  t0 = time.perf_counter()
  prefill = g.prefill_jit.lower(model, prompt, lengths, key, plan=plan).compile()
  state_shape = jax.eval_shape(lambda: g.prefill(model, prompt, lengths, key, plan))
  decode = g.decode_jit.lower(model, state_shape, jnp.int32(0), plan=plan).compile()
  print(f"compiled in {time.perf_counter() - t0:.1f} s", file=sys.stderr)

  # With one row the loop ends right after a stop token, so tokens[:step] never holds padding.
  printer = _Printer(tokenizer)
  t0 = time.perf_counter()
  state = prefill(model, prompt, lengths, key)
  first = np.asarray(state.tokens_BN[0, :1])
  t_prefill = time.perf_counter() - t0
  printer.add(first.tolist())
  done, t0 = 1, time.perf_counter()
  while done < plan.max_new_tokens and not bool(state.done_B[0]):
    prev = done
    state = decode(model, state, jnp.int32(min(done + STREAM_SEGMENT, plan.max_new_tokens)))
    done = int(state.step)
    printer.add(np.asarray(state.tokens_BN[0, prev:done]).tolist())
  t_decode = time.perf_counter() - t0
  printer.add([], final=True)
  sys.stdout.write("\n")
  n_prompt, n_decode = len(ids), done - 1
  rate = f"{n_decode / t_decode:.1f} tokens/s" if n_decode and t_decode > 0 else "n/a"
  print(
      f"prefill: {n_prompt} tokens in {t_prefill * 1e3:.1f} ms ({n_prompt / t_prefill:.1f} tokens/s); "
      f"decode: {n_decode} tokens in {t_decode * 1e3:.1f} ms ({rate})",
      file=sys.stderr,
  )
  return 0


def cmd_convert(args) -> int:
  from xlazoo.checkpoints import convert

  out = convert(args.src, args.out, args.dtype)
  print(f"wrote {out}")
  return 0


def cmd_export(args) -> int:
  from xlazoo.checkpoints import export

  out = export(args.src, args.out, args.dtype)
  print(f"wrote {out}")
  return 0


def parser() -> argparse.ArgumentParser:
  p = argparse.ArgumentParser(prog="xlazoo", description="xlazoo: language models in JAX/XLA.")
  sub = p.add_subparsers(dest="command", required=True)

  gen = sub.add_parser("generate", help="generate text from a prompt", description="Generate text, streaming it as it is produced.")
  gen.add_argument("--model", help="checkpoint directory (Hugging Face or xlazoo); default: the built-in tiny untrained model")
  gen.add_argument("--prompt", help="prompt text, tokenized with the checkpoint's tokenizer.json")
  gen.add_argument("--prompt-ids", help="prompt as comma-separated token ids, e.g. 1,2,3 (instead of --prompt)")
  gen.add_argument("--max-new-tokens", type=int, default=64, help="number of tokens to generate (default 64)")
  gen.add_argument("--temperature", type=float, default=0.0, help="sampling temperature; 0 = greedy (default 0)")
  gen.add_argument("--top-k", type=int, default=0, help="sample among the k most likely tokens; 0 = off (default 0)")
  gen.add_argument("--top-p", type=float, default=1.0, help="nucleus sampling probability mass; 1 = off (default 1)")
  gen.add_argument("--min-p", type=float, default=0.0, help="drop tokens below min-p times the top probability; 0 = off")
  gen.add_argument("--seed", type=int, default=0, help="random seed for sampling (default 0)")
  gen.add_argument("--dtype", help="parameter dtype, e.g. bfloat16 or float32 (default: the checkpoint's)")
  gen.set_defaults(run=cmd_generate)

  conv = sub.add_parser("convert", help="Hugging Face directory -> xlazoo (Orbax) directory")
  conv.add_argument("src", help="Hugging Face checkpoint directory (config.json + safetensors or pytorch_model.bin)")
  conv.add_argument("out", help="new output directory (must not exist or be empty)")
  conv.add_argument("--dtype", help="parameter dtype to store (default: the checkpoint's)")
  conv.set_defaults(run=cmd_convert)

  exp = sub.add_parser("export", help="xlazoo directory -> Hugging Face directory (safetensors + config.json)")
  exp.add_argument("src", help="xlazoo directory (from `xlazoo convert`) or a Hugging Face directory")
  exp.add_argument("out", help="new output directory (must not exist or be empty)")
  exp.add_argument("--dtype", help="parameter dtype to write (default: the stored one)")
  exp.set_defaults(run=cmd_export)
  return p


def main(argv=None) -> int:
  args = parser().parse_args(argv)
  try:
    return args.run(args)
  except (ValueError, FileNotFoundError, FileExistsError, TypeError) as e:
    print(f"error: {e}", file=sys.stderr)
    return 2


if __name__ == "__main__":
  sys.exit(main())
