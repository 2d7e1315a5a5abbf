"""Compiled generation: cache vs no-cache parity, samplers, stopping, in-place cache, output types.

Every model here is tiny and random, with its weights scaled up so that logits are far from uniform
(greedy output is diverse and sampling is neither uniform nor effectively greedy). Calls share
plans and padded shapes where they can, so the whole file compiles few programs.
"""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from scipy import stats

import xlazoo
from xlazoo.decoding import generate as g
from xlazoo.decoding.sampling import Sampler
from xlazoo.models import Model, config_from_hf

VOCAB = 97
N_NEW = 12
PAD = 1
# 7, 19 and 12 tokens: all padded to 32 (two prompt buckets), rows of different lengths.
PROMPTS = [[3, 14, 15, 92, 65, 35, 89], list(range(5, 24)), [50, 7, 7, 81, 2, 44, 60, 13, 9, 70, 33, 21]]

CONFIGS = {
    "llama": dict(model_type="llama", pad_token_id=PAD),
    # Every layer slides; the window is much shorter than prompt + new tokens.
    "mistral_sliding": dict(model_type="mistral", sliding_window=8),
    # Alternating sliding / full layers, both soft-caps small enough to bite.
    "gemma2_softcap": dict(
        model_type="gemma2", sliding_window=8, attn_logit_softcapping=5.0, final_logit_softcapping=6.0,
        tie_word_embeddings=False,
    ),
}
SEEDS = {"gemma2_softcap": 2}  # a seed whose greedy output does not fall into a loop


def make_model(overrides: dict, *, seed: int = 0, scale: float = 14.0, layers: int = 2, max_pos: int = 256) -> Model:
  d = dict(
      vocab_size=VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=layers, num_attention_heads=4,
      num_key_value_heads=2, head_dim=16, max_position_embeddings=max_pos,
  )
  config = config_from_hf({**d, **overrides})
  params = Model(config, {}).family.init(config, jax.random.key(seed))
  # Scale the random matrices (std 0.02 -> 0.02 * scale); norm scales keep their init.
  params = jax.tree_util.tree_map_with_path(lambda path, x: x if path[-1].key == "scale" else x * scale, params)
  return Model(config, params)


def rel_err(out, ref) -> float:
  out, ref = np.asarray(out, np.float64), np.asarray(ref, np.float64)
  return float(np.abs(out - ref).max() / np.abs(ref).max())


def assert_diverse(tokens_BN):
  for row in tokens_BN:
    assert len(set(row.tolist())) >= N_NEW // 2, f"degenerate greedy output {row.tolist()}: the test would be weak"
  assert len({tuple(r) for r in tokens_BN.tolist()}) == len(tokens_BN)


def no_cache_logits(model, prompts, gen_BN):
  """[B, N, V]: the no-cache logits that predict each new token, from one batched forward over
  prompt + generated tokens (right-padded; causality keeps the padding out of every kept position)."""
  seqs = [p + gen_BN[b].tolist() for b, p in enumerate(prompts)]
  batch = np.zeros((len(seqs), max(map(len, seqs))), np.int32)
  for b, seq in enumerate(seqs):
    batch[b, : len(seq)] = seq
  logits_BTV = np.asarray(xlazoo.forward(model, batch))
  return np.stack([logits_BTV[b, len(p) - 1 : len(p) - 1 + gen_BN.shape[1]] for b, p in enumerate(prompts)])


@pytest.fixture(scope="module")
def llama():
  return make_model(CONFIGS["llama"])


@pytest.fixture(scope="module")
def llama_greedy(llama):
  out = np.asarray(xlazoo.generate(llama, PROMPTS, max_new_tokens=N_NEW, stop_ids=()))
  assert_diverse(out)
  return out


# ---------------------------------------------------------------------------------------------
# 1. Cached decoding equals the no-cache forward at every step.


@pytest.mark.parametrize("name", list(CONFIGS))
def test_cached_decode_matches_no_cache_forward(name):
  model = make_model(CONFIGS[name], seed=SEEDS.get(name, 0))
  config, family, params = model.config, model.family, model.params
  B = len(PROMPTS)
  gen = np.asarray(xlazoo.generate(model, PROMPTS, max_new_tokens=N_NEW, stop_ids=()))
  assert gen.shape == (B, N_NEW)
  assert_diverse(gen)

  # Greedy: every generated token is the no-cache argmax at its step.
  ref_BNV = no_cache_logits(model, PROMPTS, gen)
  np.testing.assert_array_equal(ref_BNV.argmax(-1), gen, err_msg="cached greedy tokens != no-cache argmax")

  if config.sliding_window is not None:
    # The window really masks something: a full-attention twin gives different logits late in the rows.
    wide = Model(dataclasses.replace(config, sliding_window=10_000), params)
    assert rel_err(no_cache_logits(wide, PROMPTS, gen)[:, -1], ref_BNV[:, -1]) > 1e-3
  if config.attn_softcap is not None:
    # The attention soft-cap changes the logits, so the cached path must apply it too.
    uncapped = Model(dataclasses.replace(config, attn_softcap=None), params)
    assert rel_err(no_cache_logits(uncapped, PROMPTS, gen), ref_BNV) > 1e-2
  if config.final_softcap is not None:
    assert np.abs(ref_BNV).max() > 0.5 * config.final_softcap  # the cap is in its non-linear range

  # Cached logits: the library's prefill, then one token per step through the cache, teacher-forced with `gen`.
  prompt_BT, lengths_B, plan = g.prepare(model, PROMPTS, max_new_tokens=N_NEW, stop_ids=())
  prompt_BT, lengths_B = jnp.asarray(prompt_BT), jnp.asarray(lengths_B)
  assert prompt_BT.shape == (B, 32) and plan.cache_len == 64 and plan.sampler.greedy  # 32 + N_NEW, in whole tiles of 64

  @jax.jit
  def prefill(model, prompt_BT, lengths_B):
    state = g.prefill(model, prompt_BT, lengths_B, jax.random.key(0), plan)
    # prefill keeps only the sampled token; its logits come from the same cached forward.
    cache = family.init_cache(config, B, plan.cache_len, model.dtype)
    logits_B1V, _ = family.forward(config, model.params, prompt_BT, cache=cache, logits_at=lengths_B - 1)
    return state, logits_B1V[:, 0]

  @jax.jit
  def step(params, tok_B1, cache, pos_B1):
    logits_B1V, cache = family.forward(config, params, tok_B1, cache=cache, positions=pos_B1)
    return logits_B1V[:, 0], cache

  state, logits_BV = prefill(model, prompt_BT, lengths_B)
  np.testing.assert_array_equal(np.asarray(state.tokens_BN[:, 0]), gen[:, 0])
  np.testing.assert_array_equal(np.asarray(state.start_B), [len(p) for p in PROMPTS])
  cache_shape = (config.num_layers, B, plan.cache_len, config.num_kv_heads, config.head_dim)
  assert [x.shape for x in jax.tree.leaves(state.cache)] == [cache_shape] * 2
  cached = [np.asarray(logits_BV)]
  cache = state.cache
  for i in range(1, N_NEW):
    logits_BV, cache = step(params, jnp.asarray(gen[:, i - 1 : i]), cache, (lengths_B + i - 1)[:, None])
    cached.append(np.asarray(logits_BV))
  cached_BNV = np.stack(cached, axis=1)
  for b in range(B):
    for i in range(N_NEW):
      err = rel_err(cached_BNV[b, i], ref_BNV[b, i])
      assert err < 1e-5, f"row {b} step {i}: cached vs no-cache logits rel err {err:.2e}"


# ---------------------------------------------------------------------------------------------
# 2./3. Seeds and top_k=1.


def test_sampling_is_reproducible_per_seed(llama, llama_greedy):
  kw = dict(max_new_tokens=N_NEW, temperature=1.0, stop_ids=())
  a = np.asarray(xlazoo.generate(llama, PROMPTS, seed=0, **kw))
  b = np.asarray(xlazoo.generate(llama, PROMPTS, seed=0, **kw))
  c = np.asarray(xlazoo.generate(llama, PROMPTS, seed=1, **kw))
  np.testing.assert_array_equal(a, b)
  assert a.shape == (len(PROMPTS), N_NEW) and np.all((a >= 0) & (a < VOCAB))
  assert np.mean(a != c) > 0.5, f"different seeds gave (nearly) identical samples:\n{a}\n{c}"
  assert np.mean(a != llama_greedy) > 0.3, "temperature 1 sampling (nearly) collapsed to greedy"
  # The next-token distributions are far from one-hot, so differing seeds are expected to differ.
  p_BNV = jax.nn.softmax(no_cache_logits(llama, PROMPTS, a), axis=-1)
  assert float(np.median(p_BNV.max(-1))) < 0.7


def test_top_k_1_is_greedy(llama, llama_greedy):
  out = np.asarray(xlazoo.generate(llama, PROMPTS, max_new_tokens=N_NEW, temperature=1.0, top_k=1, seed=3, stop_ids=()))
  np.testing.assert_array_equal(out, llama_greedy)
  # The filter path alone (not the greedy shortcut) also keeps only the argmax.
  logits = no_cache_logits(llama, PROMPTS, llama_greedy).reshape(-1, VOCAB)
  kept = np.isfinite(np.asarray(Sampler(1.0, 1).filter(jnp.asarray(logits))))
  np.testing.assert_array_equal(kept.sum(-1), 1)
  np.testing.assert_array_equal(kept.argmax(-1), logits.argmax(-1))


# ---------------------------------------------------------------------------------------------
# 4. Sampled distributions: chi-square against a numpy implementation of each filter.

LOGITS_V = np.array([2.0, 1.3, 0.9, 0.4, 0.0, -0.5, -1.2, -2.0], np.float32)
N_DRAWS = 200_000


def _softmax(x):
  x = np.asarray(x, np.float64)
  e = np.exp(x - x[np.isfinite(x)].max())
  return e / e.sum()


def ref_probs(logits, temperature, top_k=0, top_p=1.0, min_p=0.0, order=("top_k", "top_p", "min_p")):
  """The sampling distribution per the documented rule, in float64 numpy."""
  x = np.asarray(logits, np.float64) / temperature
  for f in order:
    if f == "top_k" and 0 < top_k < x.size:
      x = np.where(x < np.sort(x)[::-1][top_k - 1], -np.inf, x)
    if f == "top_p" and top_p < 1:
      p = _softmax(x)
      idx = np.argsort(-p, kind="stable")
      before = np.cumsum(p[idx]) - p[idx]  # mass of the strictly more likely tokens
      keep = np.zeros(x.size, bool)
      keep[idx[before < top_p]] = True
      x = np.where(keep, x, -np.inf)
    if f == "min_p" and min_p > 0:
      p = _softmax(x)
      x = np.where(p < min_p * p.max(), -np.inf, x)
  return _softmax(x)


SAMPLERS = {
    "temperature_1": Sampler(1.0),
    "temperature_0.6": Sampler(0.6),
    "temperature_2": Sampler(2.0),
    "top_k_3": Sampler(1.0, top_k=3),
    "top_p_0.85": Sampler(1.0, top_p=0.85),
    "top_p_0.5_T1.5": Sampler(1.5, top_p=0.5),
    "min_p_0.1": Sampler(1.0, min_p=0.1),
    "min_p_0.3_T0.7": Sampler(0.7, min_p=0.3),
    # Every filter at once, chosen so that applying them in another order keeps a different set:
    # top_p must see the top_k-renormalised probabilities, and min_p must come after top_p.
    "combined_k_then_p": Sampler(1.0, top_k=4, top_p=0.85, min_p=0.1),
    "combined_p_then_m": Sampler(0.7, top_k=6, top_p=0.85, min_p=0.2),
}
WRONG_ORDER = {
    "combined_k_then_p": ("top_p", "top_k", "min_p"),
    "combined_p_then_m": ("top_k", "min_p", "top_p"),
}


@pytest.mark.parametrize("name", list(SAMPLERS))
def test_sampler_distribution(name):
  sampler = SAMPLERS[name]
  t, k, p, m = sampler.temperature, sampler.top_k, sampler.top_p, sampler.min_p
  probs = ref_probs(LOGITS_V, t, k, p, m)
  kept = probs > 0
  filtered = k or p < 1 or m
  if filtered:
    assert 2 <= kept.sum() < LOGITS_V.size, "the filter should keep some tokens and drop others"
    # No decision is within float error of its threshold: nudging any active setting by 2% keeps the set.
    for d in (0.98, 1.02):
      for args in ((t * d, k, p, m), (t, k, min(p * d, 1.0) if p < 1 else p, m), (t, k, p, m * d)):
        np.testing.assert_array_equal(ref_probs(LOGITS_V, *args) > 0, kept, err_msg=str(args))
  if name in WRONG_ORDER:
    assert not np.array_equal(ref_probs(LOGITS_V, t, k, p, m, order=WRONG_ORDER[name]) > 0, kept)
  # The filter itself keeps exactly the reference set.
  x = np.asarray(sampler.filter(jnp.asarray(LOGITS_V)[None]))[0]
  np.testing.assert_array_equal(np.isfinite(x), kept)

  keys = jax.random.split(jax.random.key(1234), N_DRAWS)
  draws = jax.jit(jax.vmap(lambda key: sampler(jnp.asarray(LOGITS_V)[None], key)[0]))(keys)
  draws = np.asarray(draws)
  assert draws.dtype == np.int32
  counts = np.bincount(draws, minlength=LOGITS_V.size)
  assert counts.size == LOGITS_V.size
  np.testing.assert_array_equal(counts[~kept], 0, err_msg="a filtered-out token was drawn")
  expected = probs[kept] * N_DRAWS
  assert expected.min() > 50, "every kept token must be likely enough for the chi-square test"
  pvalue = stats.chisquare(counts[kept], expected).pvalue
  assert pvalue > 1e-3, f"draws do not follow the renormalised distribution: p={pvalue:.2e}, {counts} vs {expected}"


def test_chi_square_detects_wrong_temperature():
  """The statistical test has power: draws at T=1 are rejected against softmax(logits / 1.2)."""
  keys = jax.random.split(jax.random.key(1234), N_DRAWS)
  draws = np.asarray(jax.jit(jax.vmap(lambda key: Sampler(1.0)(jnp.asarray(LOGITS_V)[None], key)[0]))(keys))
  counts = np.bincount(draws, minlength=LOGITS_V.size)
  assert stats.chisquare(counts, ref_probs(LOGITS_V, 1.2) * N_DRAWS).pvalue < 1e-6


# ---------------------------------------------------------------------------------------------
# 5. Per-row stop.


def test_stop_id_ends_only_its_row(llama, llama_greedy):
  first = llama_greedy  # generated with stop_ids=()
  # Row 0 stops at step k on a token it first emits there; row 1 stops at once (its prefill token);
  # row 2 emits neither token and must be unchanged.
  stop1 = int(first[1, 0])
  stop0, k = None, None
  for step in range(2, N_NEW - 2):
    tok = int(first[0, step])
    if tok not in (PAD, stop1) and tok not in first[0, :step] and tok not in first[2]:
      stop0, k = tok, step
      break
  assert stop0 is not None, f"no usable stop token in {first.tolist()}"
  assert stop1 != PAD and stop1 not in first[0, : k + 1] and stop1 not in first[2], f"unusable {first.tolist()}"
  # Otherwise "then all pad" would hold without any stopping.
  assert np.any(first[0, k + 1 :] != PAD) and np.any(first[1, 1:] != PAD)

  stop_ids = (stop0, stop1)
  _, _, plan = g.prepare(llama, PROMPTS, max_new_tokens=N_NEW, stop_ids=stop_ids)
  assert plan.pad_id == PAD == llama.config.pad_token_id and plan.stop_ids == stop_ids

  out = np.asarray(xlazoo.generate(llama, PROMPTS, max_new_tokens=N_NEW, stop_ids=stop_ids))
  np.testing.assert_array_equal(out[0, : k + 1], first[0, : k + 1])
  np.testing.assert_array_equal(out[0, k + 1 :], PAD)
  np.testing.assert_array_equal(out[1], [stop1] + [PAD] * (N_NEW - 1))
  np.testing.assert_array_equal(out[2], first[2])


MAMBA2 = dict(model_type="mamba2", num_heads=8, expand=2, state_size=16, n_groups=1, conv_kernel=4, chunk_size=8)


@pytest.mark.parametrize("overrides", [CONFIGS["llama"], MAMBA2], ids=["llama", "mamba2"])
def test_decode_in_segments_equals_one_call(overrides):
  """decode stops at stop_at and resumes from its state (as the CLI streams): segments give the one-call
  tokens, also with a recurrent state, which a step run past stop_at would have advanced."""
  model = make_model(overrides)
  n = 20
  prompt_BT, lengths_B, plan = g.prepare(model, PROMPTS, max_new_tokens=n, stop_ids=())
  state = g.prefill_jit(model, jnp.asarray(prompt_BT), jnp.asarray(lengths_B), jax.random.key(0), plan=plan)
  whole = g.decode_jit(model, jax.tree.map(jnp.copy, state), jnp.int32(n), plan=plan)  # decode donates its state
  assert int(whole.step) == n
  assert_diverse(np.asarray(whole.tokens_BN))
  for stop in (3, 12, 13, n):
    state = g.decode_jit(model, state, jnp.int32(stop), plan=plan)
    assert int(state.step) == stop
  np.testing.assert_array_equal(np.asarray(state.tokens_BN), np.asarray(whole.tokens_BN))
  fresh = g.prefill_jit(model, jnp.asarray(prompt_BT), jnp.asarray(lengths_B), jax.random.key(0), plan=plan)
  np.testing.assert_array_equal(np.asarray(g.finish_jit(model, fresh, plan=plan).tokens_BN), np.asarray(whole.tokens_BN))


def test_finish_without_stop_ids_runs_a_loop_of_known_trip_count():
  """Without stop ids `finish` runs max_new_tokens - 1 steps in a loop whose trip count XLA knows (so the GPU
  runtime does not copy the loop's condition to the host each step); with stop ids it may end early."""
  model = make_model(CONFIGS["llama"])
  prompt, lengths, key = jnp.asarray(np.array([[3, 14, 15]], np.int32)), jnp.asarray([3]), jax.random.key(0)

  def loop_trip_counts(stop_ids):
    plan = g.prepare(model, [[3, 14, 15]], max_new_tokens=23, stop_ids=stop_ids)[2]
    state = jax.eval_shape(lambda: g.prefill(model, prompt, lengths, key, plan))
    text = g.finish_jit.lower(model, state, plan=plan).compile().as_text()
    return [line.count('"known_trip_count":{"n":"22"}') for line in text.splitlines() if " while(" in line]

  assert sum(loop_trip_counts(())) == 1
  assert sum(loop_trip_counts((5,))) == 0


# ---------------------------------------------------------------------------------------------
# 6. The compiled decode step updates the donated cache in place.


def test_decode_step_does_not_copy_cache():
  model = make_model(CONFIGS["llama"], layers=8, scale=1.0, max_pos=8192)
  prompt, lengths, plan = g.prepare(model, [[1, 2, 3, 4, 5]], max_new_tokens=16, cache_len=4096)
  prompt, lengths, key = jnp.asarray(prompt), jnp.asarray(lengths), jax.random.key(0)
  state_shape = jax.eval_shape(lambda: g.prefill(model, prompt, lengths, key, plan))
  cache_leaves = jax.tree.leaves(state_shape.cache)
  assert [x.shape for x in cache_leaves] == [(8, 1, 4096, 2, 16)] * 2
  cache_bytes = sum(x.size * x.dtype.itemsize for x in cache_leaves)

  compiled = g.decode_jit.lower(model, state_shape, jnp.int32(0), plan=plan).compile()
  mem = compiled.memory_analysis()
  assert mem is not None
  assert mem.temp_size_in_bytes < 0.5 * cache_bytes, (mem.temp_size_in_bytes, cache_bytes)
  assert mem.alias_size_in_bytes >= cache_bytes, (mem.alias_size_in_bytes, cache_bytes)
  mem = g.finish_jit.lower(model, state_shape, plan=dataclasses.replace(plan, stop_ids=())).compile().memory_analysis()
  assert mem.temp_size_in_bytes < 0.5 * cache_bytes and mem.alias_size_in_bytes >= cache_bytes

  out_shape = jax.eval_shape(lambda s: g.decode(model, s, jnp.int32(3), plan), state_shape)
  assert jax.tree.structure(out_shape.cache) == jax.tree.structure(state_shape.cache)
  for o, i in zip(jax.tree.leaves(out_shape.cache), cache_leaves):
    assert (o.shape, o.dtype) == (i.shape, i.dtype)
  # Every other state field keeps its shape too, so the state can be fed back to the same executable.
  for o, i in zip(jax.tree.leaves(out_shape), jax.tree.leaves(state_shape)):
    assert (o.shape, o.dtype) == (i.shape, i.dtype)


# ---------------------------------------------------------------------------------------------
# 7. Output type and shape.


def test_generate_output_dtype_and_shape(llama, llama_greedy):
  # A list of lists (ragged); the default stop_ids (the config's, none here) plan the same as stop_ids=().
  from_lists = xlazoo.generate(llama, PROMPTS, max_new_tokens=N_NEW)
  assert isinstance(from_lists, jax.Array)
  assert from_lists.dtype == jnp.int32 and from_lists.shape == (len(PROMPTS), N_NEW)
  np.testing.assert_array_equal(np.asarray(from_lists), llama_greedy)
  # A 2-D numpy array (int64), and the same rows as lists.
  rows = np.random.default_rng(0).integers(0, VOCAB, (3, 20))
  from_array = xlazoo.generate(llama, rows, max_new_tokens=N_NEW)
  assert isinstance(from_array, jax.Array)
  assert from_array.dtype == jnp.int32 and from_array.shape == (3, N_NEW)
  from_rows = xlazoo.generate(llama, rows.tolist(), max_new_tokens=N_NEW)
  np.testing.assert_array_equal(np.asarray(from_array), np.asarray(from_rows))
  assert np.all((np.asarray(from_array) >= 0) & (np.asarray(from_array) < VOCAB))
